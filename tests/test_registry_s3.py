"""What only the S3 registry does: write-once version objects with their sha256, a run index that a
crash cannot outrun, checked reads of the stage object, and the errors of a wrong bucket."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from fixtures_aws import serial_aws, serial_moto  # noqa: F401
from gpuline.errors import InfraError, InputError
from gpuline.registry import open_registry
from gpuline.registry.s3 import S3Registry
from gpuline.storage import ChecksumMismatch, PreconditionFailed

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("serial_aws")]

BUCKET = "registry"


@pytest.fixture
def s3() -> Any:
    import boto3

    client = boto3.client("s3")  # AWS_ENDPOINT_URL points at the serialized moto server
    client.create_bucket(Bucket=BUCKET)
    return client


@pytest.fixture
def registry(s3: Any, tmp_path: Path) -> S3Registry:
    reg = open_registry(f"s3://{BUCKET}/models", tmp_path)
    assert isinstance(reg, S3Registry)
    return reg


def register(reg: S3Registry, run: str) -> int:
    return reg.register("m", f"s3://bucket/{run}", run, {"accuracy": 0.9}, {"commit": "abc"}).version


def test_versions_are_objects_with_their_sha256(registry: S3Registry, s3: Any) -> None:
    register(registry, "run-1")
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET)["Contents"])
    assert keys == ["models/m/runs/run-1.json", "models/m/versions/1.json"]
    obj = s3.get_object(Bucket=BUCKET, Key="models/m/versions/1.json")
    body = obj["Body"].read()
    assert obj["Metadata"]["sha256"] == hashlib.sha256(body).hexdigest()
    assert json.loads(body)["run_id"] == "run-1"


def test_a_number_taken_meanwhile_is_never_overwritten(
    registry: S3Registry, s3: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    register(registry, "run-1")
    register(registry, "run-2")
    real = S3Registry._numbers
    # The scan and the first allocation miss version 2, as if it were taken between list and write.
    stale = iter([[1], [1]])
    lost: list[str] = []
    put_if = registry.store.put_if

    def listing(self: S3Registry, model: str) -> list[int]:
        return next(stale, None) or real(self, model)

    def watched(key: str, data: bytes, etag: str | None) -> str:
        try:
            return put_if(key, data, etag)
        except PreconditionFailed:
            lost.append(key)
            raise

    monkeypatch.setattr(S3Registry, "_numbers", listing)
    monkeypatch.setattr(registry.store, "put_if", watched)
    assert register(registry, "run-3") == 3
    assert lost == ["m/versions/2.json"]
    assert registry.get("m", 2).run_id == "run-2"  # If-None-Match kept the other writer's version


def test_a_crash_between_version_and_index_leaves_no_twin(registry: S3Registry, s3: Any) -> None:
    register(registry, "run-1")
    s3.delete_object(Bucket=BUCKET, Key="models/m/runs/run-1.json")
    assert register(registry, "run-1") == 1
    assert [v.version for v in registry.versions("m")] == [1]
    assert s3.head_object(Bucket=BUCKET, Key="models/m/runs/run-1.json")  # indexed again


def test_a_damaged_stage_object_is_refused(registry: S3Registry, s3: Any) -> None:
    register(registry, "run-1")
    registry.promote("m", 1, "production")
    key = "models/m/stages/production.json"
    recorded = s3.head_object(Bucket=BUCKET, Key=key)["Metadata"]
    s3.put_object(Bucket=BUCKET, Key=key, Body=b'{"stack": [9], "log": []}', Metadata=recorded)
    with pytest.raises(ChecksumMismatch) as damaged:
        registry.in_stage("m", "production")
    assert damaged.value.exit_code == 3


def test_a_missing_bucket_and_a_uri_without_one(tmp_path: Path) -> None:
    with pytest.raises(InfraError, match="does not exist"):
        open_registry("s3://no-such-bucket/models", tmp_path).versions("m")
    with pytest.raises(InputError, match="no bucket"):
        open_registry("s3:///models", tmp_path)
