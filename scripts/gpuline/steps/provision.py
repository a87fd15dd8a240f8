"""provision: decide the lease (id, tags, TTL), record it, and only then ask the provider for a machine."""

from __future__ import annotations

import argparse
import secrets
from typing import Any

from gpuline import gha
from gpuline.context import Context
from gpuline.pricing import load_catalog
from gpuline.providers import PROVIDERS, open_provider
from gpuline.providers.base import TAG_EXPIRES_AT, TAG_LEASE_ID, TAG_MANAGED, TAG_RUN_ID, LeaseRequest
from gpuline.runs import LeaseRecord, RunRecord, ttl_expiry, utcnow
from gpuline.steps.common import outputs, recorded, table
from gpuline.steps.cost_estimate import LEASE_SLACK_S


def run(args: argparse.Namespace) -> dict[str, Any]:
    ctx = Context.from_args(args)
    return provision(ctx, provider_name=args.provider, runner_label=args.runner_label)


def provision(ctx: Context, provider_name: str | None = None, runner_label: str | None = None) -> dict[str, Any]:
    spec = ctx.spec
    record = ctx.ensure_run()
    name = PROVIDERS.canonical(provider_name or spec.resources.provider)
    with recorded(ctx, "provision"):
        if record.lease_id:
            return _already(ctx, record)
        catalog_name = name if name in load_catalog(ctx.project_dir).providers else "local"
        instance_type, _ = load_catalog(ctx.project_dir).choose(
            catalog_name, spec.resources.gpu_type, spec.resources.gpu_count, spec.resources.instance_type
        )
        now = utcnow()
        ttl = spec.resources.max_duration + LEASE_SLACK_S
        expires = ttl_expiry(now, ttl)
        lease_id = f"lease-{secrets.token_hex(6)}"
        tags = {
            TAG_RUN_ID: record.run_id,
            TAG_LEASE_ID: lease_id,
            TAG_EXPIRES_AT: expires.isoformat(timespec="seconds"),
            TAG_MANAGED: "true",
            "gpuline:repo": record.lineage.repo[:200],
            "gpuline:team": record.team,
            "gpuline:tier": record.tier,
        }
        region = spec.resources.region or ""
        # Lease before launch: a crash between here and the provider's answer leaves a record the
        # reaper can reconcile against the tags the machine carries.
        ctx.ledger.record_lease(
            LeaseRecord(
                lease_id=lease_id,
                run_id=record.run_id,
                provider=name,
                lane=spec.resources.lane,
                region=region,
                instance_type=instance_type,
                requested_at=now,
                expires_at=expires,
            )
        )

        def leased(r: RunRecord) -> None:
            r.lease_id, r.ttl_seconds, r.expires_at = lease_id, ttl, expires
            r.provider, r.instance_type, r.lane, r.region = name, instance_type, spec.resources.lane, region

        ctx.ledger.update_run(record.run_id, leased)
        ctx.event("lease.recorded", lease_id=lease_id, expires_at=expires.isoformat(), ttl_s=ttl, tags=tags)
        provider = open_provider(name, ctx.project_dir, spec.resources.options)
        request = LeaseRequest(
            run_id=record.run_id,
            lease_id=lease_id,
            spec=spec,
            instance_type=instance_type,
            lane=spec.resources.lane,
            region=region,
            ttl_seconds=ttl,
            expires_at=expires,
            tags=tags,
            project_dir=ctx.project_dir,
            runner=_runner(ctx, runner_label, record.run_id),
        )
        machine = provider.provision(request)
        ctx.ledger.update_lease(lease_id, instance_id=machine.instance_id)

        def started(r: RunRecord) -> None:
            r.instance_id, r.runner_label = machine.instance_id, machine.runner_label
            r.instance_type = machine.instance_type or r.instance_type
            r.lane = machine.lane or r.lane
            r.region = machine.region or r.region
            r.times.provisioned = machine.launched_at or utcnow()

        record = ctx.ledger.update_run(record.run_id, started)
        ctx.event(
            "machine.provisioned",
            instance_id=machine.instance_id,
            failures=machine.failures,
            instance_type=record.instance_type,
            lane=record.lane,
        )
    return _result(record)


def _runner(ctx: Context, label: str | None, run_id: str) -> Any:
    """A single-use GitHub runner registration, when a label is asked for and a token is at hand."""
    if not label:
        return None
    from gpuline.providers.base import RunnerRequest

    try:
        from gpuline.github import create_jit_runner  # type: ignore[attr-defined]
    except ImportError:
        return RunnerRequest(label=label, jit_config="")
    jit = create_jit_runner(label=label, name=f"gpuline-{run_id}")
    gha.mask(jit)
    return RunnerRequest(label=label, jit_config=jit)


def _already(ctx: Context, record: RunRecord) -> dict[str, Any]:
    gha.info(f"run {record.run_id} already holds lease {record.lease_id}; not provisioning again")
    return _result(record)


def _result(record: RunRecord) -> dict[str, Any]:
    expires = record.expires_at.isoformat(timespec="seconds") if record.expires_at else ""
    values = {
        "run-id": record.run_id,
        "runner-label": record.runner_label or "",
        "lease-id": record.lease_id or "",
        "instance-id": record.instance_id or "",
        "expires-at": expires,
    }
    outputs(values)
    gha.info(
        f"provisioned {record.instance_id} ({record.provider}, {record.instance_type}, {record.lane}); "
        f"lease {record.lease_id} expires {expires}"
    )
    gha.append_summary("### gpuline provision\n\n" + table([(k, f"`{v}`") for k, v in values.items()], ("", "")))
    return {
        "run_id": record.run_id,
        "lease_id": record.lease_id,
        "instance_id": record.instance_id,
        "runner_label": record.runner_label,
        "expires_at": expires,
        "provider": record.provider,
        "instance_type": record.instance_type,
    }
