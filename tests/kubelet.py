"""A test kubelet (and Job controller) for one Job: runs each pod's command here, as a subprocess.

The kmock emulator stores Jobs but runs nothing. This stands in for what a cluster does with a Job
gpuline created, close enough that the pod contract really runs (the supervisor, checkpoints to S3 on
moto, metrics, the exit code):

- **A pod** is the Job's pod template, run locally: the container's ``command`` with its ``env``
  (plus the node's environment: PATH with this venv's ``python``, AWS pointing at moto), in the
  directory its image maps to (``images``), each ``emptyDir`` a fresh folder per pod whose
  ``mountPath`` is rewritten in env values, ``HOSTNAME`` the pod's name. Only PID 1 (the command) is
  signalled, as a container runtime does.
- **Eviction** is what the eviction API and the kubelet do: the pod gets the ``DisruptionTarget``
  condition, then SIGTERM, then SIGKILL after ``terminationGracePeriodSeconds``.
- **The Job controller** applies the Job's ``podFailurePolicy`` to a failed pod (rules in order:
  ``onPodConditions``, then ``onExitCodes``; no match counts), then replaces the pod unless the Job
  failed (``FailJob``, or more counted failures than ``backoffLimit``).

With an emulator, pods and the Job's status are written to it through the official client, as the
real components would (pod phase, container state, conditions; Job active/succeeded/failed and its
Complete/Failed condition). A pod's own log is kept in :attr:`Pod.lines`.

:class:`OperatorKubelet` is the same for the multi-node workloads a cluster's operators run, a
Kubeflow Trainer ``TrainJob`` and a Training Operator ``PyTorchJob``: it makes every node's pod as
their controllers do (names, labels, torchrun's ``PET_*`` environment), runs them all at once, and
moves the workload's status as they would. What a kubelet does for any pod is done here too: each
``$(VAR)`` in a command is expanded from the container's environment, and ``valueFrom.fieldRef``
values are read from the pod.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from gpuline.training.in_pod import EVENT_MARK

HANG_S = 300.0  # only ever reached when something is broken: a test fails instead of hanging


def now() -> str:
    # Microseconds, as RFC 3339 allows: a pod that ran a fraction of a second still ran for > 0 s.
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass
class PodPlan:
    """One pod as its controller made it (from a Job's template, a TrainJob's runtime, a PyTorchJob's
    replica), before a kubelet runs it: one container."""

    name: str
    namespace: str
    labels: dict[str, str]
    annotations: dict[str, str]
    spec: dict[str, Any]
    ip: str = "127.0.0.1"  # the pod's own address on this machine (all of 127/8 is the loopback)

    @property
    def container(self) -> dict[str, Any]:
        (container,) = self.spec["containers"]
        return dict(container)


@dataclass
class Pod:
    name: str
    process: subprocess.Popen[bytes]
    volumes: dict[str, Path]
    grace_s: float
    plan: PodPlan | None = None
    lines: list[str] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    conditions: list[dict[str, str]] = field(default_factory=list)
    changed: threading.Condition = field(default_factory=threading.Condition)
    reader: threading.Thread | None = None
    started_at: str = field(default_factory=now)

    @property
    def disrupted(self) -> bool:
        return any(c["type"] == "DisruptionTarget" and c["status"] == "True" for c in self.conditions)

    def read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            with self.changed:
                self.lines.append(line)
                if line.startswith(EVENT_MARK):
                    self.events.append(json.loads(line.removeprefix(EVENT_MARK)))
                self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    def wait_for(self, what: Callable[[Pod], bool], description: str) -> None:
        """Until ``what`` holds for the pod's log and events (never a sleep: woken by each new line)."""
        with self.changed:
            if not self.changed.wait_for(lambda: what(self) or self.process.poll() is not None, HANG_S):
                raise AssertionError(f"pod {self.name}: timed out waiting for {description}")
            if not what(self):
                tail = "\n".join(self.lines[-30:])
                raise AssertionError(f"pod {self.name} ended before {description}:\n{tail}")

    def wait_for_line(self, text: str) -> None:
        self.wait_for(lambda p: any(text in line for line in p.lines), repr(text))

    def wait_for_event(self, kind: str, **match: Any) -> dict[str, Any]:
        def found(p: Pod) -> bool:
            return any(e["event"] == kind and all(e.get(k) == v for k, v in match.items()) for e in p.events)

        self.wait_for(found, f"event {kind} {match}")
        return next(e for e in self.events if e["event"] == kind and all(e.get(k) == v for k, v in match.items()))

    def wait(self) -> int:
        code = self.process.wait(HANG_S)
        if self.reader is not None:
            self.reader.join(HANG_S)
        # A shell reports a signal as 128+N, and so does a container runtime.
        return code if code >= 0 else 128 - code


# ---------------------------------------------------------------- what a kubelet does for any pod

_REFERENCE = re.compile(r"\$\$|\$\(([-._a-zA-Z][-._a-zA-Z0-9]*)\)")
_FIELD = re.compile(r"metadata\.(labels|annotations)\['([^']+)'\]")


def expand(text: str, env: Mapping[str, str]) -> str:
    """A kubelet's ``$(VAR)`` expansion: ``$$`` is a ``$``, an unknown ``$(VAR)`` stays as written."""

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return _REFERENCE.sub(one, text)


def field_value(plan: PodPlan, path: str) -> str:
    """The downward API: ``valueFrom.fieldRef`` read from the pod (the completion index, its name...)."""
    simple = {"metadata.name": plan.name, "metadata.namespace": plan.namespace, "status.podIP": plan.ip}
    if path in simple:
        return simple[path]
    found = _FIELD.fullmatch(path)
    if found is None:
        raise AssertionError(f"the test kubelet cannot resolve fieldRef {path!r}")
    source = plan.labels if found.group(1) == "labels" else plan.annotations
    return source.get(found.group(2), "")


def pod_env(
    plan: PodPlan,
    volumes: Mapping[str, Path],
    root: Path,
    node_env: Mapping[str, str],
    network: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The container's environment here: the node's (this venv's ``python`` first on PATH), then the
    container's own in order, each ``emptyDir`` mount path rewritten to the pod's folder; last what
    ``network`` says the cluster's names are on this machine."""
    container = plan.container
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container.get("volumeMounts", [])}
    env = {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "HOME": str(root),
        "HOSTNAME": plan.name,
        **node_env,
    }
    for item in container.get("env", []):
        source = (item.get("valueFrom") or {}).get("fieldRef")
        value = field_value(plan, source["fieldPath"]) if source else expand(item.get("value", ""), env)
        for mount, local in mounts.items():
            if value == mount or value.startswith(mount + "/"):
                value = str(local) + value[len(mount) :]
        env[item["name"]] = value
    return {**env, **(network or {})}


def start_pod(
    plan: PodPlan,
    *,
    images: Mapping[str, Path],
    root: Path,
    node_env: Mapping[str, str],
    network: Mapping[str, str] | None = None,
) -> Pod:
    """Run the plan's container as a subprocess: its command (``$(VAR)`` expanded) and args, in the
    folder its image maps to, each volume a fresh folder of this pod."""
    spec, container = plan.spec, plan.container
    volumes = {}
    for volume in spec.get("volumes", []):
        volumes[volume["name"]] = root / plan.name / volume["name"]
        volumes[volume["name"]].mkdir(parents=True)
    env = pod_env(plan, volumes, root, node_env, network)
    argv = [expand(a, env) for a in [*container["command"], *container.get("args", [])]]
    cwd = images[container["image"]] / container.get("workingDir", ".")
    process = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    pod = Pod(plan.name, process, volumes, float(spec.get("terminationGracePeriodSeconds", 30)), plan=plan)
    pod.reader = threading.Thread(target=pod.read, name=f"log-{plan.name}", daemon=True)
    pod.reader.start()
    return pod


def stop_pod(pod: Pod) -> None:
    """What deleting a running pod does: SIGTERM, then SIGKILL after its grace period."""
    if pod.process.poll() is None:
        pod.process.send_signal(signal.SIGTERM)
        try:
            pod.process.wait(pod.grace_s)
        except subprocess.TimeoutExpired:
            pod.process.kill()


def publish_pod(api: Any, pod: Pod, phase: str, code: int | None = None) -> None:
    """The pod and its status in the emulator, as the kubelet reports them (created when it first runs)."""
    if api is None:
        return
    from kubernetes import client

    assert pod.plan is not None
    plan, container = pod.plan, pod.plan.container
    state: dict[str, Any] = {"running": {"startedAt": pod.started_at}}
    if code is not None:
        state = {"terminated": {"exitCode": code, "startedAt": pod.started_at, "finishedAt": now()}}
    status = {
        "name": container["name"],
        "image": container["image"],
        "imageID": "",
        "ready": code is None,
        "restartCount": 0,  # restartPolicy Never: a new pod, never a restarted container
        "state": state,
    }
    body = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": plan.name,
            "namespace": plan.namespace,
            "labels": plan.labels,
            "annotations": plan.annotations,
        },
        "spec": plan.spec,
        "status": {"phase": phase, "podIP": plan.ip, "conditions": pod.conditions, "containerStatuses": [status]},
    }
    core = client.CoreV1Api(api)
    if phase == "Running" and not pod.conditions:
        core.create_namespaced_pod(plan.namespace, body)
    else:
        core.patch_namespaced_pod(plan.name, plan.namespace, body)


class TestKubelet:
    __test__ = False  # not a test class, whatever pytest thinks of the name

    def __init__(
        self,
        job: Mapping[str, Any],
        *,
        images: Mapping[str, Path],
        root: Path,
        node_env: Mapping[str, str] | None = None,
        api: Any = None,
    ) -> None:
        self.job = json.loads(json.dumps(job))
        self.images = dict(images)
        self.root = root
        self.node_env = dict(node_env or {})
        self.api = api  # a kubernetes ApiClient for the emulator, or None
        self.pods: list[Pod] = []
        self.exit_codes: list[int] = []
        self.failed = 0
        self.result: str | None = None  # "Complete" or "Failed"
        self.reason = ""
        self.deleted = False  # the Job was deleted: its pods are stopped, none is replaced

    # ------------------------------------------------------------ the kubelet

    @property
    def template(self) -> dict[str, Any]:
        template: dict[str, Any] = self.job["spec"]["template"]
        return template

    def start_pod(self) -> Pod:
        meta = self.job["metadata"]
        plan = PodPlan(
            name=f"{meta['name']}-{len(self.pods)}",
            namespace=meta["namespace"],
            labels={**self.template["metadata"].get("labels", {}), "job-name": meta["name"]},
            annotations={"batch.kubernetes.io/job-completion-index": "0"},
            spec=self.template["spec"],
        )
        node_env = dict(self.node_env)
        if self.job["spec"].get("completionMode") == "Indexed":
            node_env["JOB_COMPLETION_INDEX"] = "0"
        pod = start_pod(plan, images=self.images, root=self.root, node_env=node_env)
        self.pods.append(pod)
        publish_pod(self.api, pod, "Running")
        self._publish_job()
        return pod

    def evict(self, pod: Pod) -> int:
        """The eviction API, then the kubelet: DisruptionTarget, SIGTERM, SIGKILL after the grace period."""
        pod.conditions.append({"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"})
        publish_pod(self.api, pod, "Running")
        pod.process.send_signal(signal.SIGTERM)
        try:
            pod.process.wait(pod.grace_s)
        except subprocess.TimeoutExpired:
            pod.process.kill()
        return pod.wait()

    # ------------------------------------------------------------ the Job controller

    def run(self, on_start: Callable[[Pod], None] | None = None) -> str:
        """Run pods until the Job completes or fails; ``on_start`` sees each new pod (to evict it, say)."""
        while self.result is None and not self.deleted:
            pod = self.start_pod()
            if on_start is not None:
                on_start(pod)
            code = pod.wait()
            self.exit_codes.append(code)
            publish_pod(self.api, pod, "Succeeded" if code == 0 else "Failed", code)
            self._settle(pod, code)
            self._publish_job()
        return self.result

    def _settle(self, pod: Pod, code: int) -> None:
        if code == 0:
            self.result, self.reason = "Complete", "Completed"
            return
        action = self._action(pod, code)
        if action == "FailJob":
            self.result, self.reason = "Failed", "PodFailurePolicy"
        elif action == "Count":
            self.failed += 1
            if self.failed > int(self.job["spec"].get("backoffLimit", 6)):
                self.result, self.reason = "Failed", "BackoffLimitExceeded"

    def _action(self, pod: Pod, code: int) -> str:
        """The first podFailurePolicy rule that matches, as the Job controller reads it; else Count."""
        for rule in (self.job["spec"].get("podFailurePolicy") or {}).get("rules", []):
            for condition in rule.get("onPodConditions", []):
                if any(c["type"] == condition["type"] and c["status"] == condition["status"] for c in pod.conditions):
                    return str(rule["action"])
            codes = rule.get("onExitCodes")
            if codes is not None:
                listed = code in codes["values"]
                if listed == (codes["operator"] == "In"):
                    return str(rule["action"])
        return "Count"

    # ------------------------------------------------------------ status in the emulator

    def _publish_job(self) -> None:
        if self.api is None:
            return
        from kubernetes import client

        running = 1 if self.result is None else 0
        status: dict[str, Any] = {"active": running, "failed": len(self.exit_codes) - (self.result == "Complete")}
        if self.result is not None:
            status["succeeded"] = int(self.result == "Complete")
            status["conditions"] = [{"type": self.result, "status": "True", "reason": self.reason}]
        meta = self.job["metadata"]
        client.BatchV1Api(self.api).patch_namespaced_job(meta["name"], meta["namespace"], {"status": status})


# ---------------------------------------------------------------- the operators: TrainJob, PyTorchJob

# Kubeflow Trainer v2.3.0 (kubeflow/trainer 658725bd): pkg/constants/constants.go (the trainer's
# replicated job and container are "node", its port 29500) and pkg/runtime/framework/plugins/torch/
# torch.go (PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK from the completion index, PET_MASTER_ADDR
# <name>-node-0-0.<name>, PET_MASTER_PORT), with JobSet's naming of the pods of an Indexed Job.
TRAINER = ("trainer.kubeflow.org", "v1alpha1")
TRAINER_NODE = "node"
TRAINER_PORT = 29500
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
# The runtime a TrainJob gets when the emulator holds none of that name: torch-distributed, as the
# Trainer's chart installs it.
TORCH_DISTRIBUTED = Path(__file__).parent / "data" / "crds" / "trainer-torch-distributed-runtime.yaml"
# Training Operator v1.9.0 (kubeflow/training-operator 6f74c7f6): pkg/apis/kubeflow.org/v1/pytorch_types.go
# (the "pytorch" container, its "pytorchjob-port" defaulted to 23456), pkg/controller.v1/pytorch/envvar.go
# and master.go (MASTER_*, PET_MASTER_*, WORLD_SIZE, RANK and PET_NODE_RANK: the master 0, worker i
# i + 1, PET_NPROC_PER_NODE, PET_NNODES), common_types.go (the pods' labels).
KUBEFLOW = ("kubeflow.org", "v1")
PYTORCH_CONTAINER = "pytorch"
PYTORCH_PORT_NAME, PYTORCH_PORT = "pytorchjob-port", 23456
REPLICA_LABELS = "training.kubeflow.org/"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def upsert(env: Sequence[dict[str, Any]], more: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Environment variables by name, as the Trainer's apply.UpsertEnvVars: replaced in place, else appended."""
    out = [dict(e) for e in env]
    for item in more:
        at = next((i for i, e in enumerate(out) if e["name"] == item["name"]), None)
        if at is None:
            out.append(dict(item))
        else:
            out[at] = dict(item)
    return out


def rank_field() -> dict[str, Any]:
    """The downward API's view of a pod's completion index (how the Trainer passes PET_NODE_RANK)."""
    return {"fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX}']"}}


def trainer_container(pod_spec: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = next(c for c in pod_spec["containers"] if c["name"] == TRAINER_NODE)
    return found


def apply_runtime_patches(trainjob: Mapping[str, Any], template: dict[str, Any]) -> None:
    """A TrainJob's ``runtimePatches`` onto its ``node`` pod template (labels, volumes, mounts, placement)."""
    for patch in trainjob["spec"].get("runtimePatches") or []:
        jobs = patch.get("trainingRuntimeSpec", {}).get("template", {}).get("spec", {}).get("replicatedJobs", [])
        for job in (j for j in jobs if j["name"] == TRAINER_NODE):
            pod = job.get("template", {}).get("spec", {}).get("template", {})
            meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
            for key in ("labels", "annotations"):
                template["metadata"].setdefault(key, {}).update(meta.get(key) or {})
            target = template["spec"]
            target["volumes"] = [*target.get("volumes", []), *spec.get("volumes", [])]
            for container in spec.get("containers", []):
                into = next(c for c in target["containers"] if c["name"] == container["name"])
                into["volumeMounts"] = [*into.get("volumeMounts", []), *container.get("volumeMounts", [])]
            for key in ("nodeSelector", "terminationGracePeriodSeconds", "serviceAccountName"):
                if key in spec:
                    target[key] = spec[key]
            target["tolerations"] = [*target.get("tolerations", []), *spec.get("tolerations", [])]


def trainjob_plans(trainjob: Mapping[str, Any], runtime: Mapping[str, Any] | None) -> list[PodPlan]:
    """The pods the Trainer (and JobSet under it) make for a TrainJob on ``runtime``, node 0 first."""
    meta, trainer = trainjob["metadata"], trainjob["spec"].get("trainer") or {}
    name = meta["name"]
    runtime_spec = (runtime or yaml.safe_load(TORCH_DISTRIBUTED.read_text()))["spec"]
    policy = runtime_spec.get("mlPolicy") or {}
    (job,) = [j for j in runtime_spec["template"]["spec"]["replicatedJobs"] if j["name"] == TRAINER_NODE]
    template = json.loads(json.dumps(job["template"]["spec"]["template"]))
    template.setdefault("metadata", {})
    container = trainer_container(template["spec"])
    for key, into in (("image", "image"), ("command", "command"), ("args", "args"), ("resourcesPerNode", "resources")):
        if trainer.get(key):
            container[into] = trainer[key]
    nodes = int(trainer.get("numNodes") or policy.get("numNodes") or 1)
    master = f"{name}-{TRAINER_NODE}-0-0.{name}"
    env = upsert(container.get("env", []), trainer.get("env", []))
    if "torch" in policy:
        env = upsert(env, [
            {"name": "PET_NNODES", "value": str(nodes)},
            {"name": "PET_NPROC_PER_NODE", "value": str(trainer.get("numProcPerNode") or "auto")},
            {"name": "PET_NODE_RANK", "valueFrom": rank_field()},
            {"name": "PET_MASTER_ADDR", "value": master},
            {"name": "PET_MASTER_PORT", "value": str(TRAINER_PORT)},
        ])  # fmt: skip
    # The Job controller adds its pods' index (an Indexed Job's) after what the template has.
    container["env"] = [*env, {"name": "JOB_COMPLETION_INDEX", "valueFrom": rank_field()}]
    container["ports"] = [*container.get("ports", []), {"containerPort": TRAINER_PORT}]
    apply_runtime_patches(trainjob, template)
    template["spec"]["subdomain"] = name  # JobSet's headless Service: pods are <hostname>.<name>
    plans = []
    for index in range(nodes):
        labels = {**template["metadata"].get("labels", {}), "jobset.sigs.k8s.io/jobset-name": name,
                  "jobset.sigs.k8s.io/replicatedjob-name": TRAINER_NODE, COMPLETION_INDEX: str(index)}  # fmt: skip
        annotations = {**template["metadata"].get("annotations", {}), COMPLETION_INDEX: str(index)}
        spec = json.loads(json.dumps(template["spec"]))
        # JobSet names a pod <jobset>-<job>-<job index>-<pod index> plus a random suffix; the hostname, here.
        plans.append(PodPlan(f"{name}-{TRAINER_NODE}-0-{index}", meta["namespace"], labels, annotations, spec,
                             ip=f"127.0.0.{index + 1}"))  # fmt: skip
    return plans


def pytorchjob_plans(job: Mapping[str, Any]) -> list[PodPlan]:
    """The pods the Training Operator makes for a PyTorchJob: the master, then the workers."""
    meta, spec = job["metadata"], job["spec"]
    name, replicas = meta["name"], spec["pytorchReplicaSpecs"]
    total = sum(int(r.get("replicas", 1)) for r in replicas.values())
    nproc = spec.get("nprocPerNode")
    master = f"{name}-master-0"
    on_master = next(c for c in replicas["Master"]["template"]["spec"]["containers"] if c["name"] == PYTORCH_CONTAINER)
    port = next(
        (p["containerPort"] for p in on_master.get("ports", []) if p.get("name") == PYTORCH_PORT_NAME), PYTORCH_PORT
    )
    plans: list[PodPlan] = []
    for kind in ("Master", "Worker"):
        count = int(replicas[kind].get("replicas", 1)) if kind in replicas else 0
        for index in range(count):
            rank = index if kind == "Master" else index + 1
            template = json.loads(json.dumps(replicas[kind]["template"]))
            container = next(c for c in template["spec"]["containers"] if c["name"] == PYTORCH_CONTAINER)
            world = total * (int(nproc) if str(nproc).isdigit() else 1)
            added = {"PYTHONUNBUFFERED": "1", "MASTER_PORT": str(port), "PET_MASTER_PORT": str(port),
                     "MASTER_ADDR": master, "PET_MASTER_ADDR": master, "WORLD_SIZE": str(world), "RANK": str(rank),
                     "PET_NODE_RANK": str(rank)}  # fmt: skip
            if nproc is not None:
                added["PET_NPROC_PER_NODE"] = str(nproc)
            added["PET_NNODES"] = str(total)
            container["env"] = [*container.get("env", []), *({"name": k, "value": v} for k, v in added.items())]
            labels = {**template["metadata"].get("labels", {}), f"{REPLICA_LABELS}job-name": name,
                      f"{REPLICA_LABELS}replica-type": kind.lower(), f"{REPLICA_LABELS}replica-index": str(index),
                      f"{REPLICA_LABELS}operator-name": "pytorchjob-controller"}  # fmt: skip
            if kind == "Master":
                labels[f"{REPLICA_LABELS}job-role"] = "master"
            plans.append(PodPlan(f"{name}-{kind.lower()}-{index}", meta["namespace"], labels, {}, template["spec"],
                                 ip=f"127.0.0.{len(plans) + 1}"))  # fmt: skip
    return plans


class OperatorKubelet:
    """A TrainJob's or PyTorchJob's controller and the kubelet of its nodes: every node's pod at once.

    The pods are the controllers' (see :func:`trainjob_plans`, :func:`pytorchjob_plans`); the
    cluster's DNS and pod network are this machine's: the master's name resolves to 127.0.0.1 and its
    port is a free one here, and each pod has its own loopback address. torchrun ranks a rendezvous'
    nodes by their addresses, which on a cluster are the pods' own (so the master or node 0 is rank
    0); every pod here shares this machine's name, so each is told its address as torchrun's
    ``--local-addr`` (``PET_LOCAL_ADDR``). A pod that fails stops the others and fails the workload,
    as JobSet's default failure policy and a PyTorchJob with ``restartPolicy: Never`` do; nothing is
    replaced. With an emulator the pods and the workload's status are written to it."""

    __test__ = False

    def __init__(
        self,
        workload: Mapping[str, Any],
        *,
        images: Mapping[str, Path],
        root: Path,
        node_env: Mapping[str, str] | None = None,
        api: Any = None,
    ) -> None:
        self.workload = json.loads(json.dumps(workload))
        self.images, self.root, self.node_env, self.api = dict(images), root, dict(node_env or {}), api
        self.kind: str = self.workload["kind"]
        if self.kind == "TrainJob":
            self.plans = trainjob_plans(self.workload, self._runtime())
        else:
            self.plans = pytorchjob_plans(self.workload)
        self.port = str(free_port())
        self.pods: list[Pod] = []
        self.exit_codes: list[int] = []
        self.result: str | None = None  # the terminal condition the controller wrote
        self.reason = ""
        self.deleted = False

    def _runtime(self) -> dict[str, Any] | None:
        """The ClusterTrainingRuntime the TrainJob refers to, as the emulator holds it; None without one."""
        if self.api is None:
            return None
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        ref = self.workload["spec"]["runtimeRef"]
        try:
            raw = client.CustomObjectsApi(self.api).get_cluster_custom_object(
                *TRAINER, "clustertrainingruntimes", ref["name"], _preload_content=False
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        body: dict[str, Any] = json.loads(raw.data)
        return body

    def network(self, plan: PodPlan) -> dict[str, str]:
        names = {e["name"] for e in plan.container.get("env", [])}
        here = {"MASTER_ADDR": "127.0.0.1", "PET_MASTER_ADDR": "127.0.0.1"}
        here |= {"MASTER_PORT": self.port, "PET_MASTER_PORT": self.port}
        return {k: v for k, v in here.items() if k in names} | {"PET_LOCAL_ADDR": plan.ip}

    def run(self, on_start: Callable[[Pod], None] | None = None) -> str:
        """Run every node's pod until all have ended; returns the workload's terminal condition."""
        for plan in self.plans:
            pod = start_pod(
                plan, images=self.images, root=self.root, node_env=self.node_env, network=self.network(plan)
            )
            self.pods.append(pod)
            publish_pod(self.api, pod, "Running")
        self._publish_status()
        for pod in self.pods:
            if on_start is not None:
                on_start(pod)
        codes = self._wait_all()
        self.exit_codes = [codes[i] for i in range(len(self.pods))]
        succeeded = all(code == 0 for code in self.exit_codes)
        self.result = ("Complete" if self.kind == "TrainJob" else "Succeeded") if succeeded else "Failed"
        self.reason = _REASONS[(self.kind, succeeded)]
        if not self.deleted:
            self._publish_status()
        return self.result

    def _wait_all(self) -> dict[int, int]:
        import queue

        ended: queue.Queue[tuple[int, int]] = queue.Queue()
        for i, pod in enumerate(self.pods):
            threading.Thread(target=lambda i=i, pod=pod: ended.put((i, pod.wait())), daemon=True).start()
        codes: dict[int, int] = {}
        while len(codes) < len(self.pods):
            i, code = ended.get(timeout=HANG_S)
            codes[i] = code
            publish_pod(self.api, self.pods[i], "Succeeded" if code == 0 else "Failed", code)
            if code != 0:
                for other in self.pods:
                    stop_pod(other)  # the controller ends the workload: its other pods are deleted
        return codes

    # ------------------------------------------------------------ status in the emulator

    def _publish_status(self) -> None:
        if self.api is None:
            return
        from kubernetes import client

        meta = self.workload["metadata"]
        group, version = TRAINER if self.kind == "TrainJob" else KUBEFLOW
        plural = self.kind.lower() + "s"
        status = self._trainjob_status() if self.kind == "TrainJob" else self._pytorchjob_status()
        client.CustomObjectsApi(self.api).patch_namespaced_custom_object(
            group, version, meta["namespace"], plural, meta["name"], {"status": status}
        )

    def _counts(self) -> dict[str, int]:
        running = len(self.pods) if self.result is None else 0
        failed = sum(1 for c in self.exit_codes if c != 0)
        return {"active": running, "succeeded": len(self.exit_codes) - failed, "failed": failed}

    def _condition(self) -> list[dict[str, str]]:
        if self.result is None:
            return []
        message = "jobset completed successfully" if self.result != "Failed" else "one or more pods failed"
        return [{"type": self.result, "status": "True", "reason": self.reason, "message": message,
                 "lastTransitionTime": now()}]  # fmt: skip

    def _trainjob_status(self) -> dict[str, Any]:
        counts = self._counts()
        jobs = [{"name": TRAINER_NODE, "ready": counts["active"], "suspended": 0, **counts}]
        return {"conditions": self._condition(), "jobsStatus": jobs}

    def _pytorchjob_status(self) -> dict[str, Any]:
        ranks = [p.plan.labels.get(f"{REPLICA_LABELS}replica-type", "") for p in self.pods if p.plan]
        replicas = {}
        for kind in ("Master", "Worker"):
            mine = [i for i, r in enumerate(ranks) if r == kind.lower()]
            codes = [self.exit_codes[i] for i in mine if i < len(self.exit_codes)]
            active = len(mine) if self.result is None else 0
            replicas[kind] = {"active": active, "succeeded": codes.count(0), "failed": len(codes) - codes.count(0)}
        running = {
            "type": "Running",
            "status": "True" if self.result is None else "False",
            "reason": "PyTorchJobRunning",
        }
        created = {"type": "Created", "status": "True", "reason": "PyTorchJobCreated"}
        return {"conditions": [created, running, *self._condition()], "replicaStatuses": replicas}


_REASONS = {
    ("TrainJob", True): "AllJobsCompleted",  # JobSet's reasons, copied onto the TrainJob's condition
    ("TrainJob", False): "FailedJobs",
    ("PyTorchJob", True): "PyTorchJobSucceeded",
    ("PyTorchJob", False): "PyTorchJobFailed",
}


WATCHED = ("Job", "TrainJob", "PyTorchJob")


class KubeletDaemon:
    """The test kubelet in the background: watches the emulator for the workloads gpuline creates (the
    official client's watch on Jobs, TrainJobs and PyTorchJobs) and runs each one's pods as
    :class:`TestKubelet` (a Job) or :class:`OperatorKubelet` (a TrainJob, a PyTorchJob) does, in a
    thread per workload. A workload deleted while its pods run has them stopped as the garbage
    collector and the kubelet would: SIGTERM, then SIGKILL after the grace period; nothing replaces them."""

    __test__ = False

    def __init__(
        self,
        api: Any,
        *,
        images: Mapping[str, Path],
        root: Path,
        node_env: Mapping[str, str],
        namespace: str = "default",
    ) -> None:
        self.api, self.images, self.root, self.node_env = api, dict(images), root, dict(node_env)
        self.namespace = namespace
        self.kubelets: dict[str, TestKubelet | OperatorKubelet] = {}
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._started = threading.Condition()  # notified as each pod starts
        self._threads: list[threading.Thread] = []
        self._watchers = [
            threading.Thread(target=self._watch, args=(kind,), name=f"kubelet-watch-{kind}", daemon=True)
            for kind in WATCHED
        ]

    def __enter__(self) -> KubeletDaemon:
        for watcher in self._watchers:
            watcher.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for kubelet in list(self.kubelets.values()):
            kubelet.deleted = True  # leaving the test: what still runs is stopped, and not replaced
            self._stop_pods(kubelet)
        for watcher in self._watchers:
            watcher.join(HANG_S)
        for thread in self._threads:
            thread.join(HANG_S)

    def _list_call(self, kind: str) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        from kubernetes import client

        if kind == "Job":
            return client.BatchV1Api(self.api).list_namespaced_job, (self.namespace,)
        group, version = TRAINER if kind == "TrainJob" else KUBEFLOW
        plural = kind.lower() + "s"
        return client.CustomObjectsApi(self.api).list_namespaced_custom_object, (group, version, self.namespace, plural)

    def _watch(self, kind: str) -> None:
        from kubernetes import watch
        from urllib3.exceptions import HTTPError

        list_call, args = self._list_call(kind)
        while not self._stop.is_set():
            w = watch.Watch()
            try:
                # A short read timeout only so that leaving the test ends this thread; events wake it.
                for event in w.stream(list_call, *args, _request_timeout=1):
                    self._on_event(event["type"], {"kind": kind, **event["raw_object"]})
                    if self._stop.is_set():
                        break
            except HTTPError:
                continue  # the read timed out: watch again (the emulator replays what exists as ADDED)
            finally:
                w.stop()

    def _on_event(self, kind: str, job: dict[str, Any]) -> None:
        meta = job.get("metadata", {})
        name = meta.get("name", "")
        if (meta.get("labels") or {}).get("gpuline/managed") != "true":
            return
        if kind == "DELETED" and name in self.kubelets:
            self.kubelets[name].deleted = True
            self._stop_pods(self.kubelets[name])
        elif kind == "ADDED" and name not in self.kubelets:
            runs = TestKubelet if job["kind"] == "Job" else OperatorKubelet
            kubelet = runs(job, images=self.images, root=self.root, node_env=self.node_env, api=self.api)
            self.kubelets[name] = kubelet
            thread = threading.Thread(target=self._run, args=(kubelet,), name=f"job-{name}", daemon=True)
            self._threads.append(thread)
            thread.start()

    def _run(self, kubelet: TestKubelet | OperatorKubelet) -> None:
        def started(pod: Pod) -> None:
            with self._started:
                self._started.notify_all()

        try:
            kubelet.run(on_start=started)
        except Exception as exc:
            if not kubelet.deleted:  # a deleted Job's status cannot be written any more: expected
                self.errors.append(exc)

    def wait_for_pod(self) -> Pod:
        """The first pod of the first Job, once it runs (woken by its start, never a sleep)."""

        def first() -> Pod | None:
            return next((k.pods[0] for k in list(self.kubelets.values()) if k.pods), None)

        with self._started:
            if not self._started.wait_for(lambda: first() is not None, HANG_S):
                raise AssertionError("no pod started: did gpuline create a Job?")
        pod = first()
        assert pod is not None
        return pod

    @staticmethod
    def _stop_pods(kubelet: TestKubelet | OperatorKubelet) -> None:
        for pod in list(kubelet.pods):
            stop_pod(pod)
