"""Allow, warn or deny a run from the (trusted) policy, and say what change would fit."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal, cast

from gpuline.cost import CostEstimate
from gpuline.runs import Cap, Usage
from gpuline.spec import Policy, Spec, Tier

Verdict = Literal["allow", "warn", "deny"]


@dataclass
class Decision:
    decision: Verdict
    reasons: list[str] = field(default_factory=list)
    suggestions: list[str] = field(default_factory=list)
    approved_by: str | None = None
    quota_before: dict[str, float | None] = field(default_factory=dict)
    quota_after: dict[str, float | None] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        text = self.decision.upper()
        if self.reasons:
            text += ": " + "; ".join(self.reasons)
        if self.suggestions:
            text += ". Would fit: " + "; ".join(self.suggestions)
        return text


def team_cap(policy: Policy, team: str) -> Cap:
    budget = policy.budget_for(team)
    if budget is None:
        return Cap()
    return Cap(gpu_hours=budget.gpu_hours.hard, usd=budget.usd.hard)


def decide(
    spec: Spec,
    tier: str,
    policy: Policy,
    est: CostEstimate,
    usage: Usage,
    approvals: frozenset[str] = frozenset(),
) -> Decision:
    deny: list[str] = []
    warn: list[str] = []
    fixes: list[str] = []
    res = spec.resources
    rules = policy.tiers.get(cast(Tier, tier))

    if rules is not None:
        if rules.allowed_gpu_types is not None and res.gpu_type not in rules.allowed_gpu_types:
            deny.append(f"gpu type {res.gpu_type} is not allowed on the {tier} tier")
            fixes.append(f"use one of {', '.join(rules.allowed_gpu_types)}")
        if rules.max_duration is not None and res.max_duration > rules.max_duration:
            deny.append(f"max_duration {res.max_duration}s exceeds the {tier} tier's {rules.max_duration}s")
            fixes.append(f"set resources.max_duration to at most {rules.max_duration}s or train fewer steps")
        total_gpus = res.gpu_count * res.nodes
        if rules.max_gpus is not None and total_gpus > rules.max_gpus:
            deny.append(f"{total_gpus} GPUs exceed the {tier} tier's limit of {rules.max_gpus}")
            fixes.append(f"use at most {rules.max_gpus} GPUs")
        if rules.allowed_lanes is not None and res.lane not in rules.allowed_lanes:
            deny.append(f"the {res.lane} lane is not allowed on the {tier} tier")
            fixes.append(f"use lane {rules.allowed_lanes[0]}")

    budget = policy.budget_for(spec.model.team)
    before = {"gpu_hours": usage.gpu_hours, "usd": usage.usd}
    after = {"gpu_hours": usage.gpu_hours + est.gpu_hours_cap, "usd": usage.usd + est.usd_cap}
    remaining_before: dict[str, float | None] = {"gpu_hours": None, "usd": None}
    remaining_after: dict[str, float | None] = {"gpu_hours": None, "usd": None}
    if budget is not None:
        for key, limit, unit in (("gpu_hours", budget.gpu_hours, "GPU-hours"), ("usd", budget.usd, "USD")):
            if limit.hard is not None:
                remaining_before[key] = round(limit.hard - before[key], 4)
                remaining_after[key] = round(limit.hard - after[key], 4)
            if limit.hard is not None and after[key] > limit.hard + 1e-9:
                over, this_run = after[key] - limit.hard, after[key] - before[key]
                deny.append(
                    f"team {spec.model.team}'s hard {unit} budget of {limit.hard:g} per {policy.budgets.period} "
                    f"would be exceeded by {over:.2f} (used {before[key]:.2f}, this run up to {this_run:.2f})"
                )
                fixes.extend(_budget_fixes(spec, est, key, limit.hard - before[key]))
            elif limit.soft is not None and after[key] > limit.soft + 1e-9:
                warn.append(f"team {spec.model.team}'s soft {unit} budget of {limit.soft:g} would be passed")

    approved_by = next(iter(sorted(approvals)), None)
    if deny and approvals:
        # An explicit approval (a PR label or an environment review) turns a deny into a warning.
        return Decision("warn", [*deny, *warn], fixes, approved_by, remaining_before, remaining_after)
    if deny:
        if policy.approval.label or policy.approval.environment:
            how = " or ".join(
                x
                for x in (
                    f"add the PR label '{policy.approval.label}'" if policy.approval.label else "",
                    f"approve the '{policy.approval.environment}' environment" if policy.approval.environment else "",
                )
                if x
            )
            fixes.append(f"ask for an exception: {how}")
        return Decision("deny", deny + warn, _unique(fixes), None, remaining_before, remaining_after)
    return Decision("warn" if warn else "allow", warn, [], None, remaining_before, remaining_after)


def _budget_fixes(spec: Spec, est: CostEstimate, key: str, room: float) -> list[str]:
    fixes: list[str] = []
    cap = est.gpu_hours_cap if key == "gpu_hours" else est.usd_cap
    if room <= 0:
        fixes.append(f"wait for the next {('budget period')} or settle running jobs")
        return fixes
    if cap > 0:
        fitting_s = int(spec.resources.max_duration * room / cap)
        if fitting_s >= 60:
            fixes.append(f"set resources.max_duration to {fitting_s // 60}m or less")
    if key == "usd" and spec.resources.lane != "spot":
        fixes.append("use the spot lane (resources.lane: spot)")
    if spec.resources.gpu_count > 1:
        fixes.append(f"use fewer GPUs (gpu_count: {spec.resources.gpu_count // 2})")
    return fixes


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))
