"""Quota in DynamoDB: a counter item per team and period (and one per period for the whole org)
beside an item per reservation, changed together in one transaction.

``reserve`` writes the reservation and moves the counters in one transaction whose conditions say
"the total stays within the cap"; DynamoDB checks every condition and applies every write, or none,
so concurrent runs can never together pass a hard budget. A condition cannot do arithmetic, so the
client computes "total before <= cap - this run" and the server checks that.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from gpuline.adaptors import aws
from gpuline.errors import InfraError, NotFoundError
from gpuline.ledger.contention import Retry
from gpuline.ledger.dynamodb_items import (
    EPSILON,
    Item,
    Moves,
    alone_fits,
    exact,
    num_attr,
    number,
    org_key,
    plain,
    reservation,
    reservation_item,
    team_key,
)
from gpuline.ledger.dynamodb_tables import DynamoTables
from gpuline.runs import Cap, Reservation, Usage

if TYPE_CHECKING:
    from mypy_boto3_dynamodb.type_defs import TransactWriteItemTypeDef


class DynamoQuota(DynamoTables):
    """The quota half of the ledger protocol: reserve, settle, release, usage, reservations."""

    def reserve(self, reservation: Reservation, team_cap: Cap, org_cap: Cap | None = None) -> bool:
        r = reservation
        for cap in (team_cap, org_cap):
            if cap is not None and not alone_fits(r, cap):
                return False
        caps = {team_key(r.team, r.period): team_cap, org_key(r.period): org_cap}

        def attempt() -> bool:
            old = self._get_reservation(r.run_id)
            moves = Moves()
            if old is not None:
                moves.remove(old)
            moves.add(r, state="held")
            version = int(old["version"]) if old is not None else 0
            items = [self._reservation_put(r, "held", version)]
            items += [self._counter_update(key, delta, caps.get(key)) for key, delta in moves.by_key.items()]
            outcome = self._transact("reserve", items)
            if outcome is None:
                return True
            failed_index, _ = outcome
            if failed_index > 0:
                return False  # a counter's cap condition: the budget is full
            raise Retry  # the reservation changed under us, or a transaction conflict

        return self._retrying("reserve", attempt)

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
            self._replace(old, settled, "settle")

        self._retrying("settle", attempt)

    def release(self, run_id: str) -> bool:
        def attempt() -> bool:
            old = self._get_reservation(run_id)
            if old is None or old["state"] != "held":
                return False
            released = reservation({**old, "state": "released"})
            self._replace(old, released, "release")
            return True

        return self._retrying("release", attempt)

    def _replace(self, old: dict[str, str], new: Reservation, what: str) -> None:
        """Swap reservation ``old`` for ``new`` and move the counters to match; Retry on a lost race."""
        moves = Moves()
        moves.remove(old)
        moves.add(new, state=new.state)
        items = [self._reservation_put(new, new.state, int(old["version"]))]
        items += [self._counter_update(k, d, None) for k, d in moves.by_key.items()]
        if self._transact(what, items) is not None:
            raise Retry

    def usage(self, team: str, period: str) -> Usage:
        item = self._get(self.tables["quota"], {"pk": {"S": team_key(team, period)}}) or {}
        return Usage(
            team=team,
            period=period,
            held_gpu_hours=num_attr(item, "held_h"),
            held_usd=num_attr(item, "held_usd"),
            settled_gpu_hours=num_attr(item, "settled_h"),
            settled_usd=num_attr(item, "settled_usd"),
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
        return [reservation(plain(i)) for i in items]

    def _get_reservation(self, run_id: str) -> dict[str, str] | None:
        item = self._get(self.tables["quota"], {"pk": {"S": f"res#{run_id}"}})
        return plain(item) if item else None

    def _reservation_put(self, r: Reservation, state: str, version: int) -> TransactWriteItemTypeDef:
        put: dict[str, Any] = {"TableName": self.tables["quota"], "Item": reservation_item(r, state, version + 1)}
        if version == 0:
            put["ConditionExpression"] = "attribute_not_exists(pk)"
        else:
            put["ConditionExpression"] = "version = :v"
            put["ExpressionAttributeValues"] = {":v": {"N": str(version)}}
        return {"Put": put}  # type: ignore[typeddict-item]

    def _counter_update(self, key: str, delta: dict[str, Decimal], cap: Cap | None) -> TransactWriteItemTypeDef:
        names = sorted(delta)
        values: Item = {f":{n}": {"N": number(delta[n])} for n in names}
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
            values[f":max_{total}"] = {"N": number(exact(limit) - grow + EPSILON)}
            conditions.append(f"(attribute_not_exists({total}) OR {total} <= :max_{total})")
        if conditions:
            update["ConditionExpression"] = " AND ".join(conditions)
        return {"Update": update}  # type: ignore[typeddict-item]

    def _transact(self, what: str, items: list[TransactWriteItemTypeDef]) -> tuple[int, str] | None:
        """None when every write applied; (index, code) of the first failed condition; Retry on a conflict."""
        try:
            self._call(what, self._db.transact_write_items, TransactItems=items)
            return None
        except Exception as exc:
            code = aws.error_code(exc)
            if code == "TransactionConflict":
                raise Retry from None
            if code != "TransactionCanceledException":
                raise
            reasons = aws.response(exc).get("CancellationReasons", [])
        codes = [str(reason.get("Code") or "None") for reason in reasons]
        if "TransactionConflict" in codes:
            raise Retry  # another transaction touched one of our items: try again
        for index, reason_code in enumerate(codes):
            if reason_code == "ConditionalCheckFailed":
                return index, reason_code
        failed: dict[str, Any] = next((r for r in reasons if str(r.get("Code") or "None") != "None"), {})
        raise InfraError(
            f"DynamoDB {what} transaction was cancelled: {failed.get('Code')}: {failed.get('Message', '')}",
            hint="this is not a budget refusal; check the table schema and the IAM actions",
        )
