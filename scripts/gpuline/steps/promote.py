"""promote: register the run's model with its lineage and point a stage at it (the old one is kept).

The stage change is audited in the registry's history: who (``GITHUB_ACTOR`` or the local user),
when, why (the gate verdicts), the run and the workflow run.
"""

from __future__ import annotations

import argparse
from typing import Any

from gpuline.context import Context
from gpuline.errors import RefusedError
from gpuline.registry import audit
from gpuline.results import PromoteResult
from gpuline.runs import RunRecord, model_prefix
from gpuline.spec import Spec
from gpuline.stage import recorded

DEFAULT_STAGE = {"pr-fast": "staging", "nightly": "staging", "release": "production"}


def run(ctx: Context, args: argparse.Namespace) -> PromoteResult:
    return promote(ctx, stage=args.stage)


def promote(ctx: Context, stage: str | None = None) -> PromoteResult:
    record = ctx.require_run()
    spec = ctx.spec
    stage = stage or DEFAULT_STAGE.get(record.tier, "staging")
    with recorded(ctx, "promote"):
        if spec.eval.gates and (not record.gates or not all(g.passed for g in record.gates)):
            raise RefusedError(
                f"run {record.run_id} has not passed its eval gates",
                hint="run `gpuline eval-gate` first; only a run whose gates pass can be promoted",
            )
        registry = ctx.registry
        version = registry.register(
            spec.model.name,
            ctx.storage.uri_for(model_prefix(record.run_id)),
            record.run_id,
            record.metrics,
            _lineage(record),
            params=_params(spec, record),
        )
        why = audit.for_promotion(record.run_id, record.gates, record.lineage.workflow_run_url)
        change = registry.promote(spec.model.name, version.version, stage, audit=why)

        def keep(r: RunRecord) -> None:
            r.promoted_version, r.promoted_stage = version.version, stage

        ctx.ledger.update_run(record.run_id, keep)
        ctx.event(
            "model.promoted",
            model=spec.model.name,
            version=version.version,
            stage=stage,
            previous=change.previous,
            actor=change.actor,
            reason=change.reason,
            workflow_run_url=change.workflow_run_url,
        )
    return PromoteResult(
        run_id=record.run_id,
        model=spec.model.name,
        version=version.version,
        stage=stage,
        previous_version=change.previous,
        actor=change.actor,
        reason=change.reason,
        at=change.at.isoformat(timespec="seconds"),
        workflow_run_url=change.workflow_run_url,
    )


def _lineage(record: RunRecord) -> dict[str, Any]:
    return {
        **record.lineage.model_dump(),
        "run_id": record.run_id,
        "tier": record.tier,
        "checkpoints": [c.model_dump() for c in record.checkpoints[-1:]],
    }


def _params(spec: Spec, record: RunRecord) -> dict[str, Any]:
    """What an experiment tracker shows as the version's params: hyperparameters and the config hash."""
    return {**spec.hyperparameters, "config_hash": record.lineage.config_hash}
