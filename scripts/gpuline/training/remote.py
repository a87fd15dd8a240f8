"""What a run trained on the cluster left in storage, read back as a local train's outcome.

The pods publish under ``runs/<run_id>/`` (see :mod:`gpuline.training.in_pod`): ``outcome.json``
(what pod 0's supervisor reported: stop reason, steps, checkpoints, eval metrics, the model's
manifest hash), ``metrics.jsonl`` and the model under ``model/``. This turns them into the same
:class:`~gpuline.training.request.TrainOutcome` the supervisor returns on a laptop, so the train step
keeps them in the run record the same way and eval-gate and promote work unchanged; and it says, in
one line, why a Job that failed failed.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from gpuline import contract
from gpuline.errors import GpulineError, InfraError, InputError, RefusedError
from gpuline.training.checkpoints import CheckpointInfo
from gpuline.training.in_pod import METRICS_KEY, OUTCOME_KEY, run_prefix
from gpuline.training.metrics import loss_curve, read_metrics
from gpuline.training.request import StopReason, TrainOutcome

if TYPE_CHECKING:
    from gpuline.providers.k8s_follow import Followed
    from gpuline.storage import Storage

_STOP_FOR_EXIT: dict[int, StopReason] = {
    contract.POD_EXIT_COMPLETED: "completed",
    contract.POD_EXIT_STOPPED: "preempted",
    contract.POD_EXIT_OUT_OF_TIME: "max_duration",
}


@dataclass
class ClusterOutcome:
    """The training's outcome as the pods published it, and the manifest hash of the model they uploaded."""

    outcome: TrainOutcome
    model_sha256: str
    published: bool  # False: no pod got as far as writing outcome.json


def _when(raw: Any) -> datetime | None:
    return datetime.fromisoformat(raw) if isinstance(raw, str) and raw else None


def _published(storage: Storage, run_id: str) -> dict[str, Any] | None:
    key = f"{run_prefix(run_id)}/{OUTCOME_KEY}"
    if not storage.exists(key):
        return None
    try:
        body = json.loads(storage.get_bytes(key))
    except ValueError:
        raise InfraError(
            f"the pods' {OUTCOME_KEY} for run {run_id} is not JSON", hint="see the pod's log; retrain the run"
        ) from None
    return body if isinstance(body, dict) else None


def _rows(storage: Storage, run_id: str) -> list[dict[str, Any]]:
    """The metrics rows the pods published, every pod's (each carried the curve before it over)."""
    key = f"{run_prefix(run_id)}/{METRICS_KEY}"
    if not storage.exists(key):
        return []
    with tempfile.TemporaryDirectory(prefix="gpuline-metrics-") as tmp:
        local = Path(tmp) / METRICS_KEY
        storage.get_file(key, local)
        return read_metrics(local)


def _curve(storage: Storage, run_id: str) -> list[tuple[int, float]]:
    return loss_curve(_rows(storage, run_id))


# A pod that ended this way saved its last step before it exited: the time after that step is the save.
_SAVED_EXITS = (contract.POD_EXIT_COMPLETED, contract.POD_EXIT_STOPPED, contract.POD_EXIT_OUT_OF_TIME)


def pod_phases(storage: Storage, run_id: str, followed: Followed) -> list[dict[str, Any]]:
    """Each pod's run as ``train.phases`` intervals: setup (its start to its first step), train (to
    its last step), checkpoint (the final save and upload, when it exited having saved). The pod's
    start and end are the API's; its steps are the trainer's own ``time`` on each metrics row."""
    times = sorted(float(t) for r in _rows(storage, run_id) if isinstance(t := r.get("time"), int | float))
    intervals: list[dict[str, Any]] = []
    for pod in followed.pods:
        if pod.started is None or pod.finished is None or pod.finished <= pod.started:
            continue
        a, b = pod.started.timestamp(), pod.finished.timestamp()
        inside = [t for t in times if a <= t <= b]
        if not inside:
            intervals.append(_interval("setup", a, b))  # it never stepped: pulled, started, was stopped
            continue
        intervals += [_interval("setup", a, inside[0]), _interval("train", inside[0], inside[-1])]
        if pod.exit_code in _SAVED_EXITS:
            intervals.append(_interval("checkpoint", inside[-1], b))
    return [i for i in intervals if i["seconds"] > 0]


def _interval(phase: str, start: float, end: float) -> dict[str, Any]:
    when = datetime.fromtimestamp(start, UTC).isoformat()
    return {"phase": phase, "start": when, "seconds": round(max(0.0, end - start), 4)}


def read_outcome(storage: Storage, run_id: str, followed: Followed, output_dir: Path) -> ClusterOutcome:
    """The pods' outcome from storage; when none was published, one made from how the Job ended."""
    body = _published(storage, run_id)
    curve = _curve(storage, run_id)
    if body is None:
        code = followed.last_exit_code()
        code = contract.POD_EXIT_GPULINE_BUG if code is None else code
        stop: StopReason = _STOP_FOR_EXIT.get(code, "failed")
        outcome = TrainOutcome(
            exit_code=code, resumed_from_step=None, final_step=curve[-1][0] if curve else None,
            checkpoints=[], eval_metrics={}, loss_curve=curve, preemptions=followed.preemptions,
            restarts=followed.restarts, first_step_at=None, last_step_at=None, output_dir=output_dir,
            stop_reason=stop,
        )  # fmt: skip
        return ClusterOutcome(outcome, "", published=False)
    checkpoints = [CheckpointInfo(uri=c["uri"], step=int(c["step"]), sha256=c["sha256"]) for c in body["checkpoints"]]
    outcome = TrainOutcome(
        exit_code=int(body.get("exit_code") or 0),
        resumed_from_step=body.get("resumed_from_step"),
        final_step=body.get("final_step"),
        checkpoints=checkpoints,
        eval_metrics=dict(body.get("eval_metrics") or {}),
        loss_curve=curve,
        # The pods' own count is per pod (each one saw at most its own stop); the cluster's is the run's.
        preemptions=followed.preemptions,
        restarts=followed.restarts,
        first_step_at=_when(body.get("first_step_at")),
        last_step_at=_when(body.get("last_step_at")),
        output_dir=output_dir,
        stop_reason=cast(StopReason, body.get("stop_reason") or "failed"),
    )
    return ClusterOutcome(outcome, str(body.get("model_sha256") or ""), published=True)


def failure(result: ClusterOutcome, followed: Followed, run_id: str, max_restarts: int) -> GpulineError | None:
    """Why a Job that did not complete failed, in one line: the user's crash, preemptions past
    ``checkpoint.max_restarts``, out of time, or the pod's environment; None when it completed."""
    outcome = result.outcome
    if followed.end == "Complete" and outcome.stop_reason == "completed":
        return None
    step = outcome.final_step
    resume = f"`gpuline train --run-id {run_id}` resumes from the newest checkpoint"
    code = followed.last_exit_code()
    if followed.end == "Deleted":
        return InfraError(f"the Job of run {run_id} was deleted at step {step} before it ended", hint=resume)
    if outcome.stop_reason == "max_duration" or code == contract.POD_EXIT_OUT_OF_TIME:
        return RefusedError(
            f"training on the cluster hit max_duration at step {step}; a checkpoint was saved",
            hint=f"raise resources.max_duration or train fewer steps; {resume}",
        )
    if followed.reason == "BackoffLimitExceeded" and followed.preemptions:
        return InfraError(
            f"the pods were preempted {followed.preemptions} times, more than checkpoint.max_restarts "
            f"({max_restarts}); the last checkpoint (step {step}) is durable",
            hint=f"raise checkpoint.max_restarts, or set resources.options.retry_preemptions: always; {resume}",
        )
    if code == contract.POD_EXIT_TRAINER_FAILED or (outcome.stop_reason == "failed" and result.published):
        return InfraError(
            f"the training script failed in the pod at step {step} (exit {outcome.exit_code}); not retried",
            hint="see the pod's log above (kubectl logs); fix the script, then run again",
        )
    if code == contract.POD_EXIT_INVALID:
        return InputError(
            "the pod could not start training: its environment or dataset is wrong (exit 2)",
            hint="see the pod's log (kubectl logs): the image must contain gpuline and the dataset must match",
        )
    detail = f"{followed.reason}: {followed.message}".strip(": ") or "no reason given"
    return InfraError(f"the Job of run {run_id} failed at step {step} (pod exit {code}; {detail})", hint=resume)
