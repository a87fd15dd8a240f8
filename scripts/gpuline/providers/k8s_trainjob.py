"""A Kubeflow Trainer v2 ``TrainJob`` for a multi-node lease, built with the Trainer's own API models
(``kubeflow-trainer-api``), so every field is typed and validated as it is set.

A TrainJob names a ``ClusterTrainingRuntime`` (``runtimeRef``; ``torch-distributed`` unless
``resources.options.runtime`` says otherwise) and says what differs for this run: the image, the
command, the environment, ``numNodes``, ``numProcPerNode`` and ``resourcesPerNode`` (``spec.trainer``).
The Trainer turns the two into a JobSet whose replicated job ``node`` is an Indexed Job of
``numNodes`` pods, and its torch plugin gives each pod torchrun's environment (``PET_NNODES``,
``PET_NPROC_PER_NODE``, ``PET_NODE_RANK`` from the completion index, ``PET_MASTER_ADDR`` =
``<name>-node-0-0.<name>``, ``PET_MASTER_PORT``; kubeflow/trainer
``pkg/runtime/framework/plugins/torch/torch.go``).

What the pods need beyond that (gpuline's labels, so the orchestrator finds them; the supervisor's
``emptyDir``; the grace period; node selector and tolerations) is a ``runtimePatches`` entry on the
``node`` pod template, the only way a TrainJob may change its runtime's pods. Everything else about
the pods (restart policy, priority class, scheduler, service-account token) is the runtime's.
"""

from __future__ import annotations

from typing import Any

from gpuline.errors import ConfigError
from gpuline.providers.base import LeaseRequest
from gpuline.providers.k8s_options import KubernetesOptions
from gpuline.providers.k8s_workloads import TRAINJOB

TRAINER_NODE = "node"  # the runtime's trainer replicated job and its container (Trainer's constants.Node)
RUNTIME_KIND = "ClusterTrainingRuntime"
PATCH_MANAGER = "gpuline/kubernetes-provider"  # who owns the patch, as runtimePatches keys them


def build_trainjob(
    request: LeaseRequest, options: KubernetesOptions, meta: dict[str, Any], pod: dict[str, Any], *, suspend: bool
) -> dict[str, Any]:
    """The TrainJob as a plain manifest: the models' own serialisation (by alias, no unset fields)."""
    from kubeflow_trainer_api.models.io_k8s_apimachinery_pkg_apis_meta_v1_object_meta import (
        IoK8sApimachineryPkgApisMetaV1ObjectMeta as ObjectMeta,
    )
    from kubeflow_trainer_api.models.trainer_v1alpha1_runtime_ref import TrainerV1alpha1RuntimeRef
    from kubeflow_trainer_api.models.trainer_v1alpha1_train_job import TrainerV1alpha1TrainJob
    from kubeflow_trainer_api.models.trainer_v1alpha1_train_job_spec import TrainerV1alpha1TrainJobSpec

    _refuse_what_a_trainjob_cannot_carry(options)
    spec = TrainerV1alpha1TrainJobSpec(
        runtime_ref=TrainerV1alpha1RuntimeRef(name=options.runtime, api_group=TRAINJOB.group, kind=RUNTIME_KIND),
        trainer=_trainer(request, pod["spec"]["containers"][0]),
        # The lease's TTL enforced by the cluster, as a Job's activeDeadlineSeconds is.
        active_deadline_seconds=request.ttl_seconds,
        runtime_patches=[_pod_patch(pod)],
        suspend=True if suspend else None,
    )
    job = TrainerV1alpha1TrainJob(
        api_version=TRAINJOB.api_version, kind=TRAINJOB.kind, metadata=ObjectMeta.from_dict(meta), spec=spec
    )
    manifest: dict[str, Any] = job.to_dict()
    return manifest


def _refuse_what_a_trainjob_cannot_carry(options: KubernetesOptions) -> None:
    # The Trainer API sets the trainer container's env only through spec.trainer.env, which has no
    # envFrom, and has no working directory: silently dropping either would break the pods late.
    for name, value in (("env_from_secret", options.env_from_secret), ("working_dir", options.working_dir)):
        if value:
            raise ConfigError(
                f"resources.options.{name} cannot be given to a TrainJob's trainer",
                hint=f"set it in the ClusterTrainingRuntime {options.runtime!r}, or use multi_node: pytorchjob",
            )
    # A TrainJob's pods get their scheduler and PodGroup from the runtime's podGroupPolicy, not from us.
    if options.scheduler == "volcano":
        raise ConfigError(
            "resources.options.scheduler: volcano cannot be given to a TrainJob",
            hint=f"give the ClusterTrainingRuntime {options.runtime!r} a podGroupPolicy (volcano), "
            "or use multi_node: pytorchjob",
        )


def _trainer(request: LeaseRequest, container: dict[str, Any]) -> Any:
    from kubeflow_trainer_api.models.io_k8s_api_core_v1_env_var import IoK8sApiCoreV1EnvVar
    from kubeflow_trainer_api.models.io_k8s_api_core_v1_resource_requirements import (
        IoK8sApiCoreV1ResourceRequirements,
    )
    from kubeflow_trainer_api.models.trainer_v1alpha1_trainer import TrainerV1alpha1Trainer

    resources = request.spec.resources
    return TrainerV1alpha1Trainer(
        image=container["image"],
        command=container["command"],
        env=[IoK8sApiCoreV1EnvVar.from_dict(e) for e in container.get("env", [])] or None,
        num_nodes=resources.nodes,
        num_proc_per_node=resources.procs_per_node,
        resources_per_node=IoK8sApiCoreV1ResourceRequirements.from_dict(container["resources"])
        if container.get("resources")
        else None,
    )


def _pod_patch(pod: dict[str, Any]) -> Any:
    """gpuline's part of the ``node`` pods, as the one runtime patch this TrainJob carries."""
    from kubeflow_trainer_api.models.io_k8s_apimachinery_pkg_apis_meta_v1_object_meta import (
        IoK8sApimachineryPkgApisMetaV1ObjectMeta as ObjectMeta,
    )
    from kubeflow_trainer_api.models.trainer_v1alpha1_job_set_spec_patch import TrainerV1alpha1JobSetSpecPatch
    from kubeflow_trainer_api.models.trainer_v1alpha1_job_set_template_patch import (
        TrainerV1alpha1JobSetTemplatePatch,
    )
    from kubeflow_trainer_api.models.trainer_v1alpha1_job_spec_patch import TrainerV1alpha1JobSpecPatch
    from kubeflow_trainer_api.models.trainer_v1alpha1_job_template_patch import TrainerV1alpha1JobTemplatePatch
    from kubeflow_trainer_api.models.trainer_v1alpha1_pod_template_patch import TrainerV1alpha1PodTemplatePatch
    from kubeflow_trainer_api.models.trainer_v1alpha1_replicated_job_patch import TrainerV1alpha1ReplicatedJobPatch
    from kubeflow_trainer_api.models.trainer_v1alpha1_runtime_patch import TrainerV1alpha1RuntimePatch
    from kubeflow_trainer_api.models.trainer_v1alpha1_training_runtime_spec_patch import (
        TrainerV1alpha1TrainingRuntimeSpecPatch,
    )

    # The pods' labels carry the lease: the orchestrator and the reaper find the pods by them.
    template = TrainerV1alpha1PodTemplatePatch(
        metadata=ObjectMeta(labels=dict(pod["metadata"]["labels"])), spec=_pod_spec_patch(pod["spec"])
    )
    node = TrainerV1alpha1ReplicatedJobPatch(
        name=TRAINER_NODE, template=TrainerV1alpha1JobTemplatePatch(spec=TrainerV1alpha1JobSpecPatch(template=template))
    )
    jobset = TrainerV1alpha1JobSetTemplatePatch(spec=TrainerV1alpha1JobSetSpecPatch(replicated_jobs=[node]))
    return TrainerV1alpha1RuntimePatch(
        manager=PATCH_MANAGER, training_runtime_spec=TrainerV1alpha1TrainingRuntimeSpecPatch(template=jobset)
    )


def _pod_spec_patch(spec: dict[str, Any]) -> Any:
    from kubeflow_trainer_api.models.io_k8s_api_core_v1_local_object_reference import (
        IoK8sApiCoreV1LocalObjectReference,
    )
    from kubeflow_trainer_api.models.io_k8s_api_core_v1_toleration import IoK8sApiCoreV1Toleration
    from kubeflow_trainer_api.models.io_k8s_api_core_v1_volume import IoK8sApiCoreV1Volume
    from kubeflow_trainer_api.models.io_k8s_api_core_v1_volume_mount import IoK8sApiCoreV1VolumeMount
    from kubeflow_trainer_api.models.trainer_v1alpha1_container_patch import TrainerV1alpha1ContainerPatch
    from kubeflow_trainer_api.models.trainer_v1alpha1_pod_spec_patch import TrainerV1alpha1PodSpecPatch

    mounts = spec["containers"][0].get("volumeMounts", [])
    container = TrainerV1alpha1ContainerPatch(
        name=TRAINER_NODE, volume_mounts=[IoK8sApiCoreV1VolumeMount.from_dict(m) for m in mounts]
    )
    return TrainerV1alpha1PodSpecPatch(
        volumes=[IoK8sApiCoreV1Volume.from_dict(v) for v in spec.get("volumes", [])] or None,
        containers=[container] if mounts else None,
        node_selector=spec.get("nodeSelector") or None,
        tolerations=[IoK8sApiCoreV1Toleration.from_dict(t) for t in spec.get("tolerations", [])] or None,
        termination_grace_period_seconds=spec.get("terminationGracePeriodSeconds"),
        service_account_name=spec.get("serviceAccountName"),
        image_pull_secrets=[IoK8sApiCoreV1LocalObjectReference.from_dict(s) for s in spec.get("imagePullSecrets", [])]
        or None,
    )
