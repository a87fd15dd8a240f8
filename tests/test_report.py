"""gpuline report: per team and week, what was spent, what was idle, what was refused, what it bought."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from gpuline.cli import main
from gpuline.ledger.sqlite import SqliteLedger
from gpuline.runs import RunRecord, period_key, utcnow
from gpuline.steps.report import cost_chart, render, weekly, weeks_back

MONDAY = datetime(2026, 11, 16, 9, 0, tzinfo=utcnow().tzinfo)  # ISO week 2026-W47


def record(
    run_id: str,
    *,
    team: str = "vision",
    day: int = 0,
    status: str = "succeeded",
    gpu_s: float = 3600,
    usd: float | None = 1.0,
    idle_s: float = 0,
    provisioned: bool = True,
    promoted: bool = False,
    preemptions: int = 0,
    estimated: float | None = 1.2,
    useful_s: float | None = None,
    estimated_gpu_hours: float | None = None,
) -> RunRecord:
    r = RunRecord(run_id=run_id, model="tiny", team=team, tier="nightly")
    r.created_at = MONDAY + timedelta(days=day)
    r.status = status  # type: ignore[assignment]
    r.gpu_seconds, r.actual_usd, r.idle_seconds, r.preemptions = gpu_s, usd, idle_s, preemptions
    r.estimated_usd = estimated
    r.estimated_gpu_hours = estimated_gpu_hours
    if useful_s is not None:  # the run measured its phases: useful (train) and the rest (setup, idle)
        r.phase_gpu_seconds = {"train": useful_s, "setup": gpu_s - useful_s - idle_s, "idle": idle_s}
    r.times.provisioned = r.created_at if provisioned else None
    r.promoted_version = 1 if promoted else None
    return r


def test_runs_are_summed_per_team_and_week() -> None:
    records = [
        record("a", promoted=True, idle_s=600, preemptions=1, useful_s=2400),
        record("b", usd=3.0, gpu_s=7200, promoted=True),  # closed before runs kept their phases
        record("c", status="refused", provisioned=False, gpu_s=0, usd=None, estimated_gpu_hours=0.8),
        record("d", status="failed", usd=0.5, gpu_s=1800),
        record("e", team="nlp", usd=2.0),
        record("f", day=7, usd=9.0),  # the next week
        record("g", day=-30),  # outside the weeks asked for
    ]
    rows = weekly(records, ["2026-W47", "2026-W48"])
    assert [(r.team, r.week) for r in rows] == [("nlp", "2026-W47"), ("vision", "2026-W47"), ("vision", "2026-W48")]
    vision = rows[1]
    assert (vision.runs, vision.succeeded, vision.failed, vision.refused_before_gpu) == (4, 2, 1, 1)
    assert vision.gpu_hours == pytest.approx(3.5) and vision.usd == pytest.approx(4.5)
    assert vision.usd_per_promotion == pytest.approx(2.25)  # failed runs count in the cost of what shipped
    assert vision.idle_gpu_seconds == 600 and vision.idle_share == pytest.approx(600 / (3.5 * 3600), abs=1e-4)
    assert vision.preemptions == 1
    # Useful over paid counts only the runs that measured their phases; a refusal saved its estimate.
    assert vision.useful_gpu_hours == pytest.approx(2400 / 3600) and vision.measured_gpu_hours == pytest.approx(1.0)
    assert vision.useful_share == pytest.approx(2400 / 3600, abs=1e-4)
    assert vision.saved_gpu_hours == pytest.approx(0.8)
    assert rows[0].usd_per_promotion is None  # nothing promoted: no cost per promotion


def test_a_refusal_after_the_machine_started_is_not_counted_as_saved() -> None:
    rows = weekly([record("late", status="refused", provisioned=True, estimated_gpu_hours=0.5)], ["2026-W47"])
    assert rows[0].refused_before_gpu == 0 and rows[0].saved_gpu_hours == 0


def test_the_markdown_has_a_table_and_a_cost_chart() -> None:
    records = [record("run-aaaa", usd=1.0, useful_s=1800), record("run-bbbb", day=1, usd=2.5)]
    text = render(weekly(records, ["2026-W47"]), records)
    row = "| vision | 2026-W47 | 2 | 2.00 | 0.50 / 1.00 (50%) | $3.50 | $2.40 | 0 (0%) | 0 | 0 | 0.00 | 0 | — |"
    assert row in text
    assert "```mermaid\nxychart-beta" in text
    assert 'x-axis ["11-16 aaaa", "11-17 bbbb"]' in text
    assert "bar [1.00, 2.50]" in text and "line [1.20, 1.20]" in text


def test_the_chart_needs_two_finished_runs_and_shows_only_the_last_n() -> None:
    assert cost_chart([record("one")], 10) == ""
    assert cost_chart([record("x", usd=None), record("y", usd=None)], 10) == ""
    chart = cost_chart([record(f"r{i}", day=i, usd=float(i)) for i in range(12)], 5)
    assert "last 5 runs" in chart and "bar [7.00, 8.00, 9.00, 10.00, 11.00]" in chart


def test_the_estimate_line_is_left_out_when_some_runs_have_none() -> None:
    chart = cost_chart([record("a"), record("b", estimated=None)], 10)
    assert "bar [" in chart and "line [" not in chart


def test_no_runs_says_so() -> None:
    assert "No runs in these weeks" in render([], [])


def test_weeks_back_ends_with_this_week() -> None:
    weeks = weeks_back(3)
    assert len(weeks) == 3 and weeks[-1] == period_key(utcnow(), "week") and weeks == sorted(weeks)


def test_gpuline_report_prints_json_and_writes_the_summary(
    project: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    actions_env: dict[str, Path],
    tmp_path: Path,
) -> None:
    ledger = SqliteLedger(tmp_path / "report.db")
    for run_id, team in (("r1", "vision"), ("r2", "vision"), ("r3", "nlp")):
        r = record(run_id, team=team, promoted=True)
        r.created_at = utcnow()
        ledger.create_run(r)
    monkeypatch.setenv("GPULINE_LEDGER", f"sqlite:///{tmp_path}/report.db")
    assert main(["report", "--config", str(project), "--json", "--team", "vision"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["runs_read"] == 2
    (row,) = body["weeks"]
    assert row["team"] == "vision" and row["runs"] == 2 and row["usd_per_promotion"] == 1.0
    assert "### gpuline report" in actions_env["GITHUB_STEP_SUMMARY"].read_text()


def test_gpuline_report_rejects_zero_weeks(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "--config", str(project), "--weeks", "0"]) == 2
    assert "--weeks 0 must be at least 1" in capsys.readouterr().err
