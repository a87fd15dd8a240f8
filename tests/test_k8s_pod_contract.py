"""The training contract inside a Kubernetes pod: the Job gpuline creates (read back from the kmock
emulator) is run by the test kubelet with the pod's own command and environment, so the in-pod
supervisor really checkpoints to S3 (moto on 127.0.0.1), is evicted, resumes in the pod the Job
controller recreates, and fails the Job at once when the user's script crashes.

Nothing waits on the clock: the trainer holds at a step until it is told to stop, and the tests act
on the pod's log lines and the supervisor's events."""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from conftest import write_project
from gpuline import contract
from gpuline.providers.base import TAG_EXPIRES_AT, TAG_LEASE_ID, TAG_MANAGED, TAG_RUN_ID, LeaseRequest
from gpuline.providers.k8s_manifests import KubernetesOptions, build_manifests
from gpuline.providers.k8s_pod import DEFAULT_GRACE_S, STATE_MOUNT, grace_seconds
from gpuline.providers.kubernetes import KubernetesProvider
from gpuline.runs import utcnow
from gpuline.spec import load_spec
from gpuline.storage import open_storage
from kubelet import Pod, TestKubelet
from servers import FAKE_CREDENTIALS, aws_env, moto_server  # noqa: F401

if TYPE_CHECKING:
    from fixtures_k8s import K8sEmulator
    from servers import MotoServer

pytest_plugins = ["fixtures_k8s"]

IMAGE = "registry.example/train:1"
BUCKET = "pods"
STORAGE = f"s3://{BUCKET}/artifacts"
K8S_VERSION = "1.30"

# The framework-free trainer of docs/training.md, plus two hooks the tests set through the node's
# environment: hold at a step until SIGTERM (first pod only), or crash at a step.
TRAINER = """
import json, os, signal, sys, time
from pathlib import Path


def main():
    env, hp = os.environ, json.loads(os.environ["GPULINE_HPARAMS"])
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    step, w = 0, 0.0
    if env.get("GPULINE_RESUME_FROM"):
        state = json.loads(Path(env["GPULINE_RESUME_FROM"], "state.json").read_text())
        step, w = state["step"], state["w"]

    def save(step):
        path = Path(env["GPULINE_CHECKPOINT_DIR"], f"step-{step:08d}")
        path.mkdir(parents=True, exist_ok=True)
        (path / "state.json").write_text(json.dumps({"step": step, "w": w}))

    hold = int(env.get("TEST_HOLD_AT_STEP", "0")) if not env.get("GPULINE_RESUME_FROM") else 0
    crash = int(env.get("TEST_CRASH_AT_STEP", "0"))
    with open(env["GPULINE_METRICS_PATH"], "a") as metrics:
        while step < hp["steps"]:
            if stop:
                save(step)
                sys.exit(143)
            step, w = step + 1, w + 0.1 * (3.0 - w)
            metrics.write(json.dumps({"step": step, "loss": (3.0 - w) ** 2}) + "\\n")
            metrics.flush()
            if step == crash:
                raise RuntimeError(f"user bug at step {step}")
            if step % int(env["GPULINE_CHECKPOINT_INTERVAL"]) == 0:
                save(step)
            if step == hold:
                print(f"holding at step {step}", flush=True)
                while not stop:
                    time.sleep(0.02)  # a poll for the signal's flag, not a margin
    save(step)
    Path(env["GPULINE_OUTPUT_DIR"], "model.json").write_text(json.dumps({"w": w}))
    Path(env["GPULINE_EVAL_PATH"]).write_text(json.dumps({"loss": (3.0 - w) ** 2}))


if __name__ == "__main__":
    main()
"""


def project(root: Path, *, max_restarts: int = 2) -> Path:
    return write_project(
        root,
        train_py=TRAINER,
        spec_extra=f"  image: {IMAGE}\n"
        f"checkpoint: {{interval_steps: 2, keep: 2, max_restarts: {max_restarts}}}\n"
        f"backends: {{storage: '{STORAGE}'}}\n",
    )


def lease(config: Path, run_id: str) -> LeaseRequest:
    spec = load_spec(config)
    expires = utcnow() + timedelta(seconds=1800)
    lease_id = "lease-" + run_id[-12:]
    return LeaseRequest(
        run_id=run_id,
        lease_id=lease_id,
        spec=spec,
        instance_type="cpu",
        lane="spot",
        region="",
        ttl_seconds=1800,
        expires_at=expires,
        tags={
            TAG_RUN_ID: run_id,
            TAG_LEASE_ID: lease_id,
            TAG_EXPIRES_AT: expires.isoformat(timespec="seconds"),
            TAG_MANAGED: "true",
        },
        project_dir=config.parent,
    )


def validate(manifest: dict[str, Any]) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)


@pytest.fixture
def bucket(request: pytest.FixtureRequest) -> MotoServer:
    """An empty moto S3 with the pods' bucket; boto3 here and in the pods points at it."""
    import boto3

    server: MotoServer = request.getfixturevalue("aws_env")
    boto3.client("s3", endpoint_url=str(server)).create_bucket(Bucket=BUCKET)
    return server


def kubelet_for(
    provider: KubernetesProvider, request: LeaseRequest, k8s: K8sEmulator, root: Path, **node_env: str
) -> TestKubelet:
    """Provision through the provider, then run the Job exactly as the emulator stored it."""
    provider.provision(request)
    (job,) = [j for j in k8s.objects("jobs") if j["metadata"]["labels"]["gpuline/run-id"] == request.run_id]
    aws = {k: os.environ[k] for k in (*FAKE_CREDENTIALS, "AWS_ENDPOINT_URL")}
    env = {**aws, contract.IMDS_ENDPOINT: "off", **node_env}
    return TestKubelet(job, images={IMAGE: request.project_dir}, root=root, node_env=env, api=provider.api)


def stored(run_id: str, key: str, base: Path) -> bytes:
    return open_storage(STORAGE, base).get_bytes(f"runs/{run_id}/{key}")


# ---------------------------------------------------------------- the manifest (offline)


def test_a_train_pod_runs_the_entrypoint_under_the_supervisor_with_the_run_contract(tmp_path: Path) -> None:
    request = lease(project(tmp_path / "p"), "run-20260101-000000-aaaaaa")
    (job,) = build_manifests(request, KubernetesOptions(), created_at="x")
    validate(job)
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["python", "-m", "gpuline.training.in_pod", "--", "python", "train.py"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env[contract.STORAGE] == STORAGE
    assert env[contract.RUN_ID] == request.run_id
    assert (env[contract.CHECKPOINT_INTERVAL], env[contract.CHECKPOINT_KEEP]) == ("2", "2")
    assert env[contract.MAX_DURATION_S] == "600"
    assert env[contract.DATASET_URI] == "data.bin" and len(env[contract.DATASET_SHA256]) == 64
    assert json.loads(env[contract.HPARAMS]) == {"steps": 10}
    # The supervisor's state is on an emptyDir: a replacement pod starts clean and resumes from S3.
    assert env[contract.POD_WORKDIR] == STATE_MOUNT
    assert {"name": "gpuline-state", "mountPath": STATE_MOUNT} in container["volumeMounts"]
    assert pod["terminationGracePeriodSeconds"] == DEFAULT_GRACE_S == int(env[contract.GRACE_S])
    assert pod["restartPolicy"] == "Never"  # what podFailurePolicy requires


def test_the_failure_policy_retries_a_disrupted_pod_and_fails_the_job_on_the_users_crash(tmp_path: Path) -> None:
    request = lease(project(tmp_path / "p", max_restarts=3), "run-20260101-000000-bbbbbb")
    (job,) = build_manifests(request, KubernetesOptions(), created_at="x")
    spec = job["spec"]
    assert spec["backoffLimit"] == 3
    disrupted, crashed = spec["podFailurePolicy"]["rules"]
    assert disrupted == {"action": "Count", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    assert crashed["action"] == "FailJob"
    assert crashed["onExitCodes"]["containerName"] == spec["template"]["spec"]["containers"][0]["name"]
    assert contract.POD_EXIT_TRAINER_FAILED in crashed["onExitCodes"]["values"]
    assert contract.POD_EXIT_STOPPED not in crashed["onExitCodes"]["values"]
    assert contract.POD_EXIT_INFRA not in crashed["onExitCodes"]["values"]
    (always,) = build_manifests(request, KubernetesOptions(retry_preemptions="always"), created_at="x")
    validate(always)
    assert always["spec"]["podFailurePolicy"]["rules"][0]["action"] == "Ignore"


def test_the_grace_period_comes_from_the_option_or_the_measured_save() -> None:
    assert grace_seconds(KubernetesOptions()) == 120
    assert grace_seconds(KubernetesOptions(checkpoint_save_s=40.2)) == 91
    assert grace_seconds(KubernetesOptions(checkpoint_save_s=1)) == 30
    assert grace_seconds(KubernetesOptions(termination_grace_s=600, checkpoint_save_s=1)) == 600


def test_a_storage_path_relative_to_the_project_is_made_absolute_for_the_pods(tmp_path: Path) -> None:
    request = lease(project(tmp_path / "p"), "run-20260101-000000-cccccc")

    def storage_env(options: KubernetesOptions) -> str:
        (job,) = build_manifests(request, options, created_at="x")
        env = {e["name"]: e["value"] for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
        return env[contract.STORAGE]

    request.spec.backends.storage = "file://.gpuline/artifacts"
    assert storage_env(KubernetesOptions()) == f"file://{(tmp_path / 'p').resolve()}/.gpuline/artifacts"
    assert storage_env(KubernetesOptions(storage="file:///shared/runs")) == "file:///shared/runs"


# ---------------------------------------------------------------- pods run by the test kubelet


@pytest.mark.integration
@pytest.mark.slow
def test_an_evicted_pod_saves_and_its_replacement_resumes_to_bit_identical_weights(
    tmp_path: Path, k8s: K8sEmulator, bucket: MotoServer
) -> None:
    config = project(tmp_path / "p")
    provider = KubernetesProvider(config.parent, {})
    plain = kubelet_for(provider, lease(config, "run-20260101-000000-plain0"), k8s, tmp_path / "a")
    assert plain.run() == "Complete"
    assert plain.exit_codes == [0]

    evicted = kubelet_for(
        provider, lease(config, "run-20260101-000000-evict0"), k8s, tmp_path / "b", TEST_HOLD_AT_STEP="5"
    )

    def evict_the_first(pod: Pod) -> None:
        if len(evicted.pods) == 1:
            pod.wait_for_line("holding at step 5")  # step 4 committed, step 5 trained, nothing saved since
            assert evicted.evict(pod) == contract.POD_EXIT_STOPPED

    assert evicted.run(on_start=evict_the_first) == "Complete"
    first, second = evicted.pods
    assert evicted.exit_codes == [143, 0] and evicted.failed == 1  # counted: max_restarts bounds preemptions
    assert first.wait_for_event("preemption")["source"] == "sigterm"
    assert first.wait_for_event("checkpoint", step=5)["uri"].startswith(f"{STORAGE}/runs/")
    assert second.wait_for_event("resume")["step"] == 5
    assert not any(e["event"] == "fresh_start" for e in second.events)

    base = tmp_path
    model = "model/model.json"
    assert stored("run-20260101-000000-evict0", model, base) == stored("run-20260101-000000-plain0", model, base)
    outcome = json.loads(stored("run-20260101-000000-evict0", "outcome.json", base))
    assert (outcome["stop_reason"], outcome["resumed_from_step"], outcome["final_step"]) == ("completed", 5, 10)
    assert outcome["model_sha256"]
    assert outcome["eval_metrics"] == json.loads(stored("run-20260101-000000-plain0", "eval.json", base))
    steps = [
        json.loads(line)["step"] for line in stored("run-20260101-000000-evict0", "metrics.jsonl", base).splitlines()
    ]
    assert sorted(set(steps)) == list(range(1, 11))  # the first pod's curve is carried into the second's
    assert json.loads(stored("run-20260101-000000-evict0", "eval.json", base)) == outcome["eval_metrics"]
    (job,) = [j for j in k8s.objects("jobs") if j["metadata"]["name"] == evicted.job["metadata"]["name"]]
    assert job["status"]["conditions"][0]["type"] == "Complete"


@pytest.mark.integration
@pytest.mark.slow
def test_a_crashing_user_script_fails_the_job_without_a_retry(
    tmp_path: Path, k8s: K8sEmulator, bucket: MotoServer
) -> None:
    config = project(tmp_path / "p", max_restarts=3)
    provider = KubernetesProvider(config.parent, {})
    request = lease(config, "run-20260101-000000-crash0")
    kubelet = kubelet_for(provider, request, k8s, tmp_path / "k", TEST_CRASH_AT_STEP="3")
    assert kubelet.run() == "Failed"
    assert kubelet.reason == "PodFailurePolicy"
    assert kubelet.exit_codes == [contract.POD_EXIT_TRAINER_FAILED]  # one pod, though backoffLimit is 3
    assert any("user bug at step 3" in line for line in kubelet.pods[0].lines)
    outcome = json.loads(stored(request.run_id, "outcome.json", tmp_path))
    assert outcome["stop_reason"] == "failed"
    statuses = [p for p in k8s.objects("pods") if p["metadata"]["name"] == kubelet.pods[0].name]
    assert statuses[0]["status"]["phase"] == "Failed"
    terminated = statuses[0]["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == contract.POD_EXIT_TRAINER_FAILED


@pytest.mark.integration
@pytest.mark.slow
def test_preemptions_beyond_max_restarts_fail_the_job(tmp_path: Path, k8s: K8sEmulator, bucket: MotoServer) -> None:
    config = project(tmp_path / "p", max_restarts=0)
    provider = KubernetesProvider(config.parent, {})
    request = lease(config, "run-20260101-000000-limit0")
    kubelet = kubelet_for(provider, request, k8s, tmp_path / "k", TEST_HOLD_AT_STEP="3")

    def evict(pod: Pod) -> None:
        pod.wait_for_line("holding at step 3")
        kubelet.evict(pod)

    assert kubelet.run(on_start=evict) == "Failed"
    assert (kubelet.reason, kubelet.exit_codes) == ("BackoffLimitExceeded", [contract.POD_EXIT_STOPPED])
    # The work is not lost: the final save is durable for a later run to resume.
    assert json.loads(stored(request.run_id, "outcome.json", tmp_path))["checkpoints"][-1]["step"] == 3
