"""Evaluating model files with the project's ``eval.command``: the candidate, a registered version.

eval-gate runs the command on the candidate and on the baseline stage's version, on the same data
in the same job, so the gates compare two measurements of today rather than one of today and one
stored on another day (on another machine). ``gpuline verify`` fetches the promoted version back
from the registry and runs it again. Files are always checked against their recorded checksums.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpuline import gha
from gpuline.context import Context
from gpuline.errors import InputError
from gpuline.registry.base import ModelVersion
from gpuline.runs import RunRecord, model_prefix
from gpuline.storage import bundle

# Where a version keeps the sha256 of its files' manifest (see gpuline.storage.bundle).
MANIFEST_KEY = "model_sha256"


@dataclass(frozen=True)
class Measured:
    metrics: dict[str, Any]
    how: str
    """What the metrics are: evaluated in this job, or stored (and why)."""


@contextmanager
def fetched_version(ctx: Context, version: ModelVersion) -> Iterator[Path]:
    """The version's files in a temporary folder, each checked against the registry's record."""
    from gpuline.storage import open_storage

    where = f"{version.model} v{version.version} ({version.artifacts_uri})"
    store = open_storage(version.artifacts_uri, ctx.project_dir)
    with tempfile.TemporaryDirectory(prefix="gpuline-model-") as tmp:
        yield bundle.fetch(store, where, Path(tmp), str(version.lineage.get(MANIFEST_KEY) or ""))


@contextmanager
def fetched_candidate(ctx: Context, record: RunRecord) -> Iterator[Path]:
    """The run's trained model files, fetched from the run's storage and checked."""
    from gpuline.storage import open_storage

    if not record.model_sha256:
        raise InputError(
            f"run {record.run_id} has no model files to evaluate",
            hint="the training script writes its model to $GPULINE_OUTPUT_DIR; run `gpuline train` first",
        )
    uri = ctx.storage.uri_for(model_prefix(record.run_id))
    with tempfile.TemporaryDirectory(prefix="gpuline-model-") as tmp:
        yield bundle.fetch(open_storage(uri, ctx.project_dir), f"run {record.run_id}", Path(tmp), record.model_sha256)


def evaluate(ctx: Context, model_dir: Path, label: str) -> dict[str, Any]:
    """``eval.command`` on the model in ``model_dir``; its metrics."""
    from gpuline.training import dataset
    from gpuline.training.evaluate import evaluate_model

    spec = ctx.spec
    assert spec.eval.command, "only called when eval.command is set"
    run_dir = ctx.workdir(ctx.run_id) if ctx.run_id else ctx.project_dir / ".gpuline" / "eval"
    return evaluate_model(
        spec.eval.command,
        model_dir,
        cwd=ctx.project_dir / spec.eval.workdir,
        dataset=dataset.resolve(spec, ctx.project_dir, ctx.config_path, run_dir),
        out_dir=run_dir / "eval" / label,
        timeout_s=spec.eval.timeout,
        python=ctx.inputs.python,
    )


def measure_version(ctx: Context, version: ModelVersion) -> Measured:
    """A baseline's metrics: evaluated now when its files can be, else the ones stored with it."""
    try:
        with fetched_version(ctx, version) as files:
            return Measured(evaluate(ctx, files, f"v{version.version}"), "evaluated in this job")
    except bundle.ModelDamaged as exc:
        # A damaged baseline must not block every later release: say so, and compare as before.
        gha.annotate("warning", f"baseline {exc.one_line()}; comparing with its stored metrics", title="gpuline")
        return Measured(version.metrics, "stored metrics: its files could not be checked")
