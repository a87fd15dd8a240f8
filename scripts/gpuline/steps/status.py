"""status: the run records, as a table for people or JSON for scripts."""

from __future__ import annotations

import argparse

from gpuline.context import Context
from gpuline.errors import InputError
from gpuline.results import StatusResult

MAX_LIMIT = 10_000


def run(ctx: Context, args: argparse.Namespace) -> StatusResult:
    if not 0 <= args.limit <= MAX_LIMIT:
        # A negative limit means "all" to SQLite, and a huge one overflows its integers.
        raise InputError(f"--limit {args.limit} must be between 0 and {MAX_LIMIT}", hint="pass --limit 20")
    ids = list(args.run_ids) or ([args.run_id] if args.run_id else [])
    records = [ctx.ledger.get_run(i) for i in ids] if ids else ctx.ledger.list_runs(limit=args.limit)
    bodies = []
    for record in records:
        body = record.model_dump(mode="json")
        if args.events:
            body["events"] = [e.model_dump(mode="json") for e in ctx.ledger.events(record.run_id)]
        bodies.append(body)
    return StatusResult(records=records, bodies=bodies)
