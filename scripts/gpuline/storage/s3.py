"""A store in an S3 bucket (or any S3-compatible server): ``s3://bucket/prefix``.

Multipart uploads go through a tuned transfer config; each object carries its sha256 in its
metadata and reads check it. The client comes from :mod:`gpuline.adaptors.aws`, so boto3 is loaded
only when the first call is made. :meth:`S3Storage.put_stream` uploads a file while it is written
(see :mod:`gpuline.storage.streaming`), with the same part size and concurrency.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import secrets
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from gpuline.adaptors import aws
from gpuline.adaptors.aws import transfer_config
from gpuline.errors import InfraError, InputError
from gpuline.storage.base import (
    TMP_MARK,
    Cancel,
    ObjectNotFound,
    PreconditionFailed,
    UploadCancelled,
    changed_since_read,
    check_key,
    checksum_mismatch,
    sha256_file,
)

if TYPE_CHECKING:
    from boto3.s3.transfer import TransferConfig
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef

    from gpuline.storage.streaming import PartSource

__all__ = ["S3Storage", "open_s3", "transfer_config"]

_CONDITIONAL_TRIES = 5


def open_s3(uri: str, base_dir: Path) -> S3Storage:
    parsed = urlparse(uri)
    if not parsed.netloc:
        raise InputError(f"storage URI {uri!r} has no bucket", hint="write s3://BUCKET/optional/prefix")
    return S3Storage(parsed.netloc, parsed.path.strip("/"))


class S3Storage:
    """An S3 bucket and prefix. Multipart uploads through a tuned TransferConfig; sha256 in metadata."""

    def __init__(self, bucket: str, prefix: str = "", client: S3Client | None = None) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._client = client
        self._config: TransferConfig | None = None
        self._part_slots: threading.BoundedSemaphore | None = None

    @property
    def client(self) -> S3Client:
        if self._client is None:
            self._client = aws.client("s3", needed_by="s3:// storage")
        return self._client

    @property
    def config(self) -> TransferConfig:
        if self._config is None:
            self._config = transfer_config()
        return self._config

    @property
    def part_slots(self) -> threading.BoundedSemaphore:
        """Parts in flight across every streamed upload of this store: what bounds their memory."""
        if self._part_slots is None:
            self._part_slots = threading.BoundedSemaphore(self.config.max_request_concurrency)
        return self._part_slots

    def _key(self, key: str) -> str:
        clean = check_key(key)
        return f"{self.prefix}/{clean}" if self.prefix else clean

    def uri_for(self, key: str) -> str:
        full = f"{self.prefix}/{key.strip('/')}".strip("/") if key else self.prefix
        return f"s3://{self.bucket}/{full}"

    @contextlib.contextmanager
    def _errors(self, action: str, key: str) -> Iterator[None]:
        """SDK failures during ``action`` on ``key`` as gpuline errors naming the object."""
        try:
            yield
        except Exception as exc:
            if aws.is_service_error(exc):
                raise self._refusal(exc, action, key) from None
            if aws.is_sdk_error(exc):  # boto3's errors too: upload_file's S3UploadFailedError
                raise InfraError(
                    f"S3 {action} of {self.uri_for(key)} failed: {exc}",
                    hint="check the bucket, the credentials, the network and AWS_ENDPOINT_URL",
                ) from exc
            raise

    def _refusal(self, exc: Exception, action: str, key: str) -> InfraError:
        status, code = aws.http_status(exc), aws.error_code(exc)
        if code == "NoSuchBucket":
            return InfraError(
                f"S3 bucket {self.bucket!r} does not exist (while trying {action} of {self.uri_for(key)})",
                hint="create the bucket or fix the storage URI",
            )
        if status == 404 or code in aws.NOT_FOUND_CODES:
            return ObjectNotFound(f"{self.uri_for(key)} does not exist")
        return InfraError(
            f"S3 {action} of {self.uri_for(key)} failed: {code or status} {exc}",
            hint="check the bucket exists, the credentials and AWS_ENDPOINT_URL",
        )

    def put_file(self, local: Path, key: str, *, sha256: str | None = None, cancel: Cancel | None = None) -> None:
        digest = sha256 or sha256_file(local)
        extra = {"Metadata": {"sha256": digest}}
        with self._errors("upload", key):
            if cancel is None:
                self.client.upload_file(str(local), self.bucket, self._key(key), ExtraArgs=extra, Config=self.config)
                return
            self._cancellable_upload(local, key, extra, cancel)

    def _cancellable_upload(self, local: Path, key: str, extra: dict[str, Any], cancel: Cancel) -> None:
        """The transfer manager behind ``upload_file``, watched so the upload can be called off."""
        manager = aws.transfer_manager(self.client, self.config)
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

    def put_stream(self, source: PartSource, key: str, *, cancel: Cancel | None = None) -> None:
        """Upload what ``source`` yields as one object, each part as soon as the source has it.

        A source that ends within its first part becomes one plain PUT (with its sha256 in the
        metadata); a longer one a multipart upload, completed only once the source is exhausted
        without an error and aborted on any error, so no half object and no open upload is left.
        """
        size = self.config.multipart_chunksize
        parts = iter(source.parts(size))
        head = next(parts, b"")
        if len(head) < size:  # a short part is the last: the whole object is in hand
            if next(parts, None) is not None:
                raise InfraError(f"the stream for {self.uri_for(key)} went on after a short part")
            self.put_bytes(key, head)
            return
        self._put_parts(key, itertools.chain([head], parts), cancel)

    def _put_parts(self, key: str, parts: Iterable[bytes], cancel: Cancel | None) -> None:
        with self._errors("streamed upload", key):
            upload_id = self.client.create_multipart_upload(Bucket=self.bucket, Key=self._key(key))["UploadId"]
        try:
            done = self._upload_parts(key, upload_id, parts, cancel)
            with self._errors("streamed upload", key):
                self.client.complete_multipart_upload(
                    Bucket=self.bucket, Key=self._key(key), UploadId=upload_id, MultipartUpload={"Parts": done}
                )
        except BaseException:
            with contextlib.suppress(Exception):
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=self._key(key), UploadId=upload_id)
            raise

    def _upload_parts(
        self, key: str, upload_id: str, parts: Iterable[bytes], cancel: Cancel | None
    ) -> list[CompletedPartTypeDef]:
        """Each part in a thread as it comes, at most ``max_concurrency`` in flight for the whole store."""
        slots = self.part_slots
        futures: list[Future[CompletedPartTypeDef]] = []
        with ThreadPoolExecutor(self.config.max_request_concurrency, thread_name_prefix="gpuline-part") as pool:
            try:
                for number, data in enumerate(parts, start=1):
                    if cancel is not None and cancel():
                        raise UploadCancelled(f"upload to {self.uri_for(key)} cancelled")
                    for failed in (f for f in futures if f.done() and f.exception() is not None):
                        failed.result()  # the first part that failed ends the upload now
                    slots.acquire()
                    future = pool.submit(self._upload_part, key, upload_id, number, data)
                    future.add_done_callback(lambda _: slots.release())
                    futures.append(future)
                return [f.result() for f in futures]
            except BaseException:
                for future in futures:
                    future.cancel()
                raise

    def _upload_part(self, key: str, upload_id: str, number: int, data: bytes) -> CompletedPartTypeDef:
        with self._errors("streamed upload", key):
            response = self.client.upload_part(
                Bucket=self.bucket, Key=self._key(key), UploadId=upload_id, PartNumber=number, Body=data
            )
        return {"ETag": response["ETag"], "PartNumber": number}

    def _expected_sha256(self, key: str) -> str | None:
        with self._errors("head", key):
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        return head.get("Metadata", {}).get("sha256")

    def get_file(self, key: str, local: Path) -> None:
        expected = self._expected_sha256(key)
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.parent / f"{TMP_MARK}{local.name}.{secrets.token_hex(4)}"
        try:
            with self._errors("download", key):
                self.client.download_file(self.bucket, self._key(key), str(tmp), Config=self.config)
            if expected is not None and sha256_file(tmp) != expected:
                raise checksum_mismatch(self.uri_for(key))
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
            raise checksum_mismatch(self.uri_for(key))
        return data

    def get_bytes_and_etag(self, key: str) -> tuple[bytes, str]:
        """The object and the ETag of that very version (for a later :meth:`put_if`), checked like get_bytes."""
        with self._errors("get", key):
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            data = response["Body"].read()
        expected = response.get("Metadata", {}).get("sha256")
        if expected is not None and hashlib.sha256(data).hexdigest() != expected:
            raise checksum_mismatch(self.uri_for(key))
        return data, response["ETag"]

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
        condition: dict[str, str] = {"IfNoneMatch": "*"} if expected_etag is None else {"IfMatch": expected_etag}
        for attempt in range(_CONDITIONAL_TRIES):
            with self._errors("conditional put", key):
                etag = self._conditional_put(key, data, condition)
            if etag is not None:
                return etag
            # 409: a concurrent conditional write is in progress; S3 asks the caller to retry.
            time.sleep(0.05 * 2**attempt)
        raise PreconditionFailed(
            f"{self.uri_for(key)} stayed contended after {_CONDITIONAL_TRIES} tries", hint="retry later"
        )

    def _conditional_put(self, key: str, data: bytes, condition: dict[str, str]) -> str | None:
        """The new ETag, or None when S3 says another conditional write to the key is in progress."""
        try:
            response = self.client.put_object(
                Bucket=self.bucket,
                Key=self._key(key),
                Body=data,
                Metadata={"sha256": hashlib.sha256(data).hexdigest()},
                **condition,  # type: ignore[arg-type]
            )
        except Exception as exc:
            if not aws.is_service_error(exc):
                raise
            status, code = aws.http_status(exc), aws.error_code(exc)
            # 412: the condition is false; 404 on IfMatch: the object is gone. Both mean "re-read".
            if status in {412, 404} or code in {"PreconditionFailed", "NoSuchKey"}:
                raise changed_since_read(self.uri_for(key)) from None
            if status == 409 or code == "ConditionalRequestConflict":
                return None
            raise InfraError(f"S3 conditional put of {self.uri_for(key)} failed: {code} {exc}") from exc
        return response["ETag"]
