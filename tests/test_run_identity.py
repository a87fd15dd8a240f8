"""State is never lost or mixed up without a word: a run belongs to the project that created it, a
closed run stays closed, and a gpuline.yml that is not there is an error, never a new, empty ledger
beside a file that does not exist."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import TINY_TRAIN, write_project
from gpuline.cli import main
from gpuline.context import project_of, repository_name
from gpuline.lease.close import close_run
from gpuline.ledger.sqlite import SqliteLedger
from gpuline.runs import Project, RunRecord, utcnow


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any], str]:
    code = main([*args, "--json"])
    captured = capsys.readouterr()
    body = json.loads(captured.out)
    assert isinstance(body, dict)
    return code, body, captured.err


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    assert "Traceback" not in err and "internal error" not in err, err
    return lines[0]


def new_run(capsys: pytest.CaptureFixture[str], config: Path) -> str:
    code, body, err = cli(capsys, "preflight", "--config", str(config))
    assert code == 0, err
    run_id: str = body["run_id"]
    return run_id


# ---------------------------------------------------------------- a run belongs to its project


@pytest.fixture
def shared_ledger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SqliteLedger:
    path = tmp_path / "shared" / "ledger.db"
    monkeypatch.setenv("GPULINE_LEDGER", f"sqlite:///{path}")
    return SqliteLedger(path)


@pytest.mark.parametrize("step", ["train", "eval-gate", "promote", "cost-estimate", "provision", "teardown"])
def test_another_project_s_run_reached_through_a_shared_ledger_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], shared_ledger: SqliteLedger, step: str
) -> None:
    # Two projects with the same model name, one ledger: only the config's place tells them apart.
    ours, theirs = write_project(tmp_path / "ours"), write_project(tmp_path / "theirs")
    run_id = new_run(capsys, theirs)
    before = shared_ledger.get_run(run_id)
    code, _body, err = cli(capsys, step, "--config", str(ours), "--run-id", run_id)
    assert code == 2
    assert one_line(err) == (
        f"error: run {run_id} belongs to the project {theirs}, not to this one ({ours}) "
        "(fix: pass a run this project created (`gpuline status` lists them), or the --config that created it)"
    )
    after = shared_ledger.get_run(run_id)
    assert (after.status, after.stage, after.times.released) == (before.status, before.stage, None)
    assert shared_ledger.leases() == [] and shared_ledger.reservations() == []
    assert not (ours.parent / ".gpuline" / "registry").exists()  # nothing promoted into ours


def test_the_project_that_created_a_run_still_acts_on_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], shared_ledger: SqliteLedger
) -> None:
    config = write_project(tmp_path / "ours")
    run_id = new_run(capsys, config)
    code, _body, err = cli(capsys, "cost-estimate", "--config", str(config), "--run-id", run_id, "--no-reserve")
    assert code == 0, err
    assert shared_ledger.get_run(run_id).project == Project(config=str(config))


def test_a_project_is_its_repository_and_the_config_s_path_inside_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, shared_ledger: SqliteLedger
) -> None:
    # Each job of a workflow checks the repository out into a folder of its own machine.
    first = write_project(tmp_path / "w1" / "models" / "tiny")
    second = write_project(tmp_path / "w2" / "models" / "tiny")
    monkeypatch.setenv("GITHUB_REPOSITORY", "acme/vision")
    monkeypatch.setenv("GITHUB_WORKSPACE", str(tmp_path / "w1"))
    run_id = new_run(capsys, first)
    assert shared_ledger.get_run(run_id).project == Project(repository="acme/vision", config="models/tiny/gpuline.yml")
    monkeypatch.setenv("GITHUB_WORKSPACE", str(tmp_path / "w2"))
    code, _body, err = cli(capsys, "cost-estimate", "--config", str(second), "--run-id", run_id, "--no-reserve")
    assert code == 0, err
    monkeypatch.setenv("GITHUB_REPOSITORY", "acme/other")
    code, _body, err = cli(capsys, "train", "--config", str(second), "--run-id", run_id)
    assert code == 2 and "belongs to the project acme/vision:models/tiny/gpuline.yml" in one_line(err)


def test_a_run_recorded_before_runs_carried_their_project_is_anyone_s(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ledger = SqliteLedger(project.parent / ".gpuline" / "ledger.db")
    ledger.create_run(RunRecord(run_id="run-old", model="tiny", team="vision", tier="nightly"))
    code, _body, err = cli(capsys, "cost-estimate", "--config", str(project), "--run-id", "run-old", "--no-reserve")
    assert code == 0, err


def test_remote_urls_name_the_repository_as_github_does(tmp_path: Path) -> None:
    for url in ("https://github.com/acme/vision.git", "git@github.com:acme/vision.git", "ssh://git@h/acme/vision/"):
        assert repository_name(url) == "acme/vision"
    assert repository_name("") == ""
    assert Project(repository="Acme/Vision", config="a").same_as(Project(repository="acme/vision", config="a"))
    assert Project(config="a").same_as(Project(repository="acme/vision", config="a"))
    assert not Project(config="a").same_as(Project(config="b"))
    config = write_project(tmp_path / "p")
    assert project_of(config) == Project(config=str(config))


# ---------------------------------------------------------------- a closed run stays closed


CLOSED = "a closed run is never resumed (fix: start a new run: drop --run-id (GPULINE_RUN_ID))"


@pytest.mark.parametrize("step", ["preflight", "cost-estimate", "provision", "train", "eval-gate", "promote"])
def test_a_torn_down_run_never_runs_a_step_again(project: Path, capsys: pytest.CaptureFixture[str], step: str) -> None:
    run_id = new_run(capsys, project)
    assert cli(capsys, "teardown", "--config", str(project), "--run-id", run_id)[0] == 0
    ledger = SqliteLedger(project.parent / ".gpuline" / "ledger.db")
    closed = ledger.get_run(run_id)
    events = len(ledger.events(run_id))
    code, _body, err = cli(capsys, step, "--config", str(project), "--run-id", run_id)
    assert code == 2
    line = one_line(err)
    assert line.startswith(f"error: run {run_id} was closed at ") and line.endswith(CLOSED)
    again = ledger.get_run(run_id)
    assert (again.status, again.stage, again.error) == (closed.status, closed.stage, closed.error)
    assert len(ledger.events(run_id)) == events and ledger.leases(active_only=True) == []
    # Teardown stays idempotent on it.
    assert cli(capsys, "teardown", "--config", str(project), "--run-id", run_id)[0] == 0


def test_a_run_whose_gates_failed_is_refused_by_its_gates_until_it_is_closed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trains = TINY_TRAIN.replace(
        "        sys.exit(0)\n",
        "        sys.exit(0)\n    pathlib.Path(os.environ['GPULINE_EVAL_PATH']).write_text('{\"loss\": 5.0}')\n",
    )
    gates = "eval:\n  gates:\n    - {metric: loss, goal: minimize, max: 1}\n"
    config = write_project(tmp_path / "p", spec_extra=gates, train_py=trains)
    run_id = new_run(capsys, config)
    for step in ("provision", "train"):
        assert cli(capsys, step, "--config", str(config), "--run-id", run_id)[0] == 0
    assert cli(capsys, "eval-gate", "--config", str(config), "--run-id", run_id)[0] == 1
    code, body, _err = cli(capsys, "promote", "--config", str(config), "--run-id", run_id)
    assert code == 1 and "has not passed its eval gates" in body["error"]
    assert cli(capsys, "teardown", "--config", str(config), "--run-id", run_id)[0] == 0
    code, body, _err = cli(capsys, "promote", "--config", str(config), "--run-id", run_id)
    assert code == 2 and body["error"].endswith(CLOSED)


def test_rerunning_a_reaped_run_fails_and_promotes_nothing(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_id = new_run(capsys, project)
    assert cli(capsys, "provision", "--config", str(project), "--run-id", run_id)[0] == 0
    ledger = SqliteLedger(project.parent / ".gpuline" / "ledger.db")
    (lease,) = ledger.leases(active_only=True)
    # What the reaper does to a run whose holder is gone.
    assert close_run(ledger, project.parent, lease, utcnow(), "holder gone")
    assert ledger.get_run(run_id).status == "failed"
    code, _body, err = cli(capsys, "run", "--config", str(project), "--tier", "nightly", "--run-id", run_id)
    assert code == 2 and one_line(err).endswith(CLOSED)
    assert ledger.get_run(run_id).status == "failed" and ledger.get_run(run_id).promoted_version is None
    assert not (project.parent / ".gpuline" / "registry").exists()
    assert ledger.leases(active_only=True) == []


# ---------------------------------------------------------------- a missing config is an error


@pytest.mark.parametrize("command", ["status", "reap", "report", "teardown"])
def test_a_typo_d_config_is_an_error_not_a_new_ledger(
    project: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    typo = project.parent / "gpuline.ymll"
    extra = ["--run-id", "run-1"] if command == "teardown" else []
    code, body, err = cli(capsys, command, "--config", str(typo), *extra)
    assert code == 2 and body["exit_code"] == 2
    assert one_line(err).startswith(f"error: {typo}: file not found (fix: pass --config PATH")
    assert not (project.parent / ".gpuline").exists()


def test_status_in_a_folder_without_a_gpuline_yml_creates_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "gpuline.cli", "status"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert one_line(done.stderr).startswith("error: gpuline.yml: file not found")
    assert list(folder.iterdir()) == []


def test_a_ledger_given_explicitly_needs_no_project(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, shared_ledger: SqliteLedger
) -> None:
    run_id = new_run(capsys, write_project(tmp_path / "ours"))
    monkeypatch.chdir(tmp_path)  # no gpuline.yml here: the shared ledger is named, so it is the one read
    code, body, err = cli(capsys, "status")
    assert code == 0, err
    assert [r["run_id"] for r in body["runs"]] == [run_id]
    assert not (tmp_path / ".gpuline").exists()


def test_a_ledger_that_cannot_be_opened_is_an_error_not_a_new_one(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (project.parent / ".gpuline" / "ledger.db").mkdir(parents=True)
    code, _body, err = cli(capsys, "status", "--config", str(project))
    assert code == 3 and "ledger" in one_line(err)
    assert (project.parent / ".gpuline" / "ledger.db").is_dir()
