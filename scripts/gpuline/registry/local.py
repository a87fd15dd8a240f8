"""A model registry in plain files: one JSON per version, one JSON per stage with its history.

Writes go through a lock file and an atomic rename, so two promotions never interleave and a crash
never leaves half a stage file.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gpuline.errors import InputError, NotFoundError, RefusedError
from gpuline.registry.base import ModelVersion, StageChange


def open_local(uri: str, base_dir: Path) -> LocalRegistry:
    rest = uri.removeprefix("file://")
    path = Path(rest)
    return LocalRegistry(path if path.is_absolute() else base_dir / path)


class LocalRegistry:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _model_dir(self, model: str) -> Path:
        return self.root / model

    @contextmanager
    def _locked(self, model: str) -> Iterator[Path]:
        directory = self._model_dir(model)
        (directory / "versions").mkdir(parents=True, exist_ok=True)
        with (directory / ".lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield directory

    @staticmethod
    def _write_json(path: Path, body: Any) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(body, indent=2, default=str))
        os.replace(tmp, path)

    def register(
        self, model: str, artifacts_uri: str, run_id: str, metrics: dict[str, Any], lineage: dict[str, Any]
    ) -> ModelVersion:
        with self._locked(model) as directory:
            existing = [int(p.stem) for p in (directory / "versions").glob("*.json")]
            # Registering the same run twice (a retried promote) returns the version it already has.
            for version in self.versions(model):
                if version.run_id == run_id:
                    return version
            mv = ModelVersion(
                model=model,
                version=max(existing, default=0) + 1,
                artifacts_uri=artifacts_uri,
                run_id=run_id,
                metrics=metrics,
                lineage=lineage,
            )
            self._write_json(directory / "versions" / f"{mv.version}.json", mv.model_dump(mode="json"))
            return mv

    def get(self, model: str, version: int) -> ModelVersion:
        path = self._model_dir(model) / "versions" / f"{version}.json"
        if not path.exists():
            raise NotFoundError(f"model {model} has no version {version}", hint="list versions with `gpuline status`")
        return ModelVersion.model_validate_json(path.read_text())

    def versions(self, model: str) -> list[ModelVersion]:
        directory = self._model_dir(model) / "versions"
        if not directory.exists():
            return []
        found = [ModelVersion.model_validate_json(p.read_text()) for p in directory.glob("*.json")]
        return sorted(found, key=lambda v: v.version)

    def _stage_file(self, model: str, stage: str) -> Path:
        return self._model_dir(model) / f"stage-{stage}.json"

    def _stage_state(self, model: str, stage: str) -> tuple[list[int], list[StageChange]]:
        """(stack of versions, newest last; log of changes) for one stage."""
        path = self._stage_file(model, stage)
        if not path.exists():
            return [], []
        body = json.loads(path.read_text())
        return list(body["stack"]), [StageChange.model_validate(c) for c in body["log"]]

    def _save_stage(self, model: str, stage: str, stack: list[int], log: list[StageChange]) -> None:
        body = {"stack": stack, "log": [c.model_dump(mode="json") for c in log]}
        self._write_json(self._stage_file(model, stage), body)

    def in_stage(self, model: str, stage: str) -> ModelVersion | None:
        stack, _ = self._stage_state(model, stage)
        return self.get(model, stack[-1]) if stack else None

    def promote(self, model: str, version: int, stage: str, reason: str = "") -> StageChange:
        _check_stage(stage)
        self.get(model, version)
        with self._locked(model):
            stack, log = self._stage_state(model, stage)
            current = stack[-1] if stack else None
            change = StageChange(model=model, stage=stage, version=version, previous=current, reason=reason)
            if current != version:  # promoting what is already there changes nothing (retries are safe)
                self._save_stage(model, stage, [*stack, version], [*log, change])
            return change

    def rollback(self, model: str, stage: str) -> StageChange:
        _check_stage(stage)
        with self._locked(model):
            stack, log = self._stage_state(model, stage)
            if not stack:
                raise NotFoundError(f"model {model} has never been in {stage}", hint="nothing to roll back")
            if len(stack) < 2:
                raise RefusedError(
                    f"{model} {stage} has no earlier version to roll back to (v{stack[-1]} was the first)",
                    hint="promote another version instead",
                )
            change = StageChange(model=model, stage=stage, version=stack[-2], previous=stack[-1], reason="rollback")
            self._save_stage(model, stage, stack[:-1], [*log, change])
            return change

    def history(self, model: str, stage: str) -> list[StageChange]:
        return self._stage_state(model, stage)[1]


def _check_stage(stage: str) -> None:
    if stage not in ("staging", "production"):
        raise InputError(f"unknown stage {stage!r}", hint="use staging or production")
