"""cost-estimate: GPU-hours and dollars from the catalog, a policy decision, and a quota reservation."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from gpuline import gha
from gpuline.context import Context
from gpuline.cost import CostEstimate, estimate, estimate_duration
from gpuline.errors import PolicyDenied
from gpuline.policy import Decision, decide, team_cap
from gpuline.pricing import load_catalog
from gpuline.runs import Cap, Reservation, period_key, ttl_expiry, utcnow
from gpuline.spec import Spec
from gpuline.steps.common import outputs, recorded, table

# Machines need time to boot and register before the training clock starts; the lease (and so the
# reservation) lives this much longer than max_duration.
LEASE_SLACK_S = 15 * 60


def run(args: argparse.Namespace) -> dict[str, Any]:
    ctx = Context.from_args(args)
    labels = frozenset(x.strip() for x in (args.labels or "").split(",") if x.strip())
    return cost_estimate(ctx, labels=labels, reserve=not args.no_reserve, base_ref=args.base_ref)


def cost_estimate(
    ctx: Context, *, labels: frozenset[str] = frozenset(), reserve: bool = True, base_ref: str | None = None
) -> dict[str, Any]:
    spec = ctx.spec
    record = ctx.ensure_run()
    with recorded(ctx, "cost-estimate"):
        catalog = load_catalog(ctx.project_dir)
        est = estimate(spec, catalog, estimate_duration(spec, ctx.ledger, record.smoke_step_s))
        period = period_key(utcnow(), ctx.policy.budgets.period)
        usage = ctx.ledger.usage(spec.model.team, period)
        approvals = _approvals(ctx, labels)
        decision = decide(spec, ctx.tier, ctx.policy, est, usage, approvals)
        base = _base_estimate(ctx, base_ref, catalog) if base_ref else None

        def keep(r: Any) -> None:
            r.estimated_usd = est.usd_p90
            r.estimated_gpu_hours = est.gpu_hours_p90
            r.instance_type = est.instance_type

        ctx.ledger.update_run(record.run_id, keep)
        ctx.event("cost.estimated", estimate=est.to_json(), decision=decision.to_json())
        comment = render_comment(ctx, est, decision, base)
        comment_path = ctx.workdir(record.run_id) / "cost-comment.md"
        comment_path.write_text(comment)
        gha.append_summary(comment)
        outputs(
            {
                "run-id": record.run_id,
                "usd": f"{est.usd_p90:.2f}",
                "gpu-hours": f"{est.gpu_hours_p90:.3f}",
                "decision": decision.decision,
                "comment-path": str(comment_path),
            }
        )
        _print(est, decision)
        if decision.decision == "deny":
            raise PolicyDenied("; ".join(decision.reasons), hint="; ".join(decision.suggestions) or None)
        reserved = False
        # pr-fast only estimates: nothing will be bought, so no budget is held for it.
        if reserve and ctx.tier != "pr-fast":
            reserved = _reserve(ctx, spec, est, period, decision)
    return {
        "run_id": record.run_id,
        "estimate": est.to_json(),
        "decision": decision.to_json(),
        "reserved": reserved,
        "base": base.to_json() if base else None,
        "comment_path": str(comment_path),
    }


def _approvals(ctx: Context, labels: frozenset[str]) -> frozenset[str]:
    wanted = ctx.policy.approval.label
    return frozenset({f"label:{wanted}"}) if wanted and wanted in labels else frozenset()


def _reserve(ctx: Context, spec: Spec, est: CostEstimate, period: str, decision: Decision) -> bool:
    # Reserve what the run can spend at most before its TTL stops it, so concurrent runs can never
    # together overshoot a hard budget; settle() later replaces it with the real cost.
    assert ctx.run_id
    reservation = Reservation(
        run_id=ctx.run_id,
        team=spec.model.team,
        period=period,
        gpu_hours=est.gpu_hours_cap,
        usd=est.usd_cap,
        expires_at=ttl_expiry(utcnow(), spec.resources.max_duration + LEASE_SLACK_S),
    )
    cap = team_cap(ctx.policy, spec.model.team) if decision.approved_by is None else Cap()
    org = ctx.policy.budgets.org
    org_cap = Cap(gpu_hours=org.gpu_hours.hard, usd=org.usd.hard) if org and decision.approved_by is None else None
    if not ctx.ledger.reserve(reservation, cap, org_cap):
        # Another run took the room between our decision and the reservation.
        raise PolicyDenied(
            f"team {spec.model.team}'s budget filled up while this run was being estimated",
            hint="retry when a running job finishes, or shorten resources.max_duration",
        )
    ctx.event("quota.reserved", gpu_hours=reservation.gpu_hours, usd=reservation.usd, period=period)
    return True


def _base_estimate(ctx: Context, base_ref: str, catalog: Any) -> CostEstimate | None:
    """The same estimate for the base branch's gpuline.yml, for the PR's diff."""
    from gpuline.policy_source import read_at_ref
    from gpuline.spec import _validate
    from gpuline.yamlsource import load_yaml

    try:
        text = read_at_ref(base_ref, ctx.config_path)
    except Exception as exc:  # the file may not exist on the base branch yet: no diff then
        gha.info(f"no base estimate: {exc}")
        return None
    base_spec = _validate(load_yaml(Path(f"{base_ref}:{ctx.config_path}"), text), Spec).for_tier(ctx.tier)
    return estimate(base_spec, catalog, estimate_duration(base_spec, ctx.ledger, None))


def _delta(head: float, base: float | None) -> str:
    if base is None:
        return "new"
    if base == 0:
        return "±0%" if head == 0 else "+∞"
    change = (head - base) / base * 100
    return f"{change:+.0f}%"


def render_comment(ctx: Context, est: CostEstimate, decision: Decision, base: CostEstimate | None) -> str:
    icon = {"allow": ":white_check_mark:", "warn": ":warning:", "deny": ":no_entry:"}[decision.decision]
    d = est.duration
    rows = [
        ("instance", f"{est.instance_type} ({est.gpus_per_node} x {est.gpu_type}) x {est.nodes}, {est.lane}"),
        ("training time p50–p90", f"{d.p50_s / 60:.1f}–{d.p90_s / 60:.1f} min ({d.note})"),
        (
            "GPU-hours p50–p90",
            f"{est.gpu_hours_p50:.3f}–{est.gpu_hours_p90:.3f}"
            + (f" ({_delta(est.gpu_hours_p90, base.gpu_hours_p90)} vs base)" if base else ""),
        ),
        (
            "cost p50–p90",
            f"${est.usd_p50:.2f}–${est.usd_p90:.2f}"
            + (f" ({_delta(est.usd_p90, base.usd_p90)} vs base)" if base else ""),
        ),
        ("at most (max duration)", f"${est.usd_cap:.2f}, {est.gpu_hours_cap:.3f} GPU-hours"),
    ]
    before, after = decision.quota_before, decision.quota_after
    if before.get("gpu_hours") is not None or before.get("usd") is not None:
        rows.append(
            (
                "team quota left (GPU-h / $)",
                f"{before.get('gpu_hours')} / {before.get('usd')} → {after.get('gpu_hours')} / {after.get('usd')}",
            )
        )
    body = [
        "<!-- gpuline:cost-estimate -->",
        f"### {icon} gpuline cost estimate: {decision.decision}",
        "",
        table(rows, ("", "")),
        "",
    ]
    if decision.reasons:
        body += ["**Why:** " + "; ".join(decision.reasons), ""]
    if decision.suggestions:
        body += ["**Would fit:** " + "; ".join(decision.suggestions), ""]
    body.append(f"<sub>run {ctx.run_id} · tier {ctx.tier} · pricing catalog {est.catalog_version}</sub>")
    return "\n".join(body) + "\n"


def _print(est: CostEstimate, decision: Decision) -> None:
    gha.info(
        f"estimate: {est.instance_type} x{est.nodes} ({est.lane}), "
        f"{est.duration.p50_s / 60:.1f}-{est.duration.p90_s / 60:.1f} min, "
        f"{est.gpu_hours_p90:.3f} GPU-hours, ${est.usd_p90:.2f} (at most ${est.usd_cap:.2f}) [{est.duration.note}]"
    )
    gha.info(f"decision: {decision.summary()}")
