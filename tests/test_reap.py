"""The reaper: what it terminates, what it leaves alone, and what it closes in the ledger.

Most cases use the local provider (its lease files are a real instance list) so they run fast; the
cloud providers are swept the same way in test_chaos.py. An *abandoned* run is made for real: a
child process provisions and exits without teardown.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from conftest import write_project
from gpuline import cli, github
from gpuline.context import Context
from gpuline.providers.base import TAG_EXPIRES_AT, TAG_LEASE_ID, TAG_MANAGED, TAG_RUN_ID, LeaseRequest, Machine
from gpuline.providers.local import LocalProvider
from gpuline.runs import Cap, LeaseRecord, Reservation, RunRecord, period_key, utcnow
from gpuline.spec import load_spec
from gpuline.steps.provision import provision
from gpuline.steps.reap import Sweep, judge, reap, sweep_targets

if TYPE_CHECKING:
    from github_fake import FakeGitHub

pytest_plugins = ["github_fake"]

NO_GRACE = timedelta(0)
LOCAL = [Sweep("local")]


def context(config: Path) -> Context:
    return Context(config_path=config, tier="nightly")


def provision_here(config: Path) -> tuple[Context, dict[str, Any]]:
    """Provision from this (living) test process, as `gpuline run` would."""
    ctx = context(config)
    return ctx, provision(ctx, process_bound=True).to_json()


def provision_and_exit(config: Path) -> str:
    """Provision from a child process that then exits without teardown: an abandoned lease."""
    code = (
        "import sys; from pathlib import Path; from gpuline.context import Context; "
        "from gpuline.steps.provision import provision; "
        f"ctx = Context(config_path=Path({str(config)!r}), tier='nightly'); "
        "result = provision(ctx, process_bound=True); print('RUN_ID=' + result.run_id)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    return next(line for line in done.stdout.splitlines() if line.startswith("RUN_ID=")).removeprefix("RUN_ID=")


def hold_quota(ctx: Context, run_id: str, *, expires_in: float = 3600) -> None:
    now = utcnow()
    reservation = Reservation(
        run_id=run_id,
        team="vision",
        period=period_key(now),
        gpu_hours=1.0,
        usd=2.0,
        expires_at=now + timedelta(seconds=expires_in),
    )
    assert ctx.ledger.reserve(reservation, Cap())


def held(ctx: Context) -> list[str]:
    return [r.run_id for r in ctx.ledger.reservations(state="held")]


def live_machines(config: Path) -> list[Machine]:
    return LocalProvider(config.parent).list_owned()


def foreign_machine(config: Path, *, run_id: str | None, lease_id: str | None, expires_in: float = 3600) -> Machine:
    """A machine with gpuline tags that this ledger never recorded (another ledger's, or a broken one)."""
    expires = utcnow() + timedelta(seconds=expires_in)
    tags = {TAG_MANAGED: "true", TAG_EXPIRES_AT: expires.isoformat()}
    if run_id:
        tags[TAG_RUN_ID] = run_id
    if lease_id:
        tags[TAG_LEASE_ID] = lease_id
    request = LeaseRequest(
        run_id=run_id or "",
        lease_id=lease_id or "lease-foreign",
        spec=load_spec(config),
        instance_type="cpu",
        lane="on-demand",
        region="",
        ttl_seconds=int(expires_in),
        expires_at=expires,
        tags=tags,
        project_dir=config.parent,
    )
    return LocalProvider(config.parent).provision(request)


# ---------------------------------------------------------------- what is left alone


def test_a_live_run_is_left_alone(project: Path) -> None:
    ctx, result = provision_here(project)
    hold_quota(ctx, result["run_id"])
    assert reap(ctx, LOCAL, NO_GRACE, dry_run=False) == []
    assert [m.instance_id for m in live_machines(project)] == [result["instance_id"]]
    assert ctx.ledger.get_run(result["run_id"]).times.released is None
    assert held(ctx) == [result["run_id"]]


def test_a_machine_inside_its_boot_grace_period_is_left_alone_even_when_its_workflow_is_over(
    project: Path, monkeypatch: pytest.MonkeyPatch, httpserver: Any
) -> None:
    # A workflow's status is seen from elsewhere, and later: inside the grace period it is not trusted.
    ctx = workflow_held(project, monkeypatch, httpserver, "completed", "cancelled")
    run_id = provision(ctx, process_bound=False).run_id
    hold_quota(ctx, run_id)
    actions = reap(ctx, LOCAL, timedelta(minutes=10), dry_run=False)
    assert [(a.kind, a.reason.split(" (")[0]) for a in actions] == []
    assert len(live_machines(project)) == 1
    assert ctx.ledger.get_run(run_id).times.released is None and held(ctx) == [run_id]
    # Once the grace period is over, the same machine goes.
    actions = reap(ctx, LOCAL, NO_GRACE, dry_run=False)
    assert ("terminate", True) in [(a.kind, a.done) for a in actions]
    assert live_machines(project) == []


def test_inside_the_grace_period_a_machine_whose_holder_process_died_here_goes(project: Path) -> None:
    run_id = provision_and_exit(project)
    ctx = context(project)
    hold_quota(ctx, run_id)
    actions = reap(ctx, LOCAL, timedelta(minutes=10), dry_run=False)  # the default grace
    (terminate,) = [a for a in actions if a.kind == "terminate"]
    assert terminate.done and "exited without teardown" in terminate.reason
    assert live_machines(project) == []
    assert ctx.ledger.get_run(run_id).times.released is not None and held(ctx) == []
    assert ctx.ledger.leases(active_only=True) == []


def test_a_machine_of_a_run_this_ledger_does_not_know_is_left_to_its_ttl(project: Path) -> None:
    ctx = context(project)
    machine = foreign_machine(project, run_id="run-elsewhere", lease_id="lease-elsewhere")
    action = judge(ctx.ledger, machine, NO_GRACE, utcnow())
    assert (action.kind, action.reason) == ("keep", "run run-elsewhere is not in this ledger; left to its TTL")
    assert machine.expires_at is not None
    later = judge(ctx.ledger, machine, NO_GRACE, machine.expires_at + timedelta(seconds=1))
    assert later.kind == "terminate" and "past its TTL" in later.reason


# ---------------------------------------------------------------- what is reaped


def test_an_abandoned_run_is_released_closed_and_its_quota_returned(project: Path) -> None:
    run_id = provision_and_exit(project)
    ctx = context(project)
    hold_quota(ctx, run_id)
    actions = reap(ctx, LOCAL, NO_GRACE, dry_run=False)
    (terminate,) = [a for a in actions if a.kind == "terminate"]
    assert terminate.done and terminate.run_id == run_id
    assert "was abandoned: its orchestrator (pid" in terminate.reason
    assert live_machines(project) == []
    record = ctx.ledger.get_run(run_id)
    assert record.times.released is not None and record.status == "failed"
    assert held(ctx) == []
    assert all(lease.released_at is not None for lease in ctx.ledger.leases())
    assert "reaped" in [e.kind for e in ctx.ledger.events(run_id)]
    # A second sweep finds nothing left to do.
    assert reap(ctx, LOCAL, NO_GRACE, dry_run=False) == []


def test_a_lease_abandoned_before_any_machine_is_closed_and_its_reservation_released(project: Path) -> None:
    ctx = context(project)
    record = ctx.ensure_run()
    hold_quota(ctx, record.run_id)
    now = utcnow()
    ctx.ledger.record_lease(
        LeaseRecord(lease_id="lease-nomachine", run_id=record.run_id, provider="local", expires_at=now)
    )
    ctx.ledger.update_run(record.run_id, lambda r: setattr(r, "lease_id", "lease-nomachine"))
    actions = reap(ctx, LOCAL, NO_GRACE, dry_run=False, now=now + timedelta(seconds=1))
    assert [(a.kind, a.done) for a in actions] == [("close-run", True)]
    assert held(ctx) == []
    assert ctx.ledger.get_run(record.run_id).status == "failed"


def test_past_its_ttl_a_machine_goes_even_while_its_holder_lives(project: Path) -> None:
    ctx, result = provision_here(project)
    hold_quota(ctx, result["run_id"])
    expires = ctx.ledger.get_run(result["run_id"]).expires_at
    assert expires is not None
    actions = reap(ctx, LOCAL, NO_GRACE, dry_run=False, now=expires + timedelta(seconds=1))
    assert [a.kind for a in actions] == ["terminate"]
    assert "past its TTL" in actions[0].reason
    assert live_machines(project) == []
    assert ctx.ledger.get_run(result["run_id"]).times.released is not None
    assert held(ctx) == []


def test_the_machine_of_a_finished_run_is_terminated(project: Path) -> None:
    ctx, result = provision_here(project)

    def finish(r: RunRecord) -> None:
        r.status, r.times.released = "succeeded", utcnow()

    ctx.ledger.update_run(result["run_id"], finish)
    (action,) = reap(ctx, LOCAL, NO_GRACE, dry_run=False)
    assert action.kind == "terminate" and "is succeeded but the machine still runs" in action.reason
    assert live_machines(project) == []


def test_a_machine_with_gpuline_tags_but_no_run_or_lease_is_terminated(project: Path) -> None:
    machine = foreign_machine(project, run_id=None, lease_id=None)
    assert judge(context(project).ledger, machine, NO_GRACE, utcnow()).kind == "terminate"


def test_an_expired_reservation_is_released_unless_its_run_is_still_starting(project: Path) -> None:
    ctx = context(project)
    stale = ctx.ensure_run()
    hold_quota(ctx, stale.run_id, expires_in=-1)
    starting_id = provision_here(project)[1]["run_id"]  # its holder (this process) lives
    hold_quota(ctx, starting_id, expires_in=-1)
    actions = reap(ctx, LOCAL, timedelta(minutes=10), dry_run=False)
    assert [(a.kind, a.target, a.done) for a in actions] == [("release-reservation", stale.run_id, True)]
    assert held(ctx) == [starting_id]


# ---------------------------------------------------------------- the command


def test_dry_run_prints_the_plan_and_changes_nothing(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_id = provision_and_exit(project)
    time.sleep(1.1)  # the shortest grace the command accepts is 1s
    code = cli.main(["reap", "--config", str(project), "--dry-run", "--grace", "1s", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    kinds = [(a["kind"], a["done"]) for a in out["actions"]]
    assert ("terminate", False) in kinds and ("close-run", False) in kinds
    assert out["dry_run"] is True and "local" in out["swept"]
    assert len(live_machines(project)) == 1
    assert context(project).ledger.get_run(run_id).times.released is None
    assert cli.main(["reap", "--config", str(project), "--grace", "1s"]) == 0
    assert live_machines(project) == []


def test_the_sweep_covers_providers_with_leases_with_their_options_and_the_configured_one(tmp_path: Path) -> None:
    config = write_project(tmp_path / "p", spec_extra="  options: {namespace: ml}\n")
    config.write_text(config.read_text().replace("provider: local", "provider: kubernetes"))
    ctx = context(config)
    record = ctx.ensure_run()
    options = {"image_id": "ami-1", "subnet_ids": ["subnet-a"]}

    def uses_ec2(r: RunRecord) -> None:
        r.resolved_config = {"resources": {"options": options}}

    ctx.ledger.update_run(record.run_id, uses_ec2)
    ctx.ledger.record_lease(
        LeaseRecord(lease_id="lease-1", run_id=record.run_id, provider="ec2", region="eu-west-1", expires_at=utcnow())
    )
    sweeps = sweep_targets(ctx)
    assert Sweep("ec2", json.dumps({**options, "region": "eu-west-1"}, sort_keys=True)) in sweeps
    assert Sweep("kubernetes", json.dumps({"namespace": "ml"})) in sweeps
    assert Sweep("local") in sweeps
    assert [s.provider for s in sweep_targets(ctx, ["aws"])] == ["ec2"]
    assert sweep_targets(ctx, ["rest"]) == [Sweep("rest")]


def test_a_provider_that_cannot_be_swept_is_reported_and_its_expired_leases_stay_open(project: Path) -> None:
    ctx = context(project)
    record = ctx.ensure_run()
    ctx.ledger.record_lease(
        LeaseRecord(lease_id="lease-ec2", run_id=record.run_id, provider="ec2", expires_at=utcnow())
    )
    actions = reap(ctx, [Sweep("ec2", json.dumps({"bogus": 1})), *LOCAL], NO_GRACE, dry_run=False)
    assert [a.kind for a in actions] == ["error", "keep"]
    assert "resources.options.bogus: unknown key" in actions[0].reason
    assert "was not swept" in actions[1].reason
    assert ctx.ledger.leases(active_only=True)[0].lease_id == "lease-ec2"


# ---------------------------------------------------------------- GitHub: workflow holders and runners


def workflow_api(httpserver: Any, status: str, conclusion: str | None) -> None:
    httpserver.expect_request("/repos/octo/models/actions/runs/4242").respond_with_json(
        {"id": 4242, "status": status, "conclusion": conclusion, "url": httpserver.url_for("/x")}
    )
    httpserver.expect_request("/repos/octo/models/actions/runners").respond_with_json({"total_count": 0, "runners": []})


def workflow_held(
    project: Path, monkeypatch: pytest.MonkeyPatch, httpserver: Any, status: str, conclusion: str | None
) -> Context:
    """A context whose steps run in workflow run 4242 (in ``status``), with a token to ask GitHub."""
    for name, value in {"GITHUB_REPOSITORY": "octo/models", "GITHUB_RUN_ID": "4242", "GITHUB_RUN_ATTEMPT": "1"}.items():
        monkeypatch.setenv(name, value)
    workflow_api(httpserver, status, conclusion)
    monkeypatch.setenv("GITHUB_API_URL", httpserver.url_for("").rstrip("/"))
    monkeypatch.setenv("GPULINE_GITHUB_TOKEN", "t")
    return context(project)


@pytest.mark.parametrize(
    ("status", "conclusion", "reaped"), [("completed", "cancelled", True), ("in_progress", None, False)]
)
def test_a_lease_held_by_a_finished_workflow_run_is_abandoned(
    project: Path, monkeypatch: pytest.MonkeyPatch, httpserver: Any, status: str, conclusion: str | None, reaped: bool
) -> None:
    for name, value in {"GITHUB_REPOSITORY": "octo/models", "GITHUB_RUN_ID": "4242", "GITHUB_RUN_ATTEMPT": "1"}.items():
        monkeypatch.setenv(name, value)
    ctx = context(project)
    result = provision(ctx, process_bound=False).to_json()  # a `gpuline provision` step: the workflow holds the lease
    workflow_api(httpserver, status, conclusion)
    monkeypatch.setenv("GITHUB_API_URL", httpserver.url_for("").rstrip("/"))
    monkeypatch.setenv("GPULINE_GITHUB_TOKEN", "t")
    actions = reap(ctx, LOCAL, NO_GRACE, dry_run=False)
    if reaped:
        assert "its workflow run 4242 is completed (cancelled)" in actions[0].reason
        assert live_machines(project) == []
    else:
        assert actions == [] and [m.instance_id for m in live_machines(project)] == [result["instance_id"]]


def test_stale_runners_of_finished_runs_are_deleted(
    project: Path, monkeypatch: pytest.MonkeyPatch, fake_github: FakeGitHub
) -> None:
    monkeypatch.setenv("GITHUB_API_URL", fake_github.base_url)
    monkeypatch.setenv("GPULINE_GITHUB_TOKEN", "t")
    monkeypatch.setenv("GITHUB_REPOSITORY", "octo/models")
    ctx = context(project)
    done, running = ctx.ensure_run(), Context(config_path=project, tier="nightly").ensure_run()
    ctx.ledger.update_run(done.run_id, lambda r: setattr(r, "status", "succeeded"))
    gh = github.client(throttle=False)
    for record in (done, running):
        github.create_jit_runner("octo/models", f"gpuline-{record.run_id}", [f"gpuline-{record.run_id}"], gh=gh)
    github.create_jit_runner("octo/models", "someone-elses-runner", ["gpu"], gh=gh)
    actions = reap(ctx, LOCAL, NO_GRACE, dry_run=False)
    assert [(a.kind, a.target, a.done) for a in actions] == [("delete-runner", f"gpuline-{done.run_id}", True)]
    names = {r["name"] for r in fake_github.runners["octo/models"].values()}
    assert names == {f"gpuline-{running.run_id}", "someone-elses-runner"}
