"""Opening a provider on a run's behalf, and saying what it reported.

Providers know nothing of the pipeline: the values they must keep out of logs come back through
``Provider.secrets()``, failed-over attempts through ``Machine.failures`` or
``CapacityExhausted.failures``, and anything else worth saying through ``Machine.notes``. This module
turns those into masks, annotations and log lines, once, for every step that opens a provider.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from gpuline import gha
from gpuline.providers import open_provider
from gpuline.providers.base import Machine, Provider


def masked(provider: Provider) -> Provider:
    """Ask the runner to redact every secret the provider read (an API token) before it is used."""
    for value in provider.secrets():
        gha.mask(value)
    return provider


def open_masked(name: str, project_dir: Path, options: dict[str, Any]) -> Provider:
    return masked(open_provider(name, project_dir, options))


def report_failures(provider: str, failures: Iterable[Mapping[str, Any]]) -> None:
    """One warning per failed-over attempt (instance type, lane, zone, the cloud's code and message)."""
    for f in failures:
        zone = f" in {f['zone']}" if f.get("zone") else ""
        gha.annotate(
            "warning",
            f"{provider}: {f.get('instance_type')} {f.get('lane')}{zone}: {f.get('code')}: {f.get('message')}",
            title="gpuline failover",
        )


def report_machine(provider: str, machine: Machine) -> None:
    for note in machine.notes:
        gha.info(note)
    report_failures(provider, machine.failures)
    for failure in machine.failures:
        gha.info(f"failed over: {failure.get('instance_type')} {failure.get('lane')} {failure.get('code')}")
