"""Audited promotion as a user runs it: two releases and a rollback through the CLI, against each
registry backend, then ``gpuline models`` showing what production holds and who moved it, and why."""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

import pytest

from conftest import read_outputs, write_project
from fixtures_aws import serial_aws, serial_moto  # noqa: F401
from gpuline.cli import main
from gpuline.registry import open_registry
from gpuline.registry.base import Audit
from test_framework_free import GATES, readme_trainer

RUN_URL = "https://github.com/o/r/actions/runs/{}"


def gpuline(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any], str]:
    """The CLI in this process (one MLflow client import for the whole test), as `gpuline ARGS --json`."""
    code = main([*args, "--json"])
    out, err = capsys.readouterr()
    return code, json.loads(out), err


@pytest.fixture(
    params=[
        "file",
        pytest.param("s3", marks=pytest.mark.integration),
        pytest.param("mlflow", marks=pytest.mark.integration),
    ]
)
def registry_uri(request: pytest.FixtureRequest) -> str:
    if request.param == "file":
        return "file://.gpuline/registry"
    if request.param == "s3":
        import boto3

        endpoint = request.getfixturevalue("serial_aws")
        bucket = f"registry-{secrets.token_hex(4)}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        return f"s3://{bucket}/models"
    return f"mlflow+{request.getfixturevalue('mlflow_server')}"


def as_actor(monkeypatch: pytest.MonkeyPatch, actor: str, run: int) -> None:
    monkeypatch.setenv("GITHUB_ACTOR", actor)
    monkeypatch.setenv("GITHUB_REPOSITORY", "o/r")
    monkeypatch.setenv("GITHUB_RUN_ID", str(run))


@pytest.mark.slow
def test_releases_and_a_rollback_are_audited_and_shown_by_models(
    registry_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    model = f"tiny-{secrets.token_hex(3)}"  # one MLflow server serves the whole test run
    config = write_project(tmp_path / "p", spec_extra=GATES % "1.5", train_py=readme_trainer())
    config.write_text(config.read_text().replace("name: tiny", f"name: {model}"))
    monkeypatch.chdir(config.parent)
    monkeypatch.setenv("GPULINE_REGISTRY", registry_uri)

    as_actor(monkeypatch, "alice", 101)
    code, first, err = gpuline(capsys, "run", "--tier", "release")
    assert code == 0, err
    promoted = first["promote"]
    assert (promoted["version"], promoted["stage"], promoted["actor"]) == (1, "production", "alice")
    assert promoted["reason"].startswith("gates passed: loss=")
    assert promoted["workflow_run_url"] == RUN_URL.format(101)

    as_actor(monkeypatch, "bob", 102)
    code, second, err = gpuline(capsys, "run", "--tier", "release")
    assert code == 0, err
    assert second["eval-gate"]["baseline"] == "v1 (production; stored metrics)"  # gated against the first release
    assert (second["version"], second["promote"]["previous_version"]) == (2, 1)

    as_actor(monkeypatch, "carol", 103)
    monkeypatch.setenv("GPULINE_ROLLBACK_REASON", "post-promotion check failed")
    code, back, err = gpuline(capsys, "rollback", "--stage", "production", "--run-id", second["run_id"])
    assert code == 0, err
    assert (back["version"], back["replaced"], back["actor"]) == (1, 2, "carol")
    assert (back["reason"], back["run_id"]) == ("post-promotion check failed", second["run_id"])

    code, shown, err = gpuline(capsys, "models")
    assert code == 0, err
    (view,) = shown["models"]
    assert view["model"] == model
    held = view["stages"]["production"]
    assert (held["version"], held["run_id"], held["by"]) == (1, first["run_id"], "carol")
    assert view["stages"]["staging"] is None
    assert [(c["action"], c["version"], c["actor"]) for c in view["history"]] == [
        ("rollback", 1, "carol"),
        ("promote", 2, "bob"),
        ("promote", 1, "alice"),
    ]
    assert [c["workflow_run_url"] for c in view["history"]] == [RUN_URL.format(n) for n in (103, 102, 101)]
    assert view["history"][1]["gates"][0]["gate"] == "loss" and view["history"][1]["run_id"] == second["run_id"]

    code, status, _ = gpuline(capsys, "status", second["run_id"], "--events")
    kinds = {e["kind"]: e["data"] for e in status["runs"][0]["events"]}
    assert kinds["model.promoted"]["actor"] == "bob"
    assert kinds["model.rolled_back"]["actor"] == "carol"


@pytest.fixture
def filled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A file registry with one model: v1 promoted by alice, v2 by bob, rolled back by carol."""
    reg = open_registry("file://reg", tmp_path)
    for run in ("run-1", "run-2"):
        reg.register("m", f"file://x/{run}", run, {"accuracy": 0.9}, {})
    url = RUN_URL.format(7)
    reg.promote("m", 1, "production", audit=Audit(actor="alice", reason="gates passed", run_id="run-1"))
    reg.promote("m", 2, "production", audit=Audit(actor="bob", reason="gates passed", run_id="run-2"))
    reg.rollback("m", "production", audit=Audit(actor="carol", reason="verify failed", workflow_run_url=url))
    monkeypatch.chdir(tmp_path)  # no gpuline.yml here: `gpuline models` shows the whole registry
    monkeypatch.setenv("GPULINE_REGISTRY", "file://reg")
    return tmp_path


def test_models_shows_stages_and_history_for_people(
    filled: Path, capsys: pytest.CaptureFixture[str], actions_env: dict[str, Path]
) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "  production  v1  run-1  since " in out and " by carol" in out
    assert "  staging     -" in out
    assert "rollback v2 → v1" in out and "promote → v1" in out and "verify failed" in out
    summary = actions_env["GITHUB_STEP_SUMMARY"].read_text()
    assert "| production | v1 | `run-1` |" in summary
    assert f"[workflow run]({RUN_URL.format(7)})" in summary
    outputs = read_outputs(actions_env["GITHUB_OUTPUT"])
    assert (outputs["production-version"], outputs["staging-version"]) == ("1", "")


def test_models_of_an_unknown_model_is_exit_2(filled: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "nope", "--json"]) == 2
    assert "model nope is not in the registry file://reg" in json.loads(capsys.readouterr().out)["error"]
    assert main(["models", "--json", "--limit", "1"]) == 0
    (view,) = json.loads(capsys.readouterr().out)["models"]
    assert [c["actor"] for c in view["history"]] == ["carol"]


def test_a_rollback_without_a_reason_says_so(filled: Path, capsys: pytest.CaptureFixture[str]) -> None:
    open_registry("file://reg", filled).promote("m", 2, "production")
    assert main(["rollback", "--model", "m", "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert (body["version"], body["reason"]) == (1, "no reason given")
    assert body["actor"]  # the local user outside Actions
