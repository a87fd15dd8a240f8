"""The S3 ledger: JSON objects in one bucket, every change a conditional write.

``s3://BUCKET/PREFIX`` keeps, under PREFIX:

- ``runs/RUN.json`` (created with ``If-None-Match: *``, updated with ``If-Match: ETAG``), with
  empty index markers ``index/created/TIME_RUN`` and ``index/model/MODEL/TIME_RUN`` so the newest
  runs are found by listing instead of reading every record;
- ``events/RUN/SEQ.json``, each created with ``If-None-Match: *`` (two writers cannot take one seq);
- ``quota/PERIOD/team/TEAM.json``: one object per team and period holding that team's reservations,
  and ``quota/PERIOD/org.json`` holding every team's, plus ``quota-index/RUN.json`` saying where
  a run's reservation lives;
- ``leases/LEASE.json`` and an ``leases-active/LEASE`` marker while the lease is held.

Every read-modify-write sends the ETag it read as ``If-Match``; S3 answers 412 (or 409 when two
writes race) if the object changed since, and the write is retried on a fresh read. A reservation
is checked against the team's cap, then the org's (:mod:`gpuline.ledger.s3_quota`); the reads and
conditional writes are in :mod:`gpuline.ledger.s3_objects`.

The endpoint comes from ``AWS_ENDPOINT_URL`` as boto3 reads it. The bucket is created on first use
when missing. IAM actions: ``s3:GetObject``, ``s3:PutObject``, ``s3:DeleteObject`` on
``arn:aws:s3:::BUCKET/PREFIX/*``; ``s3:ListBucket`` on the bucket; ``s3:CreateBucket`` for the
first use only.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, quote, urlsplit

from gpuline.adaptors import aws
from gpuline.errors import InfraError, InputError, NotFoundError
from gpuline.ledger.contention import Retry as _Retry
from gpuline.ledger.contention import retrying
from gpuline.ledger.s3_objects import Doc, Unchanged, ensure_bucket
from gpuline.ledger.s3_quota import S3Quota
from gpuline.runs import Event, LeaseRecord, RunRecord, utcnow

T = TypeVar("T")

__all__ = ["S3Ledger", "open_s3"]

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_RETRY_DEADLINE_S = 120.0
_READ_WORKERS = 16
_MAX_ATTEMPTS = 8
_TIMEOUTS = (10.0, 30.0)  # connect, read (seconds)


def open_s3(uri: str, base_dir: Path) -> S3Ledger:
    parts = urlsplit(uri)
    bucket, prefix = parts.netloc, parts.path.strip("/")
    if not _BUCKET.match(bucket):
        raise InputError(f"ledger URI {uri!r} has no valid bucket name", hint="write s3://BUCKET/PREFIX")
    regions = parse_qs(parts.query).get("region")
    return S3Ledger(bucket, prefix or "gpuline-ledger", region=regions[0] if regions else None)


class S3Ledger(S3Quota):
    def __init__(self, bucket: str, prefix: str, *, region: str | None = None) -> None:
        self.bucket, self.prefix = bucket, prefix.rstrip("/")
        self._s3 = aws.client(
            "s3", needed_by="the s3 ledger", region=region, max_attempts=_MAX_ATTEMPTS, timeouts=_TIMEOUTS
        )
        try:
            ensure_bucket(self._s3, bucket, region or self._s3.meta.region_name)
        except Exception as exc:
            if not aws.is_sdk_error(exc):
                raise
            raise InfraError(
                f"cannot reach S3 for the ledger s3://{bucket}/{prefix}: {exc}",
                hint="check AWS_ENDPOINT_URL, the region, the network and the credentials",
            ) from None

    def close(self) -> None:
        self._s3.close()

    def _retrying(self, what: str, attempt: Callable[[], T]) -> T:
        return retrying("S3", what, attempt, _RETRY_DEADLINE_S)

    # ------------------------------------------------------------ runs and events

    def create_run(self, record: RunRecord) -> None:
        key = self._key("runs", f"{record.run_id}.json")
        try:
            self._write(key, json.loads(record.model_dump_json()), None, create=True)
        except _Retry:
            raise InputError(f"run {record.run_id} already exists", hint="pick a new --run-id") from None
        stamp = f"{record.created_at.strftime('%Y%m%dT%H%M%S.%f')}_{record.run_id}"
        self._marker(self._key("index", "created", stamp))
        self._marker(self._key("index", "model", quote(record.model, safe=""), stamp))

    def get_run(self, run_id: str) -> RunRecord:
        doc, _ = self._read(self._key("runs", f"{run_id}.json"))
        if doc is None:
            raise NotFoundError(
                f"no run {run_id!r} in the ledger s3://{self.bucket}/{self.prefix}",
                hint="list runs with `gpuline status`",
            )
        return RunRecord.model_validate(doc)

    def update_run(self, run_id: str, change: Callable[[RunRecord], None]) -> RunRecord:
        out: list[RunRecord] = []

        def apply(doc: Doc | None) -> Doc:
            if doc is None:
                raise NotFoundError(f"no run {run_id!r} in the ledger s3://{self.bucket}/{self.prefix}")
            record = RunRecord.model_validate(doc)
            change(record)
            record.updated_at = utcnow()
            out[:] = [record]
            result: Doc = json.loads(record.model_dump_json())
            return result

        self._update(self._key("runs", f"{run_id}.json"), apply, "update run")
        return out[0]

    def list_runs(self, *, model: str | None = None, team: str | None = None, limit: int = 100) -> list[RunRecord]:
        where = ("index", "model", quote(model, safe=""), "") if model else ("index", "created", "")
        markers = sorted(self._list(self._key(*where)), reverse=True)
        run_ids = [marker.rsplit("/", 1)[-1].split("_", 1)[1] for marker in markers]
        out: list[RunRecord] = []
        # Records are read a batch at a time, in parallel: one GET each, newest first.
        with ThreadPoolExecutor(max_workers=_READ_WORKERS) as pool:
            for start in range(0, len(run_ids), _READ_WORKERS):
                batch = run_ids[start : start + _READ_WORKERS]
                for doc, _ in pool.map(lambda r: self._read(self._key("runs", f"{r}.json")), batch):
                    if doc is None:
                        continue  # an index marker whose run was never written (a crash in between)
                    record = RunRecord.model_validate(doc)
                    if team and record.team != team:
                        continue
                    out.append(record)
                    if len(out) >= limit:
                        return out
        return out

    def append_event(self, run_id: str, kind: str, data: dict[str, Any] | None = None) -> Event:
        prefix = self._key("events", run_id, "")

        def attempt() -> Event:
            existing = [k.rsplit("/", 1)[-1].removesuffix(".json") for k in self._list(prefix)]
            seq = max((int(s) for s in existing if s.isdigit()), default=0) + 1
            event = Event(run_id=run_id, seq=seq, at=utcnow(), kind=kind, data=data or {})
            self._write(f"{prefix}{seq:08d}.json", json.loads(event.model_dump_json()), None, create=True)
            return event

        result: Event = self._retrying("append event", attempt)
        return result

    def events(self, run_id: str) -> list[Event]:
        out = []
        for key in sorted(self._list(self._key("events", run_id, ""))):
            doc, _ = self._read(key)
            if doc is not None:
                out.append(Event.model_validate(doc))
        return out

    # ------------------------------------------------------------ leases

    def _lease_key(self, lease_id: str) -> str:
        return self._key("leases", f"{lease_id}.json")

    def record_lease(self, lease: LeaseRecord) -> None:
        self._write(self._lease_key(lease.lease_id), json.loads(lease.model_dump_json()), None)
        if lease.released_at is None:
            self._marker(self._key("leases-active", lease.lease_id))

    def update_lease(self, lease_id: str, *, instance_id: str | None = None) -> None:
        def apply(doc: Doc | None) -> Doc:
            if doc is None:
                raise NotFoundError(f"no lease {lease_id!r} in the ledger")
            if instance_id is not None:
                doc["instance_id"] = instance_id
            return doc

        self._update(self._lease_key(lease_id), apply, "update lease")

    def release_lease(self, lease_id: str, at: datetime) -> bool:
        def apply(doc: Doc | None) -> Doc:
            if doc is None:
                raise NotFoundError(f"no lease {lease_id!r} in the ledger")
            if doc.get("released_at") is not None:
                raise Unchanged(False)
            doc["released_at"] = at.isoformat()
            return doc

        released = self._update(self._lease_key(lease_id), apply, "release lease") is None
        # The marker only narrows the listing; leases() still checks released_at.
        self._call(
            "delete marker", self._s3.delete_object, Bucket=self.bucket, Key=self._key("leases-active", lease_id)
        )
        return released

    def leases(self, *, active_only: bool = False) -> list[LeaseRecord]:
        if active_only:
            ids = [k.rsplit("/", 1)[-1] for k in self._list(self._key("leases-active", ""))]
            keys = [self._lease_key(i) for i in ids]
        else:
            keys = list(self._list(self._key("leases", "")))
        out = []
        for key in keys:
            doc, _ = self._read(key)
            if doc is None:
                continue
            lease = LeaseRecord.model_validate(doc)
            if not active_only or lease.released_at is None:
                out.append(lease)
        return out
