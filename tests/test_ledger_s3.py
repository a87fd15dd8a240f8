"""The S3 ledger against moto's server: the whole ledger contract, bucket creation, URIs, stale writes."""

from __future__ import annotations

import json
import secrets
import sys
from pathlib import Path

import boto3
import pytest

from fixtures_aws import serial_aws, serial_moto  # noqa: F401
from gpuline.errors import InfraError, InputError
from gpuline.ledger import open_ledger, s3
from gpuline.ledger.s3 import S3Ledger
from gpuline.runs import Cap
from test_ledger_sqlite import PERIOD, LedgerContract, hold

# The serialized moto server, emptied before each test (see fixtures_aws.py for why serialized).
pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("serial_aws")]


class TestS3Ledger(LedgerContract):
    @pytest.fixture
    def uri(self) -> str:
        return f"s3://ledger-{secrets.token_hex(3)}/ci?region=us-east-1"


def test_one_object_per_team_and_period() -> None:
    ledger = S3Ledger("quota-bucket", "ci", region="us-east-1")
    assert ledger.reserve(hold("a", 1.0, 2.0), Cap())
    assert ledger.reserve(hold("b", 1.0, 3.0, team="nlp"), Cap())
    s3 = boto3.client("s3", region_name="us-east-1")
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="quota-bucket", Prefix="ci/quota/")["Contents"])
    assert keys == [
        f"ci/quota/{PERIOD}/org.json",
        f"ci/quota/{PERIOD}/team/nlp.json",
        f"ci/quota/{PERIOD}/team/vision.json",
    ]
    body = json.loads(s3.get_object(Bucket="quota-bucket", Key=f"ci/quota/{PERIOD}/team/vision.json")["Body"].read())
    assert body["holds"]["a"]["usd"] == 2.0 and body["holds"]["a"]["state"] == "held"


def test_a_write_based_on_a_stale_read_is_retried_not_lost() -> None:
    ledger = S3Ledger("stale-bucket", "ci", region="us-east-1")
    assert ledger.reserve(hold("a", 1.0, 1.0), Cap())
    key = f"ci/quota/{PERIOD}/team/vision.json"
    s3 = boto3.client("s3", region_name="us-east-1")
    calls = {"n": 0}
    real_read = ledger._read

    def read_then_someone_else_writes(k: str):  # type: ignore[no-untyped-def]
        doc, etag = real_read(k)
        if k == key and calls["n"] == 0:
            calls["n"] += 1
            # Another writer adds a hold between our read and our conditional write.
            other = json.loads(json.dumps(doc))
            other["holds"]["intruder"] = dict(other["holds"]["a"])
            s3.put_object(Bucket="stale-bucket", Key=key, Body=json.dumps(other).encode())
        return doc, etag

    ledger._read = read_then_someone_else_writes  # type: ignore[method-assign]
    assert ledger.reserve(hold("b", 1.0, 1.0), Cap())
    holds = json.loads(s3.get_object(Bucket="stale-bucket", Key=key)["Body"].read())["holds"]
    assert set(holds) == {"a", "b", "intruder"}  # the intruder's write survived; ours was redone on top


def test_the_bucket_is_created_on_first_use() -> None:
    S3Ledger("fresh-bucket", "p", region="us-east-1").close()
    buckets = [b["Name"] for b in boto3.client("s3", region_name="us-east-1").list_buckets()["Buckets"]]
    assert "fresh-bucket" in buckets


@pytest.mark.parametrize("uri", ["s3://", "s3://A_Bad_Bucket/x"])
def test_a_bad_bucket_is_an_input_error(uri: str) -> None:
    with pytest.raises(InputError, match="no valid bucket"):
        open_ledger(uri, Path("."))


def test_an_unreachable_endpoint_is_an_infra_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(InfraError, match="cannot reach S3"):
        S3Ledger("offline-bucket", "p", region="us-east-1")


def test_a_bucket_deleted_under_a_running_ledger_is_an_infra_error() -> None:
    ledger = S3Ledger("vanishing-bucket", "p", region="us-east-1")
    boto3.client("s3", region_name="us-east-1").delete_bucket(Bucket="vanishing-bucket")
    with pytest.raises(InfraError, match="NoSuchBucket"):
        ledger.get_run("r1")


def test_losing_every_race_gives_up_with_an_infra_error(monkeypatch: pytest.MonkeyPatch) -> None:
    ledger = S3Ledger("contended-bucket", "p", region="us-east-1")
    monkeypatch.setattr(s3, "_RETRY_DEADLINE_S", 0.0)

    real_write = ledger._write

    def conditional_writes_always_lose(key: str, doc: dict[str, object], etag: str | None, **kw: bool) -> None:
        if etag is not None or kw.get("create"):
            raise s3._Retry
        real_write(key, doc, etag, **kw)

    monkeypatch.setattr(ledger, "_write", conditional_writes_always_lose)
    with pytest.raises(InfraError, match="kept losing to concurrent writers"):
        ledger.reserve(hold("a", 1.0, 1.0), Cap())


def test_without_boto3_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "boto3", None)
    with pytest.raises(InputError, match="needs boto3"):
        S3Ledger("nope-bucket", "p")
