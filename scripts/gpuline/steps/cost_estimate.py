"""cost-estimate: GPU-hours and dollars from the catalog, queue wait, a policy decision, and a quota hold.

On a pull request (tier pr-fast, which buys nothing) the question is what the change will cost once
it trains, so the estimate is for the tier that trains after merge (nightly, or
``GPULINE_ESTIMATE_TIER``), and nothing is reserved.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from gpuline import gha
from gpuline.context import Context
from gpuline.decisions.cost import CostEstimate, DurationEstimate, billing_text, estimate, estimate_duration
from gpuline.decisions.policy import (
    Decision,
    alternatives,
    approval_how,
    approvals_from,
    budget_lines,
    decide,
    org_cap,
    retry_window,
    room_left,
    team_cap,
)
from gpuline.decisions.pricing import Catalog, load_catalog
from gpuline.decisions.queue import QueueEstimate, estimate_wait
from gpuline.errors import ConfigError, InputError, PolicyDenied
from gpuline.runs import Cap, Ledger, Reservation, RunRecord, Usage, period_key, utcnow
from gpuline.spec import TIERS, Spec
from gpuline.steps.common import outputs, recorded, table

COMMENT_MARKER = "<!-- gpuline:cost-estimate -->"
# Machines need time to boot and register before the training clock starts; the lease (and so the
# reservation) lives this much longer than max_duration.
LEASE_SLACK_S = 15 * 60
# A reservation that loses a race for the last room is re-decided with fresh usage this many times.
RESERVE_ATTEMPTS = 3
CHART_RUNS = 20


def run(args: argparse.Namespace) -> dict[str, Any]:
    ctx = Context.from_args(args)
    labels = frozenset(x.strip() for x in (args.labels or "").split(",") if x.strip())
    return cost_estimate(ctx, labels=labels, reserve=not args.no_reserve, base_ref=args.base_ref)


def estimate_tier(tier: str) -> str:
    """The tier whose spending this run's estimate is about."""
    if tier != "pr-fast":
        return tier
    wanted = os.environ.get("GPULINE_ESTIMATE_TIER") or "nightly"
    if wanted not in TIERS:
        raise InputError(
            f"GPULINE_ESTIMATE_TIER={wanted!r} is not a tier", hint=f"use one of {', '.join(TIERS)} or unset it"
        )
    return wanted


def cost_estimate(
    ctx: Context, *, labels: frozenset[str] = frozenset(), reserve: bool = True, base_ref: str | None = None
) -> dict[str, Any]:
    record = ctx.ensure_run()
    with recorded(ctx, "cost-estimate"):
        target = estimate_tier(ctx.tier)
        spec = ctx.spec if target == ctx.tier else ctx.base_spec.for_tier(target)
        catalog = load_catalog(ctx.project_dir)
        duration_of = _durations(ctx.ledger, catalog, record.smoke_step_s)
        est = estimate(spec, catalog, duration_of(spec))
        now = utcnow()
        queue = estimate_wait(ctx.ledger, ctx.policy, spec.resources.lane, now)
        approvals = approvals_from(ctx.policy, labels, os.environ.get("GPULINE_APPROVED_ENVIRONMENT"))
        # pr-fast buys nothing, so nothing is held for it.
        hold = reserve and ctx.tier != "pr-fast"
        decision, reserved = _decide_and_hold(ctx, spec, target, est, approvals, duration_of, catalog, queue, now, hold)
        base = _base_estimate(ctx, base_ref, catalog, target) if base_ref else None

        def keep(r: RunRecord) -> None:
            r.estimated_usd = est.usd_p90
            r.estimated_gpu_hours = est.gpu_hours_p90
            r.estimated_seconds = round(est.lease_p50_s, 1)
            r.instance_type = est.instance_type

        ctx.ledger.update_run(record.run_id, keep)
        ctx.event(
            "cost.estimated",
            estimate=est.to_json(),
            decision=decision.to_json(),
            queue=queue.to_json(),
            estimate_tier=target,
            reserved=reserved,
        )
        comment = render_comment(ctx, est, decision, base, queue=queue, estimate_tier=target)
        comment_path = ctx.workdir(record.run_id) / "cost-comment.md"
        comment_path.write_text(comment, encoding="utf-8")
        from gpuline.steps.report import cost_chart

        chart = cost_chart(ctx.ledger.list_runs(model=spec.model.name, limit=CHART_RUNS * 3), CHART_RUNS)
        gha.append_summary(comment + ("\n" + chart if chart else ""))
        outputs(
            {
                "run-id": record.run_id,
                "usd": f"{est.usd_p90:.2f}",
                "gpu-hours": f"{est.gpu_hours_p90:.3f}",
                "usd-max": f"{est.usd_cap:.2f}",
                "duration-basis": est.duration.basis,
                "expected-wait-s": f"{queue.expected_wait_s:.0f}",
                "decision": decision.decision,
                "comment-path": str(comment_path),
            }
        )
        _print(est, decision, queue)
        if decision.decision == "deny":
            raise PolicyDenied("; ".join(decision.reasons), hint="; ".join(decision.suggestions) or None)
    return {
        "run_id": record.run_id,
        "estimate_tier": target,
        "estimate": est.to_json(),
        "decision": decision.to_json(),
        "queue": queue.to_json(),
        "reserved": reserved,
        "base": base.to_json() if base else None,
        "comment_path": str(comment_path),
    }


def _durations(ledger: Ledger, catalog: Catalog, smoke_step_s: float | None) -> Callable[[Spec], DurationEstimate]:
    cache: dict[str, DurationEstimate] = {}

    def duration_of(spec: Spec) -> DurationEstimate:
        key = spec.config_hash()
        if key not in cache:
            cache[key] = estimate_duration(spec, ledger, smoke_step_s, catalog)
        return cache[key]

    return duration_of


def _decide_and_hold(
    ctx: Context,
    spec: Spec,
    tier: str,
    est: CostEstimate,
    approvals: frozenset[str],
    duration_of: Callable[[Spec], DurationEstimate],
    catalog: Catalog,
    queue: QueueEstimate,
    now: datetime,
    hold: bool,
) -> tuple[Decision, bool]:
    """Decide on fresh usage and hold the quota; a hold that loses a race is decided again."""
    policy, team = ctx.policy, spec.model.team
    period = period_key(now, policy.budgets.period)
    for _ in range(RESERVE_ATTEMPTS):
        usage = ctx.ledger.usage(team, period)
        org_usage = period_usage(ctx.ledger, period) if policy.budgets.org else None
        decision = decide(spec, tier, policy, est, usage, approvals, org_usage=org_usage)
        if decision.decision == "deny":
            # Only now pay for the what-ifs and the retry window: an allowed run needs neither.
            lines = budget_lines(policy, team, est, usage, org_usage)
            alts = alternatives(
                spec, catalog, duration_of, current=est, room=room_left(lines), tier=tier, base=ctx.base_spec
            )
            retry = retry_window(policy, now, ctx.ledger.reservations(state="held"), team)
            return decide(
                spec, tier, policy, est, usage, approvals, org_usage=org_usage, alternatives=alts, retry=retry
            ), False
        if not hold:
            return decision, False
        if _reserve(ctx, spec, est, period, decision, queue, now):
            return decision, True
        gha.info("the budget changed while this run was being estimated; deciding again")
    raise PolicyDenied(
        f"team {team}'s budget for {period} kept changing while this run tried to reserve {_money(est.usd_cap)}",
        hint="retry in a minute: other runs are reserving and settling right now",
    )


def period_usage(ledger: Ledger, period: str) -> Usage:
    """All teams' holds and settled costs in ``period`` (for the org budget)."""
    usage = Usage(team="*", period=period)
    for r in ledger.reservations():
        if r.period != period:
            continue
        if r.state == "held":
            usage.held_gpu_hours += r.gpu_hours
            usage.held_usd += r.usd
        elif r.state == "settled":
            usage.settled_gpu_hours += r.gpu_hours
            usage.settled_usd += r.usd
    return usage


def _reserve(
    ctx: Context, spec: Spec, est: CostEstimate, period: str, decision: Decision, queue: QueueEstimate, now: datetime
) -> bool:
    # Hold what the run can spend at most before max_duration stops it, so concurrent runs can never
    # together overshoot a hard budget; settle() later replaces it with the real cost. The hold
    # expires with the lease's TTL (counted from when the machine can start) so a crashed run
    # cannot keep it forever: `gpuline reap` releases it.
    assert ctx.run_id
    ttl = queue.worst_wait_s + est.duration.startup_s + spec.resources.max_duration + LEASE_SLACK_S
    reservation = Reservation(
        run_id=ctx.run_id,
        team=spec.model.team,
        period=period,
        gpu_hours=est.gpu_hours_cap,
        usd=est.usd_cap,
        expires_at=now + timedelta(seconds=ttl),
    )
    approved = decision.approved_by is not None
    cap = Cap() if approved else team_cap(ctx.policy, spec.model.team)
    org = None if approved else org_cap(ctx.policy)
    if not ctx.ledger.reserve(reservation, cap, org):
        return False
    ctx.event(
        "quota.reserved",
        gpu_hours=reservation.gpu_hours,
        usd=reservation.usd,
        period=period,
        expires_at=reservation.expires_at.isoformat(),
        approved_by=decision.approved_by,
    )
    return True


def _base_estimate(ctx: Context, base_ref: str, catalog: Catalog, tier: str) -> CostEstimate | None:
    """The same estimate for the base branch's gpuline.yml, for the PR's diff."""
    from gpuline.decisions.policy_source import read_at_ref
    from gpuline.spec import _validate
    from gpuline.yamlsource import load_yaml

    try:
        text = read_at_ref(base_ref, ctx.config_path)
        base_spec = _validate(load_yaml(Path(f"{base_ref}:{ctx.config_path}"), text), Spec).for_tier(tier)
        return estimate(base_spec, catalog, estimate_duration(base_spec, ctx.ledger, None, catalog))
    except (InputError, ConfigError) as exc:
        # The file may not exist on the base branch yet, or be broken there: no diff then.
        gha.info(f"no base estimate: {exc.one_line()}")
        return None


# ---------------------------------------------------------------- the PR comment


def _delta(head: float, base: float | None) -> str:
    if base is None:
        return "new"
    if base == 0:
        return "±0%" if head == 0 else "new cost"
    change = (head - base) / base * 100
    return "±0%" if abs(change) < 0.5 else f"{change:+.0f}%"


def _money(value: float) -> str:
    return f"-${-value:,.2f}" if value < 0 else f"${value:,.2f}"


def _rate(value: float) -> str:
    """Hourly prices keep their precision ($0.526, $21.9576) but show at least cents ($4.20)."""
    text = f"{value:,.4f}".rstrip("0")
    return "$" + (text + "0" if len(text.split(".")[1]) < 2 else text)


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:,.1f} min"


def _minutes_range(low: float, high: float) -> str:
    if high < 60:
        return _range(f"{low:,.1f}", f"{high:,.1f}") + " s"
    return _range(f"{low / 60:,.1f}", f"{high / 60:,.1f}") + " min"


def _range(low: str, high: str) -> str:
    return low if low == high else f"{low}–{high}"


def render_comment(
    ctx: Context,
    est: CostEstimate,
    decision: Decision,
    base: CostEstimate | None,
    *,
    queue: QueueEstimate | None = None,
    estimate_tier: str | None = None,
) -> str:
    icon = {"allow": ":white_check_mark:", "warn": ":warning:", "deny": ":no_entry:"}[decision.decision]
    d = est.duration
    tier = estimate_tier or ctx.tier
    bound = " (upper bound)" if d.upper_bound else ""
    metrics: list[tuple[str, str, str | None, float, float | None]] = [
        (
            "training time p50–p90" + bound,
            _minutes_range(d.p50_s, d.p90_s),
            _minutes_range(base.duration.p50_s, base.duration.p90_s) if base else None,
            d.p50_s,
            base.duration.p50_s if base else None,
        ),
        (
            "GPU-hours p50–p90",
            _range(f"{est.gpu_hours_p50:.3f}", f"{est.gpu_hours_p90:.3f}"),
            _range(f"{base.gpu_hours_p50:.3f}", f"{base.gpu_hours_p90:.3f}") if base else None,
            est.gpu_hours_p50,
            base.gpu_hours_p50 if base else None,
        ),
        (
            "cost p50–p90",
            _range(_money(est.usd_p50), _money(est.usd_p90)),
            _range(_money(base.usd_p50), _money(base.usd_p90)) if base else None,
            est.usd_p50,
            base.usd_p50 if base else None,
        ),
        (
            "at most (max_duration)",
            f"{_money(est.usd_cap)}, {est.gpu_hours_cap:.3f} GPU-hours",
            f"{_money(base.usd_cap)}, {base.gpu_hours_cap:.3f} GPU-hours" if base else None,
            est.usd_cap,
            base.usd_cap if base else None,
        ),
    ]
    lines = [COMMENT_MARKER, f"### {icon} gpuline cost estimate: {decision.decision}", ""]
    if base is not None:
        lines += ["| | base | this PR | change |", "|---|---|---|---|"]
        lines += [f"| {name} | {b} | {h} | {_delta(hv, bv)} |" for name, h, b, hv, bv in metrics]
    else:
        lines.append(table([(name, h) for name, h, _, _, _ in metrics], ("", "")))
    info: list[tuple[str, str]] = [
        ("instance", f"{est.instance_type} ({est.gpus_per_node} x {est.gpu_type}) x {est.nodes}, {est.lane} lane"),
        ("price", f"{_rate(est.hourly_usd)}/hour per node, {billing_text(est)}"),
        ("estimate basis", d.note),
        *([("base estimate basis", base.duration.note)] if base else []),
        ("start-up", f"{_minutes(d.startup_s)} ({d.startup_note})"),
    ]
    if queue is not None:
        info.append(("queue", queue.describe()))
    for line in decision.budgets:
        before, after = line.remaining_before, line.remaining_after
        if before is None or after is None:
            continue
        fmt = _money if line.key == "usd" else (lambda v: f"{v:,.2f}")
        info.append(
            (
                f"{line.scope} {line.unit} left ({decision.period})",
                f"{fmt(before)} → {fmt(after)} after this run at its most",
            )
        )
    lines += ["", table(info, ("", "")), ""]
    if decision.reasons:
        lines += ["**Why:** " + "; ".join(decision.reasons), ""]
    if decision.suggestions:
        lines.append("**Would fit:**")
        lines += [f"- {s}" for s in decision.suggestions]
        lines.append("")
    if decision.decision == "deny" and not any("exception" in s for s in decision.suggestions):
        how = approval_how(ctx.policy)
        if how:
            lines += [f"Exceptions: {how}.", ""]
    lines.append(
        f"<sub>run {ctx.run_id} · estimated for the {tier} tier · pricing catalog {est.catalog_version}"
        + "".join(f" · {note}" for note in est.notes)
        + "</sub>"
    )
    return "\n".join(lines) + "\n"


def _print(est: CostEstimate, decision: Decision, queue: QueueEstimate) -> None:
    d = est.duration
    gha.info(
        f"estimate: {est.instance_type} x{est.nodes} ({est.lane}), "
        f"{_minutes_range(d.p50_s, d.p90_s)} training + {_minutes(d.startup_s)} start-up, "
        f"{est.gpu_hours_p90:.3f} GPU-hours, ${est.usd_p90:.2f} (at most ${est.usd_cap:.2f}) [{d.note}]"
    )
    gha.info(f"queue: {queue.describe()}")
    gha.info(f"decision: {decision.summary()}")
