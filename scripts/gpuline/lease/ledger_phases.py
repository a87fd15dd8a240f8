"""A run's paid seconds phase by phase, gathered from its record and its events at close.

The paid windows, by provider:

- a cluster in train mode: each pod's run, start to finish as the API reported it (the wait for
  admission before is queue, and not paid);
- a provider that reports what it billed (:class:`~gpuline.providers.billing.BillingClock`: EC2's
  launch and termination): that span;
- otherwise the lease as gpuline held it, provisioned to released.

The intervals laid on them: the machine's boot (the window's start to the first train step), the
``train.phases`` intervals (the train step's dataset fetch, the supervisor's launches, the model
upload; on a cluster each pod's), each eval-gate's span (eval) and teardown (its start to the
window's end). What is left between them is idle (:class:`gpuline.phases.PhaseAccumulator`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from gpuline.phases import PHASES, Phase, PhaseAccumulator
from gpuline.providers.billing import BilledSpan
from gpuline.runs import CostSource, Event, RunRecord

_FOREVER = timedelta(days=3660)


@dataclass
class PaidTime:
    """Seconds per node: paid in total, per phase (adding up to it), and waited unpaid for admission."""

    seconds: float
    phases: dict[Phase, float]
    source: CostSource
    queue_seconds: float = 0.0
    windows: list[tuple[datetime, datetime]] = field(default_factory=list)


def paid_time(
    record: RunRecord,
    events: Sequence[Event],
    now: datetime,
    *,
    billed: BilledSpan | None = None,
    teardown_from: datetime | None = None,
) -> PaidTime:
    nodes = max(int(record.resolved_config.get("resources", {}).get("nodes", 1) or 1), 1)
    on_cluster = record.pod_seconds > 0
    windows, source = _windows(record, events, now, billed, on_cluster)
    acc = PhaseAccumulator((a.timestamp(), b.timestamp()) for a, b in windows)
    end = max((b for _, b in windows), default=now)
    for phase, a, b in _intervals(record, events, on_cluster, teardown_from, end):
        acc.add(phase, a.timestamp(), b.timestamp())
    share = nodes if on_cluster else 1  # pods are node-seconds; a lease's window is one node's
    phases = {p: s / share for p, s in acc.totals().items()}
    queue = _queue(record) if on_cluster else 0.0
    return PaidTime(acc.paid / share, phases, source, queue, windows)


def _windows(
    record: RunRecord, events: Sequence[Event], now: datetime, billed: BilledSpan | None, on_cluster: bool
) -> tuple[list[tuple[datetime, datetime]], CostSource]:
    if on_cluster:
        pods = pod_windows(events)
        if not pods:  # a run recorded before the pods' times were kept: one span of their seconds
            first = record.times.pod_running or record.times.provisioned or now
            pods = [(first, first + timedelta(seconds=record.pod_seconds))]
        return pods, "provider"
    if billed is not None:
        return [(billed.start, max(billed.start, billed.end or now))], "provider"
    start = record.times.provisioned
    return ([(start, max(start, now))] if start else []), "catalog estimate"


def pod_windows(events: Iterable[Event]) -> list[tuple[datetime, datetime]]:
    """Each pod's run from the ``train.workload`` events, once per pod (a later follow of the same
    Job reports the same pods again)."""
    seen: dict[str, tuple[datetime, datetime]] = {}
    for event in events:
        if event.kind != "train.workload":
            continue
        for pod in event.data.get("pods") or []:
            start, end = _when(pod.get("started")), _when(pod.get("finished"))
            if start is not None and end is not None and end > start:
                seen[str(pod.get("name", len(seen)))] = (start, end)
    return sorted(seen.values())


def _intervals(
    record: RunRecord, events: Sequence[Event], on_cluster: bool, teardown_from: datetime | None, end: datetime
) -> Iterable[tuple[Phase, datetime, datetime]]:
    spans = step_spans(events)
    trains = [a for step, a, _ in spans if step == "train"]
    if trains and not on_cluster:
        # The machine was there from the window's start; until its first training step it booted.
        yield "boot", min(trains) - _FOREVER, min(trains)
    # eval-gate's whole span is evaluation; the train step's seconds are its own intervals (on a
    # cluster the pods'), so a restart's gap inside it stays idle.
    yield from (("eval", a, b) for step, a, b in spans if step == "eval-gate")
    yield from supervisor_intervals(events)
    if teardown_from is not None:
        yield "teardown", teardown_from, max(end, teardown_from)


def supervisor_intervals(events: Iterable[Event]) -> Iterable[tuple[Phase, datetime, datetime]]:
    """The ``train.phases`` intervals: a start on the wall clock, a length from the monotonic one."""
    for event in events:
        if event.kind != "train.phases":
            continue
        for item in event.data.get("intervals") or []:
            phase, start, seconds = item.get("phase"), _when(item.get("start")), item.get("seconds")
            if phase in PHASES and start is not None and isinstance(seconds, int | float) and seconds > 0:
                yield phase, start, start + timedelta(seconds=float(seconds))


def step_spans(events: Sequence[Event]) -> list[tuple[str, datetime, datetime]]:
    """(step, start, end) of each step run: from its own ``.started`` to its own ``.finished`` or
    ``.failed``; one that never ended (its process was killed) ends at its last event."""
    spans: list[tuple[str, datetime, datetime]] = []
    open_: dict[str, tuple[datetime, datetime]] = {}
    for event in events:
        step, _, what = event.kind.rpartition(".")
        if what == "started" and "holder" in event.data:
            if step in open_:
                spans.append((step, *open_.pop(step)))
            open_[step] = (event.at, event.at)
        elif step in open_:
            start, _ = open_[step]
            if (what == "finished" and not event.data) or (what == "failed" and "error" in event.data):
                spans.append((step, start, event.at))
                del open_[step]
            else:
                open_[step] = (start, event.at)
    spans += [(step, a, b) for step, (a, b) in open_.items()]
    return spans


def _queue(record: RunRecord) -> float:
    """The wait between the Job's creation and its first pod running: admission, image pull, scheduling."""
    t = record.times
    if t.provisioned is None or t.pod_running is None:
        return 0.0
    return max(0.0, (t.pod_running - t.provisioned).total_seconds())


def _when(raw: Any) -> datetime | None:
    if isinstance(raw, datetime):
        return raw
    if not isinstance(raw, str) or not raw:
        return None
    try:
        when = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo is not None else None
