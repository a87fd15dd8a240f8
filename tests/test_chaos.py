"""Chaos: the orchestrator (`gpuline run`, a real subprocess) is SIGKILLed at each stage of a run on a
real API (EC2 on moto, Kubernetes on the kmock emulator); then `gpuline reap` must leave nothing
running, no Job, no held reservation and no open lease, while never touching a machine still inside
its boot grace period or one whose orchestrator is alive.

The process is stopped at a stage with the ``GPULINE_TEST_PAUSE_AT`` test hook (see
gpuline/providers/testhooks.py); "train" is reached by the training script itself, which signals and
then waits, as a long step would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from conftest import write_project
from gpuline.ledger.sqlite import SqliteLedger

if TYPE_CHECKING:
    from fixtures_k8s import K8sEmulator

pytest_plugins = ["fixtures_k8s"]
pytestmark = [pytest.mark.slow, pytest.mark.integration]

STAGES = ["lease-recorded", "launched", "train", "release"]

# Honours the trainer contract; with CHAOS_TRAIN_MARKER set it announces itself and waits until the
# process that launched it is gone, like a long training step killed from above.
TRAIN = """
import json, os, pathlib, time

if __name__ == "__main__":
    metrics = pathlib.Path(os.environ["GPULINE_METRICS_PATH"])
    marker = os.environ.get("CHAOS_TRAIN_MARKER")
    if marker and os.environ.get("GPULINE_SMOKE") != "1":
        parent = os.getppid()
        pathlib.Path(marker).write_text(str(os.getpid()))
        deadline = time.monotonic() + 120
        while os.getppid() == parent and time.monotonic() < deadline:
            time.sleep(0.05)
        raise SystemExit(1)
    steps = 20 if os.environ.get("GPULINE_SMOKE") == "1" else 5
    w = 0.0
    with metrics.open("a") as fh:
        for step in range(steps):
            w += 0.3 * (3.0 - w)
            fh.write(json.dumps({"step": step, "loss": (3.0 - w) ** 2}) + "\\n")
    if os.environ.get("GPULINE_SMOKE") != "1":
        pathlib.Path(os.environ["GPULINE_EVAL_PATH"]).write_text(json.dumps({"loss": (3.0 - w) ** 2}))
        out = pathlib.Path(os.environ["GPULINE_OUTPUT_DIR"])
        out.mkdir(parents=True, exist_ok=True)
        (out / "model.txt").write_text(str(w))
"""


def chaos_project(tmp_path: Path, provider: str, image: str) -> Path:
    ec2 = f"  region: us-east-1\n  options:\n    image_id: {image}\n"
    extra = ec2 if provider == "ec2" else f"  image: {image}\n"
    config = write_project(tmp_path / "proj", train_py=TRAIN, spec_extra=extra)
    text = config.read_text().replace("provider: local", f"provider: {provider}")
    config.write_text(text.replace("gpu_type: cpu", "gpu_type: t4\n  gpu_count: 1"))
    return config


class Cloud:
    """What the provider under test holds, seen from outside gpuline."""

    def __init__(self, provider: str, request: pytest.FixtureRequest) -> None:
        self.provider = provider
        if provider == "ec2":
            request.getfixturevalue("aws_env")
            import boto3

            self.ec2 = boto3.client("ec2", region_name="us-east-1", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
            self.image = str(self.ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"])
        else:
            self.k8s: K8sEmulator = request.getfixturevalue("k8s")
            self.image = "registry.example/train:1"

    def live(self) -> list[str]:
        if self.provider == "ec2":
            filters: list[Any] = [
                {"Name": "tag:gpuline:managed", "Values": ["true"]},
                {"Name": "instance-state-name", "Values": ["pending", "running", "stopping", "stopped"]},
            ]
            found = self.ec2.describe_instances(Filters=filters)["Reservations"]
            return [i["InstanceId"] for r in found for i in r["Instances"]]
        return [j["metadata"]["name"] for j in self.k8s.objects("jobs")]

    def leftovers(self) -> list[str]:
        if self.provider == "ec2":
            return self.live()
        return [o["metadata"]["name"] for kind in ("jobs", "services", "secrets") for o in self.k8s.objects(kind)]


def gpuline(project: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpuline.cli", *args],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        check=False,
    )


def wait_for(path: Path, proc: subprocess.Popen[bytes], log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"gpuline run exited {proc.returncode} before the stage:\n{log.read_text()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"the stage was not reached:\n{log.read_text()}")
        time.sleep(0.05)


def reap(project: Path, *args: str) -> dict[str, Any]:
    done = gpuline(project, "reap", "--json", *args)
    assert done.returncode == 0, done.stdout + done.stderr
    body: dict[str, Any] = json.loads(done.stdout)
    return body


@pytest.mark.parametrize("provider", ["ec2", "kubernetes"])
@pytest.mark.parametrize("stage", STAGES)
def test_sigkill_at_any_stage_then_reap_leaves_nothing_running(
    tmp_path: Path, request: pytest.FixtureRequest, provider: str, stage: str
) -> None:
    cloud = Cloud(provider, request)
    project = chaos_project(tmp_path, provider, cloud.image).parent
    marker, log = tmp_path / "reached", tmp_path / "run.log"
    env = {"GPULINE_TEST_PAUSE_FILE": str(marker), "CHAOS_TRAIN_MARKER": str(marker)}
    if stage != "train":
        env["GPULINE_TEST_PAUSE_AT"] = stage
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gpuline.cli", "run", "--tier", "nightly"],
            cwd=project,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
            start_new_session=True,
        )
    try:
        wait_for(marker, proc, log)
        if stage == "train":
            # While its orchestrator lives, the reaper keeps its hands off the run.
            plan = reap(project, "--grace", "1s")
            assert not [a for a in plan["actions"] if a["kind"] != "keep"], plan
            assert len(cloud.live()) == 1
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)

    ledger = SqliteLedger(project / ".gpuline" / "ledger.db")
    (record,) = ledger.list_runs()
    assert record.lease_id, "the lease is recorded before anything is launched"
    if stage == "launched":
        assert record.instance_id is None and len(cloud.live()) == 1  # killed before the ledger heard of it
        # A machine inside its boot grace period is left alone, abandoned or not.
        plan = reap(project)
        assert [a["kind"] for a in plan["actions"]] == []
        assert len(cloud.live()) == 1
        assert [r.run_id for r in ledger.reservations(state="held")] == [record.run_id]
    time.sleep(1.1)  # EC2 and the Job annotation keep launch times to the second
    plan = reap(project, "--grace", "1s")
    assert provider in plan["swept"]
    assert cloud.leftovers() == [], plan
    assert ledger.reservations(state="held") == []
    assert ledger.leases(active_only=True) == []
    record = ledger.get_run(record.run_id)
    assert record.times.released is not None, plan
    assert record.status in ("failed", "succeeded")
    assert "reaped" in [e.kind for e in ledger.events(record.run_id)]
    if stage == "train":
        # Idempotent: a second sweep has nothing left to do.
        assert [a for a in reap(project, "--grace", "1s")["actions"] if a["kind"] != "keep"] == []
