"""verify: the check after a promotion, on the version the stage now holds, fetched back from the registry.

Its files are checked against the checksums the registry recorded (a missing or altered file fails);
with ``eval.command`` the version is evaluated again and must still pass the gates, against the
version it replaced (evaluated the same way). A failure exits 1, so the release tier's rollback job
(or ``gpuline run``) puts the stage back.
"""

from __future__ import annotations

import argparse

from gpuline import evaluation
from gpuline.context import Context
from gpuline.decisions.gates import evaluate
from gpuline.errors import GateFailed, InputError, RefusedError
from gpuline.registry.base import ModelVersion
from gpuline.results_verify import VerifyResult
from gpuline.stage import recorded
from gpuline.storage.bundle import ModelDamaged


def run(ctx: Context, args: argparse.Namespace) -> VerifyResult:
    return verify(ctx, stage=args.stage, model=args.model)


def verify(ctx: Context, stage: str | None = None, model: str | None = None) -> VerifyResult:
    """Check the stage; with a run (the release that promoted), the check is that run's last step."""
    if not ctx.run_id:
        return _verify(ctx, stage, model)
    ctx.require_run()  # acts as the run's tier; an unknown run is an input error
    with recorded(ctx, "verify"):
        return _verify(ctx, stage, model)


def _verify(ctx: Context, stage: str | None, model: str | None) -> VerifyResult:
    spec = ctx.spec
    stage = stage or "production"
    name = model or spec.model.name
    version = ctx.registry.in_stage(name, stage)
    if version is None:
        raise InputError(f"model {name} has nothing in {stage}", hint="promote a version before verifying it")
    result = VerifyResult(model=name, stage=stage, version=version.version, checks=[])
    try:
        _check(ctx, version, result)
    except (ModelDamaged, RefusedError) as exc:
        result.passed = False
        result.checks.append(("verdict", exc.one_line()))
        _record(ctx, result)
        error = exc if isinstance(exc, RefusedError) else RefusedError(exc.message, hint=exc.hint)
        raise error.with_result(result) from None
    _record(ctx, result)
    return result


def _check(ctx: Context, version: ModelVersion, result: VerifyResult) -> None:
    spec = ctx.spec
    with evaluation.fetched_version(ctx, version) as files:
        result.checks.append(("files", f"match the registry's checksums ({version.artifacts_uri})"))
        if not spec.eval.command:
            result.checks.append(("metrics", "not evaluated: gpuline.yml has no eval.command"))
            return
        metrics = evaluation.evaluate(ctx, files, f"verify-v{version.version}")
    replaced = _replaced(ctx, version, result.stage)
    baseline = evaluation.measure_version(ctx, replaced) if replaced else None
    result.baseline = f"v{replaced.version} ({baseline.how})" if replaced and baseline else "none"
    result.verdicts = [evaluate(g, metrics, baseline.metrics if baseline else None) for g in spec.eval.gates]
    failed = [f"{v.gate}: {v.detail}" for v in result.verdicts if not v.passed]
    result.checks.append(("metrics", "evaluated again by eval.command: " + ("; ".join(failed) or "gates pass")))
    if failed:
        raise GateFailed(
            f"{version.model} v{version.version} in {result.stage} no longer passes its gates: " + "; ".join(failed),
            hint="roll the stage back (`gpuline rollback`); the release tier's rollback job does",
        )


def _replaced(ctx: Context, version: ModelVersion, stage: str) -> ModelVersion | None:
    """The version the last promotion to ``stage`` replaced (None: it was the first)."""
    history = ctx.registry.history(version.model, stage)
    last = next((c for c in reversed(history) if c.version == version.version and c.action == "promote"), None)
    if last is None or last.previous is None:
        return None
    return ctx.registry.get(version.model, last.previous)


def _record(ctx: Context, result: VerifyResult) -> None:
    if ctx.run_id:
        ctx.event("model.verified", **result.to_json())
