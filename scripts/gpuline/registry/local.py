"""A model registry in plain files: one JSON per version, one JSON per stage with its history.

Writes go through a lock file and an atomic rename, so two promotions never interleave and a crash
never leaves half a stage file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from gpuline.errors import InfraError, NotFoundError
from gpuline.filelock import locked
from gpuline.registry.base import Audit, ModelVersion, StageChange, check_model, check_stage
from gpuline.registry.stages import Decide, StageMoves, StageState, decode, encode, rolled_back

T = TypeVar("T")
# How long a promotion or rollback waits for another one to finish before naming it and giving up.
LOCK_TIMEOUT_S = 60.0


def read_file(path: Path, parse: Callable[[bytes], T]) -> T:
    """``parse`` of the file's bytes; an unreadable or corrupt registry file is an error naming it."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InfraError(
            f"cannot read the registry file {path}: {exc.strerror or exc}", hint="check its permissions"
        ) from None
    try:
        return parse(data)
    except (ValueError, TypeError, KeyError) as exc:  # json's and pydantic's errors are ValueErrors
        raise InfraError(
            f"the registry file {path} is corrupt ({type(exc).__name__})",
            hint="restore it from a backup; gpuline writes it atomically, so something else changed it",
        ) from None


def open_local(uri: str, base_dir: Path) -> LocalRegistry:
    rest = uri.removeprefix("file://")
    path = Path(rest)
    return LocalRegistry(path if path.is_absolute() else base_dir / path)


class LocalRegistry(StageMoves):
    def __init__(self, root: Path) -> None:
        self.root = root

    def secrets(self) -> list[str]:
        return []

    def _model_dir(self, model: str) -> Path:
        return self.root / check_model(model)

    @contextmanager
    def _locked(self, model: str) -> Iterator[Path]:
        directory = self._model_dir(model)
        (directory / "versions").mkdir(parents=True, exist_ok=True)
        with locked(directory / ".lock", f"the registry of {model}", LOCK_TIMEOUT_S):
            yield directory

    @staticmethod
    def _write_bytes(path: Path, body: bytes) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(body)
        os.replace(tmp, path)

    def register(
        self,
        model: str,
        artifacts_uri: str,
        run_id: str,
        metrics: dict[str, Any],
        lineage: dict[str, Any],
        params: dict[str, Any] | None = None,
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
                params=params or {},
            )
            body = json.dumps(mv.model_dump(mode="json"), indent=2, default=str).encode()
            self._write_bytes(directory / "versions" / f"{mv.version}.json", body)
            return mv

    def get(self, model: str, version: int) -> ModelVersion:
        path = self._model_dir(model) / "versions" / f"{version}.json"
        if not path.exists():
            raise NotFoundError(f"model {model} has no version {version}", hint="list versions with `gpuline models`")
        return read_file(path, ModelVersion.model_validate_json)

    def versions(self, model: str) -> list[ModelVersion]:
        directory = self._model_dir(model) / "versions"
        if not directory.exists():
            return []
        found = [read_file(p, ModelVersion.model_validate_json) for p in directory.glob("*.json")]
        return sorted(found, key=lambda v: v.version)

    def models(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / "versions").is_dir())

    def _stage_file(self, model: str, stage: str) -> Path:
        check_stage(stage)
        return self._model_dir(model) / f"stage-{stage}.json"

    def _state(self, model: str, stage: str) -> StageState:
        path = self._stage_file(model, stage)
        return read_file(path, decode) if path.exists() else StageState()

    def in_stage(self, model: str, stage: str) -> ModelVersion | None:
        current = self._state(model, stage).current
        return self.get(model, current) if current is not None else None

    def _move(self, model: str, stage: str, decide: Decide) -> StageChange:
        with self._locked(model):
            new, moved = decide(self._state(model, stage))
            if new is not None:
                self._write_bytes(self._stage_file(model, stage), encode(new))
            return moved

    def rollback(self, model: str, stage: str, audit: Audit | None = None) -> StageChange:
        check_stage(stage)
        rolled_back(self._state(model, stage), model, stage, audit)  # nothing to go back to: no folder made
        return super().rollback(model, stage, audit)

    def history(self, model: str, stage: str) -> list[StageChange]:
        return self._state(model, stage).log
