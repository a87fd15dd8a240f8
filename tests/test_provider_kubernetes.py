"""The kubernetes provider: manifests validated against the Kubernetes schema, API calls against the
kmock emulator on 127.0.0.1 through the official client."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from conftest import write_project
from gpuline.errors import ConfigError, InfraError, NotFoundError
from gpuline.providers import open_provider
from gpuline.providers.base import TAG_EXPIRES_AT, TAG_LEASE_ID, TAG_MANAGED, TAG_RUN_ID, LeaseRequest, RunnerRequest
from gpuline.providers.k8s_manifests import (
    QUEUE_LABEL,
    RDZV_PORT,
    KubernetesOptions,
    build_manifests,
    label_value,
    object_name,
)
from gpuline.providers.kubernetes import KubernetesProvider, job_id
from gpuline.runs import utcnow
from gpuline.spec import load_spec

if TYPE_CHECKING:
    from fixtures_k8s import K8sEmulator

pytest_plugins = ["fixtures_k8s"]

K8S_VERSION = "1.30"
JIT = "ZmFrZS1qaXQtY29uZmlnLWZvci10ZXN0cw=="
RUNNER = KubernetesOptions(mode="runner", runner_image="registry.example/runner:2")
STORAGE = "s3://gpuline-test/artifacts"
IN_POD = ["python", "-m", "gpuline.training.in_pod", "--"]


def lease(
    tmp_path: Path,
    *,
    nodes: int = 1,
    gpus: int = 1,
    procs: int = 1,
    lane: str = "on-demand",
    options: str = "",
    runner: bool = False,
    lease_id: str = "lease-0123456789ab",
) -> LeaseRequest:
    config = write_project(
        tmp_path / "proj",
        spec_extra=f"  gpu_count: {gpus}\n  nodes: {nodes}\n  procs_per_node: {procs}\n  lane: {lane}\n"
        f"  image: registry.example/train:1\n{options}",
    )
    # write_project ends resources with gpu_type: cpu; the provider only reads it for the selector.
    spec = load_spec(config)
    spec.backends.storage = STORAGE  # a pod cannot reach the project's own folder
    now = utcnow()
    return LeaseRequest(
        run_id="run-20260101-000000-abcdef",
        lease_id=lease_id,
        spec=spec,
        instance_type="t4",
        lane=lane,
        region="",
        ttl_seconds=1800,
        expires_at=now + timedelta(seconds=1800),
        tags={
            TAG_RUN_ID: "run-20260101-000000-abcdef",
            TAG_LEASE_ID: lease_id,
            TAG_EXPIRES_AT: (now + timedelta(seconds=1800)).isoformat(timespec="seconds"),
            TAG_MANAGED: "true",
            "gpuline:repo": "octo/models",
            "gpuline:team": "vision",
            "gpuline:tier": "nightly",
        },
        project_dir=config.parent,
        runner=RunnerRequest(label="gpuline-run-x", jit_config=JIT) if runner else None,
    )


def validate(manifests: list[dict[str, Any]]) -> None:
    import kubernetes_validate

    for manifest in manifests:
        kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)


def by_kind(manifests: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    return next(m for m in manifests if m["kind"] == kind)


# ---------------------------------------------------------------- manifests (offline)


def test_single_node_job_has_the_gpu_limit_ttl_deadline_labels_and_validates(tmp_path: Path) -> None:
    request = lease(tmp_path, options="  options:\n    node_selector: {gpu: '{gpu_type}'}\n")
    manifests = build_manifests(request, KubernetesOptions(node_selector={"gpu": "{gpu_type}"}), created_at="x")
    validate(manifests)
    assert [m["kind"] for m in manifests] == ["Job"]
    job = manifests[0]
    spec = job["spec"]
    assert spec["activeDeadlineSeconds"] == 1800
    assert spec["ttlSecondsAfterFinished"] == 600
    assert spec["backoffLimit"] == 2  # checkpoint.max_restarts: a disrupted pod resumes in a new one
    assert "completionMode" not in spec
    labels = job["metadata"]["labels"]
    assert labels["gpuline/run-id"] == "run-20260101-000000-abcdef"
    assert labels["gpuline/lease-id"] == "lease-0123456789ab"
    assert labels["gpuline/managed"] == "true"
    assert labels["gpuline/expires-at"].isdigit()
    assert job["metadata"]["annotations"]["gpuline/repo"] == "octo/models"
    pod = spec["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "1"}
    assert container["command"] == [*IN_POD, "python", "train.py"]
    assert pod["nodeSelector"] == {"gpu": "cpu"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["automountServiceAccountToken"] is False
    assert pod["restartPolicy"] == "Never"


def test_multi_node_is_an_indexed_job_with_a_headless_service_whose_selector_matches_the_pods(tmp_path: Path) -> None:
    request = lease(tmp_path, nodes=3, gpus=4, procs=4)
    manifests = build_manifests(request, KubernetesOptions(), created_at="x")
    validate(manifests)
    job, service = by_kind(manifests, "Job"), by_kind(manifests, "Service")
    name = object_name(request.lease_id)
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 3
    pod = job["spec"]["template"]
    assert pod["spec"]["subdomain"] == service["metadata"]["name"] == name
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    selector = service["spec"]["selector"]
    assert selector and all(pod["metadata"]["labels"].get(k) == v for k, v in selector.items())
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert env["GPULINE_RDZV_ENDPOINT"] == f"{name}-0.{name}:{RDZV_PORT}"
    # The supervisor in each pod runs torchrun itself, with the Job's shape.
    assert pod["spec"]["containers"][0]["command"] == [*IN_POD, "python", "train.py"]
    assert (env["GPULINE_NNODES"], env["GPULINE_NPROCS_PER_NODE"]) == ("3", "4")
    # Four processes need more than the default 64 MiB of /dev/shm.
    assert pod["spec"]["volumes"][0]["emptyDir"]["medium"] == "Memory"


def test_without_the_supervisor_a_multi_node_pod_runs_torchrun_itself(tmp_path: Path) -> None:
    request = lease(tmp_path, nodes=3, gpus=4, procs=4)
    name = object_name(request.lease_id)
    manifests = build_manifests(request, KubernetesOptions(supervisor=False), created_at="x")
    validate(manifests)
    pod = by_kind(manifests, "Job")["spec"]["template"]
    command = pod["spec"]["containers"][0]["command"]
    assert command[0] == "torchrun"
    assert "--nnodes=3" in command and "--nproc-per-node=4" in command and "--rdzv-backend=c10d" in command
    assert f"--rdzv-endpoint={name}-0.{name}:{RDZV_PORT}" in command
    assert command[-1] == "train.py"  # `python` is dropped: torchrun runs the script itself
    assert "podFailurePolicy" not in by_kind(manifests, "Job")["spec"]  # exit codes mean the script's own


def test_a_non_python_entrypoint_runs_under_torchrun_with_no_python(tmp_path: Path) -> None:
    request = lease(tmp_path, nodes=2)
    request.spec.entrypoint.command = ["./train.sh", "--fast"]
    command = build_manifests(request, KubernetesOptions(supervisor=False), created_at="x")[0]["spec"]["template"][
        "spec"
    ]["containers"][0]["command"]
    assert command[-3:] == ["--no-python", "./train.sh", "--fast"]


def test_kueue_queue_label_suspends_the_job_for_admission(tmp_path: Path) -> None:
    manifests = build_manifests(lease(tmp_path), KubernetesOptions(queue="gpu-queue"), created_at="x")
    validate(manifests)
    assert manifests[0]["metadata"]["labels"][QUEUE_LABEL] == "gpu-queue"
    assert manifests[0]["spec"]["suspend"] is True


def test_spot_lane_adds_the_clusters_spot_selector_and_toleration(tmp_path: Path) -> None:
    options = KubernetesOptions.model_validate(
        {
            "spot": {
                "node_selector": {"node.kubernetes.io/lifecycle": "spot"},
                "tolerations": [{"key": "spot", "operator": "Exists", "effect": "NoSchedule"}],
            }
        }
    )
    manifests = build_manifests(lease(tmp_path, lane="spot"), options, created_at="x")
    validate(manifests)
    pod = manifests[0]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"node.kubernetes.io/lifecycle": "spot"}
    assert {"key": "spot", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]


def test_runner_mode_keeps_the_jit_config_in_a_secret_not_in_the_job(tmp_path: Path) -> None:
    manifests = build_manifests(lease(tmp_path, runner=True), RUNNER, created_at="x")
    validate(manifests)
    job, secret = by_kind(manifests, "Job"), by_kind(manifests, "Secret")
    assert JIT not in repr(job)
    assert secret["stringData"]["jitconfig"] == JIT
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["/home/runner/run.sh"]
    ref = next(e for e in container["env"] if e["name"] == "ACTIONS_RUNNER_INPUT_JITCONFIG")
    assert ref["valueFrom"]["secretKeyRef"] == {"name": secret["metadata"]["name"], "key": "jitconfig"}


def test_runner_mode_refuses_multi_node_and_a_missing_registration(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="a runner is one machine"):
        build_manifests(lease(tmp_path, nodes=2, runner=True), RUNNER, created_at="x")
    with pytest.raises(ConfigError, match="no JIT runner was registered"):
        build_manifests(lease(tmp_path / "b"), RUNNER, created_at="x")
    with pytest.raises(ConfigError, match="runner_image is required"):
        build_manifests(lease(tmp_path / "c", runner=True), KubernetesOptions(mode="runner"), created_at="x")


def test_train_mode_needs_an_image(tmp_path: Path) -> None:
    request = lease(tmp_path)
    request.spec.resources.image = None
    with pytest.raises(ConfigError, match="needs a container image"):
        build_manifests(request, KubernetesOptions(), created_at="x")


def test_pytorchjob_has_master_and_workers_and_the_lease_deadline(tmp_path: Path) -> None:
    manifests = build_manifests(
        lease(tmp_path, nodes=3, procs=2), KubernetesOptions(queue="q"), created_at="x", engine="pytorchjob"
    )
    (job,) = manifests
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 2
    assert job["spec"]["nprocPerNode"] == "2"
    assert job["spec"]["runPolicy"]["activeDeadlineSeconds"] == 1800
    assert job["spec"]["runPolicy"]["suspend"] is True
    container = replicas["Worker"]["template"]["spec"]["containers"][0]
    assert container["name"] == "pytorch"
    # Every replica runs the supervisor (checkpoints, resume, stop handling), handed torchrun's rendezvous.
    assert container["command"][-6:] == [*IN_POD, "python", "train.py"]
    # Each replica is its own copy: the operator may edit one without touching the other.
    assert replicas["Worker"]["template"] is not replicas["Master"]["template"]


def test_label_values_are_made_valid() -> None:
    assert label_value("octo/models") == "octo_models"
    assert label_value("-x-") == "x"
    assert len(label_value("a" * 100)) == 63


def test_unknown_option_names_its_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"resources\.options\.namespce: unknown key") as info:
        KubernetesProvider(tmp_path, {"namespce": "x"})
    assert info.value.hint == "did you mean `namespace`?"
    with pytest.raises(ConfigError, match=r"resources\.options\.mode"):
        KubernetesProvider(tmp_path, {"mode": "ssh"})


# ---------------------------------------------------------------- the API (emulator)


def test_provision_creates_a_labelled_job_the_reaper_can_find_and_release_is_idempotent(
    tmp_path: Path, k8s: K8sEmulator
) -> None:
    provider = open_provider("k8s", tmp_path, {})
    request = lease(tmp_path)
    machine = provider.provision(request)
    assert machine.instance_id == job_id("default", request.lease_id)
    assert machine.lease_id == request.lease_id and machine.run_id == request.run_id
    assert machine.launched_at is not None and machine.state == "pending"
    (job,) = k8s.objects("jobs")
    assert job["spec"]["activeDeadlineSeconds"] == 1800
    owned = provider.list_owned()
    assert [m.instance_id for m in owned] == [machine.instance_id]
    assert owned[0].expires_at == request.expires_at.replace(microsecond=0)
    assert provider.describe(machine.instance_id).tags[TAG_RUN_ID] == request.run_id
    assert provider.release(machine.instance_id) is True
    assert k8s.objects("jobs") == []
    assert provider.release(machine.instance_id) is False
    assert provider.list_owned() == []
    with pytest.raises(NotFoundError):
        provider.describe(machine.instance_id)


def test_the_emulator_receives_an_indexed_job_and_a_headless_service_with_matching_selectors(
    tmp_path: Path, k8s: K8sEmulator
) -> None:
    provider = KubernetesProvider(tmp_path, {"multi_node": "auto"})
    machine = provider.provision(lease(tmp_path, nodes=2))
    (job,), (service,) = k8s.objects("jobs"), k8s.objects("services")
    assert job["spec"]["completionMode"] == "Indexed"
    assert service["spec"]["clusterIP"] == "None"
    pod_labels = job["spec"]["template"]["metadata"]["labels"]
    assert all(pod_labels[k] == v for k, v in service["spec"]["selector"].items())
    # "auto" asked whether the training operator is installed (it is not) before choosing.
    assert ("GET", "/apis/kubeflow.org/v1") in k8s.requests()
    assert provider.release(machine.instance_id) is True
    assert k8s.objects("jobs") == [] and k8s.objects("services") == []


def test_runner_mode_creates_the_secret_and_release_deletes_it(tmp_path: Path, k8s: K8sEmulator) -> None:
    provider = KubernetesProvider(tmp_path, {"mode": "runner", "runner_image": "registry.example/runner:2"})
    assert provider.wants_runner
    machine = provider.provision(lease(tmp_path, runner=True))
    (secret,) = k8s.objects("secrets")
    assert secret["metadata"]["labels"]["gpuline/managed"] == "true"
    assert machine.runner_label == "gpuline-run-x"
    provider.release(machine.instance_id)
    assert k8s.objects("secrets") == []


def test_list_owned_ignores_jobs_without_gpuline_labels_even_when_the_server_ignores_selectors(
    tmp_path: Path, k8s: K8sEmulator
) -> None:
    from kubernetes import client, config

    api = client.BatchV1Api(config.new_client_from_config())
    api.create_namespaced_job(
        "default",
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": "someone-else", "namespace": "default", "labels": {"app": "x"}},
            "spec": {"template": {"spec": {"containers": [{"name": "c", "image": "x"}], "restartPolicy": "Never"}}},
        },
    )
    provider = KubernetesProvider(tmp_path, {})
    machine = provider.provision(lease(tmp_path))
    assert [m.instance_id for m in provider.list_owned()] == [machine.instance_id]
    assert len(k8s.objects("jobs")) == 2


def test_a_duplicate_lease_is_a_conflict(tmp_path: Path, k8s: K8sEmulator) -> None:
    provider = KubernetesProvider(tmp_path, {})
    provider.provision(lease(tmp_path))
    with pytest.raises(InfraError, match="already exists"):
        provider.provision(lease(tmp_path / "again"))


def test_logs_of_pod_zero_are_streamed_back(tmp_path: Path, k8s: K8sEmulator) -> None:
    provider = KubernetesProvider(tmp_path, {})
    request = lease(tmp_path, nodes=2)
    machine = provider.provision(request)
    labels = k8s.objects("jobs")[0]["spec"]["template"]["metadata"]["labels"]
    name = object_name(request.lease_id)
    k8s.add_pod("default", f"{name}-1-xyz", labels, log="worker\n", index=1)
    k8s.add_pod("default", f"{name}-0-abc", labels, log="step 1 loss 0.9\nstep 2 loss 0.5\n", index=0)
    k8s.add_pod("default", "unrelated", {"app": "x"}, log="nope\n")
    lines: list[str] = []
    assert provider.stream_logs(machine.instance_id, lines.append) == 2
    assert lines == ["step 1 loss 0.9", "step 2 loss 0.5"]


def test_an_unreachable_cluster_is_an_infrastructure_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "kubeconfig"
    config.write_text(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: http://127.0.0.1:9\n"
        "users:\n- name: u\n  user: {}\ncontexts:\n- name: x\n  context: {cluster: c, user: u}\ncurrent-context: x\n"
    )
    provider = KubernetesProvider(tmp_path, {"kubeconfig": str(config)})
    provider.api.configuration.retries = 0
    with pytest.raises(InfraError, match="listing Jobs"):
        provider.list_owned()


def test_a_missing_kubeconfig_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    provider = KubernetesProvider(tmp_path, {"kubeconfig": str(tmp_path / "missing")})
    with pytest.raises(ConfigError, match="cannot load the Kubernetes configuration"):
        provider.list_owned()


def test_a_malformed_instance_id_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="not a kubernetes instance id"):
        KubernetesProvider(tmp_path, {}).describe("i-0123")


def test_a_pytorchjob_is_used_when_the_training_operator_is_installed(tmp_path: Path, k8s: K8sEmulator) -> None:
    k8s.install("kubeflow.org/v1/pytorchjobs", "PyTorchJob")
    provider = KubernetesProvider(tmp_path, {})
    machine = provider.provision(lease(tmp_path, nodes=2))
    assert machine.instance_id.startswith("pytorchjob/default/")
    (job,) = k8s.objects("pytorchjobs")
    assert job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1
    assert k8s.objects("jobs") == [] and k8s.objects("services") == []
    assert [m.instance_id for m in provider.list_owned()] == [machine.instance_id]
    assert provider.release(machine.instance_id) is True
    assert k8s.objects("pytorchjobs") == []
    assert provider.release(machine.instance_id) is False
