"""A model's stage history on an MLflow server: create-once entries, replayed into aliases.

MLflow has no compare-and-set, but a run's params can be written only once: logging a key again
with another value is refused. Each requested stage change is such a param of the model's "stage
history" run (``production.000007``: the change as JSON, with its audit), so two writers can never
take the same place in the log; the loser reads again and takes the next one. Replaying the log
gives the stage's stack of versions, which is then written as aliases: ``production`` and
``staging`` point at what the stage holds, ``previous-production`` and ``previous-staging`` at the
version a rollback returns to. Aliases are rewritten until the log stops moving under them, so after
concurrent promotions every alias agrees with the full log.
"""

from __future__ import annotations

from typing import Any

from gpuline.registry.base import StageChange
from gpuline.registry.mlflow_client import calls, is_mlflow_error, translate
from gpuline.registry.stages import StageState, replay

HISTORY_TAG = "gpuline.stage-history-run"  # on the registered model: the run that holds its log
KIND_TAG = "gpuline.kind"
MAX_VALUE = 6000  # the longest param value MLflow accepts
_SYNC_ROUNDS = 8


def alias_of_previous(stage: str) -> str:
    return f"previous-{stage}"


class StageLog:
    """The requested changes of one model's stages, as create-once params of one MLflow run."""

    def __init__(self, client: Any, model: str, run_id: str, tracking: str) -> None:
        self.client, self.model, self.run_id, self.tracking = client, model, run_id, tracking

    def _params(self) -> dict[str, str]:
        with calls(f"reading the stage history of {self.model}", self.tracking):
            params: dict[str, str] = self.client.get_run(self.run_id).data.params
        return params

    def requested(self, stage: str) -> list[StageChange]:
        """The stage's requested changes in the order they were logged."""
        prefix = f"{stage}."
        entries = sorted(
            (int(key[len(prefix) :]), value)
            for key, value in self._params().items()
            if key.startswith(prefix) and key[len(prefix) :].isdigit()
        )
        return [StageChange.model_validate_json(value) for _, value in entries]

    def append(self, stage: str, seq: int, change: StageChange) -> bool:
        """Take place ``seq`` (1-based) for ``change``; False when another writer took it first."""
        key, value = f"{stage}.{seq:06d}", fit(change)
        try:
            self.client.log_param(self.run_id, key, value)
        except Exception as exc:
            if not is_mlflow_error(exc):
                raise
            taken = self._params().get(key)
            if taken is None:  # refused for another reason than a taken place
                raise translate(exc, f"recording a change of {self.model} {stage}", self.tracking) from None
            return taken == value  # equal: our own write landed and the client retried it
        return True

    def settle(self, stage: str) -> tuple[StageState, list[StageChange]]:
        """Write the aliases the log leads to, until the log stops moving; the state and the log read."""
        for _ in range(_SYNC_ROUNDS):
            requested = self.requested(stage)
            state, _ = replay(requested)
            self._alias(stage, state.current)
            self._alias(alias_of_previous(stage), state.previous)
            if len(self.requested(stage)) == len(requested):
                break
        return state, requested

    def _alias(self, alias: str, version: int | None) -> None:
        with calls(f"moving the alias {alias} of {self.model}", self.tracking):
            if version is None:
                self.client.delete_registered_model_alias(self.model, alias)
            else:
                self.client.set_registered_model_alias(self.model, alias, str(version))


def fit(change: StageChange) -> str:
    """The change as JSON, shortened (gate details, then the reason) to fit one MLflow param."""
    text = change.model_dump_json()
    if len(text) > MAX_VALUE:
        gates = [g.model_copy(update={"detail": g.detail[:80]}) for g in change.gates]
        change = change.model_copy(update={"gates": gates})
        text = change.model_dump_json()
    if len(text) > MAX_VALUE:
        change = change.model_copy(update={"gates": [], "reason": change.reason[:1000]})
        text = change.model_dump_json()
    return text
