"""What the cluster serves, asked before a lease's workload is made: which engine runs a multi-node
lease (``multi_node: auto``), and whether the runtime a TrainJob names exists.

``auto`` takes the first engine whose API group version lists its resource (the CRD is installed):
Kubeflow Trainer's TrainJob, then the Training Operator's PyTorchJob, else an Indexed Job, which needs
nothing installed.

``custom`` makes the client's ``CustomObjectsApi`` (loading the configuration on first use); it is
called inside each request's error handling, as the provider's own requests do.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gpuline.errors import ConfigError, InfraError
from gpuline.providers.k8s_errors import as_error, status_of
from gpuline.providers.k8s_manifests import Engine
from gpuline.providers.k8s_workloads import PYTORCHJOB, TRAINJOB, WorkloadKind

ENGINES: tuple[tuple[Engine, WorkloadKind], ...] = (("trainjob", TRAINJOB), ("pytorchjob", PYTORCHJOB))
RUNTIMES = ("trainer.kubeflow.org", "v1alpha1", "clustertrainingruntimes")


def custom_api(kind: WorkloadKind) -> tuple[str, str, str]:
    """The group, version and plural that a custom kind is served under."""
    if kind.api is None:  # pragma: no cover - only custom kinds are asked for
        raise InfraError(f"{kind.kind} is not a custom resource")
    return kind.api


def discovered_engine(custom: Callable[[], Any]) -> Engine:
    """The first engine whose API the cluster serves, else an Indexed Job."""
    return next((engine for engine, kind in ENGINES if serves(custom, kind)), "indexed-job")


def serves(custom: Callable[[], Any], kind: WorkloadKind) -> bool:
    """Whether the API server serves ``kind`` (its CRD is installed): the group version's discovery."""
    group, version, plural = custom_api(kind)
    try:
        resources = custom().get_api_resources(group, version)
    except Exception as exc:
        if status_of(exc) in (404, 403):
            return False
        raise as_error(exc, f"looking for the {kind.kind} CRD ({group}/{version})") from None
    return any(r.name == plural for r in (resources.resources or []))


def check_runtime(custom: Callable[[], Any], name: str) -> None:
    """Fail before the lease's workload exists when the TrainJob's runtime does not: the Trainer
    would only mark it failed later. Unknowable without read access to runtimes: then not checked."""
    group, version, plural = RUNTIMES
    try:
        custom().get_cluster_custom_object(group, version, plural, name, _preload_content=False)
    except Exception as exc:
        if status_of(exc) == 404:
            raise ConfigError(
                f"the cluster has no ClusterTrainingRuntime {name!r} for the TrainJob",
                hint="install Kubeflow Trainer's runtimes (torch-distributed), name another with "
                "resources.options.runtime, or set multi_node: pytorchjob or indexed-job",
            ) from None
        if status_of(exc) != 403:
            raise as_error(exc, f"reading ClusterTrainingRuntime {name}") from None
