"""preflight: everything that can fail without a GPU fails here, before anything is bought."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import cast

from gpuline import gha
from gpuline.context import Context
from gpuline.errors import ConfigError, InputError, Location, PolicyDenied
from gpuline.providers import check_nodes
from gpuline.results import PreflightResult
from gpuline.runs import RunRecord
from gpuline.spec import Spec, Tier
from gpuline.stage import recorded
from gpuline.training import check_entrypoint_imports, compat, dataset, entry_command, smoke_test

SMOKE_TIMEOUT_S = 180


def run(ctx: Context, args: argparse.Namespace) -> PreflightResult:
    return preflight(ctx)


def preflight(ctx: Context) -> PreflightResult:
    _ = ctx.spec, ctx.policy  # schema errors surface here, before a run record exists
    record = ctx.ensure_run()
    spec = ctx.spec  # as the run's tier runs it
    rows: list[tuple[str, str]] = [("schema", f"`{ctx.config_path}` and policy are valid")]
    with recorded(ctx, "preflight"):
        with gha.group("preflight: policy"):
            rows.append(("policy", check_tier_rules(ctx, spec)))
        with gha.group("preflight: resources"):
            rows.append(("resources", check_resources(ctx, spec)))
        with gha.group("preflight: secrets"):
            rows.append(("secrets", check_secrets(ctx, spec)))
        with gha.group("preflight: dataset"):
            rows.append(("dataset", check_dataset(ctx, spec)))
        with gha.group("preflight: CUDA / torch / driver"):
            rows.append(("cuda", check_compat(spec)))
        with gha.group("preflight: entrypoint"):
            rows.append(("entrypoint", check_entrypoint(ctx, spec)))
            rows += check_hooks(ctx, spec)
        with gha.group("preflight: one-batch overfit smoke test (CPU)"):
            smoke_line, step_s = smoke(ctx, spec, record)
            rows.append(("smoke test", smoke_line))
    return PreflightResult(
        run_id=record.run_id, checks=rows, smoke_step_s=step_s, evaluates=spec.eval.command is not None
    )


def check_tier_rules(ctx: Context, spec: Spec) -> str:
    rules = ctx.policy.tiers.get(cast(Tier, ctx.tier))
    if rules is None:
        return f"no rules for the {ctx.tier} tier"
    res = spec.resources
    if rules.allowed_gpu_types is not None and res.gpu_type not in rules.allowed_gpu_types:
        raise PolicyDenied(
            f"gpu type {res.gpu_type!r} is not allowed on the {ctx.tier} tier",
            location=Location(ctx.config_path, ctx.line_of(("resources", "gpu_type")), field="resources.gpu_type"),
            hint=f"use one of {', '.join(rules.allowed_gpu_types)}",
        )
    if rules.max_duration is not None and res.max_duration > rules.max_duration:
        raise PolicyDenied(
            f"max_duration of {res.max_duration}s is above the {ctx.tier} tier's limit of {rules.max_duration}s",
            location=Location(
                ctx.config_path, ctx.line_of(("resources", "max_duration")), field="resources.max_duration"
            ),
            hint=f"set resources.max_duration to {rules.max_duration // 60}m or less",
        )
    return f"{res.gpu_type} for at most {res.max_duration // 60} min is allowed on {ctx.tier}"


def check_resources(ctx: Context, spec: Spec) -> str:
    """What the provider can launch: a multi-node spec on a one-machine provider fails here, not at the bill."""
    res = spec.resources
    try:
        check_nodes(res.provider, res.nodes)
    except ConfigError as exc:
        exc.location = Location(ctx.config_path, ctx.line_of(("resources", "nodes")), field="resources.nodes")
        raise
    return f"{res.nodes} node(s) on {res.provider}"


def check_secrets(ctx: Context, spec: Spec) -> str:
    missing = [name for name in spec.secrets if not os.environ.get(name)]
    for name in spec.secrets:
        gha.mask(os.environ.get(name, ""))
    if missing:
        raise InputError(
            f"secret(s) not set: {', '.join(missing)}",
            location=Location(ctx.config_path, ctx.line_of(("secrets",)), field="secrets"),
            hint="pass them to the job as env (secrets are never available to fork PRs)",
        )
    return f"{len(spec.secrets)} present (names only)" if spec.secrets else "none declared"


def check_dataset(ctx: Context, spec: Spec) -> str:
    workdir = ctx.workdir(ctx.run_id or "preflight")
    path = dataset.resolve(spec, ctx.project_dir, ctx.config_path, workdir, ctx.line_of)
    found = dataset.check(spec, path, ctx.config_path, ctx.line_of)
    arrays = ", ".join(f"{k} {v['dtype']}{v['shape']}" for k, v in found.arrays.items())
    return f"{path.name} ({found.size / 1e6:.2f} MB) sha256 matches" + (f"; {arrays}" if arrays else "")


def check_compat(spec: Spec) -> str:
    report = compat.check(spec.resources.gpu_type, spec.resources.gpu_count)
    if report.problems:
        raise InputError("; ".join(report.problems), hint="install a torch build for this GPU or pick another gpu_type")
    torch = report.torch_version or "not installed here"
    return f"torch {torch}; " + "; ".join(report.notes)


def entrypoint_file(ctx: Context, spec: Spec) -> Path:
    workdir = ctx.project_dir / spec.entrypoint.workdir
    target = spec.entrypoint.import_check or next((a for a in spec.entrypoint.command if a.endswith(".py")), None)
    if target is None:
        raise ConfigError(
            "cannot tell which Python file to import-check",
            location=Location(ctx.config_path, ctx.line_of(("entrypoint",)), field="entrypoint.import_check"),
            hint="set entrypoint.import_check to the training script",
        )
    path = workdir / target
    if not path.exists():
        raise ConfigError(
            f"entrypoint file {path} does not exist",
            location=Location(ctx.config_path, ctx.line_of(("entrypoint", "command")), field="entrypoint.command"),
            hint="fix the path (relative to entrypoint.workdir)",
        )
    return path


def check_hooks(ctx: Context, spec: Spec) -> list[tuple[str, str]]:
    """eval.command and deploy.command: their directory and the Python file they run exist now, not
    after a GPU has trained a model for them."""
    rows = []
    hooks = [("eval", spec.eval.command, spec.eval.workdir)]
    if spec.deploy is not None:
        hooks.append(("deploy", spec.deploy.command, spec.deploy.workdir))
    for section, command, workdir in hooks:
        if not command:
            continue
        folder = ctx.project_dir / workdir
        script = next((a for a in command if a.endswith(".py")), None)
        missing = (
            folder if not folder.is_dir() else (folder / script if script and not (folder / script).is_file() else None)
        )
        if missing is not None:
            raise ConfigError(
                f"{section}.command: {missing} does not exist",
                location=Location(ctx.config_path, ctx.line_of((section, "command")), field=f"{section}.command"),
                hint=f"fix the path (relative to {section}.workdir, which is relative to gpuline.yml)",
            )
        rows.append((f"{section} command", f"`{' '.join(command)}`" + (f" (`{script}` exists)" if script else "")))
    return rows


def check_entrypoint(ctx: Context, spec: Spec) -> str:
    path = entrypoint_file(ctx, spec)
    check_entrypoint_imports(path, ctx.project_dir / spec.entrypoint.workdir)
    return f"`{path.name}` imports"


def smoke(ctx: Context, spec: Spec, record: RunRecord) -> tuple[str, float | None]:
    path = dataset.resolve(spec, ctx.project_dir, ctx.config_path, ctx.workdir(record.run_id))
    result = smoke_test(
        entry_command(spec.entrypoint.command, ctx.inputs.python),
        ctx.project_dir / spec.entrypoint.workdir,
        path,
        spec.hyperparameters,
        SMOKE_TIMEOUT_S,
    )
    losses = result.losses
    if not result.fell:
        first = f"{losses[0]:.4f}" if losses else "none"
        last = f"{losses[-1]:.4f}" if losses else "none"
        raise InputError(
            f"the one-batch overfit smoke test did not show the loss falling (first {first}, last {last})",
            hint="a model that cannot overfit one batch has a bug: check the loss, the labels and the learning rate",
        )
    step_s = result.step_seconds

    def keep(r: RunRecord) -> None:
        r.smoke_step_s = step_s

    ctx.ledger.update_run(record.run_id, keep)
    ctx.event("preflight.smoke", first_loss=losses[0], last_loss=losses[-1], steps=len(losses), step_s=step_s)
    return f"loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps on one batch", step_s
