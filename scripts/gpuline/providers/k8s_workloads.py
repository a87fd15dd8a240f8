"""The kinds of workload the kubernetes provider creates, side by side: where each lives in the API,
which of its conditions end it, whether its pods run, and how its pods are numbered.

A batch/v1 ``Job`` (one node, or an Indexed Job for several), a Kubeflow Trainer v2 ``TrainJob`` and a
Training Operator v1 ``PyTorchJob``. The rest of the provider (create, read, delete, list, follow)
looks the kind up here instead of asking "is it a Job?" in each place. The condition names are
the controllers' own: a Job's ``Complete``/``Failed``, a TrainJob's ``Complete``/``Failed`` (copied
from its JobSet; kubeflow/trainer ``pkg/apis/trainer/v1alpha1/trainjob_types.go``), a PyTorchJob's
``Succeeded``/``Failed`` (kubeflow/training-operator ``pkg/apis/kubeflow.org/v1/common_types.go``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from gpuline.errors import NotFoundError

End = Literal["Complete", "Failed", "Deleted"]

# Labels the Training Operator puts on a PyTorchJob's pods (common_types.go): which replica a pod is.
REPLICA_TYPE_LABEL = "training.kubeflow.org/replica-type"
REPLICA_INDEX_LABEL = "training.kubeflow.org/replica-index"
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"


@dataclass(frozen=True)
class WorkloadKind:
    """One kind of workload: its instance-id prefix, its API kind and place, and how it ends."""

    key: str  # the first part of an instance id: ``<key>/<namespace>/<name>``
    kind: str
    api: tuple[str, str, str] | None  # (group, version, plural) of a custom resource; None: batch/v1
    ends: Mapping[str, End]  # a terminal condition's type -> how the run ended

    @property
    def group(self) -> str:
        return "batch" if self.api is None else self.api[0]

    @property
    def api_version(self) -> str:
        return "batch/v1" if self.api is None else f"{self.api[0]}/{self.api[1]}"


JOB = WorkloadKind("job", "Job", None, {"Complete": "Complete", "Failed": "Failed"})
TRAINJOB = WorkloadKind(
    "trainjob",
    "TrainJob",
    ("trainer.kubeflow.org", "v1alpha1", "trainjobs"),
    {"Complete": "Complete", "Failed": "Failed"},
)
PYTORCHJOB = WorkloadKind(
    "pytorchjob", "PyTorchJob", ("kubeflow.org", "v1", "pytorchjobs"), {"Succeeded": "Complete", "Failed": "Failed"}
)
KINDS: dict[str, WorkloadKind] = {k.key: k for k in (JOB, TRAINJOB, PYTORCHJOB)}
CUSTOM = tuple(k for k in KINDS.values() if k.api is not None)


def kind_of(obj: Mapping[str, Any]) -> WorkloadKind:
    """The kind of a workload object as the API returned it (a typed Job read back may lack ``kind``)."""
    name = obj.get("kind") or "Job"
    return next((k for k in KINDS.values() if k.kind == name), JOB)


def parse_id(instance_id: str) -> tuple[WorkloadKind, str, str]:
    parts = instance_id.split("/")
    if len(parts) != 3 or parts[0] not in KINDS or not all(parts):
        raise NotFoundError(
            f"{instance_id!r} is not a kubernetes instance id",
            hint=f"ids look like {'|'.join(KINDS)}/NAMESPACE/NAME (see `gpuline status`)",
        )
    return KINDS[parts[0]], parts[1], parts[2]


def workload_end(obj: Mapping[str, Any]) -> tuple[End, str, str] | None:
    """The workload's terminal condition (how it ended, reason, message); None while it runs."""
    ends = kind_of(obj).ends
    for condition in (obj.get("status") or {}).get("conditions") or []:
        end = ends.get(condition.get("type", ""))
        if end is not None and condition.get("status") == "True":
            return end, condition.get("reason") or "", condition.get("message") or ""
    return None


def has_active_pods(obj: Mapping[str, Any]) -> bool:
    """Whether any pod of the workload runs: a Job's ``active``, a PyTorchJob's ``replicaStatuses``,
    a TrainJob's ``jobsStatus`` (one per replicated job of its JobSet)."""
    status = obj.get("status") or {}
    counts = [status.get("active")]
    counts += [s.get("active") for s in (status.get("replicaStatuses") or {}).values()]
    counts += [s.get("active") for s in status.get("jobsStatus") or []]
    return any(int(c or 0) > 0 for c in counts)


def pod_rank(pod: Mapping[str, Any]) -> int:
    """The pod's node rank: a PyTorchJob's master is 0 and worker i is i + 1 (as the operator sets
    ``RANK``); a Job's or a TrainJob's pod has its completion index. Pod 0 commits checkpoints."""
    meta = pod.get("metadata", {})
    labels = meta.get("labels") or {}
    replica = labels.get(REPLICA_TYPE_LABEL)
    if replica is not None:
        index = str(labels.get(REPLICA_INDEX_LABEL, "0"))
        return 0 if replica == "master" else 1 + (int(index) if index.isdigit() else 0)
    raw = str((meta.get("annotations") or {}).get(COMPLETION_INDEX, "0"))
    return int(raw) if raw.isdigit() else 0
