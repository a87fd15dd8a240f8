"""status: the run records, as a table for people or JSON for scripts."""

from __future__ import annotations

import argparse
from typing import Any

from gpuline import gha
from gpuline.context import Context
from gpuline.runs import RunRecord


def run(args: argparse.Namespace) -> dict[str, Any]:
    ctx = Context.from_args(args)
    ids = list(args.run_ids) or ([args.run_id] if args.run_id else [])
    records = [ctx.ledger.get_run(i) for i in ids] if ids else ctx.ledger.list_runs(limit=args.limit)
    out = []
    for record in records:
        body = record.model_dump(mode="json")
        if args.events:
            body["events"] = [e.model_dump(mode="json") for e in ctx.ledger.events(record.run_id)]
        out.append(body)
    if not args.json:
        _print(records)
    return {"runs": out}


def _print(records: list[RunRecord]) -> None:
    if not records:
        gha.info("no runs yet")
        return
    gha.info(f"{'RUN':28} {'TIER':8} {'STATUS':10} {'STAGE':14} {'GPU-S':>8} {'USD':>8} {'VERSION':8} COMMIT")
    for r in records:
        version = f"v{r.promoted_version} {r.promoted_stage}" if r.promoted_version else ""
        usd = f"{r.actual_usd:.2f}" if r.actual_usd is not None else "-"
        gha.info(
            f"{r.run_id:28} {r.tier:8} {r.status:10} {r.stage:14} {r.gpu_seconds:8.0f} {usd:>8} "
            f"{version:8} {r.lineage.commit[:10]}"
        )
        if r.error:
            gha.info(f"{'':28} error: {r.error}")
