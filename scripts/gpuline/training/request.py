"""What the supervisor is asked to do and what it reports back, and where a run keeps its local state."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from gpuline.contract import TrainerContract
from gpuline.training import imds
from gpuline.training.checkpoints import CheckpointInfo

if TYPE_CHECKING:
    from gpuline.storage import Storage

StopReason = Literal["completed", "max_duration", "preempted", "failed"]
GRACE_S = 25.0  # fits GCP's and Kubernetes' 30 s between SIGTERM and SIGKILL


def _ignore_event(kind: str, data: dict[str, Any]) -> None:
    return None


@dataclass
class TrainRequest:
    run_id: str
    command: list[str]
    cwd: Path
    workdir: Path
    storage: Storage
    storage_prefix: str
    hyperparameters: dict[str, Any]
    dataset_path: Path | None
    checkpoint_interval: int
    keep: int
    max_duration_s: float
    max_restarts: int
    allow_fresh_start: bool
    nprocs_per_node: int = 1
    nnodes: int = 1
    extra_env: dict[str, str] = field(default_factory=dict)
    on_event: Callable[[str, dict[str, Any]], None] = _ignore_event
    log: Callable[[str], None] = print
    grace_s: float = GRACE_S
    # None: GPULINE_IMDS_ENDPOINT, or EC2's own endpoint when running on EC2; "off" disables.
    imds_endpoint: str | None = None
    imds_poll_s: float = imds.POLL_S
    # host:port that every node's torchrun meets at (c10d); env GPULINE_RDZV_ENDPOINT when None.
    rdzv_endpoint: str | None = None

    @property
    def checkpoint_prefix(self) -> str:
        """Checkpoints live beside the run's other artifacts: ``<storage_prefix>/checkpoints/step-N``."""
        return f"{self.storage_prefix.strip('/')}/checkpoints"


@dataclass
class TrainOutcome:
    exit_code: int
    resumed_from_step: int | None
    final_step: int | None
    checkpoints: list[CheckpointInfo]
    eval_metrics: dict[str, Any]
    loss_curve: list[tuple[int, float]]
    preemptions: int
    restarts: int
    first_step_at: datetime | None
    last_step_at: datetime | None
    output_dir: Path
    stop_reason: StopReason


@dataclass
class SmokeResult:
    losses: list[float]
    fell: bool
    step_seconds: float | None
    exit_code: int
    output_tail: list[str]
    eval_metrics: dict[str, Any] | None = None
    """What the script wrote to GPULINE_EVAL_PATH in smoke mode (its metric names); None: it wrote nothing."""


@dataclass(frozen=True)
class RunPaths:
    """Where one run keeps its local state (all under the request's workdir)."""

    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def eval(self) -> Path:
        return self.root / "eval.json"

    @property
    def output(self) -> Path:
        return self.root / "output"

    @property
    def lock(self) -> Path:
        return self.root / "supervisor.lock"

    @property
    def trainer_pid(self) -> Path:
        return self.root / "trainer.pid"

    @property
    def stopped(self) -> Path:
        return self.root / "stopped.json"

    @property
    def first_step(self) -> Path:
        """When a supervisor first saw the trainer write a step: kept across supervisors of the run."""
        return self.root / "first-step.json"

    def contract(
        self,
        *,
        run_id: str,
        hyperparameters: Mapping[str, Any],
        dataset_path: Path | None,
        checkpoint_interval: int,
        resume_from: Path | None,
        max_duration_s: float | None,
        smoke: bool = False,
    ) -> TrainerContract:
        """The trainer contract of one launch whose state lives here.

        The stopped note is always offered: a script that stops early on request can say so there.
        """
        return TrainerContract(
            run_id=run_id,
            checkpoint_dir=self.checkpoints,
            checkpoint_interval=checkpoint_interval,
            metrics_path=self.metrics,
            eval_path=self.eval,
            output_dir=self.output,
            stopped_path=self.stopped,
            hparams=dict(hyperparameters),
            dataset_path=dataset_path,
            resume_from=resume_from,
            max_duration_s=max_duration_s,
            smoke=smoke,
        )
