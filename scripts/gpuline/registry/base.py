"""The model registry protocol: versions with lineage, and stages that remember what they replaced."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Protocol

from pydantic import BaseModel, Field

from gpuline.runs import utcnow


class ModelVersion(BaseModel):
    model: str
    version: int
    artifacts_uri: str
    run_id: str
    metrics: dict[str, Any] = Field(default_factory=dict)
    lineage: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime = Field(default_factory=utcnow)


class StageChange(BaseModel):
    model: str
    stage: str
    version: int | None
    previous: int | None
    at: datetime = Field(default_factory=utcnow)
    reason: str = ""


class ModelRegistry(Protocol):
    def register(
        self, model: str, artifacts_uri: str, run_id: str, metrics: dict[str, Any], lineage: dict[str, Any]
    ) -> ModelVersion: ...

    def get(self, model: str, version: int) -> ModelVersion: ...
    def versions(self, model: str) -> list[ModelVersion]: ...
    def in_stage(self, model: str, stage: str) -> ModelVersion | None: ...
    def promote(self, model: str, version: int, stage: str, reason: str = "") -> StageChange:
        """Point ``stage`` at ``version``, pushing the current one onto the stage's history."""
        ...

    def rollback(self, model: str, stage: str) -> StageChange:
        """Point ``stage`` back at the version it held before the last promotion: one step."""
        ...

    def history(self, model: str, stage: str) -> list[StageChange]: ...
