"""Model registry backends, chosen by URI scheme.

- ``file://DIR`` (the default, relative to gpuline.yml): JSON files in a folder;
- ``s3://BUCKET/PREFIX``: JSON objects, versions written once, stages moved with conditional writes;
- ``mlflow+http://HOST:PORT``, ``mlflow+https://HOST``, ``mlflow://`` (``MLFLOW_TRACKING_URI``): an
  MLflow tracking server, through MLflow's client (the extra ``mlflow``).

Backends load only when chosen, so an SDK nobody uses is never imported.
"""

from __future__ import annotations

from pathlib import Path

from gpuline.errors import InputError
from gpuline.plugins import Registry
from gpuline.registry.base import Audit, ModelRegistry, ModelVersion, StageChange

__all__ = ["BACKENDS", "Audit", "ModelRegistry", "ModelVersion", "StageChange", "open_registry"]

_MLFLOW = "gpuline.registry.mlflow:open_mlflow"

BACKENDS = Registry(
    "model registry backend",
    {
        "file": "gpuline.registry.local:open_local",
        "s3": "gpuline.registry.s3:open_s3",
        "mlflow": _MLFLOW,
        "mlflow+http": _MLFLOW,
        "mlflow+https": _MLFLOW,
    },
)


def open_registry(uri: str, base_dir: Path) -> ModelRegistry:
    scheme, sep, _ = uri.partition("://")
    if not sep:
        raise InputError(
            f"registry URI {uri!r} has no scheme",
            hint="use file://.gpuline/registry, s3://BUCKET/PREFIX or mlflow+https://HOST",
        )
    factory = BACKENDS.load(scheme)
    registry: ModelRegistry = factory(uri, base_dir)
    return registry
