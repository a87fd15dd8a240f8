"""Fractional GPUs on Kubernetes: NVIDIA MIG slices named in ``resources.gpu_type``.

``gpu_type: a100-mig-1g.5gb`` asks for ``gpu_count`` slices of MIG profile ``1g.5gb`` (one of seven
compute slices of an A100, 5 GB of its memory). With the GPU operator's ``mixed`` MIG strategy a node
advertises each profile as its own extended resource, ``nvidia.com/mig-1g.5gb``, and the pod asks for
that; with the ``single`` strategy (every GPU of a node cut the same way, as on GKE) the slices are
plain ``nvidia.com/gpu`` and a node selector picks the nodes cut that way. Nothing here imports the
Kubernetes client: the manifests, the pricing catalog and preflight all read it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from gpuline.errors import ConfigError

GPU_RESOURCE = "nvidia.com/gpu"
MIG_RESOURCE_PREFIX = "nvidia.com/mig-"
MIG_MARK = "-mig-"
# <card>-mig-<compute slices>g.<memory>gb, as NVIDIA names profiles (1g.5gb, 3g.40gb, 1g.18gb...).
_MIG = re.compile(r"^(?P<card>[a-z][a-z0-9]*)-mig-(?P<compute>[1-7])g\.(?P<memory>[1-9][0-9]*)gb$")
FIX = "write it as <card>-mig-<g>g.<memory>gb, e.g. a100-mig-1g.5gb or h100-mig-1g.10gb"


@dataclass(frozen=True)
class MigProfile:
    """One MIG slice shape: ``compute`` of the card's compute slices and ``memory_gb`` of its memory."""

    card: str
    compute: int
    memory_gb: int

    @property
    def profile(self) -> str:
        return f"{self.compute}g.{self.memory_gb}gb"

    @property
    def resource(self) -> str:
        """The extended resource a node advertises for this profile under the ``mixed`` strategy."""
        return MIG_RESOURCE_PREFIX + self.profile


def is_mig(gpu_type: str) -> bool:
    return MIG_MARK in gpu_type


def parse_mig(gpu_type: str) -> MigProfile | None:
    """The MIG profile a ``gpu_type`` names; None for a whole GPU. A name that says ``-mig-`` but is
    no profile is refused here, so a typo never falls back to asking for whole GPUs."""
    if not is_mig(gpu_type):
        return None
    found = _MIG.match(gpu_type)
    if found is None:
        raise ConfigError(f"resources.gpu_type {gpu_type!r} is not a MIG profile", hint=FIX)
    return MigProfile(found["card"], int(found["compute"]), int(found["memory"]))


def gpu_resource(gpu_type: str, strategy: str = "mixed") -> str:
    """The resource name a pod's limits use for ``gpu_type``'s devices."""
    mig = parse_mig(gpu_type)
    if mig is None or strategy == "single":
        return GPU_RESOURCE
    return mig.resource


def placeholders(gpu_type: str) -> dict[str, str]:
    """What ``{...}`` in node selector values stands for: the whole name, its card, its MIG profile."""
    mig = parse_mig(gpu_type)
    return {
        "{gpu_type}": gpu_type,
        "{gpu}": mig.card if mig else gpu_type,
        "{mig_profile}": mig.profile if mig else "",
    }


# ---------------------------------------------------------------- what the cluster's nodes offer


def advertised(nodes: list[dict[str, Any]]) -> dict[str, int]:
    """Per MIG resource, how many slices the nodes can allocate in all (nodes offering none are left out)."""
    offered: dict[str, int] = {}
    for node in nodes:
        allocatable = (node.get("status") or {}).get("allocatable") or {}
        for name, raw in allocatable.items():
            count = int(raw) if str(raw).isdigit() else 0
            if name.startswith(MIG_RESOURCE_PREFIX) and count > 0:
                offered[name] = offered.get(name, 0) + count
    return offered


def missing_profile(gpu_type: str, offered: dict[str, int]) -> str | None:
    """Why no node can run ``gpu_type`` under the mixed strategy (None when one can, or it is no MIG slice)."""
    mig = parse_mig(gpu_type)
    if mig is None or mig.resource in offered:
        return None
    others = ", ".join(sorted(r.removeprefix(MIG_RESOURCE_PREFIX) for r in offered)) or "none"
    return f"no node of the cluster advertises {mig.resource} (MIG profiles offered: {others})"


def cluster_offers(provider: Any) -> dict[str, int] | None:
    """The MIG resources the cluster's nodes advertise (``status.allocatable``), or None when the API
    cannot tell: no configuration here, the cluster unreachable, or listing nodes not allowed."""
    from gpuline.errors import GpulineError

    try:
        from kubernetes import client

        found = client.CoreV1Api(provider.api).list_node(_request_timeout=(5, 20))
    except GpulineError:
        return None  # no kubeconfig (a pull request's preflight, say): nothing to ask
    except Exception:  # unreachable, 403 (no RBAC for nodes), 404: the cluster does not say
        return None
    nodes = [provider.api.sanitize_for_serialization(n) for n in found.items]
    return advertised(nodes)
