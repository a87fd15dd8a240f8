"""Chaos: a step of a nightly workflow run is SIGKILLed at each stage of a run on a real API (EC2 on
moto, Kubernetes on the kmock emulator); then `gpuline reap` must leave nothing running, no Job, no
held reservation and no open lease, while never touching a machine still inside its boot grace
period or one whose holder is alive.

A cloud run happens in CI, not in `gpuline run` (which trains on its own host and so refuses a cloud
provider): the nightly tier's jobs run `gpuline preflight --tier nightly`, `cost-estimate`,
`provision`, `train` (on the machine's own runner in CI) and `teardown` as separate commands, and the
lease's holder is the workflow run, not a process. So each case drives those commands as separate
real subprocesses of the CLI, in the environment a workflow run gives them (GITHUB_REPOSITORY,
GITHUB_RUN_ID, GITHUB_RUN_ATTEMPT, GITHUB_API_URL), with the run id passed on through GITHUB_OUTPUT
as the jobs pass it. GitHub's "get a workflow run" endpoint is faked on 127.0.0.1: the run is
``in_progress`` while the workflow lives and ``completed`` (``cancelled``) once the test has
cancelled it by SIGKILLing the step it was in, so no teardown runs. The reaper asks it with its own
token (GPULINE_GITHUB_TOKEN).

A step is stopped at a stage with the ``GPULINE_TEST_PAUSE_AT`` test hook (see
gpuline/providers/testhooks.py): ``lease-recorded`` and ``launched`` inside `provision`, ``release``
inside the provider's release during `teardown`; "train" is reached by the training script itself
during `train`, which signals and then waits, as a long step would.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from conftest import read_outputs, write_project
from gpuline.ledger.sqlite import SqliteLedger

if TYPE_CHECKING:
    from fixtures_k8s import K8sEmulator

pytest_plugins = ["fixtures_k8s"]
pytestmark = [pytest.mark.slow, pytest.mark.integration]

STAGES = ["lease-recorded", "launched", "train", "release"]
# The step of the nightly tier that is running when each stage is reached.
KILLED_IN = {"lease-recorded": "provision", "launched": "provision", "train": "train", "release": "teardown"}
STEPS = ["provision", "train", "teardown"]  # after preflight and cost-estimate, which always complete

REPO, WORKFLOW_RUN_ID, REAPER_TOKEN = "octo/models", "7001", "reaper-token"
CANCELLED = f"its workflow run {WORKFLOW_RUN_ID} is completed (cancelled)"

# Honours the trainer contract; with CHAOS_TRAIN_MARKER set it announces itself and waits until the
# process that launched it is gone, like a long training step killed from above.
TRAIN = """
import json, os, pathlib, time

if __name__ == "__main__":
    metrics = pathlib.Path(os.environ["GPULINE_METRICS_PATH"])
    marker = os.environ.get("CHAOS_TRAIN_MARKER")
    if marker and os.environ.get("GPULINE_SMOKE") != "1":
        parent = os.getppid()
        pathlib.Path(marker).write_text(f"{os.getpid()} train\\n")
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


class WorkflowRunAPI:
    """GitHub as the reaper sees it: the workflow run that holds the lease, and the repository's runners."""

    def __init__(self, server: HTTPServer) -> None:
        self.base_url = server.url_for("").rstrip("/")
        self.status: str = "in_progress"
        self.conclusion: str | None = None
        self.answered: list[str] = []  # the statuses the run endpoint answered, in order
        self._lock = threading.Lock()
        repo = f"/repos/{REPO}/actions"
        server.expect_request(f"{repo}/runs/{WORKFLOW_RUN_ID}", method="GET").respond_with_handler(self._run)
        server.expect_request(f"{repo}/runners", method="GET").respond_with_handler(self._runners)

    def cancel(self) -> None:
        with self._lock:
            self.status, self.conclusion = "completed", "cancelled"

    @staticmethod
    def _denied(request: Request) -> Response | None:
        if request.headers.get("Authorization", "").rpartition(" ")[2] == REAPER_TOKEN:
            return None
        return _json({"message": "Bad credentials", "documentation_url": "https://docs.github.com/rest"}, 401)

    def _run(self, request: Request) -> Response:
        denied = self._denied(request)
        if denied is not None:
            return denied
        with self._lock:
            self.answered.append(self.status)
            return _json(
                {
                    "id": int(WORKFLOW_RUN_ID),
                    "name": "gpuline nightly",
                    "run_attempt": 1,
                    "status": self.status,
                    "conclusion": self.conclusion,
                    "url": f"{self.base_url}/repos/{REPO}/actions/runs/{WORKFLOW_RUN_ID}",
                }
            )

    def _runners(self, request: Request) -> Response:
        return self._denied(request) or _json({"total_count": 0, "runners": []})


def _json(data: Any, status: int = 200) -> Response:
    return Response(json.dumps(data), status=status, content_type="application/json")


@pytest.fixture
def github() -> Iterator[WorkflowRunAPI]:
    server = HTTPServer(host="127.0.0.1", port=0, threaded=True)
    server.start()
    try:
        yield WorkflowRunAPI(server)
    finally:
        server.stop()
    server.check_assertions()  # nothing asked GitHub for anything it does not answer


class NightlyRun:
    """One workflow run of the nightly tier: its steps, each a real `gpuline` subprocess of its own."""

    def __init__(self, project: Path, logs: Path, api: WorkflowRunAPI, hooks: dict[str, str]) -> None:
        self.project, self.logs, self.api = project, logs, api
        self.env = {
            "GITHUB_REPOSITORY": REPO,
            "GITHUB_RUN_ID": WORKFLOW_RUN_ID,
            "GITHUB_RUN_ATTEMPT": "1",
            "GITHUB_API_URL": api.base_url,
            **hooks,
        }
        logs.mkdir()

    def start(self, step: str, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
        log, outputs = self.logs / f"{step}.log", self.logs / f"{step}.outputs"
        outputs.write_text("")
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "gpuline.cli", step, *args],
                cwd=self.project,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env, "GITHUB_OUTPUT": str(outputs)},
                start_new_session=True,
            )
        return proc, log

    def step(self, step: str, *args: str) -> dict[str, str]:
        """Run a step to its end, as its job would; returns its outputs."""
        proc, log = self.start(step, *args)
        try:
            rc = proc.wait(120)
        finally:
            kill(proc)
        assert rc == 0, f"`gpuline {step}` exited {rc}:\n{log.read_text()}"
        return read_outputs(self.logs / f"{step}.outputs")

    def cancel(self, proc: subprocess.Popen[bytes]) -> None:
        """Cancel the workflow run from above: its step dies at once and no teardown follows."""
        kill(proc)
        self.api.cancel()


def kill(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)


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


def wait_for(path: Path, proc: subprocess.Popen[bytes], step: str, log: Path, timeout: float = 90) -> str:
    """The stage named in the marker once it is written."""
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text().endswith("\n")):
        if proc.poll() is not None:
            raise AssertionError(f"`gpuline {step}` exited {proc.returncode} before the stage:\n{log.read_text()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"the stage was not reached:\n{log.read_text()}")
        time.sleep(0.05)
    return path.read_text().split()[-1]


def reap(project: Path, api: WorkflowRunAPI, *args: str) -> dict[str, Any]:
    """`gpuline reap` as the reaper workflow runs it: same repository, its own token."""
    env = {"GITHUB_REPOSITORY": REPO, "GITHUB_API_URL": api.base_url, "GPULINE_GITHUB_TOKEN": REAPER_TOKEN}
    done = gpuline(project, "reap", "--json", *args, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    body: dict[str, Any] = json.loads(done.stdout)
    return body


def changes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    return [a for a in plan["actions"] if a["kind"] != "keep"]


@pytest.mark.parametrize("provider", ["ec2", "kubernetes"])
@pytest.mark.parametrize("stage", STAGES)
def test_sigkill_at_any_stage_then_reap_leaves_nothing_running(
    tmp_path: Path, request: pytest.FixtureRequest, github: WorkflowRunAPI, provider: str, stage: str
) -> None:
    cloud = Cloud(provider, request)
    project = chaos_project(tmp_path, provider, cloud.image).parent
    marker = tmp_path / "reached"
    hooks = {"GPULINE_TEST_PAUSE_FILE": str(marker)}
    hooks.update({"CHAOS_TRAIN_MARKER": str(marker)} if stage == "train" else {"GPULINE_TEST_PAUSE_AT": stage})
    workflow = NightlyRun(project, tmp_path / "steps", github, hooks)

    run_id = workflow.step("preflight", "--tier", "nightly")["run-id"]
    workflow.step("cost-estimate", "--run-id", run_id)
    killed_in = KILLED_IN[stage]
    for step in STEPS[: STEPS.index(killed_in)]:
        workflow.step(step, "--run-id", run_id)
    proc, log = workflow.start(killed_in, "--run-id", run_id)
    try:
        assert wait_for(marker, proc, killed_in, log) == stage
        if stage == "train":
            time.sleep(1.1)  # EC2 and the Job annotation keep launch times to the second
            # While its holder lives (the workflow run is in progress), the reaper keeps its hands off.
            plan = reap(project, github, "--grace", "1s")
            assert not changes(plan), plan
            assert github.answered and set(github.answered) == {"in_progress"}, github.answered
            assert len(cloud.live()) == 1
    finally:
        workflow.cancel(proc)

    ledger = SqliteLedger(project / ".gpuline" / "ledger.db")
    (record,) = ledger.list_runs()
    assert record.run_id == run_id
    assert record.lease_id, "the lease is recorded before anything is launched"
    (recorded,) = [e.data for e in ledger.events(run_id) if e.kind == "lease.recorded"]
    assert recorded["holder"] == {"workflow": {"repo": REPO, "run_id": WORKFLOW_RUN_ID, "attempt": "1"}}
    if stage == "launched":
        assert record.instance_id is None and len(cloud.live()) == 1  # killed before the ledger heard of it
        # A machine inside its boot grace period is left alone, abandoned or not.
        plan = reap(project, github)
        assert [a["kind"] for a in plan["actions"]] == []
        assert len(cloud.live()) == 1
        assert [r.run_id for r in ledger.reservations(state="held")] == [record.run_id]
    if stage != "train":
        time.sleep(1.1)  # EC2 and the Job annotation keep launch times to the second
    plan = reap(project, github, "--grace", "1s")
    assert provider in plan["swept"]
    assert cloud.leftovers() == [], plan
    assert any(CANCELLED in a["reason"] for a in changes(plan)), plan  # the holder asked is the workflow run
    assert ledger.reservations(state="held") == []
    assert ledger.leases(active_only=True) == []
    record = ledger.get_run(record.run_id)
    assert record.times.released is not None, plan
    assert record.status in ("failed", "succeeded")
    assert "reaped" in [e.kind for e in ledger.events(record.run_id)]
    # Idempotent: a second sweep has nothing left to do.
    assert changes(reap(project, github, "--grace", "1s")) == []
