"""Nothing stays held: teardown releases each part on its own when others fail, `gpuline run` tears
down on SIGINT too, and the reaper returns a reservation that never got a lease and works on while
the disk is full. The signal-at-every-stage matrix is in test_chaos.py."""

from __future__ import annotations

import errno
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from conftest import write_project
from gpuline import cli
from gpuline.context import Context
from gpuline.errors import InfraError
from gpuline.ledger.sqlite import SqliteLedger
from gpuline.providers.local import LocalProvider
from gpuline.runs import Cap, Reservation, period_key, utcnow
from gpuline.steps import teardown as teardown_step
from gpuline.steps.provision import provision
from test_chaos import RUN_TRAIN, leftovers_of, start_run, the_run

NOTHING = {"leases": [], "reservations": [], "machines": [], "processes": []}


def provisioned(config: Path) -> tuple[Context, str]:
    """A run of this (living) process with a machine and a quota hold, as `gpuline run` has them."""
    ctx = Context(config_path=config, tier="nightly")
    run_id = provision(ctx, process_bound=True).run_id
    now = utcnow()
    hold = Reservation(
        run_id=run_id,
        team="vision",
        period=period_key(now),
        gpu_hours=1.0,
        usd=2.0,
        expires_at=now + timedelta(hours=1),
    )
    assert ctx.ledger.reserve(hold, Cap())
    return ctx, run_id


@pytest.fixture
def no_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(teardown_step, "RETRY_WAIT_S", 0.0)


# ---------------------------------------------------------------- teardown that fails part-way


def test_a_failing_machine_release_is_retried_and_never_keeps_the_lease_or_the_quota(
    project: Path, monkeypatch: pytest.MonkeyPatch, no_waits: None
) -> None:
    ctx, run_id = provisioned(project)
    tries: list[str] = []

    def provider_down(project_dir: Path, record: Any) -> bool:
        tries.append(record.run_id)
        raise InfraError("the provider answered 503 Service Unavailable", hint="retry")

    monkeypatch.setattr(teardown_step, "release_machine", provider_down)
    with pytest.raises(InfraError) as caught:
        teardown_step.teardown(ctx)
    assert len(tries) == teardown_step.ATTEMPTS
    message = caught.value.one_line()
    assert f"teardown of run {run_id} left machine local-lease-" in message and "503" in message
    assert "lease lease-" not in message  # the lease, the record and the quota were released
    record = ctx.ledger.get_run(run_id)
    assert record.times.released is not None and record.status == "failed"
    assert ctx.ledger.leases(active_only=True) == []
    assert [r.state for r in ctx.ledger.reservations() if r.run_id == run_id] == ["settled"]
    assert len(LocalProvider(project.parent).list_owned()) == 1
    # Once the provider answers again, teardown (idempotent) finishes the one thing left.
    monkeypatch.undo()
    assert teardown_step.teardown(ctx).machine_released is True
    assert LocalProvider(project.parent).list_owned() == []


def test_a_full_disk_under_the_ledger_still_releases_the_machine_and_settles_at_the_real_cost(
    project: Path, monkeypatch: pytest.MonkeyPatch, no_waits: None
) -> None:
    ctx, run_id = provisioned(project)

    def disk_full(*args: Any, **kwargs: Any) -> Any:
        raise InfraError("the ledger: database or disk is full", hint="free disk space on the ledger's volume")

    for method in ("update_run", "release_lease", "append_event"):
        monkeypatch.setattr(ctx.ledger, method, disk_full)
    with pytest.raises(InfraError) as caught:
        teardown_step.teardown(ctx)
    message = caught.value.one_line()
    assert "left lease lease-" in message and "run record" in message and "database or disk is full" in message
    assert "machine" not in message.split(" left ")[1].split(" (")[0]
    assert LocalProvider(project.parent).list_owned() == []  # the machine is released all the same
    # The hold is settled at what the record would have said, not at zero and not kept.
    assert [r.state for r in ctx.ledger.reservations() if r.run_id == run_id] == ["settled"]
    monkeypatch.undo()
    # Teardown again, once the disk has room, finishes the rest: the lease and the record.
    teardown_step.teardown(ctx)
    assert leftovers_of(project.parent) == NOTHING
    assert ctx.ledger.get_run(run_id).times.released is not None
    assert [r.state for r in ctx.ledger.reservations() if r.run_id == run_id] == ["settled"]


# ---------------------------------------------------------------- signals to `gpuline run`


def test_sigint_to_gpuline_run_at_the_eval_gate_tears_down_before_it_exits(tmp_path: Path) -> None:
    project = write_project(tmp_path / "proj", train_py=RUN_TRAIN).parent
    marker = tmp_path / "reached"
    proc = start_run(project, {"GPULINE_TEST_PAUSE_AT": "in:eval-gate", "GPULINE_TEST_PAUSE_FILE": str(marker)})
    try:
        deadline = time.monotonic() + 90  # a hang guard
        while not (marker.exists() and marker.read_text().endswith("\n")):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert proc.returncode == 3, err
    assert "error: `gpuline run` was stopped by SIGINT in eval-gate" in err
    assert json.loads(out)["ok"] is False
    assert leftovers_of(project) == NOTHING
    record = the_run(project)
    assert (record.status, record.stage) == ("failed", "eval-gate") and record.times.released is not None
    assert "SIGINT" in (record.error or "")


# ---------------------------------------------------------------- what the reaper releases


def workflow_steps(project: Path, monkeypatch: pytest.MonkeyPatch, httpserver: Any) -> str:
    """preflight and cost-estimate as a workflow's jobs run them; the workflow is then cancelled
    before its provision job, so no lease is ever recorded."""
    env = {"GITHUB_REPOSITORY": "octo/models", "GITHUB_RUN_ID": "5151", "GITHUB_RUN_ATTEMPT": "1"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    httpserver.expect_request("/repos/octo/models/actions/runs/5151").respond_with_json(
        {"id": 5151, "status": "completed", "conclusion": "cancelled", "url": httpserver.url_for("/x")}
    )
    httpserver.expect_request("/repos/octo/models/actions/runners").respond_with_json({"total_count": 0, "runners": []})
    ctx = Context(config_path=project, tier="nightly")
    from gpuline.steps.cost_estimate import cost_estimate
    from gpuline.steps.preflight import preflight

    run_id = preflight(ctx).run_id
    cost_estimate(ctx)
    assert [r.run_id for r in ctx.ledger.reservations(state="held")] == [run_id]
    monkeypatch.setenv("GITHUB_API_URL", httpserver.url_for("").rstrip("/"))
    monkeypatch.setenv("GPULINE_GITHUB_TOKEN", "reaper-token")
    for name in ("GITHUB_RUN_ID", "GITHUB_RUN_ATTEMPT"):
        monkeypatch.delenv(name)  # the reaper runs in a workflow run of its own
    return run_id


def test_a_reservation_whose_workflow_was_cancelled_before_provision_is_released(
    project: Path, monkeypatch: pytest.MonkeyPatch, httpserver: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    run_id = workflow_steps(project, monkeypatch, httpserver)
    capsys.readouterr()
    assert cli.main(["reap", "--config", str(project), "--grace", "1s", "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert [(a["kind"], a["done"]) for a in body["actions"]] == [("close-run", True)], body
    assert "its workflow run 5151 is completed (cancelled)" in body["actions"][0]["reason"]
    assert leftovers_of(project.parent) == NOTHING
    record = the_run(project.parent)
    assert record.run_id == run_id and record.times.released is not None
    assert (record.status, record.stage) == ("failed", "cost-estimate")
    assert [r.state for r in SqliteLedger(project.parent / ".gpuline" / "ledger.db").reservations()] == ["released"]


@contextmanager
def full_disk(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Every ledger write and every file write fails as on a full disk (reads still work)."""
    real_tx = SqliteLedger._tx

    @contextmanager
    def full_tx(self: SqliteLedger) -> Any:
        raise sqlite3.OperationalError("database or disk is full")
        with real_tx(self) as db:  # pragma: no cover - the signature _tx has
            yield db

    def full_write(self: LocalProvider, *args: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(self.dir))

    with monkeypatch.context() as patch:
        patch.setattr(SqliteLedger, "_tx", full_tx)
        patch.setattr(LocalProvider, "_write", full_write)
        yield


def test_reap_while_the_disk_is_full_reports_and_exits_with_one_line(
    project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code = (
        "from pathlib import Path; from gpuline.context import Context; from gpuline.steps.provision import provision; "
        f"provision(Context(config_path=Path({str(project)!r}), tier='nightly'), process_bound=True)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, capture_output=True)  # then it is gone
    capsys.readouterr()
    with full_disk(monkeypatch):
        assert cli.main(["reap", "--config", str(project), "--json"]) == 3
    out, err = capsys.readouterr()
    body = json.loads(out)
    assert body["ok"] is False and body["exit_code"] == 3
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    assert line.startswith("error: reap could not finish") and "No space left on device" in line, err
    assert "Traceback" not in err
    # Nothing was lost: with room again, the same sweep releases everything.
    assert cli.main(["reap", "--config", str(project), "--json"]) == 0
    assert leftovers_of(project.parent) == NOTHING
