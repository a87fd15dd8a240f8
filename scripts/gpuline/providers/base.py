"""The provider protocol: buy a machine for a lease, look at it, give it back, list what we own.

A provider never decides ids, tags or lifetimes: the provision step records those in the ledger
before calling ``provision``, so a crash right after the call still leaves a findable machine.
Nor does it write to the log: what it has to say travels back in the result (``Machine.failures``
and ``Machine.notes``, ``CapacityExhausted.failures``), and the values it wants masked through
``secrets()``; the steps print and mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, Protocol

from gpuline.errors import NotFoundError
from gpuline.spec import Spec

MachineState = Literal["pending", "running", "stopping", "stopped", "terminated", "unknown"]

# Tag keys every provider puts on what it creates, so the reaper can find it again.
TAG_RUN_ID = "gpuline:run-id"
TAG_LEASE_ID = "gpuline:lease-id"
TAG_EXPIRES_AT = "gpuline:expires-at"
TAG_MANAGED = "gpuline:managed"


@dataclass
class RunnerRequest:
    """Turn the machine into a single-use GitHub runner: the JIT config is a secret, never a tag."""

    label: str
    jit_config: str = field(repr=False)


@dataclass
class LeaseRequest:
    run_id: str
    lease_id: str
    spec: Spec
    instance_type: str
    lane: str
    region: str
    ttl_seconds: int
    expires_at: datetime
    tags: dict[str, str]
    project_dir: Path
    runner: RunnerRequest | None = None


@dataclass
class Machine:
    instance_id: str
    provider: str
    state: MachineState
    tags: dict[str, str] = field(default_factory=dict)
    launched_at: datetime | None = None
    runner_label: str | None = None
    address: str | None = None
    instance_type: str = ""
    lane: str = ""
    region: str = ""
    # Attempts that failed before this one succeeded (capacity, quota, throttling), for the run record.
    failures: list[dict[str, Any]] = field(default_factory=list)
    # What the provider wants said about this launch ("creating Job ..."), for the step to print.
    notes: list[str] = field(default_factory=list)

    @property
    def run_id(self) -> str | None:
        return self.tags.get(TAG_RUN_ID)

    @property
    def lease_id(self) -> str | None:
        return self.tags.get(TAG_LEASE_ID)

    @property
    def expires_at(self) -> datetime | None:
        raw = self.tags.get(TAG_EXPIRES_AT)
        return datetime.fromisoformat(raw) if raw else None


class Provider(Protocol):
    name: str
    # How many nodes one lease can span: a provider that launches one machine per lease says 1, and a
    # multi-node spec is refused before anything is bought rather than priced at N and launched at 1.
    max_nodes: int

    def provision(self, request: LeaseRequest) -> Machine: ...
    def describe(self, instance_id: str) -> Machine: ...
    def release(self, instance_id: str) -> bool:
        """Terminate; True if something was running, False if it was already gone (idempotent)."""
        ...

    def list_owned(self) -> list[Machine]:
        """Everything this provider holds that carries gpuline tags (running or starting)."""
        ...

    def secrets(self) -> list[str]:
        """Values this provider reads that must never reach a log (an API token); empty when none.

        Cheap and safe to call before any other method, so the caller can mask them first; a value
        that is not configured is simply left out (the call that needs it raises).
        """
        ...


def still_running(provider: Provider, instance_id: str) -> Machine | None:
    """The machine, unless it is gone or already terminated (then releasing it is a no-op)."""
    try:
        machine = provider.describe(instance_id)
    except NotFoundError:
        return None
    return None if machine.state == "terminated" else machine
