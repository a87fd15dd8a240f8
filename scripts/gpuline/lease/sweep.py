"""What `gpuline reap` sweeps: every provider configuration that holds or held a lease in the ledger
(with the options its run used), plus the ones gpuline.yml names."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from gpuline.context import Context
from gpuline.errors import GpulineError, NotFoundError
from gpuline.providers import PROVIDERS
from gpuline.providers.options import options_for
from gpuline.runs import Ledger, RunRecord, utcnow

# Configurations of providers seen in leases this recent are swept (a machine cannot outlive its TTL).
LOOKBACK = timedelta(days=7)


@dataclass(frozen=True)
class Sweep:
    """One provider configuration to list machines with."""

    provider: str
    options_json: str = "{}"

    @property
    def options(self) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads(self.options_json)
        return loaded


def sweep_targets(ctx: Context, names: list[str] | None = None, *, now: datetime | None = None) -> list[Sweep]:
    """Providers with leases in the ledger (with the options their runs used) plus the configured one.

    ``names`` narrows the sweep to those providers."""
    now = now or utcnow()
    wanted = {PROVIDERS.canonical(n) for n in names} if names else None
    found: dict[Sweep, None] = {}
    runs: dict[str, RunRecord | None] = {}
    for lease in ctx.ledger.leases():
        if lease.released_at is not None and now - lease.requested_at > LOOKBACK:
            continue
        if lease.run_id not in runs:
            runs[lease.run_id] = find_run(ctx.ledger, lease.run_id)
        record = runs[lease.run_id]
        options = dict(record.resolved_config.get("resources", {}).get("options", {})) if record else {}
        found[_sweep(lease.provider, options, lease.region)] = None
    for name, options, region in _configured(ctx):
        found[_sweep(name, options, region)] = None
    if wanted is not None:
        chosen = [s for s in found if s.provider in wanted]
        chosen += [Sweep(n) for n in sorted(wanted) if not any(s.provider == n for s in chosen)]
        return chosen
    if not any(s.provider == "local" for s in found):
        found[Sweep("local")] = None
    return list(found)


def _sweep(provider: str, options: dict[str, Any], region: str) -> Sweep:
    name = PROVIDERS.canonical(provider)
    return Sweep(name, json.dumps(options_for(name, options, region), sort_keys=True, default=str))


def _configured(ctx: Context) -> list[tuple[str, dict[str, Any], str]]:
    """The providers gpuline.yml names (every tier), when it is there and valid."""
    try:
        spec = ctx.base_spec
    except (GpulineError, OSError):
        return []
    specs = [spec] + [spec.for_tier(t) for t in spec.tiers]
    return [(s.resources.provider, dict(s.resources.options), s.resources.region or "") for s in specs]


def find_run(ledger: Ledger, run_id: str) -> RunRecord | None:
    try:
        return ledger.get_run(run_id)
    except NotFoundError:
        return None
