"""The entry a train-mode pod runs: ``python -m gpuline.training.in_pod -- <entrypoint...>``.

It reads the pod contract from the environment the Job's manifest gives it (the names are in
:mod:`gpuline.contract`; :mod:`gpuline.providers.k8s_pod` writes them) and runs the entrypoint under
the same supervisor as ``gpuline train`` on a laptop, with the run's storage as the store:

- **Resume.** The supervisor resumes from the newest valid checkpoint in storage, so a pod the Job
  recreated after an eviction carries on where the evicted one saved.
- **Stop.** SIGTERM (eviction, spot reclaim, deletion) is the supervisor's one stop path: the trainer
  saves, the checkpoint is uploaded, all within the pod's grace period (``GPULINE_GRACE_S``).
- **Results in storage**, under ``runs/<run_id>/`` (pod 0 only, the one that commits checkpoints):
  ``metrics.jsonl`` (the whole curve, carried over from the pods before), ``eval.json``, the model
  under ``model/`` with its checksum manifest, and ``outcome.json``, what this pod's supervisor
  reported, for the pipeline to read as it reads a local run.
- **Exit code** as :data:`gpuline.contract.FAIL_JOB_EXIT_CODES` describes: the Job's
  ``podFailurePolicy`` fails at once on the user's script failing, and replaces a stopped pod.

Crashes are not restarted inside the pod: the Job decides (``backoffLimit``), so a preemption and a
crash are told apart by Kubernetes itself. Every supervisor event is one log line, :data:`EVENT_MARK`
followed by JSON, so whoever reads the pod's log (the pipeline, a test) sees checkpoints and stops
as they happen.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import FrameType
from typing import TYPE_CHECKING, Any

from gpuline import contract
from gpuline.errors import GpulineError, InputError

if TYPE_CHECKING:
    from gpuline.storage import Storage
    from gpuline.training.request import RunPaths, TrainOutcome, TrainRequest

EVENT_MARK = "gpuline-event: "
METRICS_KEY = "metrics.jsonl"
EVAL_KEY = "eval.json"
OUTCOME_KEY = "outcome.json"
UPLOAD_SHARE = 1 / 3  # of the grace period, kept for uploading the final checkpoint after the trainer exits

_EXIT_FOR = {
    "completed": contract.POD_EXIT_COMPLETED,
    "preempted": contract.POD_EXIT_STOPPED,
    "max_duration": contract.POD_EXIT_OUT_OF_TIME,
    "failed": contract.POD_EXIT_TRAINER_FAILED,
}


def run_prefix(run_id: str) -> str:
    """Where a run's pods leave what they produced, in the run's storage."""
    return f"runs/{run_id}"


@dataclass(frozen=True)
class PodContract:
    """What one pod is told by its environment."""

    run_id: str
    command: list[str]
    storage_uri: str
    workdir: Path
    cwd: Path
    hyperparameters: dict[str, Any]
    checkpoint_interval: int
    keep: int
    allow_fresh_start: bool
    max_duration_s: float
    dataset_uri: str
    dataset_sha256: str
    grace_s: float
    nnodes: int
    nprocs_per_node: int
    rdzv_endpoint: str | None
    index: int

    @classmethod
    def from_env(cls, env: Mapping[str, str], command: Sequence[str], cwd: Path) -> PodContract:
        def need(name: str) -> str:
            value = env.get(name, "")
            if not value:
                raise InputError(f"{name} is not set in the pod", hint="the Job's manifest sets it; recreate the Job")
            return value

        def number(name: str, default: float) -> float:
            raw = env.get(name) or str(default)
            try:
                return float(raw)
            except ValueError:
                raise InputError(f"{name} is not a number: {raw[:40]!r}") from None

        try:
            hparams = contract.TrainerContract.from_env(env, local_dir=cwd).hparams
        except ValueError as exc:
            raise InputError(str(exc)) from None
        return cls(
            run_id=need(contract.RUN_ID),
            command=list(command),
            storage_uri=need(contract.STORAGE),
            workdir=Path(env.get(contract.POD_WORKDIR) or "/var/lib/gpuline"),
            cwd=cwd / env.get(contract.ENTRYPOINT_WORKDIR, "."),
            hyperparameters=hparams,
            checkpoint_interval=max(int(number(contract.CHECKPOINT_INTERVAL, 100)), 1),
            keep=int(number(contract.CHECKPOINT_KEEP, 3)),
            allow_fresh_start=env.get(contract.ALLOW_FRESH_START) == "1",
            max_duration_s=number(contract.MAX_DURATION_S, 3600),
            dataset_uri=env.get(contract.DATASET_URI, ""),
            dataset_sha256=env.get(contract.DATASET_SHA256, ""),
            grace_s=number(contract.GRACE_S, 120),
            nnodes=int(number(contract.NNODES, 1)),
            nprocs_per_node=int(number(contract.NPROCS_PER_NODE, 1)),
            rdzv_endpoint=env.get(contract.RDZV_ENDPOINT) or None,
            # An Indexed Job numbers its pods; a plain Job's one pod is pod 0.
            index=int(number("JOB_COMPLETION_INDEX", 0)),
        )


def emit(kind: str, data: dict[str, Any]) -> None:
    print(EVENT_MARK + json.dumps({"event": kind, **data}, sort_keys=True, default=str), flush=True)


def log(line: str) -> None:
    print(line, flush=True)


def fetch_dataset(pod: PodContract, root: Path) -> Path | None:
    """The dataset as a local file whose sha256 is the one the spec names; fetched into ``root`` from S3."""
    from gpuline.storage import open_storage
    from gpuline.training.dataset import sha256_file

    uri = pod.dataset_uri
    if not uri:
        return None
    if uri.startswith("s3://"):
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        path = root / "dataset" / PurePosixPath(key).name
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            open_storage(f"s3://{bucket}", pod.cwd).get_file(key, path)
    else:
        rest = uri.removeprefix("file://")
        path = Path(rest) if Path(rest).is_absolute() else pod.cwd / rest
    if not path.is_file():
        raise InputError(f"the dataset {uri} is not in the pod at {path}", hint="add it to the image, or use s3://")
    actual = sha256_file(path)
    if pod.dataset_sha256 and actual != pod.dataset_sha256:
        raise InputError(
            f"dataset hash mismatch in the pod: {path.name} has sha256 {actual}, the spec expects {pod.dataset_sha256}",
            hint="rebuild the image with the dataset the spec names, or fix dataset.sha256",
        )
    return path


def _restore_metrics(storage: Storage, prefix: str, local: Path) -> None:
    """The curve so far, from the pods before this one: the trainer appends, a resumed step overwrites."""
    key = f"{prefix}/{METRICS_KEY}"
    if not local.exists() and storage.exists(key):
        local.parent.mkdir(parents=True, exist_ok=True)
        storage.get_file(key, local)


def _request(pod: PodContract, storage: Storage, workdir: Path, dataset_path: Path | None) -> TrainRequest:
    from gpuline.training.launch import entry_command
    from gpuline.training.request import TrainRequest

    return TrainRequest(
        run_id=pod.run_id,
        command=entry_command(pod.command),
        cwd=pod.cwd,
        workdir=workdir,
        storage=storage,
        storage_prefix=run_prefix(pod.run_id),
        hyperparameters=pod.hyperparameters,
        dataset_path=dataset_path,
        checkpoint_interval=pod.checkpoint_interval,
        keep=pod.keep,
        max_duration_s=pod.max_duration_s,
        max_restarts=0,  # the Job replaces the pod (or not): one restart policy, Kubernetes'
        allow_fresh_start=pod.allow_fresh_start,
        nprocs_per_node=pod.nprocs_per_node,
        nnodes=pod.nnodes,
        on_event=emit,
        log=log,
        # The rest of the pod's grace period is for uploading the checkpoint the trainer saved.
        grace_s=max(1.0, pod.grace_s * (1 - UPLOAD_SHARE)),
        rdzv_endpoint=pod.rdzv_endpoint,
    )


def publish(storage: Storage, run_id: str, outcome: TrainOutcome, paths: RunPaths) -> None:
    """Metrics, eval output, model and the outcome into storage, where the pipeline reads them."""
    from gpuline.runs import model_prefix
    from gpuline.storage import bundle

    prefix = run_prefix(run_id)
    if paths.metrics.is_file():
        storage.put_file(paths.metrics, f"{prefix}/{METRICS_KEY}")
    if paths.eval.is_file():
        storage.put_file(paths.eval, f"{prefix}/{EVAL_KEY}")
    model = None
    if outcome.stop_reason == "completed":
        model = bundle.upload(storage, outcome.output_dir, model_prefix(run_id))
    summary = {
        "stop_reason": outcome.stop_reason,
        "exit_code": outcome.exit_code,
        "final_step": outcome.final_step,
        "resumed_from_step": outcome.resumed_from_step,
        "preemptions": outcome.preemptions,
        "checkpoints": [{"uri": c.uri, "step": c.step, "sha256": c.sha256} for c in outcome.checkpoints],
        "eval_metrics": outcome.eval_metrics,
        "first_step_at": outcome.first_step_at.isoformat() if outcome.first_step_at else None,
        "last_step_at": outcome.last_step_at.isoformat() if outcome.last_step_at else None,
        "model_uris": model.uris if model else [],
        "model_sha256": model.manifest_sha256 if model else "",
        "pod": os.environ.get("HOSTNAME", ""),
    }
    storage.put_bytes(f"{prefix}/{OUTCOME_KEY}", json.dumps(summary, sort_keys=True, indent=1).encode())


def run(pod: PodContract) -> int:
    from gpuline.storage import open_storage
    from gpuline.training.request import RunPaths
    from gpuline.training.supervisor import supervise

    # A SIGTERM before the supervisor takes over (or after it returns) must not cut an upload short.
    stopping: list[int] = []

    def note(signum: int, frame: FrameType | None) -> None:
        stopping.append(signum)

    previous = signal.signal(signal.SIGTERM, note)
    try:
        storage = open_storage(pod.storage_uri, pod.cwd)
        workdir = pod.workdir / pod.run_id
        prefix = run_prefix(pod.run_id)
        dataset_path = fetch_dataset(pod, workdir)
        paths = RunPaths(workdir)
        _restore_metrics(storage, prefix, paths.metrics)
        if stopping:
            log("stopped before training started; nothing to save")
            return contract.POD_EXIT_STOPPED
        outcome = supervise(_request(pod, storage, workdir, dataset_path))
        if pod.index == 0:
            publish(storage, pod.run_id, outcome, paths)
        return _EXIT_FOR[outcome.stop_reason]
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    command = args[1:] if args[:1] == ["--"] else args
    if not command:
        log("usage: python -m gpuline.training.in_pod -- <entrypoint command...>")
        return contract.POD_EXIT_INVALID
    try:
        return run(PodContract.from_env(os.environ, command, Path.cwd()))
    except InputError as exc:
        log(f"error: {exc.one_line()}")
        return contract.POD_EXIT_INVALID
    except GpulineError as exc:
        log(f"error: {exc.one_line()}")
        return contract.POD_EXIT_INFRA if exc.exit_code == contract.POD_EXIT_INFRA else contract.POD_EXIT_INVALID


if __name__ == "__main__":
    sys.exit(main())
