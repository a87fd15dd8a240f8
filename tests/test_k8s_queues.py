"""Queues, gangs, priorities and fractional GPUs on the kubernetes provider.

Kueue and Volcano objects are validated against the schemas of their published CRDs (tests/data/crds,
sources in SOURCES-queues.md), every Kubernetes manifest against the Kubernetes schema; the cluster is
the kmock emulator; the end-to-end test runs `gpuline provision` and `gpuline train` as a user does,
with the test acting as Kueue (it writes the Workload, answers the visibility API, then admits the
Job) and the test kubelet running the pod once the Job is unsuspended. Nothing waits on the clock:
the test acts when gpuline has said it is waiting."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jsonschema
import pytest
import yaml

from conftest import write_project
from crds import closed
from gpuline.cli import main
from gpuline.decisions.cost import actual_cost
from gpuline.decisions.pricing import load_catalog
from gpuline.errors import ConfigError, InputError
from gpuline.ledger.sqlite import SqliteLedger
from gpuline.providers import k8s_gpu, k8s_queue
from gpuline.providers.k8s_manifests import KubernetesOptions, build_manifests
from gpuline.providers.kubernetes import KubernetesProvider
from kubelet import HANG_S, KubeletDaemon
from servers import aws_env, moto_server  # noqa: F401
from test_k8s_pipeline import bucket, cluster_project, kubelet  # noqa: F401
from test_provider_kubernetes import lease, validate

if TYPE_CHECKING:
    from fixtures_k8s import K8sEmulator
    from servers import MotoServer

pytest_plugins = ["fixtures_k8s"]

CRDS = Path(__file__).parent / "data" / "crds"
WORKLOADS = ("kueue.x-k8s.io", "v1beta1", "workloads")


# ---------------------------------------------------------------- the published schemas


@cache
def crd_schema(file: str, version: str = "v1beta1") -> dict[str, Any]:
    doc = yaml.safe_load((CRDS / file).read_text())
    if doc.get("kind") == "CustomResourceDefinition":
        doc = next(v for v in doc["spec"]["versions"] if v["name"] == version)["schema"]["openAPIV3Schema"]
    schema: dict[str, Any] = closed(doc)
    return schema


def valid_podgroup(obj: dict[str, Any]) -> None:
    jsonschema.validate(obj, crd_schema("volcano-podgroups.yaml"))


def valid_workload(obj: dict[str, Any]) -> None:
    jsonschema.validate(obj, crd_schema("kueue-workloads-v1beta1.schema.yaml"))


# ---------------------------------------------------------------- Kueue: labels, suspend, priority per tier


def test_a_queued_job_is_suspended_with_its_queue_and_the_tiers_workload_priority(tmp_path: Path) -> None:
    options = KubernetesOptions.model_validate(
        {
            "queue": "team-vision",
            "priority_classes": {"nightly": "research", "release": "production"},
            "workload_priority_classes": {"nightly": "research-queue"},
        }
    )
    (job,) = build_manifests(lease(tmp_path), options, created_at="x")  # a nightly run
    validate([job])
    labels = job["metadata"]["labels"]
    assert labels[k8s_queue.QUEUE_LABEL] == "team-vision"
    assert labels[k8s_queue.PRIORITY_LABEL] == "research-queue"
    assert job["spec"]["suspend"] is True
    assert job["spec"]["template"]["spec"]["priorityClassName"] == "research"


def test_the_tier_picks_the_priority_class_and_an_explicit_one_wins(tmp_path: Path) -> None:
    per_tier = {"priority_classes": {"nightly": "research", "release": "production"}}
    release = lease(tmp_path / "r")
    release.tags["gpuline:tier"] = "release"
    (job,) = build_manifests(release, KubernetesOptions.model_validate(per_tier), created_at="x")
    assert job["spec"]["template"]["spec"]["priorityClassName"] == "production"
    pinned = KubernetesOptions.model_validate({**per_tier, "priority_class": "urgent"})
    (job,) = build_manifests(release, pinned, created_at="x")
    assert job["spec"]["template"]["spec"]["priorityClassName"] == "urgent"
    # A tier with no entry gets none; no queue, no Kueue labels and no suspend.
    pr = lease(tmp_path / "p")
    pr.tags["gpuline:tier"] = "pr-fast"
    (job,) = build_manifests(pr, KubernetesOptions.model_validate(per_tier), created_at="x")
    assert "priorityClassName" not in job["spec"]["template"]["spec"]
    assert "suspend" not in job["spec"] and k8s_queue.QUEUE_LABEL not in job["metadata"]["labels"]


# ---------------------------------------------------------------- Volcano: scheduler, queue, PodGroup


def test_volcano_gang_schedules_the_pods_with_a_podgroup_that_matches_its_crd(tmp_path: Path) -> None:
    request = lease(tmp_path, nodes=3, gpus=4, procs=4)
    options = KubernetesOptions.model_validate(
        {"scheduler": "volcano", "queue": "research", "priority_classes": {"nightly": "research"}}
    )
    manifests = build_manifests(request, options, created_at="x")
    job = next(m for m in manifests if m["kind"] == "Job")
    group = next(m for m in manifests if m["kind"] == "PodGroup")
    validate([m for m in manifests if m["kind"] != "PodGroup"])
    valid_podgroup(group)
    pod = job["spec"]["template"]
    assert pod["spec"]["schedulerName"] == "volcano"
    assert pod["metadata"]["annotations"][k8s_queue.GROUP_NAME] == group["metadata"]["name"] == job["metadata"]["name"]
    assert pod["metadata"]["annotations"][k8s_queue.VOLCANO_QUEUE] == "research"
    assert group["apiVersion"] == "scheduling.volcano.sh/v1beta1"
    assert group["spec"] == {
        "minMember": 3,
        "minResources": {"nvidia.com/gpu": "12"},
        "queue": "research",
        "priorityClassName": "research",
    }
    # Volcano, not Kueue, holds the queue: no Kueue label, and the Job is not suspended.
    assert k8s_queue.QUEUE_LABEL not in job["metadata"]["labels"] and "suspend" not in job["spec"]


def test_a_misspelt_podgroup_field_fails_the_crd_schema() -> None:
    with pytest.raises(jsonschema.ValidationError, match="minMembers"):
        valid_podgroup({"apiVersion": "scheduling.volcano.sh/v1beta1", "kind": "PodGroup", "spec": {"minMembers": 2}})


def test_the_podgroup_is_created_with_the_job_and_deleted_with_the_lease(tmp_path: Path, k8s: K8sEmulator) -> None:
    k8s.install("scheduling.volcano.sh/v1beta1/podgroups", "PodGroup")
    provider = KubernetesProvider(tmp_path, {"scheduler": "volcano", "queue": "research"})
    machine = provider.provision(lease(tmp_path, nodes=2))
    (group,) = k8s.objects("podgroups")
    assert group["spec"]["minMember"] == 2
    assert provider.release(machine.instance_id) is True
    assert k8s.objects("podgroups") == [] and k8s.objects("jobs") == []


def test_a_gang_volcano_has_not_scheduled_shows_the_wait_until_its_podgroup_runs(
    tmp_path: Path, k8s: K8sEmulator
) -> None:
    k8s.install("scheduling.volcano.sh/v1beta1/podgroups", "PodGroup")
    provider = KubernetesProvider(tmp_path, {"scheduler": "volcano", "queue": "research"})
    provider.provision(lease(tmp_path, nodes=2))
    (job,) = k8s.objects("jobs")
    (group,) = k8s.objects("podgroups")
    name = group["metadata"]["name"]
    custom = k8s_queue.client_custom(provider)

    def podgroup_status(status: dict[str, Any]) -> None:
        custom.patch_namespaced_custom_object(*k8s_queue.PODGROUP[:2], "default", "podgroups", name, {"status": status})

    unschedulable = {"type": "Unschedulable", "status": "True", "message": "2/2 tasks in gang unschedulable"}
    podgroup_status({"phase": "Pending", "conditions": [unschedulable]})
    wait, lines = k8s_queue.QueueWait(provider), []
    wait.seen(job, lines.append)
    wait.seen(job, lines.append)  # the same state again: no second line
    assert lines == [
        "kubernetes: waiting for Volcano to schedule the gang in queue research (PodGroup Pending): "
        "2/2 tasks in gang unschedulable"
    ]
    assert wait.admitted_at is None
    podgroup_status({"phase": "Running", "conditions": []})
    wait.seen(job, lines.append)
    assert len(lines) == 1 and wait.admitted_at is not None


def test_a_bad_scheduler_value_is_one_line_naming_the_field() -> None:
    with pytest.raises(ConfigError) as info:
        KubernetesProvider(Path("."), {"scheduler": "volcanoo"})
    line = info.value.one_line()
    assert "\n" not in line
    assert line.startswith("resources.options.scheduler: Input should be 'default' or 'volcano' (got 'volcanoo')")


# ---------------------------------------------------------------- MIG slices: resources, prices


def test_a_mig_gpu_type_asks_for_its_slices_and_tolerates_the_gpu_taint(tmp_path: Path) -> None:
    request = lease(tmp_path, gpus=2)
    request.spec.resources.gpu_type = "a100-mig-1g.5gb"
    (job,) = build_manifests(request, KubernetesOptions(), created_at="x")
    validate([job])
    pod = job["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"] == {"nvidia.com/mig-1g.5gb": "2"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]


def test_the_single_strategy_asks_for_gpus_on_nodes_picked_by_their_profile(tmp_path: Path) -> None:
    request = lease(tmp_path)
    request.spec.resources.gpu_type = "h100-mig-1g.10gb"
    options = KubernetesOptions.model_validate(
        {"mig_strategy": "single", "node_selector": {"gpu-partition-size": "{mig_profile}", "accelerator": "{gpu}"}}
    )
    (job,) = build_manifests(request, options, created_at="x")
    validate([job])
    pod = job["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": "1"}
    assert pod["nodeSelector"] == {"gpu-partition-size": "1g.10gb", "accelerator": "h100"}


def test_a_malformed_mig_profile_is_refused_not_read_as_whole_gpus() -> None:
    with pytest.raises(ConfigError) as info:
        k8s_gpu.parse_mig("a100-mig-1x.5gb")
    assert "\n" not in info.value.one_line() and "a100-mig-1g.5gb" in info.value.one_line()
    assert k8s_gpu.parse_mig("a100") is None
    assert k8s_gpu.parse_mig("h100-mig-3g.40gb") == k8s_gpu.MigProfile("h100", 3, 40)


def test_a_slice_costs_its_share_of_the_card() -> None:
    catalog = load_catalog(None)
    card = catalog.instance("kubernetes", "a100")
    assert card is not None
    name, one = catalog.choose("kubernetes", "a100-mig-1g.5gb", 1, None)
    assert name == "a100-mig-1g.5gb" and one.on_demand == pytest.approx(card.on_demand / 7, abs=1e-6)
    assert one.spot == pytest.approx((card.spot or 0) / 7, abs=1e-6)
    name, three = catalog.choose("kubernetes", "a100-mig-3g.40gb", 2, None)
    assert (name, three.gpus) == ("a100-mig-3g.40gb-x2", 2)
    assert three.on_demand == pytest.approx(card.on_demand * 3 / 7 * 2, abs=1e-6)
    h100 = catalog.instance("kubernetes", "h100")
    _, slice_ = catalog.choose("kubernetes", "h100-mig-1g.10gb", 1, None)
    assert h100 is not None and slice_.on_demand == pytest.approx(h100.on_demand / 7, abs=1e-6)
    assert catalog.speed("a100-mig-1g.5gb") == pytest.approx(catalog.gpu_speed["a100"] / 7)
    # Teardown prices the recorded instance type the same way: an hour of a 1g slice is a seventh of the card's.
    assert actual_cost(catalog, "kubernetes", "a100-mig-1g.5gb", "on-demand", 1, 3600) == round(card.on_demand / 7, 4)


def test_a_repo_price_for_a_slice_wins_and_an_unknown_card_says_what_to_add(tmp_path: Path) -> None:
    (tmp_path / "pricing.yaml").write_text(
        "providers:\n  kubernetes:\n    instances:\n"
        "      a100-mig-1g.5gb: {gpu: a100-mig-1g.5gb, gpus: 1, on_demand: 0.25}\n"
    )
    catalog = load_catalog(tmp_path)
    assert catalog.choose("kubernetes", "a100-mig-1g.5gb", 1, None)[1].on_demand == 0.25
    with pytest.raises(InputError, match="prices no b300 to cut into MIG slices"):
        catalog.choose("kubernetes", "b300-mig-1g.23gb", 1, None)


# ---------------------------------------------------------------- preflight against the cluster's nodes


def mig_project(root: Path, gpu_type: str) -> Path:
    config = write_project(root, spec_extra="  gpu_count: 1\n  image: registry.example/train:1\n")
    text = config.read_text().replace("provider: local", "provider: kubernetes")
    config.write_text(text.replace("gpu_type: cpu", f"gpu_type: {gpu_type}"))
    return config


def add_node(k8s: K8sEmulator, name: str, allocatable: dict[str, str]) -> None:
    from kubernetes import client, config

    core = client.CoreV1Api(config.new_client_from_config(config_file=str(k8s.kubeconfig)))
    core.create_node(
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}, "status": {"allocatable": allocatable}}
    )


def preflight(capsys: pytest.CaptureFixture[str], config: Path) -> tuple[int, str, str]:
    code = main(["preflight", "--config", str(config), "--json"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_line(err: str) -> str:
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    assert "Traceback" not in err
    return line


def test_preflight_refuses_a_mig_profile_no_node_advertises(
    tmp_path: Path, k8s: K8sEmulator, capsys: pytest.CaptureFixture[str]
) -> None:
    add_node(k8s, "gpu-1", {"cpu": "64", "nvidia.com/mig-1g.10gb": "7", "nvidia.com/mig-3g.40gb": "2"})
    add_node(k8s, "gpu-2", {"cpu": "64", "nvidia.com/gpu": "8"})
    config = mig_project(tmp_path / "p", "a100-mig-1g.5gb")
    code, _, err = preflight(capsys, config)
    assert code == 2, err
    line = error_line(err)
    assert f"{config}:16: resources.gpu_type" in line
    assert "no node of the cluster advertises nvidia.com/mig-1g.5gb (MIG profiles offered: 1g.10gb, 3g.40gb)" in line
    assert "fix: set resources.gpu_type to a100-mig-1g.10gb" in line


def test_preflight_accepts_a_mig_profile_a_node_advertises(
    tmp_path: Path, k8s: K8sEmulator, capsys: pytest.CaptureFixture[str]
) -> None:
    add_node(k8s, "gpu-1", {"cpu": "64", "nvidia.com/mig-1g.5gb": "7"})
    config = mig_project(tmp_path / "p", "a100-mig-1g.5gb")
    code, out, err = preflight(capsys, config)
    assert code == 0, err
    rows = dict(json.loads(out)["checks"])
    assert rows["gpu slices"] == "a100-mig-1g.5gb: 7 slice(s) advertised by the cluster's nodes"
    assert "a100-mig-1g.5gb (kubernetes) is in the pricing catalog" in rows["pricing"]


def test_preflight_refuses_a_malformed_mig_profile_in_one_line(
    tmp_path: Path, k8s: K8sEmulator, capsys: pytest.CaptureFixture[str]
) -> None:
    config = mig_project(tmp_path / "p", "a100-mig-1g5gb")
    code, _, err = preflight(capsys, config)
    assert code == 2, err
    line = error_line(err)
    assert f"{config}:16: resources.gpu_type: resources.gpu_type 'a100-mig-1g5gb' is not a MIG profile" in line
    assert "fix: write it as <card>-mig-<g>g.<memory>gb, e.g. a100-mig-1g.5gb" in line


# ---------------------------------------------------------------- reading Kueue's Workload


def workload(job: str, *conditions: dict[str, str], uid: str | None = None) -> dict[str, Any]:
    """A Workload as Kueue makes one for a Job (owned by it), with the given status conditions."""
    owner = {"apiVersion": "batch/v1", "kind": "Job", "name": job, "uid": uid or "job-uid", "controller": True}
    body: dict[str, Any] = {
        "apiVersion": "kueue.x-k8s.io/v1beta1",
        "kind": "Workload",
        "metadata": {"name": f"job-{job}-1a2b3", "namespace": "default", "ownerReferences": [owner]},
        "spec": {
            "queueName": "team-vision",
            "podSets": [{"name": "main", "count": 1, "template": {"spec": {"containers": []}}}],
        },
    }
    if conditions:
        body["status"] = {"conditions": list(conditions)}
    valid_workload(body)
    return body


def condition(kind: str, status: str, message: str = "", at: str = "2026-01-01T00:00:00Z") -> dict[str, str]:
    return {"type": kind, "status": status, "reason": "Pending" if status == "False" else kind,
            "message": message, "lastTransitionTime": at}  # fmt: skip


def test_admission_reads_the_workloads_conditions() -> None:
    waiting = k8s_queue.admission(workload("j", condition("QuotaReserved", "False", "insufficient quota")))
    assert (waiting.quota_reserved, waiting.admitted, waiting.reason) == (False, False, "insufficient quota")
    admitted = k8s_queue.admission(
        workload("j", condition("QuotaReserved", "True"), condition("Admitted", "True", at="2026-01-01T00:05:00Z"))
    )
    assert admitted.admitted and admitted.admitted_at == datetime(2026, 1, 1, 0, 5, tzinfo=UTC)
    summary = {"items": [{"metadata": {"name": "other"}, "positionInLocalQueue": 0},
                         {"metadata": {"name": "job-j-1a2b3"}, "positionInLocalQueue": 2}]}  # fmt: skip
    assert k8s_queue.pending_position(summary, "job-j-1a2b3") == 3
    line = k8s_queue.waiting_line("team-vision", waiting, 3)
    assert line.startswith("waiting for admission in queue team-vision (position 3: 2 workloads ahead): insufficient")
    job = {"kind": "Job", "metadata": {"name": "j", "uid": "job-uid"}}
    assert k8s_queue.owned_by(workload("j"), job) and not k8s_queue.owned_by(workload("j", uid="another"), job)
    # Held for Kueue: a Job's (or TrainJob's) spec.suspend, a PyTorchJob's spec.runPolicy.suspend.
    assert k8s_queue.suspended({"spec": {"suspend": True}}) and k8s_queue.suspended(
        {"spec": {"runPolicy": {"suspend": True}}}
    )
    assert not k8s_queue.suspended({"spec": {"suspend": False}})


# ---------------------------------------------------------------- acceptance: the queue wait costs nothing


class QueuedKubelet(KubeletDaemon):
    """The Job controller's rule for a suspended Job, on top of the test kubelet: no pod until it is
    unsuspended (what Kueue does when it admits the Job)."""

    def _on_event(self, kind: str, job: dict[str, Any]) -> None:
        held = bool((job.get("spec") or {}).get("suspend"))
        if held:
            return
        if kind == "MODIFIED" and job.get("metadata", {}).get("name") not in self.kubelets:
            kind = "ADDED"  # let go: its pods start now
        super()._on_event(kind, job)


class Lines:
    """A process's stderr, read in the background so it never blocks; waited on by content."""

    def __init__(self, stream: Any) -> None:
        self.lines: list[str] = []
        self.changed = threading.Condition()
        self.reader = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.reader.start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            with self.changed:
                self.lines.append(line.rstrip("\n"))
                self.changed.notify_all()

    def wait_for(self, text: str) -> str:
        def found() -> str | None:
            return next((line for line in self.lines if text in line), None)

        with self.changed:
            assert self.changed.wait_for(lambda: found() is not None, HANG_S), "\n".join(self.lines[-30:])
        line = found()
        assert line is not None
        return line


@pytest.fixture
def queued_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[K8sEmulator]:
    """An emulator of this test's own, serving Kueue's Workloads. Its own, because the scripted answer
    of the visibility API makes kmock match every later request against all it has served so far: on
    the session's emulator, with its long history, that would slow every request of later tests."""
    from fixtures_k8s import K8sEmulator

    emulator = K8sEmulator(tmp_path / "kubeconfig")
    emulator.start()
    monkeypatch.setenv("KUBECONFIG", str(emulator.kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    emulator.install("kueue.x-k8s.io/v1beta1/workloads", "Workload")
    try:
        yield emulator
    finally:
        emulator.stop()


@pytest.mark.integration
@pytest.mark.slow
def test_a_job_kueue_has_not_admitted_shows_the_wait_and_costs_nothing_until_it_runs(
    tmp_path: Path,
    queued_cluster: K8sEmulator,
    bucket: MotoServer,  # noqa: F811
) -> None:
    from kubernetes import client, config

    k8s = queued_cluster
    kueue = config.new_client_from_config(config_file=str(k8s.kubeconfig))  # the test, acting as Kueue

    config = cluster_project(tmp_path / "proj")
    config.write_text(config.read_text().replace("  image:", "  options: {queue: team-vision}\n  image:", 1))
    project = config.parent
    plain = kubelet(k8s, project, tmp_path / "node")  # the pipeline tests' node, made to honour suspend
    node = QueuedKubelet(plain.api, images=plain.images, root=plain.root, node_env=plain.node_env)
    with node:
        code, prov, err = run_cli(project, "provision")
        assert code == 0, err
        (job,) = k8s.objects("jobs")
        name = job["metadata"]["name"]
        assert job["spec"]["suspend"] is True and job["metadata"]["labels"][k8s_queue.QUEUE_LABEL] == "team-vision"
        # Kueue has made the Workload, found no quota for it, and puts it third in the LocalQueue.
        custom = client.CustomObjectsApi(kueue)
        pending = condition("QuotaReserved", "False", "couldn't assign flavors to pod set main: insufficient quota")
        custom.create_namespaced_custom_object(*WORKLOADS[:2], "default", WORKLOADS[2], workload(name, pending))
        answer_pending_workloads(k8s, f"job-{name}-1a2b3", position=2)

        with training(project, prov["run_id"]) as (train, err_lines, out_lines):
            line = err_lines.wait_for("waiting for admission in queue team-vision")
            assert "(position 3: 2 workloads ahead)" in line and "insufficient quota" in line
            assert node.kubelets == {}  # nothing runs while it waits

            # Kueue admits it: quota reserved and admitted on the Workload, then the Job unsuspended.
            at = datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
            admitted = {
                "conditions": [condition("QuotaReserved", "True", at=at), condition("Admitted", "True", at=at)],
                "admission": {"clusterQueue": "cluster-gpu", "podSetAssignments": [{"name": "main"}]},
            }
            custom.patch_namespaced_custom_object(
                *WORKLOADS[:2], "default", WORKLOADS[2], f"job-{name}-1a2b3", {"status": admitted}
            )
            client.BatchV1Api(kueue).patch_namespaced_job(name, "default", {"spec": {"suspend": False}})
            assert train.wait(HANG_S) == 0, "\n".join(err_lines.lines[-40:])
        out = "\n".join(out_lines.lines)
        torn, _, err = run_cli(project, "teardown", "--run-id", prov["run_id"])
        assert torn == 0, err
    assert not node.errors
    assert node.kubelets[name].exit_codes == [0]

    record = SqliteLedger(project / ".gpuline" / "ledger.db").get_run(prov["run_id"])
    t = record.times
    assert t.provisioned is not None and t.admitted is not None and t.pod_running is not None
    assert t.admitted == datetime.fromisoformat(at.replace("Z", "+00:00"))  # Kueue's own time
    assert t.provisioned < t.admitted <= t.pod_running < t.pod_finished  # type: ignore[operator]
    assert record.queue_seconds > 0
    # GPU time and cost come from the pod's run alone: the wait in the queue cost nothing.
    assert record.pod_seconds > 0 and record.gpu_seconds == pytest.approx(record.pod_seconds, abs=1e-3)
    catalog = load_catalog(project)
    expected = actual_cost(catalog, "kubernetes", record.instance_type, record.lane, 1, record.pod_seconds)
    # Both are rounded to 4 decimals from spans that may differ by milliseconds: one unit apart at most.
    assert record.actual_usd == pytest.approx(expected, abs=1.5e-4)
    assert json.loads(out)["run_id"] == prov["run_id"]


@contextmanager
def training(project: Path, run_id: str) -> Iterator[tuple[subprocess.Popen[str], Lines, Lines]]:
    """`gpuline train` in the background, its output read as it comes; never left running."""
    train = subprocess.Popen(
        [sys.executable, "-m", "gpuline.cli", "train", "--run-id", run_id, "--json"],
        cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    err_lines, out_lines = Lines(train.stderr), Lines(train.stdout)
    try:
        yield train, err_lines, out_lines
    finally:
        if train.poll() is None:
            train.kill()
            train.wait(HANG_S)
        err_lines.reader.join(HANG_S)
        out_lines.reader.join(HANG_S)


def answer_pending_workloads(k8s: K8sEmulator, workload_name: str, position: int) -> None:
    """Kueue's visibility API for the LocalQueue (an aggregated API: the emulator answers it as scripted)."""
    path = "/apis/visibility.kueue.x-k8s.io/v1beta1/namespaces/default/localqueues/team-vision/pendingworkloads"
    ahead = [{"metadata": {"name": f"other-{i}"}, "positionInLocalQueue": i} for i in range(position)]
    summary = {"kind": "PendingWorkloadsSummary", "apiVersion": "visibility.kueue.x-k8s.io/v1beta1",
               "items": [*ahead, {"metadata": {"name": workload_name}, "positionInLocalQueue": position}]}  # fmt: skip
    k8s._on_loop(lambda: k8s._emulator[f"get {path}"] << summary)


def run_cli(project: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    done = subprocess.run(
        [sys.executable, "-m", "gpuline.cli", *args, "--json"],
        cwd=project, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    return done.returncode, json.loads(done.stdout or "{}"), done.stderr
