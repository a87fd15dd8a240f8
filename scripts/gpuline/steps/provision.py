"""provision: decide the lease (id, tags, TTL), record it, and only then ask the provider for a machine.

The order is the whole point (see :mod:`gpuline.lease.record`). The lease also names its *holder*,
the process or workflow run that will tear it down, so the reaper can tell an abandoned lease from a
live one before its TTL (:mod:`gpuline.lease.holder`).
"""

from __future__ import annotations

import argparse
import contextlib
from typing import Any

from gpuline import gha
from gpuline.context import Context
from gpuline.decisions import quota
from gpuline.decisions.pricing import load_catalog
from gpuline.errors import InputError
from gpuline.inputs import runner_scope
from gpuline.lease.holder import holder
from gpuline.lease.machines import open_masked, report_failures, report_machine
from gpuline.lease.record import Lease, record_lease, record_machine
from gpuline.providers import PROVIDERS
from gpuline.providers.base import LeaseRequest, Provider, RunnerRequest
from gpuline.providers.failover import CapacityExhausted
from gpuline.providers.testhooks import pause_at
from gpuline.results import ProvisionResult
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
    spec = ctx.spec
    record = ctx.ensure_run()
    name = PROVIDERS.canonical(provider_name or spec.resources.provider)
    with recorded(ctx, "provision"):
        if record.lease_id:
            gha.info(f"run {record.run_id} already holds lease {record.lease_id}; not provisioning again")
            return ProvisionResult(record=record, already=True)
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
        provider = open_masked(name, ctx.project_dir, _options(ctx, spec))
        request = _launch_request(ctx, record, spec, lease, _runner(ctx, name, provider, runner_label, record.run_id))
        try:
            machine = provider.provision(request)
        except BaseException as exc:
            if isinstance(exc, CapacityExhausted):
                failures = [f.as_dict() for f in exc.failures]
                report_failures(name, failures)
                ctx.event("machine.failed", failures=failures)
            _unregister_runner(ctx, record.run_id)
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


# ---------------------------------------------------------------- the JIT runner


def _runner(
    ctx: Context, provider_name: str, provider: Provider, label: str | None, run_id: str
) -> RunnerRequest | None:
    """A single-use GitHub runner registration, when a runner label is asked for.

    The label the job will ``runs-on`` is unique to the run (``gpuline-<run id>``), so no other
    queued job can land on this machine; the label passed in is added beside it.
    """
    if not label:
        return None
    if provider_name == "local" or not getattr(provider, "wants_runner", True):
        # The local provider's "runner" is the machine gpuline runs on; a pod that trains needs none.
        return RunnerRequest(label=label, jit_config="")
    from gpuline import github

    scope = runner_scope(ctx.inputs)
    if not scope:
        raise InputError(
            "a runner label was given but no repository to register the runner with",
            hint="set GITHUB_REPOSITORY (set in Actions) or GPULINE_RUNNER_SCOPE=ORG",
        )
    if not github.token_from_env():
        raise InputError(
            "registering a just-in-time runner needs a GitHub token",
            hint="set GPULINE_GITHUB_TOKEN to a token with Administration: write on the repository",
        )
    unique = f"gpuline-{run_id}"
    labels = [unique] + ([label] if label not in (unique, "auto") else [])
    jit = github.create_jit_runner(scope, unique, labels)
    gha.mask(jit.encoded_jit_config)
    ctx.event("runner.registered", runner_id=jit.runner_id, name=jit.name, labels=labels, scope=scope)
    return RunnerRequest(label=unique, jit_config=jit.encoded_jit_config)


def _unregister_runner(ctx: Context, run_id: str) -> None:
    """No machine will ever pick up this run's runner registration: delete it (best effort; the
    reaper deletes what is left)."""
    registered = [e.data for e in ctx.ledger.events(run_id) if e.kind == "runner.registered"]
    if not registered:
        return
    from gpuline import github

    for runner in registered:
        with contextlib.suppress(Exception):
            github.delete_runner(str(runner["scope"]), int(runner["runner_id"]))
