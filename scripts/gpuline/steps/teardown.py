"""teardown: always runs. Releases the machine and the lease, settles the real cost, closes the run.

Idempotent: every action checks whether it already happened, so running it twice (or after the
reaper) changes nothing the second time.
"""

from __future__ import annotations

import argparse
from datetime import datetime
from typing import Any

from gpuline import gha
from gpuline.context import Context
from gpuline.decisions.cost import actual_cost, device_count
from gpuline.decisions.pricing import load_catalog
from gpuline.errors import NotFoundError
from gpuline.providers import open_provider
from gpuline.providers.options import options_for
from gpuline.runs import RunRecord, utcnow
from gpuline.steps.common import outputs, table

FINAL_STEP = {"pr-fast": "cost-estimate", "nightly": "promote", "release": "promote"}


def run(args: argparse.Namespace) -> dict[str, Any]:
    return teardown(Context.from_args(args))


def teardown(ctx: Context) -> dict[str, Any]:
    record = ctx.require_run()
    ctx.use_tier(record.tier)
    now = utcnow()
    first_time = record.times.released is None
    machine_released = _release_machine(ctx, record)
    lease_released = ctx.ledger.release_lease(record.lease_id, now) if record.lease_id else False
    if first_time:
        record = close_record(ctx, record, now)
    quota = settle_quota(ctx, record)
    ctx.event(
        "teardown",
        machine_released=machine_released,
        lease_released=lease_released,
        quota=quota,
        first_time=first_time,
    )
    if not first_time:
        gha.info(f"run {record.run_id} was already torn down; nothing left to release")
    rows = [
        ("status", f"{record.status} (last step: {record.stage})"),
        ("machine", f"{record.instance_id or '—'} {'released' if machine_released else 'not running'}"),
        ("GPU-seconds", f"{record.gpu_seconds:.0f} (idle {record.idle_seconds:.0f})"),
        ("cost", f"${record.actual_usd or 0:.2f} actual vs ${record.estimated_usd or 0:.2f} estimated"),
        ("quota", quota),
    ]
    gha.info(f"teardown {record.run_id}: " + "; ".join(f"{k} {v}" for k, v in rows))
    comment_path = ctx.workdir(record.run_id) / "cost-comment.md"
    _append_actual(comment_path, record)
    gha.append_summary(f"### gpuline teardown ({record.run_id})\n\n" + table(rows, ("", "")))
    outputs(
        {
            "actual-usd": f"{record.actual_usd or 0:.2f}",
            "gpu-seconds": f"{record.gpu_seconds:.0f}",
            "comment-path": str(comment_path) if comment_path.exists() else "",
        }
    )
    return {
        "run_id": record.run_id,
        "status": record.status,
        "machine_released": machine_released,
        "lease_released": lease_released,
        "gpu_seconds": record.gpu_seconds,
        "actual_usd": record.actual_usd,
        "quota": quota,
        "already_torn_down": not first_time,
    }


def _release_machine(ctx: Context, record: RunRecord) -> bool:
    if not record.lease_id:
        return False
    # From the run record, not gpuline.yml: teardown must work even if the file changed or broke since.
    options = record.resolved_config.get("resources", {}).get("options", {})
    name = record.provider or "local"
    provider = open_provider(name, ctx.project_dir, options_for(name, options, record.region or None))
    if record.instance_id:
        return provider.release(record.instance_id)
    # The process died between recording the lease and learning the instance id: find it by its tag.
    released = False
    for machine in provider.list_owned():
        if machine.lease_id == record.lease_id:
            released = provider.release(machine.instance_id) or released
    return released


def close_record(ctx: Context, record: RunRecord, now: datetime) -> RunRecord:
    """Stamp the release time, GPU-seconds, idle time, actual cost and final status (once)."""
    catalog = load_catalog(ctx.project_dir)
    provider_prices = catalog.providers.get(record.provider)
    instance = provider_prices.instances.get(record.instance_type) if provider_prices else None
    nodes = int(record.resolved_config.get("resources", {}).get("nodes", 1))
    devices = device_count(instance, nodes) if instance else max(record.gpu_count, 1) * nodes
    start = record.times.provisioned
    held = (now - start).total_seconds() if start else 0.0
    idle = held
    if start and record.times.first_step and record.times.last_step:
        idle = max(0.0, (record.times.first_step - start).total_seconds()) + max(
            0.0, (now - record.times.last_step).total_seconds()
        )
    usd = actual_cost(catalog, record.provider, record.instance_type, record.lane, nodes, held) if start else 0.0
    reached_end = record.stage == FINAL_STEP.get(record.tier)

    def close(r: RunRecord) -> None:
        r.times.released = now
        r.gpu_seconds = round(held * devices, 3)
        r.idle_seconds = round(idle * devices, 3)
        r.actual_usd = usd
        if r.status in ("created", "running"):
            if reached_end:
                r.status = "succeeded"
            else:
                r.status = "failed"
                r.error = r.error or f"stopped after {r.stage}: the job was cancelled or crashed"

    return ctx.ledger.update_run(record.run_id, close)


def settle_quota(ctx: Context, record: RunRecord) -> str:
    """Replace the reservation with the actual cost, or give it back when nothing was bought."""
    if record.times.provisioned is None:
        # Nothing was bought: give the whole reservation back.
        return "released" if ctx.ledger.release(record.run_id) else "none held"
    try:
        hours = record.gpu_seconds / 3600
        ctx.ledger.settle(record.run_id, hours, record.actual_usd or 0.0)
    except NotFoundError:
        return "no reservation"
    return f"settled at {hours:.3f} GPU-hours, ${record.actual_usd or 0:.2f}"


def _append_actual(path: Any, record: RunRecord) -> None:
    """Add the actual cost to the sticky comment body so the PR shows estimate and reality together."""
    if not path.exists():
        return
    marker = "<!-- gpuline:actual -->"
    text = path.read_text().split(marker)[0].rstrip()
    text += (
        f"\n\n{marker}\n**Actual:** ${record.actual_usd or 0:.2f}, {record.gpu_seconds / 3600:.3f} GPU-hours "
        f"({record.idle_seconds:.0f} idle GPU-seconds), run {record.status}.\n"
    )
    path.write_text(text)
