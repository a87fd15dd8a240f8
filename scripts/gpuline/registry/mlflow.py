"""A model registry on an MLflow tracking server, through MLflow's own client.

``mlflow+http://HOST:PORT``, ``mlflow+https://HOST[/PATH]``, or ``mlflow://`` for the server named by
``MLFLOW_TRACKING_URI``. Each gpuline version is an MLflow model version of the registered model of
the same name; its tags carry the artifacts URI (``gpuline.artifacts_uri``), the gpuline run
(``gpuline.run_id``), the metrics, params and lineage as JSON. Its MLflow run, in the experiment
``gpuline/MODEL``, holds the candidate's metrics, its params (hyperparameters and the config hash)
and its lineage as tags, so the MLflow UI shows what was promoted and where it came from.

Stages are aliases (MLflow deprecated stages in 2.9): ``production`` and ``staging``, with
``previous-production`` and ``previous-staging`` naming the version a rollback returns to. The
audited history behind them, and why concurrent promotions never lose one, is in
:mod:`gpuline.registry.mlflow_log`. Credentials are read by the client from the environment
(:mod:`gpuline.registry.mlflow_client`); :meth:`MlflowRegistry.secrets` returns them for masking.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gpuline.errors import InputError, NotFoundError
from gpuline.registry.base import (
    ANY,
    Audit,
    Expected,
    ModelVersion,
    StageChange,
    check_model,
    check_stage,
    with_reason,
)
from gpuline.registry.mlflow_client import (
    ALREADY_EXISTS,
    calls,
    error_code,
    new_client,
    secrets,
    shown,
    tracking_uri,
)
from gpuline.registry.mlflow_log import HISTORY_TAG, KIND_TAG, MAX_VALUE, StageLog
from gpuline.registry.stages import TRIES, Decide, backoff, contended, promoted, replay, rolled_back

__all__ = ["MlflowRegistry", "open_mlflow"]

EXPERIMENT_PREFIX = "gpuline/"
RUN_TAG, ARTIFACTS_TAG = "gpuline.run_id", "gpuline.artifacts_uri"
METRICS_TAG, LINEAGE_TAG, PARAMS_TAG = "gpuline.metrics", "gpuline.lineage", "gpuline.params"
_RUN_ID = re.compile(r"^[A-Za-z0-9._-]{1,200}$")
_PARAM_KEY = re.compile(r"[^\w.\- /:]")
_TAG_VALUE = 5000
# Artifact URIs MLflow accepts as a version's source; any other (file://) becomes runs:/RUN/model.
_REMOTE_SOURCES = ("s3", "gs", "wasbs", "abfss", "hdfs", "dbfs")
DESCRIPTION = "Registered by gpuline: versions carry their artifacts URI and lineage as tags."


def open_mlflow(uri: str, base_dir: Path) -> MlflowRegistry:
    return MlflowRegistry(tracking_uri(uri))


class MlflowRegistry:
    def __init__(self, tracking: str, client: Any = None) -> None:
        self.tracking = tracking
        self._client = client
        self._logs: dict[str, StageLog] = {}

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = new_client(self.tracking)
        return self._client

    def secrets(self) -> list[str]:
        return secrets(self.tracking)

    # ------------------------------------------------------------ models, experiments, history runs

    def _registered(self, model: str) -> Any | None:
        try:
            with calls(f"reading model {model}", self.tracking, missing="absent"):
                return self.client.get_registered_model(check_model(model))
        except NotFoundError:
            return None

    def _experiment(self, model: str) -> str:
        name = EXPERIMENT_PREFIX + model
        with calls(f"opening the experiment {name}", self.tracking):
            found = self.client.get_experiment_by_name(name)
            if found is not None and found.lifecycle_stage == "deleted":
                raise InputError(
                    f"the MLflow experiment {name} is deleted, so no run of {model} can be recorded in it",
                    hint=f"restore it (`mlflow experiments restore --experiment-id {found.experiment_id}`)",
                )
            if found is not None:
                return str(found.experiment_id)
            try:
                return str(self.client.create_experiment(name, tags={KIND_TAG: "gpuline"}))
            except Exception as exc:
                if error_code(exc) != ALREADY_EXISTS:
                    raise
            return str(self.client.get_experiment_by_name(name).experiment_id)  # created meanwhile

    def _log(self, model: str, *, create: bool) -> StageLog | None:
        """The model's stage log (made with the registered model when ``create``); None when it has none."""
        if model in self._logs:
            return self._logs[model]
        found = self._registered(model)
        run_id = found.tags.get(HISTORY_TAG) if found is not None else None
        if run_id is None and create:
            run_id = self._claim_history(model, new_model=found is None)
        if run_id is None:
            return None
        self._logs[model] = StageLog(self.client, model, run_id, self.tracking)
        return self._logs[model]

    def _claim_history(self, model: str, *, new_model: bool) -> str:
        """Create the registered model with its history run in one call: exactly one creator wins."""
        with calls(f"creating the stage history of {model}", self.tracking):
            run = self.client.create_run(
                self._experiment(model), run_name="stage history", tags={KIND_TAG: "stage-history"}
            )
            run_id = str(run.info.run_id)
            self.client.update_run(run_id, status="FINISHED")  # set_terminated prints to stdout
            if new_model:
                try:
                    self.client.create_registered_model(model, tags={HISTORY_TAG: run_id}, description=DESCRIPTION)
                    return run_id
                except Exception as exc:
                    if error_code(exc) != ALREADY_EXISTS:
                        raise
            current = self.client.get_registered_model(model).tags.get(HISTORY_TAG)
            if current:
                self.client.delete_run(run_id)  # another registration created the model first
                return str(current)
            # A model registered outside gpuline gets its history run on first use.
            self.client.set_registered_model_tag(model, HISTORY_TAG, run_id)
            return str(self.client.get_registered_model(model).tags[HISTORY_TAG])

    def models(self) -> list[str]:
        names: list[str] = []
        token = None
        with calls("listing registered models", self.tracking):
            while True:
                page = self.client.search_registered_models(max_results=1000, page_token=token)
                names += [m.name for m in page if HISTORY_TAG in (m.tags or {})]
                token = page.token
                if not token:
                    return sorted(names)

    # ------------------------------------------------------------ versions

    def register(
        self,
        model: str,
        artifacts_uri: str,
        run_id: str,
        metrics: dict[str, Any],
        lineage: dict[str, Any],
        params: dict[str, Any] | None = None,
    ) -> ModelVersion:
        if not _RUN_ID.match(run_id):
            raise InputError(f"run id {run_id!r} cannot be registered", hint="use letters, digits, '.', '_', '-'")
        self._log(check_model(model), create=True)
        known = self._version_of_run(model, run_id)
        if known is not None:  # a retried promote: the run already has its version
            return known
        candidate = self._candidate_run(model, run_id, metrics, lineage, params or {})
        tags = {
            RUN_TAG: run_id,
            ARTIFACTS_TAG: artifacts_uri,
            METRICS_TAG: _text(metrics),
            LINEAGE_TAG: _text(lineage),
            PARAMS_TAG: _text(params or {}),
        }
        with calls(f"registering a version of {model}", self.tracking):
            created = self.client.create_model_version(
                model,
                source=_source(artifacts_uri, candidate),
                run_id=candidate,
                tags=tags,
                description=f"gpuline run {run_id}",
            )
        return _version(created)

    def _candidate_run(
        self, model: str, run_id: str, metrics: dict[str, Any], lineage: dict[str, Any], params: dict[str, Any]
    ) -> str:
        """The MLflow run a version links to: the candidate's metrics, params and lineage."""
        from mlflow.entities import Metric, Param

        tags = {KIND_TAG: "candidate", RUN_TAG: run_id}
        tags.update({f"gpuline.lineage.{k}": _text(v)[:_TAG_VALUE] for k, v in lineage.items() if v not in ("", None)})
        if lineage.get("commit"):
            tags["mlflow.source.git.commit"] = str(lineage["commit"])
        now = int(time.time() * 1000)
        numbers = [Metric(_key(k), v, now, 0) for k, v in _flat(metrics).items() if _is_number(v)]
        texts = [Param(_key(k), _text(v)[:MAX_VALUE]) for k, v in _flat(params).items()]
        with calls(f"recording the run of {model} {run_id}", self.tracking):
            run = self.client.create_run(self._experiment(model), run_name=run_id, tags=tags)
            mlflow_run = str(run.info.run_id)
            for i in range(0, max(len(numbers), len(texts)), 100):  # MLflow takes 100 params per batch
                self.client.log_batch(mlflow_run, metrics=numbers[i : i + 100], params=texts[i : i + 100])
            self.client.update_run(mlflow_run, status="FINISHED")
        return mlflow_run

    def _version_of_run(self, model: str, run_id: str) -> ModelVersion | None:
        found = list(self._search(f"name='{model}' and tags.`{RUN_TAG}` = '{run_id}'"))
        return min(found, key=lambda v: v.version) if found else None

    def _search(self, filter_string: str) -> Iterator[ModelVersion]:
        token = None
        with calls("searching model versions", self.tracking):
            while True:
                page = self.client.search_model_versions(filter_string, page_token=token)
                yield from (_version(mv) for mv in page)
                token = page.token
                if not token:
                    return

    def get(self, model: str, version: int) -> ModelVersion:
        missing = f"model {model} has no version {version}"
        with calls(f"reading {model} v{version}", self.tracking, missing=missing):
            return _version(self.client.get_model_version(check_model(model), str(version)))

    def versions(self, model: str) -> list[ModelVersion]:
        return sorted(self._search(f"name='{check_model(model)}'"), key=lambda v: v.version)

    # ------------------------------------------------------------ stages

    def in_stage(self, model: str, stage: str) -> ModelVersion | None:
        check_stage(stage)
        found = self._registered(model)
        version = (found.aliases or {}).get(stage) if found is not None else None
        return self.get(model, int(version)) if version is not None else None

    def _move(self, model: str, stage: str, log: StageLog, decide: Decide) -> StageChange:
        for _ in range(TRIES):
            requested = log.requested(stage)
            new, moved = decide(replay(requested)[0])
            if new is None:
                log.settle(stage)
                return moved
            if log.append(stage, len(requested) + 1, moved):
                _, everything = log.settle(stage)
                effects = replay(everything)[1]
                landed = effects[len(requested)] if len(effects) > len(requested) else None
                return landed or moved
            backoff()  # another change took this place in the log: decide again on the longer log
        raise contended(f"the stage history of {model} {stage} on {shown(self.tracking)}")

    def promote(
        self,
        model: str,
        version: int,
        stage: str,
        reason: str = "",
        audit: Audit | None = None,
        expected: Expected = ANY,
    ) -> StageChange:
        check_stage(stage)
        self.get(model, version)
        log = self._log(model, create=True)
        assert log is not None
        given = with_reason(audit, reason)
        # ``expected`` is checked on the log up to the place this change takes: a place is taken
        # once, so no other change can come between the state decided on and this one.
        return self._move(model, stage, log, lambda state: promoted(state, model, stage, version, given, expected))

    def rollback(self, model: str, stage: str, audit: Audit | None = None) -> StageChange:
        check_stage(stage)
        log = self._log(model, create=False)
        if log is None:
            raise NotFoundError(f"model {model} has never been in {stage}", hint="nothing to roll back")
        return self._move(model, stage, log, lambda state: rolled_back(state, model, stage, audit))

    def history(self, model: str, stage: str) -> list[StageChange]:
        check_stage(stage)
        log = self._log(model, create=False)
        return replay(log.requested(stage))[0].log if log is not None else []


def _version(mv: Any) -> ModelVersion:
    tags = dict(mv.tags or {})
    return ModelVersion(
        model=mv.name,
        version=int(mv.version),
        artifacts_uri=tags.get(ARTIFACTS_TAG) or mv.source or "",
        run_id=tags.get(RUN_TAG, ""),
        metrics=_json(tags.get(METRICS_TAG)),
        lineage=_json(tags.get(LINEAGE_TAG)),
        params=_json(tags.get(PARAMS_TAG)),
        created_at=datetime.fromtimestamp((mv.creation_timestamp or 0) / 1000, UTC),
    )


def _source(artifacts_uri: str, mlflow_run: str) -> str:
    scheme = artifacts_uri.partition("://")[0]
    return artifacts_uri if scheme in _REMOTE_SOURCES else f"runs:/{mlflow_run}/model"


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str, sort_keys=True)


def _json(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    body = json.loads(text)
    return body if isinstance(body, dict) else {}


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys ({"eval": {"acc": 1}} -> {"eval.acc": 1})."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _key(name: str) -> str:
    """A metric or param name MLflow accepts (letters, digits and ``_ - . / : space``; 250 at most)."""
    return _PARAM_KEY.sub("_", name)[:250]


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
