"""The paid GPU-seconds by phase, drawn: a stacked bar of coloured squares with a legend table for the
job summary, and one line for the logs and the status table."""

from __future__ import annotations

from collections.abc import Mapping

from gpuline.phases import PHASES, USEFUL, Phase, nonzero
from gpuline.render.markdown import markdown_table

# One colour per phase: GitHub draws these squares in colour, so the bar reads as a stacked chart.
PHASE_MARK: dict[Phase, str] = {
    "boot": "🟪",
    "setup": "🟧",
    "queue": "🟫",
    "train": "🟩",
    "checkpoint": "🟨",
    "eval": "🟦",
    "idle": "⬜",
    "teardown": "🟥",
}
BAR_CELLS = 20  # 5% a square


def phase_bar(phases: Mapping[Phase, float], cells: int = BAR_CELLS) -> str:
    """The phases as one bar of ``cells`` squares, each phase's share rounded so the squares add up
    (largest remainder); empty when nothing was paid."""
    total = sum(phases.get(p, 0.0) for p in PHASES)
    if total <= 0:
        return ""
    exact = {p: phases.get(p, 0.0) / total * cells for p in PHASES}
    counts = {p: int(v) for p, v in exact.items()}
    for p in sorted(PHASES, key=lambda p: counts[p] - exact[p])[: cells - sum(counts.values())]:
        counts[p] += 1
    return "".join(PHASE_MARK[p] * counts[p] for p in PHASES)


def phase_chart(phases: Mapping[Phase, float], queue_seconds: float = 0.0) -> str:
    """The job summary's stacked bar of the paid GPU-seconds, with a legend table under it."""
    total = sum(phases.get(p, 0.0) for p in PHASES)
    if total <= 0:
        return ""
    useful = sum(phases.get(p, 0.0) for p in USEFUL)
    # Phases under a twentieth of a second would only show as 0.0; the paid row keeps the sum in view.
    shown = [(p, seconds) for p, seconds in nonzero(phases) if seconds >= 0.05]
    rows = [(f"{PHASE_MARK[p]} {p}", f"{seconds:,.1f}", f"{seconds / total:.0%}") for p, seconds in shown]
    rows.append(("paid", f"{total:,.1f}", "100%"))
    table = markdown_table(("phase", "GPU-seconds", "share"), rows)
    unpaid = f" The workload waited {queue_seconds:,.0f} s for admission, not paid." if queue_seconds > 0 else ""
    return (
        f"**Paid GPU-seconds by phase:** {total:,.1f}, of which useful (train + eval) {useful / total:.0%}."
        f"{unpaid}\n\n{phase_bar(phases)}\n\n{table}\n"
    )


def phase_line(phases: Mapping[Phase, float]) -> str:
    """``setup 7.2 · train 0.4 · eval 4.4`` for log lines and the status table (nonzero phases only)."""
    return " · ".join(f"{p} {s:,.1f}" for p, s in nonzero(phases) if s >= 0.05)
