"""A GPU cloud's instance API on 127.0.0.1, following the contract the rest provider's generic profile
speaks: ``POST /v1/instances``, ``GET /v1/instances/{id}``, ``DELETE /v1/instances/{id}``,
``GET /v1/instances`` (``{"instances": [...]}``), a bearer token, JSON errors ``{"error": {"code",
"message"}}``.

Stateful like a real cloud: an instance is ``pending`` until it has been read once, then
``running``; a delete makes it ``terminated`` (still listed, as clouds do for a while). ``fail_next``
queues canned failures (capacity, throttling, a lost answer) for the next matching requests.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

TOKEN = "rest-token-for-tests-0123456789"


class RestCloud:
    def __init__(self) -> None:
        self.instances: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str, dict[str, str], Any]] = []
        self.failures: list[tuple[str, str, int, dict[str, Any] | None, bool]] = []
        self._lock = threading.Lock()
        cloud = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                return

            def _reply(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                status, answer = cloud.handle(method, self.path, dict(self.headers), body)
                self._reply(status, answer)

            def do_GET(self) -> None:
                self._handle("GET")

            def do_POST(self) -> None:
                self._handle("POST")

            def do_DELETE(self) -> None:
                self._handle("DELETE")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def reset(self) -> None:
        with self._lock:
            self.instances.clear()
            self.requests.clear()
            self.failures.clear()

    def fail_next(
        self, method: str, path: str, status: int, code: str | None = None, *, times: int = 1, apply: bool = False
    ) -> None:
        """The next ``times`` requests to ``method path-prefix`` fail with ``status`` (and error ``code``).
        ``apply=True`` carries the request out first, as when only the answer is lost."""
        body = {"error": {"code": code, "message": f"injected {code or status}"}} if code or status else None
        with self._lock:
            for _ in range(times):
                self.failures.append((method, path, status, body, apply))

    def live(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(i) for i in self.instances.values() if i["status"] != "terminated"]

    # ------------------------------------------------------------ the API

    def handle(self, method: str, path: str, headers: dict[str, str], body: Any) -> tuple[int, Any]:
        with self._lock:
            self.requests.append((method, path, headers, body))
            if headers.get("Authorization") != f"Bearer {TOKEN}":
                return 401, {"error": {"code": "unauthorized", "message": "bad token"}}
            for i, (m, prefix, status, answer, apply) in enumerate(self.failures):
                if m == method and path.startswith(prefix):
                    del self.failures[i]
                    if apply:
                        self._serve(method, path, body)
                    return status, answer
            return self._serve(method, path, body)

    def _serve(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        parts = [p for p in path.split("?", maxsplit=1)[0].split("/") if p]
        if parts[:2] != ["v1", "instances"]:
            return 404, {"error": {"code": "not-found", "message": path}}
        if len(parts) == 2 and method == "GET":
            return 200, {"instances": list(self.instances.values())}
        if len(parts) == 2 and method == "POST":
            return self._create(body or {})
        if len(parts) == 3:
            instance = self.instances.get(parts[2])
            if instance is None:
                return 404, {"error": {"code": "not-found", "message": f"no instance {parts[2]}"}}
            if method == "GET":
                if instance["status"] == "pending":
                    instance["status"] = "running"
                    instance["ip"] = "10.0.0.7"
                return 200, dict(instance)
            if method == "DELETE":
                instance["status"] = "terminated"
                return 200, dict(instance)
        return 405, {"error": {"code": "method-not-allowed", "message": method}}

    def _create(self, body: dict[str, Any]) -> tuple[int, Any]:
        for field in ("instance_type", "image"):
            if not body.get(field):
                return 400, {"error": {"code": "invalid", "message": f"{field} is required"}}
        ident = f"inst-{uuid.uuid4().hex[:10]}"
        instance = {
            "id": ident,
            "name": body.get("name", ident),
            "status": "pending",
            "instance_type": body["instance_type"],
            "image": body["image"],
            "region": body.get("region", "us-west-1"),
            "tags": body.get("tags", {}),
            "user_data": body.get("user_data"),
            "created_at": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
            "ip": None,
        }
        self.instances[ident] = instance
        return 201, dict(instance)


@pytest.fixture(scope="session")
def rest_cloud_session() -> Iterator[RestCloud]:
    cloud = RestCloud()
    cloud.start()
    try:
        yield cloud
    finally:
        cloud.stop()


@pytest.fixture
def rest_cloud(rest_cloud_session: RestCloud, monkeypatch: pytest.MonkeyPatch) -> RestCloud:
    rest_cloud_session.reset()
    monkeypatch.setenv("GPULINE_REST_TOKEN", TOKEN)
    return rest_cloud_session
