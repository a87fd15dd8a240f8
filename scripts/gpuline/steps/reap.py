"""reap: reconcile what providers hold against the run records, and release what leaked.

A machine is reaped when its run is finished (lease released) or its TTL has passed; a machine
younger than the boot grace period is left alone, since its run may not have recorded it yet.
Reservations whose TTL passed are released too.
"""

from __future__ import annotations

import argparse
import contextlib
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from gpuline import gha
from gpuline.context import Context
from gpuline.errors import GpulineError, NotFoundError
from gpuline.providers import open_provider
from gpuline.providers.base import Machine
from gpuline.runs import Ledger, utcnow
from gpuline.spec import parse_duration


@dataclass
class Action:
    kind: str  # "terminate" | "release-reservation" | "release-lease" | "keep"
    target: str
    reason: str
    provider: str = ""
    done: bool = False


def run(args: argparse.Namespace) -> dict[str, Any]:
    ctx = Context.from_args(args)
    grace = timedelta(seconds=parse_duration(args.grace))
    providers = args.provider or sorted({lease.provider for lease in ctx.ledger.leases()} | {"local"})
    actions = reap(ctx, providers, grace, dry_run=args.dry_run)
    for a in actions:
        state = "would" if args.dry_run else ("did" if a.done else "skip")
        gha.info(f"{state:5} {a.kind:20} {a.target:40} {a.reason}")
    if not actions:
        gha.info("nothing to reap")
    return {"dry_run": args.dry_run, "actions": [asdict(a) for a in actions]}


def reap(
    ctx: Context, providers: list[str], grace: timedelta, *, dry_run: bool, now: datetime | None = None
) -> list[Action]:
    now = now or utcnow()
    actions: list[Action] = []
    for name in providers:
        provider = open_provider(name, ctx.project_dir, {})
        for machine in provider.list_owned():
            action = judge(ctx.ledger, machine, grace, now)
            action.provider = name
            if action.kind == "terminate" and not dry_run:
                action.done = provider.release(machine.instance_id)
                _close_lease(ctx.ledger, machine, now)
            if action.kind != "keep" or dry_run:
                actions.append(action)
    for reservation in ctx.ledger.reservations(state="held"):
        if reservation.expires_at <= now:
            action = Action("release-reservation", reservation.run_id, "its TTL passed without a settle")
            if not dry_run:
                action.done = ctx.ledger.release(reservation.run_id)
            actions.append(action)
    for lease in ctx.ledger.leases(active_only=True):
        if lease.expires_at <= now and lease.provider not in providers:
            actions.append(Action("release-lease", lease.lease_id, f"expired; provider {lease.provider} not swept"))
    return actions


def judge(ledger: Ledger, machine: Machine, grace: timedelta, now: datetime) -> Action:
    target = machine.instance_id
    if machine.launched_at is not None and now - machine.launched_at < grace:
        return Action("keep", target, f"inside the boot grace period ({int(grace.total_seconds())}s)")
    expires = machine.expires_at
    if expires is not None and expires <= now:
        return Action("terminate", target, f"past its TTL ({expires.isoformat()})")
    run_id = machine.run_id
    if run_id is None:
        return Action("terminate", target, "carries gpuline tags but no run id")
    try:
        record = ledger.get_run(run_id)
    except NotFoundError:
        return Action("terminate", target, f"run {run_id} is not in the ledger")
    if record.times.released is not None or record.status in ("succeeded", "failed", "refused"):
        return Action("terminate", target, f"run {run_id} is {record.status} but the machine still runs")
    return Action("keep", target, f"run {run_id} is {record.status}")


def _close_lease(ledger: Ledger, machine: Machine, now: datetime) -> None:
    if machine.lease_id:
        # A lease the ledger never saw (a crash before it was recorded): the machine is gone, that is enough.
        with contextlib.suppress(GpulineError):
            ledger.release_lease(machine.lease_id, now)
