"""The GPU-second ledger: every paid second of a lease in exactly one phase, and the actual cost from
the provider where it can tell.

The accumulator is fuzzed (phases always add up to the paid seconds, nothing counted twice, a
restart's gap is idle); then the ledger is checked end to end through the CLI: a local nightly on the
reference project, a run that restarts after a crash, an EC2 lease on the moto server costed from
its LaunchTime and termination with EC2's billing increment, a nightly trained on the Kubernetes
emulator whose phases add up to its pods' seconds, and `gpuline report` over a ledger of runs."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from conftest import write_project
from gpuline.decisions.pricing import load_catalog
from gpuline.lease.ledger_phases import paid_time
from gpuline.ledger.sqlite import SqliteLedger
from gpuline.phases import PHASES, TOLERANCE, Phase, PhaseAccumulator, accounted, actual_phases, unaccounted
from gpuline.providers.ec2 import billed_span_of, transition_time
from gpuline.render.phase_bar import phase_bar, phase_chart
from gpuline.render.status_table import status_table
from gpuline.runs import Event, RunRecord
from gpuline.steps.report import render, weekly

if TYPE_CHECKING:
    from fixtures_k8s import K8sEmulator
    from servers import MotoServer

EXAMPLE = Path(__file__).resolve().parents[1] / "templates" / "example"
T0 = datetime(2026, 11, 16, 9, 0, tzinfo=UTC)


# ---------------------------------------------------------------- the accumulator


def test_finer_intervals_win_and_the_gaps_are_idle() -> None:
    acc = PhaseAccumulator([(0, 100)])
    acc.add("setup", 0, 80)  # the train step's whole span
    acc.add("train", 10, 70)  # the supervisor's steps inside it
    acc.add("checkpoint", 40, 42)  # a save stall inside the steps
    acc.add("eval", 85, 95)
    acc.add("teardown", 98, 500)  # runs past the window: clipped
    totals = acc.totals()
    assert totals == {
        "boot": 0, "setup": 20, "queue": 0, "train": 58, "checkpoint": 2, "eval": 10, "idle": 8, "teardown": 2,
    }  # fmt: skip
    assert unaccounted(totals, acc.paid) == 0


def test_outside_the_windows_is_not_paid_and_each_window_is_paid_on_its_own() -> None:
    # Two pods side by side (a two-node run) and an admission wait before them, which is not paid.
    acc = PhaseAccumulator([(10, 20), (10, 20)])
    acc.add("queue", 0, 10)
    acc.add("train", 12, 18)
    totals = acc.totals()
    assert acc.paid == 20 and totals["queue"] == 0 and totals["train"] == 12 and totals["idle"] == 8


def union_length(spans: list[tuple[float, float]], lo: float, hi: float) -> float:
    clipped = sorted((max(a, lo), min(b, hi)) for a, b in spans if min(b, hi) > max(a, lo))
    total, end = 0.0, lo
    for a, b in clipped:
        if b > end:
            total += b - max(a, end)
            end = b
    return total


@pytest.mark.parametrize("seed", range(40))
def test_fuzz_phases_add_up_to_the_paid_seconds_and_nothing_is_counted_twice(seed: int) -> None:
    rng = random.Random(seed)
    windows = [(w := rng.uniform(0, 500), w + rng.uniform(0, 400)) for _ in range(rng.randint(1, 3))]
    acc = PhaseAccumulator(windows)
    spans: dict[Phase, list[tuple[float, float]]] = {p: [] for p in PHASES}
    for _ in range(rng.randint(0, 60)):
        phase = rng.choice(PHASES)
        a = rng.uniform(-100, 1000)
        b = a + rng.expovariate(1 / 60)
        acc.add(phase, a, b)
        spans[phase].append((a, b))
    totals = acc.totals()
    assert unaccounted(totals, acc.paid) < 1e-9 and accounted(totals, acc.paid)
    for phase in PHASES:
        if phase == "idle":
            continue
        # A phase never holds more than the seconds its own intervals cover inside the windows.
        covered = sum(union_length(spans[phase], lo, hi) for lo, hi in windows)
        assert totals[phase] <= covered + 1e-6
    # Idle is exactly what no interval covers.
    every = [s for p in PHASES for s in spans[p] if p != "idle"]
    uncovered = sum((hi - lo) - union_length(every, lo, hi) for lo, hi in windows if hi > lo)
    assert totals["idle"] == pytest.approx(uncovered, abs=1e-6)


def phases_event(seq: int, *intervals: tuple[str, float, float]) -> Event:
    items = [{"phase": p, "start": (T0 + timedelta(seconds=a)).isoformat(), "seconds": b - a} for p, a, b in intervals]
    return Event(run_id="r", seq=seq, at=T0, kind="train.phases", data={"intervals": items})


def step_event(seq: int, kind: str, at: float, **data: Any) -> Event:
    return Event(run_id="r", seq=seq, at=T0 + timedelta(seconds=at), kind=kind, data=data)


def test_a_restart_leaves_its_gap_idle_instead_of_counting_first_to_last_step_as_work() -> None:
    """Two launches of the trainer around a crash: the crash's lost tail and the relaunch gap (20 to
    30) are idle, each launch's own setup counts, and train is what the launches stepped, not one span
    from the first launch's first step to the second's last."""
    record = RunRecord(run_id="r", model="m", team="t", tier="nightly")
    record.times.provisioned = T0
    events = [
        step_event(1, "train.started", 1, holder={}),
        phases_event(2, ("setup", 1, 4), ("train", 4, 20)),  # crashed at 25 (no save after its last step)
        phases_event(3, ("setup", 30, 33), ("train", 33, 60), ("checkpoint", 60, 62)),
        step_event(4, "train.finished", 63),
        step_event(5, "eval-gate.started", 64, holder={}),
        step_event(6, "eval-gate.finished", 70),
    ]
    paid = paid_time(record, events, T0 + timedelta(seconds=80), teardown_from=T0 + timedelta(seconds=75))
    assert paid.seconds == 80 and paid.source == "catalog estimate"
    assert paid.phases == {
        "boot": 1, "setup": 3 + 3, "queue": 0, "train": 16 + 27, "checkpoint": 2, "eval": 6,
        "idle": 10 + 1 + 1 + 5, "teardown": 5,
    }  # fmt: skip
    assert accounted(paid.phases, paid.seconds)


def test_ec2_bills_from_launch_time_to_the_state_transition() -> None:
    assert transition_time("User initiated (2026-11-16 09:00:41 GMT)") == T0 + timedelta(seconds=41)
    assert transition_time("Client.InstanceInitiatedShutdown: Instance initiated shutdown") is None
    instance = {
        "LaunchTime": T0,
        "State": {"Name": "terminated"},
        "StateTransitionReason": "User initiated (2026-11-16 09:00:41 GMT)",
    }
    span = billed_span_of(instance)
    assert span is not None and (span.start, span.end) == (T0, T0 + timedelta(seconds=41))
    assert billed_span_of({**instance, "State": {"Name": "running"}}) is None  # still billing: no end yet
    billing = load_catalog(Path(".")).providers["ec2"].billing
    assert (billing.billed_seconds(41), billing.billed_seconds(61.2)) == (60, 62)  # per second, 60 s minimum


# ---------------------------------------------------------------- showing it


def test_the_stacked_bar_has_twenty_squares_in_phase_order() -> None:
    phases: dict[Phase, float] = dict.fromkeys(PHASES, 0.0)
    phases.update(setup=50.0, train=40.0, idle=10.0)
    assert phase_bar(phases) == "🟧" * 10 + "🟩" * 8 + "⬜" * 2
    chart = phase_chart(phases, queue_seconds=12)
    assert "useful (train + eval) 40%" in chart and "waited 12 s for admission, not paid" in chart
    assert "| 🟩 train | 40.0 | 40% |" in chart and "eval" not in chart.split("\n\n", 2)[2]


# ---------------------------------------------------------------- end to end through the CLI


def gpuline(project: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, dict[str, Any], str]:
    done = subprocess.run(
        [sys.executable, "-m", "gpuline.cli", *args, "--json"],
        cwd=project, capture_output=True, text=True, timeout=600, check=False, env={**os.environ, **(env or {})},
    )  # fmt: skip
    return done.returncode, json.loads(done.stdout), done.stderr


def assert_phases_add_up(record: RunRecord) -> None:
    phases = actual_phases(record, gpu=True)
    assert set(phases) == set(PHASES)
    assert record.gpu_seconds > 0 and unaccounted(phases, record.gpu_seconds) < TOLERANCE
    assert record.idle_seconds == phases["idle"]
    assert actual_phases(record) == pytest.approx(phases, abs=1e-3)  # one device a node: seconds are GPU-seconds


@pytest.mark.slow
@pytest.mark.skipif(not (EXAMPLE / "gpuline.yml").exists(), reason="reference project not present")
def test_a_local_nightly_on_the_reference_project_accounts_for_every_gpu_second(tmp_path: Path) -> None:
    project = tmp_path / "example"
    shutil.copytree(EXAMPLE, project, ignore=shutil.ignore_patterns(".gpuline", "__pycache__"))
    code, body, err = gpuline(project, "run", "--tier", "nightly")
    assert code == 0, err
    record = SqliteLedger(project / ".gpuline" / "ledger.db").get_run(body["run_id"])
    assert_phases_add_up(record)
    phases = record.phase_gpu_seconds
    # The reference trainer stepped, saved and was evaluated by eval.command; each is its own phase.
    assert min(phases["setup"], phases["train"], phases["checkpoint"], phases["eval"]) > 0
    assert record.cost_source == "catalog estimate" and record.actual_usd == 0.0  # the local provider is $0
    assert body["teardown"]["phase_gpu_seconds"] == phases
    code, status, _ = gpuline(project, "status", body["run_id"])
    assert code == 0 and status["runs"][0]["phase_gpu_seconds"] == phases
    assert any("GPU-seconds by phase: " in line for line in status_table([record]))


TIMED_TRAINER = '''
"""A trainer that stamps each step with its time, saves every interval, and (once) crashes mid-run."""
import json, os, sys, time
from pathlib import Path


def main() -> None:
    env, hp = os.environ, json.loads(os.environ["GPULINE_HPARAMS"])
    step = 0
    if env.get("GPULINE_RESUME_FROM"):
        step = json.loads(Path(env["GPULINE_RESUME_FROM"], "state.json").read_text())["step"]

    def save(at):
        path = Path(env["GPULINE_CHECKPOINT_DIR"], f"step-{at:08d}")
        path.mkdir(parents=True, exist_ok=True)
        (path / "state.json").write_text(json.dumps({"step": at}))

    smoke = env.get("GPULINE_SMOKE") == "1"
    crash = Path(env["GPULINE_CHECKPOINT_DIR"]).parent / "crashed-once"
    with open(env["GPULINE_METRICS_PATH"], "a") as metrics:
        while step < (20 if smoke else hp["steps"]):
            step += 1
            metrics.write(json.dumps({"step": step, "loss": 1.0 / step, "time": time.time()}) + "\\n")
            metrics.flush()
            if smoke:
                continue
            time.sleep(0.01)  # a step's work: at least 10 ms, so the steps span a measurable time
            if step % int(env["GPULINE_CHECKPOINT_INTERVAL"]) == 0:
                save(step)
            if hp.get("crash_at") == step and not crash.exists():
                crash.write_text("")
                sys.exit(1)
    if not smoke:
        save(step)
        Path(env["GPULINE_OUTPUT_DIR"], "model.json").write_text(json.dumps({"step": step}))
        Path(env["GPULINE_EVAL_PATH"]).write_text(json.dumps({"loss": 1.0 / step}))


if __name__ == "__main__":
    main()
'''
GATES = "eval:\n  gates:\n    - {metric: loss, goal: minimize, max: 1.5}\n"


def test_a_run_that_restarts_after_a_crash_still_adds_up_and_keeps_each_launch_apart(tmp_path: Path) -> None:
    config = write_project(
        tmp_path / "proj",
        train_py=TIMED_TRAINER,
        spec_extra=GATES + "checkpoint: {interval_steps: 4, max_restarts: 1}\n",
    )
    config.write_text(config.read_text().replace("steps: 10", "steps: 10\n  crash_at: 6"))
    code, body, err = gpuline(config.parent, "run", "--tier", "nightly")
    assert code == 0, err
    ledger = SqliteLedger(config.parent / ".gpuline" / "ledger.db")
    record = ledger.get_run(body["run_id"])
    assert record.restarts == 1 and body["train"]["final_step"] == 10
    assert_phases_add_up(record)
    phased = [e.data["intervals"] for e in ledger.events(record.run_id) if e.kind == "train.phases"]
    launches = [launch for launch in phased if any(i["phase"] == "train" for i in launch)]  # the supervisor's
    measured_train = sum(i["seconds"] for launch in launches for i in launch if i["phase"] == "train")
    # Two launches, each with its own setup; the train phase is what they measured, not the span
    # from the first launch's first step to the second launch's last (which holds the restart).
    assert sum(1 for launch in launches for i in launch if i["phase"] == "setup") == 2
    stalls = sum(i["seconds"] for launch in phased for i in launch if i["phase"] == "checkpoint")
    assert measured_train - stalls - 1e-3 <= record.phase_seconds["train"] <= measured_train + 1e-3


# ---------------------------------------------------------------- EC2 on the moto server


@pytest.fixture
def _validate_instance_types(monkeypatch: pytest.MonkeyPatch) -> None:
    from moto import settings

    monkeypatch.setattr(settings, "EC2_ENABLE_INSTANCE_TYPE_VALIDATION", True)


def ec2_client() -> Any:
    import boto3

    return boto3.client("ec2", region_name="us-east-1", endpoint_url=os.environ["AWS_ENDPOINT_URL"])


@pytest.mark.integration
def test_an_ec2_lease_is_costed_from_its_launch_and_termination_with_the_billing_increment(
    tmp_path: Path, aws_env: MotoServer, _validate_instance_types: None
) -> None:
    from gpuline.cli import main

    ami = ec2_client().describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    config = write_project(
        tmp_path / "proj", train_py=TIMED_TRAINER, spec_extra=f"  region: us-east-1\n  options:\n    image_id: {ami}\n"
    )
    text = config.read_text().replace("provider: local", "provider: ec2").replace("gpu_type: cpu", "gpu_type: t4")
    config.write_text(text.replace("  max_duration: 10m", "  gpu_count: 1\n  max_duration: 10m"))
    assert main(["provision", "--config", str(config), "--tier", "nightly"]) == 0
    ledger = SqliteLedger(config.parent / ".gpuline" / "ledger.db")
    (record,) = ledger.list_runs()
    assert main(["train", "--config", str(config), "--run-id", record.run_id]) == 0
    assert main(["teardown", "--config", str(config), "--run-id", record.run_id]) == 0

    record = ledger.get_run(record.run_id)
    (reservation,) = ec2_client().describe_instances(InstanceIds=[record.instance_id])["Reservations"]
    instance = reservation["Instances"][0]
    ended = transition_time(instance["StateTransitionReason"])
    assert instance["State"]["Name"] == "terminated" and ended is not None
    held = max(0.0, (ended - instance["LaunchTime"]).total_seconds())
    billing = load_catalog(config.parent).providers["ec2"].billing
    billed = billing.billed_seconds(max(held, 1e-6))
    assert record.cost_source == "provider" and record.billed_seconds == billed >= 60
    assert record.actual_usd == round(billed / 3600 * 0.526, 4)  # g4dn.xlarge on-demand, one node
    assert record.gpu_seconds == pytest.approx(held, abs=1e-3)  # one T4, EC2's own times
    # EC2's times are whole seconds, so where the window's edges fall among the steps varies; that
    # every second of it is in one phase does not.
    if held > 0:
        assert_phases_add_up(record)


# ---------------------------------------------------------------- Kubernetes on the emulator


@pytest.fixture
def bucket(aws_env: MotoServer) -> MotoServer:
    import boto3

    from test_k8s_pipeline import BUCKET

    boto3.client("s3", endpoint_url=str(aws_env)).create_bucket(Bucket=BUCKET)
    return aws_env


@pytest.mark.integration
@pytest.mark.slow
def test_a_nightly_on_the_cluster_accounts_for_every_pod_second(
    tmp_path: Path, k8s: K8sEmulator, bucket: MotoServer
) -> None:
    from test_k8s_pipeline import cluster_project, kubelet

    project = cluster_project(tmp_path / "proj", trainer=TIMED_TRAINER).parent
    with kubelet(k8s, project, tmp_path / "node") as node:
        code, body, err = gpuline(project, "run", "--tier", "nightly")
    assert code == 0, err
    assert not node.errors
    record = SqliteLedger(project / ".gpuline" / "ledger.db").get_run(body["run_id"])
    assert record.gpu_seconds == pytest.approx(record.pod_seconds, abs=1e-3)  # one T4: the pods' seconds
    assert_phases_add_up(record)
    assert record.phase_gpu_seconds["train"] > 0 and record.phase_gpu_seconds["setup"] > 0
    assert record.cost_source == "provider"
    assert record.phase_gpu_seconds["eval"] == 0 and record.phase_gpu_seconds["teardown"] == 0  # after the pods
    t = record.times
    assert t.provisioned is not None and t.pod_running is not None
    assert record.queue_seconds == pytest.approx((t.pod_running - t.provisioned).total_seconds(), abs=1e-3)


# ---------------------------------------------------------------- gpuline report


def reported(run_id: str, status: str = "succeeded", **fields: Any) -> RunRecord:
    r = RunRecord(run_id=run_id, model="tiny", team="vision", tier="nightly", status=status)  # type: ignore[arg-type]
    for key, value in fields.items():
        setattr(r, key, value)
    return r


def test_report_shows_useful_over_paid_cost_per_promotion_and_what_refusals_saved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], project: Path
) -> None:
    from gpuline.cli import main
    from gpuline.runs import utcnow

    def phases(**seconds: float) -> dict[str, float]:
        return {p: seconds.get(p, 0.0) for p in PHASES}

    runs = [
        reported("a", gpu_seconds=3600, actual_usd=2.0, promoted_version=1,
                 phase_gpu_seconds=phases(train=2400, eval=300, setup=600, idle=300)),
        reported("b", status="failed", gpu_seconds=1800, actual_usd=1.0,
                 phase_gpu_seconds=phases(train=900, setup=900)),
        reported("c", status="refused", estimated_gpu_hours=0.75),  # denied before any machine
        reported("d", gpu_seconds=7200, actual_usd=4.0, promoted_version=2),  # closed before phases were kept
    ]  # fmt: skip
    ledger = SqliteLedger(tmp_path / "report.db")
    now = utcnow()
    for r in runs:
        r.created_at = now
        ledger.create_run(r)
    monkeypatch.setenv("GPULINE_LEDGER", f"sqlite:///{tmp_path}/report.db")
    assert main(["report", "--config", str(project), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["weeks"]
    assert row["useful_gpu_hours"] == pytest.approx((2400 + 300 + 900) / 3600, abs=1e-4)
    assert row["measured_gpu_hours"] == pytest.approx(1.5)
    assert row["useful_share"] == pytest.approx(3600 / 5400, abs=1e-4)
    assert row["usd_per_promotion"] == pytest.approx(3.5)  # $7 over two promotions, the failed run included
    assert row["saved_gpu_hours"] == 0.75 and row["refused_before_gpu"] == 1
    text = render(weekly(runs, [row["week"]]), runs)
    assert "| 1.00 / 1.50 (67%) |" in text and "| 0.75 | 2 | $3.50 |" in text
    assert "Useful GPU-hours are the train and eval phases" in text
