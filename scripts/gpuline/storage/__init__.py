"""Durable stores for checkpoints and artifacts: a local directory or S3, behind one small protocol.

``open_storage("file://.gpuline/artifacts", base_dir)`` or ``open_storage("s3://bucket/prefix", ...)``.
Backends are plug-ins chosen by URI scheme; boto3 is imported only when an S3 store makes its first
call (``AWS_ENDPOINT_URL`` points it at any S3-compatible server). Every object written through a
store carries its sha256 (S3: object metadata), and reads check it, so a bit flip anywhere between
the trainer's disk and the next machine is caught at resume.

Checkpoints travel with :func:`upload_checkpoint` / :func:`download_checkpoint`: files first, the
manifest last, so a remote checkpoint without a manifest is incomplete by construction, however the
upload was interrupted. :func:`stream_checkpoint` does the same for a checkpoint still being written,
its parts leaving as they are serialised (:mod:`gpuline.storage.streaming`).
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

from gpuline.errors import InputError, clip_repr
from gpuline.plugins import Registry
from gpuline.storage.base import (
    Cancel,
    ChecksumMismatch,
    CorruptCheckpoint,
    ObjectNotFound,
    PreconditionFailed,
    Storage,
    UploadCancelled,
)
from gpuline.storage.checkpoints import (
    RemoteCheckpoint,
    delete_checkpoint,
    download_checkpoint,
    prune_remote,
    remote_checkpoints,
    upload_checkpoint,
)
from gpuline.storage.local import LocalStorage
from gpuline.storage.s3 import S3Storage, transfer_config
from gpuline.storage.streaming import StreamAborted, StreamingStorage, StreamResult, can_stream, stream_checkpoint

__all__ = [
    "BACKENDS",
    "Cancel",
    "ChecksumMismatch",
    "CorruptCheckpoint",
    "LocalStorage",
    "ObjectNotFound",
    "PreconditionFailed",
    "RemoteCheckpoint",
    "S3Storage",
    "Storage",
    "StreamAborted",
    "StreamResult",
    "StreamingStorage",
    "UploadCancelled",
    "can_stream",
    "check_uri",
    "delete_checkpoint",
    "download_checkpoint",
    "open_storage",
    "prune_remote",
    "remote_checkpoints",
    "stream_checkpoint",
    "transfer_config",
    "upload_checkpoint",
]

# scheme -> "module:factory"; each factory takes (uri, base_dir). A plain path has no scheme.
BACKENDS: Registry = Registry(
    "storage backend",
    {
        "file": "gpuline.storage.local:open_local",
        "s3": "gpuline.storage.s3:open_s3",
    },
    aliases={"": "file"},
)


def check_uri(uri: str) -> str:
    """The URI's scheme ("" for a plain path), when it names a storage backend; an InputError
    otherwise (preflight calls this, so a store nobody can write fails before a machine is leased)."""
    try:
        scheme = urlparse(uri).scheme
    except ValueError:  # an unbalanced [ in the host part
        scheme = uri.partition("://")[0]
    if not BACKENDS.knows(scheme):
        raise InputError(
            f"storage URI {clip_repr(uri)}: {clip_repr(scheme)} is not a valid {BACKENDS.kind}",
            hint="use file://DIR (relative to gpuline.yml) or s3://BUCKET/PREFIX",
        )
    return scheme


def open_storage(uri: str, base_dir: Path) -> Storage:
    """``file://rel/or/abs`` (relative to ``base_dir``), a plain path, or ``s3://bucket/prefix``."""
    factory = BACKENDS.load(check_uri(uri))
    storage: Storage = factory(uri, base_dir)
    return storage
