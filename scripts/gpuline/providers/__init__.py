"""Providers by name, with aliases; adding a cloud is one module plus one line here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gpuline.errors import ConfigError
from gpuline.plugins import Registry
from gpuline.providers.base import Provider

PROVIDERS = Registry(
    "provider",
    {
        "local": "gpuline.providers.local:LocalProvider",
        "ec2": "gpuline.providers.ec2:Ec2Provider",
        "kubernetes": "gpuline.providers.kubernetes:KubernetesProvider",
        "rest": "gpuline.providers.rest:RestProvider",
    },
    aliases={"aws": "ec2", "k8s": "kubernetes", "kube": "kubernetes", "laptop": "local", "self": "local"},
)


def open_provider(name: str, project_dir: Path, options: dict[str, Any] | None = None) -> Provider:
    factory = PROVIDERS.load(name)
    provider: Provider = factory(project_dir=project_dir, options=options or {})
    return provider


def check_nodes(name: str, nodes: int) -> None:
    """Refuse a spec that asks a provider for more nodes than one lease of it can launch."""
    most = int(getattr(PROVIDERS.load(name), "max_nodes", 1))
    if nodes > most:
        raise ConfigError(
            f"resources.nodes is {nodes} but the {PROVIDERS.canonical(name)} provider launches "
            f"{'one machine' if most == 1 else f'at most {most} nodes'} per run",
            hint="use provider: kubernetes for multi-node training (an Indexed Job or a PyTorchJob), "
            "or set resources.nodes: 1 with more GPUs per node",
        )
