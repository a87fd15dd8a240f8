"""The DynamoDB ledger against moto's server: the whole ledger contract, table creation, URIs, errors."""

from __future__ import annotations

import secrets
import sys
from decimal import Decimal
from pathlib import Path

import boto3
import pytest

from fixtures_aws import serial_aws, serial_moto  # noqa: F401
from gpuline.errors import InfraError, InputError
from gpuline.ledger import dynamodb, open_ledger
from gpuline.ledger.dynamodb import DynamoLedger
from gpuline.runs import Cap
from test_ledger_sqlite import PERIOD, LedgerContract, hold

# The serialized moto server, emptied before each test (see fixtures_aws.py for why serialized).
pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("serial_aws")]


class TestDynamoLedger(LedgerContract):
    @pytest.fixture
    def uri(self) -> str:
        return f"dynamodb://gpuline-{secrets.token_hex(3)}?region=us-east-1"


def test_first_use_creates_the_four_tables() -> None:
    DynamoLedger("ci-ledger", region="us-east-1").close()
    names = boto3.client("dynamodb", region_name="us-east-1").list_tables()["TableNames"]
    assert sorted(n for n in names if n.startswith("ci-ledger-")) == [
        "ci-ledger-events",
        "ci-ledger-leases",
        "ci-ledger-quota",
        "ci-ledger-runs",
    ]
    DynamoLedger("ci-ledger", region="us-east-1").close()  # a second open finds them


def test_the_budget_counters_are_exact_decimals() -> None:
    ledger = DynamoLedger("exact", region="us-east-1")
    for i in range(10):
        assert ledger.reserve(hold(f"r{i}", 0.1, 0.1), Cap(gpu_hours=1.0, usd=1.0))
    assert not ledger.reserve(hold("r10", 0.1, 0.1), Cap(gpu_hours=1.0, usd=1.0))
    item = boto3.client("dynamodb", region_name="us-east-1").get_item(
        TableName="exact-quota", Key={"pk": {"S": f"team#vision#{PERIOD}"}}
    )["Item"]
    # Ten holds of 0.1 sum to exactly 1 on the server (floats would give 0.9999999999999999).
    assert Decimal(item["total_h"]["N"]) == 1 and Decimal(item["held_usd"]["N"]) == 1


@pytest.mark.parametrize("uri", ["dynamodb://", "dynamodb://ab", "dynamodb://bad name"])
def test_a_bad_table_prefix_is_an_input_error(uri: str) -> None:
    with pytest.raises(InputError, match="no valid table prefix"):
        open_ledger(uri, Path("."))


def test_an_unreachable_endpoint_is_an_infra_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(InfraError, match="cannot reach DynamoDB"):
        DynamoLedger("offline", region="us-east-1")


def test_a_corrupted_counter_is_an_infra_error_not_a_refusal() -> None:
    ledger = DynamoLedger("corrupt", region="us-east-1")
    boto3.client("dynamodb", region_name="us-east-1").put_item(
        TableName="corrupt-quota", Item={"pk": {"S": f"team#vision#{PERIOD}"}, "total_h": {"S": "oops"}}
    )
    with pytest.raises(InfraError, match="reserve transaction was cancelled"):
        ledger.reserve(hold("a", 1.0, 1.0), Cap(gpu_hours=5.0))


def test_a_table_deleted_under_a_running_ledger_is_an_infra_error() -> None:
    ledger = DynamoLedger("vanishing", region="us-east-1")
    boto3.client("dynamodb", region_name="us-east-1").delete_table(TableName="vanishing-runs")
    with pytest.raises(InfraError, match="DynamoDB get failed") as caught:
        ledger.get_run("r1")
    assert "dynamodb:CreateTable" in (caught.value.hint or "")


def test_losing_every_race_gives_up_with_an_infra_error(monkeypatch: pytest.MonkeyPatch) -> None:
    ledger = DynamoLedger("contended", region="us-east-1")
    monkeypatch.setattr(dynamodb, "_RETRY_DEADLINE_S", 0.0)

    def always_conflicts(*args: object) -> None:
        raise dynamodb._Retry

    monkeypatch.setattr(ledger, "_transact", always_conflicts)
    with pytest.raises(InfraError, match="kept losing to concurrent writers"):
        ledger.reserve(hold("a", 1.0, 1.0), Cap())


def test_without_boto3_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "boto3", None)
    with pytest.raises(InputError, match="needs boto3") as caught:
        DynamoLedger("nope", region="us-east-1")
    assert caught.value.hint == "pip install 'gpuline[aws]'"
