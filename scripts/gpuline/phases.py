"""The GPU-second ledger: every paid second of a lease lands in exactly one phase.

What a run did is measured where the work happened, as intervals: the supervisor's launches on the
machine's monotonic clock (setup, train, checkpoint), the steps' own spans (eval-gate is eval,
teardown is teardown), the lease's boot before the machine's first step. They are placed on one
timeline and clipped to the *paid windows* (the lease, or what the provider says it billed, or each
pod's run time on a cluster); where two overlap the more specific one wins (a checkpoint stall inside
the train step's span is checkpoint, not setup), and whatever no interval claims is idle. So the
phases add up to the paid seconds by construction: :func:`unaccounted` is the check that says so.

Pure: no I/O, no clock of its own. :mod:`gpuline.lease.ledger_phases` gathers a run's intervals.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, get_args

if TYPE_CHECKING:
    from gpuline.runs import RunRecord

Phase = Literal["boot", "setup", "queue", "train", "checkpoint", "eval", "idle", "teardown"]
PHASES: tuple[Phase, ...] = get_args(Phase)
USEFUL: tuple[Phase, ...] = ("train", "eval")
"""The phases that are the work itself: useful GPU-hours are train + eval, the rest is overhead."""
TOLERANCE = 0.01
"""Unaccounted seconds allowed, as a share of the paid seconds."""

# Higher wins where intervals overlap: the finer measurement is kept, the enclosing one fills round it.
_PRECEDENCE: dict[Phase, int] = {
    "checkpoint": 7,
    "eval": 6,
    "train": 5,
    "setup": 4,
    "teardown": 3,
    "boot": 2,
    "queue": 1,
    "idle": 0,
}


@dataclass(frozen=True)
class Interval:
    """What the run was doing from ``start`` to ``end`` (seconds on one clock)."""

    phase: Phase
    start: float
    end: float


class PhaseAccumulator:
    """Assigns each paid second to one phase. ``windows`` are the paid spans on the intervals' clock;
    they may overlap (the pods of a multi-node run ran side by side) and each is paid on its own."""

    def __init__(self, windows: Iterable[tuple[float, float]]) -> None:
        self.windows = [(a, b) for a, b in windows if b > a]
        self.intervals: list[Interval] = []

    @property
    def paid(self) -> float:
        return sum(b - a for a, b in self.windows)

    def add(self, phase: Phase, start: float, end: float) -> None:
        if phase != "idle" and end > start:
            self.intervals.append(Interval(phase, start, end))

    def totals(self) -> dict[Phase, float]:
        out = dict.fromkeys(PHASES, 0.0)
        for window in self.windows:
            for phase, seconds in self._in_window(*window):
                out[phase] += seconds
        return out

    def _in_window(self, lo: float, hi: float) -> Iterable[tuple[Phase, float]]:
        inside = [i for i in self.intervals if i.end > lo and i.start < hi]
        cuts = sorted({lo, hi, *(max(lo, i.start) for i in inside), *(min(hi, i.end) for i in inside)})
        for a, b in itertools.pairwise(cuts):
            covering = [i.phase for i in inside if i.start <= a and i.end >= b]
            yield max(covering, key=_PRECEDENCE.__getitem__, default="idle"), b - a


def unaccounted(phases: Mapping[Phase, float], paid: float) -> float:
    """The share of ``paid`` the phases miss or count twice (0 for nothing paid)."""
    if paid <= 0:
        return 0.0 if sum(phases.values()) <= 0 else 1.0
    return abs(paid - sum(phases.values())) / paid


def accounted(phases: Mapping[Phase, float], paid: float) -> bool:
    """Whether the phases add up to the paid seconds within :data:`TOLERANCE`."""
    return unaccounted(phases, paid) <= TOLERANCE


def scaled(totals: Mapping[Phase, float], factor: float) -> dict[Phase, float]:
    """Seconds per phase times ``factor`` (devices per node, say), rounded as the record keeps them."""
    return {p: round(totals.get(p, 0.0) * factor, 3) for p in PHASES}


def useful(phases: Mapping[Phase, float]) -> float:
    return sum(phases.get(p, 0.0) for p in USEFUL)


def actual_phases(record: RunRecord, *, gpu: bool = False) -> dict[Phase, float]:
    """The paid seconds of each phase of a closed run, every phase present (zeros included): seconds
    of the lease per node (what a phase's estimate compares with), or with ``gpu`` GPU-seconds (they
    add up to ``record.gpu_seconds``). Empty for a run not yet closed, or closed before runs kept
    their phases. For the PR comment's "actual vs estimate per phase"."""
    kept = record.phase_gpu_seconds if gpu else record.phase_seconds
    return {p: kept.get(p, 0.0) for p in PHASES} if kept else {}


def nonzero(phases: Mapping[Phase, float], order: Sequence[Phase] = PHASES) -> list[tuple[Phase, float]]:
    return [(p, phases[p]) for p in order if phases.get(p, 0.0) > 0]
