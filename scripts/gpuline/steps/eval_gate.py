"""eval-gate: the candidate's metrics against the gates and the model now in the baseline stage."""

from __future__ import annotations

import argparse

from gpuline.context import Context
from gpuline.decisions.gates import evaluate
from gpuline.errors import GateFailed, InputError
from gpuline.render.summary import gate_report
from gpuline.results import GateResult
from gpuline.runs import RunRecord
from gpuline.stage import recorded


def run(ctx: Context, args: argparse.Namespace) -> GateResult:
    return eval_gate(ctx)


def eval_gate(ctx: Context) -> GateResult:
    record = ctx.require_run()
    spec = ctx.spec
    with recorded(ctx, "eval-gate"):
        if not record.metrics:
            raise InputError(f"run {record.run_id} has no eval metrics", hint="run `gpuline train` first")
        baseline_version = ctx.registry.in_stage(spec.model.name, spec.eval.baseline)
        baseline = baseline_version.metrics if baseline_version else None
        verdicts = [evaluate(g, record.metrics, baseline) for g in spec.eval.gates]

        def keep(r: RunRecord) -> None:
            r.gates = verdicts

        ctx.ledger.update_run(record.run_id, keep)
        base_label = f"v{baseline_version.version} ({spec.eval.baseline})" if baseline_version else "none yet"
        report_path = ctx.workdir(record.run_id) / "eval-report.md"
        report_path.write_text(gate_report(record.run_id, verdicts, base_label))
        result = GateResult(run_id=record.run_id, verdicts=verdicts, baseline=base_label, report_path=str(report_path))
        ctx.event("gates.evaluated", passed=result.passed, verdicts=[v.model_dump() for v in verdicts])
        if not result.passed:
            failed = [f"{v.gate}: {v.detail}" for v in verdicts if not v.passed]
            refusal = GateFailed(
                "; ".join(failed), hint="the model is not promoted; see the eval report in the summary"
            )
            raise refusal.with_result(result)
    return result
