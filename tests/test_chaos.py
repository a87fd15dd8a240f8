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


def kill(proc: subprocess.Popen[Any]) -> None:
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

    with contextlib.ExitStack() as cluster:
        if provider == "kubernetes" and stage in ("train", "release"):
            # On a cluster the pod trains and `gpuline train` follows the Job: a kubelet runs the pods.
            # (Killed in provision, the Job's pod never started: no kubelet, as for a machine booting.)
            announce = {"CHAOS_TRAIN_MARKER": str(marker)} if stage == "train" else {}
            cluster.enter_context(node_for(cloud.k8s, project, tmp_path / "node", **announce))
        run_id = workflow.step("preflight", "--tier", "nightly")["run-id"]
        workflow.step("cost-estimate", "--run-id", run_id)
        for step in STEPS[: STEPS.index(KILLED_IN[stage])]:
            workflow.step(step, "--run-id", run_id)
        _kill_and_reap(workflow, cloud, project, github, run_id, marker, stage)


def node_for(k8s: K8sEmulator, project: Path, root: Path, **node_env: str) -> Any:
    """The test kubelet in the background, running the pods of the Jobs gpuline creates from ``project``."""
    from kubernetes import config

    from kubelet import KubeletDaemon

    api = config.new_client_from_config(config_file=str(k8s.kubeconfig))
    return KubeletDaemon(api, images={"registry.example/train:1": project}, root=root,
                         node_env={"GPULINE_IMDS_ENDPOINT": "off", **node_env})  # fmt: skip


def _kill_and_reap(
    workflow: NightlyRun, cloud: Cloud, project: Path, github: WorkflowRunAPI, run_id: str, marker: Path, stage: str
) -> None:
    provider = cloud.provider
    killed_in = KILLED_IN[stage]
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


# ---------------------------------------------------------------- `gpuline run`, signalled anywhere
# `gpuline run` is one process from preflight to teardown, and the holder of its run from the first
# step: signalled (SIGTERM, as a cancelled job is) anywhere it must tear down before it exits, and
# killed outright (SIGKILL) anywhere the default `gpuline reap` must close what it left.

# Where the run is stopped: inside each step (``in:STEP``, once the step's start is recorded), at
# every boundary (``after:STEP``), at the two points inside provision, and inside the training itself.
RUN_STEPS = ["preflight", "cost-estimate", "provision", "train", "eval-gate", "promote"]
RUN_POINTS = [
    *(f"{where}:{step}" for step in RUN_STEPS for where in ("in", "after")),
    "lease-recorded",
    "launched",
    "training",
]
STOPPED_AT = {"lease-recorded": "provision", "launched": "provision", "training": "train"}

# Stands in for a disk that fills up: while the file CHAOS_DISK_FULL names exists, every write to a
# file and every write transaction of the ledger fails as they do on a full disk. Then `gpuline`.
FULL_DISK = """
import builtins, contextlib, errno, io, os, sqlite3, sys
from pathlib import Path

flag = Path(os.environ["CHAOS_DISK_FULL"])
real_open = io.open

def full_open(file, mode="r", *args, **kwargs):
    if flag.exists() and any(c in mode for c in "wax+") and not str(file).startswith("/dev/"):
        raise OSError(errno.ENOSPC, "No space left on device", str(file))
    return real_open(file, mode, *args, **kwargs)

io.open = builtins.open = full_open
from gpuline.ledger import sqlite as ledger_sqlite
real_tx = ledger_sqlite.SqliteLedger._tx

@contextlib.contextmanager
def full_tx(self):
    if flag.exists():
        raise sqlite3.OperationalError("database or disk is full")
    with real_tx(self) as db:
        yield db

ledger_sqlite.SqliteLedger._tx = full_tx
from gpuline.cli import main
sys.exit(main(sys.argv[1:]))
"""

# The trainer: announces itself (CHAOS_TRAIN_MARKER) and waits to be stopped, or fills the disk
# (CHAOS_DISK_FULL) and fails as a trainer whose checkpoint cannot be written does.
RUN_TRAIN = TRAIN.replace(
    '    steps = 20 if os.environ.get("GPULINE_SMOKE") == "1" else 5\n',
    '    full = os.environ.get("CHAOS_DISK_FULL")\n'
    '    if full and os.environ.get("GPULINE_SMOKE") != "1":\n'
    '        pathlib.Path(full).write_text("full")\n'
    '        raise OSError(28, "No space left on device", os.environ["GPULINE_CHECKPOINT_DIR"])\n'
    '    steps = 20 if os.environ.get("GPULINE_SMOKE") == "1" else 5\n',
)


def start_run(project: Path, env: dict[str, str], *, full_disk: bool = False) -> subprocess.Popen[str]:
    entry = ["-c", FULL_DISK] if full_disk else ["-m", "gpuline.cli"]
    return subprocess.Popen(
        [sys.executable, *entry, "run", "--tier", "nightly", "--json"],
        cwd=project,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
        start_new_session=True,
    )


def leftovers_of(project: Path) -> dict[str, Any]:
    """Everything a run can leave held: leases, reservations, machines, processes working in it."""
    from gpuline.providers.local import LocalProvider

    ledger = SqliteLedger(project / ".gpuline" / "ledger.db")
    try:
        return {
            "leases": [lease.lease_id for lease in ledger.leases(active_only=True)],
            "reservations": [r.run_id for r in ledger.reservations(state="held")],
            "machines": [m.instance_id for m in LocalProvider(project).list_owned()],
            "processes": processes_in(project),
        }
    finally:
        ledger.close()


def processes_in(folder: Path) -> list[int]:
    """Processes whose working directory is inside ``folder`` (a trainer left running, say)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if Path(os.readlink(entry / "cwd")).is_relative_to(folder):
                    found.append(int(entry.name))
    return found


def no_processes_in(folder: Path) -> list[int]:
    """Waits (a hang guard, not a margin) for the trainer's parent-death signal to be delivered."""
    deadline = time.monotonic() + 60
    while (left := processes_in(folder)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def reap_default(project: Path, *, full_disk: bool = False, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    entry = ["-c", FULL_DISK] if full_disk else ["-m", "gpuline.cli"]
    done = subprocess.run(
        [sys.executable, *entry, "reap", "--json"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        check=False,
    )
    return done.returncode, done.stdout, done.stderr


def the_run(project: Path) -> Any:
    ledger = SqliteLedger(project / ".gpuline" / "ledger.db")
    try:
        (record,) = ledger.list_runs()
        return record
    finally:
        ledger.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
@pytest.mark.parametrize("point", RUN_POINTS)
def test_gpuline_run_signalled_anywhere_leaves_nothing_held(tmp_path: Path, point: str, sig: signal.Signals) -> None:
    project = write_project(tmp_path / "proj", train_py=RUN_TRAIN).parent
    marker = tmp_path / "reached"
    hook = {"CHAOS_TRAIN_MARKER": str(marker)} if point == "training" else {"GPULINE_TEST_PAUSE_AT": point}
    proc = start_run(project, {"GPULINE_TEST_PAUSE_FILE": str(marker), **hook})
    try:
        deadline = time.monotonic() + 90  # a hang guard
        while not (marker.exists() and marker.read_text().endswith("\n")):
            assert proc.poll() is None, f"exited {proc.returncode} before {point}: {proc.communicate()}"
            assert time.monotonic() < deadline, f"{point} was not reached"
            time.sleep(0.05)
        os.kill(proc.pid, sig)
        out, err = proc.communicate(timeout=120)
    finally:
        kill(proc)
    stage = STOPPED_AT.get(point, point.partition(":")[2])
    assert proc.returncode != 0
    if sig == signal.SIGTERM:
        # Teardown ran before the process exited: nothing is held even before any reaper.
        assert proc.returncode == 3, err
        assert [line for line in err.splitlines() if line.startswith("error: ")], err
        assert json.loads(out)["ok"] is False
        assert leftovers_of(project) == {"leases": [], "reservations": [], "machines": [], "processes": []}
        record = the_run(project)
        assert record.times.released is not None
    assert no_processes_in(project) == []
    code, reaped, reap_err = reap_default(project)  # the default settings: a 10-minute boot grace
    assert code == 0, reaped + reap_err
    assert leftovers_of(project) == {"leases": [], "reservations": [], "machines": [], "processes": []}, reaped
    record = the_run(project)
    assert record.times.released is not None, reaped
    assert record.stage == stage, (record.stage, record.error)
    assert record.status == ("succeeded" if point == "after:promote" else "failed"), record.error
    # Idempotent: a second sweep has nothing left to do.
    assert changes(json.loads(reap_default(project)[1])) == []


def test_a_disk_that_fills_during_training_leaves_nothing_held_once_it_is_freed(tmp_path: Path) -> None:
    project = write_project(tmp_path / "proj", train_py=RUN_TRAIN).parent
    full = tmp_path / "disk-full"
    proc = start_run(project, {"CHAOS_DISK_FULL": str(full)}, full_disk=True)
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        kill(proc)
    assert full.exists()
    # Teardown tried every release on its own and says what it could not do.
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 3 and "teardown of run" in line and " left machine " in line, err
    assert json.loads(out)["ok"] is False
    # The reaper, while the disk is still full: the contract's one line, no traceback.
    code, reaped, reap_err = reap_default(project, full_disk=True, env={"CHAOS_DISK_FULL": str(full)})
    assert code == 3, reaped + reap_err
    (line,) = [line for line in reap_err.splitlines() if line.startswith("error: ")]
    assert "No space left on device" in line and "Traceback" not in reap_err, reap_err
    assert json.loads(reaped)["ok"] is False
    full.unlink()  # space freed
    assert no_processes_in(project) == []
    code, reaped, reap_err = reap_default(project)
    assert code == 0, reaped + reap_err
    assert leftovers_of(project) == {"leases": [], "reservations": [], "machines": [], "processes": []}, reaped
    record = the_run(project)
    assert (record.status, record.stage) == ("failed", "train") and record.times.released is not None
