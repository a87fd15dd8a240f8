"""The estimate of the whole paid time, phase by phase: evidence per phase, p50/p90, data dollars, the comment."""

from __future__ import annotations

import io
import json
import sys
import textwrap
from contextlib import redirect_stderr
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from conftest import write_project
from gpuline.cli import main
from gpuline.decisions.cost import estimate, estimate_duration
from gpuline.decisions.phases import NO_HISTORY_ERROR, PHASES, PhaseEstimate, SmokeTimings, phase
from gpuline.decisions.pricing import Catalog, load_catalog
from gpuline.errors import ConfigError
from gpuline.ledger.sqlite import SqliteLedger
from gpuline.render.cost_comment import phase_comparison
from gpuline.runs import RunRecord, utcnow
from gpuline.spec import Spec
from gpuline.training.smoke import smoke_test

T0 = datetime(2026, 11, 2, 3, 0, tzinfo=utcnow().tzinfo)
SMOKE = SmokeTimings(start_s=4.0, step_s=0.01, exit_s=1.0, checkpoint_s=0.1, checkpoint_bytes=50_000_000, eval_s=3.0)


def make_spec(steps: int = 1000, evaluates: bool = True, **resources: Any) -> Spec:
    data: dict[str, Any] = {
        "model": {"name": "tiny", "owner": "o", "team": "vision", "intended_use": "tests"},
        "dataset": {"uri": "data.bin", "sha256": "0" * 64},
        "entrypoint": {"command": ["python", "train.py"]},
        "hyperparameters": {"steps": steps},
        "resources": {"provider": "ec2", "gpu_type": "t4", "gpu_count": 1, "max_duration": "2h", **resources},
        "checkpoint": {"interval_steps": 250, "keep": 3},
    }
    if evaluates:
        data["eval"] = {"command": ["python", "evaluate.py"], "gates": [{"metric": "accuracy", "min": 0.5}]}
    return Spec.model_validate(data)


@pytest.fixture
def catalog() -> Catalog:
    return load_catalog(None)


def by_name(phases: list[PhaseEstimate]) -> dict[str, PhaseEstimate]:
    return {p.name: p for p in phases}


# ---------------------------------------------------------------- evidence per phase


def test_without_smoke_or_history_every_phase_but_training_comes_from_the_catalog(catalog: Catalog) -> None:
    d = estimate_duration(make_spec(evaluates=False), None, None, catalog)
    phases = by_name(d.phases)
    assert [p.name for p in d.phases] == [n for n in PHASES if n != "queue"]
    assert phases["boot"].evidence == "catalog" and phases["boot"].p50_s == 150  # ec2 on-demand
    assert phases["setup"].evidence == "catalog" and phases["teardown"].evidence == "catalog"
    assert phases["train"].evidence == "max_duration"
    assert d.startup_s == 240  # boot + setup p50: what the reservation adds to max_duration
    assert all(p.p90_s >= p.p50_s for p in d.phases)
    assert d.expected_error == NO_HISTORY_ERROR


def test_the_spot_lane_boots_on_its_own_catalog_times(catalog: Catalog) -> None:
    on_demand = estimate_duration(make_spec(), None, None, catalog)
    spot = estimate_duration(make_spec(lane="spot"), None, None, catalog)
    boot = phase(spot.phases, "boot")
    assert boot is not None and "spot lane" in boot.detail
    assert boot.p90_s > (phase(on_demand.phases, "boot") or boot).p90_s


def test_the_smoke_test_measures_start_up_checkpoints_and_eval(catalog: Catalog) -> None:
    spec = make_spec(steps=1000, provider="local", gpu_type="cpu", gpu_count=0)
    d = estimate_duration(spec, None, None, catalog, smoke=SMOKE)
    phases = by_name(d.phases)
    assert phases["train"].evidence == "smoke test" and phases["train"].p50_s == pytest.approx(10.0)
    assert phases["setup"].evidence == "catalog + smoke test"
    assert phases["setup"].p50_s == pytest.approx(4.0 + 0.4)  # the script's start-up + the catalog's staging
    # 1000 steps, a save every 250 before the last and the final one: 4 saves x 0.1 s.
    assert phases["checkpoint"].evidence == "smoke test" and phases["checkpoint"].p50_s == pytest.approx(0.4)
    assert phases["eval"].evidence == "smoke test" and phases["eval"].p50_s == pytest.approx(3.0)
    assert phases["eval"].p90_s > phases["eval"].p50_s  # a baseline may be evaluated too
    assert "smoke test" in phases["idle"].evidence  # the script's exit
    assert all(p.p90_s >= p.p50_s for p in d.phases)
    assert d.paid_p50_s == pytest.approx(sum(p.p50_s for p in d.phases))


def test_without_a_measured_eval_the_scripts_start_up_stands_in(catalog: Catalog) -> None:
    smoke = SMOKE.model_copy(update={"eval_s": None})
    eval_phase = phase(estimate_duration(make_spec(), None, None, catalog, smoke=smoke).phases, "eval")
    assert eval_phase is not None and eval_phase.p50_s == pytest.approx(4.0) and "stand-in" in eval_phase.detail
    no_eval = phase(estimate_duration(make_spec(evaluates=False), None, None, catalog, smoke=smoke).phases, "eval")
    assert no_eval is not None and no_eval.p90_s == 0 and no_eval.detail == "no eval.command"


def past_run(
    ledger: SqliteLedger, spec: Spec, i: int, *, boot_s: float, instance: str = "g4dn.xlarge", **phases: float
) -> None:
    start = T0 + timedelta(days=i)
    r = RunRecord(run_id=f"run-{instance}-{i}", model=spec.model.name, team="vision", tier="nightly")
    r.status, r.provider, r.instance_type, r.created_at = "succeeded", "ec2", instance, start
    r.lineage.config_hash = spec.config_hash()
    r.times.provisioned, r.times.runner_online = start, start + timedelta(seconds=boot_s)
    r.times.first_step = r.times.runner_online + timedelta(seconds=60)
    r.times.last_step = r.times.first_step + timedelta(seconds=600)
    r.times.released = r.times.last_step + timedelta(seconds=30)
    r.phase_seconds = phases  # type: ignore[assignment]
    ledger.create_run(r)


def test_boot_and_phases_are_learned_from_the_ledger(tmp_path: Path, catalog: Catalog) -> None:
    spec = make_spec()
    ledger = SqliteLedger(tmp_path / "ledger.db")
    for i, boot in enumerate([80, 100, 90, 95]):
        past_run(ledger, spec, i, boot_s=boot, eval=20.0 + i)
    for i in range(3):  # another machine type boots differently: it does not count
        past_run(ledger, spec, 10 + i, boot_s=900, instance="g5.xlarge")
    d = estimate_duration(spec, ledger, None, catalog)
    phases = by_name(d.phases)
    assert phases["boot"].evidence == "history n=4" and phases["boot"].p50_s == pytest.approx(92.5)
    assert phases["setup"].evidence.startswith("history") and phases["setup"].p50_s == pytest.approx(60)
    assert phases["eval"].evidence.startswith("history") and phases["eval"].p50_s == pytest.approx(21.5, abs=1)
    assert phases["train"].evidence.startswith("history") and d.expected_error is None
    assert all(p.p90_s >= p.p50_s for p in d.phases)


# ---------------------------------------------------------------- dollars


def test_storage_and_egress_dollars_come_from_the_catalog(catalog: Catalog) -> None:
    spec = make_spec(nodes=2)
    smoke = SMOKE.model_copy(update={"checkpoint_bytes": 1_000_000_000})
    d = estimate_duration(spec, None, 0.5, catalog, smoke=smoke, dataset_bytes=2_000_000_000)
    est = estimate(spec, catalog, d)
    assert est.egress_usd == pytest.approx(2 * 2 * 0.09)  # 2 GB pulled onto each of 2 nodes
    assert est.storage_usd_month == pytest.approx(3 * 1 * 0.023)  # checkpoint.keep x 1 GB a month
    compute = round(d.paid_p50_s / 3600 * est.hourly_usd * 2, 4)
    assert est.usd_p50 == pytest.approx(compute + est.egress_usd + est.storage_usd_month, abs=1e-3)
    setup = phase(d.phases, "setup")
    assert setup is not None and "dataset download 2.0 GB" in setup.detail


def test_unknown_sizes_cost_nothing_and_say_so(catalog: Catalog) -> None:
    est = estimate(make_spec(), catalog, estimate_duration(make_spec(), None, 0.5, catalog))
    assert est.egress_usd == 0 and est.storage_usd_month is None


# ---------------------------------------------------------------- the smoke test's stopwatch

SMOKE_TRAINER = """
import json, os, pathlib, time
metrics = pathlib.Path(os.environ["GPULINE_METRICS_PATH"])
interval = int(os.environ["GPULINE_CHECKPOINT_INTERVAL"])
w = 0.0
for step in range(1, 21):
    w += 0.2 * (3.0 - w)
    with metrics.open("a") as fh:
        fh.write(json.dumps({"step": step, "loss": (3.0 - w) ** 2, "time": time.time()}) + "\\n")
    if step % interval == 0:
        saved = pathlib.Path(os.environ["GPULINE_CHECKPOINT_DIR"]) / f"step-{step}"
        saved.mkdir(parents=True)
        (saved / "state.bin").write_bytes(b"x" * 4096)
out = pathlib.Path(os.environ["GPULINE_OUTPUT_DIR"])
out.mkdir(parents=True, exist_ok=True)
(out / "model.bin").write_bytes(b"m")
"""
EVALUATE = 'import os, pathlib; assert (pathlib.Path(os.environ["GPULINE_MODEL_PATH"]) / "model.bin").is_file()\n'


def test_the_smoke_test_times_its_phases_a_save_and_eval_command(tmp_path: Path) -> None:
    (tmp_path / "train.py").write_text(SMOKE_TRAINER)
    (tmp_path / "evaluate.py").write_text(EVALUATE)
    python = sys.executable
    result = smoke_test([python, "train.py"], tmp_path, None, {}, 60, eval_command=[python, "evaluate.py"])
    t = result.timings
    assert t is not None and result.fell
    assert t.start_s >= 0 and t.exit_s >= 0 and t.step_s is not None
    assert t.checkpoint_bytes == 4096 and t.checkpoint_s is not None  # two saves, at steps 10 and 20
    assert t.eval_s is not None  # eval.command ran on the model the smoke run wrote


def test_a_smoke_run_without_times_gives_no_timings(tmp_path: Path) -> None:
    (tmp_path / "train.py").write_text(SMOKE_TRAINER.replace(', "time": time.time()', ""))
    result = smoke_test([sys.executable, "train.py"], tmp_path, None, {}, 60)
    assert result.fell and result.timings is None


# ---------------------------------------------------------------- through the CLI


def estimated(config: Path, run_id: str) -> dict[str, Any]:
    out = io.StringIO()
    from contextlib import redirect_stdout

    with redirect_stdout(out):
        assert main(["cost-estimate", "--config", str(config), "--json", "--run-id", run_id]) == 0
    body: dict[str, Any] = json.loads(out.getvalue())
    return body


def test_the_comment_shows_the_phases_with_their_evidence(tmp_path: Path) -> None:
    config = write_project(tmp_path / "p")
    ledger = SqliteLedger(config.parent / ".gpuline" / "ledger.db")
    ledger.create_run(RunRecord(run_id="run-smoked", model="tiny", team="vision", tier="nightly", smoke_step_s=0.01))
    # What preflight keeps of its smoke test: the step time and the timings.
    ledger.append_event("run-smoked", "preflight.smoke", {"step_s": 0.01, "timings": SMOKE.to_json()})
    body = estimated(config, "run-smoked")
    comment = Path(body["comment_path"]).read_text()
    assert "| phase | p50 | p90 | evidence |" in comment
    assert "| setup | 4.4 s | 7.0 s | catalog + smoke test:" in comment
    assert "| train | 0.1 s | 0.2 s | smoke test |" in comment
    assert f"no history: ±{NO_HISTORY_ERROR * 100:.0f}% expected" in comment
    assert "| data | egress $0.00 per run (dataset 1 kB x 1 node(s)); checkpoint storage $0.00 per month" in comment
    assert "| boot |" not in comment  # a laptop boots nothing: no row for it
    phases = body["estimate"]["duration"]["phases"]
    assert phases[0]["name"] == "queue" and phases[0]["paid"] is False
    assert len(comment) < 65536


def test_preflight_s_smoke_test_feeds_the_estimate_through_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # As a tier runs it: preflight (which runs the script's smoke mode and eval.command), then the estimate.
    extra = "eval:\n  command: [python, evaluate.py]\n"
    guarded = "def main():\n" + textwrap.indent(SMOKE_TRAINER, "    ") + "\nif __name__ == '__main__':\n    main()\n"
    config = write_project(tmp_path / "p", train_py=guarded, spec_extra=extra)
    (config.parent / "evaluate.py").write_text(EVALUATE)
    assert main(["preflight", "--config", str(config), "--json", "--tier", "nightly"]) == 0
    run_id = json.loads(capsys.readouterr().out)["run_id"]
    phases = {p["name"]: p for p in estimated(config, run_id)["estimate"]["duration"]["phases"]}
    assert phases["train"]["evidence"] == "smoke test"
    assert "smoke test" in phases["setup"]["evidence"]
    assert phases["checkpoint"]["evidence"] == "smoke test" and phases["eval"]["evidence"] == "smoke test"
    assert all(p["p90_s"] >= p["p50_s"] >= 0 for p in phases.values())


def test_unreadable_timings_are_estimated_without(tmp_path: Path) -> None:
    config = write_project(tmp_path / "p")
    ledger = SqliteLedger(config.parent / ".gpuline" / "ledger.db")
    ledger.create_run(RunRecord(run_id="run-odd", model="tiny", team="vision", tier="nightly", smoke_step_s=0.01))
    ledger.append_event("run-odd", "preflight.smoke", {"timings": {"start_s": -3}})
    setup = next(p for p in estimated(config, "run-odd")["estimate"]["duration"]["phases"] if p["name"] == "setup")
    assert setup["evidence"] == "catalog"


def test_a_bad_boot_field_in_the_catalog_is_one_clear_line(tmp_path: Path) -> None:
    config = write_project(tmp_path / "p")
    bad = "providers:\n  local:\n    phases:\n      boot:\n        on-demand: {p50_s: 30, p90_s: 10}\n"
    (config.parent / "pricing.yaml").write_text(bad)
    with pytest.raises(ConfigError) as caught:
        load_catalog(config.parent)
    assert caught.value.location is not None and caught.value.location.line == 5
    assert caught.value.location.field == "providers.local.phases.boot.on-demand"
    err = io.StringIO()
    with redirect_stderr(err):
        assert main(["cost-estimate", "--config", str(config)]) != 0
    lines = [line for line in err.getvalue().splitlines() if "p90_s (10) must be at least p50_s (30)" in line]
    assert len(lines) == 1 and "pricing.yaml" in lines[0]


# ---------------------------------------------------------------- actual vs estimate


def test_actual_seconds_are_shown_beside_the_estimate_per_phase() -> None:
    phases = [PhaseEstimate("boot", 100, 200, "catalog"), PhaseEstimate("train", 600, 900, "smoke test")]
    table = phase_comparison(phases, {"boot": 250.0, "train": 540.0, "idle": 12.0})
    assert "| boot | 1.7 min–3.3 min | 4.2 min | over p90 |" in table
    assert "| train | 10.0 min–15.0 min | 9.0 min | -10% vs p50 |" in table
    assert "| idle | – | 12.0 s |  |" in table  # measured, not estimated
    assert "| **paid** | 11.7 min–18.3 min | 13.2 min | +13% vs p50 |" in table


def test_phases_kept_by_an_older_or_damaged_estimate_compare_on_what_is_readable() -> None:
    from gpuline.decisions.phases import phases_from_json

    kept = [
        {"name": "train", "p50_s": 2.0, "p90_s": 3.0, "evidence": "smoke test"},
        {"name": "warp", "p50_s": 1.0, "p90_s": 1.0},  # a phase this gpuline does not know
        {"name": "eval", "p50_s": "soon", "p90_s": 1.0},  # not a number
        {"name": "setup"},  # fields missing
        "boot",
    ]
    (train,) = phases_from_json(kept)
    assert (train.name, train.p50_s, train.p90_s, train.evidence, train.paid) == ("train", 2.0, 3.0, "smoke test", True)
    assert phases_from_json({"not": "a list"}) == [] and phases_from_json(None) == []
