"""The S3 ledger's objects: JSON documents read with their ETag and written on a condition.

:class:`S3Objects` holds the calls every part of the ledger goes through: a read returns the ETag
it saw, a write sends it as ``If-Match`` (or ``If-None-Match: *`` to create), and a lost race
(S3's 412, or 409 when two writes collide) becomes :class:`~gpuline.ledger.contention.Retry`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from gpuline.adaptors import aws
from gpuline.errors import InfraError
from gpuline.ledger.contention import Retry

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

T = TypeVar("T")
Doc = dict[str, Any]

RACE_CODES = frozenset({"PreconditionFailed", "ConditionalRequestConflict", "412", "409"})
_MISSING_BUCKET = frozenset({"404", "NoSuchBucket", "NotFound"})


class Unchanged(Exception):
    """The change function decided not to write; carries the value to return."""

    def __init__(self, value: Any) -> None:
        super().__init__()
        self.value = value


def ensure_bucket(s3: S3Client, bucket: str, region: str | None) -> None:
    """Create ``bucket`` when it does not exist; SDK failures (no connection) are raised as they are."""
    try:
        s3.head_bucket(Bucket=bucket)
        return
    except Exception as exc:
        if not aws.is_service_error(exc):
            raise
        if aws.code_or_status(exc) not in _MISSING_BUCKET:
            raise InfraError(
                f"cannot reach bucket {bucket}: {aws.code_or_status(exc) or exc}",
                hint="check the credentials and s3:ListBucket on the bucket",
            ) from None
    kwargs: dict[str, Any] = {"Bucket": bucket}
    if region and region != "us-east-1":
        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
    try:
        s3.create_bucket(**kwargs)
    except Exception as exc:
        if not aws.is_service_error(exc):
            raise
        if aws.code_or_status(exc) not in ("BucketAlreadyOwnedByYou", "OperationAborted"):
            raise InfraError(
                f"cannot create bucket {bucket}: {aws.code_or_status(exc) or exc}",
                hint="create the bucket up front or allow s3:CreateBucket",
            ) from None


class S3Objects:
    """Reads, conditional writes and listings under the ledger's prefix."""

    bucket: str
    prefix: str
    _s3: S3Client

    def _retrying(self, what: str, attempt: Callable[[], T]) -> T:
        """Call ``attempt`` until it stops raising Retry (the ledger decides for how long)."""
        raise NotImplementedError

    def _key(self, *parts: str) -> str:
        return "/".join([self.prefix, *parts])

    def _call(self, what: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
        try:
            return fn(**kwargs)
        except Exception as exc:
            if aws.is_service_error(exc):
                code = aws.code_or_status(exc)
                if code in RACE_CODES:
                    raise Retry from None
                if code in aws.NOT_FOUND_CODES:
                    raise
                raise InfraError(
                    f"S3 {what} failed on s3://{self.bucket}/{self.prefix}: {code or exc}",
                    hint="check the AWS credentials, region and IAM actions (docs/cost-and-policy.md, from the README)",
                ) from None
            if aws.is_sdk_error(exc):
                raise InfraError(f"S3 {what} failed: {exc}", hint=aws.NETWORK_HINT) from None
            raise

    def _read(self, key: str) -> tuple[Doc | None, str | None]:
        """(the JSON object, its ETag), or (None, None) when the key does not exist."""
        try:
            response = self._call("read", self._s3.get_object, Bucket=self.bucket, Key=key)
        except Retry:
            raise
        except Exception as exc:
            if aws.code_or_status(exc) in aws.NOT_FOUND_CODES:
                return None, None
            raise
        body: Doc = json.loads(response["Body"].read())
        return body, str(response["ETag"])

    def _write(self, key: str, doc: Doc, etag: str | None, *, create: bool = False) -> None:
        """Write ``doc`` iff the object is still at ``etag`` (or, with ``create``, iff it does not exist)."""
        condition: dict[str, str] = {}
        if etag is not None:
            condition["IfMatch"] = etag
        elif create:
            condition["IfNoneMatch"] = "*"
        try:
            self._call(
                "write",
                self._s3.put_object,
                Bucket=self.bucket,
                Key=key,
                Body=json.dumps(doc, default=str).encode(),
                ContentType="application/json",
                **condition,
            )
        except Retry:
            if condition:
                raise
            # A 409 on a plain write is S3 throttling one key, not a lost race we could redo.
            raise InfraError(
                f"S3 write of {key} was refused with a conflict", hint="retry the step in a minute"
            ) from None

    def _update(self, key: str, change: Callable[[Doc | None], Doc], what: str) -> Any:
        """Read-modify-write ``key`` under its ETag, retrying lost races. ``change`` may raise Unchanged."""

        def attempt() -> Any:
            doc, etag = self._read(key)
            try:
                new = change(json.loads(json.dumps(doc)) if doc is not None else None)
            except Unchanged as stop:
                return stop.value
            self._write(key, new, etag, create=etag is None)
            return None

        return self._retrying(what, attempt)

    def _list(self, prefix: str) -> Iterator[str]:
        paginator = self._s3.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    yield obj["Key"]
        except Exception as exc:
            raise InfraError(
                f"S3 list of s3://{self.bucket}/{prefix} failed: {aws.code_or_status(exc) or exc}",
                hint="check s3:ListBucket on the bucket",
            ) from None

    def _marker(self, key: str) -> None:
        self._call("write marker", self._s3.put_object, Bucket=self.bucket, Key=key, Body=b"")
