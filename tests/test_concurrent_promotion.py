"""Gate and promote are atomic with respect to the baseline: of several releases gated against the same
production version, only one moves production; the others are refused (exit 1) until gated again
against the version that replaced it. On the file registry, through the CLI as a release job runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import write_project
from gpuline.cli import main
from gpuline.ledger import open_ledger
from gpuline.registry import open_registry
from gpuline.runs import RunRecord

GATED = "eval:\n  baseline: production\n  gates:\n    - {metric: loss, goal: minimize, max: 1.5, max_regression: 0.5}\n"


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = write_project(tmp_path / "p", spec_extra=GATED)
    monkeypatch.chdir(path.parent)
    return path


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any]]:
    code = main([*args, "--json"])
    body: dict[str, Any] = json.loads(capsys.readouterr().out)
    return code, body


def trained_run(capsys: pytest.CaptureFixture[str], config: Path, loss: float) -> str:
    """A release run as train leaves it (its metrics recorded), without training anything."""
    code, prov = cli(capsys, "provision", "--config", str(config), "--tier", "release")
    assert code == 0, prov
    run_id: str = prov["run_id"]

    def trained(r: RunRecord) -> None:
        r.metrics = {"loss": loss}

    open_ledger("sqlite:///.gpuline/ledger.db", config.parent).update_run(run_id, trained)
    return run_id


def production(config: Path) -> list[tuple[int | None, int | None]]:
    registry = open_registry("file://.gpuline/registry", config.parent)
    return [(c.version, c.previous) for c in registry.history("tiny", "production")]


def test_releases_gated_against_the_same_version_cannot_all_promote(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = trained_run(capsys, config, 1.0)
    assert cli(capsys, "eval-gate", "--run-id", first)[0] == 0
    assert cli(capsys, "promote", "--run-id", first)[0] == 0  # production: v1
    runs = [trained_run(capsys, config, 0.9 - i / 100) for i in range(4)]
    for run_id in runs:  # all four are gated while production holds v1
        code, gate = cli(capsys, "eval-gate", "--run-id", run_id)
        assert code == 0 and gate["baseline"].startswith("v1 ")

    code, landed = cli(capsys, "promote", "--run-id", runs[0])
    assert code == 0 and (landed["version"], landed["previous_version"]) == (2, 1)
    for run_id in runs[1:]:
        code, refused = cli(capsys, "promote", "--run-id", run_id)
        assert code == 1
        assert "production now holds v2, but the candidate was gated against v1" in refused["error"]
        assert f"gpuline eval-gate --run-id {run_id}" in refused["error"]
    assert production(config) == [(1, None), (2, 1)]

    # Gated again, against the version that replaced the one it was gated against: it promotes.
    code, gate = cli(capsys, "eval-gate", "--run-id", runs[1])
    assert code == 0 and gate["baseline"].startswith("v2 ")
    code, landed = cli(capsys, "promote", "--run-id", runs[1])
    assert code == 0 and landed["previous_version"] == 2
    assert production(config) == [(1, None), (2, 1), (landed["version"], 2)]
    # A retried promote of a run that landed changes nothing and succeeds.
    code, again = cli(capsys, "promote", "--run-id", runs[1])
    assert code == 0 and again["version"] == landed["version"]


def test_four_concurrent_promotions_of_runs_gated_against_one_version_land_once(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = trained_run(capsys, config, 1.0)
    assert cli(capsys, "eval-gate", "--run-id", first)[0] == 0
    assert cli(capsys, "promote", "--run-id", first)[0] == 0
    runs = [trained_run(capsys, config, 0.9 - i / 100) for i in range(4)]
    for run_id in runs:
        assert cli(capsys, "eval-gate", "--run-id", run_id)[0] == 0
    # Four release jobs promoting at once, each its own process, as four workflow runs would.
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "gpuline.cli", "promote", "--run-id", run_id, "--json"],
            cwd=config.parent,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for run_id in runs
    ]
    results = [(p.wait(timeout=300), json.loads(p.communicate()[0])) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 1, 1, 1], results
    assert all("was gated against v1" in body["error"] for code, body in results if code == 1)
    (winner,) = [body for code, body in results if code == 0]
    # The one that landed replaced the version it was gated against, and nothing else moved.
    assert production(config) == [(1, None), (winner["version"], 1)]
