"""run: a whole tier in one process, in the same order and with the same steps as the reusable workflows.

pr-fast: preflight + cost-estimate. nightly: everything, promoting to staging. release: everything,
promoting to production, then the check after promotion (verify) that rolls production back when it
fails. Teardown runs whatever happened before it, as ``if: always()`` does in CI.
Each step's outputs and summary are written as it finishes, as separate workflow steps would.

SIGTERM and SIGINT (a cancelled job, Ctrl-C) become an exception where the process is, in any step or
between two, so teardown runs before the process exits and the run is marked failed where it
stopped; during training the supervisor takes them first and stops the trainer with a checkpoint.
From the first step on this process is the run's holder, so if it is killed outright (SIGKILL) the
reaper knows at once that nothing will tear the run down, leased or not.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Any

from gpuline import gha
from gpuline.context import Context
from gpuline.errors import GpulineError, InfraError, InputError, RefusedError
from gpuline.lease.holder import bound_to_this_process
from gpuline.providers import PROVIDERS
from gpuline.providers.testhooks import pause_at
from gpuline.render import summary
from gpuline.results import PipelineResult, StepResult
from gpuline.stage import mark_failed
from gpuline.steps.cost_estimate import cost_estimate
from gpuline.steps.eval_gate import eval_gate
from gpuline.steps.preflight import preflight
from gpuline.steps.promote import promote
from gpuline.steps.provision import provision
from gpuline.steps.rollback import roll_back
from gpuline.steps.teardown import teardown
from gpuline.steps.train import train
from gpuline.steps.verify import verify

Step = Callable[[Context], StepResult]


def plan(tier: str, args: argparse.Namespace) -> list[tuple[str, Step]]:
    labels = frozenset(x.strip() for x in (args.labels or "").split(",") if x.strip())
    steps: list[tuple[str, Step]] = [
        ("preflight", preflight),
        ("cost-estimate", lambda ctx: cost_estimate(ctx, labels=labels, base_ref=args.base_ref)),
    ]
    if tier == "pr-fast":
        return steps
    return [
        *steps,
        ("provision", lambda ctx: provision(ctx, provider_name=args.provider, process_bound=True)),
        ("train", train),
        ("eval-gate", eval_gate),
        ("promote", lambda ctx: promote(ctx, stage=args.stage)),
        *([("verify", lambda ctx: _verify_or_roll_back(ctx, args))] if tier == "release" else []),
    ]


def _verify_or_roll_back(ctx: Context, args: argparse.Namespace) -> StepResult:
    """The release tier's check after promotion; when it fails, the stage goes back (as the rollback job does)."""
    stage = args.stage or "production"
    try:
        return verify(ctx, stage=stage)
    except RefusedError as exc:
        if isinstance(exc.result, StepResult):
            _written(exc.result, args)
            exc.result = None
        with gha.group("gpuline rollback"):
            _written(roll_back(ctx, ctx.spec.model.name, stage, f"verify failed: {exc.message}"), args)
        raise


class Stopped(InfraError):
    """`gpuline run` was asked to stop (SIGTERM, SIGINT): raised where it was, so teardown still runs."""


@dataclass
class _Progress:
    step: str = ""  # the step running now
    last: str = ""  # the last step that finished
    stopping: bool = False  # a stop was raised, or teardown runs: a second signal must not cut it short

    def where(self) -> str:
        if self.step:
            return f"in {self.step}"
        return f"after {self.last}" if self.last else "before its first step"


@contextlib.contextmanager
def _stop_on_signals(progress: _Progress) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread can take signals (a test calling run from a thread)
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        if progress.stopping:
            return
        progress.stopping = True
        name = signal.Signals(signum).name
        raise Stopped(
            f"`gpuline run` was stopped by {name} {progress.where()}",
            hint="teardown released what the run held; start a new run, or resume training with "
            "`gpuline train --run-id`",
        )

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run(ctx: Context, args: argparse.Namespace) -> PipelineResult:
    if ctx.tier != "pr-fast":
        _trains_here(args.provider or ctx.spec.resources.provider, dict(ctx.spec.resources.options))
    done: list[StepResult] = []
    progress = _Progress()
    with bound_to_this_process(), _stop_on_signals(progress):
        failure = _steps(ctx, args, done, progress)
        progress.stopping = True  # teardown runs to its end whatever arrives now
        failure = _teardown(ctx, args, done, failure)
    if failure is not None:
        if isinstance(failure, GpulineError) and failure.result is None:
            # What the run did before it failed goes out with the error (--json: its id, verdicts, decision).
            failure.result = PipelineResult(tier=ctx.tier, run_id=ctx.run_id, steps=done)
        raise failure
    result = PipelineResult(tier=ctx.tier, run_id=ctx.run_id, steps=done)
    promoted = result.promoted
    gha.info(
        f"{ctx.tier} finished: run {ctx.run_id}"
        + (f", {promoted.model} v{promoted.version} is {promoted.stage}" if promoted else "")
    )
    return result


def _steps(ctx: Context, args: argparse.Namespace, done: list[StepResult], progress: _Progress) -> BaseException | None:
    """Run the tier's steps in order; the failure that stopped them, if any (teardown follows either way)."""
    steps = plan(ctx.tier, args)
    try:
        for name, step in steps:
            progress.step = name
            with gha.group(f"gpuline {name}"):
                result = step(ctx)
            progress.step, progress.last = "", name
            done.append(_written(result, args))
            pause_at(f"after:{name}")
    except GpulineError as exc:
        if isinstance(exc.result, StepResult):
            # What the failing step produced (a denied estimate, a failed gate) is shown, then the error.
            with contextlib.suppress(OSError):  # the disk that failed the step may fail its summary too
                done.append(_written(exc.result, args))
            exc.result = None
        if isinstance(exc, Stopped) and not progress.step and progress.last != steps[-1][0] and ctx.run_id:
            # Stopped between two steps: no step recorded the stop, so the run says it here (after the
            # last one the run's work is done, and teardown closes it as succeeded).
            with contextlib.suppress(Exception):
                mark_failed(ctx, progress.last, exc)
        return exc
    except BaseException as exc:  # teardown must run on any failure
        return exc
    return None


def _teardown(
    ctx: Context, args: argparse.Namespace, done: list[StepResult], failure: BaseException | None
) -> BaseException | None:
    """Teardown, whatever happened before; when it cannot release everything, its error says what is left."""
    if not ctx.run_id:
        return failure
    try:
        with gha.group("gpuline teardown"):
            done.append(_written(teardown(ctx), args))
    except GpulineError as exc:
        if isinstance(exc.result, StepResult):
            with contextlib.suppress(OSError):
                done.append(_written(exc.result, args))
            exc.result = None
        if failure is None:
            return exc
        before = failure.one_line() if isinstance(failure, GpulineError) else f"{type(failure).__name__}: {failure}"
        return InfraError(f"{before}; then {exc.message}", hint=exc.hint)
    return failure


def _trains_here(provider: str, options: dict[str, Any]) -> None:
    """`gpuline run` trains in this process, on this machine: a machine bought elsewhere would train
    nothing and be paid for all the same, so only the local provider runs here, and Kubernetes in
    train mode, where the cluster trains and this process follows the Job until it ends."""
    name = PROVIDERS.canonical(provider)
    if name == "kubernetes" and str(options.get("mode", "train")) == "train":
        return
    if name != "local":
        raise InputError(
            f"`gpuline run` trains on this machine, so with provider {name} it would pay for a machine "
            "that trains nothing",
            hint="run the nightly or release workflow (its train job runs on the machine provision starts), "
            "or pass --provider local, or use provider kubernetes in train mode (the cluster trains)",
        )


def _written(result: StepResult, args: argparse.Namespace) -> StepResult:
    summary.write(result, json_mode=args.json)
    return result
