"""What the trainer reports: the metrics JSONL (one ``{"step", "loss", "time", ...}`` line per step) and eval JSON."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gpuline import contract
from gpuline.errors import InputError


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The metrics JSONL, skipping a torn last line (the trainer may be writing it right now)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def loss_curve(rows: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """(step, loss) pairs; a step repeated after a resume keeps its latest value."""
    by_step: dict[int, float] = {}
    for row in rows:
        step, loss = row.get("step"), row.get("loss")
        if isinstance(step, int) and isinstance(loss, int | float):
            by_step[step] = float(loss)
    return sorted(by_step.items())


def read_eval(path: Path) -> dict[str, Any]:
    """The eval metrics the trainer wrote (a bare value becomes ``{"value": ...}``); empty when none."""
    if not path.is_file():
        return {}
    try:
        loaded = json.loads(path.read_text())
    except ValueError as exc:
        raise InputError(
            f"the trainer wrote an unreadable {contract.EVAL_PATH} ({path}): {exc}",
            hint="write one JSON object of metric name -> value",
        ) from exc
    return loaded if isinstance(loaded, dict) else {"value": loaded}


class MetricsTail:
    """Follows the metrics file to know when the first and last training steps happened."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.is_file() else 0
        self.first_step_at: datetime | None = None
        self.last_step_at: datetime | None = None

    def poll(self) -> None:
        try:
            size = self.path.stat().st_size
        except OSError:
            return
        if size > self.offset:
            with self.path.open("rb") as fh:
                fh.seek(self.offset)
                chunk = fh.read(size - self.offset)
            complete = chunk.rfind(b"\n") + 1
            if complete:
                self.offset += complete
                now = datetime.now(UTC)
                self.first_step_at = self.first_step_at or now
                self.last_step_at = now
