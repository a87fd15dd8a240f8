"""The training contract inside a pod: what a train-mode Job's pod is told, how long it has to stop, and
how the Job tells a preemption from a crash.

The pod runs ``python -m gpuline.training.in_pod -- <entrypoint>`` (see :mod:`gpuline.training.in_pod`),
which runs the entrypoint under the same supervisor as on a laptop: checkpoints, metrics, the eval
output and the model go to the run's storage under ``runs/<run_id>/``; a recreated pod resumes from
the newest valid checkpoint there; SIGTERM (eviction, spot reclaim, deletion) becomes a final save
within ``terminationGracePeriodSeconds``. The pod's exit code says what happened
(:data:`gpuline.contract.FAIL_JOB_EXIT_CODES`), and the Job's ``podFailurePolicy`` acts on it: a pod
the cluster disrupted (the ``DisruptionTarget`` condition) is replaced and resumes, one whose user
script failed fails the Job with no retry.
"""

from __future__ import annotations

import math
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import urlparse

from gpuline import contract
from gpuline.providers.base import LeaseRequest
from gpuline.providers.k8s_options import KubernetesOptions

IN_POD = ("python", "-m", "gpuline.training.in_pod")
CONTAINER = "train"
STATE_VOLUME = "gpuline-state"
STATE_MOUNT = "/var/lib/gpuline"
DEFAULT_GRACE_S = 120  # what EC2 gives a spot instance between the notice and the reclaim
MIN_GRACE_S = 30  # Kubernetes' own default: never give a pod less than it would get anyway
DISRUPTION = "DisruptionTarget"


def supervised(options: KubernetesOptions) -> bool:
    """Whether the pod runs the entrypoint under gpuline's supervisor (the image then needs gpuline)."""
    return options.mode == "train" and options.supervisor and options.command is None


def grace_seconds(options: KubernetesOptions) -> int:
    """SIGTERM to SIGKILL: given, else twice the measured final save plus room to start it, else 120 s."""
    if options.termination_grace_s is not None:
        return options.termination_grace_s
    if options.checkpoint_save_s is not None:
        return max(MIN_GRACE_S, math.ceil(2 * options.checkpoint_save_s) + 10)
    return DEFAULT_GRACE_S


def backoff_limit(request: LeaseRequest, options: KubernetesOptions) -> int:
    """Pods replaced after a failure the policy counts: the run's restarts in train mode, none for a runner."""
    if options.backoff_limit is not None:
        return options.backoff_limit
    return request.spec.checkpoint.max_restarts if options.mode == "train" else 0


def failure_policy(options: KubernetesOptions) -> dict[str, Any]:
    """A disrupted pod first (its exit code is whatever SIGTERM made it), then the codes that fail the Job."""
    disrupted = "Ignore" if options.retry_preemptions == "always" else "Count"
    return {
        "rules": [
            {"action": disrupted, "onPodConditions": [{"type": DISRUPTION, "status": "True"}]},
            {
                "action": "FailJob",
                "onExitCodes": {
                    "containerName": CONTAINER,
                    "operator": "In",
                    "values": sorted(contract.FAIL_JOB_EXIT_CODES),
                },
            },
        ]
    }


def storage_uri(request: LeaseRequest, options: KubernetesOptions) -> str:
    """The run's storage as a pod reaches it: s3:// in practice. A local path relative to gpuline.yml is
    made absolute, which only pods sharing that filesystem reach (a one-node cluster, a shared volume)."""
    uri = options.storage or request.spec.backends.storage
    if urlparse(uri).scheme not in ("", "file"):
        return uri
    path = PurePosixPath(uri.removeprefix("file://"))
    if path.is_absolute():
        return uri
    return f"file://{PurePosixPath(request.project_dir.resolve()) / path}"


def pod_env(request: LeaseRequest, options: KubernetesOptions, *, distributed: bool) -> dict[str, str]:
    """What the in-pod entry reads (the trainer contract's own paths are set by the supervisor)."""
    spec = request.spec
    resources = spec.resources
    env = {
        contract.STORAGE: storage_uri(request, options),
        contract.POD_WORKDIR: STATE_MOUNT,
        contract.CHECKPOINT_INTERVAL: str(spec.checkpoint.interval_steps),
        contract.CHECKPOINT_KEEP: str(spec.checkpoint.keep),
        contract.ALLOW_FRESH_START: "1" if spec.checkpoint.allow_fresh_start else "0",
        contract.MAX_DURATION_S: str(int(resources.max_duration)),
        contract.DATASET_URI: spec.dataset.uri,
        contract.DATASET_SHA256: spec.dataset.sha256,
        contract.GRACE_S: str(grace_seconds(options)),
        contract.NNODES: str(resources.nodes if distributed else 1),
        contract.NPROCS_PER_NODE: str(resources.procs_per_node),
        "PYTHONUNBUFFERED": "1",  # the pod's log shows lines as they are printed
    }
    if spec.entrypoint.workdir not in ("", "."):
        env[contract.ENTRYPOINT_WORKDIR] = spec.entrypoint.workdir
    return env


def in_pod_command(request: LeaseRequest) -> list[str]:
    return [*IN_POD, "--", *request.spec.entrypoint.command]


def add_state_volume(pod_spec: dict[str, Any], container: dict[str, Any]) -> None:
    """The supervisor's local state on an emptyDir: a replacement pod starts clean and resumes from storage."""
    pod_spec.setdefault("volumes", []).append({"name": STATE_VOLUME, "emptyDir": {}})
    container.setdefault("volumeMounts", []).append({"name": STATE_VOLUME, "mountPath": STATE_MOUNT})
