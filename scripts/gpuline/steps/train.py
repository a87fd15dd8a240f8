"""train: run the entrypoint under the supervisor and keep what it produced in the run record."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from gpuline import gha
from gpuline.context import Context
from gpuline.errors import InfraError, RefusedError
from gpuline.runs import Checkpoint, RunRecord
from gpuline.steps.common import outputs, recorded, table
from gpuline.steps.preflight import entry_command
from gpuline.training import dataset


def run(args: argparse.Namespace) -> dict[str, Any]:
    return train(Context.from_args(args))


def model_prefix(run_id: str) -> str:
    return f"runs/{run_id}/model"


def train(ctx: Context) -> dict[str, Any]:
    record = ctx.require_run()
    from gpuline.training.supervisor import TrainRequest, supervise

    # The run keeps the tier it was created with; a later step must not train a different config.
    ctx.use_tier(record.tier)
    spec = ctx.spec
    with recorded(ctx, "train"):
        workdir = ctx.workdir(record.run_id)
        data_path = dataset.resolve(spec, ctx.project_dir, ctx.config_path, workdir)
        storage = ctx.storage

        def on_event(kind: str, data: dict[str, Any]) -> None:
            ctx.event(f"train.{kind}", **data)

        request = TrainRequest(
            run_id=record.run_id,
            command=entry_command(spec),
            cwd=ctx.project_dir / spec.entrypoint.workdir,
            workdir=workdir,
            storage=storage,
            storage_prefix=f"runs/{record.run_id}",
            hyperparameters=spec.hyperparameters,
            dataset_path=data_path,
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
        outcome = supervise(request)
        artifacts = _upload_model(storage, outcome.output_dir, model_prefix(record.run_id))

        def keep(r: RunRecord) -> None:
            r.checkpoints = [Checkpoint(uri=c.uri, step=c.step, sha256=c.sha256) for c in outcome.checkpoints]
            r.metrics = dict(outcome.eval_metrics)
            r.preemptions += outcome.preemptions
            r.restarts += outcome.restarts
            r.times.first_step = r.times.first_step or outcome.first_step_at
            r.times.last_step = outcome.last_step_at or r.times.last_step
            r.times.runner_online = r.times.runner_online or r.times.provisioned

        record = ctx.ledger.update_run(record.run_id, keep)
        ctx.event(
            "train.outcome",
            exit_code=outcome.exit_code,
            stop_reason=outcome.stop_reason,
            final_step=outcome.final_step,
            resumed_from=outcome.resumed_from_step,
            artifacts=artifacts,
            loss_curve=outcome.loss_curve[-200:],
        )
        outputs(
            {
                "run-id": record.run_id,
                "final-step": outcome.final_step,
                "resumed-from": "" if outcome.resumed_from_step is None else outcome.resumed_from_step,
            }
        )
        _summary(record, outcome)
        if outcome.stop_reason == "max_duration":
            raise RefusedError(
                f"training hit max_duration ({spec.resources.max_duration}s) at step {outcome.final_step}; "
                "a checkpoint was saved",
                hint="raise resources.max_duration or train fewer steps; `gpuline train` resumes this run",
            )
        if outcome.stop_reason == "preempted":
            raise InfraError(
                f"the machine was preempted at step {outcome.final_step}; its final checkpoint is durable",
                hint=f"run `gpuline train --run-id {record.run_id}` on a new machine: it resumes from that step",
            )
        if outcome.exit_code != 0:
            raise InfraError(
                f"training failed (exit {outcome.exit_code}, {outcome.stop_reason}) at step {outcome.final_step}",
                hint="see the log above; `gpuline train --run-id` resumes from the newest checkpoint",
            )
    return {
        "run_id": record.run_id,
        "final_step": outcome.final_step,
        "resumed_from": outcome.resumed_from_step,
        "checkpoints": [c.model_dump() for c in record.checkpoints],
        "metrics": record.metrics,
        "stop_reason": outcome.stop_reason,
        "preemptions": outcome.preemptions,
    }


def _upload_model(storage: Any, output_dir: Path, prefix: str) -> list[str]:
    if not output_dir.exists():
        return []
    uploaded = []
    for path in sorted(p for p in output_dir.rglob("*") if p.is_file()):
        key = f"{prefix}/{path.relative_to(output_dir).as_posix()}"
        storage.put_file(path, key)
        uploaded.append(storage.uri_for(key))
    return uploaded


def _summary(record: RunRecord, outcome: Any) -> None:
    curve = outcome.loss_curve
    rows = [
        ("final step", str(outcome.final_step)),
        (
            "resumed from",
            "fresh start" if outcome.resumed_from_step is None else f"step {outcome.resumed_from_step}",
        ),
        ("checkpoints", str(len(record.checkpoints))),
        ("preemptions / restarts", f"{outcome.preemptions} / {outcome.restarts}"),
        (
            "eval",
            ", ".join(f"{k}={v:.4g}" for k, v in outcome.eval_metrics.items() if isinstance(v, int | float)),
        ),
    ]
    md = f"### gpuline train ({record.run_id})\n\n" + table(rows, ("", ""))
    if len(curve) >= 2:
        sample = curve[:: max(1, len(curve) // 30)]
        xs = ", ".join(str(s) for s, _ in sample)
        ys = ", ".join(f"{v:.4f}" for _, v in sample)
        md += (
            f'\n\n```mermaid\nxychart-beta\n  title "training loss"\n  x-axis "step" [{xs}]\n'
            f'  y-axis "loss"\n  line [{ys}]\n```\n'
        )
    gha.append_summary(md)
