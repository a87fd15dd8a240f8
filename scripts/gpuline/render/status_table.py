"""``gpuline status`` for people: one row per run in aligned columns, with its error, its GPU-seconds
by phase and (when asked for) its events under it."""

from __future__ import annotations

import json

from gpuline.render.phase_bar import phase_line
from gpuline.runs import RunRecord

STATUS_HEADER = ("RUN", "TIER", "STATUS", "STAGE", "GPU-S", "USD", "VERSION", "COMMIT")
_RIGHT = {"GPU-S", "USD"}


def status_table(records: list[RunRecord], events: dict[object, list[dict[str, object]]] | None = None) -> list[str]:
    """One row per run, each column as wide as its widest cell (a version such as "v12 production"
    never runs into the commit), the run's error under it, and its events when asked for."""
    if not records:
        return ["no runs yet"]
    rows = [STATUS_HEADER, *(_status_row(r) for r in records)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(STATUS_HEADER))]

    def line(row: tuple[str, ...]) -> str:
        cells = [c.rjust(w) if h in _RIGHT else c.ljust(w) for h, c, w in zip(STATUS_HEADER, row, widths, strict=True)]
        return " ".join(cells).rstrip()

    lines = [line(STATUS_HEADER)]
    for record, row in zip(records, rows[1:], strict=True):
        lines.append(line(row))
        if record.error:
            lines.append(f"{'':{widths[0]}} error: {record.error}")
        if record.phase_gpu_seconds:
            lines.append(f"{'':{widths[0]}} GPU-seconds by phase: {phase_line(record.phase_gpu_seconds)}")
        lines += [f"{'':{widths[0]}} {_event_line(e)}" for e in (events or {}).get(record.run_id, [])]
    return lines


def _status_row(r: RunRecord) -> tuple[str, ...]:
    version = f"v{r.promoted_version} {r.promoted_stage}" if r.promoted_version else ""
    usd = f"{r.actual_usd:.2f}" if r.actual_usd is not None else "-"
    return (r.run_id, r.tier, r.status, r.stage, f"{r.gpu_seconds:.0f}", usd, version, r.lineage.commit[:10])


def _event_line(event: dict[str, object]) -> str:
    """``#seq  time  kind  data`` for one event, its data on one line and clipped."""
    data = event.get("data") or {}
    shown = json.dumps(data, default=str, separators=(",", ":")) if data else ""
    if len(shown) > 200:
        shown = shown[:199] + "…"
    at = str(event.get("at", ""))[:19].replace("T", " ")
    return f"#{event.get('seq', '?')!s:>3} {at} {event.get('kind', '')} {shown}".rstrip()
