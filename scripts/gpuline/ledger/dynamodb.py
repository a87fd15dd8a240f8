"""The DynamoDB ledger: run records, events, quota and leases in four tables, all atomic per call.

``dynamodb://PREFIX?region=us-east-1`` uses the tables ``PREFIX-runs``, ``PREFIX-events``,
``PREFIX-quota`` and ``PREFIX-leases``, created on first use (on-demand capacity) when missing.
The endpoint comes from ``AWS_ENDPOINT_URL`` as boto3 reads it, credentials from the usual chain.

Quota is a counter item per team and period (and one per period for the whole org) beside an item
per reservation. ``reserve`` writes the reservation and moves the counters in one transaction whose
conditions say "the total stays within the cap"; DynamoDB checks every condition and applies every
write, or none, so concurrent runs can never together pass a hard budget. A condition cannot do
arithmetic, so the client computes "total before <= cap - this run" and the server checks that.

IAM actions needed on ``arn:aws:dynamodb:*:*:table/PREFIX-*`` (and ``.../index/*``):
``dynamodb:DescribeTable``, ``CreateTable`` (first use only), ``GetItem``, ``PutItem``,
``UpdateItem``, ``Query``, ``Scan``, ``ConditionCheckItem`` (transactions use the item actions).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, urlsplit

from gpuline.errors import InfraError, InputError, NotFoundError
from gpuline.ledger.contention import Retry as _Retry
from gpuline.ledger.contention import retrying
from gpuline.runs import Cap, Event, LeaseRecord, Reservation, RunRecord, Usage, utcnow

if TYPE_CHECKING:
    from mypy_boto3_dynamodb.client import DynamoDBClient
    from mypy_boto3_dynamodb.type_defs import AttributeValueTypeDef, TransactWriteItemTypeDef

Item = dict[str, "AttributeValueTypeDef"]

_PREFIX = re.compile(r"^[A-Za-z0-9_.-]{3,200}$")
# Amounts are stored as decimals rounded to this many places, so sums stay exact on the server.
_PLACES = 9
_EPSILON = Decimal("1e-9")
# Optimistic writes retry with jittered backoff until this deadline: under heavy contention many
# writers can each lose a few rounds, but every round someone wins.
_RETRY_DEADLINE_S = 120.0


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


def _num(value: float | Decimal) -> str:
    """A DynamoDB number in plain notation ("20", "0.05"), never "2E+1"."""
    text = format(round(Decimal(str(value)), _PLACES), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def _decimal(value: float) -> Decimal:
    return round(Decimal(str(value)), _PLACES)


def _f(item: Item, name: str) -> float:
    attr = item.get(name)
    return float(attr["N"]) if attr and "N" in attr else 0.0


def _s(item: Item, name: str) -> str | None:
    attr = item.get(name)
    return attr["S"] if attr and "S" in attr else None


def _error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None)
    return str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""


class DynamoLedger:
    def __init__(self, prefix: str, *, region: str | None = None) -> None:
        try:
            import boto3
            from botocore.config import Config
            from botocore.exceptions import BotoCoreError
        except ModuleNotFoundError:
            raise InputError(
                "the dynamodb ledger needs boto3, which is not installed", hint="pip install 'gpuline[aws]'"
            ) from None
        self.prefix = prefix
        self.tables = {name: f"{prefix}-{name}" for name in ("runs", "events", "quota", "leases")}
        attempts = int(os.environ.get("AWS_MAX_ATTEMPTS") or 8)
        config = Config(retries={"max_attempts": attempts, "mode": "standard"}, connect_timeout=10, read_timeout=30)
        self._db: DynamoDBClient = boto3.session.Session().client("dynamodb", region_name=region, config=config)
        try:
            self._ensure_tables()
        except BotoCoreError as exc:
            raise InfraError(
                f"cannot reach DynamoDB for the ledger {prefix}: {exc}",
                hint="check AWS_ENDPOINT_URL, the region, the network and the credentials",
            ) from None

    def close(self) -> None:
        self._db.close()

    # ------------------------------------------------------------ plumbing

    def _call(self, what: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
        """Run one API call; failures other than lost races become an InfraError naming the table."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(**kwargs)
        except ClientError as exc:
            code = _error_code(exc)
            if code in ("ConditionalCheckFailedException", "TransactionCanceledException", "TransactionConflict"):
                raise
            hint = "check the AWS credentials, region and the IAM actions listed in the README (cost section)"
            if code == "ResourceNotFoundException":
                hint = "the table is missing: let gpuline create it (needs dynamodb:CreateTable) or create it"
            raise InfraError(f"DynamoDB {what} failed on {self.prefix}-*: {code or exc}", hint=hint) from None
        except BotoCoreError as exc:
            raise InfraError(
                f"DynamoDB {what} failed: {exc}", hint="check AWS_ENDPOINT_URL, the network and the credentials"
            ) from None

    def _retrying(self, what: str, attempt: Callable[[], Any]) -> Any:
        return retrying("DynamoDB", what, attempt, _RETRY_DEADLINE_S)

    def _ensure_tables(self) -> None:
        from botocore.exceptions import ClientError

        keys: dict[str, list[tuple[str, str, str]]] = {
            "runs": [("run_id", "S", "HASH")],
            "events": [("run_id", "S", "HASH"), ("seq", "N", "RANGE")],
            "quota": [("pk", "S", "HASH")],
            "leases": [("lease_id", "S", "HASH")],
        }

        def exists(table: str) -> bool:
            try:
                self._db.describe_table(TableName=table)
                return True
            except ClientError as exc:
                if _error_code(exc) != "ResourceNotFoundException":
                    raise InfraError(
                        f"cannot describe DynamoDB table {table}: {_error_code(exc) or exc}",
                        hint="check the credentials, the region and dynamodb:DescribeTable",
                    ) from None
                return False

        # Tables are created in this order, the leases table last: when it exists, so do the others,
        # and every later open costs one call.
        if exists(self.tables["leases"]):
            return
        created = []
        for name, table in self.tables.items():
            if exists(table):
                continue
            attributes = {(a, t) for a, t, _ in keys[name]}
            extra: dict[str, Any] = {}
            if name == "runs":
                # Newest runs of one model first, without scanning every run.
                attributes |= {("model", "S"), ("created_at", "S")}
                extra["GlobalSecondaryIndexes"] = [
                    {
                        "IndexName": "by_model",
                        "KeySchema": [
                            {"AttributeName": "model", "KeyType": "HASH"},
                            {"AttributeName": "created_at", "KeyType": "RANGE"},
                        ],
                        "Projection": {"ProjectionType": "ALL"},
                    }
                ]
            try:
                self._db.create_table(
                    TableName=table,
                    KeySchema=[{"AttributeName": a, "KeyType": k} for a, _, k in keys[name]],  # type: ignore[typeddict-item]
                    AttributeDefinitions=[
                        {"AttributeName": a, "AttributeType": t}  # type: ignore[typeddict-item]
                        for a, t in sorted(attributes)
                    ],
                    BillingMode="PAY_PER_REQUEST",
                    **extra,
                )
                created.append(table)
            except ClientError as exc:
                if _error_code(exc) != "ResourceInUseException":  # another process is creating it
                    raise InfraError(
                        f"cannot create DynamoDB table {table}: {_error_code(exc) or exc}",
                        hint="create the tables up front or allow dynamodb:CreateTable",
                    ) from None
                created.append(table)
        for table in created:
            self._db.get_waiter("table_exists").wait(TableName=table, WaiterConfig={"Delay": 1, "MaxAttempts": 120})

    def _scan(self, table: str, **kwargs: Any) -> Iterator[Item]:
        start: dict[str, Any] | None = None
        while True:
            page = self._call("scan", self._db.scan, TableName=table, ConsistentRead=True, **kwargs, **start_key(start))
            yield from page.get("Items", [])
            start = page.get("LastEvaluatedKey")
            if not start:
                return

    def _query(self, table: str, **kwargs: Any) -> Iterator[Item]:
        start: dict[str, Any] | None = None
        while True:
            page = self._call("query", self._db.query, TableName=table, **kwargs, **start_key(start))
            yield from page.get("Items", [])
            start = page.get("LastEvaluatedKey")
            if not start:
                return

    def _get(self, table: str, key: Item) -> Item | None:
        page = self._call("get", self._db.get_item, TableName=table, Key=key, ConsistentRead=True)
        item: Item | None = page.get("Item")
        return item

    # ------------------------------------------------------------ runs and events

    def create_run(self, record: RunRecord) -> None:
        try:
            self._call(
                "create run",
                self._db.put_item,
                TableName=self.tables["runs"],
                Item=_run_item(record, 1),
                ConditionExpression="attribute_not_exists(run_id)",
            )
        except Exception as exc:
            if _error_code(exc) == "ConditionalCheckFailedException":
                raise InputError(f"run {record.run_id} already exists", hint="pick a new --run-id") from None
            raise

    def _get_run_item(self, run_id: str) -> Item:
        item = self._get(self.tables["runs"], {"run_id": {"S": run_id}})
        if item is None:
            raise NotFoundError(
                f"no run {run_id!r} in the ledger dynamodb://{self.prefix}", hint="list runs with `gpuline status`"
            )
        return item

    def get_run(self, run_id: str) -> RunRecord:
        return RunRecord.model_validate_json(_s(self._get_run_item(run_id), "body") or "{}")

    def update_run(self, run_id: str, change: Callable[[RunRecord], None]) -> RunRecord:
        def attempt() -> RunRecord:
            item = self._get_run_item(run_id)
            version = int(_f(item, "version"))
            record = RunRecord.model_validate_json(_s(item, "body") or "{}")
            change(record)
            record.updated_at = utcnow()
            self._put_versioned("update run", "runs", _run_item(record, version + 1), version)
            return record

        result: RunRecord = self._retrying("update run", attempt)
        return result

    def list_runs(self, *, model: str | None = None, team: str | None = None, limit: int = 100) -> list[RunRecord]:
        out: list[RunRecord] = []
        if model:
            items = self._query(
                self.tables["runs"],
                IndexName="by_model",
                KeyConditionExpression="model = :m",
                ExpressionAttributeValues={":m": {"S": model}},
                ScanIndexForward=False,
            )
            for item in items:
                if team and _s(item, "team") != team:
                    continue
                out.append(RunRecord.model_validate_json(_s(item, "body") or "{}"))
                if len(out) >= limit:
                    break
            return out
        records = [RunRecord.model_validate_json(_s(i, "body") or "{}") for i in self._scan(self.tables["runs"])]
        records = [r for r in records if not team or r.team == team]
        records.sort(key=lambda r: r.created_at, reverse=True)
        return records[:limit]

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
            seq = int(_f(last[0], "seq")) + 1 if last else 1
            event = Event(run_id=run_id, seq=seq, at=utcnow(), kind=kind, data=data or {})
            try:
                self._call(
                    "append event",
                    self._db.put_item,
                    TableName=self.tables["events"],
                    Item={
                        "run_id": {"S": run_id},
                        "seq": {"N": str(seq)},
                        "at": {"S": event.at.isoformat()},
                        "kind": {"S": kind},
                        "data": {"S": json.dumps(event.data, default=str)},
                    },
                    ConditionExpression="attribute_not_exists(seq)",
                )
            except Exception as exc:
                if _error_code(exc) == "ConditionalCheckFailedException":
                    raise _Retry from None
                raise
            return event

        result: Event = self._retrying("append event", attempt)
        return result

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
                seq=int(_f(i, "seq")),
                at=datetime.fromisoformat(_s(i, "at") or ""),
                kind=_s(i, "kind") or "",
                data=json.loads(_s(i, "data") or "{}"),
            )
            for i in items
        ]

    # ------------------------------------------------------------ quota

    def reserve(self, reservation: Reservation, team_cap: Cap, org_cap: Cap | None = None) -> bool:
        r = reservation
        for cap in (team_cap, org_cap):
            if cap is not None and not _alone_fits(r, cap):
                return False
        caps = {_team_key(r.team, r.period): team_cap, _org_key(r.period): org_cap}

        def attempt() -> bool:
            old = self._get_reservation(r.run_id)
            moves = _Moves()
            if old is not None:
                moves.remove(old)
            moves.add(r, state="held")
            version = int(old["version"]) if old is not None else 0
            items = [self._reservation_put(r, "held", version)]
            counter_keys = []
            for key, delta in moves.by_key.items():
                items.append(self._counter_update(key, delta, caps.get(key)))
                counter_keys.append(key)
            outcome = self._transact("reserve", items)
            if outcome is None:
                return True
            failed_index, _ = outcome
            if failed_index > 0:
                return False  # a counter's cap condition: the budget is full
            raise _Retry  # the reservation changed under us, or a transaction conflict

        result: bool = self._retrying("reserve", attempt)
        return result

    def settle(self, run_id: str, gpu_hours: float, usd: float) -> None:
        def attempt() -> None:
            old = self._get_reservation(run_id)
            if old is None:
                raise NotFoundError(f"run {run_id} holds no reservation to settle")
            settled = Reservation(
                run_id=run_id,
                team=old["team"],
                period=old["period"],
                gpu_hours=gpu_hours,
                usd=usd,
                expires_at=datetime.fromisoformat(old["expires_at"]),
                state="settled",
            )
            moves = _Moves()
            moves.remove(old)
            moves.add(settled, state="settled")
            items = [self._reservation_put(settled, "settled", int(old["version"]))]
            items += [self._counter_update(k, d, None) for k, d in moves.by_key.items()]
            if self._transact("settle", items) is not None:
                raise _Retry

        self._retrying("settle", attempt)

    def release(self, run_id: str) -> bool:
        def attempt() -> bool:
            old = self._get_reservation(run_id)
            if old is None or old["state"] != "held":
                return False
            released = Reservation(
                run_id=run_id,
                team=old["team"],
                period=old["period"],
                gpu_hours=float(old["gpu_hours"]),
                usd=float(old["usd"]),
                expires_at=datetime.fromisoformat(old["expires_at"]),
                state="released",
            )
            moves = _Moves()
            moves.remove(old)
            items = [self._reservation_put(released, "released", int(old["version"]))]
            items += [self._counter_update(k, d, None) for k, d in moves.by_key.items()]
            if self._transact("release", items) is not None:
                raise _Retry
            return True

        result: bool = self._retrying("release", attempt)
        return result

    def usage(self, team: str, period: str) -> Usage:
        item = self._get(self.tables["quota"], {"pk": {"S": _team_key(team, period)}}) or {}
        return Usage(
            team=team,
            period=period,
            held_gpu_hours=_f(item, "held_h"),
            held_usd=_f(item, "held_usd"),
            settled_gpu_hours=_f(item, "settled_h"),
            settled_usd=_f(item, "settled_usd"),
        )

    def reservations(self, *, state: str | None = None) -> list[Reservation]:
        condition = "begins_with(pk, :res)"
        values: Item = {":res": {"S": "res#"}}
        if state:
            condition += " AND #state = :state"
            values[":state"] = {"S": state}
        items = self._scan(
            self.tables["quota"],
            FilterExpression=condition,
            ExpressionAttributeValues=values,
            **({"ExpressionAttributeNames": {"#state": "state"}} if state else {}),
        )
        return [_reservation(_plain(i)) for i in items]

    def _get_reservation(self, run_id: str) -> dict[str, str] | None:
        item = self._get(self.tables["quota"], {"pk": {"S": f"res#{run_id}"}})
        return _plain(item) if item else None

    def _reservation_put(self, r: Reservation, state: str, version: int) -> TransactWriteItemTypeDef:
        item: Item = {
            "pk": {"S": f"res#{r.run_id}"},
            "run_id": {"S": r.run_id},
            "team": {"S": r.team},
            "period": {"S": r.period},
            "gpu_hours": {"N": _num(r.gpu_hours)},
            "usd": {"N": _num(r.usd)},
            "expires_at": {"S": r.expires_at.isoformat()},
            "state": {"S": state},
            "version": {"N": str(version + 1)},
        }
        if version == 0:
            return {
                "Put": {
                    "TableName": self.tables["quota"],
                    "Item": item,
                    "ConditionExpression": "attribute_not_exists(pk)",
                }
            }
        return {
            "Put": {
                "TableName": self.tables["quota"],
                "Item": item,
                "ConditionExpression": "version = :v",
                "ExpressionAttributeValues": {":v": {"N": str(version)}},
            }
        }

    def _counter_update(self, key: str, delta: dict[str, Decimal], cap: Cap | None) -> TransactWriteItemTypeDef:
        names = sorted(delta)
        values: Item = {f":{n}": {"N": _num(delta[n])} for n in names}
        update: dict[str, Any] = {
            "TableName": self.tables["quota"],
            "Key": {"pk": {"S": key}},
            "UpdateExpression": "ADD " + ", ".join(f"{n} :{n}" for n in names),
            "ExpressionAttributeValues": values,
        }
        conditions = []
        for total, limit in (("total_h", cap.gpu_hours if cap else None), ("total_usd", cap.usd if cap else None)):
            grow = delta.get(total, Decimal(0))
            if limit is None or grow <= 0:
                continue  # giving budget back never needs a check
            values[f":max_{total}"] = {"N": _num(_decimal(limit) - grow + _EPSILON)}
            conditions.append(f"(attribute_not_exists({total}) OR {total} <= :max_{total})")
        if conditions:
            update["ConditionExpression"] = " AND ".join(conditions)
        return {"Update": update}  # type: ignore[typeddict-item]

    def _transact(self, what: str, items: list[TransactWriteItemTypeDef]) -> tuple[int, str] | None:
        """None when every write applied; (index, code) of the first failed condition; _Retry on a conflict."""
        try:
            self._call(what, self._db.transact_write_items, TransactItems=items)
            return None
        except Exception as exc:
            code = _error_code(exc)
            if code == "TransactionConflict":
                raise _Retry from None
            if code != "TransactionCanceledException":
                raise
            reasons = getattr(exc, "response", {}).get("CancellationReasons", [])
            codes = [str(reason.get("Code") or "None") for reason in reasons]
            if "TransactionConflict" in codes:
                raise _Retry from None  # another transaction touched one of our items: try again
            for index, reason_code in enumerate(codes):
                if reason_code == "ConditionalCheckFailed":
                    return index, reason_code
            failed: dict[str, Any] = next((r for r in reasons if str(r.get("Code") or "None") != "None"), {})
            raise InfraError(
                f"DynamoDB {what} transaction was cancelled: {failed.get('Code')}: {failed.get('Message', '')}",
                hint="this is not a budget refusal; check the table schema and the IAM actions",
            ) from None

    # ------------------------------------------------------------ leases

    def record_lease(self, lease: LeaseRecord) -> None:
        self._call("record lease", self._db.put_item, TableName=self.tables["leases"], Item=_lease_item(lease, 1))

    def _get_lease(self, lease_id: str) -> tuple[LeaseRecord, int]:
        item = self._get(self.tables["leases"], {"lease_id": {"S": lease_id}})
        if item is None:
            raise NotFoundError(f"no lease {lease_id!r} in the ledger")
        return LeaseRecord.model_validate_json(_s(item, "body") or "{}"), int(_f(item, "version"))

    def _put_lease(self, lease: LeaseRecord, version: int) -> None:
        self._put_versioned("update lease", "leases", _lease_item(lease, version + 1), version)

    def _put_versioned(self, what: str, table: str, item: dict[str, Any], version: int) -> None:
        """Write ``item`` only if the stored one is still at ``version``; _Retry when another writer won."""
        try:
            self._call(
                what,
                self._db.put_item,
                TableName=self.tables[table],
                Item=item,
                ConditionExpression="version = :v",
                ExpressionAttributeValues={":v": {"N": str(version)}},
            )
        except Exception as exc:
            if _error_code(exc) == "ConditionalCheckFailedException":
                raise _Retry from None
            raise

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

        result: bool = self._retrying("release lease", attempt)
        return result

    def leases(self, *, active_only: bool = False) -> list[LeaseRecord]:
        kwargs: dict[str, Any] = {"FilterExpression": "attribute_not_exists(released_at)"} if active_only else {}
        return [
            LeaseRecord.model_validate_json(_s(i, "body") or "{}") for i in self._scan(self.tables["leases"], **kwargs)
        ]


# ---------------------------------------------------------------- items


def start_key(start: dict[str, Any] | None) -> dict[str, Any]:
    return {"ExclusiveStartKey": start} if start else {}


def _run_item(record: RunRecord, version: int) -> Item:
    return {
        "run_id": {"S": record.run_id},
        "model": {"S": record.model},
        "team": {"S": record.team},
        "created_at": {"S": record.created_at.isoformat()},
        "body": {"S": record.model_dump_json()},
        "version": {"N": str(version)},
    }


def _lease_item(lease: LeaseRecord, version: int) -> Item:
    item: Item = {
        "lease_id": {"S": lease.lease_id},
        "run_id": {"S": lease.run_id},
        "body": {"S": lease.model_dump_json()},
        "version": {"N": str(version)},
    }
    if lease.released_at is not None:
        item["released_at"] = {"S": lease.released_at.isoformat()}
    return item


def _plain(item: Item) -> dict[str, str]:
    return {k: str(v.get("S", v.get("N", ""))) for k, v in item.items()}


def _reservation(p: dict[str, str]) -> Reservation:
    return Reservation(
        run_id=p["run_id"],
        team=p["team"],
        period=p["period"],
        gpu_hours=float(p["gpu_hours"]),
        usd=float(p["usd"]),
        expires_at=datetime.fromisoformat(p["expires_at"]),
        state=p["state"],  # type: ignore[arg-type]
    )


def _team_key(team: str, period: str) -> str:
    return f"team#{quote(team, safe='')}#{period}"


def _org_key(period: str) -> str:
    return f"org#{period}"


def _alone_fits(r: Reservation, cap: Cap) -> bool:
    if cap.gpu_hours is not None and r.gpu_hours > cap.gpu_hours + 1e-9:
        return False
    return not (cap.usd is not None and r.usd > cap.usd + 1e-9)


class _Moves:
    """How each counter item changes: held/settled amounts and the totals the caps are checked on."""

    def __init__(self) -> None:
        self.by_key: dict[str, dict[str, Decimal]] = {}

    def _bump(self, team: str, period: str, state: str, hours: Decimal, usd: Decimal) -> None:
        if state not in ("held", "settled"):
            return  # a released reservation counts nowhere
        prefix = "held" if state == "held" else "settled"
        for key in (_team_key(team, period), _org_key(period)):
            delta = self.by_key.setdefault(key, {})
            for name, amount in (
                (f"{prefix}_h", hours),
                (f"{prefix}_usd", usd),
                ("total_h", hours),
                ("total_usd", usd),
            ):
                delta[name] = delta.get(name, Decimal(0)) + amount

    def add(self, r: Reservation, state: str) -> None:
        self._bump(r.team, r.period, state, _decimal(r.gpu_hours), _decimal(r.usd))

    def remove(self, old: dict[str, str]) -> None:
        hours, usd = -Decimal(old["gpu_hours"]), -Decimal(old["usd"])
        self._bump(old["team"], old["period"], old["state"], hours, usd)
