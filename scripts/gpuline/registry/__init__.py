"""Model registry backends, chosen by URI scheme.

- ``file://DIR`` (the default, relative to gpuline.yml): JSON files in a folder;
- ``s3://BUCKET/PREFIX``: JSON objects, versions written once, stages moved with conditional writes;
- ``mlflow+http://HOST:PORT``, ``mlflow+https://HOST``, ``mlflow://`` (``MLFLOW_TRACKING_URI``): an
  MLflow tracking server, through MLflow's client (the extra ``mlflow``).

Backends load only when chosen, so an SDK nobody uses is never imported.
"""

from __future__ import annotations

from pathlib import Path

from gpuline.errors import InputError, clip_repr
from gpuline.plugins import Registry
from gpuline.registry.base import Audit, ModelRegistry, ModelVersion, StageChange

__all__ = ["BACKENDS", "Audit", "ModelRegistry", "ModelVersion", "StageChange", "check_uri", "open_registry"]

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


HINT = "use file://.gpuline/registry, s3://BUCKET/PREFIX or mlflow+https://HOST"


def check_uri(uri: str) -> str:
    """The URI's scheme, when it names a registry backend; an InputError otherwise (preflight calls
    this, so a registry nobody can open fails before training, not at eval-gate after it)."""
    scheme, sep, _ = uri.partition("://")
    if not sep:
        raise InputError(f"registry URI {clip_repr(uri)} has no scheme", hint=HINT)
    if not BACKENDS.knows(scheme):
        raise InputError(
            f"registry URI {clip_repr(uri)}: {clip_repr(scheme)} is not a valid {BACKENDS.kind}",
            hint=f"valid choices are {', '.join(BACKENDS.names())}",
        )
    return scheme


def open_registry(uri: str, base_dir: Path) -> ModelRegistry:
    factory = BACKENDS.load(check_uri(uri))
    registry: ModelRegistry = factory(uri, base_dir)
    return registry
