"""train: run the entrypoint under the supervisor and keep what it produced in the run record."""

from __future__ import annotations

import argparse
import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from types import FrameType
from typing import TYPE_CHECKING, Any

from gpuline import gha
from gpuline.context import Context
from gpuline.errors import GpulineError, InfraError, RefusedError
from gpuline.results import TrainResult
from gpuline.runs import Checkpoint, RunRecord, model_prefix, utcnow
from gpuline.spec import Spec
from gpuline.stage import recorded
from gpuline.storage import bundle
from gpuline.training import TrainOutcome, TrainRequest, dataset, entry_command, supervise

if TYPE_CHECKING:
    from gpuline.providers.k8s_follow import Followed


def run(ctx: Context, args: argparse.Namespace) -> TrainResult:
    return train(ctx)


def train(ctx: Context) -> TrainResult:
    record = ctx.require_run()
    spec = ctx.spec
    with recorded(ctx, "train"):
        failure: GpulineError | None = None
        if on_cluster(record):
            # The cluster trains (the pods run the supervisor); this process follows the Job.
            outcome, model_sha256, failure, record = _train_on_cluster(ctx, record, spec)
            artifacts = [model_prefix(record.run_id)] if model_sha256 else []
        else:
            fetching = (utcnow(), time.monotonic())
            request = _request(ctx, record, spec)  # resolves (and may download) the dataset
            ctx.event("train.phases", intervals=[_interval("setup", *fetching)])
            outcome = supervise(request)
            saving = (utcnow(), time.monotonic())
            model = bundle.upload(ctx.storage, outcome.output_dir, model_prefix(record.run_id))
            # Keeping the model is saving too: the machine waits on it as on a checkpoint.
            ctx.event("train.phases", intervals=[_interval("checkpoint", *saving)])
            artifacts = model.uris if model else []
            model_sha256 = model.manifest_sha256 if model else ""
        record = _keep_outcome(ctx, record, outcome, model_sha256)
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
        failure = failure or (None if on_cluster(record) else _failure(spec, record, outcome))
        if failure is not None:
            raise failure.with_result(result)
    return result


def on_cluster(record: RunRecord) -> bool:
    """Whether the run's lease is a Kubernetes Job that trains (train mode), rather than a machine
    this process trains on (a local lease, or a runner-mode pod whose runner runs `gpuline train`)."""
    if record.provider != "kubernetes":
        return False
    options = record.resolved_config.get("resources", {}).get("options", {}) or {}
    return str(options.get("mode", "train")) == "train"


def _train_on_cluster(
    ctx: Context, record: RunRecord, spec: Spec
) -> tuple[TrainOutcome, str, GpulineError | None, RunRecord]:
    from gpuline.providers.kubernetes import KubernetesProvider
    from gpuline.training import remote

    if not record.instance_id:
        raise InfraError(
            f"run {record.run_id} has no Kubernetes Job to follow",
            hint="provision first (`gpuline provision`), or run the tier with `gpuline run`",
        )
    options = record.resolved_config.get("resources", {}).get("options", {}) or {}
    provider = KubernetesProvider(ctx.project_dir, options)
    instance_id = record.instance_id
    try:
        with _stop_raises(instance_id):
            gha.info(f"training on the cluster: following {instance_id} until it ends")
            followed = provider.follow(instance_id, gha.info)
    except BaseException:
        # Cancelled: stop the workload now (its pods get SIGTERM and save); teardown deletes it again.
        with contextlib.suppress(Exception):
            provider.release(instance_id)
            ctx.event("train.workload_deleted", instance_id=instance_id)
        raise
    record = _keep_pods(ctx, record, followed)
    with contextlib.suppress(GpulineError):  # bookkeeping: unreadable metrics leave the pods' time idle
        ctx.event("train.phases", intervals=remote.pod_phases(ctx.storage, record.run_id, followed))
    read = remote.read_outcome(ctx.storage, record.run_id, followed, ctx.workdir(record.run_id) / "output")
    failure = remote.failure(read, followed, record.run_id, spec.checkpoint.max_restarts)
    return read.outcome, read.model_sha256, failure, record


@contextlib.contextmanager
def _stop_raises(instance_id: str) -> Iterator[None]:
    """SIGTERM to a `gpuline train` that follows a Job raises where it waits, so the Job is deleted.
    Under `gpuline run` the pipeline's own handler does that already, and is left alone."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) not in (
        signal.SIG_DFL,
        None,
    ):
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise InfraError(
            f"`gpuline train` was stopped by {signal.Signals(signum).name}; the Job {instance_id} was deleted",
            hint="its pods saved a final checkpoint; teardown releases the lease, and a new run resumes from it",
        )

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _keep_pods(ctx: Context, record: RunRecord, followed: Followed) -> RunRecord:
    """The pods' times in the run record: the GPU-seconds and the cost at teardown come from them."""

    def keep(r: RunRecord) -> None:
        r.times.pod_running = r.times.pod_running or followed.first_running
        r.times.pod_finished = followed.finished or r.times.pod_finished
        r.times.runner_online = r.times.runner_online or followed.first_running
        r.pod_seconds = round(r.pod_seconds + followed.pod_seconds, 3)
        # Kueue's admission (k8s_queue): the wait before it is queue time, never GPU time or cost.
        r.times.admitted = r.times.admitted or followed.admitted_at
        r.queue_seconds = max(r.queue_seconds, followed.queue_seconds)

    ctx.event(
        "train.workload",
        end=followed.end,
        reason=followed.reason,
        admitted_at=followed.admitted_at.isoformat() if followed.admitted_at else None,
        queue_seconds=followed.queue_seconds,
        pods=[{"name": p.name, "exit_code": p.exit_code, "disrupted": p.disrupted, "seconds": p.seconds,
               "started": _iso(p.started), "finished": _iso(p.finished)} for p in followed.pods],
    )  # fmt: skip
    return ctx.ledger.update_run(record.run_id, keep)


def _iso(when: datetime | None) -> str | None:
    return when.isoformat() if when is not None else None


def _interval(phase: str, wall_start: datetime, mono_start: float) -> dict[str, Any]:
    """A ``train.phases`` interval from its start to now: placed by the wall clock, measured by the monotonic one."""
    return {"phase": phase, "start": wall_start.isoformat(), "seconds": round(time.monotonic() - mono_start, 4)}


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
