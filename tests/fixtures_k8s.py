"""A Kubernetes API on 127.0.0.1 for tests: kmock's KubernetesEmulator, served from a background thread.

The emulator keeps objects in memory and answers create/get/list/patch/delete like an API server,
but it has no controllers (a Job never gets pods by itself), no validation and no label selectors,
so the code under test filters by label itself and tests validate manifests separately.

``k8s`` gives a clean emulator per test with ``KUBECONFIG`` pointing at it, so the provider, and any
``gpuline`` subprocess the test starts, talk to it through the official client's normal config path.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

KINDS = ("batch/v1/jobs", "v1/services", "v1/secrets", "v1/pods")


class K8sEmulator:
    def __init__(self, kubeconfig: Path) -> None:
        self.kubeconfig = kubeconfig
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._emulator: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, name="k8s-emulator", daemon=True)

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the Kubernetes emulator did not start")
        if self._error is not None:
            raise RuntimeError(f"the Kubernetes emulator failed: {self._error!r}")
        self.kubeconfig.write_text(
            "apiVersion: v1\nkind: Config\n"
            f"clusters:\n- name: emulator\n  cluster:\n    server: {self.url}\n"
            "users:\n- name: tester\n  user:\n    token: test-token\n"
            "contexts:\n- name: emulator\n  context:\n    cluster: emulator\n    user: tester\n    namespace: default\n"
            "current-context: emulator\n"
        )

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main())
        except BaseException as exc:  # reported to start()
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        import kmock

        self._stop = asyncio.Event()
        async with kmock.KubernetesEmulator() as emulator, kmock.Server(emulator) as server:
            self._emulator = emulator
            self._declare()
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def _declare(self) -> None:
        # Declared kinds list as empty instead of 404 when nothing of that kind exists yet.
        for kind in KINDS:
            self._emulator.resources[kind] = {}

    def stop(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(60)

    # ------------------------------------------------------------ inspection, on the emulator's loop

    def _on_loop(self, func: Any) -> Any:
        future: Future[Any] = Future()

        def run() -> None:
            try:
                future.set_result(func())
            except BaseException as exc:
                future.set_exception(exc)

        self._loop.call_soon_threadsafe(run)
        return future.result(120)  # a hang guard: a loaded machine can be slow to answer

    def reset(self) -> None:
        def clear() -> None:
            self._emulator.objects.clear()
            self._emulator.resources.clear()
            self._declare()

        self._on_loop(clear)

    def install(self, resource: str, kind: str) -> None:
        """Serve another kind, as installing a CRD would (e.g. ``kubeflow.org/v1/pytorchjobs``)."""
        info = {
            "namespaced": True,
            "kind": kind,
            "singular": kind.lower(),
            "verbs": ["create", "get", "list", "delete"],
        }

        def declare() -> None:
            self._emulator.resources[resource] = info

        self._on_loop(declare)

    def objects(self, kind: str) -> list[dict[str, Any]]:
        """Live (not deleted) objects of ``kind`` (``jobs``, ``services``, ``secrets``, ``pods``)."""

        def collect() -> list[dict[str, Any]]:
            found = []
            for (resource, _, _), obj in self._emulator.objects.items():
                if resource.plural == kind and not obj.deleted:
                    found.append(_plain(obj.raw))
            return found

        result: list[dict[str, Any]] = self._on_loop(collect)
        return result

    def requests(self) -> list[tuple[str, str]]:
        """(method, path) of every request served so far."""

        def collect() -> list[tuple[str, str]]:
            return [(str(r.method.value).upper(), r.url.path) for r in self._emulator._requests]

        result: list[tuple[str, str]] = self._on_loop(collect)
        return result

    def add_pod(self, namespace: str, name: str, labels: dict[str, str], log: str = "", index: int = 0) -> None:
        """Stand in for the Job controller: a pod of the Job, with a log the kubelet would serve."""
        import kmock

        def add() -> None:
            pod = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": name,
                    "namespace": namespace,
                    "labels": labels,
                    "annotations": {"batch.kubernetes.io/job-completion-index": str(index)},
                },
                "spec": {"containers": [{"name": "train", "image": "x"}]},
            }
            self._emulator.objects[kmock.resource("", "v1", "pods"), namespace, name] = pod
            self._emulator[f"get /api/v1/namespaces/{namespace}/pods/{name}/log"] << log.encode()

        self._on_loop(add)


def _plain(value: Any) -> Any:
    if isinstance(value, dict) or hasattr(value, "items"):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


@pytest.fixture(scope="session")
def k8s_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[K8sEmulator]:
    emulator = K8sEmulator(tmp_path_factory.mktemp("k8s") / "kubeconfig")
    emulator.start()
    try:
        yield emulator
    finally:
        emulator.stop()


@pytest.fixture
def k8s(k8s_session: K8sEmulator, monkeypatch: pytest.MonkeyPatch) -> K8sEmulator:
    k8s_session.reset()
    monkeypatch.setenv("KUBECONFIG", str(k8s_session.kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    return k8s_session
