"""A model registry in an S3 bucket (or any S3-compatible server): ``s3://BUCKET/PREFIX``.

Under PREFIX, per model:

- ``MODEL/versions/N.json``: one object per version, written once (``If-None-Match: *``), so two
  registrations can never take the same number: the loser re-lists and takes the next one;
- ``MODEL/runs/RUN.json``: which version a run became, so a retried registration finds it at once;
- ``MODEL/stages/STAGE.json``: the stage's stack of versions and its audited history, moved with
  ``If-Match: ETAG`` of the copy read. S3 answers 412 (or 409 while two writes race) when another
  promotion got there first, and the change is decided again on a fresh read, so two concurrent
  promotions both land, one after the other.

Every object carries its sha256 in its metadata and reads check it, as for checkpoints (the
objects go through :class:`gpuline.storage.s3.S3Storage`, and boto3 through
:mod:`gpuline.adaptors.aws`). The bucket must exist. IAM actions: ``s3:GetObject`` and
``s3:PutObject`` on ``arn:aws:s3:::BUCKET/PREFIX/*``, ``s3:ListBucket`` on the bucket.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gpuline.errors import InputError, NotFoundError
from gpuline.registry.base import ModelVersion, StageChange, check_model, check_stage
from gpuline.registry.stages import (
    TRIES,
    Decide,
    StageMoves,
    StageState,
    backoff,
    contended,
    decode,
    encode,
)
from gpuline.storage.base import ObjectNotFound, PreconditionFailed
from gpuline.storage.s3 import S3Storage

__all__ = ["S3Registry", "open_s3"]


def open_s3(uri: str, base_dir: Path) -> S3Registry:
    parts = urlsplit(uri)
    if not parts.netloc:
        raise InputError(f"registry URI {uri!r} has no bucket", hint="write s3://BUCKET/PREFIX")
    return S3Registry(S3Storage(parts.netloc, parts.path.strip("/")))


class S3Registry(StageMoves):
    def __init__(self, store: S3Storage) -> None:
        self.store = store

    def secrets(self) -> list[str]:
        return []  # AWS credentials come from the SDK's chain, which never prints them

    # ------------------------------------------------------------ versions

    def _version_key(self, model: str, version: int) -> str:
        return f"{check_model(model)}/versions/{version}.json"

    def _numbers(self, model: str) -> list[int]:
        keys = self.store.list(f"{check_model(model)}/versions/")
        return sorted(int(k.rsplit("/", 1)[1].removesuffix(".json")) for k in keys if k.endswith(".json"))

    def get(self, model: str, version: int) -> ModelVersion:
        try:
            data = self.store.get_bytes(self._version_key(model, version))
        except ObjectNotFound:
            raise NotFoundError(
                f"model {model} has no version {version}", hint="list versions with `gpuline models`"
            ) from None
        return ModelVersion.model_validate_json(data)

    def versions(self, model: str) -> list[ModelVersion]:
        return [self.get(model, n) for n in self._numbers(model)]

    def models(self) -> list[str]:
        names = {key.split("/", 1)[0] for key in self.store.list() if "/versions/" in key}
        return sorted(names)

    def _run_key(self, model: str, run_id: str) -> str:
        return f"{check_model(model)}/runs/{run_id}.json"

    def _indexed(self, model: str, run_id: str) -> ModelVersion | None:
        try:
            body = json.loads(self.store.get_bytes(self._run_key(model, run_id)))
        except ObjectNotFound:
            return None
        return self.get(model, int(body["version"]))

    def _index(self, model: str, version: ModelVersion) -> ModelVersion:
        """Record which version the run became; the first record wins (a concurrent twin returns it)."""
        body = json.dumps({"version": version.version}).encode()
        try:
            self.store.put_if(self._run_key(model, version.run_id), body, None)
        except PreconditionFailed:
            return self._indexed(model, version.run_id) or version
        return version

    def register(
        self,
        model: str,
        artifacts_uri: str,
        run_id: str,
        metrics: dict[str, Any],
        lineage: dict[str, Any],
        params: dict[str, Any] | None = None,
    ) -> ModelVersion:
        known = self._indexed(model, run_id)
        if known is not None:
            return known
        # Written but not indexed (a crash in between): the scan finds it, so no second version appears.
        for existing in self.versions(model):
            if existing.run_id == run_id:
                return self._index(model, existing)
        for _ in range(TRIES):
            mv = ModelVersion(
                model=model,
                version=max(self._numbers(model), default=0) + 1,
                artifacts_uri=artifacts_uri,
                run_id=run_id,
                metrics=metrics,
                lineage=lineage,
                params=params or {},
            )
            body = json.dumps(mv.model_dump(mode="json"), indent=2, default=str).encode()
            try:
                self.store.put_if(self._version_key(model, mv.version), body, None)
            except PreconditionFailed:
                backoff()
                continue  # another registration took this number: take the next one
            return self._index(model, mv)
        raise contended(self.store.uri_for(f"{model}/versions"))

    # ------------------------------------------------------------ stages

    def _stage_key(self, model: str, stage: str) -> str:
        check_stage(stage)
        return f"{check_model(model)}/stages/{stage}.json"

    def _read(self, model: str, stage: str) -> tuple[StageState, str | None]:
        try:
            data, etag = self.store.get_bytes_and_etag(self._stage_key(model, stage))
        except ObjectNotFound:
            return StageState(), None
        return decode(data), etag

    def _move(self, model: str, stage: str, decide: Decide) -> StageChange:
        key = self._stage_key(model, stage)
        for _ in range(TRIES):
            state, etag = self._read(model, stage)
            new, moved = decide(state)
            if new is None:
                return moved
            try:
                self.store.put_if(key, encode(new), etag)
            except PreconditionFailed:
                backoff()
                continue  # another change landed since the read: decide again on what is there now
            return moved
        raise contended(self.store.uri_for(key))

    def in_stage(self, model: str, stage: str) -> ModelVersion | None:
        current = self._read(model, stage)[0].current
        return self.get(model, current) if current is not None else None

    def history(self, model: str, stage: str) -> list[StageChange]:
        return self._read(model, stage)[0].log
