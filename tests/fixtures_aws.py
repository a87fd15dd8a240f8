"""A moto server that answers one request at a time, for tests of concurrent conditional writes.

moto checks a condition and applies the write as two separate steps without a lock, and a failed
DynamoDB transaction restores a copy of the whole table taken when it began, undoing writes other
requests made meanwhile. Real DynamoDB and S3 are linearizable per item: a conditional write is
checked and applied atomically. Serializing requests gives moto that same guarantee, so a test
that races 50 processes against it tests our code, not moto's thread safety.

Import the fixtures into a test module::

    from fixtures_aws import serial_aws, serial_moto  # noqa: F401
"""

from __future__ import annotations

import threading
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest

from servers import FAKE_CREDENTIALS, point_boto3_at

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class SerialMoto(str):
    """The endpoint URL of a running serialized moto server; ``reset()`` empties all its backends."""

    def reset(self) -> None:
        request = urllib.request.Request(f"{self}/moto-api/reset", method="POST", data=b"")
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()


def serialized(app: WsgiApp) -> WsgiApp:
    lock = threading.Lock()

    def one_at_a_time(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        with lock:
            # The body is produced inside the lock too: a lazy iterable would otherwise run outside it.
            body = b"".join(app(environ, start_response))
        return [body]

    return one_at_a_time


@pytest.fixture(scope="session")
def serial_moto() -> Iterator[SerialMoto]:
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    with pytest.MonkeyPatch.context() as patch:
        for name, value in FAKE_CREDENTIALS.items():
            patch.setenv(name, value)

        class Quiet(MotoRequestHandler):
            def log_request(self, *args: Any, **kwargs: Any) -> None:
                return  # thousands of requests per test run: keep failure logs readable

        app = DomainDispatcherApplication(create_backend_app)
        server = make_server("127.0.0.1", 0, serialized(app), threaded=True, request_handler=Quiet)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            host, port = server.server_address[:2]
            yield SerialMoto(f"http://{host!s}:{port}")
        finally:
            server.shutdown()
            server.server_close()
            thread.join(timeout=10)


@pytest.fixture
def serial_aws(serial_moto: SerialMoto, monkeypatch: pytest.MonkeyPatch) -> SerialMoto:
    """boto3 in this test (and the processes it starts) talks to the serialized moto server, emptied first."""
    serial_moto.reset()
    point_boto3_at(serial_moto, monkeypatch)
    return serial_moto
