"""Kubernetes manifests for a lease, as plain dicts: no SDK needed to build, print or validate them.

One lease is one Job (``activeDeadlineSeconds`` = the TTL, so the cluster itself enforces it) whose
pods either train directly or run one just-in-time GitHub runner. More than one node is an Indexed
Job plus a headless Service: pod ``<job>-0`` is the c10d rendezvous every pod's ``torchrun`` meets
at, reachable as ``<job>-0.<service>``. Where Kubeflow runs distributed training, the workload is
what it schedules instead: a Trainer v2 TrainJob (:mod:`gpuline.providers.k8s_trainjob`) or a Training
Operator v1 PyTorchJob, whose controllers give the pods torchrun's ``PET_*`` environment themselves.
"""

from __future__ import annotations

import json
import re
import shlex
from typing import Any, Literal

from gpuline import contract
from gpuline.errors import ConfigError
from gpuline.providers import k8s_gpu, k8s_pod, k8s_queue
from gpuline.providers.base import TAG_EXPIRES_AT, TAG_LEASE_ID, TAG_MANAGED, TAG_RUN_ID, LeaseRequest
from gpuline.providers.k8s_options import KubernetesOptions, SpotPlacement, Toleration
from gpuline.providers.k8s_trainjob import build_trainjob
from gpuline.training.launch import TORCHRUN, entrypoint_args, torchrun_argv

RDZV_PORT = 29400
# What runs more than one node: a Kubeflow Trainer TrainJob, a Training Operator PyTorchJob, or an
# Indexed Job with a headless Service (no operator needed).
Engine = Literal["trainjob", "pytorchjob", "indexed-job"]
LABEL_PREFIX = "gpuline/"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
GPU_RESOURCE = "nvidia.com/gpu"
JIT_KEY = "jitconfig"

# Tags that become labels (selectable); every tag is also kept verbatim as an annotation.
_LABELLED = (TAG_RUN_ID, TAG_LEASE_ID, TAG_MANAGED, "gpuline:team", "gpuline:tier")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def object_name(lease_id: str) -> str:
    """``gpuline-<lease hex>``: unique per lease, DNS-1123, short enough for ``<name>-<index>`` pods."""
    suffix = re.sub(r"[^a-z0-9-]", "-", lease_id.lower().removeprefix("lease-")).strip("-")
    return f"gpuline-{suffix}"[:52]


def label_key(tag: str) -> str:
    return LABEL_PREFIX + tag.removeprefix("gpuline:")


def label_value(value: str) -> str:
    cleaned = re.sub(r"[^-A-Za-z0-9_.]", "_", value)[:63].strip("-_.")
    return cleaned if _LABEL_VALUE.match(cleaned) else ""


def labels_for(request: LeaseRequest, options: KubernetesOptions) -> dict[str, str]:
    labels = {label_key(k): label_value(v) for k, v in request.tags.items() if k in _LABELLED}
    labels[label_key(TAG_MANAGED)] = "true"
    # The expiry as epoch seconds: a label (unlike the ISO annotation) so `kubectl get -l` can see it.
    labels[label_key(TAG_EXPIRES_AT)] = str(int(request.expires_at.timestamp()))
    return {**options.labels, **labels}


def annotations_for(request: LeaseRequest, created_at: str) -> dict[str, str]:
    notes = {label_key(k): v for k, v in request.tags.items()}
    notes[label_key("created-at")] = created_at
    return notes


def build_manifests(
    request: LeaseRequest, options: KubernetesOptions, *, created_at: str, engine: Engine = "indexed-job"
) -> list[dict[str, Any]]:
    """Every object the lease needs, in creation order: the workload first (so the lease is findable
    as early as possible), then what hangs off it. ``engine`` is what runs more than one node (the
    provider picks it from the cluster's API discovery); one node is always a Job."""
    resources = request.spec.resources
    nodes = resources.nodes
    if options.mode == "runner" and nodes > 1:
        raise ConfigError(
            "resources.options.mode: a runner is one machine, but resources.nodes is " + str(nodes),
            hint="use mode: train for multi-node, or nodes: 1",
        )
    if options.mode == "runner" and (request.runner is None or not request.runner.jit_config):
        raise ConfigError(
            "resources.options.mode is runner but no JIT runner was registered",
            hint="pass --runner-label (and a GitHub token) to provision, or use mode: train",
        )
    name = object_name(request.lease_id)
    labels = labels_for(request, options)
    annotations = annotations_for(request, created_at)
    meta = {"name": name, "namespace": options.namespace, "labels": labels, "annotations": annotations}
    engine = engine if nodes > 1 else "indexed-job"
    operator = engine != "indexed-job"  # a controller runs the pods and gives them torchrun's rendezvous
    pod = _pod_template(request, options, name, labels, distributed=nodes > 1 and not operator)
    if operator:
        _for_an_operator(request, options, pod)
    out: list[dict[str, Any]] = []
    if engine == "trainjob":
        suspend = k8s_queue.kueue_managed(options)
        meta_labels = {**labels, **k8s_queue.workload_labels(request, options)}
        out.append(build_trainjob(request, options, {**meta, "labels": meta_labels}, pod, suspend=suspend))
    elif engine == "pytorchjob":
        out.append(_pytorchjob(request, options, meta, pod))
    else:
        out.append(_job(request, options, meta, pod))
        if nodes > 1:
            out.append(_headless_service(options, name, labels, annotations))
    if options.mode == "runner" and request.runner is not None:
        out.append(_jit_secret(options, name, labels, request.runner.jit_config))
    out += gang(request, options, meta, pod)  # scheduler: volcano: the PodGroup (k8s_queue)
    return out


def _job(
    request: LeaseRequest, options: KubernetesOptions, meta: dict[str, Any], pod: dict[str, Any]
) -> dict[str, Any]:
    nodes = request.spec.resources.nodes
    job_labels = dict(meta["labels"])
    spec: dict[str, Any] = {
        # The lease's TTL enforced by the cluster itself, whatever happens to gpuline.
        "activeDeadlineSeconds": request.ttl_seconds,
        "ttlSecondsAfterFinished": options.ttl_after_finished_s,
        "backoffLimit": k8s_pod.backoff_limit(request, options),
        "completions": nodes,
        "parallelism": nodes,
        "template": pod,
    }
    if nodes > 1:
        spec["completionMode"] = "Indexed"
    if k8s_pod.supervised(options):
        # Needs restartPolicy Never on the pod (set below): the Job, not the kubelet, replaces pods.
        spec["podFailurePolicy"] = k8s_pod.failure_policy(options)
    if k8s_queue.kueue_managed(options):
        job_labels.update(k8s_queue.workload_labels(request, options))
        # Kueue admits a suspended Job when its queue has quota; the deadline only runs once admitted.
        spec["suspend"] = True
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {**meta, "labels": job_labels}, "spec": spec}


def _headless_service(
    options: KubernetesOptions, name: str, labels: dict[str, str], annotations: dict[str, str]
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": options.namespace, "labels": labels, "annotations": annotations},
        "spec": {
            "clusterIP": "None",
            # Pods must resolve each other before they are Ready: rendezvous happens before readiness.
            "publishNotReadyAddresses": True,
            "selector": {label_key(TAG_LEASE_ID): labels[label_key(TAG_LEASE_ID)]},
            "ports": [{"name": "c10d", "port": RDZV_PORT, "targetPort": RDZV_PORT, "protocol": "TCP"}],
        },
    }


def _jit_secret(options: KubernetesOptions, name: str, labels: dict[str, str], jit: str) -> dict[str, Any]:
    # A Secret, not an env value in the Job: a Job spec is readable by anyone who can `get jobs`.
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": f"{name}-jit", "namespace": options.namespace, "labels": labels},
        "type": "Opaque",
        "stringData": {JIT_KEY: jit},
    }


def _pytorchjob(
    request: LeaseRequest, options: KubernetesOptions, meta: dict[str, Any], pod: dict[str, Any]
) -> dict[str, Any]:
    resources = request.spec.resources
    container = pod["spec"]["containers"][0]
    container["name"] = "pytorch"  # the training operator finds the container by this name
    run_policy: dict[str, Any] = {
        "activeDeadlineSeconds": request.ttl_seconds,
        "ttlSecondsAfterFinished": options.ttl_after_finished_s,
        "backoffLimit": k8s_pod.backoff_limit(request, options),
        "cleanPodPolicy": "All",
    }
    job_labels = dict(meta["labels"])
    if k8s_queue.kueue_managed(options):
        job_labels.update(k8s_queue.workload_labels(request, options))
        run_policy["suspend"] = True
    replica = {"restartPolicy": "Never", "template": pod}
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {**meta, "labels": job_labels},
        "spec": {
            "nprocPerNode": str(resources.procs_per_node),
            "runPolicy": run_policy,
            "pytorchReplicaSpecs": {
                "Master": {"replicas": 1, **replica},
                "Worker": {"replicas": resources.nodes - 1, **json.loads(json.dumps(replica))},
            },
        },
    }


# The operators' own names for torchrun's rendezvous, the same in a TrainJob's and a PyTorchJob's pods
# (kubeflow/trainer pkg/constants/constants.go; kubeflow/training-operator pkg/controller.v1/pytorch).
PET_RENDEZVOUS = "$(PET_MASTER_ADDR):$(PET_MASTER_PORT)"
PET_NODE_RANK = "$(PET_NODE_RANK)"


def _for_an_operator(request: LeaseRequest, options: KubernetesOptions, pod: dict[str, Any]) -> None:
    """The pod template as a TrainJob's or PyTorchJob's controller runs it: every pod is one node of
    ``resources.nodes``, and the controller, not gpuline, knows where rank 0 is."""
    container = pod["spec"]["containers"][0]
    for item in container["env"]:
        if item["name"] == contract.NNODES:
            item["value"] = str(request.spec.resources.nodes)
    if options.command is not None:
        return
    if k8s_pod.supervised(options):
        # The kubelet expands $(VAR) in a command from the container's whole environment, the variables
        # the controller adds included (it appends them after ours, so an env value could not refer to
        # them). `env` hands the supervisor the rendezvous and this pod's rank under the names it reads.
        handover = [f"{contract.RDZV_ENDPOINT}={PET_RENDEZVOUS}", f"JOB_COMPLETION_INDEX={PET_NODE_RANK}"]
        container["command"] = ["env", *handover, *k8s_pod.in_pod_command(request)]
    else:
        # torchrun reads PET_NNODES, PET_NODE_RANK, PET_MASTER_ADDR... as the defaults of its options.
        container["command"] = [*TORCHRUN, *entrypoint_args(request.spec.entrypoint.command)]


# ---------------------------------------------------------------- the pod


def _pod_template(
    request: LeaseRequest, options: KubernetesOptions, name: str, labels: dict[str, str], *, distributed: bool
) -> dict[str, Any]:
    resources = request.spec.resources
    container = _container(request, options, name, distributed=distributed)
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "containers": [container],
        "automountServiceAccountToken": options.automount_service_account_token,
        "nodeSelector": _node_selector(request, options),
        "tolerations": _tolerations(request, options),
    }
    if distributed:
        spec["subdomain"] = name  # pods become <job>-<index>.<service>
    if options.mode == "train":
        # Long enough for the final save and its upload after SIGTERM (eviction, spot reclaim).
        spec["terminationGracePeriodSeconds"] = k8s_pod.grace_seconds(options)
    if options.service_account:
        spec["serviceAccountName"] = options.service_account
    priority = k8s_queue.priority_class(request, options)  # explicit, else the tier's
    if priority:
        spec["priorityClassName"] = priority
    if options.image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": n} for n in options.image_pull_secrets]
    if resources.gpu_count > 1 or resources.procs_per_node > 1:
        spec["volumes"] = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": options.shm_size}}]
        container["volumeMounts"] = [{"name": "dshm", "mountPath": "/dev/shm"}]
    if k8s_pod.supervised(options):
        k8s_pod.add_state_volume(spec, container)
    if not spec["nodeSelector"]:
        del spec["nodeSelector"]
    if not spec["tolerations"]:
        del spec["tolerations"]
    metadata: dict[str, Any] = {"labels": dict(labels)}
    if options.scheduler == k8s_queue.VOLCANO:
        k8s_queue.volcano_pod(spec, metadata, name, options)  # the PodGroup has the workload's name
    return {"metadata": metadata, "spec": spec}


def _container(request: LeaseRequest, options: KubernetesOptions, name: str, *, distributed: bool) -> dict[str, Any]:
    resources = request.spec.resources
    limits: dict[str, str] = {}
    requests: dict[str, str] = {}
    if resources.gpu_count > 0:
        # Whole GPUs, or MIG slices (gpu_type a100-mig-1g.5gb: nvidia.com/mig-1g.5gb under the mixed strategy).
        limits[k8s_gpu.gpu_resource(resources.gpu_type, options.mig_strategy)] = str(resources.gpu_count)
    if options.cpu:
        requests["cpu"] = options.cpu
    if options.memory:
        requests["memory"] = limits["memory"] = options.memory
    values = _env(request, options, name, distributed=distributed)
    env: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in values.items()]
    container: dict[str, Any] = {"name": "runner" if options.mode == "runner" else k8s_pod.CONTAINER}
    if options.mode == "runner":
        if not options.runner_image:
            raise ConfigError(
                "resources.options.runner_image is required in runner mode",
                hint="set it to the Actions runner image your cluster pulls (the runner in /home/runner)",
            )
        container["image"] = options.runner_image
        container["command"] = ["/home/runner/run.sh"]
        env.append(
            {
                # The runner reads its --jitconfig flag from this variable; the value stays in the Secret.
                "name": "ACTIONS_RUNNER_INPUT_JITCONFIG",
                "valueFrom": {"secretKeyRef": {"name": f"{name}-jit", "key": JIT_KEY}},
            }
        )
    else:
        image = options.image or resources.image
        if not image:
            raise ConfigError(
                "the kubernetes provider needs a container image",
                hint="set resources.image (or resources.options.image) to an image holding the training code",
            )
        container["image"] = image
        container["command"] = options.command or _train_command(request, options, distributed=distributed)
        if options.working_dir:
            container["workingDir"] = options.working_dir
    container["env"] = env
    if options.env_from_secret:
        container["envFrom"] = [{"secretRef": {"name": options.env_from_secret}}]
    container["resources"] = {k: v for k, v in (("limits", limits), ("requests", requests)) if v}
    return container


def _env(request: LeaseRequest, options: KubernetesOptions, name: str, *, distributed: bool) -> dict[str, str]:
    env = {
        contract.RUN_ID: request.run_id,
        contract.LEASE_ID: request.lease_id,
        contract.HPARAMS: contract.encode_hparams(request.spec.hyperparameters),
        **options.env,
    }
    if distributed:
        env[contract.RDZV_ENDPOINT] = rdzv_endpoint(name)
    if k8s_pod.supervised(options):
        env = {**k8s_pod.pod_env(request, options, distributed=distributed), **env}
    return env


def rdzv_endpoint(name: str) -> str:
    return f"{name}-0.{name}:{RDZV_PORT}"


def _train_command(request: LeaseRequest, options: KubernetesOptions, *, distributed: bool) -> list[str]:
    resources = request.spec.resources
    if k8s_pod.supervised(options):
        return k8s_pod.in_pod_command(request)  # the supervisor in the pod launches torchrun when needed
    command = list(request.spec.entrypoint.command)
    if not distributed and resources.procs_per_node == 1:
        return command
    return torchrun_argv(
        command,
        run_id=request.run_id,
        nnodes=resources.nodes if distributed else 1,
        nprocs_per_node=resources.procs_per_node,
        rdzv=rdzv_endpoint(object_name(request.lease_id)) if distributed else None,
    )


def _node_selector(request: LeaseRequest, options: KubernetesOptions) -> dict[str, str]:
    selector = {k: _fill(v, request.spec.resources.gpu_type) for k, v in options.node_selector.items()}
    if request.lane == "spot":
        selector.update(options.spot.node_selector)
    return selector


def _fill(value: str, gpu_type: str) -> str:
    """``{gpu_type}``, ``{gpu}`` (a MIG slice's card) and ``{mig_profile}`` in a node selector value."""
    for placeholder, text in k8s_gpu.placeholders(gpu_type).items():
        value = value.replace(placeholder, text)
    return value


def gang(
    request: LeaseRequest, options: KubernetesOptions, meta: dict[str, Any], pod: dict[str, Any]
) -> list[dict[str, Any]]:
    """With ``scheduler: volcano``, the PodGroup that gang-schedules the workload's pods; else nothing."""
    if options.scheduler != k8s_queue.VOLCANO:
        return []
    limits = pod["spec"]["containers"][0].get("resources", {}).get("limits", {})
    per_pod = {
        k: v for k, v in limits.items() if k == k8s_gpu.GPU_RESOURCE or k.startswith(k8s_gpu.MIG_RESOURCE_PREFIX)
    }
    return [k8s_queue.podgroup(request, options, meta, per_pod)]


def _tolerations(request: LeaseRequest, options: KubernetesOptions) -> list[dict[str, Any]]:
    if options.tolerations is not None:
        chosen = list(options.tolerations)
    elif request.spec.resources.gpu_count > 0:
        chosen = [Toleration(key=GPU_RESOURCE, operator="Exists", effect="NoSchedule")]
    else:
        chosen = []
    if request.lane == "spot":
        chosen += options.spot.tolerations
    return [t.model_dump(exclude_none=True) for t in chosen]


def describe_command(manifest: dict[str, Any]) -> str:
    """The command a manifest's first container runs, for logs (never includes env values)."""
    spec = manifest.get("spec", {})
    if "trainer" in spec:  # a TrainJob: the trainer's command, run in each node of its runtime
        return shlex.join(spec["trainer"].get("command", []))
    template = spec.get("template") or spec.get("pytorchReplicaSpecs", {}).get("Master", {}).get("template", {})
    containers = template.get("spec", {}).get("containers", [{}])
    return shlex.join(containers[0].get("command", []))


# The options' models live in k8s_options; importable from here, where callers found them first.
__all__ = ["KubernetesOptions", "SpotPlacement", "Toleration", "build_manifests", "describe_command", "object_name"]
