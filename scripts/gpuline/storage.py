"""Durable stores for checkpoints and artifacts: a local directory or S3, behind one small protocol.

``open_storage("file://.gpuline/artifacts", base_dir)`` or ``open_storage("s3://bucket/prefix", ...)``.
boto3 is imported only when an S3 store is used (``AWS_ENDPOINT_URL`` points it at any S3-compatible
server). Every object written through a store carries its sha256 (S3: object metadata), and reads
check it, so a bit flip anywhere between the trainer's disk and the next machine is caught at resume.

Checkpoints travel with :func:`upload_checkpoint` / :func:`download_checkpoint`: files first, the
manifest last, so a remote checkpoint without a manifest is incomplete by construction, however the
upload was interrupted.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlparse

from gpuline.errors import InfraError, InputError
from gpuline.training import checkpoints
from gpuline.training.checkpoints import MANIFEST, CheckpointInfo

if TYPE_CHECKING:
    from boto3.s3.transfer import TransferConfig
    from mypy_boto3_s3 import S3Client

_TMP_MARK = ".gpuline-tmp-"
_LOCKS = ".locks"
_CHUNK = 8 * 1024 * 1024


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


def open_storage(uri: str, base_dir: Path) -> Storage:
    """``file://rel/or/abs`` (relative to ``base_dir``), a plain path, or ``s3://bucket/prefix``."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise InputError(f"storage URI {uri!r} has no bucket", hint="write s3://BUCKET/optional/prefix")
        return S3Storage(parsed.netloc, parsed.path.strip("/"))
    if parsed.scheme == "file":
        # file://relative/dir keeps "relative" in netloc; file:///abs/dir has an empty netloc.
        path = Path(parsed.netloc + parsed.path) if parsed.netloc else Path(parsed.path)
    elif parsed.scheme == "":
        path = Path(uri)
    else:
        raise InputError(
            f"storage URI {uri!r} has an unknown scheme {parsed.scheme!r}",
            hint="use file://DIR (relative to gpuline.yml) or s3://BUCKET/PREFIX",
        )
    return LocalStorage(path if path.is_absolute() else base_dir / path)


def _check_key(key: str) -> str:
    clean = key.strip("/")
    if not clean or ".." in clean.split("/") or clean.startswith(_LOCKS):
        raise InputError(f"storage key {key!r} is not a valid relative key", hint="use a/b/c without '..'")
    return clean


def _copy(source: Path, target: Path) -> None:
    shutil.copyfile(source, target)


def _write(target: Path, data: bytes) -> None:
    target.write_bytes(data)


def _sha256_file(path: Path) -> str:
    return checkpoints.sha256_file(path)


# ---------------------------------------------------------------- local directory


class LocalStorage:
    """A directory on a filesystem; writes are atomic (temp file, fsync, rename)."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def _write_atomically(self, target: Path, fill: Callable[[Path], None]) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f"{_TMP_MARK}{target.name}.{secrets.token_hex(4)}"
        try:
            fill(tmp)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, target)
            checkpoints.fsync_dir(target.parent)
        finally:
            tmp.unlink(missing_ok=True)

    def put_file(self, local: Path, key: str, *, sha256: str | None = None, cancel: Cancel | None = None) -> None:
        if cancel is not None and cancel():
            raise UploadCancelled(f"upload to {self.uri_for(key)} cancelled")
        self._write_atomically(self._path(key), lambda tmp: _copy(local, tmp))

    def get_file(self, key: str, local: Path) -> None:
        source = self._path(key)
        if not source.is_file():
            raise ObjectNotFound(f"{self.uri_for(key)} does not exist")
        local.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, local)

    def put_bytes(self, key: str, data: bytes) -> None:
        self._write_atomically(self._path(key), lambda tmp: _write(tmp, data))

    def get_bytes(self, key: str) -> bytes:
        source = self._path(key)
        try:
            return source.read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise ObjectNotFound(f"{self.uri_for(key)} does not exist") from None

    def list(self, prefix: str = "") -> list[str]:
        if not self.root.is_dir():
            return []
        keys = []
        for path in self.root.rglob("*"):
            rel = path.relative_to(self.root).as_posix()
            hidden = rel.startswith(_LOCKS + "/") or _TMP_MARK in path.name
            if path.is_file() and not hidden and rel.startswith(prefix):
                keys.append(rel)
        return sorted(keys)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        # Leave no empty directories behind, so a listing shows only what holds objects.
        parent = path.parent
        while parent != self.root and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent

    def uri_for(self, key: str) -> str:
        return (self.root / key.strip("/")).as_uri() if key else self.root.as_uri()

    def etag(self, key: str) -> str | None:
        path = self._path(key)
        return _sha256_file(path) if path.is_file() else None

    @contextlib.contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        locks = self.root / _LOCKS
        locks.mkdir(parents=True, exist_ok=True)
        name = hashlib.sha256(key.encode()).hexdigest()[:32]
        with (locks / f"{name}.lock").open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def put_if(self, key: str, data: bytes, expected_etag: str | None) -> str:
        """Write ``data`` only if the object's etag is still ``expected_etag`` (None: must not exist)."""
        with self._locked(_check_key(key)):
            current = self.etag(key)
            if current != expected_etag:
                raise PreconditionFailed(
                    f"{self.uri_for(key)} changed since it was read",
                    hint="read it again and retry the update",
                )
            self.put_bytes(key, data)
        return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- S3


def transfer_config() -> TransferConfig:
    """Multipart settings for checkpoint-sized objects (tunable through env for odd networks)."""
    from boto3.s3.transfer import TransferConfig

    mib = 1024 * 1024
    chunk = int(os.environ.get("GPULINE_S3_CHUNK_MB", "32")) * mib
    return TransferConfig(
        multipart_threshold=chunk,
        multipart_chunksize=chunk,
        max_concurrency=int(os.environ.get("GPULINE_S3_CONCURRENCY", "8")),
        use_threads=True,
    )


def _client_error_status(exc: Exception) -> tuple[int, str]:
    response: dict[str, Any] = getattr(exc, "response", {}) or {}
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    code = str(response.get("Error", {}).get("Code", ""))
    return status, code


class S3Storage:
    """An S3 bucket and prefix. Multipart uploads through a tuned TransferConfig; sha256 in metadata."""

    def __init__(self, bucket: str, prefix: str = "", client: S3Client | None = None) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._client = client
        self._config: TransferConfig | None = None

    @property
    def client(self) -> S3Client:
        if self._client is None:
            try:
                import boto3
            except ModuleNotFoundError:
                raise InputError(
                    "s3:// storage needs boto3, which is not installed", hint="pip install 'gpuline[aws]'"
                ) from None
            self._client = boto3.client("s3")
        return self._client

    @property
    def config(self) -> TransferConfig:
        if self._config is None:
            self._config = transfer_config()
        return self._config

    def _key(self, key: str) -> str:
        clean = _check_key(key)
        return f"{self.prefix}/{clean}" if self.prefix else clean

    def uri_for(self, key: str) -> str:
        full = f"{self.prefix}/{key.strip('/')}".strip("/") if key else self.prefix
        return f"s3://{self.bucket}/{full}"

    @contextlib.contextmanager
    def _errors(self, action: str, key: str) -> Iterator[None]:
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except ClientError as exc:
            status, code = _client_error_status(exc)
            if code == "NoSuchBucket":
                raise InfraError(
                    f"S3 bucket {self.bucket!r} does not exist (while trying {action} of {self.uri_for(key)})",
                    hint="create the bucket or fix the storage URI",
                ) from None
            if status == 404 or code in {"NoSuchKey", "404", "NotFound"}:
                raise ObjectNotFound(f"{self.uri_for(key)} does not exist") from None
            raise InfraError(
                f"S3 {action} of {self.uri_for(key)} failed: {code or status} {exc}",
                hint="check the bucket exists, the credentials and AWS_ENDPOINT_URL",
            ) from exc
        except (BotoCoreError, Boto3Error) as exc:  # Boto3Error: upload_file's S3UploadFailedError
            raise InfraError(
                f"S3 {action} of {self.uri_for(key)} failed: {exc}",
                hint="check the bucket, the credentials, the network and AWS_ENDPOINT_URL",
            ) from exc

    def put_file(self, local: Path, key: str, *, sha256: str | None = None, cancel: Cancel | None = None) -> None:
        digest = sha256 or _sha256_file(local)
        extra = {"Metadata": {"sha256": digest}}
        with self._errors("upload", key):
            if cancel is None:
                self.client.upload_file(str(local), self.bucket, self._key(key), ExtraArgs=extra, Config=self.config)
                return
            self._cancellable_upload(local, key, extra, cancel)

    def _cancellable_upload(self, local: Path, key: str, extra: dict[str, Any], cancel: Cancel) -> None:
        """The transfer manager behind ``upload_file``, watched so the upload can be called off."""
        from concurrent.futures import CancelledError

        from s3transfer.manager import TransferManager

        manager = TransferManager(self.client, self.config)
        cancelled = False
        try:
            future = manager.upload(str(local), self.bucket, self._key(key), extra_args=extra)
            while not future.done():
                if cancel():
                    future.cancel()  # aborts the multipart upload: no object appears
                    cancelled = True
                    break
                time.sleep(0.05)
            try:
                future.result()
            except CancelledError:
                cancelled = True
        finally:
            manager.shutdown(cancel=cancelled)
        if cancelled:
            raise UploadCancelled(f"upload to {self.uri_for(key)} cancelled")

    def _expected_sha256(self, key: str) -> str | None:
        with self._errors("head", key):
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        return head.get("Metadata", {}).get("sha256")

    def get_file(self, key: str, local: Path) -> None:
        expected = self._expected_sha256(key)
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.parent / f"{_TMP_MARK}{local.name}.{secrets.token_hex(4)}"
        try:
            with self._errors("download", key):
                self.client.download_file(self.bucket, self._key(key), str(tmp), Config=self.config)
            if expected is not None and _sha256_file(tmp) != expected:
                raise ChecksumMismatch(
                    f"{self.uri_for(key)} does not match its recorded sha256",
                    hint="the object was changed or damaged after upload; use another copy",
                )
            os.replace(tmp, local)
        finally:
            tmp.unlink(missing_ok=True)

    def put_bytes(self, key: str, data: bytes) -> None:
        with self._errors("put", key):
            self.client.put_object(
                Bucket=self.bucket,
                Key=self._key(key),
                Body=data,
                Metadata={"sha256": hashlib.sha256(data).hexdigest()},
            )

    def get_bytes(self, key: str) -> bytes:
        with self._errors("get", key):
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            data = response["Body"].read()
        expected = response.get("Metadata", {}).get("sha256")
        if expected is not None and hashlib.sha256(data).hexdigest() != expected:
            raise ChecksumMismatch(
                f"{self.uri_for(key)} does not match its recorded sha256",
                hint="the object was changed or damaged after upload; use another copy",
            )
        return data

    def list(self, prefix: str = "") -> list[str]:
        base = f"{self.prefix}/" if self.prefix else ""
        keys: list[str] = []
        with self._errors("list", prefix or "."):
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=base + prefix):
                keys.extend(obj["Key"][len(base) :] for obj in page.get("Contents", []))
        return sorted(keys)

    def exists(self, key: str) -> bool:
        return self.etag(key) is not None

    def delete(self, key: str) -> None:
        with self._errors("delete", key):
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def etag(self, key: str) -> str | None:
        try:
            with self._errors("head", key):
                head = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ObjectNotFound:
            return None
        return head["ETag"]

    def put_if(self, key: str, data: bytes, expected_etag: str | None) -> str:
        """Conditional PUT: ``IfNoneMatch='*'`` to create, ``IfMatch`` to replace what was read."""
        from botocore.exceptions import ClientError

        condition: dict[str, str] = {"IfNoneMatch": "*"} if expected_etag is None else {"IfMatch": expected_etag}
        for attempt in range(5):
            try:
                response = self.client.put_object(
                    Bucket=self.bucket,
                    Key=self._key(key),
                    Body=data,
                    Metadata={"sha256": hashlib.sha256(data).hexdigest()},
                    **condition,  # type: ignore[arg-type]
                )
                return response["ETag"]
            except ClientError as exc:
                status, code = _client_error_status(exc)
                # 412: the condition is false; 404 on IfMatch: the object is gone. Both mean "re-read".
                if status in {412, 404} or code in {"PreconditionFailed", "NoSuchKey"}:
                    raise PreconditionFailed(
                        f"{self.uri_for(key)} changed since it was read", hint="read it again and retry the update"
                    ) from None
                # 409: a concurrent conditional write is in progress; S3 asks the caller to retry.
                if status == 409 or code == "ConditionalRequestConflict":
                    time.sleep(0.05 * 2**attempt)
                    continue
                raise InfraError(f"S3 conditional put of {self.uri_for(key)} failed: {code} {exc}") from exc
        raise PreconditionFailed(f"{self.uri_for(key)} stayed contended after 5 tries", hint="retry later")


# ---------------------------------------------------------------- checkpoints in a store


@dataclass(frozen=True)
class RemoteCheckpoint:
    step: int
    key: str  # prefix/step-NNNNNNNN
    complete: bool  # has a manifest (not yet verified)


def remote_checkpoints(storage: Storage, prefix: str) -> list[RemoteCheckpoint]:
    """Checkpoint directories under ``prefix``, oldest first, with whether a manifest exists."""
    base = prefix.strip("/")
    steps: dict[int, bool] = {}
    for key in storage.list(f"{base}/"):
        parts = key[len(base) + 1 :].split("/")
        step = checkpoints.parse_step(parts[0])
        if step is None or len(parts) < 2:
            continue
        steps[step] = steps.get(step, False) or parts[1:] == [MANIFEST]
    return [
        RemoteCheckpoint(step, f"{base}/{checkpoints.step_dir_name(step)}", done)
        for step, done in sorted(steps.items())
    ]


def upload_checkpoint(
    storage: Storage,
    checkpoint: Path,
    prefix: str,
    *,
    on_file: Callable[[str], None] | None = None,
    replace: bool = True,
    cancel: Cancel | None = None,
) -> CheckpointInfo:
    """Upload a committed local checkpoint: every file first, its manifest last.

    ``replace=False`` says the caller knows this step has no manifest in the store yet, which saves
    a request. ``cancel`` is polled during the upload; when it says so, UploadCancelled is raised
    before the manifest is written.
    """
    result = checkpoints.verify(checkpoint, hashes=False)
    if not result.ok or result.manifest is None or result.step is None:
        raise CorruptCheckpoint(f"{checkpoint} is not a complete checkpoint: {result.reason}")
    key = f"{prefix.strip('/')}/{checkpoints.step_dir_name(result.step)}"
    # If this step was uploaded before (a resumed run re-saving it), it stops claiming completeness
    # before any of its files change.
    if replace:
        storage.delete(f"{key}/{MANIFEST}")
    for rel, entry in sorted(result.manifest["files"].items()):
        storage.put_file(checkpoint / rel, f"{key}/{rel}", sha256=entry["sha256"], cancel=cancel)
        if on_file is not None:
            on_file(rel)
    manifest_bytes = (checkpoint / MANIFEST).read_bytes()
    storage.put_bytes(f"{key}/{MANIFEST}", manifest_bytes)
    return CheckpointInfo(storage.uri_for(key), result.step, hashlib.sha256(manifest_bytes).hexdigest())


def download_checkpoint(storage: Storage, key: str, local_dir: Path) -> Path:
    """Fetch the checkpoint at ``key`` into ``local_dir/step-N`` and verify every file; return its path."""
    uri = storage.uri_for(key)
    try:
        manifest_bytes = storage.get_bytes(f"{key}/{MANIFEST}")
    except ObjectNotFound:
        raise CorruptCheckpoint(f"{uri} is incomplete: no manifest.json") from None
    except ChecksumMismatch:
        raise CorruptCheckpoint(f"{uri}: manifest.json does not match its recorded sha256") from None
    try:
        manifest = json.loads(manifest_bytes)
    except ValueError as exc:
        raise CorruptCheckpoint(f"{uri}: unreadable manifest: {exc}") from None
    step = checkpoints.parse_step(key.rsplit("/", 1)[-1])
    problem = checkpoints.check_manifest(manifest, step) if isinstance(manifest, dict) else "not an object"
    if problem:
        raise CorruptCheckpoint(f"{uri}: {problem}")
    local_dir.mkdir(parents=True, exist_ok=True)
    final = local_dir / checkpoints.step_dir_name(int(manifest["step"]))
    tmp = local_dir / f".tmp-{final.name}-{secrets.token_hex(4)}"
    try:
        for rel in sorted(manifest["files"]):
            try:
                storage.get_file(f"{key}/{rel}", tmp / rel)
            except ObjectNotFound:
                raise CorruptCheckpoint(f"{uri}: missing file {rel}") from None
            except ChecksumMismatch:
                raise CorruptCheckpoint(f"{uri}: sha256 mismatch for {rel}") from None
        (tmp / MANIFEST).write_bytes(manifest_bytes)
        result = checkpoints.verify(tmp)
        if not result.ok:
            raise CorruptCheckpoint(f"{uri}: {result.reason}")
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def delete_checkpoint(storage: Storage, key: str) -> None:
    """Manifest first, so the checkpoint stops being complete before its files go."""
    storage.delete(f"{key}/{MANIFEST}")
    for obj in storage.list(f"{key}/"):
        storage.delete(obj)


def prune_remote(storage: Storage, prefix: str, keep: int) -> list[int]:
    """Keep the newest ``keep`` complete checkpoints; also drop incomplete ones older than those kept."""
    found = remote_checkpoints(storage, prefix)
    done = [c for c in found if c.complete]
    kept = done[-keep:] if keep > 0 else []
    oldest_kept = kept[0].step if kept else None
    doomed = [c for c in done if c not in kept]
    if oldest_kept is not None:
        doomed += [c for c in found if not c.complete and c.step < oldest_kept]
    for ckpt in doomed:
        delete_checkpoint(storage, ckpt.key)
    return sorted(c.step for c in doomed)
