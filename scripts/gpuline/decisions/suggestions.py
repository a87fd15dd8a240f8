"""Changes to gpuline.yml that would make a denied run fit, each re-estimated before it is offered.

In order of how little they change the run: the spot lane, a shorter max_duration (fewer steps),
fewer GPUs or nodes, a smaller GPU, or another tier's fast approximate settings.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, cast

from gpuline.decisions.cost import CostEstimate, DurationEstimate, estimate, spec_steps
from gpuline.decisions.limits import EPSILON, BudgetLine, duration_text, tier_violations
from gpuline.decisions.pricing import Catalog
from gpuline.errors import GpulineError
from gpuline.runs import Cap
from gpuline.spec import Policy, Spec, Tier

MAX_SUGGESTIONS = 4
# A change to offer, and the spec with it (None when the change makes no valid spec).
Candidate = tuple[str, Spec | None]


@dataclass
class Alternative:
    """A change to gpuline.yml and what the run would cost with it."""

    change: str
    spec: Spec
    estimate: CostEstimate

    def offer(self) -> str:
        """The change as a suggestion, with its worst-case price."""
        est = self.estimate
        return f"{self.change} → at most ${est.usd_cap:,.2f}, {est.gpu_hours_cap:,.2f} GPU-hours"

    def costs_less_than(self, current: CostEstimate) -> bool:
        return (
            self.estimate.usd_cap < current.usd_cap - EPSILON
            or self.estimate.gpu_hours_cap < current.gpu_hours_cap - EPSILON
        )


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
    Only changes that cost less than ``current`` are kept.
    """
    out: list[Alternative] = []
    for change, candidate in _candidates(spec, catalog, current, room, tier, base):
        alt = _re_estimated(change, candidate, catalog, duration_of)
        if alt is not None and alt.costs_less_than(current):
            out.append(alt)
    return out


def fits(alt: Alternative, tier: str, policy: Policy, lines: list[BudgetLine]) -> bool:
    """Whether the changed run keeps every rule of the tier and every hard budget."""
    if tier_violations(alt.spec, tier, policy.tiers.get(cast(Tier, tier))):
        return False
    for line in lines:
        amount = alt.estimate.gpu_hours_cap if line.key == "gpu_hours" else alt.estimate.usd_cap
        if line.over_hard(amount):
            return False
    return True


def fitting_offers(alts: Iterable[Alternative], tier: str, policy: Policy, lines: list[BudgetLine]) -> list[str]:
    """The first :data:`MAX_SUGGESTIONS` changes that fit every limit, as suggestions."""
    fitting = [alt for alt in alts if fits(alt, tier, policy, lines)]
    return [alt.offer() for alt in fitting[:MAX_SUGGESTIONS]]


def _candidates(
    spec: Spec, catalog: Catalog, current: CostEstimate, room: Cap, tier: str, base: Spec | None
) -> Iterator[Candidate]:
    yield from _resource_changes(spec, catalog, current, room)
    if base is not None:
        yield from _other_tiers_settings(base, tier)


def _resource_changes(spec: Spec, catalog: Catalog, current: CostEstimate, room: Cap) -> Iterator[Candidate]:
    res = spec.resources
    if res.lane != "spot":
        yield "use the spot lane (resources.lane: spot)", with_resources(spec, {"lane": "spot"})
    shorter = longest_fitting_duration(spec, catalog, current, room)
    if shorter is not None:
        seconds, text = shorter
        yield text, with_resources(spec, {"max_duration": seconds})
    if res.gpu_count > 1:
        fewer = res.gpu_count // 2
        yield f"use fewer GPUs (resources.gpu_count: {fewer})", with_resources(spec, {"gpu_count": fewer})
    if res.nodes > 1:
        fewer = res.nodes // 2
        yield f"use fewer nodes (resources.nodes: {fewer})", with_resources(spec, {"nodes": fewer})
    prices = catalog.providers.get(res.provider)
    if prices is not None and not res.instance_type:
        for gpu in sorted({i.gpu for i in prices.instances.values() if i.gpu not in (res.gpu_type, "cpu")}):
            yield f"use a smaller GPU (resources.gpu_type: {gpu})", with_resources(spec, {"gpu_type": gpu})


def _other_tiers_settings(base: Spec, tier: str) -> Iterator[Candidate]:
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
        yield f"run the {other} tier's fast approximate settings (tiers.{other} in gpuline.yml: {settings})", candidate


def _re_estimated(
    change: str, candidate: Spec | None, catalog: Catalog, duration_of: Callable[[Spec], DurationEstimate]
) -> Alternative | None:
    if candidate is None:
        return None
    try:
        est = estimate(candidate, catalog, duration_of(candidate))
    except GpulineError:
        return None  # the catalog has no such machine: not a change that could work
    return Alternative(change, candidate, est)


def with_resources(spec: Spec, resources: dict[str, Any]) -> Spec | None:
    """The spec with ``resources`` changed; None when the result is not a valid spec."""
    data = spec.model_dump(by_alias=True)
    data["resources"] = {**data["resources"], **resources}
    if "gpu_type" in resources:
        data["resources"]["instance_type"] = None
    try:
        return Spec.model_validate(data)
    except ValueError:
        return None


def longest_fitting_duration(spec: Spec, catalog: Catalog, current: CostEstimate, room: Cap) -> tuple[int, str] | None:
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
    return low * 60, _shorter_run_text(spec, current, low * 60)


def _shorter_run_text(spec: Spec, current: CostEstimate, seconds: int) -> str:
    """The suggestion to cap the run at ``seconds``, with about how many steps still fit."""
    text = f"set resources.max_duration to {duration_text(seconds)}"
    steps = spec_steps(spec)
    d = current.duration
    if steps is not None and not d.upper_bound and d.p90_s > 0:
        # Steps that finish inside the shorter limit even at the p90 pace.
        fitting_steps = int(steps * min(1.0, seconds / d.p90_s))
        if fitting_steps < steps:
            text += f" and train fewer steps (about {fitting_steps} instead of {steps} at the p90 pace)"
    return text
