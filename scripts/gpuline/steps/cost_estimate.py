"""cost-estimate: GPU-hours and dollars from the catalog, queue wait, a policy decision, and a quota hold.

On a pull request (tier pr-fast, which buys nothing) the question is what the change will cost once
it trains, so the estimate is for the tier that trains after merge (nightly, or
``GPULINE_ESTIMATE_TIER``), and nothing is reserved.

Whatever decides money comes from the trusted ref when one is given (``--policy-ref``): the policy
(budgets, lanes, approvals) through the context, and the pricing override here. The PR's own copies
of those files are shown in the comment as a proposed change and never used.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from gpuline import gha
from gpuline.context import Context
from gpuline.decisions import quota
from gpuline.decisions.cost import CostEstimate, DurationEstimate, estimate, estimate_duration
from gpuline.decisions.phases import PhaseEstimate, SmokeTimings
from gpuline.decisions.policy import Decision, approvals_from
from gpuline.decisions.policy_source import ProposedChange, proposed_change, read_at_ref
from gpuline.decisions.pricing import CATALOG_FILE, Catalog, load_catalog
from gpuline.decisions.queue import estimate_wait
from gpuline.errors import ConfigError, InputError, PolicyDenied
from gpuline.render.cost_comment import COMMENT_MARKER, log_lines, render_comment
from gpuline.render.markdown import cost_chart
from gpuline.results import EstimateResult
from gpuline.runs import Ledger, RunRecord, utcnow
from gpuline.spec import TIERS, Spec
from gpuline.stage import recorded

__all__ = ["COMMENT_MARKER", "cost_estimate", "estimate_tier", "run"]

CHART_RUNS = 20


def run(ctx: Context, args: argparse.Namespace) -> EstimateResult:
    labels = frozenset(x.strip() for x in (args.labels or "").split(",") if x.strip())
    return cost_estimate(ctx, labels=labels, reserve=not args.no_reserve, base_ref=args.base_ref)


def estimate_tier(tier: str, wanted: str | None) -> str:
    """The tier whose spending this run's estimate is about (``wanted``: GPULINE_ESTIMATE_TIER)."""
    if tier != "pr-fast":
        return tier
    wanted = wanted or "nightly"
    if wanted not in TIERS:
        raise InputError(
            f"GPULINE_ESTIMATE_TIER={wanted!r} is not a tier", hint=f"use one of {', '.join(TIERS)} or unset it"
        )
    return wanted


def cost_estimate(
    ctx: Context, *, labels: frozenset[str] = frozenset(), reserve: bool = True, base_ref: str | None = None
) -> EstimateResult:
    record = ctx.ensure_run()
    with recorded(ctx, "cost-estimate"):
        target = estimate_tier(ctx.tier, ctx.inputs.estimate_tier)
        spec = ctx.spec if target == ctx.tier else ctx.base_spec.for_tier(target)
        catalog, proposed = _trusted_catalog(ctx)
        smoke = smoke_timings(ctx.ledger, record.run_id)
        data_bytes = dataset_bytes(spec, ctx.config_path.parent, ctx.workdir(record.run_id))
        duration_of = _durations(ctx.ledger, catalog, record.smoke_step_s, smoke, data_bytes)
        request = _budget_request(ctx, record.run_id, spec, target, labels, catalog, duration_of)
        # pr-fast buys nothing, so nothing is held for it.
        hold = reserve and ctx.tier != "pr-fast"
        decision, reserved = quota.admit(ctx.ledger, request, hold=hold, on_retry=_say_retrying)
        base = _base_estimate(ctx, base_ref, catalog, target, smoke, data_bytes) if base_ref else None
        _keep_estimate(ctx.ledger, record.run_id, request.estimate)
        ctx.event(
            "cost.estimated",
            estimate=request.estimate.to_json(),
            decision=decision.to_json(),
            queue=request.queue.to_json(),
            estimate_tier=target,
            reserved=reserved,
        )
        result = _estimate_result(ctx, request, decision, reserved, base, proposed)
        if decision.decision == "deny":
            denied = PolicyDenied("; ".join(decision.reasons), hint="; ".join(decision.suggestions) or None)
            raise denied.with_result(result)
    return result


def _budget_request(
    ctx: Context,
    run_id: str,
    spec: Spec,
    tier: str,
    labels: frozenset[str],
    catalog: Catalog,
    duration_of: Callable[[Spec], DurationEstimate],
) -> quota.Request:
    """What the run asks of the budgets: its estimate, with the wait for a machine in the lane as its
    first phase, and the approvals its labels and environment carry."""
    est = estimate(spec, catalog, duration_of(spec))
    now = utcnow()
    queue = estimate_wait(ctx.ledger, ctx.policy, spec.resources.lane, now)
    with_queue(est, queue.expected_wait_s, queue.worst_wait_s)
    return quota.Request(
        run_id=run_id,
        spec=spec,
        base_spec=ctx.base_spec,
        tier=tier,
        policy=ctx.policy,
        estimate=est,
        approvals=approvals_from(ctx.policy, labels, ctx.inputs.approved_environment),
        queue=queue,
        catalog=catalog,
        duration_of=duration_of,
        now=now,
    )


def _estimate_result(
    ctx: Context,
    request: quota.Request,
    decision: Decision,
    reserved: bool,
    base: CostEstimate | None,
    proposed: list[ProposedChange],
) -> EstimateResult:
    """The estimate as people see it: the PR comment (kept as a file too), the chart of the model's
    past runs and the log lines."""
    est, queue, run_id = request.estimate, request.queue, request.run_id
    comment = render_comment(
        est, decision, base, policy=ctx.policy, run_id=run_id, tier=request.tier, queue=queue, proposed=proposed
    )
    comment_path = ctx.workdir(run_id) / "cost-comment.md"
    comment_path.write_text(comment, encoding="utf-8")
    return EstimateResult(
        run_id=run_id,
        estimate_tier=request.tier,
        estimate=est.to_json(),
        decision=decision.to_json(),
        queue=queue.to_json(),
        reserved=reserved,
        base=base.to_json() if base else None,
        comment=comment,
        comment_path=str(comment_path),
        chart=cost_chart(ctx.ledger.list_runs(model=request.spec.model.name, limit=CHART_RUNS * 3), CHART_RUNS),
        log_lines=log_lines(est, decision, queue),
    )


def _trusted_catalog(ctx: Context) -> tuple[Catalog, list[ProposedChange]]:
    """The pricing catalog that decides, and the PR's proposed changes to the trusted files.

    With a trusted ref the override is that ref's ``pricing.yaml``: a PR that cuts its own prices
    would otherwise turn a deny into an allow while the base's budget is honoured to the letter.
    """
    ref = ctx.policy_ref
    if not ref:
        return load_catalog(ctx.project_dir), []
    pricing = ctx.project_dir / CATALOG_FILE
    trusted_pricing = read_at_ref(ref, pricing, default="")
    policy = ctx.policy_path or ctx.project_dir / "policy.yml"
    trusted_policy = read_at_ref(ref, policy, default="")
    changes = [proposed_change(pricing, trusted_pricing), proposed_change(policy, trusted_policy)]
    return load_catalog(ctx.project_dir, override_text=trusted_pricing), [c for c in changes if c]


def _say_retrying() -> None:
    gha.info("the budget changed while this run was being estimated; deciding again")


def _keep_estimate(ledger: Ledger, run_id: str, est: CostEstimate) -> None:
    def keep(r: RunRecord) -> None:
        r.estimated_usd = est.usd_p90
        r.estimated_gpu_hours = est.gpu_hours_p90
        r.estimated_seconds = round(est.lease_p50_s, 1)
        r.instance_type = est.instance_type

    ledger.update_run(run_id, keep)


def _durations(
    ledger: Ledger,
    catalog: Catalog,
    smoke_step_s: float | None,
    smoke: SmokeTimings | None = None,
    data_bytes: int | None = None,
) -> Callable[[Spec], DurationEstimate]:
    cache: dict[str, DurationEstimate] = {}

    def duration_of(spec: Spec) -> DurationEstimate:
        key = spec.config_hash()
        if key not in cache:
            cache[key] = estimate_duration(spec, ledger, smoke_step_s, catalog, smoke=smoke, dataset_bytes=data_bytes)
        return cache[key]

    return duration_of


def smoke_timings(ledger: Ledger, run_id: str) -> SmokeTimings | None:
    """What preflight's smoke test measured for the phases (its latest ``preflight.smoke`` event's
    ``timings``); None when preflight did not record them."""
    for event in reversed(ledger.events(run_id)):
        if event.kind != "preflight.smoke":
            continue
        raw = event.data.get("timings")
        if not isinstance(raw, dict):
            return None
        try:
            return SmokeTimings.model_validate(raw)
        except ValueError:
            gha.info("the smoke test's timings in the run record are unreadable; estimating without them")
            return None
    return None


def dataset_bytes(spec: Spec, config_dir: Path, workdir: Path) -> int | None:
    """The dataset's size, when it is a local file or preflight downloaded it; None when not known."""
    uri = spec.dataset.uri
    if uri.startswith("s3://"):
        path = workdir / "dataset" / Path(uri.removeprefix("s3://").partition("/")[2]).name
    else:
        rest = uri.removeprefix("file://")
        path = Path(rest) if Path(rest).is_absolute() else config_dir / rest
    return path.stat().st_size if path.is_file() else None


def with_queue(est: CostEstimate, expected_s: float, worst_s: float) -> None:
    """Show the wait for a machine in the lane as the first phase: no machine is held, nothing is paid."""
    phases = [p for p in est.duration.phases if p.name != "queue"]
    if phases:
        queued = PhaseEstimate("queue", expected_s, max(worst_s, expected_s), "active leases", "", paid=False)
        est.duration.phases = [queued, *phases]


def _base_estimate(
    ctx: Context, base_ref: str, catalog: Catalog, tier: str, smoke: SmokeTimings | None, data_bytes: int | None
) -> CostEstimate | None:
    """The same estimate for the base branch's gpuline.yml, for the PR's diff.

    The smoke test ran the PR's code, so its step time says nothing of the base's; its start-up,
    checkpoint and eval timings stand for both sides, so the diff shows what the change changes."""
    from gpuline.spec import _validate
    from gpuline.yamlsource import load_yaml

    try:
        text = read_at_ref(base_ref, ctx.config_path)
        base_spec = _validate(load_yaml(Path(f"{base_ref}:{ctx.config_path}"), text), Spec).for_tier(tier)
        around = smoke.model_copy(update={"step_s": None}) if smoke else None
        duration = estimate_duration(base_spec, ctx.ledger, None, catalog, smoke=around, dataset_bytes=data_bytes)
        return estimate(base_spec, catalog, duration)
    except (InputError, ConfigError) as exc:
        # The file may not exist on the base branch yet, or be broken there: no diff then.
        gha.info(f"no base estimate: {exc.one_line()}")
        return None
