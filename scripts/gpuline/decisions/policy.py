"""Allow, warn or deny a run from the (trusted) policy, and say which change would fit.

A deny is actionable: it names the limit, by how much the run is over it, when to retry (the next
budget period, or when running jobs give back their holds), and concrete changes that were each
re-estimated and checked to fit: the spot lane, a shorter max_duration (fewer steps), fewer or
smaller GPUs, or another tier's fast approximate settings. An approval (a PR label or an
environment's reviewers, both named in policy.yml) turns a deny into a warning.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal, cast

from gpuline.decisions.cost import CostEstimate, DurationEstimate, estimate, spec_steps
from gpuline.decisions.pricing import Catalog
from gpuline.errors import GpulineError
from gpuline.runs import Cap, Reservation, Usage, period_key, utcnow
from gpuline.spec import Limit, Policy, Spec, TeamBudget, Tier, TierPolicy

Verdict = Literal["allow", "warn", "deny"]
EPSILON = 1e-9
MAX_SUGGESTIONS = 4


@dataclass
class BudgetLine:
    """One limit a run is checked against: a team's or the org's GPU-hours or dollars this period."""

    scope: str
    key: Literal["gpu_hours", "usd"]
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

    def to_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "unit": self.unit,
            "remaining_before": self.remaining_before,
            "remaining_after": self.remaining_after,
        }


@dataclass
class Alternative:
    """A change to gpuline.yml and what the run would cost with it."""

    change: str
    spec: Spec
    estimate: CostEstimate


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
    lines: list[BudgetLine] = []
    scopes: list[tuple[str, TeamBudget | None, Usage | None]] = [
        (f"team {team}", policy.budget_for(team), usage),
        ("the org", policy.budgets.org, org_usage),
    ]
    for scope, budget, used in scopes:
        if budget is None or used is None:
            continue
        limits: tuple[tuple[Literal["gpu_hours", "usd"], Limit, float, float], ...] = (
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
                f"set resources.max_duration to {_duration(rules.max_duration)} or less (train fewer steps)",
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
    deny: list[str] = []
    warn: list[str] = []
    fixes: list[str] = []
    rules = policy.tiers.get(cast(Tier, tier))
    for reason, fix in tier_violations(spec, tier, rules):
        deny.append(reason)
        fixes.append(fix)

    lines = budget_lines(policy, spec.model.team, est, usage, org_usage)
    period = policy.budgets.period
    over_budget = False
    for line in lines:
        over = line.over_hard()
        if over:
            over_budget = True
            deny.append(
                f"{line.scope}'s hard {line.unit} budget of {line.hard:g} per {period} would be exceeded by "
                f"{_amount(line.key, over)} (used {_amount(line.key, line.used)}, "
                f"this run up to {_amount(line.key, line.this_run)})"
            )
        elif line.soft is not None and line.used + line.this_run > line.soft + EPSILON:
            warn.append(
                f"{line.scope}'s soft {line.unit} budget of {line.soft:g} per {period} would be passed "
                f"({_amount(line.key, line.used + line.this_run)} with this run at its most)"
            )

    if deny:
        # Only changes that were re-estimated and fit every limit (rules and budgets) are offered.
        fitting = [alt for alt in alternatives if fits(alt, tier, policy, lines)]
        fixes.extend(alt.change + _price(alt.estimate) for alt in fitting[:MAX_SUGGESTIONS])
        if over_budget and retry:
            fixes.append(f"retry {retry}")
    team_lines = {line.key: line for line in lines if line.scope.startswith("team ")}
    before = {k: team_lines[k].remaining_before if k in team_lines else None for k in ("gpu_hours", "usd")}
    after = {k: team_lines[k].remaining_after if k in team_lines else None for k in ("gpu_hours", "usd")}
    base = Decision("allow", [], [], None, before, after, lines, period_key(utcnow(), period), retry)

    approved_by = next(iter(sorted(approvals)), None)
    if deny and approved_by is not None:
        # An explicit approval (a PR label or an environment review) turns a deny into a warning.
        base.decision, base.approved_by = "warn", approved_by
        base.reasons = [f"approved by {approved_by} despite: {r}" for r in deny] + warn
        return base
    if deny:
        how = approval_how(policy)
        if how:
            fixes.append(f"ask for an exception: {how}")
        base.decision, base.reasons, base.suggestions = "deny", deny + warn, _unique(fixes)
        return base
    base.decision, base.reasons = ("warn" if warn else "allow"), warn
    return base


def approval_how(policy: Policy) -> str:
    ways = []
    if policy.approval.label:
        ways.append(f"add the PR label '{policy.approval.label}'")
    if policy.approval.environment:
        ways.append(f"approve the '{policy.approval.environment}' environment")
    return " or ".join(ways)


def approvals_from(policy: Policy, labels: Iterable[str], approved_environment: str | None) -> frozenset[str]:
    """The approvals that policy.yml accepts among the PR's labels and the environment the job ran in."""
    found: set[str] = set()
    wanted_label = policy.approval.label
    if wanted_label and wanted_label in set(labels):
        found.add(f"label:{wanted_label}")
    wanted_env = policy.approval.environment
    if wanted_env and approved_environment == wanted_env:
        found.add(f"environment:{wanted_env}")
    return frozenset(found)


def fits(alt: Alternative, tier: str, policy: Policy, lines: list[BudgetLine]) -> bool:
    if tier_violations(alt.spec, tier, policy.tiers.get(cast(Tier, tier))):
        return False
    for line in lines:
        amount = alt.estimate.gpu_hours_cap if line.key == "gpu_hours" else alt.estimate.usd_cap
        if line.over_hard(amount):
            return False
    return True


# ---------------------------------------------------------------- changes that might fit


def alternatives(
    spec: Spec,
    catalog: Catalog,
    duration_of: Callable[[Spec], DurationEstimate],
    *,
    current: CostEstimate,
    room: Cap,
    tier: str,
    base: Spec | None = None,
) -> list[Alternative]:
    """Changes to the spec, each re-estimated, in order of how little they change the run.

    ``room`` is what the tightest budget still allows (None: that dimension is unlimited); it sizes
    the shorter max_duration. ``base`` is the spec without tier overrides, for other tiers' settings.
    """
    out: list[Alternative] = []
    res = spec.resources

    def attempt(change: str, resources: dict[str, Any] | None = None, whole: Spec | None = None) -> None:
        candidate = whole if whole is not None else _with(spec, resources or {})
        if candidate is None:
            return
        try:
            est = estimate(candidate, catalog, duration_of(candidate))
        except GpulineError:
            return  # the catalog has no such machine: not a change that could work
        if est.usd_cap < current.usd_cap - EPSILON or est.gpu_hours_cap < current.gpu_hours_cap - EPSILON:
            out.append(Alternative(change, candidate, est))

    if res.lane != "spot":
        attempt("use the spot lane (resources.lane: spot)", {"lane": "spot"})
    shorter = _fitting_duration(spec, catalog, current, room)
    if shorter is not None:
        seconds, text = shorter
        attempt(text, {"max_duration": seconds})
    if res.gpu_count > 1:
        attempt(f"use fewer GPUs (resources.gpu_count: {res.gpu_count // 2})", {"gpu_count": res.gpu_count // 2})
    if res.nodes > 1:
        attempt(f"use fewer nodes (resources.nodes: {res.nodes // 2})", {"nodes": res.nodes // 2})
    prices = catalog.providers.get(res.provider)
    if prices is not None and not res.instance_type:
        for gpu in sorted({i.gpu for i in prices.instances.values() if i.gpu not in (res.gpu_type, "cpu")}):
            attempt(f"use a smaller GPU (resources.gpu_type: {gpu})", {"gpu_type": gpu})
    if base is not None:
        for other, override in base.tiers.items():
            if other == tier:
                continue
            settings = ", ".join(
                f"{k} {v}" for part in (override.hyperparameters, override.resources) for k, v in part.items()
            )
            try:
                candidate = base.for_tier(other)
            except ValueError:
                continue
            attempt(
                f"run the {other} tier's fast approximate settings (tiers.{other} in gpuline.yml: {settings})",
                whole=candidate,
            )
    return out


def _with(spec: Spec, resources: dict[str, Any]) -> Spec | None:
    data = spec.model_dump(by_alias=True)
    data["resources"] = {**data["resources"], **resources}
    if "gpu_type" in resources:
        data["resources"]["instance_type"] = None
    try:
        return Spec.model_validate(data)
    except ValueError:
        return None


def _fitting_duration(spec: Spec, catalog: Catalog, current: CostEstimate, room: Cap) -> tuple[int, str] | None:
    """The longest max_duration (whole minutes) whose worst-case cost fits ``room``, and how to say it."""
    if room.usd is None and room.gpu_hours is None:
        return None
    prices = catalog.provider(spec.resources.provider)
    hourly = current.hourly_usd * current.nodes
    devices = max(current.gpus_per_node, 1) * current.nodes
    startup = current.duration.startup_s

    def fits_in(seconds: int) -> bool:
        usd = prices.billing.billed_seconds(startup + seconds) / 3600 * hourly
        hours = (startup + seconds) / 3600 * devices
        return (room.usd is None or usd <= room.usd + EPSILON) and (
            room.gpu_hours is None or hours <= room.gpu_hours + EPSILON
        )

    low, high = 0, spec.resources.max_duration // 60  # in minutes; fits_in(low) is checked below
    while low < high:
        mid = (low + high + 1) // 2
        if fits_in(mid * 60):
            low = mid
        else:
            high = mid - 1
    if low < 1 or not fits_in(low * 60) or low * 60 >= spec.resources.max_duration:
        return None
    text = f"set resources.max_duration to {_duration(low * 60)}"
    steps = spec_steps(spec)
    d = current.duration
    if steps is not None and not d.upper_bound and d.p90_s > 0:
        # Steps that finish inside the shorter limit even at the p90 pace.
        fitting_steps = int(steps * min(1.0, low * 60 / d.p90_s))
        if fitting_steps < steps:
            text += f" and train fewer steps (about {fitting_steps} instead of {steps} at the p90 pace)"
    return low * 60, text


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


def _duration(seconds: int) -> str:
    if seconds % 3600 == 0:
        return f"{seconds // 3600}h"
    if seconds >= 3600:
        return f"{seconds // 3600}h{(seconds % 3600) // 60}m"
    return f"{seconds // 60}m" if seconds % 60 == 0 else f"{seconds}s"


def _amount(key: str, value: float) -> str:
    return f"${value:,.2f}" if key == "usd" else f"{value:,.2f} GPU-hours"


def _price(est: CostEstimate) -> str:
    return f" → at most ${est.usd_cap:,.2f}, {est.gpu_hours_cap:,.2f} GPU-hours"


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))
