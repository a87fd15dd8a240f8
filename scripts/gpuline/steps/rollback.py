"""rollback: one step back to the version a stage held before its last promotion."""

from __future__ import annotations

import argparse

from gpuline.context import Context
from gpuline.errors import InputError
from gpuline.results import RollbackResult


def run(ctx: Context, args: argparse.Namespace) -> RollbackResult:
    model = args.model
    if not model:
        try:
            model = ctx.base_spec.model.name
        except InputError:
            raise InputError("no model given", hint="pass --model NAME (or run next to a gpuline.yml)") from None
    stage = args.stage or "production"
    change = ctx.registry.rollback(model, stage)
    return RollbackResult(model=model, stage=stage, version=change.version, replaced=change.previous)
