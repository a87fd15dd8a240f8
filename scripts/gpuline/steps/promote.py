"""promote: register the run's model with its lineage and point a stage at it (the old one is kept).

The stage change is audited in the registry's history: who (``GITHUB_ACTOR`` or the local user),
when, why (the gate verdicts), the run and the workflow run.

Gate and promote are atomic with respect to the baseline: eval-gate records which version of the
baseline stage it compared with, and promoting into that stage is a compare-and-set on it, so of
several releases gated against the same version only the first moves the stage; the others are
refused and gated again against the version that replaced it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from gpuline import deploy, evaluation
from gpuline.context import Context
from gpuline.errors import GpulineError, RefusedError
from gpuline.registry import audit
from gpuline.registry.base import ANY, Expected, ModelRegistry, ModelVersion, StageChange, StaleBaseline
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
        expected = _expected(ctx, record, registry, stage)
        version = registry.register(
            spec.model.name,
            _portable(ctx, ctx.storage.uri_for(model_prefix(record.run_id))),
            record.run_id,
            record.metrics,
            _lineage(record),
            params=_params(spec, record),
        )
        why = audit.for_promotion(record.run_id, record.gates, record.lineage.workflow_run_url)
        try:
            change = registry.promote(spec.model.name, version.version, stage, audit=why, expected=expected)
        except StaleBaseline as moved:
            raise _regate(record, moved) from None

        def keep(r: RunRecord) -> None:
            r.promoted_version, r.promoted_stage = version.version, stage

        ctx.ledger.update_run(record.run_id, keep)
        _event(ctx, change)
        if deploy.applies(ctx, stage):
            _deploy_or_roll_back(ctx, version, stage)
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
        deployed=deploy.applies(ctx, stage),
    )


def _gated_baseline(ctx: Context, record: RunRecord) -> tuple[str, int | None] | None:
    """The baseline stage and the version of it the run's last eval-gate compared with (None: no
    record of it, as for a run gated before gpuline recorded it)."""
    for event in reversed(ctx.ledger.events(record.run_id)):
        if event.kind == "gates.evaluated":
            stage, version = event.data.get("baseline_stage"), event.data.get("baseline_version")
            if not isinstance(stage, str) or "baseline_version" not in event.data:
                return None
            return (stage, version) if version is None or isinstance(version, int) else None
    return None


def _expected(ctx: Context, record: RunRecord, registry: ModelRegistry, stage: str) -> Expected:
    """What ``stage`` must hold for this promotion to go ahead (ANY: anything).

    Into the baseline stage itself the check is the registry's compare-and-set; into another stage
    (nightly to staging, gated against production) the baseline is read once more here, since a
    verdict against a version that is gone says nothing about the one there now.
    """
    gated = _gated_baseline(ctx, record) if ctx.spec.eval.gates else None
    if gated is None:
        return ANY
    base_stage, base_version = gated
    held = registry.in_stage(ctx.spec.model.name, base_stage)
    # A retried promote finds its own version there: the first try landed, nothing is stale.
    if held is not None and held.run_id == record.run_id:
        return ANY
    current = held.version if held is not None else None
    if current != base_version:
        stale = StaleBaseline(ctx.spec.model.name, base_stage, None, base_version, current)
        raise _regate(record, stale)
    return base_version if base_stage == stage else ANY


def _regate(record: RunRecord, moved: StaleBaseline) -> RefusedError:
    """The refusal of a promotion whose baseline moved, saying how to gate this run again."""
    return RefusedError(
        moved.message,
        hint=f"gate run {record.run_id} again against it (`gpuline eval-gate --run-id {record.run_id}`), "
        f"then promote (`gpuline promote --run-id {record.run_id}`)",
    )


def _event(ctx: Context, change: StageChange) -> None:
    ctx.event(
        "model.promoted",
        model=change.model,
        version=change.version,
        stage=change.stage,
        previous=change.previous,
        actor=change.actor,
        reason=change.reason,
        workflow_run_url=change.workflow_run_url,
    )


def _deploy_or_roll_back(ctx: Context, version: ModelVersion, stage: str) -> None:
    """Run the deploy hook; when it fails, put the stage back where it was and fail the step."""
    try:
        deployment = deploy.run_hook(ctx, version, stage)
    except RefusedError as exc:
        why = audit.for_rollback(f"deploy failed: {exc.message}", run_id=ctx.run_id or "")
        try:
            back = ctx.registry.rollback(version.model, stage, audit=why)
        except GpulineError as held:
            raise RefusedError(
                f"deploy of {version.model} v{version.version} to {stage} failed ({exc.message}); "
                f"{stage} still holds it: {held.message}",
                hint="fix the deploy command and promote again",
            ) from None
        ctx.event(
            "model.rolled_back",
            model=version.model,
            stage=stage,
            version=back.version,
            replaced=back.previous,
            actor=back.actor,
            reason=back.reason,
        )
        raise RefusedError(
            f"deploy of {version.model} v{version.version} to {stage} failed ({exc.message}); "
            f"{stage} is back at v{back.version}",
            hint="fix the deploy command (see its output above) and promote again",
        ) from None
    ctx.event("model.deployed", model=version.model, version=version.version, stage=stage, deployment=deployment)


def _portable(ctx: Context, uri: str) -> str:
    """A ``file://`` URI inside the project as a relative one: the next job (a fresh workspace that
    restored the run state) finds the files at the same place beside its own gpuline.yml."""
    if not uri.startswith("file://"):
        return uri
    path = Path(uri.removeprefix("file://"))
    try:
        return "file://" + path.relative_to(ctx.project_dir.resolve()).as_posix()
    except ValueError:
        return uri  # outside the project: a shared folder every job reaches at the same path


def _lineage(record: RunRecord) -> dict[str, Any]:
    return {
        **record.lineage.model_dump(),
        "run_id": record.run_id,
        "tier": record.tier,
        "checkpoints": [c.model_dump() for c in record.checkpoints[-1:]],
        evaluation.MANIFEST_KEY: record.model_sha256,
        "metrics_from": record.evaluated_by or "the training script",
    }


def _params(spec: Spec, record: RunRecord) -> dict[str, Any]:
    """What an experiment tracker shows as the version's params: hyperparameters and the config hash."""
    return {**spec.hyperparameters, "config_hash": record.lineage.config_hash}
