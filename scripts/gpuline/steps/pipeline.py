"""run: a whole tier in one process, in the same order and with the same steps as the reusable workflows.

pr-fast: preflight + cost-estimate. nightly: everything, promoting to staging. release: everything,
promoting to production, then the check after promotion (verify) that rolls production back when it
fails. Teardown runs whatever happened before it, as ``if: always()`` does in CI.
Each step's outputs and summary are written as it finishes, as separate workflow steps would.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from gpuline import gha
from gpuline.context import Context
from gpuline.errors import GpulineError, InputError, RefusedError
from gpuline.providers import PROVIDERS
from gpuline.render import summary
from gpuline.results import PipelineResult, StepResult
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


def run(ctx: Context, args: argparse.Namespace) -> PipelineResult:
    if ctx.tier != "pr-fast":
        _trains_here(args.provider or ctx.spec.resources.provider)
    done: list[StepResult] = []
    failure: BaseException | None = None
    try:
        for name, step in plan(ctx.tier, args):
            with gha.group(f"gpuline {name}"):
                done.append(_written(step(ctx), args))
    except GpulineError as exc:
        failure = exc
        if isinstance(exc.result, StepResult):
            # What the failing step produced (a denied estimate, a failed gate) is shown, then the error.
            done.append(_written(exc.result, args))
            exc.result = None
    except BaseException as exc:  # teardown must run on any failure, Ctrl-C included
        failure = exc
    finally:
        if ctx.run_id:
            with gha.group("gpuline teardown"):
                done.append(_written(teardown(ctx), args))
    if failure is not None:
        raise failure
    result = PipelineResult(tier=ctx.tier, run_id=ctx.run_id, steps=done)
    promoted = result.promoted
    gha.info(
        f"{ctx.tier} finished: run {ctx.run_id}"
        + (f", {promoted.model} v{promoted.version} is {promoted.stage}" if promoted else "")
    )
    return result


def _trains_here(provider: str) -> None:
    """`gpuline run` trains in this process, on this machine: a machine bought elsewhere would train
    nothing and be paid for all the same, so only the local provider runs here."""
    name = PROVIDERS.canonical(provider)
    if name != "local":
        raise InputError(
            f"`gpuline run` trains on this machine, so with provider {name} it would pay for a machine "
            "that trains nothing",
            hint="run the nightly or release workflow (its train job runs on the machine provision starts), "
            "or pass --provider local",
        )


def _written(result: StepResult, args: argparse.Namespace) -> StepResult:
    summary.write(result, json_mode=args.json)
    return result
