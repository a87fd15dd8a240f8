"""eval-gate: the candidate's metrics against the gates and the model now in the baseline stage."""

from __future__ import annotations

import argparse
import json
from typing import Any

from gpuline import gha
from gpuline.context import Context
from gpuline.decisions.gates import evaluate
from gpuline.errors import GateFailed, InputError
from gpuline.runs import RunRecord
from gpuline.steps.common import outputs, recorded


def run(args: argparse.Namespace) -> dict[str, Any]:
    return eval_gate(Context.from_args(args))


def eval_gate(ctx: Context) -> dict[str, Any]:
    record = ctx.require_run()
    ctx.use_tier(record.tier)
    spec = ctx.spec
    with recorded(ctx, "eval-gate"):
        if not record.metrics:
            raise InputError(f"run {record.run_id} has no eval metrics", hint="run `gpuline train` first")
        baseline_version = ctx.registry.in_stage(spec.model.name, spec.eval.baseline)
        baseline = baseline_version.metrics if baseline_version else None
        verdicts = [evaluate(g, record.metrics, baseline) for g in spec.eval.gates]
        passed = all(v.passed for v in verdicts)

        def keep(r: RunRecord) -> None:
            r.gates = verdicts

        ctx.ledger.update_run(record.run_id, keep)
        base_label = f"v{baseline_version.version} ({spec.eval.baseline})" if baseline_version else "none yet"
        report = render_report(record.run_id, verdicts, base_label, passed)
        report_path = ctx.workdir(record.run_id) / "eval-report.md"
        report_path.write_text(report)
        gha.append_summary(report)
        for v in verdicts:
            gha.info(f"{'PASS' if v.passed else 'FAIL'} {v.gate} = {v.value} ({v.threshold}) {v.detail}")
        outputs({"verdict": "pass" if passed else "fail", "report-path": str(report_path)})
        ctx.event("gates.evaluated", passed=passed, verdicts=[v.model_dump() for v in verdicts])
        if not passed:
            failed = [f"{v.gate}: {v.detail}" for v in verdicts if not v.passed]
            raise GateFailed("; ".join(failed), hint="the model is not promoted; see the eval report in the summary")
    return {
        "run_id": record.run_id,
        "verdict": "pass",
        "baseline": base_label,
        "gates": [json.loads(v.model_dump_json()) for v in verdicts],
    }


def render_report(run_id: str, verdicts: list[Any], baseline: str, passed: bool) -> str:
    icon = ":white_check_mark:" if passed else ":x:"
    lines = [
        f"### {icon} gpuline eval gate: {'pass' if passed else 'fail'} ({run_id})",
        "",
        f"Baseline: {baseline}",
        "",
        "| gate | candidate | baseline | threshold | result |",
        "|---|---|---|---|---|",
    ]
    for v in verdicts:
        value = "—" if v.value is None else f"{v.value:.4g}"
        base = "—" if v.baseline is None else f"{v.baseline:.4g}"
        result = ("pass" if v.passed else "**fail**") + (f": {v.detail}" if v.detail else "")
        lines.append(f"| {v.gate} | {value} | {base} | {v.threshold} | {result} |")
    return "\n".join(lines) + "\n"
