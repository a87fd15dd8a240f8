"""Allow, warn or deny a run from the (trusted) policy, and say which change would fit.

A deny is actionable: it names the limit, by how much the run is over it, when to retry (the next
budget period, or when running jobs give back their holds), and concrete changes that were each
re-estimated and checked to fit (:mod:`gpuline.decisions.suggestions`). An approval (a PR label or an
environment's reviewers, both named in policy.yml; :mod:`gpuline.decisions.approvals`) turns a deny
into a warning. The limits themselves are in :mod:`gpuline.decisions.limits`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal, cast

from gpuline.decisions.approvals import approval_how, approvals_from, first_approval
from gpuline.decisions.cost import CostEstimate
from gpuline.decisions.limits import (
    EPSILON,
    BudgetLine,
    budget_lines,
    org_cap,
    room_left,
    team_cap,
    tier_violations,
)
from gpuline.decisions.suggestions import MAX_SUGGESTIONS, Alternative, alternatives, fits, fitting_offers
from gpuline.runs import Reservation, Usage, period_key, utcnow
from gpuline.spec import Policy, Spec, Tier

__all__ = [
    "EPSILON",
    "MAX_SUGGESTIONS",
    "Alternative",
    "BudgetLine",
    "Decision",
    "Verdict",
    "alternatives",
    "approval_how",
    "approvals_from",
    "budget_lines",
    "decide",
    "fits",
    "next_period_start",
    "org_cap",
    "retry_window",
    "room_left",
    "team_cap",
    "tier_violations",
]

Verdict = Literal["allow", "warn", "deny"]


@dataclass
class Decision:
    decision: Verdict
    reasons: list[str] = field(default_factory=list)
    suggestions: list[str] = field(default_factory=list)
    approved_by: str | None = None
    quota_before: dict[str, float | None] = field(default_factory=dict)
    """The team's remaining GPU-hours and USD this period before this run ..."""
    quota_after: dict[str, float | None] = field(default_factory=dict)
    """... and after it, with the run at its most (what is reserved)."""
    budgets: list[BudgetLine] = field(default_factory=list)
    period: str = ""
    retry: str | None = None
    """When a denied run could try again as it is."""

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["budgets"] = [b.to_json() for b in self.budgets]
        return out

    def summary(self) -> str:
        text = self.decision.upper()
        if self.reasons:
            text += ": " + "; ".join(self.reasons)
        if self.suggestions:
            text += ". Would fit: " + "; ".join(self.suggestions)
        return text


def decide(
    spec: Spec,
    tier: str,
    policy: Policy,
    est: CostEstimate,
    usage: Usage,
    approvals: frozenset[str] = frozenset(),
    *,
    org_usage: Usage | None = None,
    alternatives: Iterable[Alternative] = (),
    retry: str | None = None,
) -> Decision:
    """The verdict for ``est`` given what the team (and org) already used this period."""
    broken = tier_violations(spec, tier, policy.tiers.get(cast(Tier, tier)))
    lines = budget_lines(policy, spec.model.team, est, usage, org_usage)
    over_budget, warn = _budget_findings(lines, policy.budgets.period)
    deny = [reason for reason, _ in broken] + over_budget
    decision = _undecided(lines, policy.budgets.period, retry)
    approved_by = first_approval(approvals)
    if not deny:
        decision.decision, decision.reasons = ("warn" if warn else "allow"), warn
    elif approved_by is not None:
        # An explicit approval (a PR label or an environment review) turns a deny into a warning.
        decision.decision, decision.approved_by = "warn", approved_by
        decision.reasons = [f"approved by {approved_by} despite: {r}" for r in deny] + warn
    else:
        # Only changes that were re-estimated and fit every limit (rules and budgets) are offered.
        fixes = [fix for _, fix in broken] + fitting_offers(alternatives, tier, policy, lines)
        if over_budget and retry:
            fixes.append(f"retry {retry}")
        how = approval_how(policy)
        if how:
            fixes.append(f"ask for an exception: {how}")
        decision.decision, decision.reasons, decision.suggestions = "deny", deny + warn, _unique(fixes)
    return decision


def _budget_findings(lines: Iterable[BudgetLine], period: str) -> tuple[list[str], list[str]]:
    """(hard limits this run would pass, soft limits it would pass), each as a reason."""
    deny: list[str] = []
    warn: list[str] = []
    for line in lines:
        over = line.over_hard()
        if over:
            deny.append(
                f"{line.scope}'s hard {line.unit} budget of {line.hard:g} per {period} would be exceeded by "
                f"{_amount(line.key, over)} (used {_amount(line.key, line.used)}, "
                f"this run up to {_amount(line.key, line.this_run)})"
            )
        elif line.over_soft():
            warn.append(
                f"{line.scope}'s soft {line.unit} budget of {line.soft:g} per {period} would be passed "
                f"({_amount(line.key, line.used + line.this_run)} with this run at its most)"
            )
    return deny, warn


def _undecided(lines: list[BudgetLine], period: str, retry: str | None) -> Decision:
    """An "allow" with the team's quota before and after this run filled in, for ``decide`` to settle."""
    team_lines = {line.key: line for line in lines if line.scope.startswith("team ")}
    keys = ("gpu_hours", "usd")
    before = {k: team_lines[k].remaining_before if k in team_lines else None for k in keys}
    after = {k: team_lines[k].remaining_after if k in team_lines else None for k in keys}
    return Decision("allow", [], [], None, before, after, lines, period_key(utcnow(), period), retry)


def retry_window(policy: Policy, now: datetime, holds: Iterable[Reservation], team: str) -> str:
    """When a denied run could try again unchanged: when the team's holds end, or the next period."""
    period = policy.budgets.period
    start = next_period_start(now, period)
    own = sorted(h.expires_at for h in holds if h.team == team and h.state == "held" and h.expires_at > now)
    text = f"after {start:%Y-%m-%d %H:%M} UTC, when the next {period}'s budget starts"
    if own:
        minutes = max(1, int((own[0] - now).total_seconds() // 60))
        text = (
            f"when one of the team's {len(own)} running job(s) settles (the first hold ends within "
            f"{minutes} min), or {text}"
        )
    return text


def next_period_start(now: datetime, period: str) -> datetime:
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "month":
        return (day.replace(day=1) + timedelta(days=32)).replace(day=1)
    return day + timedelta(days=7 - day.weekday())


def _amount(key: str, value: float) -> str:
    return f"${value:,.2f}" if key == "usd" else f"{value:,.2f} GPU-hours"


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))
