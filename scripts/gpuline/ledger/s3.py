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
is checked against the team's cap in the team object, then against the org's cap in the org object;
if the org says no, the team hold is taken back. In between the team's total is briefly
overstated, never understated, so no cap can be passed; a crash in between leaves a hold that
expires with its TTL (``gpuline reap`` releases it).

The endpoint comes from ``AWS_ENDPOINT_URL`` as boto3 reads it. The bucket is created on first use
when missing. IAM actions: ``s3:GetObject``, ``s3:PutObject``, ``s3:DeleteObject`` on
``arn:aws:s3:::BUCKET/PREFIX/*``; ``s3:ListBucket`` on the bucket; ``s3:CreateBucket`` for the
first use only.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, urlsplit

from gpuline.errors import InfraError, InputError, NotFoundError
from gpuline.ledger.contention import Retry as _Retry
from gpuline.ledger.contention import retrying
from gpuline.runs import Cap, Event, LeaseRecord, Reservation, RunRecord, Usage, utcnow

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_RACE_CODES = ("PreconditionFailed", "ConditionalRequestConflict", "412", "409")
_RETRY_DEADLINE_S = 120.0
_EPSILON = 1e-9
_READ_WORKERS = 16

Doc = dict[str, Any]


class _Unchanged(Exception):
    """The change function decided not to write; carries the value to return."""

    def __init__(self, value: Any) -> None:
        super().__init__()
        self.value = value


def open_s3(uri: str, base_dir: Path) -> S3Ledger:
    parts = urlsplit(uri)
    bucket, prefix = parts.netloc, parts.path.strip("/")
    if not _BUCKET.match(bucket):
        raise InputError(f"ledger URI {uri!r} has no valid bucket name", hint="write s3://BUCKET/PREFIX")
    regions = parse_qs(parts.query).get("region")
    return S3Ledger(bucket, prefix or "gpuline-ledger", region=regions[0] if regions else None)


def _error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return ""
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code or str(status or "")


class S3Ledger:
    def __init__(self, bucket: str, prefix: str, *, region: str | None = None) -> None:
        try:
            import boto3
            from botocore.config import Config
            from botocore.exceptions import BotoCoreError
        except ModuleNotFoundError:
            raise InputError(
                "the s3 ledger needs boto3, which is not installed", hint="pip install 'gpuline[aws]'"
            ) from None
        self.bucket, self.prefix = bucket, prefix.rstrip("/")
        attempts = int(os.environ.get("AWS_MAX_ATTEMPTS") or 8)
        config = Config(retries={"max_attempts": attempts, "mode": "standard"}, connect_timeout=10, read_timeout=30)
        self._s3: S3Client = boto3.session.Session().client("s3", region_name=region, config=config)
        self._region = region or self._s3.meta.region_name
        try:
            self._ensure_bucket()
        except BotoCoreError as exc:
            raise InfraError(
                f"cannot reach S3 for the ledger s3://{bucket}/{prefix}: {exc}",
                hint="check AWS_ENDPOINT_URL, the region, the network and the credentials",
            ) from None

    def close(self) -> None:
        self._s3.close()

    # ------------------------------------------------------------ plumbing

    def _key(self, *parts: str) -> str:
        return "/".join([self.prefix, *parts])

    def _call(self, what: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(**kwargs)
        except ClientError as exc:
            code = _error_code(exc)
            if code in _RACE_CODES:
                raise _Retry from None
            if code in ("NoSuchKey", "404", "NotFound"):
                raise
            raise InfraError(
                f"S3 {what} failed on s3://{self.bucket}/{self.prefix}: {code or exc}",
                hint="check the AWS credentials, region and the IAM actions listed in the README (cost section)",
            ) from None
        except BotoCoreError as exc:
            raise InfraError(
                f"S3 {what} failed: {exc}", hint="check AWS_ENDPOINT_URL, the network and the credentials"
            ) from None

    def _retrying(self, what: str, attempt: Callable[[], Any]) -> Any:
        return retrying("S3", what, attempt, _RETRY_DEADLINE_S)

    def _ensure_bucket(self) -> None:
        from botocore.exceptions import ClientError

        try:
            self._s3.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            if _error_code(exc) not in ("404", "NoSuchBucket", "NotFound"):
                raise InfraError(
                    f"cannot reach bucket {self.bucket}: {_error_code(exc) or exc}",
                    hint="check the credentials and s3:ListBucket on the bucket",
                ) from None
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if self._region and self._region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self._region}
        try:
            self._s3.create_bucket(**kwargs)
        except ClientError as exc:
            if _error_code(exc) not in ("BucketAlreadyOwnedByYou", "OperationAborted"):
                raise InfraError(
                    f"cannot create bucket {self.bucket}: {_error_code(exc) or exc}",
                    hint="create the bucket up front or allow s3:CreateBucket",
                ) from None

    def _read(self, key: str) -> tuple[Doc | None, str | None]:
        """(the JSON object, its ETag), or (None, None) when the key does not exist."""
        try:
            response = self._call("read", self._s3.get_object, Bucket=self.bucket, Key=key)
        except _Retry:
            raise
        except Exception as exc:
            if _error_code(exc) in ("NoSuchKey", "404", "NotFound"):
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
        except _Retry:
            if condition:
                raise
            # A 409 on a plain write is S3 throttling one key, not a lost race we could redo.
            raise InfraError(
                f"S3 write of {key} was refused with a conflict", hint="retry the step in a minute"
            ) from None

    def _update(self, key: str, change: Callable[[Doc | None], Doc], what: str) -> Any:
        """Read-modify-write ``key`` under its ETag, retrying lost races. ``change`` may raise _Unchanged."""

        def attempt() -> Any:
            doc, etag = self._read(key)
            try:
                new = change(json.loads(json.dumps(doc)) if doc is not None else None)
            except _Unchanged as stop:
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
                f"S3 list of s3://{self.bucket}/{prefix} failed: {_error_code(exc) or exc}",
                hint="check s3:ListBucket on the bucket",
            ) from None

    def _marker(self, key: str) -> None:
        self._call("write marker", self._s3.put_object, Bucket=self.bucket, Key=key, Body=b"")

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

    # ------------------------------------------------------------ quota

    def _team_doc(self, team: str, period: str) -> str:
        return self._key("quota", period, "team", f"{quote(team, safe='')}.json")

    def _org_doc(self, period: str) -> str:
        return self._key("quota", period, "org.json")

    def _index(self, run_id: str) -> str:
        return self._key("quota-index", f"{run_id}.json")

    def reserve(self, reservation: Reservation, team_cap: Cap, org_cap: Cap | None = None) -> bool:
        r = reservation
        entry = {
            "team": r.team,
            "period": r.period,
            "gpu_hours": r.gpu_hours,
            "usd": r.usd,
            "expires_at": r.expires_at.isoformat(),
            "state": "held",
        }
        where, _ = self._read(self._index(r.run_id))
        if where is not None and (where["team"], where["period"]) != (r.team, r.period):
            # The run moved to another team or period: its old hold must not count twice.
            self.release(r.run_id)
        # Say where the hold lives before taking it, so settle/release/reap can always find it.
        self._write(self._index(r.run_id), {"team": r.team, "period": r.period}, None)
        previous: dict[str, Any] = {}

        def take(cap: Cap | None, remember: bool) -> Callable[[Doc | None], Doc]:
            def change(doc: Doc | None) -> Doc:
                doc = doc or {"holds": {}}
                holds: dict[str, Any] = doc["holds"]
                if remember:
                    previous["entry"] = holds.get(r.run_id)
                if cap is not None and not _fits(holds, r, cap):
                    raise _Unchanged(False)
                holds[r.run_id] = entry
                return doc

            return change

        team_key, org_key = self._team_doc(r.team, r.period), self._org_doc(r.period)
        if self._update(team_key, take(team_cap, True), "reserve") is False:
            return False
        if self._update(org_key, take(org_cap, False), "reserve") is False:
            self._update(team_key, _restore(r.run_id, previous.get("entry")), "reserve (undo)")
            return False
        return True

    def _change_both(self, run_id: str, change: Callable[[dict[str, Any]], bool], what: str) -> bool | None:
        """Apply ``change`` to the run's entry in its team and org objects; None when the run has no hold."""
        where, _ = self._read(self._index(run_id))
        if where is None:
            return None
        changed = False
        for key in (self._team_doc(where["team"], where["period"]), self._org_doc(where["period"])):

            def apply(doc: Doc | None) -> Doc:
                doc = doc or {"holds": {}}
                entry = doc["holds"].setdefault(
                    run_id,
                    {"team": where["team"], "period": where["period"], "gpu_hours": 0.0, "usd": 0.0},
                )
                entry.setdefault("expires_at", utcnow().isoformat())
                entry.setdefault("state", "released")
                if not change(entry):
                    raise _Unchanged(False)
                return doc

            changed = self._update(key, apply, what) is None or changed
        return changed

    def settle(self, run_id: str, gpu_hours: float, usd: float) -> None:
        def to_settled(entry: dict[str, Any]) -> bool:
            entry.update(state="settled", gpu_hours=gpu_hours, usd=usd)
            return True

        if self._change_both(run_id, to_settled, "settle") is None:
            raise NotFoundError(f"run {run_id} holds no reservation to settle")

    def release(self, run_id: str) -> bool:
        def to_released(entry: dict[str, Any]) -> bool:
            if entry.get("state") != "held":
                return False
            entry["state"] = "released"
            return True

        return bool(self._change_both(run_id, to_released, "release"))

    def usage(self, team: str, period: str) -> Usage:
        doc, _ = self._read(self._team_doc(team, period))
        usage = Usage(team=team, period=period)
        for entry in (doc or {"holds": {}})["holds"].values():
            if entry["state"] == "held":
                usage.held_gpu_hours += entry["gpu_hours"]
                usage.held_usd += entry["usd"]
            elif entry["state"] == "settled":
                usage.settled_gpu_hours += entry["gpu_hours"]
                usage.settled_usd += entry["usd"]
        return usage

    def reservations(self, *, state: str | None = None) -> list[Reservation]:
        out = []
        for key in self._list(self._key("quota", "")):
            if "/team/" not in key:
                continue  # the org objects repeat the team objects' entries
            doc, _ = self._read(key)
            for run_id, e in (doc or {"holds": {}})["holds"].items():
                if state and e["state"] != state:
                    continue
                out.append(
                    Reservation(
                        run_id=run_id,
                        team=e["team"],
                        period=e["period"],
                        gpu_hours=e["gpu_hours"],
                        usd=e["usd"],
                        expires_at=datetime.fromisoformat(e["expires_at"]),
                        state=e["state"],
                    )
                )
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
                raise _Unchanged(False)
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


def _fits(holds: dict[str, Any], r: Reservation, cap: Cap) -> bool:
    """Would ``r`` (replacing this run's own earlier entry) keep the held+settled total within ``cap``?"""
    hours = sum(e["gpu_hours"] for k, e in holds.items() if k != r.run_id and e["state"] != "released")
    usd = sum(e["usd"] for k, e in holds.items() if k != r.run_id and e["state"] != "released")
    if cap.gpu_hours is not None and hours + r.gpu_hours > cap.gpu_hours + _EPSILON:
        return False
    return not (cap.usd is not None and usd + r.usd > cap.usd + _EPSILON)


def _restore(run_id: str, entry: dict[str, Any] | None) -> Callable[[Doc | None], Doc]:
    def change(doc: Doc | None) -> Doc:
        doc = doc or {"holds": {}}
        if entry is None:
            doc["holds"].pop(run_id, None)
        else:
            doc["holds"][run_id] = entry
        return doc

    return change
