"""Policy decisions: allow, warn, deny from budgets and tier rules; approvals; changes that would fit."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest

from gpuline.decisions.cost import CostEstimate, estimate, estimate_duration
from gpuline.decisions.policy import (
    alternatives,
    approvals_from,
    budget_lines,
    decide,
    next_period_start,
    org_cap,
    retry_window,
    room_left,
    team_cap,
)
from gpuline.decisions.pricing import Catalog, load_catalog
from gpuline.runs import Cap, Reservation, Usage, utcnow
from gpuline.spec import Policy, Spec
from test_cost import make_spec

UTC = utcnow().tzinfo


@pytest.fixture
def catalog() -> Catalog:
    return load_catalog(None)


def policy(**data: Any) -> Policy:
    return Policy.model_validate(data)


def used(usd: float = 0.0, hours: float = 0.0) -> Usage:
    return Usage(team="vision", period="2026-W48", settled_usd=usd, settled_gpu_hours=hours)


def priced(spec: Spec, catalog: Catalog) -> CostEstimate:
    duration = estimate_duration(spec, None, 0.5, catalog)
    return estimate(spec, catalog, duration)


def durations(catalog: Catalog) -> Any:
    return lambda s: estimate_duration(s, None, 0.5, catalog)


def test_no_policy_allows_everything(catalog: Catalog) -> None:
    spec = make_spec()
    d = decide(spec, "nightly", Policy(), priced(spec, catalog), used())
    assert d.decision == "allow" and d.reasons == [] and d.budgets == []
    assert d.quota_before == {"gpu_hours": None, "usd": None}


def test_within_budget_is_allowed_and_shows_the_quota_before_and_after(catalog: Catalog) -> None:
    spec = make_spec(max_duration="1h")
    est = priced(spec, catalog)
    p = policy(budgets={"teams": {"vision": {"usd": {"hard": 100}, "gpu_hours": {"hard": 40}}}})
    d = decide(spec, "nightly", p, est, used(usd=10, hours=4))
    assert d.decision == "allow"
    assert d.quota_before == {"gpu_hours": 36, "usd": 90}
    assert d.quota_after["usd"] == pytest.approx(90 - est.usd_cap)
    assert d.quota_after["gpu_hours"] == pytest.approx(36 - est.gpu_hours_cap)


def test_passing_a_soft_budget_warns(catalog: Catalog) -> None:
    spec = make_spec(max_duration="1h")
    p = policy(budgets={"teams": {"vision": {"usd": {"soft": 10, "hard": 100}}}})
    d = decide(spec, "nightly", p, priced(spec, catalog), used(usd=9.9))
    assert d.decision == "warn" and "soft USD budget of 10 per week" in d.reasons[0]


def test_passing_a_hard_budget_denies_naming_the_budget_and_the_amount(catalog: Catalog) -> None:
    spec = make_spec(max_duration="1h")
    est = priced(spec, catalog)
    p = policy(budgets={"period": "month", "teams": {"vision": {"usd": {"hard": 20}}}})
    d = decide(spec, "nightly", p, est, used(usd=19.9))
    over = 19.9 + est.usd_cap - 20
    assert d.decision == "deny"
    assert f"team vision's hard USD budget of 20 per month would be exceeded by ${over:.2f}" in d.reasons[0]


def test_the_org_budget_applies_to_all_teams_together(catalog: Catalog) -> None:
    spec = make_spec(max_duration="1h")
    p = policy(budgets={"org": {"gpu_hours": {"hard": 100}}})
    d = decide(spec, "nightly", p, priced(spec, catalog), used(), org_usage=used(hours=99.9))
    assert d.decision == "deny" and d.reasons[0].startswith("the org's hard GPU-hours budget of 100")
    assert org_cap(p) == Cap(gpu_hours=100) and org_cap(Policy()) is None


def test_a_team_without_its_own_budget_gets_the_default(catalog: Catalog) -> None:
    p = policy(budgets={"default": {"usd": {"hard": 5}}, "teams": {"nlp": {"usd": {"hard": 500}}}})
    assert team_cap(p, "vision") == Cap(usd=5) and team_cap(p, "nlp") == Cap(usd=500)
    assert team_cap(Policy(), "vision") == Cap()


@pytest.mark.parametrize(
    ("rules", "resources", "reason", "fix"),
    [
        ({"allowed_gpu_types": ["t4", "l4"]}, {"gpu_type": "a100"}, "gpu type a100 is not allowed", "one of t4, l4"),
        ({"max_duration": "30m"}, {"max_duration": "2h"}, "exceeds the nightly tier's 1800s", "30m or less"),
        ({"max_gpus": 4}, {"gpu_count": 4, "nodes": 2}, "8 GPUs exceed", "at most 4 GPUs"),
        ({"allowed_lanes": ["spot"]}, {"lane": "on-demand"}, "on-demand lane is not allowed", "lane: spot"),
    ],
)
def test_tier_rules_deny_with_the_fix(
    catalog: Catalog, rules: dict[str, Any], resources: dict[str, Any], reason: str, fix: str
) -> None:
    spec = make_spec(**{"gpu_type": "t4", **resources})
    p = policy(tiers={"nightly": rules})
    d = decide(spec, "nightly", p, priced(spec, catalog), used())
    assert d.decision == "deny"
    assert reason in d.reasons[0]
    assert any(fix in s for s in d.suggestions)
    assert decide(spec, "release", p, priced(spec, catalog), used()).decision == "allow"  # other tier


def test_an_approval_turns_a_deny_into_a_warning(catalog: Catalog) -> None:
    spec = make_spec(max_duration="1h")
    p = policy(budgets={"teams": {"vision": {"usd": {"hard": 0.5}}}}, approval={"label": "gpu-budget-ok"})
    d = decide(spec, "nightly", p, priced(spec, catalog), used(), frozenset({"label:gpu-budget-ok"}))
    assert d.decision == "warn" and d.approved_by == "label:gpu-budget-ok"
    assert d.reasons[0].startswith("approved by label:gpu-budget-ok despite: team vision's hard USD budget")


def test_a_deny_says_how_to_ask_for_an_exception(catalog: Catalog) -> None:
    spec = make_spec(max_duration="1h")
    p = policy(
        budgets={"teams": {"vision": {"usd": {"hard": 0.5}}}},
        approval={"label": "gpu-budget-ok", "environment": "gpu-spend"},
    )
    d = decide(spec, "nightly", p, priced(spec, catalog), used())
    assert d.suggestions[-1] == (
        "ask for an exception: add the PR label 'gpu-budget-ok' or approve the 'gpu-spend' environment"
    )


def test_approvals_count_only_what_the_policy_names() -> None:
    p = policy(approval={"label": "gpu-budget-ok", "environment": "gpu-spend"})
    assert approvals_from(p, ["bug", "gpu-budget-ok"], None) == {"label:gpu-budget-ok"}
    assert approvals_from(p, [], "gpu-spend") == {"environment:gpu-spend"}
    assert approvals_from(p, ["gpu-budget-OK"], "production") == frozenset()
    assert approvals_from(Policy(), ["gpu-budget-ok"], "gpu-spend") == frozenset()


# ---------------------------------------------------------------- changes that would fit


def deny_with_alternatives(spec: Spec, catalog: Catalog, p: Policy, usage: Usage, base: Spec | None = None) -> Any:
    est = priced(spec, catalog)
    lines = budget_lines(p, "vision", est, usage)
    alts = alternatives(
        spec, catalog, durations(catalog), current=est, room=room_left(lines), tier="nightly", base=base
    )
    return decide(spec, "nightly", p, est, usage, alternatives=alts, retry="after Monday"), alts


def test_spot_is_suggested_when_it_fits(catalog: Catalog) -> None:
    spec = make_spec(gpu_type="a10g", max_duration="4h")  # on-demand $1.006/h: about $4.09 at most
    p = policy(budgets={"teams": {"vision": {"usd": {"hard": 3}}}})
    d, alts = deny_with_alternatives(spec, catalog, p, used())
    assert d.decision == "deny"
    assert d.suggestions[0].startswith("use the spot lane (resources.lane: spot) → at most $1.82")
    assert all(a.estimate.usd_cap <= 3 for a in alts if a.change in d.suggestions[0])


def test_a_shorter_max_duration_is_sized_to_the_room_left(catalog: Catalog) -> None:
    spec = make_spec(steps=1_000_000, gpu_type="a10g", lane="spot", max_duration="4h")  # $0.4475/h
    p = policy(budgets={"teams": {"vision": {"usd": {"hard": 1.0}}}})
    d, _ = deny_with_alternatives(spec, catalog, p, used())
    shorter = next(s for s in d.suggestions if "max_duration" in s)
    # $1.00 buys 2.23 h at $0.4475/h; minus 4 min of start-up leaves 2h10m of training.
    assert shorter.startswith("set resources.max_duration to 2h10m")
    # At the p90 pace (capped at 4h) 1,000,000 steps need all 4 hours; 2h10m fits 541,666 of them.
    assert "train fewer steps (about 541666 instead of 1000000 at the p90 pace)" in shorter


def test_fewer_gpus_are_offered_when_a_smaller_machine_fits(catalog: Catalog) -> None:
    spec = make_spec(provider="kubernetes", gpu_type="a100", gpu_count=8, max_duration="1h")
    p = policy(budgets={"teams": {"vision": {"gpu_hours": {"hard": 5}}}})
    d, _ = deny_with_alternatives(spec, catalog, p, used())
    assert any(
        s.startswith("use fewer GPUs (resources.gpu_count: 4) → at most $9.02, 4.10 GPU-hours") for s in d.suggestions
    )


def test_fewer_gpus_on_the_same_machine_are_not_offered(catalog: Catalog) -> None:
    # On EC2 two A10Gs still need the 4-GPU g5.12xlarge: the same price, so no help.
    spec = make_spec(gpu_type="a10g", gpu_count=4, max_duration="1h", lane="spot")
    p = policy(budgets={"teams": {"vision": {"gpu_hours": {"hard": 1.5}}}})
    d, alts = deny_with_alternatives(spec, catalog, p, used())
    assert d.decision == "deny"
    assert not any("gpu_count" in a.change for a in alts)
    assert any("max_duration" in s for s in d.suggestions)


def test_fewer_nodes_are_offered_when_they_fit(catalog: Catalog) -> None:
    spec = make_spec(gpu_type="a10g", gpu_count=1, nodes=4, max_duration="1h", lane="spot")
    p = policy(budgets={"teams": {"vision": {"gpu_hours": {"hard": 2.5}}}})
    d, _ = deny_with_alternatives(spec, catalog, p, used())
    assert any(s.startswith("use fewer nodes (resources.nodes: 2)") for s in d.suggestions)
    p = policy(budgets={"teams": {"vision": {"gpu_hours": {"hard": 1.5}}}})
    d, _ = deny_with_alternatives(spec, catalog, p, used())
    assert not any("nodes" in s for s in d.suggestions)  # 2 nodes need 2.13 GPU-hours: still over


def test_a_cheaper_gpu_type_is_offered(catalog: Catalog) -> None:
    spec = make_spec(gpu_type="a10g", max_duration="1h")
    p = policy(budgets={"teams": {"vision": {"usd": {"hard": 0.9}}}})
    d, _ = deny_with_alternatives(spec, catalog, p, used())
    assert any(s.startswith("use a smaller GPU (resources.gpu_type: t4)") for s in d.suggestions)
    assert not any("gpu_type: h100" in s for s in d.suggestions)


def test_another_tiers_fast_approximate_settings_are_offered(catalog: Catalog) -> None:
    data = make_spec(gpu_type="a10g", max_duration="3h", lane="spot").model_dump(by_alias=True)
    data["tiers"] = {"pr-fast": {"hyperparameters": {"steps": 50}, "resources": {"max_duration": "10m"}}}
    base = Spec.model_validate(data)
    spec = base.for_tier("nightly")
    p = policy(budgets={"teams": {"vision": {"usd": {"hard": 0.2}}}})
    d, _ = deny_with_alternatives(spec, catalog, p, used(), base=base)
    assert any(
        s.startswith("run the pr-fast tier's fast approximate settings (tiers.pr-fast in gpuline.yml: steps 50")
        for s in d.suggestions
    )


def test_when_nothing_fits_the_retry_window_and_approval_remain(catalog: Catalog) -> None:
    spec = make_spec(max_duration="1h")
    p = policy(budgets={"teams": {"vision": {"usd": {"hard": 10}}}}, approval={"label": "ok"})
    d, _ = deny_with_alternatives(spec, catalog, p, used(usd=10))
    assert d.suggestions == ["retry after Monday", "ask for an exception: add the PR label 'ok'"]


def test_suggestions_respect_the_tier_rules(catalog: Catalog) -> None:
    spec = make_spec(gpu_type="a10g", max_duration="1h")
    p = policy(
        budgets={"teams": {"vision": {"usd": {"hard": 0.9}}}},
        tiers={"nightly": {"allowed_gpu_types": ["a10g"], "allowed_lanes": ["on-demand"]}},
    )
    d, _ = deny_with_alternatives(spec, catalog, p, used())
    assert not any("spot" in s or "gpu_type: t4" in s for s in d.suggestions)
    assert any("max_duration" in s for s in d.suggestions)


def test_room_left_is_the_tightest_hard_limit(catalog: Catalog) -> None:
    spec = make_spec(max_duration="1h")
    est = priced(spec, catalog)
    p = policy(
        budgets={"teams": {"vision": {"usd": {"hard": 50}}}, "org": {"usd": {"hard": 100}, "gpu_hours": {"soft": 9}}}
    )
    lines = budget_lines(p, "vision", est, used(usd=20), used(usd=95))
    room = room_left(lines)
    assert room.usd == pytest.approx(5.0) and room.gpu_hours is None  # the soft org limit does not bind


# ---------------------------------------------------------------- retry window


def test_the_next_period_starts_on_monday_or_the_first() -> None:
    wednesday = datetime(2026, 11, 25, 15, 30, tzinfo=UTC)
    assert next_period_start(wednesday, "week") == datetime(2026, 11, 30, tzinfo=UTC)
    assert next_period_start(wednesday, "month") == datetime(2026, 12, 1, tzinfo=UTC)
    assert next_period_start(datetime(2026, 12, 31, 23, tzinfo=UTC), "month") == datetime(2027, 1, 1, tzinfo=UTC)


def test_the_retry_window_names_running_holds_and_the_next_period() -> None:
    now = datetime(2026, 11, 25, 15, 30, tzinfo=UTC)
    holds = [
        Reservation(run_id="a", team="vision", period="p", gpu_hours=1, usd=1, expires_at=now + timedelta(minutes=42)),
        Reservation(run_id="b", team="nlp", period="p", gpu_hours=1, usd=1, expires_at=now + timedelta(minutes=5)),
    ]
    text = retry_window(Policy(), now, holds, "vision")
    assert text == (
        "when one of the team's 1 running job(s) settles (the first hold ends within 42 min), "
        "or after 2026-11-30 00:00 UTC, when the next week's budget starts"
    )
    assert retry_window(Policy(), now, [], "vision").startswith("after 2026-11-30 00:00 UTC")
