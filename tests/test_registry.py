from __future__ import annotations

from pathlib import Path

import pytest

from gpuline.errors import InputError, NotFoundError, RefusedError
from gpuline.registry import Audit, StageChange, open_registry
from gpuline.registry.local import LocalRegistry


@pytest.fixture
def registry(tmp_path: Path) -> LocalRegistry:
    reg = open_registry("file://reg", tmp_path)
    assert isinstance(reg, LocalRegistry)
    return reg


def register(registry: LocalRegistry, run: str, acc: float) -> int:
    return registry.register("m", f"file://x/{run}", run, {"accuracy": acc}, {"commit": "abc"}).version


def test_versions_number_up_and_keep_lineage(registry: LocalRegistry) -> None:
    assert register(registry, "r1", 0.9) == 1
    assert register(registry, "r2", 0.91) == 2
    assert registry.get("m", 2).lineage == {"commit": "abc"}
    assert [v.version for v in registry.versions("m")] == [1, 2]


def test_registering_the_same_run_twice_is_idempotent(registry: LocalRegistry) -> None:
    assert register(registry, "r1", 0.9) == 1
    assert register(registry, "r1", 0.9) == 1
    assert len(registry.versions("m")) == 1


def test_promote_keeps_previous_and_rollback_is_one_step(registry: LocalRegistry) -> None:
    for run in ("r1", "r2", "r3"):
        register(registry, run, 0.9)
    assert registry.promote("m", 1, "production").previous is None
    assert registry.promote("m", 2, "production").previous == 1
    assert registry.promote("m", 3, "production").previous == 2
    change = registry.rollback("m", "production")
    assert (change.version, change.previous) == (2, 3)
    assert registry.in_stage("m", "production").version == 2  # type: ignore[union-attr]
    assert registry.rollback("m", "production").version == 1
    with pytest.raises(RefusedError, match="no earlier version"):
        registry.rollback("m", "production")
    assert [c.reason for c in registry.history("m", "production")][-2:] == ["rollback", "rollback"]


def test_stages_are_independent(registry: LocalRegistry) -> None:
    register(registry, "r1", 0.9)
    registry.promote("m", 1, "staging")
    assert registry.in_stage("m", "production") is None
    assert registry.in_stage("m", "staging").version == 1  # type: ignore[union-attr]


def test_promoting_the_current_version_again_changes_nothing(registry: LocalRegistry) -> None:
    register(registry, "r1", 0.9)
    registry.promote("m", 1, "production")
    registry.promote("m", 1, "production")
    assert len(registry.history("m", "production")) == 1


def test_errors(registry: LocalRegistry, tmp_path: Path) -> None:
    with pytest.raises(NotFoundError):
        registry.get("m", 7)
    with pytest.raises(NotFoundError):
        registry.rollback("m", "production")
    register(registry, "r1", 0.9)
    with pytest.raises(NotFoundError):
        registry.promote("m", 2, "production")
    with pytest.raises(InputError, match="stage"):
        registry.promote("m", 1, "prod")
    with pytest.raises(InputError) as err:
        open_registry("ftp://x", tmp_path)
    assert "valid choices are file, mlflow, mlflow+http, mlflow+https, s3" in err.value.one_line()
    with pytest.raises(InputError, match="no scheme"):
        open_registry("plainpath", tmp_path)


def test_backends_are_chosen_by_scheme_and_open_without_a_call(tmp_path: Path) -> None:
    from gpuline.registry.mlflow import MlflowRegistry
    from gpuline.registry.s3 import S3Registry

    s3 = open_registry("s3://bucket/models", tmp_path)
    assert isinstance(s3, S3Registry) and s3.store.uri_for("m") == "s3://bucket/models/m"
    for uri, tracking in [
        ("mlflow+http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("mlflow+https://h/p", "https://h/p"),
    ]:
        mlflow = open_registry(uri, tmp_path)
        assert isinstance(mlflow, MlflowRegistry) and mlflow.tracking == tracking
    assert open_registry("file://reg", tmp_path).secrets() == []


def test_history_keeps_who_and_why_and_reads_older_files(registry: LocalRegistry) -> None:
    register(registry, "r1", 0.9)
    register(registry, "r2", 0.9)
    registry.promote("m", 1, "production", reason="run r1")
    registry.promote("m", 2, "production", audit=Audit(actor="alice", reason="gates passed", run_id="r2"))
    registry.rollback("m", "production")
    first, second, back = registry.history("m", "production")
    assert (first.reason, first.actor) == ("run r1", "")
    assert (second.actor, second.reason, second.run_id) == ("alice", "gates passed", "r2")
    assert (back.action, back.reason) == ("rollback", "rollback")
    # A history written before changes had an action: its rollbacks are known by their reason.
    old = StageChange.model_validate(
        {"model": "m", "stage": "production", "version": 1, "previous": 2, "reason": "rollback"}
    )
    assert old.action == "rollback"
