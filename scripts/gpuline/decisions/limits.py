"""The limits a run is checked against: its tier's rules, and the team's and the org's budgets."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any, Literal

from gpuline.decisions.cost import CostEstimate
from gpuline.runs import Cap, Usage
from gpuline.spec import Limit, Policy, Spec, TeamBudget, TierPolicy

# Amounts closer than this count as equal (floating point sums of hours and dollars).
EPSILON = 1e-9
BudgetKey = Literal["gpu_hours", "usd"]


@dataclass
class BudgetLine:
    """One limit a run is checked against: a team's or the org's GPU-hours or dollars this period."""

    scope: str
    key: BudgetKey
    soft: float | None
    hard: float | None
    used: float
    this_run: float

    @property
    def unit(self) -> str:
        return "GPU-hours" if self.key == "gpu_hours" else "USD"

    @property
    def remaining_before(self) -> float | None:
        limit = self.hard if self.hard is not None else self.soft
        return None if limit is None else round(limit - self.used, 4)

    @property
    def remaining_after(self) -> float | None:
        before = self.remaining_before
        return None if before is None else round(before - self.this_run, 4)

    def over_hard(self, amount: float | None = None) -> float:
        """By how much ``amount`` (this run's, by default) would pass the hard limit; 0 when it fits."""
        if self.hard is None:
            return 0.0
        over = self.used + (self.this_run if amount is None else amount) - self.hard
        return over if over > EPSILON else 0.0

    def over_soft(self) -> bool:
        """Whether this run, at its most, would pass the soft limit."""
        return self.soft is not None and self.used + self.this_run > self.soft + EPSILON

    def to_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "unit": self.unit,
            "remaining_before": self.remaining_before,
            "remaining_after": self.remaining_after,
        }


def team_cap(policy: Policy, team: str) -> Cap:
    budget = policy.budget_for(team)
    if budget is None:
        return Cap()
    return Cap(gpu_hours=budget.gpu_hours.hard, usd=budget.usd.hard)


def org_cap(policy: Policy) -> Cap | None:
    org = policy.budgets.org
    if org is None or (org.gpu_hours.hard is None and org.usd.hard is None):
        return None
    return Cap(gpu_hours=org.gpu_hours.hard, usd=org.usd.hard)


def budget_lines(
    policy: Policy, team: str, est: CostEstimate, usage: Usage, org_usage: Usage | None = None
) -> list[BudgetLine]:
    """Every budget limit set for the team and the org, with what was used and what this run may use."""
    lines: list[BudgetLine] = []
    scopes: list[tuple[str, TeamBudget | None, Usage | None]] = [
        (f"team {team}", policy.budget_for(team), usage),
        ("the org", policy.budgets.org, org_usage),
    ]
    for scope, budget, used in scopes:
        if budget is None or used is None:
            continue
        limits: tuple[tuple[BudgetKey, Limit, float, float], ...] = (
            ("gpu_hours", budget.gpu_hours, used.gpu_hours, est.gpu_hours_cap),
            ("usd", budget.usd, used.usd, est.usd_cap),
        )
        for key, limit, spent, this_run in limits:
            if limit.soft is not None or limit.hard is not None:
                lines.append(BudgetLine(scope, key, limit.soft, limit.hard, spent, this_run))
    return lines


def room_left(lines: Iterable[BudgetLine]) -> Cap:
    """What the tightest hard limit still allows in each dimension (None: unlimited)."""
    room: dict[str, float | None] = {"gpu_hours": None, "usd": None}
    for line in lines:
        if line.hard is None:
            continue
        left = max(0.0, line.hard - line.used)
        current = room[line.key]
        room[line.key] = left if current is None else min(current, left)
    return Cap(gpu_hours=room["gpu_hours"], usd=room["usd"])


def tier_violations(spec: Spec, tier: str, rules: TierPolicy | None) -> list[tuple[str, str]]:
    """(reason, fix) for each of the tier's rules the spec breaks."""
    if rules is None:
        return []
    res = spec.resources
    out: list[tuple[str, str]] = []
    if rules.allowed_gpu_types is not None and res.gpu_type not in rules.allowed_gpu_types:
        out.append(
            (
                f"gpu type {res.gpu_type} is not allowed on the {tier} tier",
                f"use resources.gpu_type: one of {', '.join(rules.allowed_gpu_types)}",
            )
        )
    if rules.max_duration is not None and res.max_duration > rules.max_duration:
        out.append(
            (
                f"max_duration {res.max_duration}s exceeds the {tier} tier's {rules.max_duration}s",
                f"set resources.max_duration to {duration_text(rules.max_duration)} or less (train fewer steps)",
            )
        )
    total_gpus = res.gpu_count * res.nodes
    if rules.max_gpus is not None and total_gpus > rules.max_gpus:
        out.append(
            (
                f"{total_gpus} GPUs exceed the {tier} tier's limit of {rules.max_gpus}",
                f"use at most {rules.max_gpus} GPUs (resources.gpu_count x resources.nodes)",
            )
        )
    if rules.allowed_lanes is not None and res.lane not in rules.allowed_lanes:
        out.append(
            (
                f"the {res.lane} lane is not allowed on the {tier} tier",
                f"use resources.lane: {rules.allowed_lanes[0]}",
            )
        )
    return out


def duration_text(seconds: int) -> str:
    """``seconds`` as gpuline.yml writes a duration: ``2h``, ``2h10m``, ``45m`` or ``90s``."""
    if seconds % 3600 == 0:
        return f"{seconds // 3600}h"
    if seconds >= 3600:
        return f"{seconds // 3600}h{(seconds % 3600) // 60}m"
    return f"{seconds // 60}m" if seconds % 60 == 0 else f"{seconds}s"
