"""The command contract: exit codes, one-line errors, --json, outputs, and a light import."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import read_outputs, write_project
from gpuline.cli import COMMANDS, main


def gpuline(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpuline.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )


def run_json(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any]]:
    code = main([*args, "--json"])
    out = capsys.readouterr().out
    return code, json.loads(out)


def test_help_lists_every_command() -> None:
    result = gpuline("--help")
    assert result.returncode == 0
    for name in COMMANDS:
        assert name in result.stdout


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("gpuline ")


def test_no_command_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage" in capsys.readouterr().out


def test_importing_the_cli_loads_no_heavy_sdk() -> None:
    heavy = ("torch", "boto3", "github", "kubernetes", "mlflow", "pydantic")
    code = f"import sys, gpuline.cli; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_cost_estimate_loads_neither_torch_nor_boto3(project: Path) -> None:
    code = (
        "import sys; from gpuline.cli import main; main(['cost-estimate', '--config', sys.argv[1], '--json']); "
        "print([m for m in ('torch', 'boto3') if m in sys.modules], file=sys.stderr)"
    )
    result = subprocess.run([sys.executable, "-c", code, str(project)], capture_output=True, text=True, check=True)
    assert result.stderr.strip().splitlines()[-1] == "[]"


def test_schema_prints_json_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema"]) == 0
    assert json.loads(capsys.readouterr().out)["title"] == "gpuline.yml"
    assert main(["schema", "--policy"]) == 0
    assert json.loads(capsys.readouterr().out)["title"] == "policy.yml"


def test_bad_config_is_one_line_exit_2_without_traceback(project: Path) -> None:
    project.write_text(project.read_text().replace("max_duration: 10m", "max_duration: 10m\n  gpu_count: two"))
    result = gpuline("preflight", "--config", str(project))
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "gpuline.yml:18: resources.gpu_count" in lines[0]
    assert "Traceback" not in result.stderr
    # Nothing was recorded: a run needs a valid spec.
    assert not (project.parent / ".gpuline" / "ledger.db").exists()


def test_bad_config_in_actions_is_an_annotation_and_summary(project: Path, actions_env: dict[str, Path]) -> None:
    project.write_text(project.read_text().replace("gpu_type: cpu", "gpu_typ: cpu"))
    result = gpuline("preflight", "--config", str(project))
    assert result.returncode == 2
    assert result.stdout.startswith(f"::error file={project},line=16,title=gpuline preflight")
    assert "did you mean `gpu_type`" in result.stdout
    assert "unknown key" in actions_env["GITHUB_STEP_SUMMARY"].read_text()


def test_json_error_document(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, body = run_json(capsys, "train", "--config", str(project))
    assert code == 2
    assert body["ok"] is False and "--run-id" in body["error"]


def test_unknown_run_id(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, body = run_json(capsys, "status", "run-nope", "--config", str(project))
    assert code == 2 and "no run 'run-nope'" in body["error"]


def test_debug_shows_the_traceback(project: Path) -> None:
    result = gpuline("train", "--config", str(project), "--debug")
    assert result.returncode == 2
    assert "Traceback" in result.stderr


def test_unknown_provider_lists_valid_choices(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, body = run_json(capsys, "provision", "--config", str(project), "--provider", "moon")
    assert code == 2
    assert "'moon' is not a valid provider" in body["error"] and "local" in body["error"]


def test_provision_then_teardown_twice_on_the_local_provider(
    project: Path, capsys: pytest.CaptureFixture[str], actions_env: dict[str, Path]
) -> None:
    code, prov = run_json(capsys, "provision", "--config", str(project))
    assert code == 0
    run_id = prov["run_id"]
    outputs = read_outputs(actions_env["GITHUB_OUTPUT"])
    assert outputs["run-id"] == run_id
    assert outputs["lease-id"] == prov["lease_id"] and outputs["instance-id"].startswith("local-lease-")
    assert outputs["runner-label"] == "self" and outputs["expires-at"]

    code, down = run_json(capsys, "teardown", "--config", str(project), "--run-id", run_id)
    assert code == 0
    assert down["machine_released"] is True and down["lease_released"] is True
    assert down["already_torn_down"] is False
    assert down["gpu_seconds"] > 0
    assert down["status"] == "failed"  # provisioned but never trained: a cancelled run, and it says so

    code, again = run_json(capsys, "teardown", "--config", str(project), "--run-id", run_id)
    assert code == 0
    assert again["machine_released"] is False and again["lease_released"] is False
    assert again["already_torn_down"] is True
    assert again["gpu_seconds"] == down["gpu_seconds"]

    code, status = run_json(capsys, "status", run_id, "--config", str(project), "--events")
    record = status["runs"][0]
    assert record["lease_id"] == prov["lease_id"]
    assert "stopped after provision" in record["error"]
    kinds = [e["kind"] for e in record["events"]]
    assert kinds.index("lease.recorded") < kinds.index("machine.provisioned")
    assert kinds.count("teardown") == 2


def test_provision_twice_keeps_one_lease(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, first = run_json(capsys, "provision", "--config", str(project))
    code, second = run_json(capsys, "provision", "--config", str(project), "--run-id", first["run_id"])
    assert code == 0 and second["lease_id"] == first["lease_id"]


def test_cost_estimate_prints_a_cost_and_writes_the_comment(
    project: Path, capsys: pytest.CaptureFixture[str], actions_env: dict[str, Path]
) -> None:
    code, body = run_json(capsys, "cost-estimate", "--config", str(project))
    assert code == 0
    assert body["decision"]["decision"] == "allow"
    assert body["estimate"]["usd_p90"] == 0.0  # the local provider is free
    # The cap is max_duration (10 min) plus the local provider's few seconds of start-up.
    assert 600 / 3600 < body["estimate"]["gpu_hours_cap"] <= 610 / 3600
    outputs = read_outputs(actions_env["GITHUB_OUTPUT"])
    assert outputs["decision"] == "allow" and outputs["usd"] == "0.00"
    comment = Path(outputs["comment-path"]).read_text()
    assert comment.startswith("<!-- gpuline:cost-estimate -->")


def test_rollback_errors(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, body = run_json(capsys, "rollback", "--config", str(project), "--stage", "production")
    assert code == 2 and "never been in production" in body["error"]


def test_eval_gate_and_promote_need_a_trained_run(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, prov = run_json(capsys, "provision", "--config", str(project))
    code, body = run_json(capsys, "eval-gate", "--config", str(project), "--run-id", prov["run_id"])
    assert code == 2 and "no eval metrics" in body["error"]


def test_policy_file_given_but_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_project(tmp_path / "p")
    code, body = run_json(capsys, "cost-estimate", "--config", str(config), "--policy", str(tmp_path / "nope.yml"))
    assert code == 2 and "policy file not found" in body["error"]


def test_provision_moves_the_budget_hold_to_the_lease_expiry(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gpuline.ledger import open_ledger

    code, est = run_json(capsys, "cost-estimate", "--config", str(project), "--tier", "nightly")
    assert code == 0 and est["reserved"] is True
    code, prov = run_json(capsys, "provision", "--config", str(project), "--run-id", est["run_id"])
    assert code == 0
    ledger = open_ledger("sqlite:///.gpuline/ledger.db", project.parent)
    (held,) = [r for r in ledger.reservations(state="held") if r.run_id == est["run_id"]]
    assert held.expires_at.isoformat(timespec="seconds") == prov["expires_at"]


# ---------------------------------------------------------------- what a person sees


def test_run_without_a_tier_says_on_its_first_line_that_it_runs_nightly(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (project.parent / "data.bin").unlink()  # preflight stops it: only the first line matters here
    assert main(["run", "--config", str(project)]) == 2
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("gpuline run: no --tier given, so this runs the nightly tier (the default")
    assert main(["run", "--config", str(project), "--tier", "nightly"]) == 2
    assert "no --tier given" not in capsys.readouterr().out


def test_a_refused_run_under_json_carries_its_id_decision_and_suggestions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_project(tmp_path / "p", policy="budgets:\n  teams:\n    vision:\n      gpu_hours: {hard: 0.01}\n")
    code, body = run_json(capsys, "run", "--config", str(config), "--tier", "pr-fast")
    assert code == 1 and body["ok"] is False and body["exit_code"] == 1
    assert body["run_id"] and body["run_id"] == body["cost-estimate"]["run_id"]
    assert body["preflight"]["verdict"] == "pass"
    assert body["decision"]["decision"] == "deny" and body["decision"] == body["cost-estimate"]["decision"]
    assert body["suggestions"] == body["decision"]["suggestions"] and isinstance(body["suggestions"], list)
    assert "GPU-hours budget" in body["error"]


def test_a_failed_gate_under_json_carries_the_verdicts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from test_framework_free import GATES, readme_trainer

    config = write_project(tmp_path / "p", spec_extra=GATES % "0.000001", train_py=readme_trainer())
    code, body = run_json(capsys, "run", "--config", str(config), "--tier", "nightly")
    assert code == 1 and body["ok"] is False and body["run_id"]
    assert body["gates"] == body["eval-gate"]["gates"] and body["gates"][0]["gate"] == "loss"
    assert body["gates"][0]["passed"] is False
    assert body["teardown"]["status"] == "refused" and body["teardown"]["lease_released"] is True


def test_status_shows_events_without_json_and_keeps_its_columns_apart(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from gpuline.ledger import open_ledger
    from gpuline.runs import RunRecord

    _, prov = run_json(capsys, "provision", "--config", str(project))

    def promoted(r: RunRecord) -> None:
        r.promoted_version, r.promoted_stage, r.lineage.commit = 12, "production", "abcdef1234567890"

    open_ledger("sqlite:///.gpuline/ledger.db", project.parent).update_run(prov["run_id"], promoted)
    assert main(["status", "--config", str(project), "--events"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header, row = lines[0], lines[1]
    at = header.index("COMMIT")
    assert row[at:].startswith("abcdef1234") and row[header.index("VERSION") :].startswith("v12 production ")
    assert any("lease.recorded" in line for line in lines[2:])  # the run's events, under its row
    assert main(["status", "--config", str(project)]) == 0
    assert not any("lease.recorded" in line for line in capsys.readouterr().out.splitlines())


def test_status_help_says_what_it_shows_without_a_run_id() -> None:
    result = gpuline("status", "--help")
    assert "(default: the latest)" not in result.stdout
    assert "newest --limit runs" in " ".join(result.stdout.split())
