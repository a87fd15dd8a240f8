"""The model registry protocol: versions with lineage, and stages that remember what they replaced.

Every change of a stage is a :class:`StageChange` in that stage's history, carrying its audit: who
moved it (``actor``), when (``at``), why (``reason``, and the gate verdicts of a promotion), the run
and the workflow run that did it. The steps build the :class:`Audit`; backends only store it.
"""

from __future__ import annotations

import enum
import re
from datetime import datetime
from typing import Any, Literal, Protocol

from pydantic import BaseModel, Field, model_validator

from gpuline.errors import InputError, RefusedError
from gpuline.runs import GateVerdict, utcnow

STAGES = ("staging", "production")
Action = Literal["promote", "rollback"]

_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class Unchecked(enum.Enum):
    """``promote(expected=ANY)``: move the stage whatever it holds now (a person's explicit promotion)."""

    ANY = "any"


ANY = Unchecked.ANY
# What a stage must hold for a promotion to go ahead: a version, None (nothing yet), or ANY.
Expected = int | None | Unchecked


class StaleBaseline(RefusedError):
    """The stage no longer holds the version the candidate was gated against: gate it again."""

    title = "baseline moved"

    def __init__(self, model: str, stage: str, version: int | None, expected: int | None, current: int | None) -> None:
        held = f"v{current}" if current is not None else "nothing"
        gated = f"v{expected}" if expected is not None else "no baseline"
        candidate = f"v{version}" if version is not None else "the candidate"
        super().__init__(
            f"{model} {stage} now holds {held}, but {candidate} was gated against {gated}, "
            f"so {candidate} was not promoted",
            hint=f"run eval-gate again, so the candidate is compared with {held}, then promote",
        )
        self.current = current


class ModelVersion(BaseModel):
    model: str
    version: int
    artifacts_uri: str
    run_id: str
    metrics: dict[str, Any] = Field(default_factory=dict)
    lineage: dict[str, Any] = Field(default_factory=dict)
    params: dict[str, Any] = Field(default_factory=dict)
    """Hyperparameters and the config hash: what an experiment tracker shows as the run's params."""
    created_at: datetime = Field(default_factory=utcnow)


class Audit(BaseModel):
    """Who moves a stage and why; handed to ``promote`` and ``rollback`` by the steps."""

    actor: str = ""
    reason: str = ""
    run_id: str = ""
    workflow_run_url: str = ""
    gates: list[GateVerdict] = Field(default_factory=list)


class StageChange(BaseModel):
    model: str
    stage: str
    version: int | None
    previous: int | None
    at: datetime = Field(default_factory=utcnow)
    reason: str = ""
    action: Action = "promote"
    actor: str = ""
    run_id: str = ""
    workflow_run_url: str = ""
    gates: list[GateVerdict] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _older_records(cls, data: Any) -> Any:
        # Histories written before changes had an action marked rollbacks by their reason alone.
        if isinstance(data, dict) and "action" not in data and data.get("reason") == "rollback":
            return {**data, "action": "rollback"}
        return data


def change(
    model: str, stage: str, action: Action, version: int | None, previous: int | None, audit: Audit | None
) -> StageChange:
    """A stage change carrying ``audit`` (a rollback without a reason says so)."""
    given = audit or Audit()
    reason = given.reason or ("rollback" if action == "rollback" else "")
    return StageChange(
        model=model,
        stage=stage,
        version=version,
        previous=previous,
        reason=reason,
        action=action,
        actor=given.actor,
        run_id=given.run_id,
        workflow_run_url=given.workflow_run_url,
        gates=list(given.gates),
    )


def with_reason(audit: Audit | None, reason: str) -> Audit | None:
    """``audit`` with ``reason`` filled in where it has none (the ``reason=`` argument of promote)."""
    if not reason:
        return audit
    given = audit or Audit()
    return given if given.reason else given.model_copy(update={"reason": reason})


def check_stage(stage: str) -> None:
    if stage not in STAGES:
        raise InputError(f"unknown stage {stage!r}", hint="use staging or production")


def check_model(model: str) -> str:
    """``model`` when it is a usable registry name (it becomes a folder, a key and an MLflow name)."""
    if not _MODEL_NAME.match(model):
        raise InputError(
            f"model name {model!r} is not valid in a registry",
            hint="use letters, digits, '.', '_' and '-' (the model.name of gpuline.yml)",
        )
    return model


class ModelRegistry(Protocol):
    def register(
        self,
        model: str,
        artifacts_uri: str,
        run_id: str,
        metrics: dict[str, Any],
        lineage: dict[str, Any],
        params: dict[str, Any] | None = None,
    ) -> ModelVersion:
        """A new version for ``run_id``; registering the same run again returns the version it has."""
        ...

    def get(self, model: str, version: int) -> ModelVersion: ...
    def versions(self, model: str) -> list[ModelVersion]: ...
    def models(self) -> list[str]:
        """The names of the models this registry holds (for ``gpuline models`` without a name)."""
        ...

    def in_stage(self, model: str, stage: str) -> ModelVersion | None: ...
    def promote(
        self,
        model: str,
        version: int,
        stage: str,
        reason: str = "",
        audit: Audit | None = None,
        expected: Expected = ANY,
    ) -> StageChange:
        """Point ``stage`` at ``version``, pushing the current one onto the stage's history.

        With ``expected`` the move is a compare-and-set: it happens only while the stage still holds
        that version (None: nothing), decided on the same read that the write is conditional on, and
        :class:`StaleBaseline` otherwise. Promoting the version the stage already holds always succeeds.
        """
        ...

    def rollback(self, model: str, stage: str, audit: Audit | None = None) -> StageChange:
        """Point ``stage`` back at the version it held before the last promotion: one step."""
        ...

    def history(self, model: str, stage: str) -> list[StageChange]:
        """Every change of ``stage``, oldest first, each with its audit."""
        ...

    def secrets(self) -> list[str]:
        """Credentials this backend read (an MLflow token): the caller masks them before any output."""
        ...
