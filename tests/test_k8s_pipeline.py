"""The nightly tier trained on the cluster, as a user runs it: `gpuline run --tier nightly` with
``provider: kubernetes`` (train mode) in a project of its own, the kmock emulator as the API server
(``KUBECONFIG``), moto as S3, and the test kubelet in the background running the Job gpuline creates.

The pod runs the entrypoint under the supervisor and publishes to S3; `gpuline train` follows the
Job with a watch, reads what the pod published into the run record, the gate judges the pod's
metrics, the version is promoted, and teardown deletes the Job. Nothing here waits on the clock: the
kubelet acts on the emulator's watch events and the CLI returns when the run is done."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from conftest import write_project
from gpuline import contract
from gpuline.ledger.sqlite import SqliteLedger
from gpuline.providers import k8s_follow
from gpuline.providers.kubernetes import KubernetesProvider
from gpuline.storage import open_storage
from gpuline.training import remote
from gpuline.training.request import TrainOutcome
from kubelet import KubeletDaemon
from servers import FAKE_CREDENTIALS, aws_env, moto_server  # noqa: F401
from test_k8s_pod_contract import TRAINER

if TYPE_CHECKING:
    from fixtures_k8s import K8sEmulator
    from servers import MotoServer

IMAGE = "registry.example/train:1"
BUCKET = "cluster"
STORAGE = f"s3://{BUCKET}/artifacts"
README = Path(__file__).resolve().parents[1] / "docs" / "training.md"


def readme_trainer() -> str:
    """The framework-free trainer of docs/training.md, as a user copies it."""
    section = README.read_text().split("<!-- section:training -->")[1].split("<!-- /section:training -->")[0]
    return next(b for b in re.findall(r"```python\n(.*?)```", section, flags=re.S) if "GPULINE_CHECKPOINT_DIR" in b)


def cluster_project(root: Path, max_loss: str = "1.5", trainer: str | None = None) -> Path:
    config = write_project(
        root,
        train_py=trainer or readme_trainer(),
        spec_extra=f"  image: {IMAGE}\n"
        f"eval:\n  gates:\n    - {{metric: loss, goal: minimize, max: {max_loss}}}\n"
        "checkpoint: {interval_steps: 4, keep: 3, max_restarts: 1}\n"
        f"backends: {{storage: '{STORAGE}'}}\n",
    )
    text = config.read_text().replace("provider: local", "provider: kubernetes")
    config.write_text(text.replace("gpu_type: cpu", "gpu_type: t4"))
    return config


@pytest.fixture
def bucket(request: pytest.FixtureRequest) -> MotoServer:
    import boto3

    server: MotoServer = request.getfixturevalue("aws_env")
    boto3.client("s3", endpoint_url=str(server)).create_bucket(Bucket=BUCKET)
    return server


def kubelet(k8s: K8sEmulator, project: Path, root: Path, **node_env: str) -> KubeletDaemon:
    from kubernetes import config

    api = config.new_client_from_config(config_file=str(k8s.kubeconfig))
    aws = {k: os.environ[k] for k in (*FAKE_CREDENTIALS, "AWS_ENDPOINT_URL")}
    node = {**aws, contract.IMDS_ENDPOINT: "off", **node_env}
    return KubeletDaemon(api, images={IMAGE: project}, root=root, node_env=node)


def gpuline(project: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    done = subprocess.run(
        [sys.executable, "-m", "gpuline.cli", *args, "--json"],
        cwd=project, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    return done.returncode, json.loads(done.stdout), done.stderr


@pytest.mark.integration
@pytest.mark.slow
def test_the_nightly_tier_trains_on_the_cluster_and_promotes_what_the_pod_trained(
    tmp_path: Path, k8s: K8sEmulator, bucket: MotoServer
) -> None:
    project = cluster_project(tmp_path / "proj").parent
    with kubelet(k8s, project, tmp_path / "node") as node:
        code, body, err = gpuline(project, "run", "--tier", "nightly")
    assert code == 0, err
    assert not node.errors
    (job_name,) = node.kubelets
    assert node.kubelets[job_name].result == "Complete"
    assert node.kubelets[job_name].exit_codes == [0]
    assert (body["version"], body["stage"]) == (1, "staging")
    run_id = body["run_id"]

    # Checkpoints landed in S3, committed by the pod; the run record lists them as a local train does.
    storage = open_storage(STORAGE, tmp_path)
    assert [c["step"] for c in body["train"]["checkpoints"]] == [4, 8, 10]
    for checkpoint in body["train"]["checkpoints"]:
        assert checkpoint["uri"].startswith(f"{STORAGE}/runs/{run_id}/checkpoints/")
    assert storage.exists(f"runs/{run_id}/checkpoints/step-00000010/manifest.json")

    record = SqliteLedger(project / ".gpuline" / "ledger.db").get_run(run_id)
    # The gate judged the pod's own metrics (its eval.json in S3), and the model the pod uploaded is promoted.
    pod_eval = json.loads(storage.get_bytes(f"runs/{run_id}/eval.json"))
    assert record.metrics == pod_eval
    (verdict,) = record.gates
    assert verdict.passed and verdict.value == pod_eval["loss"]
    outcome = json.loads(storage.get_bytes(f"runs/{run_id}/outcome.json"))
    assert record.model_sha256 == outcome["model_sha256"] != ""
    assert (record.promoted_version, record.promoted_stage) == (1, "staging")

    # The pod's times and the GPU time they make; teardown deleted the Job.
    times = record.times
    assert times.pod_running is not None and times.pod_finished is not None
    assert times.provisioned is not None and times.released is not None
    assert times.provisioned <= times.pod_running < times.pod_finished <= times.released
    assert record.pod_seconds > 0 and record.gpu_seconds == pytest.approx(record.pod_seconds, abs=1e-3)  # one T4
    assert (record.preemptions, record.restarts, record.status) == (0, 0, "succeeded")
    assert body["teardown"]["status"] == "succeeded"
    assert [j for j in k8s.objects("jobs") if j["metadata"]["name"] == job_name] == []


def live_jobs(k8s: K8sEmulator) -> list[str]:
    return [j["metadata"]["name"] for j in k8s.objects("jobs")]


@pytest.mark.integration
@pytest.mark.slow
def test_a_crash_in_the_pod_fails_train_in_one_line_and_is_not_retried(
    tmp_path: Path, k8s: K8sEmulator, bucket: MotoServer
) -> None:
    # The trainer of the pod-contract tests: it crashes at step 3 when the node tells it to.
    project = cluster_project(tmp_path / "proj", trainer=TRAINER).parent
    with kubelet(k8s, project, tmp_path / "node", TEST_CRASH_AT_STEP="3") as node:
        code, prov, err = gpuline(project, "provision")
        assert code == 0, err
        code, body, err = gpuline(project, "train", "--run-id", prov["run_id"])
        torn, _, _ = gpuline(project, "teardown", "--run-id", prov["run_id"])
    assert code == 3, err
    assert "the training script failed in the pod" in body["error"] and "not retried" in body["error"]
    assert "\n" not in body["error"]
    (job,) = node.kubelets.values()
    assert (job.result, job.exit_codes) == ("Failed", [contract.POD_EXIT_TRAINER_FAILED])
    assert torn == 0 and live_jobs(k8s) == []


@pytest.mark.integration
@pytest.mark.slow
def test_sigterm_to_train_deletes_the_job_and_its_pod_saves_before_it_stops(
    tmp_path: Path, k8s: K8sEmulator, bucket: MotoServer
) -> None:
    project = cluster_project(tmp_path / "proj", trainer=TRAINER).parent
    with kubelet(k8s, project, tmp_path / "node", TEST_HOLD_AT_STEP="5") as node:
        code, prov, err = gpuline(project, "provision")
        assert code == 0, err
        run_id = prov["run_id"]
        train = subprocess.Popen(
            [sys.executable, "-m", "gpuline.cli", "train", "--run-id", run_id, "--json"],
            cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert train.stderr is not None
        for line in train.stderr:  # said once its stop handler is in place
            if "training on the cluster: following" in line:
                break
        node.wait_for_pod().wait_for_line("holding at step 5")
        train.send_signal(signal.SIGTERM)
        out, err = train.communicate(timeout=120)
        assert train.returncode == 3, err
        assert "stopped by SIGTERM" in json.loads(out)["error"]
        torn, _, err = gpuline(project, "teardown", "--run-id", run_id)
    assert torn == 0, err
    assert live_jobs(k8s) == []
    (job,) = node.kubelets.values()
    assert job.deleted and job.pods[0].wait() == contract.POD_EXIT_STOPPED
    # Deleting the Job stopped the pod the way an eviction does: it saved where it was.
    outcome = json.loads(open_storage(STORAGE, tmp_path).get_bytes(f"runs/{run_id}/outcome.json"))
    assert (outcome["stop_reason"], outcome["checkpoints"][-1]["step"]) == ("preempted", 5)


# ---------------------------------------------------------------- the follower on its own


class CountingJobs:
    """The Jobs API, counting the lists that start each list-then-watch turn (a watch is a list with watch=True)."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.lists = 0
        self.changed = threading.Condition()

    def list_namespaced_job(self, *args: Any, **kwargs: Any) -> Any:
        if not kwargs.get("watch"):
            with self.changed:
                self.lists += 1
                self.changed.notify_all()
        return self.real.list_namespaced_job(*args, **kwargs)


@pytest.mark.integration
def test_the_follower_reconnects_when_its_watch_expires_and_sees_the_job_end(
    tmp_path: Path, k8s: K8sEmulator, bucket: MotoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_k8s_pod_contract import kubelet_for, lease

    # The emulator never ends a watch by itself: a one-second read timeout stands in for the server's.
    monkeypatch.setattr(k8s_follow, "WATCH_S", 0)
    monkeypatch.setattr(k8s_follow, "READ_SLACK_S", 1)
    config = cluster_project(tmp_path / "proj", trainer=TRAINER)
    provider = KubernetesProvider(config.parent, {})
    request = lease(config, "run-20260101-000000-follow")
    job = kubelet_for(provider, request, k8s, tmp_path / "node")
    jobs = CountingJobs(provider.batch_api())
    monkeypatch.setattr(provider, "batch_api", lambda: jobs)
    followed: list[k8s_follow.Followed] = []
    lines: list[str] = []
    instance = f"job/default/{job.job['metadata']['name']}"
    follower = threading.Thread(target=lambda: followed.append(provider.follow(instance, lines.append)))
    follower.start()
    with jobs.changed:  # the first watch expired and the follower listed again before the pod runs
        assert jobs.changed.wait_for(lambda: jobs.lists >= 2, 60)
    assert job.run() == "Complete"
    follower.join(60)
    (result,) = followed
    assert (result.end, result.reason, result.preemptions, result.restarts) == ("Complete", "Completed", 0, 0)
    (pod,) = result.pods
    assert (pod.exit_code, pod.index) == (0, 0) and result.pod_seconds > 0
    assert result.first_running == pod.started and result.finished == pod.finished


def ended(end: str, reason: str, *codes: int, disrupted: int = 0) -> k8s_follow.Followed:
    pods = [
        k8s_follow.PodRun(name=f"p-{i}", index=0, exit_code=c, disrupted=i < disrupted) for i, c in enumerate(codes)
    ]
    return k8s_follow.Followed(end=end, reason=reason, pods=pods)  # type: ignore[arg-type]


def published(stop: str, code: int) -> remote.ClusterOutcome:
    outcome = TrainOutcome(
        exit_code=code, resumed_from_step=None, final_step=3, checkpoints=[], eval_metrics={}, loss_curve=[],
        preemptions=0, restarts=0, first_step_at=None, last_step_at=None, output_dir=Path("."),
        stop_reason=stop,  # type: ignore[arg-type]
    )  # fmt: skip
    return remote.ClusterOutcome(outcome, "", published=True)


def test_a_failed_job_says_in_one_line_what_failed_it() -> None:
    def why(result: remote.ClusterOutcome, followed: k8s_follow.Followed) -> str:
        error = remote.failure(result, followed, "run-1", max_restarts=1)
        assert error is not None and "\n" not in error.one_line()
        return error.message

    crash = why(published("failed", 1), ended("Failed", "PodFailurePolicy", contract.POD_EXIT_TRAINER_FAILED))
    assert "the training script failed in the pod at step 3" in crash and "not retried" in crash
    stopped = contract.POD_EXIT_STOPPED
    preempted = why(
        published("preempted", stopped), ended("Failed", "BackoffLimitExceeded", stopped, stopped, disrupted=2)
    )
    assert "preempted 2 times, more than checkpoint.max_restarts (1)" in preempted
    late = why(published("max_duration", 124), ended("Failed", "PodFailurePolicy", contract.POD_EXIT_OUT_OF_TIME))
    assert "hit max_duration at step 3" in late
    assert remote.failure(published("completed", 0), ended("Complete", "Completed", 0), "run-1", 1) is None


def test_a_pod_replaced_after_a_disruption_is_a_preemption_and_any_other_replacement_a_restart() -> None:
    evicted = ended("Complete", "Completed", contract.POD_EXIT_STOPPED, 0, disrupted=1)
    assert (evicted.preemptions, evicted.restarts, evicted.last_exit_code()) == (1, 0, 0)
    retried = ended("Complete", "Completed", contract.POD_EXIT_INFRA, 0)
    assert (retried.preemptions, retried.restarts) == (0, 1)
