"""eval-gate: the candidate's metrics against the gates and the model now in the baseline stage.

With ``eval.command`` the candidate and the baseline are both evaluated here, by that command, on the
same data; without it the candidate's metrics are the training script's and the baseline's are the
ones stored with its version.
"""

from __future__ import annotations

import argparse
from typing import Any

from gpuline import evaluation
from gpuline.context import Context
from gpuline.decisions.gates import evaluate
from gpuline.errors import GateFailed, InputError
from gpuline.registry.base import ModelVersion
from gpuline.render.summary import gate_report
from gpuline.results import GateResult
from gpuline.runs import RunRecord
from gpuline.stage import recorded

EVALUATED = "eval.command, in eval-gate"


def run(ctx: Context, args: argparse.Namespace) -> GateResult:
    return eval_gate(ctx)


def eval_gate(ctx: Context) -> GateResult:
    record = ctx.require_run()
    spec = ctx.spec
    with recorded(ctx, "eval-gate"):
        baseline_version = ctx.registry.in_stage(spec.model.name, spec.eval.baseline)
        metrics, baseline, how = _measure(ctx, record, baseline_version)
        verdicts = [evaluate(g, metrics, baseline) for g in spec.eval.gates]

        def keep(r: RunRecord) -> None:
            r.gates = verdicts
            if spec.eval.command:
                r.metrics, r.evaluated_by = metrics, EVALUATED

        ctx.ledger.update_run(record.run_id, keep)
        base_label = "none yet"
        if baseline_version:
            base_label = f"v{baseline_version.version} ({spec.eval.baseline}; {how})"
        report_path = ctx.workdir(record.run_id) / "eval-report.md"
        report_path.write_text(gate_report(record.run_id, verdicts, base_label))
        result = GateResult(run_id=record.run_id, verdicts=verdicts, baseline=base_label, report_path=str(report_path))
        # Which version the verdicts are about: promote moves the stage only while it still holds it.
        ctx.event(
            "gates.evaluated",
            passed=result.passed,
            verdicts=[v.model_dump() for v in verdicts],
            baseline_stage=spec.eval.baseline,
            baseline_version=baseline_version.version if baseline_version else None,
        )
        if not result.passed:
            failed = [f"{v.gate}: {v.detail}" for v in verdicts if not v.passed]
            refusal = GateFailed(
                "; ".join(failed), hint="the model is not promoted; see the eval report in the summary"
            )
            raise refusal.with_result(result)
    return result


def _measure(
    ctx: Context, record: RunRecord, baseline: ModelVersion | None
) -> tuple[dict[str, Any], dict[str, Any] | None, str]:
    """The candidate's metrics, the baseline's (None: no baseline yet) and how the baseline's were had."""
    if not ctx.spec.eval.command:
        if not record.metrics:
            raise InputError(f"run {record.run_id} has no eval metrics", hint="run `gpuline train` first")
        return record.metrics, baseline.metrics if baseline else None, "stored metrics"
    with evaluation.fetched_candidate(ctx, record) as files:
        metrics = evaluation.evaluate(ctx, files, "candidate")
    ctx.event("eval.candidate", metrics=metrics)
    if baseline is None:
        return metrics, None, ""
    measured = evaluation.measure_version(ctx, baseline)
    ctx.event("eval.baseline", version=baseline.version, metrics=measured.metrics, how=measured.how)
    return metrics, measured.metrics, measured.how
