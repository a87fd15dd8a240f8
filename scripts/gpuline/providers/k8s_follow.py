"""Following a train-mode workload until it ends: the official client's watch on it, with its pods
read back at each change, so the pipeline knows when the pods ran, how often one was replaced, and
how the workload ended. A Job, a TrainJob and a PyTorchJob are followed the same way; what differs
(where each is listed, which conditions end it, how its pods are numbered) is looked up by kind in
:mod:`gpuline.providers.k8s_workloads`.

The watch is the usual list-then-watch: a list gives the workload's state and a resource version, the
watch streams from it, and when the stream ends (the server's timeout, a dropped connection, a read
timeout with nothing to say, or ``410 Gone`` when the version expired) the loop lists again and
watches from the new version. Nothing sleeps: each turn waits on the API for the next change.

Pod 0's log (the pod that commits checkpoints: a Job's completion index 0, a TrainJob's first node,
a PyTorchJob's master) is copied to the job log as it is written, best effort: a cluster that does
not serve logs (or a pod gone before it is read) only loses those lines. The pods' times are summed
over every pod, all nodes of a multi-node run included.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from gpuline.providers import k8s_queue
from gpuline.providers.k8s_errors import as_error, status_of
from gpuline.providers.k8s_objects import parse_time
from gpuline.providers.k8s_workloads import End, parse_id, pod_rank, workload_end

if TYPE_CHECKING:
    from gpuline.providers.kubernetes import KubernetesProvider

WATCH_S = 60  # asked of the server per watch; it ends the stream then and the loop watches again
READ_SLACK_S = 15  # on top, for the client: a server that ignores the timeout still gets the stream cut
DISRUPTION = "DisruptionTarget"


@dataclass
class PodRun:
    """One pod of the workload as its status last said."""

    name: str
    index: int
    started: datetime | None = None
    finished: datetime | None = None
    exit_code: int | None = None
    disrupted: bool = False
    restarts: int = 0  # container restarts inside the pod (restartPolicy Never keeps this 0)

    @property
    def seconds(self) -> float:
        if self.started is None or self.finished is None:
            return 0.0
        return max(0.0, (self.finished - self.started).total_seconds())


@dataclass
class Followed:
    """How the workload ended and what its pods did."""

    end: End
    reason: str = ""
    message: str = ""
    pods: list[PodRun] = field(default_factory=list)
    # Kueue (k8s_queue.QueueWait): when the queued Job was admitted, and how long it waited (not paid).
    admitted_at: datetime | None = None
    queue_seconds: float = 0.0

    @property
    def first_running(self) -> datetime | None:
        started = [p.started for p in self.pods if p.started is not None]
        return min(started) if started else None

    @property
    def finished(self) -> datetime | None:
        ended = [p.finished for p in self.pods if p.finished is not None]
        return max(ended) if ended else None

    @property
    def pod_seconds(self) -> float:
        """Seconds the pods ran, summed: what the cluster gave this run (times GPUs per pod is its GPU time)."""
        return sum(p.seconds for p in self.pods)

    @property
    def preemptions(self) -> int:
        """Pods the cluster disrupted (evicted, reclaimed), each replaced by the Job unless it ran out of tries."""
        return sum(1 for p in self.pods if p.disrupted)

    def by_node(self) -> dict[int, list[PodRun]]:
        """The pods of each node (rank), in the order they ran: a node's pod and those that replaced it."""
        nodes: dict[int, list[PodRun]] = {}
        for pod in self.pods:
            nodes.setdefault(pod.index, []).append(pod)
        return nodes

    @property
    def restarts(self) -> int:
        """Pods replaced for another reason than a disruption (those are preemptions), plus container
        restarts inside a pod: what a local run counts as restarts after a failure. Each node of a
        multi-node run has its own first pod, which replaced nothing."""
        replaced = disrupted_then_replaced = 0
        for runs in self.by_node().values():
            replaced += len(runs) - 1
            disrupted_then_replaced += sum(1 for p in runs[:-1] if p.disrupted)
        return replaced - disrupted_then_replaced + sum(p.restarts for p in self.pods)

    def last_exit_code(self) -> int | None:
        """How the run's pods ended: the last pod's exit code; of several nodes, that of the first node
        to fail (its peers were stopped after it, and say only that), else the first node's."""
        last = [p for runs in self.by_node().values() for p in runs[-1:] if p.exit_code is not None]
        if not last:
            ended = [p for p in self.pods if p.exit_code is not None]
            return ended[-1].exit_code if ended else None
        failed = sorted(
            (p for p in last if p.exit_code != 0), key=lambda p: p.finished.timestamp() if p.finished else 0
        )
        return (failed or sorted(last, key=lambda p: p.index))[0].exit_code


def _when(raw: Any) -> datetime | None:
    return parse_time(raw)


def pod_run(pod: dict[str, Any]) -> PodRun:
    meta, status = pod.get("metadata", {}), pod.get("status") or {}
    run = PodRun(name=meta.get("name", ""), index=pod_rank(pod))
    run.disrupted = any(
        c.get("type") == DISRUPTION and c.get("status") == "True" for c in status.get("conditions") or []
    )
    for container in status.get("containerStatuses") or []:
        run.restarts += int(container.get("restartCount") or 0)
        state = container.get("state") or {}
        running, ended = state.get("running") or {}, state.get("terminated") or {}
        run.started = _when(running.get("startedAt") or ended.get("startedAt")) or run.started
        if ended:
            run.finished = _when(ended.get("finishedAt"))
            run.exit_code = ended.get("exitCode")
    return run


class WorkloadFollower:
    """Watches one workload of the provider (a Job, TrainJob or PyTorchJob) until it ends; see the
    module's docstring."""

    def __init__(self, provider: KubernetesProvider, instance_id: str, write_log: Callable[[str], None]) -> None:
        self.kind, self.namespace, self.name = parse_id(instance_id)
        self.gone = f"the {self.kind.kind} was deleted before it ended"
        self.provider = provider
        self.instance_id = instance_id
        self.write_log = write_log
        self.pods: dict[str, PodRun] = {}
        self._logged: set[str] = set()
        self._threads: list[threading.Thread] = []
        self.queue = k8s_queue.QueueWait(provider)  # the "waiting for admission" line, the admitted time

    def follow(self) -> Followed:
        while True:
            job, version = self._list()
            if job is None:
                return self._ended("Deleted", "", self.gone)
            ended = self._seen(job)
            if ended is None:
                ended = self._watch(version)
            if ended is not None:
                return ended

    # ------------------------------------------------------------ list, then watch

    def _list(self) -> tuple[dict[str, Any] | None, str | None]:
        items, version = self.provider.list_workloads(self.kind, self.namespace)
        found = next((i for i in items if i.get("metadata", {}).get("name") == self.name), None)
        return found, version

    def _watch(self, version: str | None) -> Followed | None:
        """Stream the workload's changes from ``version``; None when the stream ended first (list again)."""
        from kubernetes import watch
        from urllib3.exceptions import HTTPError

        # The client's watch module is unannotated (kubernetes 36/37): held as Any.
        watching: Any = watch
        w = watching.Watch()
        kwargs: dict[str, Any] = {"timeout_seconds": WATCH_S, "_request_timeout": WATCH_S + READ_SLACK_S}
        if version and version.isdigit():  # an emulator's placeholder version would only confuse a watch
            kwargs["resource_version"] = version
        list_call, args = self.provider.watch_call(self.kind, self.namespace)
        try:
            for event in w.stream(list_call, *args, **kwargs):
                raw = event.get("raw_object") or {}
                if raw.get("metadata", {}).get("name") != self.name:
                    continue
                if event.get("type") == "DELETED":
                    return self._ended("Deleted", "", self.gone)
                ended = self._seen(raw)
                if ended is not None:
                    return ended
        except HTTPError:
            return None  # the connection dropped or went quiet past the read timeout: reconnect
        except Exception as exc:
            if status_of(exc) == 410:
                return None  # the version expired: list again for a fresh one
            raise as_error(exc, f"watching {self.kind.kind} {self.namespace}/{self.name}") from None
        finally:
            w.stop()
        return None

    def _seen(self, job: dict[str, Any]) -> Followed | None:
        self.queue.seen(job, self.write_log)  # k8s_queue: says so while Kueue has not admitted the Job
        self._refresh_pods()
        end = workload_end(job)
        if end is None:
            return None
        return self._ended(*end)

    def _ended(self, end: End, reason: str, message: str) -> Followed:
        self._refresh_pods()
        for thread in self._threads:
            thread.join(READ_SLACK_S)  # the log of a pod that ended is read to its end, or given up on
        pods = sorted(self.pods.values(), key=lambda p: (p.started is None, p.started or datetime.min, p.name))
        return Followed(
            end=end, reason=reason, message=message, pods=pods,
            admitted_at=self.queue.admitted_at, queue_seconds=self.queue.queue_seconds,
        )  # fmt: skip

    # ------------------------------------------------------------ pods and pod 0's log

    def _refresh_pods(self) -> None:
        for pod in self.provider.pods(self.instance_id):
            run = pod_run(pod)
            self.pods[run.name] = run
            if run.index == 0 and run.started is not None and run.name not in self._logged:
                self._logged.add(run.name)
                thread = threading.Thread(target=self._copy_log, args=(run.name,), daemon=True)
                self._threads.append(thread)
                thread.start()

    def _copy_log(self, pod: str) -> None:
        try:
            for line in self.provider.pod_log_lines(self.namespace, pod, follow=True):
                self.write_log(line)
        except Exception:  # best effort: a log the API does not serve is only missing lines
            return
