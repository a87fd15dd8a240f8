"""What every store is: the protocol, its errors, and the key rules they share."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from gpuline.errors import InfraError, InputError
from gpuline.training import checkpoints

# Marks a file being written (local) or downloaded (S3): never listed, never mistaken for an object.
TMP_MARK = ".gpuline-tmp-"
# The local store keeps its lock files here; no key may start with it.
LOCKS = ".locks"
CHANGED_HINT = "read it again and retry the update"
DAMAGED_HINT = "the object was changed or damaged after upload; use another copy"


class ObjectNotFound(InfraError):
    title = "object not found"


class PreconditionFailed(InfraError):
    """A conditional write lost: someone else changed the object since it was read."""

    title = "conditional write failed"


class ChecksumMismatch(InfraError):
    title = "checksum mismatch"


class CorruptCheckpoint(InfraError):
    title = "corrupt checkpoint"


class UploadCancelled(InfraError):
    """The caller asked to stop an upload (a newer checkpoint made it pointless)."""

    title = "upload cancelled"


# Asked now and then during an upload; True stops it (nothing partial is left that looks complete).
Cancel = Callable[[], bool]


class Storage(Protocol):
    def put_file(self, local: Path, key: str, *, sha256: str | None = None, cancel: Cancel | None = None) -> None: ...
    def get_file(self, key: str, local: Path) -> None: ...
    def put_bytes(self, key: str, data: bytes) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def list(self, prefix: str = "") -> list[str]: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...
    def uri_for(self, key: str) -> str: ...
    def etag(self, key: str) -> str | None: ...
    def put_if(self, key: str, data: bytes, expected_etag: str | None) -> str: ...


def check_key(key: str) -> str:
    """``key`` without leading or trailing slashes; an InputError when it could escape the store."""
    clean = key.strip("/")
    if not clean or ".." in clean.split("/") or clean.startswith(LOCKS):
        raise InputError(f"storage key {key!r} is not a valid relative key", hint="use a/b/c without '..'")
    return clean


def sha256_file(path: Path) -> str:
    return checkpoints.sha256_file(path)


def changed_since_read(uri: str) -> PreconditionFailed:
    return PreconditionFailed(f"{uri} changed since it was read", hint=CHANGED_HINT)


def checksum_mismatch(uri: str) -> ChecksumMismatch:
    return ChecksumMismatch(f"{uri} does not match its recorded sha256", hint=DAMAGED_HINT)
