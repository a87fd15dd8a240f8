"""``resources.options`` of the kubernetes provider: one pydantic model, so a typo fails with its field name."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from gpuline.spec import Tier


class Toleration(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: str | None = None
    operator: Literal["Exists", "Equal"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    tolerationSeconds: int | None = None  # the Kubernetes field name, as written in manifests


class SpotPlacement(BaseModel):
    """Where spot (preemptible) nodes are, in this cluster's terms."""

    model_config = ConfigDict(extra="forbid")

    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)


class KubernetesOptions(BaseModel):
    """``resources.options`` for the kubernetes provider."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["train", "runner"] = Field(
        default="train", description="train: the pod runs the entrypoint; runner: a JIT GitHub runner."
    )
    namespace: str = "default"
    kubeconfig: str | None = Field(default=None, description="Default: KUBECONFIG, then ~/.kube/config.")
    context: str | None = None
    in_cluster: bool | None = Field(default=None, description="Default: when KUBERNETES_SERVICE_HOST is set.")
    image: str | None = Field(default=None, description="Container image (default: resources.image).")
    command: list[str] | None = Field(default=None, description="Overrides the entrypoint-derived command.")
    working_dir: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    env_from_secret: str | None = Field(default=None, description="A Secret whose keys become env vars.")
    queue: str | None = Field(
        default=None,
        description="Kueue LocalQueue (the Job waits suspended for admission), or the Volcano queue with "
        "scheduler: volcano.",
    )
    scheduler: Literal["default", "volcano"] = Field(
        default="default",
        description="volcano: gang-schedule the pods with Volcano (schedulerName, a PodGroup of resources.nodes).",
    )
    mig_strategy: Literal["mixed", "single"] = Field(
        default="mixed",
        description="How the cluster advertises MIG slices: mixed, as nvidia.com/mig-<profile>; single, as "
        "nvidia.com/gpu (select the nodes with node_selector and {mig_profile}).",
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Values may use {gpu_type}, e.g. {gpu: '{gpu_type}'}."
    )
    tolerations: list[Toleration] | None = Field(
        default=None, description="Default: tolerate the nvidia.com/gpu taint when GPUs are requested."
    )
    spot: SpotPlacement = Field(default_factory=SpotPlacement)
    cpu: str | None = None
    memory: str | None = None
    shm_size: str = Field(default="8Gi", description="/dev/shm for multi-process data loading and NCCL.")
    service_account: str | None = None
    automount_service_account_token: bool = False
    priority_class: str | None = Field(
        default=None, description="The pods' PriorityClass (wins over priority_classes)."
    )
    priority_classes: dict[Tier, str] = Field(
        default_factory=dict,
        description="The pods' PriorityClass per tier, e.g. {nightly: research, release: production}.",
    )
    workload_priority_classes: dict[Tier, str] = Field(
        default_factory=dict,
        description="With queue (Kueue): the WorkloadPriorityClass per tier (label kueue.x-k8s.io/priority-class).",
    )
    image_pull_secrets: list[str] = Field(default_factory=list)
    ttl_after_finished_s: int = Field(default=600, ge=0)
    backoff_limit: int | None = Field(
        default=None, ge=0, description="Default: checkpoint.max_restarts in train mode, 0 in runner mode."
    )
    supervisor: bool = Field(
        default=True,
        description="train mode: run the entrypoint under gpuline's supervisor in the pod (the image needs gpuline).",
    )
    storage: str | None = Field(
        default=None, description="The run's storage as the pods reach it (default: backends.storage)."
    )
    termination_grace_s: int | None = Field(
        default=None,
        ge=1,
        description="Seconds from SIGTERM to SIGKILL (default: from checkpoint_save_s, else 120 as EC2 spot gives).",
    )
    checkpoint_save_s: float | None = Field(
        default=None, gt=0, description="Measured seconds for a final save and upload; sizes the grace period."
    )
    retry_preemptions: Literal["max_restarts", "always"] = Field(
        default="max_restarts",
        description="max_restarts: an evicted pod counts towards backoffLimit; always: it never does (Ignore).",
    )
    multi_node: Literal["auto", "trainjob", "pytorchjob", "indexed-job"] = Field(
        default="auto",
        description="The engine for nodes > 1: trainjob (Kubeflow Trainer v2), pytorchjob (Training Operator v1), "
        "indexed-job (a Job and a headless Service); auto: the first of these the cluster's API serves.",
    )
    runtime: str = Field(
        default="torch-distributed",
        description="trainjob: the ClusterTrainingRuntime the TrainJob runs on (a torch runtime: it sets PET_*).",
    )
    runner_image: str | None = Field(
        default=None, description="runner mode: an image with the Actions runner in /home/runner (required)."
    )
    labels: dict[str, str] = Field(default_factory=dict)
