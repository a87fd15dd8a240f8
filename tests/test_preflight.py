"""Every preflight refusal, on a tiny pure-Python project (no torch), through the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from conftest import TINY_TRAIN, write_project
from gpuline.cli import main


def preflight(capsys: pytest.CaptureFixture[str], config: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    code = main(["preflight", "--config", str(config), "--json", *extra])
    return code, json.loads(capsys.readouterr().out)


def status(capsys: pytest.CaptureFixture[str], config: Path) -> list[dict[str, Any]]:
    main(["status", "--config", str(config), "--json"])
    runs: list[dict[str, Any]] = json.loads(capsys.readouterr().out)["runs"]
    return runs


def test_a_good_project_passes_and_records_the_smoke_step_time(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, body = preflight(capsys, project)
    assert code == 0, body
    assert body["verdict"] == "pass"
    assert "loss 5.7600 -> " in body["checks"]["smoke test"]
    run = status(capsys, project)[0]
    assert run["run_id"] == body["run_id"] and run["stage"] == "preflight"
    assert run["smoke_step_s"] is not None and run["smoke_step_s"] > 0


def test_preflight_reports_the_seconds_of_each_of_its_phases(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["preflight", "--config", str(project), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    took = json.loads(out)["phase_seconds"]
    phases = ["policy", "resources", "secrets", "dataset", "cuda", "entrypoint", "smoke"]
    assert list(took) == phases
    assert all(isinstance(v, float) and v >= 0 for v in took.values())
    # The smoke test starts the project's script: it always takes some time, the policy check may not.
    assert took["smoke"] > 0
    line = next(line for line in err.splitlines() if line.startswith("preflight phases: "))
    assert [part.split(" ")[0] for part in line.removeprefix("preflight phases: ").split(", ")] == phases


def test_missing_secret_is_named_but_never_printed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_project(tmp_path / "p", spec_extra="secrets: [GPULINE_TEST_TOKEN, OTHER_TOKEN]\n")
    monkeypatch.setenv("GPULINE_TEST_TOKEN", "hunter2-value")
    monkeypatch.delenv("OTHER_TOKEN", raising=False)
    code, body = preflight(capsys, config)
    assert code == 2
    assert "OTHER_TOKEN" in body["error"] and "GPULINE_TEST_TOKEN" not in body["error"]
    assert "hunter2-value" not in json.dumps(status(capsys, config))


def test_secret_values_are_masked_in_actions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, actions_env: dict[str, Path]
) -> None:
    config = write_project(tmp_path / "p", spec_extra="secrets: [GPULINE_TEST_TOKEN]\n")
    monkeypatch.setenv("GPULINE_TEST_TOKEN", "hunter2-value")
    code = main(["preflight", "--config", str(config)])
    captured = capsys.readouterr()
    assert code == 0
    assert "::add-mask::hunter2-value" in captured.out
    assert captured.out.count("hunter2-value") == 1  # only inside the mask command
    assert "hunter2-value" not in actions_env["GITHUB_STEP_SUMMARY"].read_text()
    assert "hunter2-value" not in actions_env["GITHUB_OUTPUT"].read_text()


def test_entrypoint_that_does_not_import(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_project(tmp_path / "p", train_py="import no_such_module_anywhere\n")
    code, body = preflight(capsys, config)
    assert code == 2
    assert "no_such_module_anywhere" in body["error"]
    assert status(capsys, config)[0]["stage"] == "preflight"


def test_entrypoint_file_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_project(tmp_path / "p")
    config.write_text(config.read_text().replace("[python, train.py]", "[python, nope.py]"))
    code, body = preflight(capsys, config)
    assert code == 2 and "nope.py does not exist" in body["error"] and "entrypoint.command" in body["error"]


def test_no_python_file_to_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_project(tmp_path / "p")
    config.write_text(config.read_text().replace("[python, train.py]", "[./train.sh]"))
    code, body = preflight(capsys, config)
    assert code == 2 and "entrypoint.import_check" in body["error"]


def test_smoke_test_whose_loss_does_not_fall(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    flat = TINY_TRAIN.replace("w += 0.2 * (target - w)", "w = w")
    config = write_project(tmp_path / "p", train_py=flat)
    code, body = preflight(capsys, config)
    assert code == 2
    assert "did not show the loss falling" in body["error"] and "9.0000" in body["error"]


def test_tier_rules_deny_with_exit_1_and_point_at_the_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = """\
        version: 1
        tiers:
          nightly: {max_duration: 5m}
    """
    config = write_project(tmp_path / "p", policy=policy)
    code, body = preflight(capsys, config, "--tier", "nightly")
    assert code == 1
    assert "gpuline.yml:17: resources.max_duration" in body["error"] and "5m or less" in body["error"]
    assert status(capsys, config)[0]["status"] == "refused"


def test_gpu_type_not_allowed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = """\
        version: 1
        tiers:
          release: {allowed_gpu_types: [h100]}
    """
    config = write_project(tmp_path / "p", policy=policy)
    code, body = preflight(capsys, config, "--tier", "release")
    assert code == 1 and "use one of h100" in body["error"]


def test_broken_policy_file_is_input_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_project(tmp_path / "p", policy="version: 1\nbudgets: {teams: {vision: {usd: {hard: -1}}}}\n")
    code, body = preflight(capsys, config)
    assert code == 2 and "policy.yml" in body["error"] and "budgets.teams.vision.usd.hard" in body["error"]
