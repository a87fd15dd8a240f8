"""Every ``GPULINE_*`` name, in one place: the trainer contract and the orchestrator's inputs.

Framework-free on purpose (the standard library only): the supervisor writes the trainer contract,
the Kubernetes manifests put it into pods, and ``gpuline_trainer`` reads it inside the training
process, all through the names and the two functions below. The orchestrator's inputs (what an
action step or a shell sets) are parsed once, in :mod:`gpuline.inputs`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PREFIX = "GPULINE_"

# ---------------------------------------------------------------- the trainer contract
# Set by the supervisor (or a pod's manifest) for the training process; read by gpuline_trainer.
RUN_ID = "GPULINE_RUN_ID"
LEASE_ID = "GPULINE_LEASE_ID"
CHECKPOINT_DIR = "GPULINE_CHECKPOINT_DIR"
CHECKPOINT_INTERVAL = "GPULINE_CHECKPOINT_INTERVAL"
METRICS_PATH = "GPULINE_METRICS_PATH"
EVAL_PATH = "GPULINE_EVAL_PATH"
OUTPUT_DIR = "GPULINE_OUTPUT_DIR"
HPARAMS = "GPULINE_HPARAMS"
SMOKE = "GPULINE_SMOKE"
STOPPED_PATH = "GPULINE_STOPPED_PATH"
DATASET_PATH = "GPULINE_DATASET_PATH"
RESUME_FROM = "GPULINE_RESUME_FROM"
MAX_DURATION_S = "GPULINE_MAX_DURATION_S"
RDZV_ENDPOINT = "GPULINE_RDZV_ENDPOINT"
# Set for eval.command: the folder holding the one model it evaluates (it writes EVAL_PATH).
MODEL_PATH = "GPULINE_MODEL_PATH"
# Set for deploy.command (with MODEL and STAGE): the version promoted and where its files are.
MODEL_VERSION = "GPULINE_MODEL_VERSION"
ARTIFACTS_URI = "GPULINE_ARTIFACTS_URI"
# Preflight's import check prints its report on one line after this marker (the child may print more).
IMPORT_CHECK = "GPULINE_IMPORT_CHECK"

# ---------------------------------------------------------------- the pod contract (Kubernetes, train mode)
# A Job's pod runs ``python -m gpuline.training.in_pod -- <entrypoint>``, which reads these (with
# RUN_ID, HPARAMS, CHECKPOINT_INTERVAL, MAX_DURATION_S, RDZV_ENDPOINT and STORAGE above and below)
# and runs the entrypoint under the supervisor.
CHECKPOINT_KEEP = "GPULINE_CHECKPOINT_KEEP"
ALLOW_FRESH_START = "GPULINE_ALLOW_FRESH_START"
DATASET_URI = "GPULINE_DATASET_URI"
DATASET_SHA256 = "GPULINE_DATASET_SHA256"
ENTRYPOINT_WORKDIR = "GPULINE_ENTRYPOINT_WORKDIR"
NNODES = "GPULINE_NNODES"
NPROCS_PER_NODE = "GPULINE_NPROCS_PER_NODE"
POD_WORKDIR = "GPULINE_POD_WORKDIR"  # the pod's local state (an emptyDir): lost with the pod, by design
GRACE_S = "GPULINE_GRACE_S"  # the pod's terminationGracePeriodSeconds: SIGTERM to SIGKILL

# The pod's exit codes, as the Job's podFailurePolicy reads them. A stop after a final save (SIGTERM,
# eviction, spot reclaim) and an infrastructure error (storage unreachable) may be retried from the
# checkpoint; the user's script failing, a wrong configuration or running out of time would only fail
# again, so they fail the Job at once (FAIL_JOB_EXIT_CODES, sorted as the API wants them).
POD_EXIT_COMPLETED = 0
POD_EXIT_GPULINE_BUG = 1  # an uncaught exception in gpuline itself (or gpuline missing from the image)
POD_EXIT_INVALID = 2  # an InputError: the pod's environment or the dataset is wrong
POD_EXIT_INFRA = 3  # an InfraError: retried (counts towards backoffLimit)
POD_EXIT_TRAINER_FAILED = 42  # the user's script exited non-zero on its own
POD_EXIT_OUT_OF_TIME = 124  # resources.max_duration reached (a checkpoint was saved)
POD_EXIT_STOPPED = 143  # SIGTERM: saved a final checkpoint and stopped
FAIL_JOB_EXIT_CODES = (POD_EXIT_GPULINE_BUG, POD_EXIT_INVALID, POD_EXIT_TRAINER_FAILED, POD_EXIT_OUT_OF_TIME)

# Names a child must never inherit from the parent's environment: they describe one launch only.
PER_LAUNCH = frozenset({RESUME_FROM, DATASET_PATH})

# ---------------------------------------------------------------- orchestrator inputs (gpuline.inputs)
CONFIG = "GPULINE_CONFIG"
POLICY = "GPULINE_POLICY"
POLICY_REF = "GPULINE_POLICY_REF"
TIER = "GPULINE_TIER"
PROVIDER = "GPULINE_PROVIDER"
RUNNER_LABEL = "GPULINE_RUNNER_LABEL"
RUNNER_SCOPE = "GPULINE_RUNNER_SCOPE"
STAGE = "GPULINE_STAGE"
MODEL = "GPULINE_MODEL"
PR_LABELS = "GPULINE_PR_LABELS"
PR_NUMBER = "GPULINE_PR_NUMBER"
BASE_REF = "GPULINE_BASE_REF"
BOOT_GRACE = "GPULINE_BOOT_GRACE"
LEDGER = "GPULINE_LEDGER"
REGISTRY = "GPULINE_REGISTRY"
STORAGE = "GPULINE_STORAGE"
IMAGE_DIGEST = "GPULINE_IMAGE_DIGEST"
PYTHON = "GPULINE_PYTHON"
GITHUB_TOKEN = "GPULINE_GITHUB_TOKEN"
GITHUB_RETRIES = "GPULINE_GITHUB_RETRIES"
COMMENT_KEY = "GPULINE_COMMENT_KEY"
APPROVED_ENVIRONMENT = "GPULINE_APPROVED_ENVIRONMENT"
ESTIMATE_TIER = "GPULINE_ESTIMATE_TIER"
ROLLBACK_REASON = "GPULINE_ROLLBACK_REASON"  # why `gpuline rollback` runs, kept in the stage's history
IMDS_ENDPOINT = "GPULINE_IMDS_ENDPOINT"
S3_CHUNK_MB = "GPULINE_S3_CHUNK_MB"
S3_CONCURRENCY = "GPULINE_S3_CONCURRENCY"
REST_TOKEN = "GPULINE_REST_TOKEN"  # the REST provider's default token_env
ROOT = "GPULINE_ROOT"  # prefixes every path the EC2 user-data script writes (tests run it in a folder)

# ---------------------------------------------------------------- test hooks (unset in real use)
TEST_EC2_FAULTS = "GPULINE_TEST_EC2_FAULTS"
TEST_PAUSE_AT = "GPULINE_TEST_PAUSE_AT"
TEST_PAUSE_FILE = "GPULINE_TEST_PAUSE_FILE"


@dataclass(frozen=True)
class TrainerContract:
    """What the training process is told: where to write, where to resume from, how long it has."""

    run_id: str
    checkpoint_dir: Path
    checkpoint_interval: int
    metrics_path: Path
    eval_path: Path
    output_dir: Path
    stopped_path: Path | None
    hparams: dict[str, Any] = field(default_factory=dict)
    dataset_path: Path | None = None
    resume_from: Path | None = None
    max_duration_s: float | None = None
    smoke: bool = False

    def to_env(self) -> dict[str, str]:
        env = {
            RUN_ID: self.run_id,
            CHECKPOINT_DIR: str(self.checkpoint_dir),
            CHECKPOINT_INTERVAL: str(self.checkpoint_interval),
            METRICS_PATH: str(self.metrics_path),
            EVAL_PATH: str(self.eval_path),
            OUTPUT_DIR: str(self.output_dir),
            HPARAMS: encode_hparams(self.hparams),
            SMOKE: "1" if self.smoke else "0",
            # Lines reach the log as they are printed, not when a buffer fills.
            "PYTHONUNBUFFERED": "1",
        }
        if self.stopped_path is not None:
            # Optional for scripts: note here that they stopped early because they were asked to.
            env[STOPPED_PATH] = str(self.stopped_path)
        if self.dataset_path is not None:
            env[DATASET_PATH] = str(self.dataset_path)
        if self.resume_from is not None:
            env[RESUME_FROM] = str(self.resume_from)
        if self.max_duration_s is not None:
            env[MAX_DURATION_S] = f"{max(self.max_duration_s, 0.0):.0f}"
        return env

    @classmethod
    def from_env(cls, env: Mapping[str, str], *, local_dir: Path) -> TrainerContract:
        """Read the contract; outside a supervisor every path falls back to a folder in ``local_dir``.

        Raises ``ValueError`` naming the variable when a value cannot be parsed.
        """

        def path(name: str, default: Path) -> Path:
            value = env.get(name)
            return Path(value) if value else default

        def optional(name: str) -> Path | None:
            value = env.get(name)
            return Path(value) if value else None

        return cls(
            run_id=env.get(RUN_ID) or "local",
            checkpoint_dir=path(CHECKPOINT_DIR, local_dir / "checkpoints"),
            checkpoint_interval=max(_int(env, CHECKPOINT_INTERVAL, 100), 1),
            metrics_path=path(METRICS_PATH, local_dir / "metrics.jsonl"),
            eval_path=path(EVAL_PATH, local_dir / "eval.json"),
            output_dir=path(OUTPUT_DIR, local_dir / "output"),
            stopped_path=optional(STOPPED_PATH),
            hparams=_hparams(env.get(HPARAMS) or "{}"),
            dataset_path=optional(DATASET_PATH),
            resume_from=optional(RESUME_FROM),
            max_duration_s=float(env[MAX_DURATION_S]) if env.get(MAX_DURATION_S) else None,
            smoke=env.get(SMOKE) == "1",
        )


def encode_hparams(hparams: Mapping[str, Any]) -> str:
    """The value of ``GPULINE_HPARAMS``: one JSON object, keys sorted so equal hyperparameters read equal."""
    return json.dumps(dict(hparams), sort_keys=True)


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name} is not a whole number: {raw[:40]!r}") from None


def _hparams(raw: str) -> dict[str, Any]:
    try:
        hparams = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"{HPARAMS} is not JSON: {exc}") from exc
    if not isinstance(hparams, dict):
        raise ValueError(f"{HPARAMS} must be a JSON object")
    return hparams
