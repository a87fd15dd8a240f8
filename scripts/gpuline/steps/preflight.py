"""preflight: everything that can fail without a GPU fails here, before anything is bought."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, cast

from gpuline import contract, gha, ledger, registry, storage
from gpuline.context import Context
from gpuline.decisions.pricing import load_catalog
from gpuline.errors import ConfigError, InputError, Location, PolicyDenied, clip_repr
from gpuline.providers import PROVIDERS, check_nodes
from gpuline.results import PreflightResult
from gpuline.runs import RunRecord
from gpuline.spec import TIERS, Spec, Tier
from gpuline.stage import recorded
from gpuline.training import check_entrypoint_imports, compat, dataset, entry_command, smoke_gates, smoke_test
from gpuline.training.smoke_gates import SmokeMetrics, smoke_metrics
from gpuline.yamlsource import dotted

SMOKE_TIMEOUT_S = 180


def run(ctx: Context, args: argparse.Namespace) -> PreflightResult:
    return preflight(ctx)


def preflight(ctx: Context) -> PreflightResult:
    _ = ctx.spec, ctx.policy  # schema errors surface here, before a run record exists
    backends = check_backends(ctx)  # so does a ledger, registry or store that no backend can open
    record = ctx.ensure_run()
    spec = ctx.spec  # as the run's tier runs it
    rows: list[tuple[str, str]] = [("schema", f"`{ctx.config_path}` and policy are valid"), ("backends", backends)]
    took: dict[str, float] = {}
    phase = _phases(took)
    with recorded(ctx, "preflight"):
        with phase("policy"):
            rows.append(("policy", check_tier_rules(ctx, spec)))
        with phase("resources"):
            rows.append(("resources", check_resources(ctx, spec)))
            rows.append(("gpu slices", check_gpu_slices(ctx)))
            rows.append(("pricing", check_pricing(ctx)))
            rows.append(("steps", check_steps(ctx)))
        with phase("secrets"):
            rows.append(("secrets", check_secrets(ctx, spec)))
        with phase("dataset"):
            rows.append(("dataset", check_dataset(ctx, spec)))
        with phase("cuda", "CUDA / torch / driver"):
            rows.append(("cuda", check_compat(spec)))
        with phase("entrypoint"):
            rows.append(("entrypoint", check_entrypoint(ctx, spec)))
            rows += check_hooks(ctx, spec)
        with phase("smoke", "one-batch overfit smoke test (CPU)"):
            smoke_line, step_s, found = smoke(ctx, spec, record)
            rows.append(("smoke test", smoke_line))
            rows.append(("gate metrics", check_gate_metrics(ctx, spec, found)))
    # Where a reviewer's wait goes, on stderr and in --json: the PR tier's own time is measured too.
    print("preflight phases: " + ", ".join(f"{k} {v:.2f} s" for k, v in took.items()), file=sys.stderr)
    return PreflightResult(
        run_id=record.run_id,
        checks=rows,
        smoke_step_s=step_s,
        evaluates=spec.eval.command is not None,
        phase_seconds=took,
    )


def _phases(took: dict[str, float]) -> Callable[..., AbstractContextManager[None]]:
    """A log group per phase that also keeps its wall seconds in ``took`` under ``key``."""

    @contextmanager
    def phase(key: str, title: str | None = None) -> Iterator[None]:
        started = time.perf_counter()
        try:
            with gha.group(f"preflight: {title or key}"):
                yield
        finally:
            took[key] = round(time.perf_counter() - started, 3)

    return phase


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
    """What the provider can launch, in every tier: an unknown provider, or a multi-node spec on a
    one-machine provider, fails here, not at provision or at the bill."""
    for tier in (ctx.tier, *TIERS):
        res = ctx.base_spec.for_tier(tier).resources
        if not PROVIDERS.knows(res.provider):
            aliases = ", ".join(sorted(PROVIDERS.aliases))
            raise ConfigError(
                f"{clip_repr(res.provider)} is not a provider gpuline can launch",
                location=_where(ctx, tier, "resources", "provider"),
                hint=f"use one of {', '.join(PROVIDERS.names())} (or an alias: {aliases})",
            )
        try:
            check_nodes(res.provider, res.nodes)
        except ConfigError as exc:
            exc.location = _where(ctx, tier, "resources", "nodes")
            raise
    return f"{spec.resources.nodes} node(s) on {spec.resources.provider}"


def check_gpu_slices(ctx: Context) -> str:
    """A MIG slice in ``resources.gpu_type`` (``a100-mig-1g.5gb``) in any tier: a well-formed profile,
    on the kubernetes provider, and advertised by a node of the cluster when its API can tell (it is
    reachable and lets us list nodes). A pod asking for a profile no node has would wait forever."""
    from gpuline.providers import k8s_gpu
    from gpuline.providers.kubernetes import KubernetesProvider

    checked: dict[str, str] = {}
    for tier in dict.fromkeys((ctx.tier, *TIERS)):
        res = ctx.base_spec.for_tier(tier).resources
        if not k8s_gpu.is_mig(res.gpu_type) or res.gpu_type in checked:
            continue
        try:
            mig = k8s_gpu.parse_mig(res.gpu_type)
            if res.provider != "kubernetes":
                raise ConfigError(
                    f"MIG slice {res.gpu_type!r} on the {res.provider} provider: slices are a Kubernetes resource",
                    hint=f"use provider: kubernetes, or a whole GPU ({mig.card if mig else 'a100'})",
                )
            if res.gpu_count == 0:
                raise ConfigError(
                    f"resources.gpu_count is 0, so the pods would ask for no {res.gpu_type} slice",
                    location=_where(ctx, tier, "resources", "gpu_count"),
                    hint="set resources.gpu_count to the number of slices each pod needs (1, usually)",
                )
            checked[res.gpu_type] = _slice_offered(res.gpu_type, KubernetesProvider(ctx.project_dir, res.options))
        except ConfigError as exc:
            field = "options" if str(exc.message).startswith("resources.options") else "gpu_type"
            exc.location = exc.location or _where(ctx, tier, "resources", field)
            raise
    return "; ".join(f"{gpu}: {note}" for gpu, note in checked.items()) or "whole GPUs only"


def _slice_offered(gpu_type: str, provider: Any) -> str:
    from gpuline.providers import k8s_gpu

    if provider.options.mig_strategy == "single":
        return "requested as nvidia.com/gpu (mig_strategy: single); node_selector picks the nodes"
    offered = k8s_gpu.cluster_offers(provider)
    if offered is None:
        return "not checked (the cluster's nodes could not be listed from here)"
    problem = k8s_gpu.missing_profile(gpu_type, offered)
    if problem is not None:
        mig = k8s_gpu.parse_mig(gpu_type)
        others = sorted(r.removeprefix(k8s_gpu.MIG_RESOURCE_PREFIX) for r in offered)
        card = mig.card if mig else "a100"
        fix = f"set resources.gpu_type to {card}-mig-{others[0]}" if others else "use a whole GPU"
        raise ConfigError(problem, hint=f"{fix}, or have the cluster's MIG configuration offer it")
    return f"{offered[k8s_gpu.gpu_resource(gpu_type)]} slice(s) advertised by the cluster's nodes"


def check_backends(ctx: Context) -> str:
    """Each backend URI (``GPULINE_LEDGER``/``_REGISTRY``/``_STORAGE`` over ``backends.*``) names a
    backend gpuline has: a registry nobody can open would otherwise fail at eval-gate, after a GPU
    trained the model, and a store during training."""
    checks: list[tuple[str, str, str | None, Callable[[str], str]]] = [
        ("ledger", contract.LEDGER, ctx.inputs.ledger, ledger.check_uri),
        ("registry", contract.REGISTRY, ctx.inputs.registry, registry.check_uri),
        ("storage", contract.STORAGE, ctx.inputs.storage, storage.check_uri),
    ]
    schemes = []
    for kind, variable, given, check in checks:
        uri = given or str(getattr(ctx.base_spec.backends, kind))
        try:
            schemes.append(f"{kind} {check(uri) or 'file'}")
        except InputError as exc:
            if given:
                raise InputError(f"{variable}: {exc.message}", hint=f"{exc.hint}, or unset {variable}") from None
            exc.location = _where(ctx, None, "backends", kind)
            raise
    return ", ".join(schemes)


def check_pricing(ctx: Context) -> str:
    """What cost-estimate will price, for every tier: the provider in the pricing catalog, a pinned
    instance type among its instances, or an instance with the GPUs asked for."""
    catalog = load_catalog(ctx.project_dir)
    chosen = ""
    for tier in TIERS:
        res = ctx.base_spec.for_tier(tier).resources
        try:
            name, _ = catalog.choose(res.provider, res.gpu_type, res.gpu_count, res.instance_type, res.lane)
        except InputError as exc:
            if res.instance_type:
                exc.location = _where(ctx, tier, "resources", "instance_type")
            elif catalog.key(res.provider) not in catalog.providers:
                exc.location = _where(ctx, tier, "resources", "provider")
            else:
                exc.location = _where(ctx, tier, "resources", "gpu_type")
            raise
        if tier == ctx.tier:
            chosen = f"{name} ({res.provider}) is in the pricing catalog {catalog.version}"
    return chosen


def check_steps(ctx: Context) -> str:
    """``hyperparameters.steps``, when given, is a positive whole number in every tier: the estimate
    counts on it, and a script handed "abc" fails only once a machine is up."""
    for tier in TIERS:
        steps = ctx.base_spec.for_tier(tier).hyperparameters.get("steps")
        if steps is None:
            continue
        if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
            raise ConfigError(
                f"steps must be a positive whole number (got {clip_repr(steps)})",
                location=_where(ctx, tier, "hyperparameters", "steps"),
                hint="write the number of training steps (e.g. steps: 1000), or leave it out",
            )
    steps = ctx.spec.hyperparameters.get("steps")
    return f"{steps} steps" if steps is not None else "not given (the estimate is bounded by max_duration)"


def check_gate_metrics(ctx: Context, spec: Spec, found: SmokeMetrics) -> str:
    return smoke_gates.check(
        spec.eval.gates,
        found,
        lambda i, key: Location(
            ctx.config_path, ctx.line_of(("eval", "gates", i, key)), field=f"eval.gates[{i}].{key}"
        ),
    )


def _where(ctx: Context, tier: str | None, section: str, key: str) -> Location:
    """``section.key`` in gpuline.yml, or ``tiers.TIER.section.key`` when that tier's override sets it."""
    override = ctx.base_spec.tiers.get(cast(Tier, tier)) if tier else None
    loc: tuple[str, ...] = (section, key)
    if override is not None and key in getattr(override, section, {}):
        loc = ("tiers", str(tier), section, key)
    return Location(ctx.config_path, ctx.line_of(loc), field=dotted(loc))


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


def smoke(ctx: Context, spec: Spec, record: RunRecord) -> tuple[str, float | None, SmokeMetrics]:
    path = dataset.resolve(spec, ctx.project_dir, ctx.config_path, ctx.workdir(record.run_id))
    result = smoke_test(
        entry_command(spec.entrypoint.command, ctx.inputs.python),
        ctx.project_dir / spec.entrypoint.workdir,
        path,
        spec.hyperparameters,
        SMOKE_TIMEOUT_S,
        # Timed on the smoke run's model (when it writes one), for the estimate's eval phase.
        eval_command=entry_command(spec.eval.command, ctx.inputs.python) if spec.eval.command else None,
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
    ctx.event(
        "preflight.smoke",
        first_loss=losses[0],
        last_loss=losses[-1],
        steps=len(losses),
        step_s=step_s,
        # The phases cost-estimate prices when there is no history (start-up, steps, saves, eval).
        timings=result.timings.to_json() if result.timings else None,
    )
    line = f"loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps on one batch"
    return line, step_s, smoke_metrics(spec, result)
