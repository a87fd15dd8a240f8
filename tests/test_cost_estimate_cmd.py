"""gpuline cost-estimate end to end: estimate, decide, reserve, the PR comment, and a deny's exit."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from conftest import read_outputs, write_project
from gpuline.cli import main
from gpuline.ledger.sqlite import SqliteLedger
from gpuline.runs import LeaseRecord, Reservation, RunRecord, period_key, utcnow
from gpuline.spec import load_spec
from gpuline.steps.cost_estimate import COMMENT_MARKER

LOCAL = "  provider: local\n  gpu_type: cpu\n  max_duration: 10m\n"
EC2_T4 = "  provider: ec2\n  gpu_type: t4\n  gpu_count: 1\n  max_duration: 1h\n"


def gpu_project(root: Path, *, policy: str | None = None, resources: str = EC2_T4, extra: str = "") -> Path:
    config = write_project(root, policy=policy)
    text = config.read_text()
    assert LOCAL in text
    config.write_text(text.replace(LOCAL, resources) + extra)
    return config


def ledger_of(config: Path) -> SqliteLedger:
    return SqliteLedger(config.parent / ".gpuline" / "ledger.db")


def estimate_json(capsys: pytest.CaptureFixture[str], config: Path, *args: str) -> tuple[int, dict[str, Any]]:
    code = main(["cost-estimate", "--config", str(config), "--json", *args])
    return code, json.loads(capsys.readouterr().out)


def this_period() -> str:
    return period_key(utcnow(), "week")


# ---------------------------------------------------------------- deny


def test_a_deny_exits_1_naming_the_budget_the_amount_over_and_a_change_that_fits(tmp_path: Path) -> None:
    config = gpu_project(tmp_path / "p", policy="budgets:\n  teams:\n    vision:\n      usd: {hard: 0.3}\n")
    result = subprocess.run(
        [sys.executable, "-m", "gpuline.cli", "cost-estimate", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    error = result.stderr.strip().splitlines()[-1]
    # An hour on a g4dn.xlarge plus 4 min start-up is $0.56 at most: $0.26 over the $0.30 budget.
    assert error.startswith("error: team vision's hard USD budget of 0.3 per week would be exceeded by $0.26")
    assert "(used $0.00, this run up to $0.56)" in error
    assert "(fix: use the spot lane (resources.lane: spot) → at most $0.23" in error
    assert "set resources.max_duration to 30m" in error


def test_a_deny_still_writes_the_comment_and_marks_the_run_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], actions_env: dict[str, Path]
) -> None:
    config = gpu_project(tmp_path / "p", policy="budgets:\n  teams:\n    vision:\n      usd: {hard: 0.3}\n")
    code, body = estimate_json(capsys, config)
    assert code == 1 and body["exit_code"] == 1
    outputs = read_outputs(actions_env["GITHUB_OUTPUT"])
    assert outputs["decision"] == "deny"
    comment = Path(outputs["comment-path"]).read_text()
    assert comment.startswith(COMMENT_MARKER)
    assert ":no_entry: gpuline cost estimate: deny" in comment and "**Would fit:**" in comment
    (record,) = ledger_of(config).list_runs()
    assert record.status == "refused" and record.stage == "cost-estimate"
    assert ledger_of(config).reservations() == []  # nothing held for a refused run


# ---------------------------------------------------------------- allow and reserve


def test_an_allowed_nightly_run_reserves_its_worst_case(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], actions_env: dict[str, Path]
) -> None:
    policy = "budgets:\n  teams:\n    vision:\n      usd: {hard: 10}\n      gpu_hours: {hard: 5}\n"
    config = gpu_project(tmp_path / "p", policy=policy)
    code, body = estimate_json(capsys, config, "--tier", "nightly")
    assert code == 0 and body["reserved"] is True
    est = body["estimate"]
    assert est["instance_type"] == "g4dn.xlarge" and est["duration"]["basis"] == "max_duration"
    usage = ledger_of(config).usage("vision", this_period())
    assert usage.held_usd == pytest.approx(est["usd_cap"]) and usage.held_gpu_hours == pytest.approx(
        3840 / 3600, abs=1e-4
    )
    (hold,) = ledger_of(config).reservations(state="held")
    # The hold lives as long as the lease could: start-up + max_duration + slack.
    assert hold.expires_at - utcnow() > timedelta(seconds=240 + 3600 + 15 * 60 - 60)
    outputs = read_outputs(actions_env["GITHUB_OUTPUT"])
    assert outputs["usd-max"] == f"{est['usd_cap']:.2f}" and outputs["duration-basis"] == "max_duration"
    comment = Path(outputs["comment-path"]).read_text()
    assert comment.splitlines()[0] == COMMENT_MARKER
    assert "training time p50–p90 (upper bound)" in comment
    assert "| train | 1.00 h | 1.00 h | max_duration |" in comment
    assert "| boot | 2.5 min | 5.0 min | catalog: ec2, on-demand lane |" in comment
    assert f"team vision USD left ({this_period()}) | $10.00 → ${10 - est['usd_cap']:.2f}" in comment
    record = ledger_of(config).get_run(body["run_id"])
    # The lease's expected length is the whole paid p50: start-up, the hour, and the phases after it.
    paid = sum(p["p50_s"] for p in est["duration"]["phases"] if p["paid"])
    assert 3840 < paid < 3900 and record.estimated_seconds == pytest.approx(paid, abs=0.1)
    assert record.estimated_usd == est["usd_p90"]


def test_no_reserve_only_estimates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = gpu_project(tmp_path / "p")
    code, body = estimate_json(capsys, config, "--no-reserve")
    assert code == 0 and body["reserved"] is False and ledger_of(config).reservations() == []


def test_a_pull_request_estimates_what_the_nightly_tier_will_spend_and_holds_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = "tiers:\n  pr-fast:\n    resources: {provider: local, gpu_type: cpu, gpu_count: 0}\n"
    config = gpu_project(tmp_path / "p", extra=extra)
    code, body = estimate_json(capsys, config, "--tier", "pr-fast")
    assert code == 0 and body["estimate_tier"] == "nightly"
    assert body["estimate"]["instance_type"] == "g4dn.xlarge"  # not the pr-fast tier's free CPU
    assert body["reserved"] is False and ledger_of(config).reservations() == []


def test_an_unknown_estimate_tier_is_an_input_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GPULINE_ESTIMATE_TIER", "weekly")
    code, body = estimate_json(capsys, gpu_project(tmp_path / "p"), "--tier", "pr-fast")
    assert code == 2 and "GPULINE_ESTIMATE_TIER='weekly' is not a tier" in body["error"]


def test_an_approval_label_lets_the_run_over_budget(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = "approval: {label: gpu-budget-ok}\nbudgets:\n  teams:\n    vision:\n      usd: {hard: 0.3}\n"
    config = gpu_project(tmp_path / "p", policy=policy)
    code, body = estimate_json(capsys, config, "--labels", "docs,gpu-budget-ok")
    assert code == 0 and body["decision"]["decision"] == "warn" and body["reserved"] is True
    assert body["decision"]["approved_by"] == "label:gpu-budget-ok"
    assert ledger_of(config).usage("vision", this_period()).usd > 0.3


def test_an_approved_environment_lets_the_run_over_budget(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    policy = "approval: {environment: gpu-spend}\nbudgets:\n  teams:\n    vision:\n      usd: {hard: 0.3}\n"
    config = gpu_project(tmp_path / "p", policy=policy)
    monkeypatch.setenv("GPULINE_APPROVED_ENVIRONMENT", "gpu-spend")
    code, body = estimate_json(capsys, config)
    assert code == 0 and body["decision"]["approved_by"] == "environment:gpu-spend"


def test_losing_the_last_room_to_another_run_is_decided_again(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = gpu_project(tmp_path / "p", policy="budgets:\n  teams:\n    vision:\n      usd: {hard: 1}\n")
    real_reserve = SqliteLedger.reserve
    raced = {"done": False}

    def another_run_gets_there_first(self: SqliteLedger, reservation: Reservation, *args: Any) -> bool:
        if not raced["done"]:
            raced["done"] = True
            rival = reservation.model_copy(update={"run_id": "rival", "usd": 0.9})
            assert real_reserve(self, rival, *args)
        return real_reserve(self, reservation, *args)

    monkeypatch.setattr(SqliteLedger, "reserve", another_run_gets_there_first)
    code, body = estimate_json(capsys, config)
    assert code == 1
    assert "hard USD budget of 1 per week would be exceeded" in body["error"]
    assert "(used $0.90" in body["error"]


# ---------------------------------------------------------------- evidence


def test_history_of_the_same_config_drives_the_estimate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = gpu_project(tmp_path / "p")
    spec = load_spec(config).for_tier("nightly")
    ledger = ledger_of(config)
    for i, minutes in enumerate([20, 22, 21, 23]):
        start = utcnow() - timedelta(days=10 - i)
        r = RunRecord(run_id=f"old-{i}", model="tiny", team="vision", tier="nightly", status="succeeded")
        r.created_at = start
        r.lineage.config_hash = spec.config_hash()
        r.times.provisioned, r.times.first_step = start, start + timedelta(minutes=3)
        r.times.last_step = r.times.first_step + timedelta(minutes=minutes)
        r.times.released = r.times.last_step + timedelta(minutes=1)
        r.actual_usd, r.estimated_usd = 0.2, 0.25
        ledger.create_run(r)
    code, body = estimate_json(capsys, config)
    assert code == 0
    duration = body["estimate"]["duration"]
    assert duration["basis"] == "history" and duration["runs"] == 4
    # First step 3 min after provisioning (setup, with boot inside it), 1 min from the last step to release.
    assert duration["p50_s"] == pytest.approx(21.5 * 60) and duration["startup_s"] == pytest.approx(180)
    assert {p["name"]: p["evidence"] for p in duration["phases"]}["idle"] == "history n=4"
    comment = Path(body["comment_path"]).read_text()
    assert "| estimate basis | from the last 4 finished runs of this config" in comment


def test_the_smoke_step_time_from_preflight_is_used(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = gpu_project(tmp_path / "p")  # hyperparameters.steps: 10
    r = RunRecord(run_id="run-smoked", model="tiny", team="vision", tier="nightly", smoke_step_s=2.0)
    ledger_of(config).create_run(r)
    code, body = estimate_json(capsys, config, "--run-id", "run-smoked")
    assert code == 0
    duration = body["estimate"]["duration"]
    assert duration["basis"] == "smoke" and duration["p50_s"] == pytest.approx(10 * 2.0 * 0.05)


def test_the_pr_comment_compares_head_with_base(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = gpu_project(tmp_path / "p")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run(["git", "init", "-q", str(config.parent)], check=True)
    subprocess.run([*git, "-C", str(config.parent), "add", "gpuline.yml"], check=True)
    subprocess.run([*git, "-C", str(config.parent), "commit", "-qm", "base"], check=True)
    config.write_text(config.read_text().replace("max_duration: 1h", "max_duration: 2h"))
    code, body = estimate_json(capsys, config, "--base-ref", "HEAD", "--no-reserve")
    assert code == 0 and body["base"]["max_duration_s"] == 3600
    comment = Path(body["comment_path"]).read_text()
    assert "| | base | this PR | change |" in comment
    # (7200 + 270) / (3600 + 270) - 1 = +93% in dollars and paid time: the start-up and the phases after
    # training (4.5 min at p50) stay, the training time doubles (+100%).
    assert "| cost p50–p90 | $0.57–$0.62 | $1.09–$1.15 | +93% |" in comment
    assert "| paid time p50–p90 (upper bound) | 64.5–70.8 min | 124.5–130.8 min | +93% |" in comment
    assert "| training time p50–p90 (upper bound) | 60.0 min | 120.0 min | +100% |" in comment


def test_a_base_ref_without_the_file_gives_no_diff(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = gpu_project(tmp_path / "p")
    subprocess.run(["git", "init", "-q", str(config.parent)], check=True)
    (config.parent / "README").write_text("x")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-C", str(config.parent)]
    subprocess.run([*git, "add", "README"], check=True)
    subprocess.run([*git, "commit", "-qm", "no config yet"], check=True)
    code, body = estimate_json(capsys, config, "--base-ref", "HEAD", "--no-reserve")
    assert code == 0 and body["base"] is None
    assert "| base |" not in Path(body["comment_path"]).read_text()


def test_a_full_lane_shows_the_expected_wait(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], actions_env: dict[str, Path]
) -> None:
    config = gpu_project(tmp_path / "p", policy="lanes:\n  on-demand: {capacity: 1}\n")
    ledger = ledger_of(config)
    busy = RunRecord(run_id="busy", model="other", team="nlp", tier="nightly", estimated_seconds=30 * 60)
    busy.times.provisioned = utcnow() - timedelta(minutes=10)
    ledger.create_run(busy)
    ledger.record_lease(
        LeaseRecord(
            lease_id="l-busy",
            run_id="busy",
            provider="ec2",
            lane="on-demand",
            requested_at=busy.times.provisioned,
            expires_at=utcnow() + timedelta(hours=1),
        )
    )
    code, body = estimate_json(capsys, config, "--no-reserve")
    assert code == 0 and body["queue"]["ahead"] == 1
    assert body["queue"]["expected_wait_s"] == pytest.approx(20 * 60, abs=10)
    assert "on-demand lane full (1/1): expected wait ~20 min" in Path(body["comment_path"]).read_text()
    assert int(read_outputs(actions_env["GITHUB_OUTPUT"])["expected-wait-s"]) > 1100


def test_the_job_summary_charts_the_cost_of_recent_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], actions_env: dict[str, Path]
) -> None:
    config = gpu_project(tmp_path / "p")
    for i, usd in enumerate([0.3, 0.35, 0.32]):
        r = RunRecord(run_id=f"done-{i}", model="tiny", team="vision", tier="nightly", actual_usd=usd)
        r.created_at = utcnow() - timedelta(days=3 - i)
        ledger_of(config).create_run(r)
    code, _ = estimate_json(capsys, config, "--no-reserve")
    assert code == 0
    summary = actions_env["GITHUB_STEP_SUMMARY"].read_text()
    assert "```mermaid" in summary and "bar [0.30, 0.35, 0.32]" in summary


# ---------------------------------------------------------------- settle


def test_teardown_replaces_the_hold_with_what_the_run_cost(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_project(tmp_path / "p", policy="budgets:\n  teams:\n    vision:\n      gpu_hours: {hard: 1}\n")
    code, body = estimate_json(capsys, config)
    assert code == 0 and body["reserved"]
    run_id = body["run_id"]
    ledger = ledger_of(config)
    startup = body["estimate"]["duration"]["startup_s"]  # the catalog's local setup, under a second
    assert ledger.usage("vision", this_period()).held_gpu_hours == pytest.approx((600 + startup) / 3600, abs=1e-4)
    assert main(["provision", "--config", str(config), "--run-id", run_id, "--json"]) == 0
    assert main(["teardown", "--config", str(config), "--run-id", run_id, "--json"]) == 0
    capsys.readouterr()
    usage = ledger.usage("vision", this_period())
    record = ledger.get_run(run_id)
    assert usage.held_gpu_hours == 0
    assert usage.settled_gpu_hours == pytest.approx(record.gpu_seconds / 3600)
    assert usage.settled_gpu_hours < 600 / 3600  # the actual cost, not the worst case
    (settled,) = ledger.reservations(state="settled")
    assert settled.run_id == run_id


def test_comment_markdown_is_valid_even_without_a_policy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_project(tmp_path / "p")
    code, body = estimate_json(capsys, config)
    assert code == 0
    comment = Path(body["comment_path"]).read_text()
    assert comment.startswith(COMMENT_MARKER + "\n### :white_check_mark: gpuline cost estimate: allow")
    assert "left (" not in comment  # no budget, no quota rows
    assert textwrap.dedent(comment).count("<sub>") == 1


def test_a_budget_that_keeps_changing_gives_up_after_a_few_tries(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = gpu_project(tmp_path / "p", policy="budgets:\n  teams:\n    vision:\n      usd: {hard: 10}\n")
    attempts: list[str] = []

    def never_fits(self: SqliteLedger, reservation: Reservation, *args: Any) -> bool:
        attempts.append(reservation.run_id)
        return False  # as if another run always took the room between decide and reserve

    monkeypatch.setattr(SqliteLedger, "reserve", never_fits)
    code, body = estimate_json(capsys, config)
    assert code == 1 and len(attempts) == 3
    assert "budget for" in body["error"] and "kept changing" in body["error"]
