"""Ending a lease: release the machine, stamp the run's release time, its paid seconds phase by phase
(:mod:`gpuline.lease.ledger_phases`) and real cost, and settle its quota. Used by teardown and, for
leases whose holder is gone, by the reaper. Every part checks whether it already happened, so running
it twice changes nothing the second time."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from gpuline.decisions import quota
from gpuline.decisions.cost import actual_cost, device_count
from gpuline.decisions.pricing import load_catalog
from gpuline.errors import GpulineError, NotFoundError
from gpuline.lease.ledger_phases import paid_time
from gpuline.lease.machines import open_masked
from gpuline.phases import scaled
from gpuline.providers.billing import BilledSpan, BillingClock
from gpuline.providers.options import options_for
from gpuline.runs import Event, LeaseRecord, Ledger, RunRecord

_ANY_USE_S = 1e-6

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


def close_record(
    ledger: Ledger, project_dir: Path, record: RunRecord, now: datetime, *, teardown_from: datetime | None = None
) -> RunRecord:
    """Stamp the release time, the paid seconds per phase, the actual cost and final status (once).
    ``teardown_from``: when teardown began (the seconds from then to the release are its phase)."""
    return ledger.update_run(record.run_id, closing(ledger, project_dir, record, now, teardown_from=teardown_from))


def closed_copy(
    ledger: Ledger, project_dir: Path, record: RunRecord, now: datetime, *, teardown_from: datetime | None = None
) -> RunRecord:
    """The record as :func:`close_record` would leave it, without writing it: what a teardown whose
    ledger write failed still settles the quota at."""
    copy = record.model_copy(deep=True)
    closing(ledger, project_dir, record, now, teardown_from=teardown_from)(copy)
    return copy


def closing(
    ledger: Ledger, project_dir: Path, record: RunRecord, now: datetime, *, teardown_from: datetime | None = None
) -> Callable[[RunRecord], None]:
    catalog = load_catalog(project_dir)
    provider_prices = catalog.providers.get(record.provider)
    instance = provider_prices.instances.get(record.instance_type) if provider_prices else None
    nodes = int(record.resolved_config.get("resources", {}).get("nodes", 1))
    devices = device_count(instance, nodes) if instance else max(record.gpu_count, 1) * nodes
    # On a cluster the pods' own run time is what was used (and charged back); elsewhere what the
    # provider says it billed, or failing that the lease's span as gpuline held it.
    billed = None if record.pod_seconds > 0 else billed_span(project_dir, record)
    paid = paid_time(record, _events(ledger, record.run_id), now, billed=billed, teardown_from=teardown_from)
    started = record.times.provisioned is not None or record.pod_seconds > 0
    # A machine the provider says it launched is billed at least its minimum, even when its launch
    # and termination fall in the same second of the provider's clock (a zero-length span).
    billable = max(paid.seconds, _ANY_USE_S) if billed is not None else paid.seconds
    usd = actual_cost(catalog, record.provider, record.instance_type, record.lane, nodes, billable) if started else 0.0
    rounding = provider_prices.billing if provider_prices else None
    reached_end = record.stage in FINAL_STEPS.get(record.tier, ())
    stopped_in = step_in_progress(ledger, record.run_id)

    def close(r: RunRecord) -> None:
        r.times.released = now
        r.gpu_seconds = round(paid.seconds * devices, 3)
        r.phase_seconds = scaled(paid.phases, 1.0)
        r.phase_gpu_seconds = scaled(paid.phases, devices)
        r.idle_seconds = r.phase_gpu_seconds["idle"]
        # Kueue's own admission wait when the train step measured one; else the wait for the first pod.
        r.queue_seconds = r.queue_seconds or round(paid.queue_seconds, 3)
        r.billed_seconds = float(rounding.billed_seconds(billable)) if rounding and started else None
        r.cost_source = paid.source if started else None
        r.actual_usd = usd
        if r.status in ("created", "running"):
            _final_status(r, reached_end, stopped_in)

    return close


def _final_status(r: RunRecord, reached_end: bool, stopped_in: str | None) -> None:
    if reached_end and stopped_in is None:
        r.status = "succeeded"
    elif stopped_in is not None:
        # Killed inside a step (SIGKILL, a lost runner): the run stopped at that step.
        r.status, r.stage = "failed", stopped_in
        r.error = r.error or f"stopped in {stopped_in}: the job was cancelled or crashed"
    else:
        r.status = "failed"
        r.error = r.error or f"stopped after {r.stage}: the job was cancelled or crashed"


def billed_span(project_dir: Path, record: RunRecord) -> BilledSpan | None:
    """What the run's provider says it billed for the machine, when it can tell (best effort: a
    provider that cannot be asked now leaves the cost to the lease's own span)."""
    if not record.instance_id or not record.provider:
        return None
    options = record.resolved_config.get("resources", {}).get("options", {})
    try:
        opened = options_for(record.provider, options, record.region or None)
        provider = open_masked(record.provider, project_dir, opened)
        if isinstance(provider, BillingClock):
            return provider.billed_span(record.instance_id)
    except Exception:  # the cost falls back to the catalog estimate, and says so
        return None
    return None


def _events(ledger: Ledger, run_id: str) -> list[Event]:
    try:
        return ledger.events(run_id)
    except GpulineError:
        return []  # no events, no phases: the whole lease is idle, and still adds up


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
