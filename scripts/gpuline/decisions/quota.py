"""Quota: deciding a run against the budgets and holding what it may spend, then settling or releasing it.

The hold is what the run can spend at most before max_duration stops it, so concurrent runs can never
together overshoot a hard budget; :func:`settle` later replaces it with the real cost. A hold expires
with the lease's TTL so a crashed run cannot keep it forever: `gpuline reap` releases it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from gpuline.decisions.cost import CostEstimate, DurationEstimate
from gpuline.decisions.policy import (
    Decision,
    alternatives,
    budget_lines,
    decide,
    org_cap,
    retry_window,
    room_left,
    team_cap,
)
from gpuline.decisions.pricing import Catalog
from gpuline.decisions.queue import QueueEstimate
from gpuline.errors import NotFoundError, PolicyDenied
from gpuline.runs import Cap, Ledger, Reservation, RunRecord, Usage, lease_ttl_s, period_key
from gpuline.spec import Policy, Spec

# A hold that loses a race for the last room is decided again, on fresh usage, this many times.
RESERVE_ATTEMPTS = 3


@dataclass(frozen=True)
class Request:
    """What a run asks of the budgets: its estimate for a tier, and the approvals it carries."""

    run_id: str
    spec: Spec
    base_spec: Spec
    tier: str
    policy: Policy
    estimate: CostEstimate
    approvals: frozenset[str]
    queue: QueueEstimate
    catalog: Catalog
    duration_of: Callable[[Spec], DurationEstimate]
    now: datetime


def admit(ledger: Ledger, req: Request, *, hold: bool, on_retry: Callable[[], None]) -> tuple[Decision, bool]:
    """Decide on fresh usage and (with ``hold``) hold the quota; a hold that loses a race is decided again.

    Returns the decision and whether quota is now held for the run."""
    policy, team = req.policy, req.spec.model.team
    period = period_key(req.now, policy.budgets.period)
    for _ in range(RESERVE_ATTEMPTS):
        usage = ledger.usage(team, period)
        org_usage = period_usage(ledger, period) if policy.budgets.org else None
        decision = decide(req.spec, req.tier, policy, req.estimate, usage, req.approvals, org_usage=org_usage)
        if decision.decision == "deny":
            return _explain_denial(ledger, req, usage, org_usage), False
        if not hold:
            return decision, False
        if reserve(ledger, req, period, decision) is not None:
            return decision, True
        on_retry()
    raise PolicyDenied(
        f"team {team}'s budget for {period} kept changing while this run tried to reserve ${req.estimate.usd_cap:,.2f}",
        hint="retry in a minute: other runs are reserving and settling right now",
    )


def _explain_denial(ledger: Ledger, req: Request, usage: Usage, org_usage: Usage | None) -> Decision:
    # Only now pay for the what-ifs and the retry window: an allowed run needs neither.
    team = req.spec.model.team
    lines = budget_lines(req.policy, team, req.estimate, usage, org_usage)
    alts = alternatives(
        req.spec,
        req.catalog,
        req.duration_of,
        current=req.estimate,
        room=room_left(lines),
        tier=req.tier,
        base=req.base_spec,
    )
    retry = retry_window(req.policy, req.now, ledger.reservations(state="held"), team)
    return decide(
        req.spec,
        req.tier,
        req.policy,
        req.estimate,
        usage,
        req.approvals,
        org_usage=org_usage,
        alternatives=alts,
        retry=retry,
    )


def reserve(ledger: Ledger, req: Request, period: str, decision: Decision) -> Reservation | None:
    """Hold the run's most for its TTL (from when the machine can start); None when the budget is full."""
    est, spec = req.estimate, req.spec
    ttl = req.queue.worst_wait_s + est.duration.startup_s + lease_ttl_s(spec.resources.max_duration)
    reservation = Reservation(
        run_id=req.run_id,
        team=spec.model.team,
        period=period,
        gpu_hours=est.gpu_hours_cap,
        usd=est.usd_cap,
        expires_at=req.now + timedelta(seconds=ttl),
    )
    approved = decision.approved_by is not None
    cap = Cap() if approved else team_cap(req.policy, spec.model.team)
    org = None if approved else org_cap(req.policy)
    if not ledger.reserve(reservation, cap, org):
        return None
    ledger.append_event(
        req.run_id,
        "quota.reserved",
        {
            "gpu_hours": reservation.gpu_hours,
            "usd": reservation.usd,
            "period": period,
            "expires_at": reservation.expires_at.isoformat(),
            "approved_by": decision.approved_by,
        },
    )
    return reservation


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


def hold_until(ledger: Ledger, run_id: str, expires: datetime) -> None:
    """Make the run's hold expire with its lease, not with the estimate's guess of when it would start,
    so the reaper never frees the budget of a machine that is still allowed to run."""
    held = next((r for r in ledger.reservations(state="held") if r.run_id == run_id), None)
    if held is not None and held.expires_at != expires:
        # Re-reserving replaces the same amounts; no cap, since the budget check already admitted them.
        ledger.reserve(held.model_copy(update={"expires_at": expires}), Cap(), None)


def settle(ledger: Ledger, record: RunRecord) -> str:
    """Replace the hold with the actual cost, or give it back when nothing was bought; says which."""
    if record.times.provisioned is None:
        return "released" if ledger.release(record.run_id) else "none held"
    hours = record.gpu_seconds / 3600
    try:
        ledger.settle(record.run_id, hours, record.actual_usd or 0.0)
    except NotFoundError:
        return "no reservation"
    return f"settled at {hours:.3f} GPU-hours, ${record.actual_usd or 0:.2f}"
