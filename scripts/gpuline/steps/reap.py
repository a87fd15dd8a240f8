"""reap: reconcile what providers hold against the run records, and release what leaked.

A machine is reaped when its TTL has passed, when its run is finished (or its lease released), or
when its run was *abandoned*: the run's holder, the ``gpuline run`` process or the workflow run
that would have torn it down, is gone. A machine younger than the boot grace period is left alone,
since its run may not have recorded it yet, unless its holder is a process of this host that is
certainly dead (then nothing will ever record it). A machine whose run this ledger does not know is
left to its TTL: it may belong to another ledger.

Then the ledger side: leases and runs left open by a dead holder are closed (the run is settled at
what it cost, its quota reservation returned), leased or not (a run killed before provisioning
holds a reservation and no lease), holds of closed runs that teardown could not settle are settled,
reservations past their TTL are released, and stale single-use GitHub runners of finished runs are
deleted when a token is at hand. Each action is on its own: one that fails (a full disk) is reported
and the rest still run; the command then exits 3 with one line. ``--dry-run`` prints the plan and
changes nothing.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from functools import partial

from gpuline import console, gha
from gpuline.context import Context
from gpuline.decisions import quota
from gpuline.errors import GpulineError, InfraError, InputError, clip, clip_repr
from gpuline.inputs import runner_scope
from gpuline.lease.close import close_open_run, close_run, forget_lease
from gpuline.lease.holder import dead_here, holder_gone
from gpuline.lease.machines import open_masked
from gpuline.lease.sweep import Sweep, find_run, sweep_targets
from gpuline.providers.base import Machine, Provider
from gpuline.render.markdown import key_value_table
from gpuline.results import DataResult
from gpuline.runs import LeaseRecord, Ledger, RunRecord, utcnow
from gpuline.spec import parse_duration

__all__ = ["Action", "Sweep", "judge", "reap", "run", "sweep_targets"]

FINISHED = ("succeeded", "failed", "refused")
# Runs without a lease are looked at among this many of the newest (and every run holding quota).
RECENT_RUNS = 1000


@dataclass
class Action:
    # "terminate" | "keep" | "close-run" | "release-lease" | "release-reservation" | "delete-runner" | "error"
    kind: str
    target: str
    reason: str
    provider: str = ""
    run_id: str = ""
    done: bool = False
    failed: str = ""  # why the change could not be made (it is still to do)


@dataclass
class Plan:
    leases: dict[str, LeaseRecord] = field(default_factory=dict)
    actions: list[Action] = field(default_factory=list)
    kept_runs: set[str] = field(default_factory=set)
    seen_leases: set[str] = field(default_factory=set)

    def add(self, action: Action) -> Action:
        self.actions.append(action)
        return action


def _do(action: Action, change: Callable[[], object]) -> None:
    """Make one change; a failure (a full disk under the ledger, a provider error) is kept on the
    action, so the others still run and the command can say what is left."""
    try:
        action.done = bool(change())
    except (GpulineError, OSError) as exc:
        error = exc if isinstance(exc, GpulineError) else console.os_error(exc)
        action.failed = clip(error.message, 300)
        action.reason += f"; failed: {clip(error.one_line(), 400)}"


def grace_of(text: str) -> timedelta:
    """--grace (or GPULINE_BOOT_GRACE) as a duration; anything else is an input error, not a crash."""
    try:
        return timedelta(seconds=parse_duration(text))
    except ValueError as exc:
        raise InputError(
            f"--grace {clip_repr(text, 40)} is not a duration: {exc}",
            hint="pass a duration such as --grace 10m or --grace 90s (GPULINE_BOOT_GRACE in the action)",
        ) from None


def run(ctx: Context, args: argparse.Namespace) -> DataResult:
    grace = grace_of(args.grace)
    sweeps = sweep_targets(ctx, args.provider)
    actions = reap(ctx, sweeps, grace, dry_run=args.dry_run)
    for a in actions:
        state = "would" if args.dry_run and a.kind not in ("keep", "error") else ("did" if a.done else "-")
        gha.info(f"{state:5} {a.kind:20} {a.target:40} {a.reason}")
    if not actions:
        gha.info("nothing to reap")
    changed = [a for a in actions if a.kind not in ("keep", "error")]
    rows = [(f"{a.kind} `{a.target}`", ("planned: " if args.dry_run else "") + a.reason) for a in actions]
    title = "### gpuline reap" + (" (dry run)" if args.dry_run else "")
    body = {"dry_run": args.dry_run, "swept": [s.provider for s in sweeps], "actions": [asdict(a) for a in actions]}
    result = DataResult(
        "reap",
        body,
        markdown=title + "\n\n" + (key_value_table(rows, ("action", "why")) if rows else "Nothing to reap."),
        output_values={
            "terminated": sum(1 for a in actions if a.kind == "terminate" and a.done),
            "planned": len(changed),
            "errors": sum(1 for a in actions if a.kind == "error" or a.failed),
        },
    )
    failed = [a for a in actions if a.failed]
    if failed:
        raise InfraError(
            f"reap could not finish {len(failed)} of its changes, first {failed[0].kind} {failed[0].target}: "
            f"{failed[0].failed}",
            hint="fix that (free disk space, check the provider) and rerun `gpuline reap`: what it could not "
            "change is still held, the rest is done",
        ).with_result(result)
    return result


# ---------------------------------------------------------------- the reconciliation


def reap(
    ctx: Context, sweeps: list[Sweep], grace: timedelta, *, dry_run: bool, now: datetime | None = None
) -> list[Action]:
    now = now or utcnow()
    plan = Plan(leases={lease.lease_id: lease for lease in ctx.ledger.leases()})
    swept: set[str] = set()
    seen: set[tuple[str, str]] = set()
    for sweep in sweeps:
        provider = _open(ctx, sweep, plan)
        if provider is None:
            continue
        try:
            machines = provider.list_owned()
        except GpulineError as exc:
            plan.add(Action("error", sweep.provider, f"cannot list machines: {exc.one_line()}", sweep.provider))
            continue
        swept.add(sweep.provider)
        for machine in machines:
            if (sweep.provider, machine.instance_id) in seen:
                continue
            seen.add((sweep.provider, machine.instance_id))
            _reap_machine(ctx, plan, provider, sweep.provider, machine, grace, now, dry_run)
    _close_abandoned(ctx, plan, swept, now, dry_run)
    _close_leaseless(ctx, plan, now, dry_run)
    _release_reservations(ctx, plan, now, dry_run)
    _delete_stale_runners(ctx, plan, dry_run)
    return plan.actions


def _open(ctx: Context, sweep: Sweep, plan: Plan) -> Provider | None:
    try:
        return open_masked(sweep.provider, ctx.project_dir, sweep.options)
    except GpulineError as exc:
        plan.add(Action("error", sweep.provider, f"cannot open the provider: {exc.one_line()}", sweep.provider))
        return None


def _reap_machine(
    ctx: Context,
    plan: Plan,
    provider: Provider,
    name: str,
    machine: Machine,
    grace: timedelta,
    now: datetime,
    dry_run: bool,
) -> None:
    action = judge(ctx.ledger, machine, grace, now, plan.leases)
    action.provider = name
    if machine.lease_id:
        plan.seen_leases.add(machine.lease_id)
    if action.kind == "keep":
        if action.run_id:
            plan.kept_runs.add(action.run_id)
        if dry_run:
            plan.add(action)
        return
    plan.add(action)
    if dry_run:
        return
    _do(action, partial(provider.release, machine.instance_id))
    if action.failed:
        if action.run_id:
            plan.kept_runs.add(action.run_id)
        return
    lease = plan.leases.get(machine.lease_id or "")
    if lease is not None and lease.released_at is None:
        # The machine is gone; its run ends here too (lease, cost, quota), as teardown would have.
        closing = Action("close-run", lease.run_id, action.reason, name, lease.run_id)
        _do(closing, partial(close_run, ctx.ledger, ctx.project_dir, lease, now, action.reason))
        if closing.failed:
            plan.add(closing)
    else:
        forget_lease(ctx.ledger, machine.lease_id, now)


def judge(
    ledger: Ledger,
    machine: Machine,
    grace: timedelta,
    now: datetime,
    leases: dict[str, LeaseRecord] | None = None,
) -> Action:
    """What to do with one machine that carries gpuline tags."""
    target = machine.instance_id
    if leases is None:
        leases = {lease.lease_id: lease for lease in ledger.leases()}
    lease = leases.get(machine.lease_id or "")
    run_id = machine.run_id or (lease.run_id if lease else None)
    if machine.launched_at is not None and now - machine.launched_at < grace:
        # A holder process of this host that is dead will never record the machine: no need to wait.
        dead = dead_here(ledger, run_id) if run_id and lease is not None else None
        if dead is None:
            return Action(
                "keep", target, f"inside the boot grace period ({int(grace.total_seconds())}s)", run_id=run_id or ""
            )
        return Action("terminate", target, f"run {run_id} was abandoned: {dead}", run_id=run_id or "")
    expires = machine.expires_at
    if expires is not None and expires <= now:
        return Action("terminate", target, f"past its TTL ({expires.isoformat()})", run_id=run_id or "")
    if run_id is None:
        if machine.lease_id is None:
            return Action("terminate", target, "carries gpuline tags but no run or lease id")
        return Action("keep", target, f"lease {machine.lease_id} is not in this ledger; left to its TTL")
    record = find_run(ledger, run_id)
    if record is None:
        return Action("keep", target, f"run {run_id} is not in this ledger; left to its TTL", run_id=run_id)
    if record.times.released is not None or record.status in FINISHED:
        return Action("terminate", target, f"run {run_id} is {record.status} but the machine still runs", run_id=run_id)
    if lease is not None and lease.released_at is not None:
        return Action("terminate", target, f"its lease {lease.lease_id} was released", run_id=run_id)
    gone = holder_gone(ledger, run_id)
    if gone:
        return Action("terminate", target, f"run {run_id} was abandoned: {gone}", run_id=run_id)
    return Action("keep", target, f"run {run_id} is {record.status}", run_id=run_id)


def _close_abandoned(ctx: Context, plan: Plan, swept: set[str], now: datetime, dry_run: bool) -> None:
    """Leases still open whose holder is gone or whose TTL passed: close them, and their runs."""
    for lease in ctx.ledger.leases(active_only=True):
        if lease.run_id in plan.kept_runs:
            continue  # a machine of this run is still starting: not now
        expired = lease.expires_at <= now
        gone = holder_gone(ctx.ledger, lease.run_id)
        if not expired and not gone:
            continue
        if lease.provider not in swept and lease.lease_id not in plan.seen_leases:
            # Its machines were not looked at; closing the lease could hide a running machine.
            plan.add(
                Action(
                    "keep",
                    lease.lease_id,
                    f"{'expired' if expired else 'abandoned'} but provider {lease.provider} was not swept",
                    lease.provider,
                    lease.run_id,
                )
            )
            continue
        reason = f"its holder is gone: {gone}" if gone else f"past its TTL ({lease.expires_at.isoformat()})"
        action = plan.add(Action("close-run", lease.run_id, reason, lease.provider, lease.run_id))
        if not dry_run:
            _do(action, partial(close_run, ctx.ledger, ctx.project_dir, lease, now, reason))


def _close_leaseless(ctx: Context, plan: Plan, now: datetime, dry_run: bool) -> None:
    """Runs still open with no open lease whose holder is gone (killed before provisioning, or a
    workflow cancelled between cost-estimate and provision): closed, their reservations returned."""
    held = {r.run_id for r in ctx.ledger.reservations(state="held")}
    runs = {r.run_id: r for r in ctx.ledger.list_runs(limit=RECENT_RUNS)}
    for run_id in sorted(held - runs.keys()):
        found = find_run(ctx.ledger, run_id)
        if found is not None:
            runs[run_id] = found
    leased = {lease.run_id for lease in ctx.ledger.leases(active_only=True)}
    for record in runs.values():
        if record.times.released is not None or record.run_id in leased or record.run_id in plan.kept_runs:
            continue
        gone = holder_gone(ctx.ledger, record.run_id)
        if gone is None:
            continue
        reason = f"its holder is gone: {gone}"
        action = plan.add(Action("close-run", record.run_id, reason, record.provider, record.run_id))
        if not dry_run:
            _do(action, partial(close_open_run, ctx.ledger, ctx.project_dir, record, now, reason))


def _release_reservations(ctx: Context, plan: Plan, now: datetime, dry_run: bool) -> None:
    for reservation in ctx.ledger.reservations(state="held"):
        record = find_run(ctx.ledger, reservation.run_id)
        if record is not None and record.times.released is not None:
            # Its run is closed, but its teardown could not settle the hold (a full disk, say).
            action = plan.add(
                Action("settle-reservation", reservation.run_id, "its run is closed", run_id=reservation.run_id)
            )
            if not dry_run:
                _do(action, partial(_settled, ctx.ledger, record))
        elif reservation.expires_at <= now and reservation.run_id not in plan.kept_runs:
            action = plan.add(
                Action(
                    "release-reservation",
                    reservation.run_id,
                    "its TTL passed without a settle",
                    run_id=reservation.run_id,
                )
            )
            if not dry_run:
                _do(action, partial(ctx.ledger.release, reservation.run_id))


def _settled(ledger: Ledger, record: RunRecord) -> bool:
    return quota.settle(ledger, record) not in ("none held", "no reservation")


# ---------------------------------------------------------------- GitHub runners


def _delete_stale_runners(ctx: Context, plan: Plan, dry_run: bool) -> None:
    """Single-use runners of finished runs that never picked up their job (GitHub would keep them)."""
    from gpuline import github

    scope = runner_scope(ctx.inputs)
    if not scope or not github.token_from_env():
        return
    try:
        runners = github.list_runners(scope)
    except GpulineError as exc:
        plan.add(Action("error", f"runners of {scope}", f"cannot list runners: {exc.one_line()}"))
        return
    for runner in runners:
        if not runner.name.startswith("gpuline-run-") or runner.busy:
            continue
        run_id = runner.name.removeprefix("gpuline-")
        record = find_run(ctx.ledger, run_id)
        if record is None or run_id in plan.kept_runs:
            continue
        if record.times.released is None and record.status not in FINISHED:
            continue
        action = plan.add(Action("delete-runner", runner.name, f"run {run_id} is {record.status}", run_id=run_id))
        if not dry_run:
            _do(action, partial(github.delete_runner, scope, runner.runner_id))
