"""rollback: one step back to the version a stage held before its last promotion."""

from __future__ import annotations

import argparse
from typing import Any

from gpuline import gha
from gpuline.context import Context
from gpuline.errors import InputError
from gpuline.steps.common import outputs


def run(args: argparse.Namespace) -> dict[str, Any]:
    ctx = Context.from_args(args)
    model = args.model
    if not model:
        try:
            model = ctx.base_spec.model.name
        except InputError:
            raise InputError("no model given", hint="pass --model NAME (or run next to a gpuline.yml)") from None
    stage = args.stage or "production"
    change = ctx.registry.rollback(model, stage)
    gha.info(f"{model} {stage}: v{change.previous} -> v{change.version} (rolled back)")
    gha.append_summary(
        f"### gpuline rollback\n\n**{model}** {stage} is back to **v{change.version}** (was v{change.previous}).\n"
    )
    outputs({"version": change.version, "stage": stage})
    return {"model": model, "stage": stage, "version": change.version, "replaced": change.previous}
