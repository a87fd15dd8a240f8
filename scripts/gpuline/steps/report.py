"""report: what each team spent per week, and what it got for it.

Per team and ISO week (of the run's creation): runs, paid GPU-hours and how many of them were useful
(train + eval, from the run record's phases), dollars (and what was estimated), idle GPU-seconds,
preemptions, runs refused before any GPU was bought and the GPU-hours their estimates would have
spent, promotions and the cost per successful promotion. Markdown for people and the job summary,
JSON with ``--json``.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

from gpuline.context import Context
from gpuline.errors import InputError
from gpuline.phases import useful
from gpuline.render.markdown import cost_chart
from gpuline.results import DataResult
from gpuline.runs import RunRecord, period_key, utcnow

__all__ = ["WeekRow", "cost_chart", "render", "run", "weekly", "weeks_back"]

DEFAULT_WEEKS = 4
DEFAULT_LIMIT = 5000
# Ten years of weeks: more than any ledger holds, and far from the dates a datetime cannot hold.
MAX_WEEKS = 520


@dataclass
class WeekRow:
    team: str
    week: str
    runs: int = 0
    succeeded: int = 0
    failed: int = 0
    refused_before_gpu: int = 0
    gpu_hours: float = 0.0
    usd: float = 0.0
    estimated_usd: float = 0.0
    idle_gpu_seconds: float = 0.0
    useful_gpu_hours: float = 0.0
    """Train + eval GPU-hours, of the runs whose phases were measured."""
    measured_gpu_hours: float = 0.0
    """All paid GPU-hours of those runs: what ``useful_gpu_hours`` is a share of."""
    saved_gpu_hours: float = 0.0
    """What the runs refused before any GPU was bought were estimated to spend (p90)."""
    preemptions: int = 0
    promotions: int = 0

    @property
    def usd_per_promotion(self) -> float | None:
        return round(self.usd / self.promotions, 4) if self.promotions else None

    @property
    def useful_share(self) -> float | None:
        """Useful GPU-hours / paid GPU-hours, over the runs that measured their phases."""
        return round(self.useful_gpu_hours / self.measured_gpu_hours, 4) if self.measured_gpu_hours > 0 else None

    @property
    def idle_share(self) -> float | None:
        """Idle GPU-seconds as a share of all GPU-seconds paid for."""
        total = self.gpu_hours * 3600
        return round(self.idle_gpu_seconds / total, 4) if total > 0 else None

    def add(self, r: RunRecord) -> None:
        self.runs += 1
        self.succeeded += r.status == "succeeded"
        self.failed += r.status == "failed"
        # Refused before any GPU was bought: the refusal saved the whole cost of the run.
        refused_before_gpu = r.status == "refused" and r.times.provisioned is None
        self.refused_before_gpu += refused_before_gpu
        if refused_before_gpu:
            self.saved_gpu_hours += r.estimated_gpu_hours or 0.0
        if r.phase_gpu_seconds:
            self.useful_gpu_hours += useful(r.phase_gpu_seconds) / 3600
            self.measured_gpu_hours += r.gpu_seconds / 3600
        self.gpu_hours += r.gpu_seconds / 3600
        self.usd += r.actual_usd or 0.0
        self.estimated_usd += r.estimated_usd or 0.0
        self.idle_gpu_seconds += r.idle_seconds
        self.preemptions += r.preemptions
        self.promotions += r.promoted_version is not None

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["gpu_hours"] = round(self.gpu_hours, 4)
        out["usd"] = round(self.usd, 4)
        out["estimated_usd"] = round(self.estimated_usd, 4)
        out["idle_gpu_seconds"] = round(self.idle_gpu_seconds, 1)
        out["usd_per_promotion"] = self.usd_per_promotion
        out["idle_share"] = self.idle_share
        out["useful_gpu_hours"] = round(self.useful_gpu_hours, 4)
        out["measured_gpu_hours"] = round(self.measured_gpu_hours, 4)
        out["useful_share"] = self.useful_share
        out["saved_gpu_hours"] = round(self.saved_gpu_hours, 4)
        return out


def run(ctx: Context, args: argparse.Namespace) -> DataResult:
    weeks = getattr(args, "weeks", DEFAULT_WEEKS)
    if weeks < 1:
        raise InputError(f"--weeks {weeks} must be at least 1", hint="pass --weeks 4 for the last four weeks")
    if weeks > MAX_WEEKS:
        raise InputError(f"--weeks {weeks} must be at most {MAX_WEEKS} (ten years)", hint="pass fewer weeks")
    records = ctx.ledger.list_runs(team=getattr(args, "team", None) or None, limit=DEFAULT_LIMIT)
    rows = weekly(records, weeks_back(weeks))
    markdown = render(rows, records)
    body = {"weeks": [row.to_json() for row in rows], "runs_read": len(records)}
    return DataResult("report", body, markdown=markdown, text=markdown)


def weeks_back(count: int) -> list[str]:
    """The ``count`` ISO weeks up to this one, oldest first."""
    now = utcnow()
    return [period_key(now - timedelta(weeks=i), "week") for i in range(count - 1, -1, -1)]


def weekly(records: Iterable[RunRecord], weeks: Sequence[str]) -> list[WeekRow]:
    wanted = set(weeks)
    rows: dict[tuple[str, str], WeekRow] = {}
    for r in records:
        week = period_key(r.created_at, "week")
        if week not in wanted:
            continue
        rows.setdefault((r.team, week), WeekRow(r.team, week)).add(r)
    return [rows[key] for key in sorted(rows)]


def render(rows: Sequence[WeekRow], records: Sequence[RunRecord]) -> str:
    if not rows:
        return "### gpuline report\n\nNo runs in these weeks."
    header = (
        "| team | week | runs | GPU-hours | useful / paid | cost | estimated | idle GPU-s | preemptions "
        "| refused before a GPU | GPU-hours saved | promotions | cost per promotion |"
    )
    lines = ["### gpuline report", "", header, "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for row in rows:
        per = f"${row.usd_per_promotion:,.2f}" if row.usd_per_promotion is not None else "—"
        idle = f"{row.idle_gpu_seconds:,.0f}" + (f" ({row.idle_share:.0%})" if row.idle_share is not None else "")
        ratio = (
            f"{row.useful_gpu_hours:,.2f} / {row.measured_gpu_hours:,.2f} ({row.useful_share:.0%})"
            if row.useful_share is not None
            else "—"
        )
        lines.append(
            f"| {row.team} | {row.week} | {row.runs} | {row.gpu_hours:,.2f} | {ratio} | ${row.usd:,.2f} | "
            f"${row.estimated_usd:,.2f} | {idle} | {row.preemptions} | {row.refused_before_gpu} | "
            f"{row.saved_gpu_hours:,.2f} | {row.promotions} | {per} |"
        )
    lines += ["", NOTE]
    chart = cost_chart(records, 30)
    return "\n".join(lines) + ("\n\n" + chart if chart else "")


NOTE = (
    "Useful GPU-hours are the train and eval phases of the runs that measured their phases, out of "
    "those runs' paid GPU-hours; cost per promotion counts every run's cost, failed ones included; "
    "GPU-hours saved are the estimates (p90) of the runs refused before any GPU was bought."
)
