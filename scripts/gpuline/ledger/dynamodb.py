"""The DynamoDB ledger: run records, events, quota and leases in four tables, all atomic per call.

``dynamodb://PREFIX?region=us-east-1`` uses the tables ``PREFIX-runs``, ``PREFIX-events``,
``PREFIX-quota`` and ``PREFIX-leases``, created on first use (on-demand capacity) when missing
(:mod:`gpuline.ledger.dynamodb_tables`). The endpoint comes from ``AWS_ENDPOINT_URL`` as boto3
reads it, credentials from the usual chain. Quota lives in :mod:`gpuline.ledger.dynamodb_quota`.

IAM actions needed on ``arn:aws:dynamodb:*:*:table/PREFIX-*`` (and ``.../index/*``):
``dynamodb:DescribeTable``, ``CreateTable`` (first use only), ``GetItem``, ``PutItem``,
``UpdateItem``, ``Query``, ``Scan``, ``ConditionCheckItem`` (transactions use the item actions).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

from gpuline.adaptors import aws
from gpuline.errors import InfraError, InputError, NotFoundError
from gpuline.ledger.contention import Retry as _Retry
from gpuline.ledger.contention import retrying
from gpuline.ledger.dynamodb_items import Item, lease_item, lease_record, num_attr, run_item, run_record, str_attr
from gpuline.ledger.dynamodb_quota import DynamoQuota
from gpuline.ledger.dynamodb_tables import ensure_tables, table_names
from gpuline.runs import Event, LeaseRecord, RunRecord, utcnow

T = TypeVar("T")

__all__ = ["DynamoLedger", "open_dynamodb"]

_PREFIX = re.compile(r"^[A-Za-z0-9_.-]{3,200}$")
# Optimistic writes retry with jittered backoff until this deadline: under heavy contention many
# writers can each lose a few rounds, but every round someone wins.
_RETRY_DEADLINE_S = 120.0
_MAX_ATTEMPTS = 8
_TIMEOUTS = (10.0, 30.0)  # connect, read (seconds)


def open_dynamodb(uri: str, base_dir: Path) -> DynamoLedger:
    parts = urlsplit(uri)
    prefix = (parts.netloc + parts.path).strip("/")
    if not _PREFIX.match(prefix):
        raise InputError(
            f"ledger URI {uri!r} has no valid table prefix",
            hint="write dynamodb://PREFIX?region=REGION (PREFIX: 3-200 letters, digits, _ . -)",
        )
    regions = parse_qs(parts.query).get("region")
    return DynamoLedger(prefix, region=regions[0] if regions else None)


class DynamoLedger(DynamoQuota):
    def __init__(self, prefix: str, *, region: str | None = None) -> None:
        self.prefix = prefix
        self.tables = table_names(prefix)
        self._db = aws.client(
            "dynamodb", needed_by="the dynamodb ledger", region=region, max_attempts=_MAX_ATTEMPTS, timeouts=_TIMEOUTS
        )
        try:
            ensure_tables(self._db, self.tables)
        except Exception as exc:
            if not aws.is_sdk_error(exc):
                raise
            raise InfraError(
                f"cannot reach DynamoDB for the ledger {prefix}: {exc}",
                hint="check AWS_ENDPOINT_URL, the region, the network and the credentials",
            ) from None

    def close(self) -> None:
        self._db.close()

    def _retrying(self, what: str, attempt: Callable[[], T]) -> T:
        return retrying("DynamoDB", what, attempt, _RETRY_DEADLINE_S)

    # ------------------------------------------------------------ runs and events

    def create_run(self, record: RunRecord) -> None:
        if not self._put_new("create run", "runs", run_item(record, 1), "attribute_not_exists(run_id)"):
            raise InputError(f"run {record.run_id} already exists", hint="pick a new --run-id")

    def _get_run_item(self, run_id: str) -> Item:
        item = self._get(self.tables["runs"], {"run_id": {"S": run_id}})
        if item is None:
            raise NotFoundError(
                f"no run {run_id!r} in the ledger dynamodb://{self.prefix}", hint="list runs with `gpuline status`"
            )
        return item

    def get_run(self, run_id: str) -> RunRecord:
        return run_record(self._get_run_item(run_id))

    def update_run(self, run_id: str, change: Callable[[RunRecord], None]) -> RunRecord:
        def attempt() -> RunRecord:
            item = self._get_run_item(run_id)
            version = int(num_attr(item, "version"))
            record = run_record(item)
            change(record)
            record.updated_at = utcnow()
            self._put_versioned("update run", "runs", run_item(record, version + 1), version)
            return record

        return self._retrying("update run", attempt)

    def list_runs(self, *, model: str | None = None, team: str | None = None, limit: int = 100) -> list[RunRecord]:
        if not model:
            records = [run_record(i) for i in self._scan(self.tables["runs"])]
            records = [r for r in records if not team or r.team == team]
            records.sort(key=lambda r: r.created_at, reverse=True)
            return records[:limit]
        out: list[RunRecord] = []
        items = self._query(
            self.tables["runs"],
            IndexName="by_model",
            KeyConditionExpression="model = :m",
            ExpressionAttributeValues={":m": {"S": model}},
            ScanIndexForward=False,
        )
        for item in items:
            if team and str_attr(item, "team") != team:
                continue
            out.append(run_record(item))
            if len(out) >= limit:
                break
        return out

    def append_event(self, run_id: str, kind: str, data: dict[str, Any] | None = None) -> Event:
        def attempt() -> Event:
            last = self._call(
                "read events",
                self._db.query,
                TableName=self.tables["events"],
                KeyConditionExpression="run_id = :r",
                ExpressionAttributeValues={":r": {"S": run_id}},
                ScanIndexForward=False,
                Limit=1,
                ConsistentRead=True,
            ).get("Items", [])
            seq = int(num_attr(last[0], "seq")) + 1 if last else 1
            event = Event(run_id=run_id, seq=seq, at=utcnow(), kind=kind, data=data or {})
            item: Item = {
                "run_id": {"S": run_id},
                "seq": {"N": str(seq)},
                "at": {"S": event.at.isoformat()},
                "kind": {"S": kind},
                "data": {"S": json.dumps(event.data, default=str)},
            }
            if not self._put_new("append event", "events", item, "attribute_not_exists(seq)"):
                raise _Retry
            return event

        return self._retrying("append event", attempt)

    def events(self, run_id: str) -> list[Event]:
        items = self._query(
            self.tables["events"],
            KeyConditionExpression="run_id = :r",
            ExpressionAttributeValues={":r": {"S": run_id}},
            ConsistentRead=True,
        )
        return [
            Event(
                run_id=run_id,
                seq=int(num_attr(i, "seq")),
                at=datetime.fromisoformat(str_attr(i, "at") or ""),
                kind=str_attr(i, "kind") or "",
                data=json.loads(str_attr(i, "data") or "{}"),
            )
            for i in items
        ]

    # ------------------------------------------------------------ leases

    def record_lease(self, lease: LeaseRecord) -> None:
        self._call("record lease", self._db.put_item, TableName=self.tables["leases"], Item=lease_item(lease, 1))

    def _get_lease(self, lease_id: str) -> tuple[LeaseRecord, int]:
        item = self._get(self.tables["leases"], {"lease_id": {"S": lease_id}})
        if item is None:
            raise NotFoundError(f"no lease {lease_id!r} in the ledger")
        return lease_record(item), int(num_attr(item, "version"))

    def _put_lease(self, lease: LeaseRecord, version: int) -> None:
        self._put_versioned("update lease", "leases", lease_item(lease, version + 1), version)

    def update_lease(self, lease_id: str, *, instance_id: str | None = None) -> None:
        def attempt() -> None:
            lease, version = self._get_lease(lease_id)
            if instance_id is not None:
                lease.instance_id = instance_id
            self._put_lease(lease, version)

        self._retrying("update lease", attempt)

    def release_lease(self, lease_id: str, at: datetime) -> bool:
        def attempt() -> bool:
            lease, version = self._get_lease(lease_id)
            if lease.released_at is not None:
                return False
            lease.released_at = at
            self._put_lease(lease, version)
            return True

        return self._retrying("release lease", attempt)

    def leases(self, *, active_only: bool = False) -> list[LeaseRecord]:
        kwargs: dict[str, Any] = {"FilterExpression": "attribute_not_exists(released_at)"} if active_only else {}
        return [lease_record(i) for i in self._scan(self.tables["leases"], **kwargs)]
