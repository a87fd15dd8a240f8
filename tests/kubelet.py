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
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gpuline.training.in_pod import EVENT_MARK

HANG_S = 120.0  # only ever reached when something is broken: a test fails instead of hanging


def now() -> str:
    # Microseconds, as RFC 3339 allows: a pod that ran a fraction of a second still ran for > 0 s.
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass
class Pod:
    name: str
    process: subprocess.Popen[bytes]
    volumes: dict[str, Path]
    grace_s: float
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
        spec = self.template["spec"]
        (container,) = spec["containers"]
        name = f"{self.job['metadata']['name']}-{len(self.pods)}"
        volumes = {}
        for volume in spec.get("volumes", []):
            volumes[volume["name"]] = self.root / name / volume["name"]
            volumes[volume["name"]].mkdir(parents=True)
        env = self._env(container, volumes, name)
        cwd = self.images[container["image"]] / container.get("workingDir", ".")
        process = subprocess.Popen(
            container["command"], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        pod = Pod(name, process, volumes, float(spec.get("terminationGracePeriodSeconds", 30)))
        pod.reader = threading.Thread(target=pod.read, name=f"log-{name}", daemon=True)
        pod.reader.start()
        self.pods.append(pod)
        self._publish_pod(pod, "Running")
        self._publish_job()
        return pod

    def _env(self, container: dict[str, Any], volumes: dict[str, Path], name: str) -> dict[str, str]:
        mounts = {m["mountPath"]: volumes[m["name"]] for m in container.get("volumeMounts", [])}
        env = {
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "HOME": str(self.root),
            "HOSTNAME": name,
            **self.node_env,
        }
        if self.job["spec"].get("completionMode") == "Indexed":
            env["JOB_COMPLETION_INDEX"] = "0"
        for item in container.get("env", []):
            value = item.get("value", "")
            for mount, local in mounts.items():
                if value == mount or value.startswith(mount + "/"):
                    value = str(local) + value[len(mount) :]
            env[item["name"]] = value
        return env

    def evict(self, pod: Pod) -> int:
        """The eviction API, then the kubelet: DisruptionTarget, SIGTERM, SIGKILL after the grace period."""
        pod.conditions.append({"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"})
        self._publish_pod(pod, "Running")
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
            self._publish_pod(pod, "Succeeded" if code == 0 else "Failed", code)
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

    def _publish_pod(self, pod: Pod, phase: str, code: int | None = None) -> None:
        if self.api is None:
            return
        from kubernetes import client

        core = client.CoreV1Api(self.api)
        meta = self.job["metadata"]
        state: dict[str, Any] = {"running": {"startedAt": pod.started_at}}
        if code is not None:
            state = {"terminated": {"exitCode": code, "startedAt": pod.started_at, "finishedAt": now()}}
        body = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": pod.name,
                "namespace": meta["namespace"],
                "labels": {**self.template["metadata"].get("labels", {}), "job-name": meta["name"]},
                "annotations": {"batch.kubernetes.io/job-completion-index": "0"},
            },
            "spec": self.template["spec"],
            "status": {
                "phase": phase,
                "conditions": pod.conditions,
                "containerStatuses": [self._container_status(state, ready=code is None)],
            },
        }
        if phase == "Running" and not pod.conditions:
            core.create_namespaced_pod(meta["namespace"], body)
        else:
            core.patch_namespaced_pod(pod.name, meta["namespace"], body)

    def _container_status(self, state: dict[str, Any], *, ready: bool) -> dict[str, Any]:
        container = self.template["spec"]["containers"][0]
        return {
            "name": container["name"],
            "image": container["image"],
            "imageID": "",
            "ready": ready,
            "restartCount": 0,  # restartPolicy Never: a new pod, never a restarted container
            "state": state,
        }

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


class KubeletDaemon:
    """The test kubelet in the background: watches the emulator for the Jobs gpuline creates (the
    official client's watch) and runs each one's pods as :class:`TestKubelet` does, in a thread per
    Job. A Job deleted while its pod runs has that pod stopped as the garbage collector and the
    kubelet would: SIGTERM, then SIGKILL after the grace period; nothing replaces it."""

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
        self.kubelets: dict[str, TestKubelet] = {}
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._started = threading.Condition()  # notified as each pod starts
        self._threads: list[threading.Thread] = []
        self._watcher = threading.Thread(target=self._watch, name="kubelet-watch", daemon=True)

    def __enter__(self) -> KubeletDaemon:
        self._watcher.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for kubelet in list(self.kubelets.values()):
            kubelet.deleted = True  # leaving the test: what still runs is stopped, and not replaced
            self._stop_pods(kubelet)
        self._watcher.join(HANG_S)
        for thread in self._threads:
            thread.join(HANG_S)

    def _watch(self) -> None:
        from kubernetes import client, watch
        from urllib3.exceptions import HTTPError

        batch = client.BatchV1Api(self.api)
        while not self._stop.is_set():
            w = watch.Watch()
            try:
                # A short read timeout only so that leaving the test ends this thread; events wake it.
                for event in w.stream(batch.list_namespaced_job, self.namespace, _request_timeout=1):
                    self._on_event(event["type"], event["raw_object"])
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
            kubelet = TestKubelet(job, images=self.images, root=self.root, node_env=self.node_env, api=self.api)
            self.kubelets[name] = kubelet
            thread = threading.Thread(target=self._run, args=(kubelet,), name=f"job-{name}", daemon=True)
            self._threads.append(thread)
            thread.start()

    def _run(self, kubelet: TestKubelet) -> None:
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
    def _stop_pods(kubelet: TestKubelet) -> None:
        for pod in kubelet.pods:
            if pod.process.poll() is None:
                pod.process.send_signal(signal.SIGTERM)
                try:
                    pod.process.wait(pod.grace_s)
                except subprocess.TimeoutExpired:
                    pod.process.kill()
