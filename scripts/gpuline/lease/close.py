"""Ending a lease: release the machine, stamp the run's release time, GPU-seconds and real cost, and
settle its quota. Used by teardown and, for leases whose holder is gone, by the reaper. Every part
checks whether it already happened, so running it twice changes nothing the second time."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from gpuline.decisions import quota
from gpuline.decisions.cost import actual_cost, device_count
from gpuline.decisions.pricing import load_catalog
from gpuline.errors import GpulineError, NotFoundError
from gpuline.lease.machines import open_masked
from gpuline.providers.options import options_for
from gpuline.runs import LeaseRecord, Ledger, RunRecord

# The steps that end each tier: a run that reached one succeeded (release verifies after promote).
FINAL_STEPS = {"pr-fast": ("cost-estimate",), "nightly": ("promote",), "release": ("promote", "verify")}


def release_machine(project_dir: Path, record: RunRecord) -> bool:
    """Release the run's machine; True when one was running."""
    if not record.lease_id:
        return False
    # From the run record, not gpuline.yml: teardown must work even if the file changed or broke since.
    options = record.resolved_config.get("resources", {}).get("options", {})
    name = record.provider or "local"
    provider = open_masked(name, project_dir, options_for(name, options, record.region or None))
    if record.instance_id:
        return provider.release(record.instance_id)
    # The process died between recording the lease and learning the instance id: find it by its tag.
    released = False
    for machine in provider.list_owned():
        if machine.lease_id == record.lease_id:
            released = provider.release(machine.instance_id) or released
    return released


def close_record(ledger: Ledger, project_dir: Path, record: RunRecord, now: datetime) -> RunRecord:
    """Stamp the release time, GPU-seconds, idle time, actual cost and final status (once)."""
    return ledger.update_run(record.run_id, closing(ledger, project_dir, record, now))


def closed_copy(ledger: Ledger, project_dir: Path, record: RunRecord, now: datetime) -> RunRecord:
    """The record as :func:`close_record` would leave it, without writing it: what a teardown whose
    ledger write failed still settles the quota at."""
    copy = record.model_copy(deep=True)
    closing(ledger, project_dir, record, now)(copy)
    return copy


def closing(ledger: Ledger, project_dir: Path, record: RunRecord, now: datetime) -> Callable[[RunRecord], None]:
    catalog = load_catalog(project_dir)
    provider_prices = catalog.providers.get(record.provider)
    instance = provider_prices.instances.get(record.instance_type) if provider_prices else None
    nodes = int(record.resolved_config.get("resources", {}).get("nodes", 1))
    devices = device_count(instance, nodes) if instance else max(record.gpu_count, 1) * nodes
    start = record.times.provisioned
    held = (now - start).total_seconds() if start else 0.0
    idle = held
    if start and record.times.first_step and record.times.last_step:
        idle = max(0.0, (record.times.first_step - start).total_seconds()) + max(
            0.0, (now - record.times.last_step).total_seconds()
        )
    # On a cluster the pods' own run time is what was used (and charged back), not the lease's span.
    per_node = record.pod_seconds / nodes if record.pod_seconds > 0 else held
    usd = actual_cost(catalog, record.provider, record.instance_type, record.lane, nodes, per_node) if start else 0.0
    reached_end = record.stage in FINAL_STEPS.get(record.tier, ())
    stopped_in = step_in_progress(ledger, record.run_id)

    def close(r: RunRecord) -> None:
        r.times.released = now
        r.gpu_seconds = round(per_node * devices, 3)
        r.idle_seconds = round(idle * devices, 3)
        r.actual_usd = usd
        if r.status in ("created", "running"):
            if reached_end and stopped_in is None:
                r.status = "succeeded"
            elif stopped_in is not None:
                # Killed inside a step (SIGKILL, a lost runner): the run stopped at that step.
                r.status, r.stage = "failed", stopped_in
                r.error = r.error or f"stopped in {stopped_in}: the job was cancelled or crashed"
            else:
                r.status = "failed"
                r.error = r.error or f"stopped after {r.stage}: the job was cancelled or crashed"

    return close


# A step's own end: ``.finished`` with no data, ``.failed`` with its error.
_ENDS = {("finished", False, False), ("failed", True, True)}


def step_in_progress(ledger: Ledger, run_id: str) -> str | None:
    """The step that started and neither finished nor failed: where a killed process stopped."""
    running: str | None = None
    try:
        events = ledger.events(run_id)
    except GpulineError:
        return None
    for event in events:
        step, _, what = event.kind.rpartition(".")
        # Only the step's own events (gpuline.stage): the supervisor's ``train.finished`` is not one.
        if what == "started" and "holder" in event.data:
            running = step
        elif step == running and (what, bool(event.data), "error" in event.data) in _ENDS:
            running = None
    return running


def close_run(ledger: Ledger, project_dir: Path, lease: LeaseRecord, now: datetime, reason: str) -> bool:
    """Finish what teardown would have: release the machine and the lease, close the run at its cost,
    settle its quota. The machine first: one that finished on its own (a completed Kubernetes Job)
    is not among the live machines the sweep ends, but its object must go as teardown's would."""
    try:
        record = ledger.get_run(lease.run_id)
    except NotFoundError:
        return ledger.release_lease(lease.lease_id, now)
    release_machine(project_dir, record)
    ledger.release_lease(lease.lease_id, now)
    close_open_run(ledger, project_dir, record, now, reason, lease_id=lease.lease_id)
    return True


def close_open_run(
    ledger: Ledger, project_dir: Path, record: RunRecord, now: datetime, reason: str, *, lease_id: str | None = None
) -> RunRecord:
    """Close a run its holder left (with or without a lease): its record at its cost, its quota settled."""
    if record.times.released is None:
        record = close_record(ledger, project_dir, record, now)
    settled = quota.settle(ledger, record)
    ledger.append_event(record.run_id, "reaped", {"reason": reason, "lease_id": lease_id, "quota": settled})
    return record


def forget_lease(ledger: Ledger, lease_id: str | None, now: datetime) -> None:
    """The machine is gone: close its lease if this ledger has it (another ledger's machine past its
    TTL is enough gone as it is)."""
    if lease_id:
        with contextlib.suppress(GpulineError):
            ledger.release_lease(lease_id, now)
