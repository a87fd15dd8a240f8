"""MLflow's own client, in one place: where the server is, the credentials it reads, what its errors mean.

Nothing here imports MLflow at module level: ``mlflow-skinny`` (the extra ``mlflow``) is loaded when
the first client is built. The client reads its credentials from the environment itself:
``MLFLOW_TRACKING_TOKEN`` (a bearer token), or ``MLFLOW_TRACKING_USERNAME`` and
``MLFLOW_TRACKING_PASSWORD`` (basic auth). :func:`secrets` hands the secret ones to the caller to
mask; this layer never writes to the log.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

from gpuline.errors import GpulineError, InfraError, InputError, NotFoundError

INSTALL_HINT = "pip install 'gpuline[mlflow]'"
AUTH_HINT = "set MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
TRACKING_URI = "MLFLOW_TRACKING_URI"
SECRET_NAMES = ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD")
NOT_FOUND = "RESOURCE_DOES_NOT_EXIST"
ALREADY_EXISTS = "RESOURCE_ALREADY_EXISTS"
_DENIED = ("PERMISSION_DENIED", "UNAUTHENTICATED")


def tracking_uri(uri: str, env: Mapping[str, str] | None = None) -> str:
    """The tracking server of ``mlflow+http://HOST:PORT``, ``mlflow+https://HOST`` or ``mlflow://``."""
    env = os.environ if env is None else env
    scheme, _, rest = uri.partition("://")
    if scheme == "mlflow":
        if rest.strip("/"):
            raise InputError(
                f"registry URI {uri!r}: mlflow:// takes no host (it reads {TRACKING_URI})",
                hint="write mlflow+https://HOST (or mlflow+http://HOST:PORT), or plain mlflow://",
            )
        found = env.get(TRACKING_URI, "").strip()
        if not found:
            raise InputError(
                f"registry URI mlflow:// reads the tracking server from {TRACKING_URI}, which is not set",
                hint=f"set {TRACKING_URI}, or write mlflow+https://HOST in backends.registry",
            )
        return found
    target = uri.removeprefix("mlflow+")
    if not urlsplit(target).netloc:
        raise InputError(
            f"registry URI {uri!r} has no host", hint="write mlflow+http://HOST:PORT or mlflow+https://HOST"
        )
    return target


def secrets(tracking: str = "", env: Mapping[str, str] | None = None) -> list[str]:
    """The credentials the MLflow client will send, for the caller to mask (the user name is not secret)."""
    env = os.environ if env is None else env
    found = [value for name in SECRET_NAMES if (value := env.get(name, "").strip())]
    in_uri = urlsplit(tracking).password
    return [*found, in_uri] if in_uri else found


def shown(tracking: str) -> str:
    """The tracking URI as messages may show it: without a user name or password written into it."""
    parts = urlsplit(tracking)
    return parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]).geturl() if "@" in parts.netloc else tracking


def new_client(tracking: str) -> Any:
    try:
        from mlflow.tracking import MlflowClient
    except ModuleNotFoundError:
        raise InputError(
            "the mlflow model registry needs mlflow-skinny, which is not installed", hint=INSTALL_HINT
        ) from None
    # Its "waiting for the model version" line on every registration is noise in a CI log.
    logging.getLogger("mlflow.store.model_registry.abstract_store").setLevel(logging.WARNING)
    return MlflowClient(tracking_uri=tracking)


def error_code(exc: BaseException) -> str:
    """MLflow's error code ("RESOURCE_DOES_NOT_EXIST"), or "" for an exception that is not MLflow's."""
    return str(getattr(exc, "error_code", "") or "") if is_mlflow_error(exc) else ""


def is_mlflow_error(exc: BaseException) -> bool:
    errors = sys.modules.get("mlflow.exceptions")  # loaded by the client, if one was ever built
    return errors is not None and isinstance(exc, errors.MlflowException)


def _from_the_client(exc: BaseException) -> bool:
    return is_mlflow_error(exc) or type(exc).__module__.split(".")[0] in ("requests", "urllib3")


def translate(exc: BaseException, doing: str, tracking: str, missing: str | None = None) -> GpulineError:
    """``exc`` (raised by the MLflow client while ``doing``) as one of gpuline's errors."""
    code, text = error_code(exc), str(exc)
    if code == NOT_FOUND and missing:
        return NotFoundError(missing, hint="list what the registry holds with `gpuline models`")
    if code in _DENIED or any(f"error code {status}" in text for status in (401, 403)):
        return InfraError(f"{doing}: the MLflow server at {shown(tracking)} refused the credentials", hint=AUTH_HINT)
    detail = text.splitlines()[0][:300] if text else type(exc).__name__
    detail = detail.replace(tracking.rstrip("/"), shown(tracking).rstrip("/"))
    for secret in secrets(tracking):
        detail = detail.replace(secret, "***")
    return InfraError(
        f"{doing} on the MLflow server at {shown(tracking)} failed: {detail}",
        hint="check the registry URI, the network and the server (MLFLOW_HTTP_REQUEST_MAX_RETRIES and "
        "MLFLOW_HTTP_REQUEST_TIMEOUT bound the client's retries)",
    )


@contextmanager
def calls(doing: str, tracking: str, missing: str | None = None) -> Iterator[None]:
    """MLflow client failures inside the block as gpuline errors; ``missing`` is the not-found message."""
    try:
        yield
    except GpulineError:
        raise
    except Exception as exc:
        if not _from_the_client(exc):
            raise
        raise translate(exc, doing, tracking, missing) from None
