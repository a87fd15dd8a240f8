"""One registry contract, three backends: ``file://``, S3 on moto's server and a real ``mlflow server``.

Every test runs against each backend as a user would point gpuline at it (``open_registry(URI)``).
The MLflow server is started once per test run (``tests/servers.py``), so each test takes a model
name of its own; the S3 tests each get an empty bucket on a moto server that answers one request
at a time (moto's own conditional writes are not atomic; real S3's are).
"""

from __future__ import annotations

import secrets
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fixtures_aws import serial_aws, serial_moto  # noqa: F401
from gpuline.errors import InputError, NotFoundError, RefusedError
from gpuline.registry import open_registry
from gpuline.registry.base import Audit, ModelRegistry, StaleBaseline
from gpuline.runs import GateVerdict


@dataclass
class Backend:
    name: str
    uri: str
    base_dir: Path

    def open(self) -> ModelRegistry:
        """A new client of the same registry, as another process would open it."""
        return open_registry(self.uri, self.base_dir)


def s3_bucket(endpoint: str) -> str:
    import boto3

    bucket = f"registry-{secrets.token_hex(4)}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    return bucket


@pytest.fixture(
    params=[
        "file",
        pytest.param("s3", marks=pytest.mark.integration),
        pytest.param("mlflow", marks=pytest.mark.integration),
    ]
)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "file":
        return Backend("file", "file://registry", tmp_path)
    if request.param == "s3":
        endpoint = request.getfixturevalue("serial_aws")
        return Backend("s3", f"s3://{s3_bucket(endpoint)}/models", tmp_path)
    server = request.getfixturevalue("mlflow_server")
    return Backend("mlflow", f"mlflow+{server}", tmp_path)


@pytest.fixture
def model() -> str:
    return f"m-{secrets.token_hex(4)}"  # the MLflow server lives for the whole test run


def register(reg: ModelRegistry, model: str, run: str, acc: float = 0.9) -> int:
    lineage = {"commit": "abc123", "config_hash": "f" * 64, "run_id": run}
    params = {"lr": 0.01, "config_hash": "f" * 64}
    return reg.register(model, f"s3://bucket/models/{run}", run, {"accuracy": acc}, lineage, params=params).version


def versions(reg: ModelRegistry, model: str, count: int) -> list[int]:
    return [register(reg, model, f"run-{i}", 0.9 + i / 100) for i in range(1, count + 1)]


def test_register_numbers_versions_and_keeps_metrics_lineage_and_params(backend: Backend, model: str) -> None:
    reg = backend.open()
    assert versions(reg, model, 2) == [1, 2]
    got = backend.open().get(model, 2)
    assert (got.model, got.version, got.run_id) == (model, 2, "run-2")
    assert got.artifacts_uri == "s3://bucket/models/run-2"
    assert got.metrics == {"accuracy": pytest.approx(0.92)}
    assert got.lineage["commit"] == "abc123" and got.lineage["run_id"] == "run-2"
    assert got.params == {"lr": 0.01, "config_hash": "f" * 64}
    assert [v.version for v in reg.versions(model)] == [1, 2]
    assert model in reg.models()


def test_registering_the_same_run_again_returns_its_version(backend: Backend, model: str) -> None:
    reg = backend.open()
    assert register(reg, model, "run-a") == 1
    assert register(backend.open(), model, "run-a") == 1  # a retried promote, from another process
    assert register(reg, model, "run-b") == 2
    assert [v.run_id for v in reg.versions(model)] == ["run-a", "run-b"]


def test_promote_keeps_the_previous_version_and_rollback_is_one_step(backend: Backend, model: str) -> None:
    reg = backend.open()
    versions(reg, model, 3)
    assert reg.promote(model, 1, "production").previous is None
    assert reg.promote(model, 2, "production").previous == 1
    assert reg.promote(model, 3, "production").previous == 2
    change = reg.rollback(model, "production")
    assert (change.version, change.previous, change.action) == (2, 3, "rollback")
    other = backend.open()
    assert other.in_stage(model, "production").version == 2  # type: ignore[union-attr]
    assert other.rollback(model, "production").version == 1
    with pytest.raises(RefusedError, match="no earlier version") as refused:
        reg.rollback(model, "production")
    assert refused.value.exit_code == 1
    history = reg.history(model, "production")
    assert [(c.action, c.version, c.previous) for c in history] == [
        ("promote", 1, None),
        ("promote", 2, 1),
        ("promote", 3, 2),
        ("rollback", 2, 3),
        ("rollback", 1, 2),
    ]


def test_promoting_what_the_stage_holds_changes_nothing(backend: Backend, model: str) -> None:
    reg = backend.open()
    versions(reg, model, 1)
    reg.promote(model, 1, "production")
    again = reg.promote(model, 1, "production")
    assert (again.version, again.previous) == (1, 1)
    assert len(reg.history(model, "production")) == 1


def test_stages_are_independent(backend: Backend, model: str) -> None:
    reg = backend.open()
    versions(reg, model, 2)
    reg.promote(model, 1, "staging")
    reg.promote(model, 2, "production")
    assert reg.in_stage(model, "staging").version == 1  # type: ignore[union-attr]
    assert reg.in_stage(model, "production").version == 2  # type: ignore[union-attr]
    assert [c.version for c in reg.history(model, "staging")] == [1]


def test_history_records_who_when_why_and_from_where(backend: Backend, model: str) -> None:
    reg = backend.open()
    versions(reg, model, 2)
    url = "https://github.com/o/r/actions/runs/42"
    gates = [GateVerdict(gate="accuracy", passed=True, value=0.93, threshold=">= 0.9")]
    reg.promote(model, 1, "production", audit=Audit(actor="alice", reason="gates passed", run_id="run-1"))
    why = Audit(actor="bob", reason="gates passed: accuracy", run_id="run-2", workflow_run_url=url, gates=gates)
    reg.promote(model, 2, "production", audit=why)
    reg.rollback(model, "production", audit=Audit(actor="carol", reason="verify failed", workflow_run_url=url))
    first, second, back = backend.open().history(model, "production")
    assert (first.actor, first.run_id, first.reason) == ("alice", "run-1", "gates passed")
    assert (second.actor, second.run_id, second.workflow_run_url) == ("bob", "run-2", url)
    assert second.gates == gates and second.reason == "gates passed: accuracy"
    assert (back.action, back.actor, back.reason, back.version, back.previous) == (
        "rollback",
        "carol",
        "verify failed",
        1,
        2,
    )
    assert first.at <= second.at <= back.at
    assert all(c.model == model and c.stage == "production" for c in (first, second, back))


def stale_first_decision(
    monkeypatch: pytest.MonkeyPatch, reg: ModelRegistry, version: int, patience_s: float
) -> tuple[threading.Event, list[int]]:
    """Make the first promotion of ``version`` decide on what it read, then wait before writing."""
    module: Any = sys.modules[type(reg).promote.__module__]  # where the backend's promote decides
    real: Callable[..., Any] = module.promoted
    other_landed, decided = threading.Event(), []

    def slow(state: Any, model: str, stage: str, v: int, audit: Audit | None, *rest: Any) -> Any:
        decided.append(v)
        if v == version and decided.count(v) == 1:
            other_landed.wait(timeout=patience_s)  # the file backend holds its lock here: the other waits
        return real(state, model, stage, v, audit, *rest)

    monkeypatch.setattr(module, "promoted", slow)
    return other_landed, decided


def test_a_promotion_decided_on_a_stale_read_loses_nothing(
    backend: Backend, model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg, other = backend.open(), backend.open()
    versions(reg, model, 3)
    reg.promote(model, 1, "production")
    other_landed, decided = stale_first_decision(monkeypatch, reg, 2, 0.3 if backend.name == "file" else 10)
    errors: list[BaseException] = []

    def promote_2() -> None:
        try:
            reg.promote(model, 2, "production", audit=Audit(actor="a"))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=promote_2)
    thread.start()
    while 2 not in decided and thread.is_alive():
        threading.Event().wait(0.01)
    other.promote(model, 3, "production", audit=Audit(actor="b"))  # lands while the first one waits
    other_landed.set()
    thread.join(timeout=60)
    assert not errors and not thread.is_alive()
    history = other.history(model, "production")
    assert sorted(c.version for c in history) == [1, 2, 3]  # both promotions are there
    if backend.name != "file":  # the file backend serialises under a lock; the others retried
        assert decided.count(2) == 2
        assert [(c.version, c.previous) for c in history] == [(1, None), (3, 1), (2, 3)]
    last, before = history[-1], history[-2]
    assert other.in_stage(model, "production").version == last.version  # type: ignore[union-attr]
    assert other.rollback(model, "production").version == before.version
    assert other.rollback(model, "production").version == 1


def test_concurrent_promotions_all_land(backend: Backend, model: str) -> None:
    reg = backend.open()
    versions(reg, model, 5)
    reg.promote(model, 1, "production")
    start, errors = threading.Barrier(4), []

    def promote(version: int) -> None:
        try:
            client = backend.open()
            start.wait(timeout=30)
            client.promote(model, version, "production", audit=Audit(actor=f"user-{version}"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=promote, args=(v,)) for v in (2, 3, 4, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    history = reg.history(model, "production")
    assert sorted(c.version for c in history) == [1, 2, 3, 4, 5]
    # Each change replaced the one before it: the history is one chain, and rolling back walks it.
    assert [c.previous for c in history] == [None, *[c.version for c in history[:-1]]]
    for expected in reversed([c.version for c in history[:-1]]):
        assert reg.rollback(model, "production").version == expected


def test_promote_with_an_expected_version_is_a_compare_and_set(backend: Backend, model: str) -> None:
    reg = backend.open()
    versions(reg, model, 3)
    with pytest.raises(StaleBaseline, match="holds nothing, but v1 was gated against v9"):
        reg.promote(model, 1, "production", expected=9)
    assert reg.promote(model, 1, "production", expected=None).previous is None  # None: an empty stage
    assert reg.promote(model, 2, "production", expected=1).previous == 1
    with pytest.raises(StaleBaseline, match="now holds v2, but v3 was gated against v1") as stale:
        reg.promote(model, 3, "production", expected=1)
    assert stale.value.exit_code == 1 and stale.value.current == 2
    assert reg.in_stage(model, "production").version == 2  # type: ignore[union-attr]
    assert reg.promote(model, 2, "production", expected=1).version == 2  # a retry of what landed
    assert [c.version for c in reg.history(model, "production")] == [1, 2]
    assert reg.promote(model, 3, "production", expected=2).previous == 2


def test_concurrent_promotions_expecting_one_version_land_once(backend: Backend, model: str) -> None:
    reg = backend.open()
    versions(reg, model, 5)
    reg.promote(model, 1, "production")
    start, landed, stale, errors = threading.Barrier(4), [], [], []

    def promote(version: int) -> None:
        try:
            client = backend.open()
            start.wait(timeout=30)
            landed.append(client.promote(model, version, "production", expected=1).version)
        except StaleBaseline as exc:
            stale.append(exc.current)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=promote, args=(v,)) for v in (2, 3, 4, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == [] and len(landed) == 1 and stale == landed * 3
    assert [(c.version, c.previous) for c in reg.history(model, "production")] == [(1, None), (landed[0], 1)]


def test_missing_models_versions_and_stages_are_gpuline_errors(backend: Backend, model: str) -> None:
    reg = backend.open()
    assert reg.versions(model) == [] and reg.in_stage(model, "production") is None
    assert reg.history(model, "production") == []
    with pytest.raises(NotFoundError) as missing:
        reg.get(model, 1)
    assert missing.value.exit_code == 2 and f"model {model} has no version 1" in missing.value.message
    with pytest.raises(NotFoundError, match="never been in production") as never:
        reg.rollback(model, "production")
    assert never.value.exit_code == 2
    versions(reg, model, 1)
    with pytest.raises(NotFoundError, match="no version 7"):
        reg.promote(model, 7, "production")
    with pytest.raises(NotFoundError, match="never been in staging"):
        reg.rollback(model, "staging")
    with pytest.raises(InputError, match="unknown stage") as stage:
        reg.promote(model, 1, "prod")
    assert stage.value.exit_code == 2
    with pytest.raises(InputError, match="not valid in a registry"):
        reg.versions("../escape")
    with pytest.raises(InputError, match="unknown stage"):
        reg.in_stage(model, "qa")
    with pytest.raises(InputError, match="unknown stage"):
        reg.history(model, "qa")


def test_models_lists_every_registered_model(backend: Backend) -> None:
    reg = backend.open()
    names = [f"list-{secrets.token_hex(3)}" for _ in range(2)]
    for name in names:
        register(reg, name, "run-1")
    assert set(names) <= set(backend.open().models())
