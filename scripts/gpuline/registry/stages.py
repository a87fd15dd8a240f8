"""What promoting and rolling back do to a stage, as pure functions every backend shares.

A stage is a stack of versions (newest last) and the log of its changes. Promoting pushes a version
(promoting the one already there changes nothing, so retries are safe); rolling back pops one, back
to the version the stage held before. The file and S3 backends keep the state itself and swap it
with a compare-and-set; the MLflow backend keeps only the log of requested changes and replays it.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from gpuline.errors import InfraError, NotFoundError, RefusedError
from gpuline.registry.base import (
    ANY,
    Audit,
    Expected,
    ModelVersion,
    StageChange,
    StaleBaseline,
    change,
    check_stage,
    with_reason,
)


@dataclass(frozen=True)
class StageState:
    stack: list[int] = field(default_factory=list)
    log: list[StageChange] = field(default_factory=list)

    @property
    def current(self) -> int | None:
        return self.stack[-1] if self.stack else None

    @property
    def previous(self) -> int | None:
        return self.stack[-2] if len(self.stack) >= 2 else None


# Decides a change from the state read: (the new state, or None for "leave it"; the change).
Decide = Callable[[StageState], tuple[StageState | None, StageChange]]


def promoted(
    state: StageState, model: str, stage: str, version: int, audit: Audit | None, expected: Expected = ANY
) -> tuple[StageState | None, StageChange]:
    """The state after promoting ``version`` (None: it is already there) and the change to record.

    ``expected`` is checked here, on the state the backend's conditional write is based on, so a
    promotion that another one overtook is refused instead of replacing a version nobody gated
    against. A retry of a promotion that landed finds its version there and changes nothing.
    """
    current = state.current
    moved = change(model, stage, "promote", version, current, audit)
    if current == version:
        return None, moved
    if expected is not ANY and current != expected:
        raise StaleBaseline(model, stage, version, expected, current)
    return StageState([*state.stack, version], [*state.log, moved]), moved


def rolled_back(state: StageState, model: str, stage: str, audit: Audit | None) -> tuple[StageState, StageChange]:
    """The state one step back, and the change to record; an error when there is nothing to go back to."""
    if not state.stack:
        raise NotFoundError(f"model {model} has never been in {stage}", hint="nothing to roll back")
    if len(state.stack) < 2:
        raise RefusedError(
            f"{model} {stage} has no earlier version to roll back to (v{state.stack[-1]} was the first)",
            hint="promote another version instead",
        )
    moved = change(model, stage, "rollback", state.stack[-2], state.stack[-1], audit)
    return StageState(state.stack[:-1], [*state.log, moved]), moved


def replay(requested: list[StageChange]) -> tuple[StageState, list[StageChange | None]]:
    """The state a log of requested changes leads to, and what each request did (None: nothing).

    Two requests made at once were both decided on the state before either; replaying them in
    their logged order gives every reader the same stage and keeps both in the history.
    """
    state = StageState()
    effects: list[StageChange | None] = []
    for asked in requested:
        if asked.action == "promote" and asked.version is not None and asked.version != state.current:
            done = asked.model_copy(update={"previous": state.current})
            state = StageState([*state.stack, asked.version], [*state.log, done])
        elif asked.action == "rollback" and len(state.stack) >= 2:
            done = asked.model_copy(update={"version": state.stack[-2], "previous": state.stack[-1]})
            state = StageState(state.stack[:-1], [*state.log, done])
        else:
            done = None
        effects.append(done)
    return state, effects


def encode(state: StageState) -> bytes:
    body = {"stack": state.stack, "log": [c.model_dump(mode="json") for c in state.log]}
    return json.dumps(body, indent=2, default=str).encode()


def decode(data: bytes) -> StageState:
    body = json.loads(data)
    return StageState(list(body["stack"]), [StageChange.model_validate(c) for c in body["log"]])


# ---------------------------------------------------------------- contention

TRIES = 30  # changes lost to another writer in a row before giving up


def backoff() -> None:
    """A short random pause after losing a race, so the writers that lost it do not collide again."""
    time.sleep(random.uniform(0.01, 0.1))


def contended(where: str) -> InfraError:
    return InfraError(f"{where} kept changing under {TRIES} attempts to update it", hint="retry the command")


class StageMoves:
    """``promote`` and ``rollback`` for a backend that moves a stage by deciding on what it read
    (``_move``): the file and S3 backends share them, and only say how a move is made safe."""

    def get(self, model: str, version: int) -> ModelVersion:
        raise NotImplementedError

    def _move(self, model: str, stage: str, decide: Decide) -> StageChange:
        raise NotImplementedError

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
        given = with_reason(audit, reason)
        return self._move(model, stage, lambda state: promoted(state, model, stage, version, given, expected))

    def rollback(self, model: str, stage: str, audit: Audit | None = None) -> StageChange:
        check_stage(stage)
        return self._move(model, stage, lambda state: rolled_back(state, model, stage, audit))
