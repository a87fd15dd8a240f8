"""EC2 spot interruption notices through the instance metadata service (IMDSv2).

AWS gives a spot instance a two-minute warning at ``/latest/meta-data/spot/instance-action`` (404 until
one is scheduled). IMDSv2 needs a session token from ``PUT /latest/api/token`` sent back in the
``X-aws-ec2-metadata-token`` header. The watcher polls every 5 s, as AWS recommends, and calls back
once. It runs when ``GPULINE_IMDS_ENDPOINT`` names an endpoint or the machine is an EC2 instance.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gpuline import contract

DEFAULT_ENDPOINT = "http://169.254.169.254"
TOKEN_PATH = "/latest/api/token"
SPOT_ACTION_PATH = "/latest/meta-data/spot/instance-action"
POLL_S = 5.0
TOKEN_TTL_S = 21600


@dataclass(frozen=True)
class SpotNotice:
    action: str  # terminate | stop | hibernate
    time: str  # when AWS will act, ISO 8601 UTC


class ImdsError(Exception):
    pass


def on_ec2(sys_root: Path = Path("/sys")) -> bool:
    """Nitro instances carry the instance id as the board asset tag; Xen ones an ec2 hypervisor uuid."""
    probes: dict[str, Callable[[str], bool]] = {
        "devices/virtual/dmi/id/board_asset_tag": lambda v: v.startswith("i-"),
        "devices/virtual/dmi/id/sys_vendor": lambda v: v == "Amazon EC2",
        "hypervisor/uuid": lambda v: v.lower().startswith("ec2"),
    }
    for rel, matches in probes.items():
        try:
            if matches((sys_root / rel).read_text(errors="replace").strip()):
                return True
        except OSError:
            continue
    return False


def endpoint_from_env(environ: dict[str, str] | None = None, sys_root: Path = Path("/sys")) -> str | None:
    """The IMDS endpoint to watch, or None: ``GPULINE_IMDS_ENDPOINT`` (``off`` disables), else EC2's."""
    env = os.environ if environ is None else environ
    configured = env.get(contract.IMDS_ENDPOINT, "").strip()
    if configured.lower() in {"off", "none", "false", "0"}:
        return None
    if configured:
        return configured.rstrip("/")
    return DEFAULT_ENDPOINT if on_ec2(sys_root) else None


class ImdsClient:
    def __init__(self, endpoint: str, timeout_s: float = 2.0) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.timeout_s = timeout_s
        self._token: str | None = None
        self._token_expires = 0.0

    def _request(self, method: str, path: str, headers: dict[str, str]) -> tuple[int, str]:
        request = urllib.request.Request(self.endpoint + path, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return int(response.status), response.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as exc:
            return exc.code, ""
        except (urllib.error.URLError, OSError) as exc:
            raise ImdsError(f"instance metadata at {self.endpoint} unreachable: {exc}") from exc

    def token(self) -> str:
        if self._token is None or time.monotonic() >= self._token_expires:
            status, body = self._request("PUT", TOKEN_PATH, {"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL_S)})
            if status != 200 or not body:
                raise ImdsError(f"IMDSv2 token request to {self.endpoint} answered {status}")
            self._token = body.strip()
            # Renew a minute early so a token never expires between fetching and using it.
            self._token_expires = time.monotonic() + TOKEN_TTL_S - 60
        return self._token

    def get(self, path: str) -> str | None:
        """The metadata value at ``path``, or None when it does not exist (404)."""
        for _ in range(2):
            status, body = self._request("GET", path, {"X-aws-ec2-metadata-token": self.token()})
            if status == 200:
                return body
            if status == 404:
                return None
            if status == 401:  # the token expired or the service restarted: fetch a new one once
                self._token = None
                continue
            raise ImdsError(f"GET {path} from {self.endpoint} answered {status}")
        raise ImdsError(f"GET {path} from {self.endpoint} kept answering 401 with a fresh token")

    def spot_notice(self) -> SpotNotice | None:
        body = self.get(SPOT_ACTION_PATH)
        if body is None:
            return None
        try:
            data = json.loads(body)
        except ValueError as exc:
            raise ImdsError(f"unreadable spot instance-action: {body[:200]!r}") from exc
        return SpotNotice(action=str(data.get("action", "")), time=str(data.get("time", "")))


class SpotWatcher:
    """Polls for a spot interruption notice in a daemon thread and calls ``on_notice`` once."""

    def __init__(
        self,
        client: ImdsClient,
        on_notice: Callable[[SpotNotice], None],
        *,
        interval_s: float = POLL_S,
        log: Callable[[str], None] = print,
    ) -> None:
        self.client = client
        self.on_notice = on_notice
        self.interval_s = interval_s
        self.log = log
        self.notice: SpotNotice | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpuline-spot-watcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.client.timeout_s * 2 + 1)

    def _run(self) -> None:
        complained = False
        while not self._stop.is_set():
            try:
                notice = self.client.spot_notice()
            except ImdsError as exc:
                # Say it once: a flapping metadata service must not flood the training log.
                if not complained:
                    self.log(f"spot watcher: {exc} (will keep trying)")
                    complained = True
                notice = None
            if notice is not None:
                self.notice = notice
                self.on_notice(notice)
                return
            self._stop.wait(self.interval_s)
