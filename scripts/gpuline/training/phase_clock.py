"""Where a supervisor's seconds went, on the monotonic clock of the machine doing the work.

Each trainer launch is split into setup (process start, imports, data loading: launch to the first
step), train (first to last step), checkpoint (the stalls the loop spent saving, and the final save
between the last step and a clean exit) and, for a crash, nothing: what a crashed trainer did after
its last step was lost, and the ledger counts it idle. Steps are seen two ways: the supervisor's own
poll of the metrics file (monotonic, coarse) and the trainer's ``time`` on each row (precise, the
same machine's wall clock, mapped onto the monotonic clock by one anchor and kept inside the
launch). Intervals leave as ``{"phase", "start", "seconds"}``: the duration measured on the
monotonic clock, the start placed on the wall clock, so the ledger can lay runs of several
processes and machines on one timeline.
"""

from __future__ import annotations

import itertools
import json
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gpuline.phases import Phase

PROGRESS_S = 60.0
"""How often a launch's steps so far are reported: a supervisor killed outright (SIGKILL, a lost
machine) loses at most this much of its train phase to idle."""


class PhaseClock:
    def __init__(self, metrics: Path, checkpoint_interval: int) -> None:
        self.metrics = metrics
        self.interval = max(checkpoint_interval, 1)
        self.mono0, self.wall0 = time.monotonic(), time.time()
        self._launch: tuple[float, int] | None = None  # (monotonic start, metrics size then)
        self._seen: list[float] = []  # monotonic times the poll saw new steps in this launch
        self._first = True
        self._reported = 0.0  # when the steps so far were last reported

    def now(self) -> float:
        return time.monotonic()

    def launched(self) -> None:
        # The first launch's setup starts with the supervisor (finding the checkpoint to resume from
        # is setup too); a relaunch's starts with it, so the restart's own gap stays idle.
        start = self.mono0 if self._first else self.now()
        self._first = False
        self._launch = (start, _size(self.metrics))
        self._seen = []

    def saw_steps(self) -> list[dict[str, Any]]:
        """Note that new steps were seen; every :data:`PROGRESS_S` the launch's steps so far, as
        intervals to report now (the launch's end reports them again, precisely: the ledger
        counts overlapping intervals once)."""
        now = self.now()
        if not self._seen:
            self._reported = now
        self._seen.append(now)
        if self._launch is None or now - self._reported < PROGRESS_S:
            return []
        self._reported = now
        start = self._launch[0]
        return [self.interval_event("setup", start, self._seen[0]), self.interval_event("train", self._seen[0], now)]

    def interval_event(self, phase: Phase, start: float, end: float) -> dict[str, Any]:
        wall = datetime.fromtimestamp(self.wall0 + (start - self.mono0), UTC)
        return {"phase": phase, "start": wall.isoformat(), "seconds": round(max(0.0, end - start), 4)}

    def ended(self, clean: bool) -> list[dict[str, Any]]:
        """The launch's intervals; ``clean``: the trainer exited by itself (done, or saved on SIGTERM)."""
        if self._launch is None:
            return []
        start, offset = self._launch
        end = self.now()
        self._launch = None
        rows = [(r.get("step"), self._mono(r.get("time"), start, end)) for r in _rows_after(self.metrics, offset)]
        times = [t for _, t in rows if t is not None] or self._seen
        if not times:
            return [self.interval_event("train", start, end)] if clean else []
        first, last = min(times), max(times)
        spans: list[tuple[Phase, float, float]] = [("setup", start, first), ("train", first, last)]
        spans += [("checkpoint", a, b) for a, b in self._stalls(rows)]
        if clean:
            spans.append(("checkpoint", last, end))  # the final save the loop makes before it exits
        return [self.interval_event(p, a, b) for p, a, b in spans if b > a]

    def _mono(self, wall: Any, lo: float, hi: float) -> float | None:
        if not isinstance(wall, int | float) or isinstance(wall, bool):
            return None
        return min(hi, max(lo, self.mono0 + (float(wall) - self.wall0)))

    def _stalls(self, rows: list[tuple[Any, float | None]]) -> list[tuple[float, float]]:
        """The saves inside the steps: after a step that saved, the next step came late by the save's
        stall (its gap beyond the usual gap between steps)."""
        timed = [(s, t) for s, t in rows if isinstance(s, int) and t is not None]
        gaps = [(s, t, t2 - t) for (s, t), (_, t2) in itertools.pairwise(timed)]
        usual = [g for s, _, g in gaps if s % self.interval]
        if not usual:
            return []
        typical = statistics.median(usual)
        return [(t, t + g - typical) for s, t, g in gaps if s % self.interval == 0 and g > typical]


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _rows_after(path: Path, offset: int) -> list[dict[str, Any]]:
    """The metrics rows a launch wrote (those after ``offset``); unreadable means none."""
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            chunk = fh.read()
    except OSError:
        return []
    rows: list[dict[str, Any]] = []
    for line in chunk.decode("utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a torn last line: the trainer was killed while writing it
        if isinstance(row, dict):
            rows.append(row)
    return rows
