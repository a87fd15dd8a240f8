"""Queues in front of the cluster: Kueue admission and Volcano gang scheduling, written and read back.

**Kueue.** With ``queue:`` the Job carries ``kueue.x-k8s.io/queue-name`` and is created suspended;
Kueue makes a ``Workload`` for it (owned by the Job), reserves quota in a ClusterQueue and admits it
by unsuspending the Job. Until then nothing runs and nothing is paid: the wait is queue time, not GPU
time. While it waits, :class:`QueueWait` (called by the Job follower each time it sees the Job) says
so once per change, with the Workload's position from Kueue's visibility API
(``visibility.kueue.x-k8s.io``, ``.../localqueues/Q/pendingworkloads``) when the cluster serves it,
and keeps when it was admitted.

**Volcano.** With ``scheduler: volcano`` the pods name ``schedulerName: volcano``, the queue and a
PodGroup (``scheduling.volcano.sh/v1beta1``) whose ``minMember`` is ``resources.nodes``: Volcano
starts all of a multi-node run's pods or none (gang scheduling). Kueue's label is left off then.

**Priority per tier.** ``priority_classes`` gives the pods a PriorityClass by the run's tier
(``gpuline:tier`` tag), e.g. nightly runs as ``research`` and releases as ``production``;
``workload_priority_classes`` names Kueue WorkloadPriorityClasses the same way. They are separate
because Kueue refuses to create the Workload of a Job that names a WorkloadPriorityClass it lacks.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast

from gpuline.errors import GpulineError
from gpuline.providers.base import LeaseRequest
from gpuline.providers.k8s_errors import as_error, status_of
from gpuline.providers.k8s_options import KubernetesOptions
from gpuline.runs import utcnow
from gpuline.spec import TIERS, Tier

if TYPE_CHECKING:
    from gpuline.providers.kubernetes import KubernetesProvider

KUEUE_GROUP = "kueue.x-k8s.io"
KUEUE_VERSIONS = ("v1beta1", "v1beta2")  # v1beta1 is served by every Kueue that has v1beta2
VISIBILITY_GROUP = "visibility.kueue.x-k8s.io"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
JOB_UID_LABEL = "kueue.x-k8s.io/job-uid"
VOLCANO = "volcano"
PODGROUP = ("scheduling.volcano.sh", "v1beta1", "podgroups")
VOLCANO_QUEUE = "scheduling.volcano.sh/queue-name"
GROUP_NAME = "scheduling.k8s.io/group-name"
TIER_TAG = "gpuline:tier"
_UNSERVED = (404, 403, 503)  # not installed, not ours to see, or an aggregated API that is down

# ---------------------------------------------------------------- what the manifests carry


def kueue_managed(options: KubernetesOptions) -> bool:
    """Kueue admits the workload: a queue is named and Volcano is not the one scheduling it."""
    return bool(options.queue) and options.scheduler != VOLCANO


def tier_of(request: LeaseRequest) -> Tier | None:
    tier = request.tags.get(TIER_TAG, "")
    return cast(Tier, tier) if tier in TIERS else None


def priority_class(request: LeaseRequest, options: KubernetesOptions) -> str | None:
    """The pods' PriorityClass: ``priority_class`` when given, else the tier's from ``priority_classes``."""
    tier = tier_of(request)
    return options.priority_class or (options.priority_classes.get(tier) if tier else None)


def workload_labels(request: LeaseRequest, options: KubernetesOptions) -> dict[str, str]:
    """The labels Kueue reads on the workload: its LocalQueue and the tier's WorkloadPriorityClass."""
    if not kueue_managed(options):
        return {}
    assert options.queue is not None
    labels = {QUEUE_LABEL: options.queue}
    tier = tier_of(request)
    wanted = options.workload_priority_classes.get(tier) if tier else None
    if wanted:
        labels[PRIORITY_LABEL] = wanted
    return labels


def volcano_pod(spec: dict[str, Any], metadata: dict[str, Any], group: str, options: KubernetesOptions) -> None:
    """Hand the pod template to Volcano: its scheduler, its PodGroup and its queue."""
    spec["schedulerName"] = VOLCANO
    notes = metadata.setdefault("annotations", {})
    notes[GROUP_NAME] = group
    if options.queue:
        notes[VOLCANO_QUEUE] = options.queue


def podgroup(
    request: LeaseRequest, options: KubernetesOptions, meta: dict[str, Any], per_pod: dict[str, str]
) -> dict[str, Any]:
    """The lease's PodGroup: all ``resources.nodes`` pods, with their GPUs, are scheduled together."""
    nodes = request.spec.resources.nodes
    spec: dict[str, Any] = {
        "minMember": nodes,
        "minResources": {name: str(int(count) * nodes) for name, count in per_pod.items()},
    }
    if options.queue:
        spec["queue"] = options.queue
    wanted = priority_class(request, options)
    if wanted:
        spec["priorityClassName"] = wanted
    group, version, _ = PODGROUP
    return {"apiVersion": f"{group}/{version}", "kind": "PodGroup", "metadata": dict(meta), "spec": spec}


# ---------------------------------------------------------------- Kueue's objects, read back


@dataclass(frozen=True)
class Admission:
    """Where a Workload stands: quota reserved in a ClusterQueue, then admitted (its Job unsuspended)."""

    quota_reserved: bool
    admitted: bool
    admitted_at: datetime | None
    cluster_queue: str
    reason: str  # why it waits, in Kueue's words (the QuotaReserved condition's message)


def admission(workload: dict[str, Any]) -> Admission:
    from gpuline.providers.k8s_objects import parse_time  # k8s_objects imports the manifests, which import this

    status = workload.get("status") or {}
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    reserved, admitted = conditions.get("QuotaReserved") or {}, conditions.get("Admitted") or {}
    is_admitted = admitted.get("status") == "True"
    why = reserved.get("message") or admitted.get("message") or ""
    return Admission(
        quota_reserved=reserved.get("status") == "True",
        admitted=is_admitted,
        admitted_at=parse_time(admitted.get("lastTransitionTime")) if is_admitted else None,
        cluster_queue=str((status.get("admission") or {}).get("clusterQueue") or ""),
        reason=str(why),
    )


def owned_by(workload: dict[str, Any], job: dict[str, Any]) -> bool:
    """Kueue's Workload for ``job``: owned by it (by uid when the Job has one, else by name)."""
    meta = job.get("metadata", {})
    for ref in (workload.get("metadata") or {}).get("ownerReferences") or []:
        same = ref.get("kind") == job.get("kind", "Job") and ref.get("name") == meta.get("name")
        if same and (not meta.get("uid") or ref.get("uid") == meta.get("uid")):
            return True
    return False


def pending_position(summary: dict[str, Any], workload: str) -> int | None:
    """The Workload's place in its LocalQueue (1 = next), from a ``PendingWorkloadsSummary``."""
    for item in summary.get("items") or []:
        if (item.get("metadata") or {}).get("name") == workload:
            position = item.get("positionInLocalQueue")
            return int(position) + 1 if isinstance(position, int) else None  # Kueue counts from 0
    return None


def waiting_line(queue: str, state: Admission | None, position: int | None) -> str:
    """One line for the job log: which queue, where in it, and Kueue's reason when it gives one."""
    line = f"waiting for admission in queue {queue}"
    if position is not None:
        ahead = position - 1
        line += f" (position {position}: {ahead} workload{'s' if ahead != 1 else ''} ahead)"
    if state is None:
        line += ": no Kueue Workload for the Job (yet, or readable here)"
    elif state.quota_reserved:
        line += f": quota reserved in {state.cluster_queue or 'its ClusterQueue'}, admission checks pending"
    elif state.reason:
        line += f": {state.reason}"
    return line + "; nothing runs or is paid until it is admitted"


# ---------------------------------------------------------------- the follower's hook


def suspended(job: dict[str, Any]) -> bool:
    """Held for Kueue: ``spec.suspend`` on a Job or a TrainJob, ``spec.runPolicy.suspend`` on a PyTorchJob."""
    spec = job.get("spec") or {}
    return bool(spec.get("suspend") or (spec.get("runPolicy") or {}).get("suspend"))


def gang_of(job: dict[str, Any]) -> str | None:
    """The PodGroup a Volcano-scheduled Job's pods belong to (None for any other Job)."""
    template = (job.get("spec") or {}).get("template") or {}
    if (template.get("spec") or {}).get("schedulerName") != VOLCANO:
        return None
    name = ((template.get("metadata") or {}).get("annotations") or {}).get(GROUP_NAME)
    return str(name) if name else None


def queue_of(job: dict[str, Any]) -> str | None:
    return ((job.get("metadata") or {}).get("labels") or {}).get(QUEUE_LABEL)


def describe_wait(provider: KubernetesProvider, job: dict[str, Any]) -> str | None:
    """The line to show while Kueue has not admitted ``job``; None once it has (or without a queue)."""
    return QueueWait(provider).wait_line(job)


class QueueWait:
    """The Job follower's view of a queued Job: the waiting line, each time it changes, and when the
    Job was admitted. Costs no API call for a Job that names no queue, nor once it was admitted."""

    def __init__(self, provider: KubernetesProvider) -> None:
        self.provider = provider
        self.admitted_at: datetime | None = None
        self.created_at: datetime | None = None
        self._shown = ""
        self._versions = list(KUEUE_VERSIONS)

    def seen(self, job: dict[str, Any], write: Callable[[str], None]) -> None:
        """Called with each state of the Job the follower sees; writes the waiting line when it changes."""
        line = self.wait_line(job)
        if line is not None and line != self._shown:
            write(f"kubernetes: {line}")
        self._shown = line or ""

    @property
    def queue_seconds(self) -> float:
        """Seconds from the Job's creation to its admission (0 when it never waited in a queue)."""
        if self.admitted_at is None or self.created_at is None:
            return 0.0
        return round(max(0.0, (self.admitted_at - self.created_at).total_seconds()), 3)

    def wait_line(self, job: dict[str, Any]) -> str | None:
        from gpuline.providers.k8s_objects import parse_time

        if self.admitted_at is not None:
            return None
        group = gang_of(job)
        if group is not None:
            return self._gang_line(job, group)
        queue = queue_of(job)
        if queue is None:
            return None
        meta = job.get("metadata") or {}
        annotations = meta.get("annotations") or {}
        self.created_at = self.created_at or parse_time(
            meta.get("creationTimestamp") or annotations.get("gpuline/created-at")
        )
        workload = self._workload(job)
        state = admission(workload) if workload is not None else None
        if not suspended(job) or (state is not None and state.admitted):
            # Kueue's own time when it says; else when the follower saw the Job let go.
            self.admitted_at = (state.admitted_at if state else None) or utcnow()
            return None
        name = (workload or {}).get("metadata", {}).get("name", "")
        position = self._position(meta.get("namespace", ""), queue, name) if name else None
        return waiting_line(queue, state, position)

    def _gang_line(self, job: dict[str, Any], group: str) -> str | None:
        """Volcano holds every pod Pending until the whole gang fits: its PodGroup's phase says where
        it stands (Pending, Inqueue, then Running). Best effort, as for Kueue."""
        ns = (job.get("metadata") or {}).get("namespace", "")
        api_group, version, plural = PODGROUP
        try:
            found = self._custom().get_namespaced_custom_object(api_group, version, ns, plural, group)
        except Exception:
            return None  # a view only: no PodGroup to read (yet), no RBAC, or Volcano is gone
        status = (found or {}).get("status") or {}
        phase = str(status.get("phase") or "Pending")
        if phase not in ("Pending", "Inqueue"):
            self.admitted_at = utcnow()  # the gang was scheduled: from here its pods run
            return None
        queue = ((found or {}).get("spec") or {}).get("queue") or "default"
        why = next((c.get("message") for c in status.get("conditions") or [] if c.get("message")), "")
        return f"waiting for Volcano to schedule the gang in queue {queue} (PodGroup {phase})" + (
            f": {why}" if why else ""
        )

    def _workload(self, job: dict[str, Any]) -> dict[str, Any] | None:
        """Kueue's Workload for the Job. Best effort: the line is only a view, so an API that will not
        say (not installed, no RBAC, an error) leaves the line without it and the follow goes on."""
        from gpuline.providers.k8s_objects import raw_json

        meta = job.get("metadata") or {}
        # Kueue labels its Workload with the Job's uid: a server that honours selectors sends only that one.
        selector = f"{JOB_UID_LABEL}={meta['uid']}" if meta.get("uid") else None
        for version in list(self._versions):
            try:
                answer = self._custom().list_namespaced_custom_object(
                    KUEUE_GROUP, version, meta.get("namespace", ""), "workloads",
                    label_selector=selector, _preload_content=False,
                )  # fmt: skip
            except Exception as exc:
                if status_of(exc) in _UNSERVED:
                    self._versions.remove(version)  # not served here (or not to us): never asked again
                continue
            self._versions = [version]
            return next((w for w in raw_json(answer).get("items") or [] if owned_by(w, job)), None)
        return None

    def _position(self, ns: str, queue: str, workload: str) -> int | None:
        for version in KUEUE_VERSIONS:
            path = f"/apis/{VISIBILITY_GROUP}/{version}/namespaces/{ns}/localqueues/{queue}/pendingworkloads"
            try:
                summary = get_json(self.provider.api, path)
            except GpulineError:
                return None  # a view only: an error here never stops the follow
            if summary is not None:
                return pending_position(summary, workload)
        return None  # the cluster does not serve Kueue's visibility API: the line goes without

    def _custom(self) -> Any:
        return client_custom(self.provider)


def get_json(api: Any, path: str) -> dict[str, Any] | None:
    """GET ``path`` of the API server as JSON; None when it is not served (404/403/503) or not JSON.
    The visibility API is a subresource path the generated clients have no method for."""
    headers, auth = {"Accept": "application/json"}, ["BearerToken"]
    try:
        if hasattr(api, "param_serialize"):  # the client generated since kubernetes 30
            response = api.call_api(*api.param_serialize("GET", path, header_params=headers, auth_settings=auth))
            response.read()
        else:  # the older generator's signature; it raises on an error status itself
            response = api.call_api(
                path, "GET", header_params=headers, auth_settings=auth,
                _preload_content=False, _return_http_data_only=True,
            )  # fmt: skip
    except Exception as exc:
        if status_of(exc) in _UNSERVED:
            return None
        raise as_error(exc, f"reading {path}") from None
    if response.status in _UNSERVED:
        return None
    if response.status >= 400:
        raise as_error(_Status(response.status, str(response.reason)), f"reading {path}")
    try:
        body = json.loads(response.data or b"{}")
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


class _Status(Exception):
    """An error status the newer client returned instead of raising, shaped as the client's ApiException."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status, self.reason = status, reason


# ---------------------------------------------------------------- the PodGroup's life, with the lease's


def create_podgroup(provider: KubernetesProvider, manifest: dict[str, Any]) -> dict[str, Any]:
    from gpuline.providers.k8s_objects import raw_json

    group, version, plural = PODGROUP
    ns, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]
    try:
        made = client_custom(provider).create_namespaced_custom_object(
            group, version, ns, plural, manifest, _preload_content=False
        )
    except Exception as exc:
        if status_of(exc) == 404:
            raise as_error(exc, f"creating PodGroup {name}: is Volcano installed (scheduler: volcano)?") from None
        raise as_error(exc, f"creating PodGroup {name} in {ns}") from None
    return raw_json(made)


def delete_podgroup(provider: KubernetesProvider, ns: str, name: str) -> bool:
    """Delete the lease's PodGroup (its owner reference would too, where garbage collection runs)."""
    group, version, plural = PODGROUP
    try:
        client_custom(provider).delete_namespaced_custom_object(group, version, ns, plural, name)
    except Exception as exc:
        if status_of(exc) == 404:
            return False
        raise as_error(exc, f"deleting PodGroup {ns}/{name}") from None
    return True


def client_custom(provider: KubernetesProvider) -> Any:
    from kubernetes import client

    return client.CustomObjectsApi(provider.api)
