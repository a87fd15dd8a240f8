"""HTTP for the rest provider: one small transport seam (urllib by default), and reading and writing
JSON bodies by dotted path."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any


class HttpError(Exception):
    def __init__(self, status: int, body: Any, method: str, path: str) -> None:
        super().__init__(f"{method} {path}: HTTP {status}")
        self.status, self.body, self.method, self.path = status, body, method, path


Transport = Callable[[str, str, dict[str, str], bytes | None, float], tuple[int, bytes]]


def urllib_transport(
    method: str, url: str, headers: dict[str, str], data: bytes | None, timeout: float
) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


def parse_body(raw: bytes) -> Any:
    if not raw.strip():
        return {}
    try:
        return json.loads(raw)
    except ValueError:
        return {"error": {"message": raw[:200].decode(errors="replace")}}


def get_path(body: Any, path: str) -> Any:
    current = body
    for part in [p for p in path.split(".") if p]:
        if not isinstance(current, dict):
            return None
        current = current.get(part)
    return current


def put_path(body: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for part in parents:
        body = body.setdefault(part, {})
    body[last] = value


def parse_when(value: Any) -> datetime | None:
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value, tz=UTC)
    if isinstance(value, str) and value:
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return None


def str_or_none(value: Any) -> str | None:
    return str(value) if value not in (None, "") else None
