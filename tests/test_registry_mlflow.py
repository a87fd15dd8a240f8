"""What only the MLflow registry does, against a real ``mlflow server``: stages as aliases with a
``previous-<stage>`` alias, a run per version with its metrics, params and lineage, the stage history
readable in MLflow, its URIs, its credentials and its errors."""

from __future__ import annotations

import base64
import json
import re
import secrets
import sys
from pathlib import Path
from typing import Any

import pytest
from pytest_httpserver import HTTPServer

from gpuline.errors import InfraError, InputError
from gpuline.registry import open_registry
from gpuline.registry.base import Audit
from gpuline.registry.mlflow import MlflowRegistry
from gpuline.registry.mlflow_client import tracking_uri

pytestmark = pytest.mark.integration


@pytest.fixture
def registry(mlflow_server: str, tmp_path: Path) -> MlflowRegistry:
    reg = open_registry(f"mlflow+{mlflow_server}", tmp_path)
    assert isinstance(reg, MlflowRegistry)
    return reg


@pytest.fixture
def client(mlflow_server: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=mlflow_server)


@pytest.fixture
def model() -> str:
    return f"mlf-{secrets.token_hex(4)}"


def register(reg: MlflowRegistry, model: str, run: str, artifacts: str | None = None) -> int:
    lineage = {"commit": "0123abcd", "config_hash": "c" * 64, "repo": "o/r", "checkpoints": [{"step": 10}]}
    params = {"lr": 0.01, "layers": {"hidden": 64}, "config_hash": "c" * 64}
    metrics = {"accuracy": 0.93, "loss": 0.2, "slices": {"night": {"accuracy": 0.9}}, "note": "text"}
    uri = artifacts or f"s3://bucket/models/{run}"
    return reg.register(model, uri, run, metrics, lineage, params=params).version


def test_stages_are_aliases_with_the_previous_version_beside_them(
    registry: MlflowRegistry, client: Any, model: str
) -> None:
    for run in ("run-1", "run-2", "run-3"):
        register(registry, model, run)
    registry.promote(model, 1, "production")
    registry.promote(model, 2, "production")
    registry.promote(model, 3, "staging")
    aliases = client.get_registered_model(model).aliases
    assert aliases == {"production": "2", "previous-production": "1", "staging": "3"}
    registry.rollback(model, "production")
    assert client.get_registered_model(model).aliases == {"production": "1", "staging": "3"}
    assert client.get_model_version_by_alias(model, "production").version == "1"


def test_a_version_links_to_a_run_with_its_metrics_params_and_lineage(
    registry: MlflowRegistry, client: Any, model: str
) -> None:
    register(registry, model, "run-7")
    mv = client.get_model_version(model, "1")
    assert mv.source == "s3://bucket/models/run-7"  # a remote artifacts URI is the version's source
    assert mv.tags["gpuline.artifacts_uri"] == "s3://bucket/models/run-7"
    assert mv.tags["gpuline.run_id"] == "run-7"
    assert json.loads(mv.tags["gpuline.lineage"])["commit"] == "0123abcd"
    run = client.get_run(mv.run_id)
    assert run.info.run_name == "run-7"
    assert run.data.metrics == {"accuracy": 0.93, "loss": 0.2, "slices.night.accuracy": 0.9}
    assert run.data.params == {"lr": "0.01", "layers.hidden": "64", "config_hash": "c" * 64}
    assert run.data.tags["gpuline.lineage.commit"] == "0123abcd"
    assert run.data.tags["mlflow.source.git.commit"] == "0123abcd"
    assert json.loads(run.data.tags["gpuline.lineage.checkpoints"]) == [{"step": 10}]
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == f"gpuline/{model}"


def test_a_local_artifacts_uri_becomes_a_run_source(registry: MlflowRegistry, client: Any, model: str) -> None:
    register(registry, model, "run-1", artifacts="file:///tmp/models/run-1")
    mv = client.get_model_version(model, "1")
    assert mv.source == f"runs:/{mv.run_id}/model"
    assert registry.get(model, 1).artifacts_uri == "file:///tmp/models/run-1"


def test_the_audited_history_is_readable_in_mlflow(registry: MlflowRegistry, client: Any, model: str) -> None:
    register(registry, model, "run-1")
    registry.promote(model, 1, "production", audit=Audit(actor="alice", reason="gates passed", run_id="run-1"))
    history_run = client.get_registered_model(model).tags["gpuline.stage-history-run"]
    entry = json.loads(client.get_run(history_run).data.params["production.000001"])
    assert (entry["action"], entry["version"], entry["actor"], entry["reason"]) == (
        "promote",
        1,
        "alice",
        "gates passed",
    )


def test_a_model_registered_outside_gpuline_gets_a_history_on_first_use(
    registry: MlflowRegistry, client: Any, model: str
) -> None:
    client.create_registered_model(model)
    assert registry.history(model, "production") == []
    register(registry, model, "run-1")
    registry.promote(model, 1, "production")
    assert [c.version for c in registry.history(model, "production")] == [1]
    assert "gpuline.stage-history-run" in client.get_registered_model(model).tags


def test_uris(monkeypatch: pytest.MonkeyPatch) -> None:
    assert tracking_uri("mlflow+http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert tracking_uri("mlflow+https://mlflow.example.com/prefix") == "https://mlflow.example.com/prefix"
    assert tracking_uri("mlflow://", {"MLFLOW_TRACKING_URI": "https://tracking.example"}) == "https://tracking.example"
    with pytest.raises(InputError, match="MLFLOW_TRACKING_URI, which is not set"):
        tracking_uri("mlflow://", {})
    with pytest.raises(InputError, match="takes no host"):
        tracking_uri("mlflow://somewhere", {})
    with pytest.raises(InputError, match="has no host"):
        tracking_uri("mlflow+http://", {})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    reg = open_registry("mlflow://", Path("."))
    assert isinstance(reg, MlflowRegistry) and reg.tracking == "http://127.0.0.1:1"


@pytest.mark.parametrize(
    ("variables", "secret", "header"),
    [
        ({"MLFLOW_TRACKING_TOKEN": "tok-123"}, ["tok-123"], "Bearer tok-123"),
        (
            {"MLFLOW_TRACKING_USERNAME": "ci", "MLFLOW_TRACKING_PASSWORD": "pw-456"},
            ["pw-456"],  # the user name is not a secret
            "Basic " + base64.b64encode(b"ci:pw-456").decode(),
        ),
    ],
)
def test_credentials_are_sent_by_the_client_and_handed_out_for_masking(
    httpserver: HTTPServer, monkeypatch: pytest.MonkeyPatch, variables: dict[str, str], secret: list[str], header: str
) -> None:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    reg = open_registry(f"mlflow+{httpserver.url_for('').rstrip('/')}", Path("."))
    assert reg.secrets() == secret
    body = {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no such model"}
    httpserver.expect_request("/api/2.0/mlflow/registered-models/get").respond_with_json(body, status=404)
    assert reg.in_stage("nope", "production") is None
    (request, _), *_ = httpserver.log
    assert request.headers["Authorization"] == header


def test_refused_credentials_say_which_variables_to_set(httpserver: HTTPServer) -> None:
    httpserver.expect_request("/api/2.0/mlflow/registered-models/get").respond_with_data("denied", status=401)
    reg = open_registry(f"mlflow+{httpserver.url_for('').rstrip('/')}", Path("."))
    with pytest.raises(InfraError, match="refused the credentials") as refused:
        reg.in_stage("m", "production")
    assert "MLFLOW_TRACKING_TOKEN" in (refused.value.hint or "")
    assert refused.value.exit_code == 3


def test_an_unreachable_server_is_an_infrastructure_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    reg = open_registry("mlflow+http://ci:pw-789@127.0.0.1:9", Path("."))
    assert reg.secrets() == ["pw-789"]  # a password written into the URI is masked too
    with pytest.raises(InfraError, match=re.escape("on the MLflow server at http://127.0.0.1:9 failed")) as down:
        reg.versions("m")
    assert "pw-789" not in down.value.one_line()


def test_without_the_client_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    reg = open_registry("mlflow+http://127.0.0.1:9", Path("."))
    with pytest.raises(InputError, match="needs mlflow-skinny") as missing:
        reg.versions("m")
    assert missing.value.hint == "pip install 'gpuline[mlflow]'"


def test_a_deleted_experiment_is_named_with_how_to_restore_it(
    registry: MlflowRegistry, client: Any, model: str
) -> None:
    register(registry, model, "run-1")
    experiment = client.get_experiment_by_name(f"gpuline/{model}")
    client.delete_experiment(experiment.experiment_id)
    with pytest.raises(InputError, match="is deleted") as deleted:
        register(MlflowRegistry(registry.tracking), model, "run-2")
    assert "mlflow experiments restore" in (deleted.value.hint or "")
