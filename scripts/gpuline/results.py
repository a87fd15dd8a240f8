"""What each command returns: one typed result per step, with its workflow outputs and its JSON.

A step decides and records; it does not print its summary or set its outputs. ``gpuline.cli`` (and
``gpuline run`` between steps) hands the result to :mod:`gpuline.render.summary`, which writes the
outputs, the job summary and the closing log lines, so every step's output is shaped in one place.
A step that refuses or fails after producing something worth showing (a denied estimate, a failed
gate, a stopped training) raises with the result attached (``GpulineError.result``).

The lease's results (provision, teardown) are in :mod:`gpuline.results_lease`, verify's in
:mod:`gpuline.results_verify`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gpuline.registry.base import ModelVersion, StageChange
from gpuline.runs import GateVerdict, RunRecord


@dataclass
class StepResult:
    """The base: a result knows its command and its JSON body (the keys of ``--json``)."""

    command: str = field(init=False, default="")

    def to_json(self) -> dict[str, Any]:
        return {}

    def outputs(self) -> dict[str, object]:
        """The step's outputs for the calling workflow (kebab-case names; ``None`` becomes "")."""
        return {}


@dataclass
class PreflightResult(StepResult):
    run_id: str
    checks: list[tuple[str, str]]
    smoke_step_s: float | None
    evaluates: bool = False  # eval.command is set: eval-gate and verify run the project's code
    phase_seconds: dict[str, float] = field(default_factory=dict)  # wall seconds per check group
    command: str = field(init=False, default="preflight")

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "verdict": "pass",
            "checks": dict(self.checks),
            "smoke_step_s": self.smoke_step_s,
            "phase_seconds": self.phase_seconds,
        }

    def outputs(self) -> dict[str, object]:
        return {"run-id": self.run_id, "verdict": "pass", "eval-command": str(self.evaluates).lower()}


@dataclass
class EstimateResult(StepResult):
    run_id: str
    estimate_tier: str
    estimate: dict[str, Any]
    decision: dict[str, Any]
    queue: dict[str, Any]
    reserved: bool
    base: dict[str, Any] | None
    comment: str
    comment_path: str
    chart: str
    log_lines: list[str]
    command: str = field(init=False, default="cost-estimate")

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "estimate_tier": self.estimate_tier,
            "estimate": self.estimate,
            "decision": self.decision,
            "queue": self.queue,
            "reserved": self.reserved,
            "base": self.base,
            "comment_path": self.comment_path,
        }

    def outputs(self) -> dict[str, object]:
        est = self.estimate
        return {
            "run-id": self.run_id,
            "usd": f"{est['usd_p90']:.2f}",
            "gpu-hours": f"{est['gpu_hours_p90']:.3f}",
            "usd-max": f"{est['usd_cap']:.2f}",
            "duration-basis": est["duration"]["basis"],
            "expected-wait-s": f"{self.queue['expected_wait_s']:.0f}",
            "decision": self.decision["decision"],
            "comment-path": self.comment_path,
        }


@dataclass
class TrainResult(StepResult):
    record: RunRecord
    final_step: int | None
    resumed_from: int | None
    stop_reason: str
    preemptions: int
    restarts: int
    eval_metrics: dict[str, Any]
    loss_curve: list[tuple[int, float]]
    command: str = field(init=False, default="train")

    def outputs(self) -> dict[str, object]:
        return {
            "run-id": self.record.run_id,
            "final-step": self.final_step,
            "resumed-from": "" if self.resumed_from is None else self.resumed_from,
        }

    def to_json(self) -> dict[str, Any]:
        r = self.record
        return {
            "run_id": r.run_id,
            "final_step": self.final_step,
            "resumed_from": self.resumed_from,
            "checkpoints": [c.model_dump() for c in r.checkpoints],
            "metrics": r.metrics,
            "stop_reason": self.stop_reason,
            "preemptions": self.preemptions,
        }


@dataclass
class GateResult(StepResult):
    run_id: str
    verdicts: list[GateVerdict]
    baseline: str
    report_path: str
    command: str = field(init=False, default="eval-gate")

    @property
    def passed(self) -> bool:
        return all(v.passed for v in self.verdicts)

    def outputs(self) -> dict[str, object]:
        return {"verdict": "pass" if self.passed else "fail", "report-path": self.report_path}

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "verdict": "pass" if self.passed else "fail",
            "baseline": self.baseline,
            "gates": [v.model_dump(mode="json") for v in self.verdicts],
        }


@dataclass
class PromoteResult(StepResult):
    run_id: str
    model: str
    version: int
    stage: str
    previous_version: int | None
    # The audit the registry recorded with the change: who, when, why and from which workflow run.
    actor: str = ""
    reason: str = ""
    at: str = ""
    workflow_run_url: str = ""
    deployed: bool = False
    """The deploy hook ran and succeeded for this stage."""
    command: str = field(init=False, default="promote")

    def outputs(self) -> dict[str, object]:
        return {
            "version": self.version,
            "stage": self.stage,
            "previous-version": self.previous_version or "",
            "deployed": str(self.deployed).lower(),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "model": self.model,
            "version": self.version,
            "stage": self.stage,
            "previous_version": self.previous_version,
            "actor": self.actor,
            "reason": self.reason,
            "at": self.at,
            "workflow_run_url": self.workflow_run_url,
            "deployed": self.deployed,
        }


@dataclass
class PipelineResult(StepResult):
    """``gpuline run``: the steps' results in order (their outputs were written as each finished)."""

    tier: str
    run_id: str | None
    steps: list[StepResult]
    command: str = field(init=False, default="run")

    def step(self, command: str) -> StepResult | None:
        return next((s for s in self.steps if s.command == command), None)

    @property
    def promoted(self) -> PromoteResult | None:
        found = self.step("promote")
        return found if isinstance(found, PromoteResult) else None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"tier": self.tier}
        out.update({s.command: s.to_json() for s in self.steps})
        out["run_id"] = self.run_id
        if self.promoted is not None:
            out["version"] = self.promoted.version
            out["stage"] = self.promoted.stage
        return out


@dataclass
class RollbackResult(StepResult):
    model: str
    stage: str
    version: int | None
    replaced: int | None
    actor: str = ""
    reason: str = ""
    at: str = ""
    run_id: str = ""
    workflow_run_url: str = ""
    command: str = field(init=False, default="rollback")

    def outputs(self) -> dict[str, object]:
        return {"version": self.version, "stage": self.stage}

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "stage": self.stage,
            "version": self.version,
            "replaced": self.replaced,
            "actor": self.actor,
            "reason": self.reason,
            "at": self.at,
            "run_id": self.run_id,
            "workflow_run_url": self.workflow_run_url,
        }


@dataclass
class ModelView:
    """One model as ``gpuline models`` shows it: what each stage holds now, and every change, newest first."""

    model: str
    stages: dict[str, ModelVersion | None]
    history: list[StageChange]

    def holder(self, stage: str) -> StageChange | None:
        """The change that put the stage's current version there."""
        return next((c for c in self.history if c.stage == stage), None)

    def to_json(self) -> dict[str, Any]:
        stages: dict[str, Any] = {}
        for stage, version in self.stages.items():
            last = self.holder(stage)
            stages[stage] = (
                None
                if version is None
                else {
                    "version": version.version,
                    "run_id": version.run_id,
                    "artifacts_uri": version.artifacts_uri,
                    "metrics": version.metrics,
                    "since": last.at.isoformat() if last else None,
                    "by": last.actor if last else None,
                }
            )
        return {"model": self.model, "stages": stages, "history": [c.model_dump(mode="json") for c in self.history]}


@dataclass
class ModelsResult(StepResult):
    registry: str
    models: list[ModelView]
    command: str = field(init=False, default="models")

    def outputs(self) -> dict[str, object]:
        if len(self.models) != 1:
            return {}
        held = self.models[0].stages
        return {f"{stage}-version": v.version if v else "" for stage, v in held.items()}

    def to_json(self) -> dict[str, Any]:
        return {"registry": self.registry, "models": [m.to_json() for m in self.models]}


@dataclass
class StatusResult(StepResult):
    records: list[RunRecord]
    bodies: list[dict[str, Any]]
    command: str = field(init=False, default="status")

    def to_json(self) -> dict[str, Any]:
        return {"runs": self.bodies}


@dataclass
class DataResult(StepResult):
    """A command whose result is a document and a markdown rendering of it (report, schema, reap)."""

    name: str
    body: dict[str, Any]
    markdown: str = ""
    text: str = ""  # printed for people (not under --json)
    output_values: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.command = self.name

    def to_json(self) -> dict[str, Any]:
        return self.body

    def outputs(self) -> dict[str, object]:
        return self.output_values
