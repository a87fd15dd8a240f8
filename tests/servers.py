"""Real local servers for tests: a moto S3/EC2/DynamoDB server, an EC2 instance-metadata server and an
MLflow tracking server.

Each binds 127.0.0.1 on a free port, starts once per test session and is stopped by the fixture that
started it. Import the fixtures into a test module (pytest puts tests/ on sys.path)::

    from servers import aws_env, moto_server  # noqa: F401

``moto_server`` yields the endpoint URL (a ``str``) with a ``reset()`` that empties every backend
through moto's ``POST /moto-api/reset``; ``aws_env`` points boto3 at it for one test with fake
credentials and a clean slate. ``mlflow_server`` yields the tracking URI of a real ``mlflow server``
(sqlite backend store, local artifact root) with ``startup_s``, the seconds from start to /health.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

# moto reads this once, when it is first imported: set it before any test module can import moto.
os.environ.setdefault("MOTO_EC2_ENABLE_INSTANCE_TYPE_VALIDATION", "true")

REGION = "us-east-1"
FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": REGION,
    "AWS_REGION": REGION,
}


class MotoServer(str):
    """The endpoint URL of a running moto server; ``reset()`` empties all its backends."""

    def reset(self) -> None:
        request = urllib.request.Request(f"{self}/moto-api/reset", method="POST", data=b"")
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as patch:
        # The server itself signs nothing, but boto3 calls made by moto internally need a region.
        for name, value in FAKE_CREDENTIALS.items():
            patch.setenv(name, value)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            yield MotoServer(f"http://{host}:{port}")
        finally:
            server.stop()


@pytest.fixture
def aws_env(moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> MotoServer:
    """boto3 in this test (and its subprocesses) talks to the moto server, which starts empty."""
    moto_server.reset()
    point_boto3_at(moto_server, monkeypatch)
    return moto_server


def point_boto3_at(endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake credentials and an endpoint for boto3 in this test and the processes it starts."""
    for name, value in FAKE_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    for name in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)


# ---------------------------------------------------------------- EC2 instance metadata (IMDSv2)


class ImdsServer:
    """The IMDSv2 endpoints a spot watcher uses, as AWS documents them.

    ``PUT /latest/api/token`` needs ``X-aws-ec2-metadata-token-ttl-seconds`` (1..21600) and returns a
    token; ``GET /latest/meta-data/...`` needs ``X-aws-ec2-metadata-token`` (401 without a valid one);
    ``/latest/meta-data/spot/instance-action`` is 404 until an interruption is scheduled, then
    ``{"action": "terminate", "time": "..."}``.
    """

    def __init__(self) -> None:
        self.notice: dict[str, str] | None = None
        self.tokens: dict[str, float] = {}
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                return

            def _send(self, status: int, body: str, content_type: str = "text/plain") -> None:
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_PUT(self) -> None:
                server._record("PUT", self.path)
                if self.path != "/latest/api/token":
                    self._send(404, "Not Found")
                    return
                ttl = self.headers.get("X-aws-ec2-metadata-token-ttl-seconds", "")
                if not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
                    self._send(400, "Bad Request")
                    return
                token = secrets.token_urlsafe(32)
                with server._lock:
                    server.tokens[token] = time.monotonic() + int(ttl)
                self._send(200, token)

            def do_GET(self) -> None:
                server._record("GET", self.path)
                token = self.headers.get("X-aws-ec2-metadata-token", "")
                with server._lock:
                    valid = server.tokens.get(token, 0.0) > time.monotonic()
                    notice = server.notice
                if not valid:
                    self._send(401, "Unauthorized")
                elif self.path == "/latest/meta-data/spot/instance-action" and notice is not None:
                    self._send(200, json.dumps(notice), "application/json")
                else:
                    self._send(404, "Not Found")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def _record(self, method: str, path: str) -> None:
        with self._lock:
            self.requests.append((method, path))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def schedule_interruption(self, action: str = "terminate", when: str = "2030-01-01T00:00:00Z") -> None:
        with self._lock:
            self.notice = {"action": action, "time": when}

    def expire_tokens(self) -> None:
        with self._lock:
            self.tokens.clear()

    def reset(self) -> None:
        with self._lock:
            self.notice = None
            self.tokens.clear()
            self.requests.clear()


@pytest.fixture(scope="session")
def imds_session() -> Iterator[ImdsServer]:
    server = ImdsServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def imds_server(imds_session: ImdsServer) -> ImdsServer:
    imds_session.reset()
    return imds_session


# ---------------------------------------------------------------- MLflow tracking server

MLFLOW_HEALTH_DEADLINE_S = 120.0  # a loaded 2-core machine takes ~10-40 s from start to /health


class MlflowServer(str):
    """The tracking URI of a running ``mlflow server``; ``startup_s`` is how long it took to answer /health."""

    startup_s: float = 0.0
    log_path: Path | None = None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + MLFLOW_HEALTH_DEADLINE_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"mlflow server exited with {proc.returncode} before answering /health:\n{tail}")
        if _healthy(url):
            return
        time.sleep(0.2)
    tail = log.read_text(errors="replace")[-3000:]
    limit = f"{MLFLOW_HEALTH_DEADLINE_S:.0f} s"
    raise RuntimeError(f"mlflow server at {url} did not answer /health within {limit}:\n{tail}")


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """Stop the server we started: its pid leads its own process group (the server and its worker)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # a worker that outlived the server


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    root = tmp_path_factory.mktemp("mlflow")
    (root / "artifacts").mkdir()
    url = f"http://127.0.0.1:{_free_port()}"
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--default-artifact-root", str(root / "artifacts"),
        "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1], "--workers", "1",
    ]  # fmt: skip
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no background job runner
    for name in [n for n in env if n.startswith("MLFLOW_TRACKING_")]:
        env.pop(name)
    log = root / "server.log"
    started = time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        _wait_healthy(url, proc, log)
        server = MlflowServer(url)
        server.startup_s, server.log_path = time.monotonic() - started, log
        yield server
    finally:
        _stop_group(proc)
