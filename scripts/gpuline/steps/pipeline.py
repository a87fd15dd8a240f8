"""run: a whole tier in one process, in the same order and with the same steps as the reusable workflows.

pr-fast: preflight + cost-estimate. nightly: everything, promoting to staging. release: everything,
promoting to production. Teardown runs whatever happened before it, as ``if: always()`` does in CI.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from gpuline import gha
from gpuline.context import Context
from gpuline.errors import GpulineError
from gpuline.steps.cost_estimate import cost_estimate
from gpuline.steps.eval_gate import eval_gate
from gpuline.steps.preflight import preflight
from gpuline.steps.promote import promote
from gpuline.steps.provision import provision
from gpuline.steps.teardown import teardown
from gpuline.steps.train import train

Step = Callable[[Context], dict[str, Any]]


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
    ]


def run(args: argparse.Namespace) -> dict[str, Any]:
    ctx = Context.from_args(args, default_tier="nightly")
    results: dict[str, Any] = {"tier": ctx.tier}
    failure: GpulineError | BaseException | None = None
    try:
        for name, step in plan(ctx.tier, args):
            with gha.group(f"gpuline {name}"):
                results[name] = step(ctx)
    except BaseException as exc:  # teardown must run on any failure, Ctrl-C included
        failure = exc
    finally:
        if ctx.run_id:
            with gha.group("gpuline teardown"):
                results["teardown"] = teardown(ctx)
    if failure is not None:
        raise failure
    results["run_id"] = ctx.run_id
    if "promote" in results:
        results["version"] = results["promote"]["version"]
        results["stage"] = results["promote"]["stage"]
    gha.info(
        f"{ctx.tier} finished: run {ctx.run_id}"
        + (
            f", {results['promote']['model']} v{results['version']} is {results['stage']}"
            if "version" in results
            else ""
        )
    )
    return results
