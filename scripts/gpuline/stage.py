"""A step's place in the run record: started/finished/failed events, and where a failure stopped it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from gpuline.context import Context
from gpuline.errors import GpulineError, RefusedError
from gpuline.lease.holder import current
from gpuline.providers.testhooks import pause_at
from gpuline.runs import RunRecord, RunStatus


@contextmanager
def recorded(ctx: Context, step: str) -> Iterator[None]:
    """Append ``<step>.started`` / ``.finished`` / ``.failed`` events and keep ``stage`` current.

    The start names who holds the run from now on (as a lease does), so a run whose holder died
    before it ever leased a machine is still known to be abandoned, and closed by the reaper."""
    ctx.refuse_closed()  # before anything is written: a closed run keeps the record it was closed with
    ctx.event(f"{step}.started", holder=current())

    def start(r: RunRecord) -> None:
        # A step run again after a failure (a retried job, a resumed train) supersedes that failure.
        if r.times.released is None:
            r.status, r.error = "running", None

    ctx.ledger.update_run(ctx.run_id or "", start)
    try:
        pause_at(f"in:{step}")
        yield
    except GpulineError as exc:
        mark_failed(ctx, step, exc)
        raise
    except BaseException as exc:
        mark_failed(ctx, step, exc)
        raise
    ctx.event(f"{step}.finished")

    def advance(r: RunRecord) -> None:
        r.stage = step

    ctx.ledger.update_run(ctx.run_id or "", advance)


def mark_failed(ctx: Context, step: str, exc: BaseException) -> None:
    message = exc.one_line() if isinstance(exc, GpulineError) else f"{type(exc).__name__}: {exc}"
    status: RunStatus = "refused" if isinstance(exc, RefusedError) else "failed"
    ctx.event(f"{step}.failed", error=message)

    def fail(r: RunRecord) -> None:
        r.status = status
        r.stage = step
        r.error = message

    ctx.ledger.update_run(ctx.run_id or "", fail)
