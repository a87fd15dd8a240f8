"""Model registry backends, chosen by URI: ``file://dir`` (the default)."""

from __future__ import annotations

from pathlib import Path

from gpuline.errors import InputError
from gpuline.plugins import Registry
from gpuline.registry.base import ModelRegistry

BACKENDS = Registry(
    "model registry backend",
    {"file": "gpuline.registry.local:open_local"},
)


def open_registry(uri: str, base_dir: Path) -> ModelRegistry:
    scheme, sep, _ = uri.partition("://")
    if not sep:
        raise InputError(f"registry URI {uri!r} has no scheme", hint="use file://.gpuline/registry")
    factory = BACKENDS.load(scheme)
    registry: ModelRegistry = factory(uri, base_dir)
    return registry
