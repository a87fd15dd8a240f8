"""train: run the entrypoint under the supervisor and keep what it produced in the run record."""

from __future__ import annotations

import argparse
from typing import Any

from gpuline import gha
from gpuline.context import Context
from gpuline.errors import GpulineError, InfraError, RefusedError
from gpuline.results import TrainResult
from gpuline.runs import Checkpoint, RunRecord, model_prefix
from gpuline.spec import Spec
from gpuline.stage import recorded
from gpuline.storage import bundle
from gpuline.training import TrainOutcome, TrainRequest, dataset, entry_command, supervise


def run(ctx: Context, args: argparse.Namespace) -> TrainResult:
    return train(ctx)


def train(ctx: Context) -> TrainResult:
    record = ctx.require_run()
    spec = ctx.spec
    with recorded(ctx, "train"):
        outcome = supervise(_request(ctx, record, spec))
        model = bundle.upload(ctx.storage, outcome.output_dir, model_prefix(record.run_id))
        artifacts = model.uris if model else []
        record = _keep_outcome(ctx, record, outcome, model.manifest_sha256 if model else "")
        ctx.event(
            "train.outcome",
            exit_code=outcome.exit_code,
            stop_reason=outcome.stop_reason,
            final_step=outcome.final_step,
            resumed_from=outcome.resumed_from_step,
            artifacts=artifacts,
            loss_curve=outcome.loss_curve[-200:],
        )
        result = TrainResult(
            record=record,
            final_step=outcome.final_step,
            resumed_from=outcome.resumed_from_step,
            stop_reason=outcome.stop_reason,
            preemptions=outcome.preemptions,
            restarts=outcome.restarts,
            eval_metrics=dict(outcome.eval_metrics),
            loss_curve=list(outcome.loss_curve),
        )
        failure = _failure(spec, record, outcome)
        if failure is not None:
            raise failure.with_result(result)
    return result


def _request(ctx: Context, record: RunRecord, spec: Spec) -> TrainRequest:
    workdir = ctx.workdir(record.run_id)

    def on_event(kind: str, data: dict[str, Any]) -> None:
        ctx.event(f"train.{kind}", **data)

    return TrainRequest(
        run_id=record.run_id,
        command=entry_command(spec.entrypoint.command, ctx.inputs.python),
        cwd=ctx.project_dir / spec.entrypoint.workdir,
        workdir=workdir,
        storage=ctx.storage,
        storage_prefix=f"runs/{record.run_id}",
        hyperparameters=spec.hyperparameters,
        dataset_path=dataset.resolve(spec, ctx.project_dir, ctx.config_path, workdir),
        checkpoint_interval=spec.checkpoint.interval_steps,
        keep=spec.checkpoint.keep,
        max_duration_s=float(spec.resources.max_duration),
        max_restarts=spec.checkpoint.max_restarts,
        allow_fresh_start=spec.checkpoint.allow_fresh_start,
        nprocs_per_node=spec.resources.procs_per_node,
        nnodes=spec.resources.nodes,
        on_event=on_event,
        log=gha.info,
    )


def _keep_outcome(ctx: Context, record: RunRecord, outcome: TrainOutcome, model_sha256: str) -> RunRecord:
    def keep(r: RunRecord) -> None:
        r.checkpoints = [Checkpoint(uri=c.uri, step=c.step, sha256=c.sha256) for c in outcome.checkpoints]
        r.model_sha256 = model_sha256 or r.model_sha256
        r.metrics, r.evaluated_by = dict(outcome.eval_metrics), ""
        r.preemptions += outcome.preemptions
        r.restarts += outcome.restarts
        r.times.first_step = r.times.first_step or outcome.first_step_at
        r.times.last_step = outcome.last_step_at or r.times.last_step
        r.times.runner_online = r.times.runner_online or r.times.provisioned

    return ctx.ledger.update_run(record.run_id, keep)


def _failure(spec: Spec, record: RunRecord, outcome: TrainOutcome) -> GpulineError | None:
    """How a training that did not complete ends the step (its checkpoints are durable either way)."""
    if outcome.stop_reason == "max_duration":
        return RefusedError(
            f"training hit max_duration ({spec.resources.max_duration}s) at step {outcome.final_step}; "
            "a checkpoint was saved",
            hint="raise resources.max_duration or train fewer steps; `gpuline train` resumes this run",
        )
    if outcome.stop_reason == "preempted":
        return InfraError(
            f"the machine was preempted at step {outcome.final_step}; its final checkpoint is durable",
            hint=f"run `gpuline train --run-id {record.run_id}` on a new machine: it resumes from that step",
        )
    if outcome.exit_code != 0:
        return InfraError(
            f"training failed (exit {outcome.exit_code}, {outcome.stop_reason}) at step {outcome.final_step}",
            hint="see the log above; `gpuline train --run-id` resumes from the newest checkpoint",
        )
    return None
