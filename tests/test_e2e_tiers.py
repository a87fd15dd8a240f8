"""The GPU tiers end to end, as a consuming repository runs them, with no shortcut.

A repository outside the work tree holds the reference project (templates/example), its own
gpuline.yml (provider ec2, a DynamoDB ledger and S3 storage on moto's server, an MLflow registry
on a real ``mlflow server`` shared by every run, eval.command and a deploy hook) and the callers of
templates/workflows/ copied byte for byte, which call the tiers by their release reference
``gpuline/gpuline/.github/workflows/<tier>.yml@v1`` (act maps it to a snapshot of this work tree).
Every workflow runs under ``act`` in host mode; each act invocation is a workflow run of its own,
with nothing carried between them but the shared backends.

* nightly (workflow_dispatch) with a runner token and no gpu-runner-label: the lease, an instance on
  moto, a just-in-time runner registered on the GitHub fake; the train job runs on that runner's
  labels; the instance's boot script, run in a sandbox, starts the runner with exactly the JIT config
  GitHub returned; checkpoints land in S3; eval gate and promotion run; teardown terminates the
  instance, deletes the runner, settles the reservation.
* release, a separate run: its estimate learns from the shared ledger's history (nightly's run
  among it), it trains a new run from step 0, promotes to production in the shared registry and
  deploys it (a GitHub deployment); the check after promotion fetches it back and passes (act does
  not implement `environment:`: its job model has no such key, so no reviewer is waited for).
* a second release, a run of its own: gated against the first one's production version (both
  evaluated by eval.command in the gate job); the stored files of the version it promotes are
  damaged once it is deployed, so the check after promotion fails and the rollback job puts
  production back on the first release's version; ``gpuline models`` shows who did what.
* a nightly ended right after provision (act killed, as a force-cancelled run ends), then the
  reaper tier through its caller: the instance is terminated and the reservation freed.

gpuline is installed by the actions' own setup with uv, as on a runner; the only thing the test
gives act's host is what a runner with a package mirror has: uv pointed at the local wheel folder
and a constraint that picks the CPU build of torch.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml

from act_harness import Act, ActProcess, ActResult, init_repo
from github_fake import FakeGitHub
from servers import FAKE_CREDENTIALS, REGION, MotoServer

pytestmark = [pytest.mark.slow, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "templates/example"
CALLERS = ("nightly.yml", "release.yml", "reaper.yml")
REPO = "acme/vision"
TABLE = "gpuline-e2e"
BUCKET = "gpuline-e2e-artifacts"
TORCH = "torch==2.13.0+cpu"
# The train job asks for ["self-hosted", "gpuline-<run id>"]; act takes the first label it has a
# platform for, so this is the host taking the job as the run's own runner would.
PLATFORMS = ("ubuntu-latest=-self-hosted", "self-hosted=-self-hosted")
# A repository whose gpuline.yml points at shared backends sets this repository variable.
VARIABLES = {"GPULINE_CARRY_STATE": "false"}
# Seconds per phase, printed at the end of the module.
TIMINGS: dict[str, float] = {}
JOB_LINE = re.compile(r"^\[(?P<job>[^\]]+)\]\s+(?P<mark>🏁|⭐|✅|❌|🚧)\s+(?P<text>.*)$")


# ---------------------------------------------------------------- the consuming repository


@dataclass
class Consumer:
    repo: Path
    registry: str
    act: Act
    moto: MotoServer
    host_env: dict[str, str]
    ami: str

    def ec2(self) -> Any:
        return boto3.client("ec2", region_name=REGION, endpoint_url=self.moto, **_keys())

    def s3(self) -> Any:
        return boto3.client("s3", region_name=REGION, endpoint_url=self.moto, **_keys())

    def ledger(self) -> Any:
        from gpuline.ledger import open_ledger

        return open_ledger(f"dynamodb://{TABLE}", self.repo)

    def run(self, caller: str, github: FakeGitHub, *, verbose: bool = False, timeout: int = 1500) -> ActResult:
        """One workflow run of the caller ``gpuline-<caller>``, started as its own trigger would."""
        started = time.monotonic()
        result = self.act.run(
            self.repo,
            "workflow_dispatch",
            f".github/workflows/gpuline-{caller}",
            env=github_env(github),
            secrets=SECRETS,
            variables=VARIABLES,
            platforms=PLATFORMS,
            host_env=self.host_env,
            verbose=verbose,
            timeout=timeout,
        )
        TIMINGS[f"act {caller}"] = TIMINGS.get(f"act {caller}", 0.0) + time.monotonic() - started
        report(caller, result.log)
        return result

    def start(self, caller: str, github: FakeGitHub, log_path: Path) -> ActProcess:
        return self.act.start(
            self.repo,
            "workflow_dispatch",
            f".github/workflows/gpuline-{caller}",
            log_path=log_path,
            env=github_env(github),
            secrets=SECRETS,
            variables=VARIABLES,
            platforms=PLATFORMS,
            host_env=self.host_env,
        )


RUNNER_TOKEN = "ghs_runner" + "0" * 26
WORKFLOW_TOKEN = "ghs_workflow" + "0" * 24
SECRETS = {"GPULINE_RUNNER_TOKEN": RUNNER_TOKEN, "GITHUB_TOKEN": WORKFLOW_TOKEN}


def _keys() -> dict[str, str]:
    return {
        "aws_access_key_id": FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        "aws_session_token": FAKE_CREDENTIALS["AWS_SESSION_TOKEN"],
    }


def github_env(github: FakeGitHub) -> dict[str, str]:
    return {"GITHUB_API_URL": github.base_url, "GPULINE_GITHUB_RETRIES": "0"}


def wheel_folder() -> Path:
    """The folder pip's configuration names for local wheels, where the CPU torch wheel is."""
    folder = Path(os.environ.get("PIP_FIND_LINKS") or "/opt/wheels")
    version = TORCH.split("==")[1]
    if not any(folder.glob(f"torch-{version.replace('+', '[+]')}-*.whl")):
        reason = f"no {TORCH} wheel in {folder} (PIP_FIND_LINKS): the train extra would download CUDA torch"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return folder


# The consumer's deploy hook: what a team would point at its serving endpoint.
DEPLOY = "import os; print('serving', os.environ['GPULINE_MODEL'], 'v' + os.environ['GPULINE_MODEL_VERSION'])"


def consumer_config(ami: str, registry: str) -> str:
    """The consumer's own gpuline.yml: the reference project on ec2, with shared backends."""
    data = yaml.safe_load((EXAMPLE / "gpuline.yml").read_text(encoding="utf-8"))
    data["resources"] = {
        "provider": "ec2",
        "gpu_type": "t4",
        "gpu_count": 1,
        "nodes": 1,
        "procs_per_node": 1,
        "max_duration": "20m",
        "lane": "on-demand",
        "region": REGION,
        "options": {"image_id": ami},
    }
    data["backends"] = {
        "ledger": f"dynamodb://{TABLE}",
        "storage": f"s3://{BUCKET}/gpuline",
        "registry": registry,
    }
    data["deploy"] = {"command": ["python", "-c", DEPLOY]}
    data["hyperparameters"]["steps"] = 300
    # Nightly and release train the same config here, so each learns the other's duration.
    data["tiers"] = {}
    return yaml.safe_dump(data, sort_keys=False)


@pytest.fixture(scope="module")
def consumer(
    tmp_path_factory: pytest.TempPathFactory, moto_server: MotoServer, mlflow_server: str
) -> Iterator[Consumer]:
    wheels = wheel_folder()
    moto_server.reset()
    work = tmp_path_factory.mktemp("e2e")
    assert not work.resolve().is_relative_to(ROOT), "the consumer must live outside the work tree"
    act = Act.create(work)
    s3 = boto3.client("s3", region_name=REGION, endpoint_url=moto_server, **_keys())
    s3.create_bucket(Bucket=BUCKET)
    ec2 = boto3.client("ec2", region_name=REGION, endpoint_url=moto_server, **_keys())
    ami = str(ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"])

    repo = work / "consumer"
    shutil.copytree(EXAMPLE, repo, ignore=shutil.ignore_patterns(".gpuline*", "__pycache__"))
    registry = f"mlflow+{mlflow_server}"  # the registry every run shares
    (repo / "gpuline.yml").write_text(consumer_config(ami, registry), encoding="utf-8")
    workflows = repo / ".github/workflows"
    workflows.mkdir(parents=True)
    for name in CALLERS:
        # "Copy to .github/workflows/gpuline-<name>", byte for byte.
        shutil.copyfile(ROOT / "templates/workflows" / name, workflows / f"gpuline-{name}")
    init_repo(repo, remote=f"https://github.com/{REPO}.git")

    constraints = work / "uv-constraints.txt"
    constraints.write_text(TORCH + "\n")
    host_env = {
        # What a runner with a package mirror sets: uv finds the CPU torch wheel locally.
        "UV_FIND_LINKS": str(wheels),
        "UV_CONSTRAINT": str(constraints),
        **FAKE_CREDENTIALS,
        "AWS_ENDPOINT_URL": str(moto_server),
    }
    yield Consumer(repo, registry, act, moto_server, host_env, ami)


@pytest.fixture
def aws(consumer: Consumer, monkeypatch: pytest.MonkeyPatch) -> Consumer:
    """boto3 in this test process reaches the same moto server the workflows use."""
    for name, value in FAKE_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", str(consumer.moto))
    return consumer


@pytest.fixture
def github(fake_github: FakeGitHub) -> FakeGitHub:
    # Only these two tokens exist: the runner token may create runners, the workflow's may write.
    fake_github.tokens = {RUNNER_TOKEN: "write", WORKFLOW_TOKEN: "write"}
    return fake_github


@dataclass
class Cancelled:
    """A nightly ended right after provision: started in the background, killed by a watcher."""

    process: ActProcess
    github: FakeGitHub
    watcher: threading.Thread
    result: ActResult | None = None

    def wait(self) -> ActResult:
        self.watcher.join(timeout=360)
        assert self.result is not None, "the cancelled nightly never ended"
        return self.result


@pytest.fixture(scope="module")
def runner_github(openapi_contract: Any) -> Iterator[FakeGitHub]:
    """A GitHub fake of its own for the cancelled run and the reaper, which span two tests."""
    from pytest_httpserver import HTTPServer

    from github_fake import serve

    server = HTTPServer(host="127.0.0.1", port=0)
    server.start()
    try:
        fake = serve(server, openapi_contract)
        fake.tokens = {RUNNER_TOKEN: "write", WORKFLOW_TOKEN: "write"}
        yield fake
    finally:
        server.clear()
        server.stop()


@pytest.fixture(scope="module")
def cancelled_nightly(
    consumer: Consumer, runner_github: FakeGitHub, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cancelled]:
    """A cancellation that leaves things behind: the workflow run ends right after provision and no
    job of it runs again, teardown included, as after a force-cancel or a lost runner. Killing act
    does exactly that. A plain cancel would not: act, like GitHub, still runs the always() teardown
    (and so would a failing train), which would clean up and leave the reaper nothing to do.

    It runs in the background beside the release run (the two are independent), which keeps the
    module under 4 minutes on two cores."""
    log = tmp_path_factory.mktemp("cancelled") / "nightly.log"
    started = time.monotonic()
    process = consumer.start("nightly.yml", runner_github, log)

    def end_after_provision() -> None:
        try:
            process.wait_for(r"/provision GPU\s*\]\s+🏁  Job succeeded", timeout=900)
        except AssertionError:
            pass  # the test says what happened, from the log
        finally:
            cancelled.result = process.kill()
            TIMINGS["act nightly.yml (ended after provision)"] = time.monotonic() - started

    cancelled = Cancelled(process, runner_github, threading.Thread(target=end_after_provision, daemon=True))
    cancelled.watcher.start()
    try:
        yield cancelled
    finally:
        process.kill()


# ---------------------------------------------------------------- reading act's log


def job_lines(log: str) -> dict[str, list[str]]:
    """Each job's status lines (start, steps, result), in order."""
    jobs: dict[str, list[str]] = {}
    for line in log.splitlines():
        if "[DEBUG]" in line:
            continue
        m = JOB_LINE.match(line.strip())
        if m:
            jobs.setdefault(m.group("job"), []).append(f"{m.group('mark')} {m.group('text')}")
    return jobs


def job_result(log: str, name: str) -> str | None:
    """'succeeded' or 'failed' for the job whose display name ends with ``name``."""
    for job, lines in job_lines(log).items():
        if job.rstrip().endswith(f"/{name}") or job.rstrip().endswith(name):
            for line in reversed(lines):
                if "Job succeeded" in line:
                    return "succeeded"
                if "Job failed" in line:
                    return "failed"
    return None


def report(caller: str, log: str) -> None:
    """What each job did (printed; pytest shows it with -s or on failure)."""
    print(f"\n===== gpuline-{caller}: jobs")
    for job, lines in job_lines(log).items():
        steps = [line for line in lines if line.startswith(("✅", "❌"))]
        result = next((line for line in reversed(lines) if "Job " in line), "(no result)")
        print(f"  {job}: {result}; {len(steps)} steps")
        for line in steps:
            if line.startswith("❌"):
                print(f"      {line}")


def relevant(log: str, limit: int = 120) -> str:
    """The lines of act's log that explain a failure: errors, failed steps and gpuline's own lines."""
    keep = re.compile(r"::error|❌|Error|error:|Traceback|gpuline (provision|train|teardown|reap)|refus|deny")
    lines = [line for line in log.splitlines() if "[DEBUG]" not in line and "level=debug" not in line]
    found = [line for line in lines if keep.search(line) and 'echo "::error' not in line]  # not script text
    return "\n".join(found[-limit:]) + "\n----- last lines -----\n" + "\n".join(lines[-40:])


def outputs(log: str, name: str) -> list[str]:
    """Every value a step set for the output ``name`` (act logs each ``::set-output::``)."""
    return re.findall(rf"::set-output:: {re.escape(name)}=(.*)$", log, flags=re.MULTILINE)


def summary(log: str, heading: str) -> str:
    """The job summary a step wrote that starts with ``heading`` (act logs each summary)."""
    found = re.search(rf"Summary - ({re.escape(heading)}.*?)(?=\n\[|\Z)", log, flags=re.DOTALL)
    assert found, f"no summary {heading!r}:\n{relevant(log)}"
    return found.group(1)


def evaluated_runs_on(log: str, job: str) -> list[str]:
    """The labels act evaluated for the job's runs-on (logged with --verbose)."""
    found = re.search(
        rf"/{re.escape(job)}\s*\] \[DEBUG\] expression "
        r"'\$\{\{ fromJSON\(needs\.provision\.outputs\.runs-on\) \}\}' evaluated to '\[(?P<labels>.*)\]'",
        log,
    )
    assert found, f"act did not evaluate the {job} job's runs-on from provision's output:\n{relevant(log)}"
    return re.findall(r"string=([^)]+)\)", found.group("labels"))


def assert_jobs(result: ActResult, expected: dict[str, str]) -> None:
    found = {name: job_result(result.log, name) for name in expected}
    assert found == expected, f"job results {found}\n{relevant(result.log)}"


# ---------------------------------------------------------------- the instance's boot script


def stand_in(path: Path, body: str) -> None:
    path.write_text("#!/bin/bash\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def boot(user_data: str, sandbox: Path) -> tuple[Path, list[str]]:
    """Run the boot script as the instance would, in a sandbox; returns (root, commands it called).

    GPULINE_ROOT prefixes every path the script writes. Stand-ins replace what would change this
    host: poweroff, systemctl, useradd, chown (the runner user does not exist here), nohup (the
    watchdog's fallback sleep would outlive the test), id (the runner user is absent, as on a fresh
    image); runuser logs and then runs the command as given. The runner itself is a stand-in at
    $ROOT/opt/actions-runner/run.sh that records the JIT config it received.
    """
    root, bin_dir, calls = sandbox / "root", sandbox / "bin", sandbox / "calls.log"
    bin_dir.mkdir(parents=True)
    for name in ("poweroff", "systemctl", "useradd", "chown", "nohup"):
        stand_in(bin_dir / name, f'echo "{name} $*" >>"$CALLS"')
    stand_in(bin_dir / "id", "exit 1")
    stand_in(
        bin_dir / "runuser", 'echo "runuser $*" >>"$CALLS"\nwhile [ "$1" != "--" ]; do shift; done\nshift\nexec "$@"'
    )
    runner = root / "opt/actions-runner"
    runner.mkdir(parents=True)
    stand_in(runner / "run.sh", 'printf %s "$ACTIONS_RUNNER_INPUT_JITCONFIG" >"$GPULINE_ROOT/runner-jit-config"')
    script = sandbox / "user-data.sh"
    script.write_text(user_data)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "GPULINE_ROOT": str(root), "CALLS": str(calls), "HOME": str(sandbox)}
    subprocess.run(["bash", str(script)], env=env, check=True, timeout=60)
    return root, calls.read_text().splitlines() if calls.exists() else []


def user_data(consumer: Consumer, instance_id: str) -> str:
    found = consumer.ec2().describe_instance_attribute(InstanceId=instance_id, Attribute="userData")
    return base64.b64decode(found["UserData"]["Value"]).decode()


def instances(consumer: Consumer, run_id: str) -> list[dict[str, Any]]:
    pages = consumer.ec2().describe_instances(Filters=[{"Name": "tag:gpuline:run-id", "Values": [run_id]}])
    return [i for r in pages["Reservations"] for i in r["Instances"]]


def run_id_of(log: str) -> str:
    ids = re.findall(r"\brun-\d{8}-\d{6}-[0-9a-f]+\b", log)
    assert ids, "no run id in the log:\n" + relevant(log)
    return ids[0]


def seed_history(consumer: Consumer, nights: int) -> list[str]:
    """Finished nightly runs of this config from the nights before (the first run of the test is the
    next one): written through gpuline's own ledger API, as earlier workflow runs would have."""
    from gpuline.runs import Lineage, RunRecord, utcnow
    from gpuline.spec import load_spec

    spec = load_spec(consumer.repo / "gpuline.yml").for_tier("nightly")
    ledger = consumer.ledger()
    ids = []
    for night in range(nights, 0, -1):
        start = utcnow() - timedelta(days=night)
        record = RunRecord(
            run_id=f"run-{start:%Y%m%d-%H%M%S}-{night:06x}",
            model=spec.model.name,
            team=spec.model.team,
            tier="nightly",
            status="succeeded",
            stage="teardown",
            lineage=Lineage(repo=REPO, config_hash=spec.config_hash(), config_path="gpuline.yml"),
            provider="ec2",
            instance_type="g4dn.xlarge",
            gpu_type="t4",
            gpu_count=1,
            lane="on-demand",
        )
        record.times.requested = start
        record.times.provisioned = start + timedelta(seconds=40)
        record.times.first_step = start + timedelta(seconds=90)
        record.times.last_step = start + timedelta(seconds=90 + 30 + night)
        record.times.released = start + timedelta(seconds=150 + night)
        ledger.create_run(record)
        ids.append(record.run_id)
    return ids


# ---------------------------------------------------------------- a. nightly


def test_nightly_provisions_ec2_trains_on_its_jit_runner_and_tears_everything_down(
    aws: Consumer, github: FakeGitHub, tmp_path: Path
) -> None:
    seeded = seed_history(aws, 2)
    result = aws.run("nightly.yml", github, verbose=True)
    assert result.returncode == 0, relevant(result.log)
    assert_jobs(
        result,
        {
            "refuse untrusted triggers": "succeeded",
            "preflight and cost estimate": "succeeded",
            "provision GPU": "succeeded",
            "train": "succeeded",
            "eval gate": "succeeded",
            "promote to staging": "succeeded",
            "teardown (always)": "succeeded",
        },
    )
    log = result.log
    run_id = run_id_of(log)
    label = f"gpuline-{run_id}"
    record = aws.ledger().get_run(run_id)
    print(f"nightly run {run_id}: {record.status}, lease {record.lease_id}, instance {record.instance_id}")

    # The estimate read the shared ledger: the seeded nights are history, but not yet enough of it.
    assert f"{len(seeded)} finished run(s) so far" in log, relevant(log)

    # provision: lease first, then the instance, tagged with it, and a JIT runner for this run only.
    assert record.lease_id and record.instance_id and record.provider == "ec2"
    kinds = [e.kind for e in aws.ledger().events(run_id)]
    assert kinds.index("lease.recorded") < kinds.index("runner.registered") < kinds.index("machine.provisioned")
    (instance,) = instances(aws, run_id)
    tags = {t["Key"]: t["Value"] for t in instance["Tags"]}
    assert tags["gpuline:lease-id"] == record.lease_id and instance["InstanceId"] == record.instance_id
    jit_calls = [r for r in github.requests if r.path.endswith("/actions/runners/generate-jitconfig")]
    assert [r.path for r in jit_calls] == [f"/repos/{REPO}/actions/runners/generate-jitconfig"]
    assert jit_calls[0].body["name"] == label and jit_calls[0].body["labels"] == [label]
    assert jit_calls[0].headers["authorization"] == f"token {RUNNER_TOKEN}"
    assert record.runner_label == label

    # provision's runs-on output, and the train job ran on exactly those labels.
    assert [json.loads(v) for v in outputs(log, "runs-on")][-1] == ["self-hosted", label]
    runs_on = evaluated_runs_on(log, "train")
    assert runs_on == ["self-hosted", label], runs_on
    assert job_result(log, "train") == "succeeded"
    print(f"train job ran with runs-on {runs_on}")

    # The instance's boot script starts that runner with exactly the config GitHub returned.
    root, calls = boot(user_data(aws, record.instance_id), tmp_path / "instance")
    assert (root / "runner-jit-config").read_text() == github.jit_configs[label]
    assert any(c.startswith("runuser -u runner -w ACTIONS_RUNNER_INPUT_JITCONFIG") for c in calls), calls
    assert github.jit_configs[label] not in "\n".join(calls)  # never on a command line
    assert calls[-1].startswith("poweroff"), calls  # single use: the machine ends with its runner

    # Training wrote its checkpoints to S3.
    keys = [o["Key"] for o in aws.s3().list_objects_v2(Bucket=BUCKET).get("Contents", [])]
    checkpoints = [k for k in keys if run_id in k and "/checkpoints/" in k]
    assert checkpoints, keys
    print(f"checkpoints in s3://{BUCKET}: {len(checkpoints)} objects, e.g. {checkpoints[0]}")
    assert record.checkpoints and all(c.uri.startswith(f"s3://{BUCKET}/") for c in record.checkpoints)

    # Eval gate and promotion, into the shared registry.
    assert "gpuline eval gate: pass" in log, relevant(log)
    assert record.promoted_stage == "staging" and record.promoted_version

    # Teardown: instance terminated, runner registration deleted, reservation settled.
    (instance,) = instances(aws, run_id)
    assert instance["State"]["Name"] == "terminated"
    assert github.runners.get(REPO, {}) == {}
    assert any(r.method == "DELETE" and "/actions/runners/" in r.path for r in github.requests)
    assert record.status == "succeeded" and record.times.released is not None
    assert record.actual_usd is not None and record.actual_usd > 0
    (reservation,) = [r for r in aws.ledger().reservations() if r.run_id == run_id]
    assert reservation.state == "settled"
    # A workflow_dispatch run is about no pull request, so no comment: the teardown job's summary
    # carries the actual cost (act logs each job summary).
    torn_down = summary(log, f"### gpuline teardown ({run_id})")
    assert f"${record.actual_usd:.2f} actual" in torn_down and "settled" in torn_down, torn_down
    assert f"registration {label} deleted" in torn_down, torn_down
    assert not github.comments
    print(f"teardown: {' '.join(torn_down.split())}")
    assert github.violations == []


# ---------------------------------------------------------------- b. release


def test_release_learns_from_the_shared_ledger_trains_a_new_run_and_promotes_to_production(
    aws: Consumer, github: FakeGitHub, cancelled_nightly: Cancelled
) -> None:
    # cancelled_nightly (test c's) runs beside this release run: independent workflow runs.
    from gpuline.registry import open_registry

    registry = open_registry(aws.registry, aws.repo)
    staged = registry.in_stage("digits-mlp", "staging")
    nightly_runs = [r for r in aws.ledger().list_runs(model="digits-mlp") if r.tier == "nightly"]
    result = aws.run("release.yml", github)
    assert result.returncode == 0, relevant(result.log)
    # act has no environments: its Job model has no `environment` key at all, so the production
    # environment's reviewers are never waited for and promote runs at once.
    assert_jobs(
        result,
        {
            "preflight and cost estimate": "succeeded",
            "provision GPU": "succeeded",
            "train": "succeeded",
            "eval gate": "succeeded",
            "promote to production": "succeeded",
            "check production after promotion": "succeeded",
            "teardown (always)": "succeeded",
        },
    )
    assert job_result(result.log, "roll production back") is None  # skipped: the check passed
    log = result.log
    run_id = run_id_of(log)
    record = aws.ledger().get_run(run_id)
    print(f"release run {run_id}: {record.status}; nightly runs in the ledger: {len(nightly_runs)}")

    # A new run of the release tier, in a run of its own: nothing carried but the shared backends.
    assert record.tier == "release" and run_id not in {r.run_id for r in nightly_runs}
    # The estimate is from history, the shared ledger's finished runs of this config: with the
    # nightly run of the test before it there are 3, the fewest history needs.
    assert set(outputs(log, "duration-basis")) == {"history"}, relevant(log)
    assert "from the last 3 finished runs of this config" in log, relevant(log)
    # It trained from scratch: resumed from nothing, every checkpoint its own.
    assert set(outputs(log, "resumed-from")) == {""} and set(outputs(log, "final-step")) == {"300"}
    assert record.checkpoints and all(f"/{run_id}/" in c.uri for c in record.checkpoints)

    # Production, in the registry every run shares; the version nightly put in staging is still there.
    production = registry.in_stage("digits-mlp", "production")
    assert production is not None and production.run_id == run_id
    assert staged is not None and production.version == staged.version + 1
    assert f"production holds version {production.version} and passed its check" in log
    # eval.command ran in the gate job (on the candidate; nothing was in production yet) and again
    # on the version fetched back from the registry by the check after promotion.
    assert "Baseline: none yet" in summary(log, "### :white_check_mark: gpuline eval gate: pass"), relevant(log)
    assert f"digits-mlp v{production.version} in production passes its check" in log, relevant(log)
    assert "evaluated again by eval.command: gates pass" in log
    # The deploy hook ran with the promoted version, recorded as a deployment of the commit.
    assert f"serving digits-mlp v{production.version}" in log
    (deployment,) = [d for d in github.deployments[REPO].values() if d["payload"]["version"] == production.version]
    assert deployment["environment"] == "production"
    assert [s["state"] for s in github.statuses[deployment["id"]]] == ["in_progress", "success"]
    print(f"production: digits-mlp v{production.version} (staging keeps v{staged.version})")

    (instance,) = instances(aws, run_id)
    assert instance["State"]["Name"] == "terminated"
    assert github.runners.get(REPO, {}) == {} and github.jit_configs.keys() == {f"gpuline-{run_id}"}
    assert [r.state for r in aws.ledger().reservations() if r.run_id == run_id] == ["settled"]
    assert github.violations == []


# ---------------------------------------------------------------- d. a second release whose check fails


def damage_when_deployed(consumer: Consumer, github: FakeGitHub) -> list[str]:
    """Once a deployment is marked successful, overwrite its model's weights in S3: the store losing
    or altering a version after promotion, which the check after promotion must catch.

    The deployment status is the moment promote has finished, so the damage is in place before the
    check job starts, whatever the machine's speed."""
    damaged: list[str] = []
    create_status = github._create_status

    def hook(request: Any, body: Any, repo: str, deployment_id: str) -> Any:
        response = create_status(request, body, repo, deployment_id)
        if body.get("state") == "success" and not damaged:
            uri = github.deployments[repo][int(deployment_id)]["payload"]["artifacts_uri"]
            key = uri.removeprefix(f"s3://{BUCKET}/") + "/model.pt"
            consumer.s3().put_object(Bucket=BUCKET, Key=key, Body=b"not the model that was registered")
            damaged.append(key)
        return response

    github._create_status = hook  # type: ignore[method-assign]
    return damaged


def test_a_second_release_is_gated_against_the_first_and_rolled_back_when_its_check_fails(
    aws: Consumer, github: FakeGitHub
) -> None:
    from gpuline.registry import open_registry

    registry = open_registry(aws.registry, aws.repo)
    first = registry.in_stage("digits-mlp", "production")
    assert first is not None, "the first release promoted nothing"
    damaged = damage_when_deployed(aws, github)
    result = aws.run("release.yml", github)
    assert result.returncode != 0, "the rollback job fails the workflow run, saying why"
    assert_jobs(
        result,
        {
            "eval gate": "succeeded",
            "promote to production": "succeeded",
            "check production after promotion": "failed",
            "roll production back": "failed",
            "teardown (always)": "succeeded",
        },
    )
    log = result.log
    run_id = run_id_of(log)
    # Gated against the first release's production version, both evaluated in the gate job.
    gate = summary(log, "### :white_check_mark: gpuline eval gate: pass")
    assert f"Baseline: v{first.version} (production; evaluated in this job)" in gate, relevant(log)
    # Promoted as v+1 and deployed, then its stored weights were damaged: the check caught it.
    assert damaged and f"/{run_id}/model/model.pt" in damaged[0]
    assert "model.pt does not match its recorded sha256" in log, relevant(log)
    assert "production failed its check after promotion and was rolled back" in log
    # Production is the first release's version again, in the registry every run shares.
    now = registry.in_stage("digits-mlp", "production")
    assert now is not None and now.version == first.version
    record = aws.ledger().get_run(run_id)
    assert (record.status, record.stage, record.promoted_version) == ("refused", "verify", first.version + 1)

    # `gpuline models` shows the history with who moved production and why.
    shown = subprocess.run(
        [sys.executable, "-m", "gpuline.cli", "models", "digits-mlp", "--json"],
        cwd=aws.repo,
        env={**os.environ, **aws.host_env, "GPULINE_REGISTRY": aws.registry},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    (model,) = json.loads(shown.stdout)["models"]
    back, promoted = model["history"][:2]
    assert (back["action"], back["version"], back["previous"]) == ("rollback", first.version, first.version + 1)
    assert back["reason"] == "production failed its check after promotion" and back["actor"]
    assert back["run_id"] == run_id
    assert (promoted["action"], promoted["version"], promoted["run_id"]) == ("promote", first.version + 1, run_id)
    assert promoted["reason"].startswith("gates passed:") and promoted["actor"] == back["actor"]
    print(f"second release {run_id}: v{first.version + 1} promoted, check failed, production back at v{first.version}")
    print(f"history: {[(c['action'], c['version'], c['actor']) for c in model['history'][:3]]}")
    assert github.violations == []


# ---------------------------------------------------------------- c. a cancelled nightly, then the reaper


def age_instance(instance_id: str, by: timedelta) -> None:
    """Time passes for the instance: moto (in this process) dates its launch ``by`` earlier, so the
    reaper's next hourly run finds it past the boot grace period."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.ec2.models import ec2_backends

    instance = ec2_backends[DEFAULT_ACCOUNT_ID][REGION].get_instance(instance_id)
    instance.launch_time = instance.launch_time - by


def test_a_nightly_stopped_after_provision_is_reaped_by_the_reaper_tier(
    aws: Consumer, cancelled_nightly: Cancelled
) -> None:
    github = cancelled_nightly.github
    stopped = cancelled_nightly.wait()
    report("nightly.yml (ended after provision)", stopped.log)
    assert job_result(stopped.log, "provision GPU") == "succeeded", relevant(stopped.log)
    assert stopped.returncode != 0
    assert job_result(stopped.log, "teardown (always)") is None, "teardown ran: nothing was left behind"
    run_id = run_id_of(stopped.log)
    record = aws.ledger().get_run(run_id)
    (instance,) = instances(aws, run_id)
    assert instance["State"]["Name"] in ("pending", "running")
    reservation = next(r for r in aws.ledger().reservations() if r.run_id == run_id)
    assert reservation.state == "held" and record.times.released is None
    assert [r["name"] for r in github.runners[REPO].values()] == [f"gpuline-{run_id}"]
    print(f"cancelled run {run_id}: instance {instance['InstanceId']} {instance['State']['Name']}, quota held")

    # Later, the hourly reaper: the machine is past its boot grace period by now, and GitHub
    # reports the cancelled workflow run as completed.
    age_instance(instance["InstanceId"], timedelta(minutes=15))
    holder = next(e.data["holder"] for e in aws.ledger().events(run_id) if e.kind == "lease.recorded")
    github.finish_workflow_run(holder["workflow"]["repo"], int(holder["workflow"]["run_id"]), "cancelled")
    result = aws.run("reaper.yml", github)
    assert result.returncode == 0, relevant(result.log)
    assert_jobs(result, {"reap leaked machines and reservations": "succeeded"})
    reaped = summary(result.log, "### gpuline reap")
    print(f"reaper: {' '.join(reaped.split())}")

    (instance,) = instances(aws, run_id)
    assert instance["State"]["Name"] == "terminated"
    record = aws.ledger().get_run(run_id)
    assert record.times.released is not None
    assert not [lease for lease in aws.ledger().leases(active_only=True) if lease.run_id == run_id]
    assert [r.state for r in aws.ledger().reservations() if r.run_id == run_id] != ["held"]
    assert github.runners.get(REPO, {}) == {}  # its JIT runner never ran; the reaper deleted it
    assert github.violations == []


def test_zz_timings(capsys: pytest.CaptureFixture[str]) -> None:
    """Not a check: how long each workflow run took (the whole module must stay under 4 minutes)."""
    with capsys.disabled():
        print("\n" + "; ".join(f"{name} {seconds:.0f} s" for name, seconds in TIMINGS.items()))
