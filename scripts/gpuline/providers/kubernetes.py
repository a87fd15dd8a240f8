"""Kubernetes through the official client: a lease is a workload the cluster ends at the TTL: a Job, or
for more than one node the engine the cluster runs (a Kubeflow TrainJob or PyTorchJob, else an Indexed
Job with a headless Service; :mod:`gpuline.providers.k8s_workloads` has the kinds side by side, and
:mod:`gpuline.providers.k8s_discovery` finds which one the cluster serves).

What is created carries gpuline labels (``gpuline/run-id``, ``gpuline/lease-id``, ``gpuline/managed``,
``gpuline/expires-at`` as epoch seconds) and the full tags as annotations, so ``list_owned`` finds it
by label; results are filtered by label in our code too, since not every API server (or emulator)
honours selectors. The instance id is ``<kind>/<namespace>/<name>``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from gpuline.errors import ConfigError, GpulineError, InfraError, NotFoundError
from gpuline.providers import k8s_queue
from gpuline.providers.base import TAG_EXPIRES_AT, TAG_LEASE_ID, TAG_MANAGED, LeaseRequest, Machine, MachineState
from gpuline.providers.k8s_discovery import check_runtime, custom_api, discovered_engine
from gpuline.providers.k8s_errors import as_error, status_of
from gpuline.providers.k8s_follow import Followed, WorkloadFollower
from gpuline.providers.k8s_manifests import (
    Engine,
    KubernetesOptions,
    build_manifests,
    describe_command,
    label_key,
)
from gpuline.providers.k8s_objects import is_ours, job_id, launched_at, owner_reference, raw_json
from gpuline.providers.k8s_workloads import (
    CUSTOM,
    WorkloadKind,
    has_active_pods,
    kind_of,
    parse_id,
    pod_rank,
    workload_end,
)
from gpuline.providers.options import parse_options
from gpuline.providers.testhooks import pause_at
from gpuline.runs import utcnow

_MANAGED = f"{label_key(TAG_MANAGED)}=true"


class KubernetesProvider:
    name = "kubernetes"
    max_nodes = 64  # one TrainJob, PyTorchJob or Indexed Job (with a headless Service for the rendezvous)

    def __init__(self, project_dir: Path, options: dict[str, Any] | None = None) -> None:
        self.project_dir = project_dir
        self.options = parse_options(KubernetesOptions, options or {}, "kubernetes")
        self._api: Any = None

    def secrets(self) -> list[str]:
        return []  # the kubeconfig's credentials stay with the client

    @property
    def wants_runner(self) -> bool:
        """Only a runner-mode pod needs a JIT runner registration; a training pod is the job itself."""
        return self.options.mode == "runner"

    # ------------------------------------------------------------ the API client

    @property
    def api(self) -> Any:
        if self._api is None:
            self._api = self._connect()
        return self._api

    def _connect(self) -> Any:
        from kubernetes import client, config
        from kubernetes.config.config_exception import ConfigException

        o = self.options
        in_cluster = o.in_cluster if o.in_cluster is not None else bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
        try:
            if in_cluster:
                configuration = client.Configuration()
                config.load_incluster_config(client_configuration=configuration)
                return client.ApiClient(configuration)
            path = o.kubeconfig or os.environ.get("KUBECONFIG") or None
            return config.new_client_from_config(config_file=path, context=o.context)
        except (ConfigException, OSError) as exc:
            raise ConfigError(
                f"cannot load the Kubernetes configuration: {exc}",
                hint="set resources.options.kubeconfig / context, or KUBECONFIG",
            ) from None

    def _batch(self) -> Any:
        from kubernetes import client

        return client.BatchV1Api(self.api)

    def batch_api(self) -> Any:
        """The Jobs API, for following a Job (:mod:`gpuline.providers.k8s_follow`)."""
        return self._batch()

    def _core(self) -> Any:
        from kubernetes import client

        return client.CoreV1Api(self.api)

    def _custom(self) -> Any:
        from kubernetes import client

        return client.CustomObjectsApi(self.api)

    # ------------------------------------------------------------ provision

    def provision(self, request: LeaseRequest) -> Machine:
        created_at = utcnow().isoformat(timespec="seconds")
        engine = self._engine() if request.spec.resources.nodes > 1 else "indexed-job"
        if engine == "trainjob":
            check_runtime(self._custom, self.options.runtime)
        manifests = build_manifests(request, self.options, created_at=created_at, engine=engine)
        workload, *rest = manifests
        created = self._create(workload)
        owner = owner_reference(created)
        for manifest in rest:
            if owner is not None:
                # Garbage-collected with the workload (ttlSecondsAfterFinished included).
                manifest["metadata"]["ownerReferences"] = [owner]
            self._create(manifest)
        machine = self._machine(created)
        what = f"{workload['kind']} {workload['metadata']['name']}"
        machine.notes.append(f"kubernetes: creating {what}: {describe_command(workload)}")
        machine.runner_label = request.runner.label if request.runner else None
        machine.instance_type = request.instance_type
        machine.lane = request.lane
        return machine

    def _engine(self) -> Engine:
        """What runs a multi-node lease: the option, or (``auto``) what the cluster's API discovery serves."""
        choice = self.options.multi_node
        if choice != "auto":
            return choice
        return discovered_engine(self._custom)

    def _create(self, manifest: dict[str, Any]) -> dict[str, Any]:
        kind, ns = manifest["kind"], manifest["metadata"]["namespace"]
        try:
            if kind == "Job":
                made = self._batch().create_namespaced_job(ns, manifest)
            elif kind == "Service":
                made = self._core().create_namespaced_service(ns, manifest)
            elif kind == "Secret":
                made = self._core().create_namespaced_secret(ns, manifest)
            elif kind == "PodGroup":  # scheduler: volcano (k8s_queue)
                return k8s_queue.create_podgroup(self, manifest)
            elif kind in (k.kind for k in CUSTOM):
                group, version, plural = custom_api(kind_of(manifest))
                return raw_json(
                    self._custom().create_namespaced_custom_object(
                        group, version, ns, plural, manifest, _preload_content=False
                    )
                )
            else:  # pragma: no cover - build_manifests makes only the kinds above
                raise InfraError(f"cannot create a {kind}")
        except GpulineError:
            raise
        except Exception as exc:
            raise as_error(exc, f"creating {kind} {manifest['metadata']['name']} in {ns}") from None
        as_dict: dict[str, Any] = self.api.sanitize_for_serialization(made)
        return as_dict

    # ------------------------------------------------------------ describe, release, list

    def describe(self, instance_id: str) -> Machine:
        kind, ns, name = parse_id(instance_id)
        obj = self._read(kind, ns, name)
        if obj is None:
            raise NotFoundError(f"kubernetes {kind.kind} {ns}/{name} does not exist")
        return self._machine(obj)

    def _read(self, kind: WorkloadKind, ns: str, name: str) -> dict[str, Any] | None:
        try:
            if kind.api is None:
                obj = self._batch().read_namespaced_job(name, ns)
                body: dict[str, Any] = self.api.sanitize_for_serialization(obj)
                return body
            group, version, plural = kind.api
            return raw_json(
                self._custom().get_namespaced_custom_object(group, version, ns, plural, name, _preload_content=False)
            )
        except Exception as exc:
            if status_of(exc) == 404:
                return None
            raise as_error(exc, f"reading {kind.kind} {ns}/{name}") from None

    def list_workloads(self, kind: WorkloadKind, ns: str) -> tuple[list[dict[str, Any]], str | None]:
        """Every ``kind`` in ``ns`` and the list's resource version (where a watch starts from)."""
        try:
            if kind.api is None:
                listing = self.batch_api().list_namespaced_job(ns)
                items = [self.api.sanitize_for_serialization(i) for i in listing.items]
                return items, (listing.metadata.resource_version if listing.metadata else None)
            group, version, plural = kind.api
            body = raw_json(
                self._custom().list_namespaced_custom_object(group, version, ns, plural, _preload_content=False)
            )
        except Exception as exc:
            raise as_error(exc, f"listing {kind.kind}s in {ns}") from None
        return list(body.get("items") or []), (body.get("metadata") or {}).get("resourceVersion")

    def watch_call(self, kind: WorkloadKind, ns: str) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        """The list call (and its leading arguments) that the client's watch streams ``kind`` through."""
        if kind.api is None:
            return self.batch_api().list_namespaced_job, (ns,)
        group, version, plural = kind.api
        return self._custom().list_namespaced_custom_object, (group, version, ns, plural)

    def release(self, instance_id: str) -> bool:
        kind, ns, name = parse_id(instance_id)
        obj = self._read(kind, ns, name)
        was_live = obj is not None and self._state(obj) != "terminated"
        if obj is not None:
            pause_at("release")
            self._delete(kind, ns, name)
        # What hangs off the workload goes too, even where garbage collection would (or never will) do it.
        self._delete_owned("service", ns, name)
        self._delete_owned("secret", ns, f"{name}-jit")
        if self.options.scheduler == "volcano":  # only then may the cluster have (and let us delete) PodGroups
            k8s_queue.delete_podgroup(self, ns, name)
        return was_live

    def _delete(self, kind: WorkloadKind, ns: str, name: str) -> bool:
        from kubernetes import client

        # Background propagation: the workload's pods are deleted too, not orphaned (the API's old default).
        options = client.V1DeleteOptions(propagation_policy="Background")
        try:
            if kind.api is None:
                self._batch().delete_namespaced_job(name, ns, body=options)
            else:
                group, version, plural = kind.api
                self._custom().delete_namespaced_custom_object(group, version, ns, plural, name, body=options)
        except Exception as exc:
            if status_of(exc) == 404:
                return False
            raise as_error(exc, f"deleting {kind.kind} {ns}/{name}") from None
        return True

    def _delete_owned(self, what: str, ns: str, name: str) -> bool:
        """A Service or Secret of the lease; gone already (or never made) is fine."""
        try:
            if what == "service":
                self._core().delete_namespaced_service(name, ns)
            else:
                self._core().delete_namespaced_secret(name, ns)
        except Exception as exc:
            if status_of(exc) == 404:
                return False
            raise as_error(exc, f"deleting {what} {ns}/{name}") from None
        return True

    def list_owned(self) -> list[Machine]:
        ns = self.options.namespace
        try:
            jobs = self._batch().list_namespaced_job(ns, label_selector=_MANAGED)
            objs: list[dict[str, Any]] = [self.api.sanitize_for_serialization(j) for j in jobs.items]
        except Exception as exc:
            if status_of(exc) != 404:
                raise as_error(exc, f"listing Jobs in {ns}") from None
            objs = []
        for kind in CUSTOM:
            objs += self._list_custom(kind, ns)
        machines = [self._machine(o) for o in objs if is_ours(o)]
        return [m for m in machines if m.state != "terminated"]

    def _list_custom(self, kind: WorkloadKind, ns: str) -> list[dict[str, Any]]:
        group, version, plural = custom_api(kind)
        try:
            body = raw_json(
                self._custom().list_namespaced_custom_object(
                    group, version, ns, plural, label_selector=_MANAGED, _preload_content=False
                )
            )
        except Exception as exc:
            if status_of(exc) in (404, 403):
                return []  # the CRD is not installed (or we may not see it): nothing of ours there
            raise as_error(exc, f"listing {kind.kind}s in {ns}") from None
        items: list[dict[str, Any]] = body.get("items", [])
        return items

    # ------------------------------------------------------------ logs

    def pods(self, instance_id: str) -> list[dict[str, Any]]:
        """The lease's pods, ordered by node rank (pod 0, the rendezvous host that commits, first)."""
        kind, ns, name = parse_id(instance_id)
        obj = self._read(kind, ns, name)
        lease = ((obj or {}).get("metadata", {}).get("labels") or {}).get(label_key(TAG_LEASE_ID))
        if not lease:
            return []
        try:
            found = self._core().list_namespaced_pod(ns, label_selector=f"{label_key(TAG_LEASE_ID)}={lease}")
        except Exception as exc:
            if status_of(exc) == 404:
                return []
            raise as_error(exc, f"listing pods of {name}") from None
        pods = [self.api.sanitize_for_serialization(p) for p in found.items]
        pods = [p for p in pods if (p.get("metadata", {}).get("labels") or {}).get(label_key(TAG_LEASE_ID)) == lease]
        return sorted(pods, key=pod_rank)

    def stream_logs(self, instance_id: str, write: Callable[[str], None], *, follow: bool = True) -> int:
        """Copy the logs of the lease's first pod (the rendezvous host) to ``write``, line by line;
        returns the number of lines. With ``follow`` it returns when the pod's container ends."""
        pods = self.pods(instance_id)
        if not pods:
            return 0
        meta = pods[0]["metadata"]
        lines = 0
        for line in self._log_lines(meta["namespace"], meta["name"], follow=follow):
            write(line)
            lines += 1
        return lines

    def pod_log_lines(self, ns: str, pod: str, *, follow: bool) -> Iterator[str]:
        """A pod's log, line by line (with ``follow``: until its container ends); nothing when the server
        answers with an API object instead of the log's text (an emulator, a proxy that does not serve logs)."""
        return self._log_lines(ns, pod, follow=follow, text_only=True)

    def follow(self, instance_id: str, write_log: Callable[[str], None]) -> Followed:
        """Watch a train-mode workload (Job, TrainJob, PyTorchJob) until it ends, copying pod 0's log."""
        return WorkloadFollower(self, instance_id, write_log).follow()

    def _log_lines(self, ns: str, pod: str, *, follow: bool, text_only: bool = False) -> Iterator[str]:
        try:
            response = self._core().read_namespaced_pod_log(pod, ns, follow=follow, _preload_content=False)
        except Exception as exc:
            raise as_error(exc, f"reading the log of pod {ns}/{pod}") from None
        pending = b""
        try:
            if text_only and "json" in str(response.headers.get("Content-Type", "")):
                return
            for chunk in response.stream(4096):
                pending += chunk
                *complete, pending = pending.split(b"\n")
                for raw in complete:
                    yield raw.decode(errors="replace")
            if pending:
                yield pending.decode(errors="replace")
        finally:
            response.release_conn()

    # ------------------------------------------------------------ mapping

    def _machine(self, obj: dict[str, Any]) -> Machine:
        meta = obj.get("metadata", {})
        labels = meta.get("labels") or {}
        annotations = meta.get("annotations") or {}
        tags = {f"gpuline:{k.removeprefix('gpuline/')}": v for k, v in annotations.items() if k.startswith("gpuline/")}
        for key in (TAG_LEASE_ID, TAG_MANAGED):
            tags.setdefault(key, labels.get(label_key(key), ""))
        if TAG_EXPIRES_AT not in tags and labels.get(label_key(TAG_EXPIRES_AT), "").isdigit():
            expires = datetime.fromtimestamp(int(labels[label_key(TAG_EXPIRES_AT)]), tz=utcnow().tzinfo)
            tags[TAG_EXPIRES_AT] = expires.isoformat()
        kind = kind_of(obj).key
        return Machine(
            instance_id=f"{kind}/{meta.get('namespace', self.options.namespace)}/{meta.get('name', '')}",
            provider=self.name,
            state=self._state(obj),
            tags=tags,
            launched_at=launched_at(meta, annotations),
            region=self.options.namespace,
        )

    @staticmethod
    def _state(obj: dict[str, Any]) -> MachineState:
        if workload_end(obj) is not None:
            return "terminated"
        if obj.get("metadata", {}).get("deletionTimestamp"):
            return "stopping"
        return "running" if has_active_pods(obj) else "pending"


__all__ = ["KubernetesProvider", "job_id"]
