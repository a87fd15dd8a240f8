"""How the DynamoDB ledger's records look as items: attribute values in, records out, quota keys."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from gpuline.runs import Cap, LeaseRecord, Reservation, RunRecord

if TYPE_CHECKING:
    from mypy_boto3_dynamodb.type_defs import AttributeValueTypeDef

Item = dict[str, "AttributeValueTypeDef"]

# Amounts are stored as decimals rounded to this many places, so sums stay exact on the server.
PLACES = 9
EPSILON = Decimal("1e-9")


def number(value: float | Decimal) -> str:
    """A DynamoDB number in plain notation ("20", "0.05"), never "2E+1"."""
    text = format(round(Decimal(str(value)), PLACES), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def exact(value: float) -> Decimal:
    return round(Decimal(str(value)), PLACES)


def num_attr(item: Item, name: str) -> float:
    attr = item.get(name)
    return float(attr["N"]) if attr and "N" in attr else 0.0


def str_attr(item: Item, name: str) -> str | None:
    attr = item.get(name)
    return attr["S"] if attr and "S" in attr else None


def start_key(start: dict[str, Any] | None) -> dict[str, Any]:
    return {"ExclusiveStartKey": start} if start else {}


# ---------------------------------------------------------------- runs and leases


def run_item(record: RunRecord, version: int) -> Item:
    return {
        "run_id": {"S": record.run_id},
        "model": {"S": record.model},
        "team": {"S": record.team},
        "created_at": {"S": record.created_at.isoformat()},
        "body": {"S": record.model_dump_json()},
        "version": {"N": str(version)},
    }


def run_record(item: Item) -> RunRecord:
    return RunRecord.model_validate_json(str_attr(item, "body") or "{}")


def lease_item(lease: LeaseRecord, version: int) -> Item:
    item: Item = {
        "lease_id": {"S": lease.lease_id},
        "run_id": {"S": lease.run_id},
        "body": {"S": lease.model_dump_json()},
        "version": {"N": str(version)},
    }
    if lease.released_at is not None:
        item["released_at"] = {"S": lease.released_at.isoformat()}
    return item


def lease_record(item: Item) -> LeaseRecord:
    return LeaseRecord.model_validate_json(str_attr(item, "body") or "{}")


# ---------------------------------------------------------------- quota


def plain(item: Item) -> dict[str, str]:
    return {k: str(v.get("S", v.get("N", ""))) for k, v in item.items()}


def reservation(p: dict[str, str]) -> Reservation:
    return Reservation(
        run_id=p["run_id"],
        team=p["team"],
        period=p["period"],
        gpu_hours=float(p["gpu_hours"]),
        usd=float(p["usd"]),
        expires_at=datetime.fromisoformat(p["expires_at"]),
        state=p["state"],  # type: ignore[arg-type]
    )


def reservation_item(r: Reservation, state: str, version: int) -> Item:
    return {
        "pk": {"S": f"res#{r.run_id}"},
        "run_id": {"S": r.run_id},
        "team": {"S": r.team},
        "period": {"S": r.period},
        "gpu_hours": {"N": number(r.gpu_hours)},
        "usd": {"N": number(r.usd)},
        "expires_at": {"S": r.expires_at.isoformat()},
        "state": {"S": state},
        "version": {"N": str(version)},
    }


def team_key(team: str, period: str) -> str:
    return f"team#{quote(team, safe='')}#{period}"


def org_key(period: str) -> str:
    return f"org#{period}"


def alone_fits(r: Reservation, cap: Cap) -> bool:
    if cap.gpu_hours is not None and r.gpu_hours > cap.gpu_hours + 1e-9:
        return False
    return not (cap.usd is not None and r.usd > cap.usd + 1e-9)


class Moves:
    """How each counter item changes: held/settled amounts and the totals the caps are checked on."""

    def __init__(self) -> None:
        self.by_key: dict[str, dict[str, Decimal]] = {}

    def _bump(self, team: str, period: str, state: str, hours: Decimal, usd: Decimal) -> None:
        if state not in ("held", "settled"):
            return  # a released reservation counts nowhere
        prefix = "held" if state == "held" else "settled"
        for key in (team_key(team, period), org_key(period)):
            delta = self.by_key.setdefault(key, {})
            for name, amount in (
                (f"{prefix}_h", hours),
                (f"{prefix}_usd", usd),
                ("total_h", hours),
                ("total_usd", usd),
            ):
                delta[name] = delta.get(name, Decimal(0)) + amount

    def add(self, r: Reservation, state: str) -> None:
        self._bump(r.team, r.period, state, exact(r.gpu_hours), exact(r.usd))

    def remove(self, old: dict[str, str]) -> None:
        hours, usd = -Decimal(old["gpu_hours"]), -Decimal(old["usd"])
        self._bump(old["team"], old["period"], old["state"], hours, usd)
