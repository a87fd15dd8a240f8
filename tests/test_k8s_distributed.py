"""Multi-node training on the engines clusters run: a Kubeflow Trainer v2 TrainJob, a Training
Operator v1 PyTorchJob, and (with neither installed) an Indexed Job with a headless Service.

The manifests are checked against the CRD schemas the projects publish (tests/data/crds/), the
choice ``multi_node: auto`` makes is checked against what the kmock emulator's API discovery serves,
and the reference example trains on two nodes through ``gpuline`` itself: the test kubelet acts as
the Trainer or the Training Operator, runs both pods at once with torchrun over gloo on 127.0.0.1,
and the pods checkpoint to S3 on moto. Nothing waits on the clock: the kubelet acts on the
emulator's watch events, and the CLI returns when the workload has ended."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

from crds import closed
from gpuline import contract
from gpuline.errors import ConfigError
from gpuline.ledger.sqlite import SqliteLedger
from gpuline.providers.k8s_manifests import KubernetesOptions, build_manifests
from gpuline.providers.k8s_workloads import PYTORCHJOB, TRAINJOB, WorkloadKind
from gpuline.providers.kubernetes import KubernetesProvider
from gpuline.storage import open_storage
from servers import aws_env, moto_server  # noqa: F401
from test_k8s_pipeline import BUCKET, IMAGE, bucket, kubelet  # noqa: F401
from test_provider_kubernetes import lease

if TYPE_CHECKING:
    from fixtures_k8s import K8sEmulator
    from servers import MotoServer

pytest_plugins = ["fixtures_k8s"]

CRDS = Path(__file__).parent / "data" / "crds"
EXAMPLE = Path(__file__).resolve().parents[1] / "templates" / "example"
STORAGE = f"s3://{BUCKET}/artifacts"
IN_POD = ["python", "-m", "gpuline.training.in_pod", "--"]
HANDOVER = [
    "env",
    "GPULINE_RDZV_ENDPOINT=$(PET_MASTER_ADDR):$(PET_MASTER_PORT)",
    "JOB_COMPLETION_INDEX=$(PET_NODE_RANK)",
]


# ---------------------------------------------------------------- the published schemas


def schema_errors(manifest: dict[str, Any], crd: str) -> list[str]:
    import jsonschema

    published = json.loads((CRDS / crd).read_text())
    assert manifest["apiVersion"] == f"{published['group']}/{published['version']}"
    assert manifest["kind"] == published["kind"]
    validator = jsonschema.Draft202012Validator(closed(published["openAPIV3Schema"]))
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(manifest)]


def container_env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container["env"]}


# ---------------------------------------------------------------- TrainJob (offline)


def test_a_two_node_trainjob_names_its_runtime_and_fits_the_published_crd(tmp_path: Path) -> None:
    from kubeflow_trainer_api.models.trainer_v1alpha1_train_job import TrainerV1alpha1TrainJob

    (job,) = build_manifests(lease(tmp_path, nodes=2, gpus=4), KubernetesOptions(), created_at="x", engine="trainjob")
    assert schema_errors(job, "trainer-trainjobs-v1alpha1.schema.json") == []
    # The CRD's own CEL rules on the name, which a JSON Schema validator does not run.
    name = job["metadata"]["name"]
    assert len(name) <= 63 and name[0].isalpha() and name.replace("-", "").isalnum() and name == name.lower()
    # The Trainer's models read it back unchanged: what was sent is what the API types describe.
    assert TrainerV1alpha1TrainJob.from_dict(job).to_dict() == job

    spec = job["spec"]
    assert spec["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
                                  "name": "torch-distributed"}  # fmt: skip
    assert spec["activeDeadlineSeconds"] == 1800  # the lease's TTL, enforced by the cluster
    trainer = spec["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (2, 1)
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "4"
    assert trainer["image"] == "registry.example/train:1"
    # The supervisor runs in every node; the runtime's torch plugin says where rank 0 is.
    assert trainer["command"] == [*HANDOVER, *IN_POD, "python", "train.py"]
    env = container_env(trainer)
    assert env[contract.NNODES] == "2" and contract.RDZV_ENDPOINT not in env
    assert env[contract.STORAGE] == "s3://gpuline-test/artifacts"


def test_the_trainjob_patches_the_node_pods_with_the_lease_labels_and_the_supervisor_state(tmp_path: Path) -> None:
    options = KubernetesOptions(runtime="torch-on-a100", termination_grace_s=300, queue="team-vision")
    (job,) = build_manifests(lease(tmp_path, nodes=3), options, created_at="x", engine="trainjob")
    assert job["spec"]["runtimeRef"]["name"] == "torch-on-a100"
    assert job["spec"]["suspend"] is True and job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-vision"
    (patch,) = job["spec"]["runtimePatches"]
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert node["name"] == "node"
    pod = node["template"]["spec"]["template"]
    # The orchestrator and the reaper find the pods by the lease's label.
    assert pod["metadata"]["labels"]["gpuline/lease-id"] == "lease-0123456789ab"
    assert pod["spec"]["terminationGracePeriodSeconds"] == 300
    assert {v["name"] for v in pod["spec"]["volumes"]} == {"gpuline-state"}
    (mounts,) = pod["spec"]["containers"]
    assert mounts == {"name": "node", "volumeMounts": [{"name": "gpuline-state", "mountPath": "/var/lib/gpuline"}]}


def test_what_a_trainjob_cannot_carry_fails_before_anything_is_created(tmp_path: Path) -> None:
    cannot = (
        KubernetesOptions(env_from_secret="training-env"),
        KubernetesOptions(working_dir="/src"),
        KubernetesOptions(scheduler="volcano"),
    )
    for options in cannot:
        with pytest.raises(ConfigError, match="cannot be given to a TrainJob") as raised:
            build_manifests(lease(tmp_path, nodes=2), options, created_at="x", engine="trainjob")
        assert "multi_node: pytorchjob" in (raised.value.hint or "")


# ---------------------------------------------------------------- PyTorchJob (offline)


def test_a_two_node_pytorchjob_runs_the_supervisor_in_both_replicas_and_fits_the_published_crd(tmp_path: Path) -> None:
    (job,) = build_manifests(lease(tmp_path, nodes=2), KubernetesOptions(), created_at="x", engine="pytorchjob")
    assert schema_errors(job, "training-operator-pytorchjobs-v1.schema.json") == []
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert (replicas["Master"]["replicas"], replicas["Worker"]["replicas"]) == (1, 1)
    for replica in replicas.values():
        (container,) = replica["template"]["spec"]["containers"]
        assert container["name"] == "pytorch"
        assert container["command"] == [*HANDOVER, *IN_POD, "python", "train.py"]
        assert container_env(container)[contract.NNODES] == "2"
        assert replica["template"]["metadata"]["labels"]["gpuline/lease-id"] == "lease-0123456789ab"


def test_without_the_supervisor_the_operators_pods_run_torchrun_from_their_pet_environment(tmp_path: Path) -> None:
    bare = KubernetesOptions(supervisor=False)
    (trainjob,) = build_manifests(lease(tmp_path, nodes=2), bare, created_at="x", engine="trainjob")
    (pytorchjob,) = build_manifests(lease(tmp_path / "b", nodes=2), bare, created_at="x", engine="pytorchjob")
    assert trainjob["spec"]["trainer"]["command"] == ["torchrun", "train.py"]
    (master,) = pytorchjob["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"]
    assert master["command"] == ["torchrun", "train.py"]


# ---------------------------------------------------------------- following several nodes


def test_each_node_of_a_multi_node_run_has_its_first_pod_and_the_first_to_fail_says_why() -> None:
    from datetime import UTC, datetime, timedelta

    from gpuline.providers.k8s_follow import Followed, PodRun
    from gpuline.providers.k8s_workloads import pod_rank

    at = datetime(2026, 1, 1, tzinfo=UTC)
    two = [PodRun("m", 0, at, at + timedelta(seconds=9), 0), PodRun("w", 1, at, at + timedelta(seconds=8), 0)]
    assert (Followed("Complete", pods=two).restarts, Followed("Complete", pods=two).pod_seconds) == (0, 17.0)
    # Node 1's script crashed; node 0 was stopped after it (143): the crash is what ended the run.
    crashed = [PodRun("m", 0, at, at + timedelta(seconds=5), contract.POD_EXIT_STOPPED),
               PodRun("w", 1, at, at + timedelta(seconds=4), contract.POD_EXIT_TRAINER_FAILED)]  # fmt: skip
    assert Followed("Failed", pods=crashed).last_exit_code() == contract.POD_EXIT_TRAINER_FAILED
    # A PyTorchJob's pods are ranked as the operator sets RANK: the master 0, worker i i + 1.
    label = "training.kubeflow.org/replica-"
    ranks = [pod_rank({"metadata": {"labels": {f"{label}type": t, f"{label}index": i}}})
             for t, i in (("master", "0"), ("worker", "0"), ("worker", "1"))]  # fmt: skip
    assert ranks == [0, 1, 2]
    assert pod_rank({"metadata": {"annotations": {"batch.kubernetes.io/job-completion-index": "3"}}}) == 3


# ---------------------------------------------------------------- auto: what the cluster serves


def install(k8s: K8sEmulator, *kinds: WorkloadKind) -> None:
    for kind in kinds:
        assert kind.api is not None
        k8s.install("/".join(kind.api), kind.kind)


def add_runtime(k8s: K8sEmulator) -> None:
    """Kubeflow Trainer's torch-distributed ClusterTrainingRuntime, as its chart installs it (with the
    Trainer's CRDs: the runtimes' kind is served beside TrainJobs)."""
    from kubernetes import client, config

    k8s.install("trainer.kubeflow.org/v1alpha1/clustertrainingruntimes", "ClusterTrainingRuntime")
    runtime = yaml.safe_load((CRDS / "trainer-torch-distributed-runtime.yaml").read_text())
    api = config.new_client_from_config(config_file=str(k8s.kubeconfig))
    client.CustomObjectsApi(api).create_cluster_custom_object(
        "trainer.kubeflow.org", "v1alpha1", "clustertrainingruntimes", runtime
    )


@pytest.mark.integration
@pytest.mark.parametrize(
    ("served", "engine", "kind"),
    [
        ((), "indexed-job", "jobs"),
        ((PYTORCHJOB,), "pytorchjob", "pytorchjobs"),
        ((TRAINJOB,), "trainjob", "trainjobs"),
        ((TRAINJOB, PYTORCHJOB), "trainjob", "trainjobs"),  # Trainer v2 wins where both are installed
    ],
)
def test_auto_picks_the_engine_the_clusters_api_discovery_serves(
    tmp_path: Path, k8s: K8sEmulator, served: tuple[WorkloadKind, ...], engine: str, kind: str
) -> None:
    install(k8s, *served)
    if TRAINJOB in served:
        add_runtime(k8s)
    provider = KubernetesProvider(tmp_path, {"multi_node": "auto"})
    machine = provider.provision(lease(tmp_path, nodes=2))
    assert machine.instance_id.split("/")[0] == {"indexed-job": "job"}.get(engine, engine)
    (made,) = k8s.objects(kind)
    assert [m.instance_id for m in provider.list_owned()] == [machine.instance_id]
    assert provider.describe(machine.instance_id).state == "pending"  # no controller ran it yet
    requested = k8s.requests()
    assert ("GET", "/apis/trainer.kubeflow.org/v1alpha1") in requested  # Trainer v2 is asked first
    assert provider.release(machine.instance_id) is True
    assert k8s.objects(kind) == [] and provider.list_owned() == []
    assert made["metadata"]["labels"]["gpuline/managed"] == "true"


@pytest.mark.integration
def test_a_trainjob_without_its_runtime_in_the_cluster_is_refused_before_anything_is_created(
    tmp_path: Path, k8s: K8sEmulator
) -> None:
    install(k8s, TRAINJOB)
    provider = KubernetesProvider(tmp_path, {"multi_node": "trainjob"})
    with pytest.raises(ConfigError, match="no ClusterTrainingRuntime 'torch-distributed'"):
        provider.provision(lease(tmp_path, nodes=2))
    assert k8s.objects("trainjobs") == []


# ---------------------------------------------------------------- two nodes end to end


def two_node_example(root: Path) -> Path:
    """The reference example as a two-node Kubernetes project: one T4 per node, checkpoints to S3."""
    shutil.copytree(EXAMPLE, root, ignore=shutil.ignore_patterns(".gpuline", "__pycache__"))
    config = root / "gpuline.yml"
    spec = yaml.safe_load(config.read_text())
    spec["resources"].update(provider="kubernetes", gpu_type="t4", gpu_count=1, nodes=2, image=IMAGE)
    spec["hyperparameters"]["steps"] = 60
    spec["tiers"]["nightly"]["hyperparameters"]["steps"] = 60
    # keep covers every checkpoint of the run, so the store shows each one that was ever committed.
    spec["checkpoint"] = {"interval_steps": 20, "keep": 5, "max_restarts": 0, "allow_fresh_start": False}
    spec["backends"]["storage"] = STORAGE
    config.write_text(yaml.safe_dump(spec, sort_keys=False))
    return root


def gpuline(project: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    done = subprocess.run(
        [sys.executable, "-m", "gpuline.cli", *args, "--json"],
        cwd=project, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    return done.returncode, json.loads(done.stdout), done.stderr


def checkpoint(store: Any, prefix: str, local: Path) -> dict[str, Any]:
    """A committed checkpoint fetched from the store and loaded as the trainer would (checksums verified)."""
    from gpuline_trainer.checkpoint import TorchCheckpointer

    for key in store.list(prefix + "/"):
        store.get_file(key, local / key.removeprefix(prefix + "/"))
    return TorchCheckpointer.load(local)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize(
    ("served", "kind", "pods", "ended"),
    [
        ((TRAINJOB, PYTORCHJOB), TRAINJOB, ("node-0-0", "node-0-1"), "Complete"),
        ((PYTORCHJOB,), PYTORCHJOB, ("master-0", "worker-0"), "Succeeded"),
    ],
    ids=["trainjob", "pytorchjob"],
)
def test_two_nodes_train_through_the_operator_and_rank_0_commits_one_checkpoint_per_step(
    tmp_path: Path,
    k8s: K8sEmulator,
    bucket: MotoServer,  # noqa: F811
    served: tuple[WorkloadKind, ...],
    kind: WorkloadKind,
    pods: tuple[str, str],
    ended: str,
) -> None:
    install(k8s, *served)
    if TRAINJOB in served:
        add_runtime(k8s)
    project = two_node_example(tmp_path / "proj")
    with kubelet(k8s, project, tmp_path / "node") as node:
        code, prov, err = gpuline(project, "provision")
        assert code == 0, err
        run_id = prov["run_id"]
        code, body, err = gpuline(project, "train", "--run-id", run_id)
        assert code == 0, err
        torn, _, err = gpuline(project, "teardown", "--run-id", run_id)
    assert torn == 0, err
    assert not node.errors, node.errors

    # `auto` chose the engine the cluster serves, and its controller (the test kubelet) ran both nodes.
    (name,) = node.kubelets
    workload = node.kubelets[name]
    assert [p.name for p in workload.pods] == [f"{name}-{suffix}" for suffix in pods]
    assert (workload.result, workload.exit_codes) == (ended, [0, 0])
    logs = ["\n".join(p.lines) for p in workload.pods]
    for log in logs:  # each pod ran the entrypoint under its own supervisor
        assert log.count(f"starting run {run_id} fresh") == 1, log[-3000:]

    # Rank 0 (node 0, the master) committed each checkpoint once; the other node none. (A supervisor
    # uploads the newest first, so the events need not come in step order.)
    committed = [sorted(e["step"] for e in p.events if e["event"] == "checkpoint") for p in workload.pods]
    assert committed == [[20, 40, 60], []], [log[-3000:] for log in logs]
    store = open_storage(STORAGE, tmp_path)
    manifests = sorted(k for k in store.list(f"runs/{run_id}/checkpoints/") if k.endswith("manifest.json"))
    steps = [f"step-{s:08d}" for s in (20, 40, 60)]
    assert manifests == [f"runs/{run_id}/checkpoints/{s}/manifest.json" for s in steps]
    # Both pods' ranks were one world: a checkpoint holds every rank's RNG state (gathered over gloo).
    assert len(checkpoint(store, f"runs/{run_id}/checkpoints/{steps[-1]}", tmp_path / "ckpt")["rng"]["ranks"]) == 2

    record = SqliteLedger(project / ".gpuline" / "ledger.db").get_run(run_id)
    assert [c.step for c in record.checkpoints] == [20, 40, 60]
    assert all(c.uri.startswith(f"{STORAGE}/runs/{run_id}/checkpoints/") for c in record.checkpoints)
    assert record.metrics["accuracy"] > 0.5  # rank 0's eval, published by pod 0
    assert record.instance_id.startswith(f"{kind.key}/default/")

    # Both pods' times are the run's: GPU-seconds are their run time times one T4 each.
    (followed,) = [e for e in SqliteLedger(project / ".gpuline" / "ledger.db").events(run_id)
                   if e.kind == "train.workload"]  # fmt: skip
    assert followed.data["end"] == "Complete" and len(followed.data["pods"]) == 2
    assert all(p["exit_code"] == 0 and p["seconds"] > 0 for p in followed.data["pods"])
    assert record.pod_seconds == pytest.approx(sum(p["seconds"] for p in followed.data["pods"]), abs=1e-2)
    assert record.times.pod_running is not None and record.times.pod_finished is not None
    assert record.gpu_seconds == pytest.approx(record.pod_seconds, abs=1e-2)  # 2 nodes x 1 GPU, per node
    assert (body["stop_reason"], body["final_step"]) == ("completed", 60)
    assert [c["step"] for c in body["checkpoints"]] == [20, 40, 60]
    assert k8s.objects(kind.api[2] if kind.api else "jobs") == []  # teardown deleted the workload
