"""teardown: always runs. Releases the machine and the lease, settles the real cost, closes the run.

Idempotent: every action checks whether it already happened, so running it twice (or after the
reaper) changes nothing the second time.

Each release (the machine, the lease, the runner registration, the run record, the quota) is its own
attempt, retried a few times: a full disk under the ledger or a provider call that errors must not
keep the machine running because the lease could not be written, nor the reverse. What could not be
released is named in one error (exit 3); teardown again, or the reaper, finishes it.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from datetime import datetime
from typing import TypeVar

from gpuline import console
from gpuline.context import Context
from gpuline.decisions import quota
from gpuline.decisions.phases import PhaseEstimate, phases_from_json
from gpuline.errors import GpulineError, InfraError, clip
from gpuline.lease import runner
from gpuline.lease.close import close_record, closed_copy, release_machine
from gpuline.render.cost_comment import actual_section
from gpuline.results_lease import TeardownResult
from gpuline.runs import RunRecord, utcnow

T = TypeVar("T")

# Each release is tried this many times, waiting this long between tries: enough for a throttled or
# briefly failing API, short enough that a disk that stays full does not hold the job for minutes.
ATTEMPTS = 3
RETRY_WAIT_S = 0.5


def run(ctx: Context, args: argparse.Namespace) -> TeardownResult:
    return teardown(ctx)


class _Left:
    """What teardown could not do, by what it left (``machine i-1``), with the last error of each."""

    def __init__(self) -> None:
        self.errors: dict[str, str] = {}

    def attempt(self, what: str, action: Callable[[], T], otherwise: T) -> T:
        last: Exception | None = None
        for n in range(ATTEMPTS):
            try:
                return action()
            except Exception as exc:  # any failure of one release must leave the others to run
                last = exc
                if n + 1 < ATTEMPTS:
                    time.sleep(RETRY_WAIT_S)
        assert last is not None
        self.errors[what] = _line(last)
        return otherwise


def teardown(ctx: Context) -> TeardownResult:
    record = ctx.require_run()
    started = utcnow()
    first_time = record.times.released is None
    left = _Left()
    machine = f"machine {record.instance_id}" if record.instance_id else "machine"
    machine_released = left.attempt(machine, lambda: release_machine(ctx.project_dir, record), False)
    now = utcnow()  # the machine is released: the lease is paid until here (teardown's phase since started)
    lease_released = False
    if record.lease_id:
        lease_id = record.lease_id
        lease_released = left.attempt(f"lease {lease_id}", lambda: ctx.ledger.release_lease(lease_id, now), False)
    # A runner that never picked up its job would stay registered; one that ran has removed itself.
    runners_deleted = left.attempt(
        "runner registration", lambda: runner.unregister(ctx.ledger, record.run_id), list[str]()
    )
    if first_time:
        record = _close(ctx, left, record, now, started)
    settled = left.attempt("quota reservation", lambda: quota.settle(ctx.ledger, record), "still held")
    left.attempt(
        "teardown event",
        lambda: ctx.event(
            "teardown",
            machine_released=machine_released,
            lease_released=lease_released,
            runners_deleted=runners_deleted,
            quota=settled,
            first_time=first_time,
            left=left.errors,
        ),
        None,
    )
    # The PR comment's actual-cost section, built from the run record: the teardown job may run on a
    # fresh runner where nothing of the job that estimated is on disk (shared backends, no carried state).
    comment_path = ctx.workdir(record.run_id) / "actual-comment.md"
    body = actual_section(record, _estimated_phases(ctx, record.run_id))
    left.attempt("cost comment", lambda: comment_path.write_text(body, encoding="utf-8"), 0)
    result = TeardownResult(
        record=record,
        machine_released=machine_released,
        lease_released=lease_released,
        runners_deleted=runners_deleted,
        quota=settled,
        first_time=first_time,
        comment_path=str(comment_path),
    )
    if left.errors:
        # No result with it: its summary would say released what is still held.
        raise _left_behind(record, left)
    return result


def _close(ctx: Context, left: _Left, record: RunRecord, now: datetime, started: datetime) -> RunRecord:
    def close() -> RunRecord:
        return close_record(ctx.ledger, ctx.project_dir, record, now, teardown_from=started)

    closed = left.attempt("run record", close, None)
    if closed is not None:
        return closed

    # The record could not be written: settle the quota at the cost it would have recorded anyway.
    def copy() -> RunRecord:
        return closed_copy(ctx.ledger, ctx.project_dir, record, now, teardown_from=started)

    return left.attempt("run cost", copy, record)


def _line(exc: Exception) -> str:
    if isinstance(exc, OSError):
        return console.os_error(exc).message
    return exc.message if isinstance(exc, GpulineError) else f"{type(exc).__name__}: {exc}"


def _left_behind(record: RunRecord, left: _Left) -> InfraError:
    what = ", ".join(left.errors)
    first = clip(next(iter(left.errors.values())), 200)
    return InfraError(
        f"teardown of run {record.run_id} left {what} ({first})",
        hint=f"fix that (free disk space, check the provider) and rerun `gpuline teardown --run-id {record.run_id}`; "
        "`gpuline reap` also releases what is left",
    )


def _estimated_phases(ctx: Context, run_id: str) -> list[PhaseEstimate]:
    """The phases of the run's latest estimate, as cost-estimate kept it in the ledger's events."""
    for event in reversed(ctx.ledger.events(run_id)):
        if event.kind == "cost.estimated":
            duration = (event.data.get("estimate") or {}).get("duration") or {}
            return phases_from_json(duration.get("phases"))
    return []
