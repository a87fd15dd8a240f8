"""boto3 and botocore, in one place: importing them, building clients, and what their errors mean.

Nothing here imports the SDK at module level: importing this module is free, and boto3 is loaded
the first time a client (or a transfer config) is built. A missing SDK is an :class:`InputError`
naming the extra to install.

Clients get a session of their own (a boto3 session is not safe to share across threads), the
``standard`` retry mode with a per-caller number of attempts (``AWS_MAX_ATTEMPTS`` overrides it),
and an explicit endpoint when the caller has one (``resources.options.endpoint_url``); without one
the SDK reads ``AWS_ENDPOINT_URL`` (and ``AWS_ENDPOINT_URL_<SERVICE>``) itself, which is how tests
point every client at a local server. Credentials and the default region come from the usual chain.

Errors are recognised without importing botocore: an exception can only be one of its classes if
botocore is already loaded, so the checks look there first.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any, Literal, overload

from gpuline import contract
from gpuline.errors import GpulineError, InfraError, InputError

if TYPE_CHECKING:
    from types import ModuleType

    from boto3.s3.transfer import TransferConfig
    from mypy_boto3_dynamodb.client import DynamoDBClient
    from mypy_boto3_ec2.client import EC2Client
    from mypy_boto3_s3.client import S3Client
    from s3transfer.manager import TransferManager

INSTALL_HINT = "pip install 'gpuline[aws]'"
NETWORK_HINT = "check AWS_ENDPOINT_URL, the network and the credentials"
CREDENTIALS_HINT = "configure AWS credentials (aws-actions/configure-aws-credentials with OIDC)"
UNREACHABLE_HINT = "AWS is unreachable from here; check the network or AWS_ENDPOINT_URL"

# AWS said no to the caller, not to the request: more retries or another zone cannot help.
PERMISSION_CODES = frozenset({"UnauthorizedOperation", "AuthFailure", "OptInRequired", "Blocked"})
# What S3 answers (as a code, or only as a status in the code's place) for a key that is not there.
NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound"})

MAX_ATTEMPTS_ENV = "AWS_MAX_ATTEMPTS"
DEFAULT_MAX_ATTEMPTS = 5  # what botocore's own default retry policy allows
DEFAULT_CHUNK_MB = "32"
DEFAULT_CONCURRENCY = "8"

Service = Literal["s3", "dynamodb", "ec2"]


# ---------------------------------------------------------------- the SDK and its clients


def import_boto3(needed_by: str) -> ModuleType:
    """boto3, or an InputError saying ``needed_by`` needs it and how to install it."""
    try:
        import boto3
    except ModuleNotFoundError:
        raise InputError(f"{needed_by} needs boto3, which is not installed", hint=INSTALL_HINT) from None
    return boto3


@overload
def client(
    service: Literal["s3"],
    *,
    needed_by: str,
    region: str | None = None,
    endpoint_url: str | None = None,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    timeouts: tuple[float, float] | None = None,
) -> S3Client: ...


@overload
def client(
    service: Literal["dynamodb"],
    *,
    needed_by: str,
    region: str | None = None,
    endpoint_url: str | None = None,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    timeouts: tuple[float, float] | None = None,
) -> DynamoDBClient: ...


@overload
def client(
    service: Literal["ec2"],
    *,
    needed_by: str,
    region: str | None = None,
    endpoint_url: str | None = None,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    timeouts: tuple[float, float] | None = None,
) -> EC2Client: ...


def client(
    service: Service,
    *,
    needed_by: str,
    region: str | None = None,
    endpoint_url: str | None = None,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    timeouts: tuple[float, float] | None = None,
) -> Any:
    """A client for ``service``.

    ``needed_by`` names the caller in the error raised when boto3 is missing ("the s3 ledger").
    ``region`` None lets the SDK choose (AWS_REGION, AWS_DEFAULT_REGION, the config file).
    ``timeouts`` is (connect, read) in seconds; None keeps the SDK's.
    """
    boto3 = import_boto3(needed_by)
    from botocore.config import Config

    attempts = int(os.environ.get(MAX_ATTEMPTS_ENV) or max_attempts)
    settings: dict[str, Any] = {
        "retries": {"mode": "standard", "max_attempts": attempts},
        "user_agent_extra": "gpuline",
    }
    if timeouts is not None:
        settings["connect_timeout"], settings["read_timeout"] = timeouts
    session = boto3.session.Session()
    return session.client(service, region_name=region, endpoint_url=endpoint_url or None, config=Config(**settings))


def default_region() -> str | None:
    """The region the environment names, if any (``AWS_REGION``, then ``AWS_DEFAULT_REGION``)."""
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None


def transfer_config() -> TransferConfig:
    """Multipart settings for checkpoint-sized objects (tunable through env for odd networks)."""
    import_boto3("s3:// storage")
    from boto3.s3.transfer import TransferConfig

    mib = 1024 * 1024
    chunk = int(os.environ.get(contract.S3_CHUNK_MB, DEFAULT_CHUNK_MB)) * mib
    return TransferConfig(
        multipart_threshold=chunk,
        multipart_chunksize=chunk,
        max_concurrency=int(os.environ.get(contract.S3_CONCURRENCY, DEFAULT_CONCURRENCY)),
        use_threads=True,
    )


def transfer_manager(s3: S3Client, config: TransferConfig) -> TransferManager:
    """The transfer manager behind ``upload_file``, for uploads that must be cancellable."""
    from s3transfer.manager import TransferManager

    return TransferManager(s3, config)


def client_error(code: str, message: str, operation: str) -> Exception:
    """The exception botocore raises when AWS answers ``code`` (for injected faults)."""
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": message}}, operation)


# ---------------------------------------------------------------- what an error means


def _loaded(module: str) -> ModuleType | None:
    return sys.modules.get(module)


def is_service_error(exc: BaseException) -> bool:
    """AWS answered the call with an error (a botocore ``ClientError``): see :func:`error_code`."""
    errors = _loaded("botocore.exceptions")
    return errors is not None and isinstance(exc, errors.ClientError)


def is_sdk_error(exc: BaseException) -> bool:
    """The SDK failed without an answer: no credentials, no connection, a timeout, a failed transfer."""
    errors, boto3_errors = _loaded("botocore.exceptions"), _loaded("boto3.exceptions")
    if errors is not None and isinstance(exc, errors.BotoCoreError):
        return True
    return boto3_errors is not None and isinstance(exc, boto3_errors.Boto3Error)


def _is(exc: BaseException, *names: str) -> bool:
    errors = _loaded("botocore.exceptions")
    return errors is not None and isinstance(exc, tuple(getattr(errors, name) for name in names))


def is_credentials_error(exc: BaseException) -> bool:
    return _is(exc, "NoCredentialsError", "PartialCredentialsError", "NoRegionError")


def is_connection_error(exc: BaseException) -> bool:
    return _is(exc, "ConnectionError", "ReadTimeoutError")


def response(exc: BaseException) -> dict[str, Any]:
    """The parsed error response AWS sent (empty when ``exc`` carries none)."""
    body = getattr(exc, "response", None)
    return body if isinstance(body, dict) else {}


def error_code(exc: BaseException) -> str:
    """AWS's error code ("NoSuchBucket", "InsufficientInstanceCapacity"), or "" when there is none."""
    return str(response(exc).get("Error", {}).get("Code", "") or "")


def error_message(exc: BaseException) -> str:
    return str(response(exc).get("Error", {}).get("Message", "") or "")


def http_status(exc: BaseException) -> int:
    return int(response(exc).get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def code_or_status(exc: BaseException) -> str:
    """The error code, or the HTTP status where S3 answers with none (a HEAD has no body)."""
    status = http_status(exc)
    return error_code(exc) or (str(status) if status else "")


def translate(exc: BaseException, doing: str, *, permissions_hint: str) -> GpulineError:
    """``exc`` as one of gpuline's errors, saying what to change; a GpulineError is returned as it is.

    ``doing`` starts the message ("launching an instance"); ``permissions_hint`` says which
    permissions the caller needs when AWS refuses it.
    """
    if isinstance(exc, GpulineError):
        return exc
    code = error_code(exc)
    if code in PERMISSION_CODES:
        return InfraError(f"{doing}: AWS refused ({code})", hint=permissions_hint)
    if is_credentials_error(exc):
        return InfraError(f"{doing}: {exc}", hint=CREDENTIALS_HINT)
    if is_connection_error(exc):
        return InfraError(f"{doing}: {exc}", hint=UNREACHABLE_HINT)
    return InfraError(f"{doing}: {code or type(exc).__name__}: {exc}", hint="see the AWS error above")
