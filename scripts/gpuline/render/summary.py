"""Every step's result as the workflow and people see it: outputs, the job summary, the closing log lines.

The one place a result becomes output. :func:`write` is called by ``gpuline.cli`` for one command,
and by ``gpuline run`` after each step, so a tier run in one process shows what the same steps show
as separate workflow steps.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime

from gpuline import gha
from gpuline.registry.base import StageChange
from gpuline.render.markdown import key_value_table, markdown_table, mermaid_line_chart
from gpuline.render.phase_bar import phase_chart, phase_line
from gpuline.render.status_table import status_table
from gpuline.results import (
    DataResult,
    EstimateResult,
    GateResult,
    ModelsResult,
    ModelView,
    PipelineResult,
    PreflightResult,
    PromoteResult,
    RollbackResult,
    StatusResult,
    StepResult,
    TrainResult,
)
from gpuline.results_lease import ProvisionResult, TeardownResult
from gpuline.results_verify import VerifyResult
from gpuline.runs import GateVerdict, RunRecord


def write(result: StepResult, *, json_mode: bool = False) -> None:
    """Set the result's outputs, append its summary and print its closing lines."""
    if isinstance(result, PipelineResult):
        return  # its steps were written as each one finished
    for key, value in result.outputs().items():
        gha.set_output(key, "" if value is None else str(value))
    for line in log_lines(result, json_mode=json_mode):
        gha.info(line)
    text = markdown(result)
    if text:
        gha.append_summary(text)


def markdown(result: StepResult) -> str:
    """The job-summary block of a result ("" for none)."""
    render = _MARKDOWN.get(type(result))
    return render(result) if render is not None else ""


def log_lines(result: StepResult, *, json_mode: bool = False) -> list[str]:
    render = _LINES.get(type(result))
    return render(result, json_mode) if render is not None else []


# ---------------------------------------------------------------- per step


def _preflight(r: StepResult) -> str:
    assert isinstance(r, PreflightResult)
    return f"### :white_check_mark: gpuline preflight passed ({r.run_id})\n\n" + key_value_table(
        r.checks, ("check", "result")
    )


def _estimate(r: StepResult) -> str:
    assert isinstance(r, EstimateResult)
    return r.comment + ("\n" + r.chart if r.chart else "")


def _provision(r: StepResult) -> str:
    assert isinstance(r, ProvisionResult)
    rows = [(k, f"`{v}`") for k, v in r.outputs().items()]
    times = r.record.times
    if times.requested and times.provisioned:
        rows.append(("requested → provisioned", f"{(times.provisioned - times.requested).total_seconds():.1f} s"))
    return "### gpuline provision\n\n" + key_value_table(rows)


def _train(r: StepResult) -> str:
    assert isinstance(r, TrainResult)
    metrics = ", ".join(f"{k}={v:.4g}" for k, v in r.eval_metrics.items() if isinstance(v, int | float))
    rows = [
        ("final step", str(r.final_step)),
        ("resumed from", "fresh start" if r.resumed_from is None else f"step {r.resumed_from}"),
        ("checkpoints", str(len(r.record.checkpoints))),
        ("preemptions / restarts", f"{r.preemptions} / {r.restarts}"),
        ("eval", metrics),
    ]
    md = f"### gpuline train ({r.record.run_id})\n\n" + key_value_table(rows)
    if len(r.loss_curve) >= 2:
        md += "\n\n" + mermaid_line_chart("training loss", "step", r.loss_curve, "loss")
    return md


def gate_report(run_id: str, verdicts: list[GateVerdict], baseline: str) -> str:
    """The eval report: one row per gate, candidate against baseline (kept as a file and in the summary)."""
    passed = all(v.passed for v in verdicts)
    icon = ":white_check_mark:" if passed else ":x:"
    rows = []
    for v in verdicts:
        value = "—" if v.value is None else f"{v.value:.4g}"
        base = "—" if v.baseline is None else f"{v.baseline:.4g}"
        result = ("pass" if v.passed else "**fail**") + (f": {v.detail}" if v.detail else "")
        rows.append((v.gate, value, base, v.threshold, result))
    table = markdown_table(("gate", "candidate", "baseline", "threshold", "result"), rows)
    verdict = "pass" if passed else "fail"
    return f"### {icon} gpuline eval gate: {verdict} ({run_id})\n\nBaseline: {baseline}\n\n{table}\n"


def _gate(r: StepResult) -> str:
    assert isinstance(r, GateResult)
    return gate_report(r.run_id, r.verdicts, r.baseline)


def _promote(r: StepResult) -> str:
    assert isinstance(r, PromoteResult)
    return (
        f"### gpuline promote\n\n**{r.model} v{r.version}** is now **{r.stage}** "
        f"(previously {_previous(r.previous_version)}).\n" + _audit_line(r.actor, r.reason, r.workflow_run_url)
    )


def _verify(r: StepResult) -> str:
    assert isinstance(r, VerifyResult)
    icon = ":white_check_mark:" if r.passed else ":x:"
    head = f"### {icon} gpuline verify: {r.model} v{r.version} in {r.stage}\n\n"
    body = key_value_table(r.checks)
    if r.verdicts:
        body += "\n" + gate_report(f"{r.model} v{r.version}", r.verdicts, r.baseline)
    return head + body


def _verify_lines(r: StepResult, json_mode: bool) -> list[str]:
    assert isinstance(r, VerifyResult)
    verdict = "passes its check" if r.passed else "FAILED its check"
    return [f"{r.model} v{r.version} in {r.stage} {verdict}", *(f"  {k}: {v}" for k, v in r.checks)]


def _audit_line(actor: str, reason: str, url: str) -> str:
    if not (actor or reason):
        return ""
    where = f" ([workflow run]({url}))" if url else ""
    return f"\nBy **{actor or 'unknown'}**: {reason or 'no reason given'}{where}.\n"


def _previous(version: int | None) -> str:
    return f"v{version}" if version is not None else "nothing"


def _teardown_rows(r: TeardownResult) -> list[tuple[str, str]]:
    rec = r.record
    return [
        ("status", f"{rec.status} (last step: {rec.stage})"),
        ("machine", f"{rec.instance_id or '—'} {'released' if r.machine_released else 'not running'}"),
        *([("runner", f"registration {', '.join(r.runners_deleted)} deleted")] if r.runners_deleted else []),
        ("GPU-seconds", f"{rec.gpu_seconds:.0f} ({phase_line(rec.phase_gpu_seconds) or _idle(rec)})"),
        ("cost", _cost_cell(rec)),
        ("quota", r.quota),
    ]


def _idle(rec: RunRecord) -> str:
    return f"idle {rec.idle_seconds:.0f}"


def _cost_cell(rec: RunRecord) -> str:
    text = f"${rec.actual_usd or 0:.2f} actual vs ${rec.estimated_usd or 0:.2f} estimated"
    if rec.cost_source is None:
        return text
    billed = f", billed {rec.billed_seconds:,.0f} s a node" if rec.billed_seconds is not None else ""
    return f"{text} (cost source: {rec.cost_source}{billed})"


def _teardown(r: StepResult) -> str:
    assert isinstance(r, TeardownResult)
    md = f"### gpuline teardown ({r.record.run_id})\n\n" + key_value_table(_teardown_rows(r))
    if r.record.phase_gpu_seconds:
        md += "\n\n" + phase_chart(r.record.phase_gpu_seconds, r.record.queue_seconds)
    return md


def _rollback(r: StepResult) -> str:
    assert isinstance(r, RollbackResult)
    return (
        f"### gpuline rollback\n\n**{r.model}** {r.stage} is back to **v{r.version}** (was v{r.replaced}).\n"
        + _audit_line(r.actor, r.reason, r.workflow_run_url)
    )


def _models(r: StepResult) -> str:
    assert isinstance(r, ModelsResult)
    if not r.models:
        return f"### gpuline models\n\nNo models in the registry `{r.registry}`.\n"
    return "### gpuline models\n\n" + "\n".join(_model_markdown(m) for m in r.models)


def _model_markdown(m: ModelView) -> str:
    held = []
    for stage, version in m.stages.items():
        last = m.holder(stage)
        held.append(
            (
                stage,
                f"v{version.version}" if version else "—",
                f"`{version.run_id}`" if version else "",
                _when(last.at) if last else "",
                last.actor if last else "",
            )
        )
    md = f"#### {m.model}\n\n" + markdown_table(("stage", "version", "run", "since", "by"), held) + "\n"
    if m.history:
        rows = [
            (_when(c.at), c.stage, _what(c), c.actor, c.reason, _run_link(c.run_id, c.workflow_run_url))
            for c in m.history
        ]
        md += "\n" + markdown_table(("when", "stage", "change", "by", "why", "run"), rows) + "\n"
    return md


def _when(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _what(c: StageChange) -> str:
    return f"{c.action} → v{c.version}" if c.previous is None else f"{c.action} v{c.previous} → v{c.version}"


def _run_link(run_id: str, url: str) -> str:
    return f"[{run_id or 'workflow run'}]({url})" if url else run_id


def _data(r: StepResult) -> str:
    assert isinstance(r, DataResult)
    return r.markdown


# ---------------------------------------------------------------- closing log lines


def _preflight_lines(r: StepResult, json_mode: bool) -> list[str]:
    assert isinstance(r, PreflightResult)
    return [f"ok  {name}: {line}" for name, line in r.checks]


def _estimate_lines(r: StepResult, json_mode: bool) -> list[str]:
    assert isinstance(r, EstimateResult)
    return r.log_lines


def _provision_lines(r: StepResult, json_mode: bool) -> list[str]:
    assert isinstance(r, ProvisionResult)
    rec = r.record
    return [
        f"provisioned {rec.instance_id} ({rec.provider}, {rec.instance_type}, {rec.lane}); "
        f"lease {rec.lease_id} expires {r.expires_at}"
    ]


def _gate_lines(r: StepResult, json_mode: bool) -> list[str]:
    assert isinstance(r, GateResult)
    return [f"{'PASS' if v.passed else 'FAIL'} {v.gate} = {v.value} ({v.threshold}) {v.detail}" for v in r.verdicts]


def _promote_lines(r: StepResult, json_mode: bool) -> list[str]:
    assert isinstance(r, PromoteResult)
    return [
        f"{r.model} v{r.version} is now {r.stage} (was {_previous(r.previous_version)}); "
        f"`gpuline rollback --model {r.model} --stage {r.stage}` undoes this"
    ]


def _teardown_lines(r: StepResult, json_mode: bool) -> list[str]:
    assert isinstance(r, TeardownResult)
    lines = [] if r.first_time else [f"run {r.record.run_id} was already torn down; nothing left to release"]
    return [*lines, f"teardown {r.record.run_id}: " + "; ".join(f"{k} {v}" for k, v in _teardown_rows(r))]


def _rollback_lines(r: StepResult, json_mode: bool) -> list[str]:
    assert isinstance(r, RollbackResult)
    return [f"{r.model} {r.stage}: v{r.replaced} -> v{r.version} (rolled back)"]


def _models_lines(r: StepResult, json_mode: bool) -> list[str]:
    assert isinstance(r, ModelsResult)
    if json_mode:
        return []
    if not r.models:
        return [f"no models in the registry {r.registry}"]
    lines: list[str] = []
    for m in r.models:
        lines.append(m.model)
        for stage, version in m.stages.items():
            last = m.holder(stage)
            since = f"  since {_when(last.at)} by {last.actor or 'unknown'}" if last and version else ""
            held = f"v{version.version}  {version.run_id}" if version else "-"
            lines.append(f"  {stage:11} {held}{since}")
        lines += (
            [f"  {'WHEN':20} {'STAGE':11} {'CHANGE':22} {'BY':16} WHY"] if m.history else ["  no stage changes yet"]
        )
        lines += [f"  {_when(c.at):20} {c.stage:11} {_what(c):22} {c.actor:16} {c.reason}" for c in m.history]
    return lines


def _status_lines(r: StepResult, json_mode: bool) -> list[str]:
    assert isinstance(r, StatusResult)
    if json_mode:
        return []
    events = {b.get("run_id"): b["events"] for b in r.bodies if isinstance(b.get("events"), list)}
    return status_table(r.records, events)


def _data_lines(r: StepResult, json_mode: bool) -> list[str]:
    assert isinstance(r, DataResult)
    if json_mode or not r.text:
        return []
    return [r.text]


def schema_text(schema: dict[str, object]) -> str:
    return json.dumps(schema, indent=2)


_MARKDOWN: dict[type[StepResult], Callable[[StepResult], str]] = {
    PreflightResult: _preflight,
    EstimateResult: _estimate,
    ProvisionResult: _provision,
    TrainResult: _train,
    GateResult: _gate,
    PromoteResult: _promote,
    VerifyResult: _verify,
    TeardownResult: _teardown,
    RollbackResult: _rollback,
    ModelsResult: _models,
    DataResult: _data,
}

_LINES: dict[type[StepResult], Callable[[StepResult, bool], list[str]]] = {
    PreflightResult: _preflight_lines,
    EstimateResult: _estimate_lines,
    ProvisionResult: _provision_lines,
    GateResult: _gate_lines,
    PromoteResult: _promote_lines,
    VerifyResult: _verify_lines,
    TeardownResult: _teardown_lines,
    RollbackResult: _rollback_lines,
    ModelsResult: _models_lines,
    StatusResult: _status_lines,
    DataResult: _data_lines,
}
