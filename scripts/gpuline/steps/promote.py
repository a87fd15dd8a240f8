"""promote: register the run's model with its lineage and point a stage at it (the old one is kept)."""

from __future__ import annotations

import argparse

from gpuline.context import Context
from gpuline.errors import RefusedError
from gpuline.results import PromoteResult
from gpuline.runs import RunRecord, model_prefix
from gpuline.stage import recorded

DEFAULT_STAGE = {"pr-fast": "staging", "nightly": "staging", "release": "production"}


def run(ctx: Context, args: argparse.Namespace) -> PromoteResult:
    return promote(ctx, stage=args.stage)


def promote(ctx: Context, stage: str | None = None) -> PromoteResult:
    record = ctx.require_run()
    ctx.use_tier(record.tier)
    spec = ctx.spec
    stage = stage or DEFAULT_STAGE.get(record.tier, "staging")
    with recorded(ctx, "promote"):
        if spec.eval.gates and (not record.gates or not all(g.passed for g in record.gates)):
            raise RefusedError(
                f"run {record.run_id} has not passed its eval gates",
                hint="run `gpuline eval-gate` first; only a run whose gates pass can be promoted",
            )
        lineage = {
            **record.lineage.model_dump(),
            "run_id": record.run_id,
            "tier": record.tier,
            "checkpoints": [c.model_dump() for c in record.checkpoints[-1:]],
        }
        version = ctx.registry.register(
            spec.model.name,
            ctx.storage.uri_for(model_prefix(record.run_id)),
            record.run_id,
            record.metrics,
            lineage,
        )
        change = ctx.registry.promote(spec.model.name, version.version, stage, reason=f"run {record.run_id}")

        def keep(r: RunRecord) -> None:
            r.promoted_version, r.promoted_stage = version.version, stage

        ctx.ledger.update_run(record.run_id, keep)
        ctx.event(
            "model.promoted",
            model=spec.model.name,
            version=version.version,
            stage=stage,
            previous=change.previous,
        )
    return PromoteResult(
        run_id=record.run_id,
        model=spec.model.name,
        version=version.version,
        stage=stage,
        previous_version=change.previous,
    )
