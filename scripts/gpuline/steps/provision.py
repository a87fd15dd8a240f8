"""provision: decide the lease (id, tags, TTL), record it, and only then ask the provider for a machine.

The order is the whole point (see :mod:`gpuline.lease.record`). The lease also names its *holder*,
the process or workflow run that will tear it down, so the reaper can tell an abandoned lease from a
live one before its TTL (:mod:`gpuline.lease.holder`).
"""

from __future__ import annotations

import argparse
from typing import Any

from gpuline import gha
from gpuline.context import Context
from gpuline.decisions import quota
from gpuline.decisions.pricing import load_catalog
from gpuline.lease import runner as runner_reg
from gpuline.lease.holder import holder
from gpuline.lease.machines import open_masked, report_failures, report_machine
from gpuline.lease.record import Lease, record_lease, record_machine
from gpuline.providers import PROVIDERS, check_nodes
from gpuline.providers.base import LeaseRequest, RunnerRequest
from gpuline.providers.failover import CapacityExhausted
from gpuline.providers.testhooks import pause_at
from gpuline.results_lease import ProvisionResult
from gpuline.runs import RunRecord
from gpuline.spec import Spec
from gpuline.stage import recorded


def run(ctx: Context, args: argparse.Namespace) -> ProvisionResult:
    return provision(ctx, provider_name=args.provider, runner_label=args.runner_label)


def provision(
    ctx: Context,
    provider_name: str | None = None,
    runner_label: str | None = None,
    *,
    process_bound: bool = False,
) -> ProvisionResult:
    """Lease, then launch. ``process_bound``: this process will also tear the lease down (``gpuline
    run`` passes True), so its death means the lease is abandoned."""
    record = ctx.ensure_run()  # first: an existing run is provisioned as its own tier
    spec = ctx.spec
    name = PROVIDERS.canonical(provider_name or spec.resources.provider)
    check_nodes(name, spec.resources.nodes)  # before the lease: nothing is bought for a spec it cannot launch
    with recorded(ctx, "provision"):
        if record.lease_id:
            gha.info(f"run {record.run_id} already holds lease {record.lease_id}; not provisioning again")
            return ProvisionResult(record=record, already=True)
        provider = open_masked(name, ctx.project_dir, _options(ctx, spec))
        runner_reg.check(name, provider, runner_label, ctx.inputs)  # a missing token fails before the lease
        # Lease before launch: a crash between here and the provider's answer leaves a record the
        # reaper can reconcile against the tags the machine carries.
        lease = record_lease(
            ctx.ledger,
            record,
            provider=name,
            instance_type=_instance_type(ctx, spec, name),
            lane=spec.resources.lane,
            region=spec.resources.region or "",
            max_duration_s=spec.resources.max_duration,
            holder=holder(process_bound),
        )
        quota.hold_until(ctx.ledger, record.run_id, lease.expires_at)
        pause_at("lease-recorded")
        runner = runner_reg.register(ctx.ledger, record.run_id, name, provider, runner_label, ctx.inputs)
        request = _launch_request(ctx, record, spec, lease, runner)
        try:
            machine = provider.provision(request)
        except BaseException as exc:
            if isinstance(exc, CapacityExhausted):
                failures = [f.as_dict() for f in exc.failures]
                report_failures(name, failures)
                ctx.event("machine.failed", failures=failures)
            runner_reg.unregister(ctx.ledger, record.run_id)
            raise
        pause_at("launched")
        record = record_machine(ctx.ledger, record, lease, machine)
        report_machine(name, machine)
    return ProvisionResult(record=record)


def _instance_type(ctx: Context, spec: Spec, provider: str) -> str:
    catalog = load_catalog(ctx.project_dir)
    instance_type, _ = catalog.choose(
        provider if provider in catalog.providers else "local",
        spec.resources.gpu_type,
        spec.resources.gpu_count,
        spec.resources.instance_type,
        spec.resources.lane,
    )
    return instance_type


def _launch_request(
    ctx: Context, record: RunRecord, spec: Spec, lease: Lease, runner: RunnerRequest | None
) -> LeaseRequest:
    return LeaseRequest(
        run_id=record.run_id,
        lease_id=lease.lease_id,
        spec=spec,
        instance_type=lease.instance_type,
        lane=lease.lane,
        region=lease.region,
        ttl_seconds=lease.ttl_s,
        expires_at=lease.expires_at,
        tags=lease.tags,
        project_dir=ctx.project_dir,
        runner=runner,
    )


def _options(ctx: Context, spec: Spec) -> dict[str, Any]:
    """The provider's options, with what policy.yml forbids taken out: an on-demand fallback is only
    allowed when the tier's policy allows the on-demand lane."""
    options = dict(spec.resources.options)
    if options.get("on_demand_fallback"):
        tier_policy = ctx.policy.tiers.get(ctx.tier)  # type: ignore[call-overload]
        allowed = tier_policy.allowed_lanes if tier_policy is not None else None
        if allowed is not None and "on-demand" not in allowed:
            gha.info(f"policy for {ctx.tier} allows only {', '.join(allowed)}; no on-demand fallback")
            options["on_demand_fallback"] = False
    return options
