"""rollback: one step back to the version a stage held before its last promotion.

Audited like a promotion: who, when, why (``GPULINE_ROLLBACK_REASON``), the run (``--run-id``, when
one is given: the release that is being undone) and the workflow run, in the registry's history and,
when a run is given, as its ``model.rolled_back`` event.
"""

from __future__ import annotations

import argparse

from gpuline.context import Context
from gpuline.errors import InputError
from gpuline.registry import audit
from gpuline.results import RollbackResult

NO_REASON = "no reason given"


def run(ctx: Context, args: argparse.Namespace) -> RollbackResult:
    model = args.model
    if not model:
        try:
            model = ctx.base_spec.model.name
        except InputError:
            raise InputError("no model given", hint="pass --model NAME (or run next to a gpuline.yml)") from None
    return roll_back(ctx, model, args.stage or "production", getattr(args, "reason", None) or NO_REASON)


def roll_back(ctx: Context, model: str, stage: str, reason: str) -> RollbackResult:
    """Move ``stage`` of ``model`` one step back, audited with ``reason`` (and the run, when given)."""
    registry = ctx.registry
    if ctx.run_id:
        ctx.ledger.get_run(ctx.run_id)  # an unknown run is an input error, found before anything moves
    why = audit.for_rollback(reason, run_id=ctx.run_id or "")
    change = registry.rollback(model, stage, audit=why)
    if ctx.run_id:
        ctx.event(
            "model.rolled_back",
            model=model,
            stage=stage,
            version=change.version,
            replaced=change.previous,
            actor=change.actor,
            reason=change.reason,
        )
    return RollbackResult(
        model=model,
        stage=stage,
        version=change.version,
        replaced=change.previous,
        actor=change.actor,
        reason=change.reason,
        at=change.at.isoformat(timespec="seconds"),
        run_id=change.run_id,
        workflow_run_url=change.workflow_run_url,
    )
