"""teardown: always runs. Releases the machine and the lease, settles the real cost, closes the run.

Idempotent: every action checks whether it already happened, so running it twice (or after the
reaper) changes nothing the second time.
"""

from __future__ import annotations

import argparse

from gpuline.context import Context
from gpuline.decisions import quota
from gpuline.lease import runner
from gpuline.lease.close import close_record, release_machine
from gpuline.render.cost_comment import actual_section
from gpuline.results import TeardownResult
from gpuline.runs import utcnow


def run(ctx: Context, args: argparse.Namespace) -> TeardownResult:
    return teardown(ctx)


def teardown(ctx: Context) -> TeardownResult:
    record = ctx.require_run()
    now = utcnow()
    first_time = record.times.released is None
    machine_released = release_machine(ctx.project_dir, record)
    lease_released = ctx.ledger.release_lease(record.lease_id, now) if record.lease_id else False
    # A runner that never picked up its job would stay registered; one that ran has removed itself.
    runners_deleted = runner.unregister(ctx.ledger, record.run_id)
    if first_time:
        record = close_record(ctx.ledger, ctx.project_dir, record, now)
    settled = quota.settle(ctx.ledger, record)
    ctx.event(
        "teardown",
        machine_released=machine_released,
        lease_released=lease_released,
        runners_deleted=runners_deleted,
        quota=settled,
        first_time=first_time,
    )
    # The PR comment's actual-cost section, built from the run record: the teardown job may run on a
    # fresh runner where nothing of the job that estimated is on disk (shared backends, no carried state).
    comment_path = ctx.workdir(record.run_id) / "actual-comment.md"
    comment_path.write_text(actual_section(record), encoding="utf-8")
    return TeardownResult(
        record=record,
        machine_released=machine_released,
        lease_released=lease_released,
        runners_deleted=runners_deleted,
        quota=settled,
        first_time=first_time,
        comment_path=str(comment_path),
    )
