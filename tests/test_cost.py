"""Duration estimates (history with trend, smoke test, upper bound), prices with increments, queue waits."""

from __future__ import annotations

import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from gpuline.decisions.cost import (
    actual_cost,
    billing_text,
    estimate,
    estimate_duration,
    from_history,
    history_samples,
)
from gpuline.decisions.pricing import Catalog, load_catalog
from gpuline.decisions.queue import estimate_wait
from gpuline.ledger.sqlite import SqliteLedger
from gpuline.runs import LeaseRecord, RunRecord, utcnow
from gpuline.spec import Policy, Spec

T0 = datetime(2026, 11, 2, 3, 0, tzinfo=utcnow().tzinfo)


def make_spec(steps: int | None = 1000, **resources: Any) -> Spec:
    data: dict[str, Any] = {
        "model": {"name": "tiny", "owner": "o", "team": "vision", "intended_use": "tests"},
        "dataset": {"uri": "data.bin", "sha256": "0" * 64},
        "entrypoint": {"command": ["python", "train.py"]},
        "hyperparameters": {"steps": steps} if steps is not None else {},
        "resources": {"provider": "ec2", "gpu_type": "t4", "gpu_count": 1, "max_duration": "2h", **resources},
    }
    return Spec.model_validate(data)


@pytest.fixture
def catalog() -> Catalog:
    return load_catalog(None)


@pytest.fixture
def ledger(tmp_path: Path) -> SqliteLedger:
    return SqliteLedger(tmp_path / "ledger.db")


def finished(
    ledger: SqliteLedger,
    spec: Spec,
    i: int,
    training_s: float,
    *,
    overhead_s: float = 300,
    status: str = "succeeded",
    config_hash: str | None = None,
) -> RunRecord:
    start = T0 + timedelta(days=i)
    record = RunRecord(run_id=f"run-{i:03d}", model=spec.model.name, team="vision", tier="nightly")
    record.status = status  # type: ignore[assignment]
    record.created_at = start
    record.lineage.config_hash = config_hash or spec.config_hash()
    record.times.provisioned = start
    record.times.first_step = start + timedelta(seconds=overhead_s / 2)
    record.times.last_step = record.times.first_step + timedelta(seconds=training_s)
    record.times.released = record.times.last_step + timedelta(seconds=overhead_s / 2)
    ledger.create_run(record)
    return record


# ---------------------------------------------------------------- history


def test_history_gives_p50_and_p90_and_says_how_many_runs(ledger: SqliteLedger, catalog: Catalog) -> None:
    spec = make_spec()
    for i, seconds in enumerate([1000, 1100, 900, 1050, 950]):
        finished(ledger, spec, i, seconds)
    d = estimate_duration(spec, ledger, smoke_step_s=0.5, catalog=catalog)
    assert d.basis == "history" and d.runs == 5
    assert d.p50_s == 1000 and 1000 < d.p90_s <= 1100
    assert "5 finished runs" in d.note
    # No runner-online time was recorded, so setup is learned from the machine starting (boot inside it),
    # and everything after the last step as one span: the whole lease is the past leases' median.
    assert d.startup_s == 150 and "setup 150.0 s (history n=5)" in d.startup_note
    assert d.paid_p50_s == pytest.approx(1300)


def test_only_succeeded_runs_of_the_same_config_count(ledger: SqliteLedger, catalog: Catalog) -> None:
    spec = make_spec()
    finished(ledger, spec, 0, 1000)
    finished(ledger, spec, 1, 1000)
    finished(ledger, spec, 2, 50, status="failed")
    finished(ledger, spec, 3, 5000, config_hash="another-config")
    d = estimate_duration(spec, ledger, smoke_step_s=None, catalog=catalog)
    assert d.basis == "max_duration"  # two good runs are not a history yet
    assert len(history_samples(ledger.list_runs(), spec.config_hash())) == 2


def test_a_trend_is_followed_instead_of_lagging_behind(ledger: SqliteLedger, catalog: Catalog) -> None:
    spec = make_spec()
    for i in range(20):  # the dataset grows: every run takes 30 s longer
        finished(ledger, spec, i, 1000 + 30 * i)
    d = estimate_duration(spec, ledger, None, catalog)
    assert d.p50_s == pytest.approx(1000 + 30 * 20, rel=0.01)  # the next run, not the median (1285)
    assert d.trend_pct_per_run is not None and d.trend_pct_per_run > 0
    assert "trend +" in d.note


def test_one_outlier_does_not_tilt_the_estimate() -> None:
    durations = [1000.0] * 15 + [9000.0] + [1000.0] * 4
    p50, p90, _ = from_history(durations)
    assert p50 == pytest.approx(1000)
    assert p90 >= p50


def test_history_is_capped_at_max_duration(ledger: SqliteLedger, catalog: Catalog) -> None:
    spec = make_spec(max_duration="20m")
    for i in range(4):
        finished(ledger, spec, i, 3000)
    d = estimate_duration(spec, ledger, None, catalog)
    assert d.p50_s == d.p90_s == 1200 and "capped at max_duration" in d.note


# ---------------------------------------------------------------- smoke test and upper bound


def test_without_history_steps_times_smoke_step_time_times_gpu_speed(catalog: Catalog) -> None:
    d = estimate_duration(make_spec(steps=1000, gpu_type="a10g"), None, smoke_step_s=0.9, catalog=catalog)
    # 1000 steps x 0.9 s on CPU; an A10G is 1.8 / 0.05 = 36x a CPU in the catalog.
    assert d.basis == "smoke" and d.p50_s == pytest.approx(25.0)
    assert d.p90_s == pytest.approx(37.5)
    assert "1000 steps" in d.note and "p90 = 1.5 x p50" in d.note
    assert d.startup_s == 240 and "catalog" in d.startup_note


def test_a_cpu_run_uses_the_smoke_step_time_as_it_is(catalog: Catalog) -> None:
    d = estimate_duration(make_spec(steps=100, provider="local", gpu_type="cpu", gpu_count=0), None, 0.2, catalog)
    assert d.p50_s == pytest.approx(20.0)
    assert d.startup_note.startswith("boot 0.0 s (catalog)")  # a laptop boots nothing


def test_no_evidence_means_the_max_duration_labelled_as_an_upper_bound(catalog: Catalog) -> None:
    d = estimate_duration(make_spec(steps=None), None, smoke_step_s=None, catalog=catalog)
    assert d.basis == "max_duration" and d.upper_bound
    assert d.p50_s == d.p90_s == 7200
    assert "upper bound" in d.note and "gpuline preflight" in d.note and "step count" in d.note


def test_a_gpu_the_catalog_cannot_rate_is_said_not_guessed(catalog: Catalog) -> None:
    catalog.gpu_speed.pop("t4")
    d = estimate_duration(make_spec(), None, smoke_step_s=0.5, catalog=catalog)
    assert d.basis == "max_duration" and "no gpu_speed for t4" in d.note


# ---------------------------------------------------------------- prices


def test_a_15_minute_job_on_an_hourly_machine_costs_an_hour(catalog: Catalog) -> None:
    spec = make_spec(provider="rest", gpu_type="a100", max_duration="15m")
    d = estimate_duration(spec, None, None, catalog)
    d.startup_s = 0
    est = estimate(spec, catalog, d)
    assert est.instance_type == "gpu_1x_a100"
    assert est.usd_cap == pytest.approx(1.29)  # a whole hour
    assert est.gpu_hours_cap == pytest.approx(0.25)  # but a quarter of a GPU-hour used
    assert billing_text(est) == "billed per hour"  # the minimum is the increment: no need to say it


def test_ec2_bills_the_start_up_and_training_per_second(catalog: Catalog) -> None:
    spec = make_spec(max_duration="1h")
    est = estimate(spec, catalog, estimate_duration(spec, None, 0.5, catalog))
    # 1000 steps x 0.5 s / 20 = 25 s of training; around it the catalog's boot 150 s and setup 90 s,
    # 10 checkpoint saves x 2 s, idle 10 s and teardown 15 s: 310 paid seconds at $0.526/hour.
    assert est.lease_p50_s == pytest.approx(310)
    assert est.usd_p50 == pytest.approx(310 / 3600 * 0.526, abs=1e-4)
    # At most: the start-up (boot + setup) plus max_duration.
    assert est.usd_cap == pytest.approx((3600 + 240) / 3600 * 0.526, abs=1e-4)
    assert billing_text(est) == "billed per second, 1 min minimum"


def test_several_nodes_multiply_price_and_gpu_hours(catalog: Catalog) -> None:
    spec = make_spec(gpu_count=4, nodes=2, lane="spot", max_duration="1h")
    d = estimate_duration(spec, None, None, catalog)
    d.startup_s = 0
    est = estimate(spec, catalog, d)
    assert est.instance_type == "g4dn.12xlarge" and est.hourly_usd == 1.6524
    assert est.usd_cap == pytest.approx(2 * 1.6524) and est.gpu_hours_cap == pytest.approx(8.0)


def test_spot_on_a_machine_without_spot_prices_says_so(catalog: Catalog) -> None:
    spec = make_spec(provider="github", lane="spot")
    est = estimate(spec, catalog, estimate_duration(spec, None, None, catalog))
    assert est.hourly_usd == 4.20 and any("no spot price" in n for n in est.notes)


def test_actual_cost_applies_the_increments(catalog: Catalog) -> None:
    assert actual_cost(catalog, "github", "gpu-t4-4-core", "on-demand", 1, 61) == pytest.approx(4.20 * 2 / 60)
    assert actual_cost(catalog, "rest", "gpu_1x_h100", "on-demand", 2, 10) == pytest.approx(2 * 2.49)
    assert actual_cost(catalog, "ec2", "unknown-type", "spot", 1, 100) == 0.0


# ---------------------------------------------------------------- queue


def lease(
    ledger: SqliteLedger, run_id: str, lane: str, started_min_ago: float, ttl_min: float, est_s: float | None
) -> None:
    now = utcnow()
    start = now - timedelta(minutes=started_min_ago)
    record = RunRecord(run_id=run_id, model="tiny", team="vision", tier="nightly", estimated_seconds=est_s)
    record.times.provisioned = start
    ledger.create_run(record)
    ledger.record_lease(
        LeaseRecord(
            lease_id=f"l-{run_id}",
            run_id=run_id,
            provider="ec2",
            lane=lane,
            requested_at=start,
            expires_at=start + timedelta(minutes=ttl_min),
        )
    )


def test_no_capacity_in_the_policy_means_no_wait(ledger: SqliteLedger) -> None:
    lease(ledger, "a", "spot", 5, 60, 600)
    q = estimate_wait(ledger, Policy(), "spot")
    assert q.capacity is None and q.expected_wait_s == 0 and q.active == 1


def test_a_free_slot_means_no_wait(ledger: SqliteLedger) -> None:
    lease(ledger, "a", "spot", 5, 60, 600)
    q = estimate_wait(ledger, Policy.model_validate({"lanes": {"spot": {"capacity": 2}}}), "spot")
    assert q.ahead == 0 and q.expected_wait_s == 0 and "starts at once" in q.describe()


def test_a_full_lane_waits_for_the_earliest_expected_end(ledger: SqliteLedger) -> None:
    policy = Policy.model_validate({"lanes": {"spot": {"capacity": 2}}})
    lease(ledger, "a", "spot", 10, 60, 40 * 60)  # expected to end in 30 min, TTL in 50
    lease(ledger, "b", "spot", 10, 30, None)  # no estimate: assumed to run to its TTL (20 min)
    lease(ledger, "c", "on-demand", 1, 60, 60)  # another lane
    lease(ledger, "gone", "spot", 120, 60, 60)  # TTL passed: the machine is gone
    ledger.release_lease("l-c", utcnow())
    q = estimate_wait(ledger, policy, "spot")
    assert (q.active, q.ahead) == (2, 1)
    assert q.expected_wait_s == pytest.approx(20 * 60, abs=5)
    assert q.worst_wait_s == pytest.approx(20 * 60, abs=5)
    assert "1 of 2 active leases have an estimate" in q.note
    assert "lane full" in q.describe()


def test_two_ahead_means_waiting_for_the_second_to_end(ledger: SqliteLedger) -> None:
    policy = Policy.model_validate({"lanes": {"on-demand": {"capacity": 1}}})
    lease(ledger, "a", "on-demand", 0, 120, 10 * 60)
    lease(ledger, "b", "on-demand", 0, 120, 30 * 60)
    q = estimate_wait(ledger, policy, "on-demand")
    assert q.ahead == 2 and q.expected_wait_s == pytest.approx(30 * 60, abs=5)
    assert q.worst_wait_s == pytest.approx(120 * 60, abs=5)


def test_the_benchmark_history_is_estimated_within_10_percent(tmp_path: Path) -> None:
    import importlib.util

    path = Path(__file__).parent.parent / "bench" / "estimate.py"
    module_spec = importlib.util.spec_from_file_location("bench_estimate", path)
    assert module_spec is not None and module_spec.loader is not None
    bench = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = bench  # dataclasses look their module up there
    module_spec.loader.exec_module(bench)
    args = bench.parse_args(["--runs", "60", "--seed", "3"])
    predictions = bench.replay(args, bench.synthetic(args), tmp_path)
    scored = [(x.p50, x.actual) for x in predictions if x.basis == "history"]
    assert len(scored) == 57
    assert bench.mdape(scored) < 10.0
    assert bench.mdape(scored) < bench.mdape([(3600.0, actual) for _, actual in scored])


def test_a_lease_whose_run_is_not_in_the_ledger_is_assumed_to_run_to_its_ttl(ledger: SqliteLedger) -> None:
    now = utcnow()
    ledger.record_lease(
        LeaseRecord(
            lease_id="orphan", run_id="gone", provider="ec2", lane="spot", expires_at=now + timedelta(minutes=9)
        )
    )
    q = estimate_wait(ledger, Policy.model_validate({"lanes": {"spot": {"capacity": 1}}}), "spot", now)
    assert q.ahead == 1 and q.expected_wait_s == pytest.approx(9 * 60) and "0 of 1" in q.note
