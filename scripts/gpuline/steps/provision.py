"""provision: decide the lease (id, tags, TTL), record it, and only then ask the provider for a machine.

The order is the whole point: a crash at any moment after ``record_lease`` leaves a ledger entry and
(once the provider has answered) a tagged machine, which teardown or the reaper can match up. The
lease also names its *holder*, the process or workflow run that will tear it down, so the reaper can
tell an abandoned lease from a live one before its TTL.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import socket
from datetime import datetime
from pathlib import Path
from typing import Any

from gpuline import gha
from gpuline.context import Context
from gpuline.decisions.pricing import load_catalog
from gpuline.errors import InputError
from gpuline.providers import PROVIDERS, open_provider
from gpuline.providers.base import (
    TAG_EXPIRES_AT,
    TAG_LEASE_ID,
    TAG_MANAGED,
    TAG_RUN_ID,
    LeaseRequest,
    Machine,
    RunnerRequest,
)
from gpuline.providers.failover import CapacityExhausted
from gpuline.providers.testhooks import pause_at
from gpuline.runs import Cap, LeaseRecord, RunRecord, ttl_expiry, utcnow
from gpuline.spec import Spec
from gpuline.steps.common import outputs, recorded, table
from gpuline.steps.cost_estimate import LEASE_SLACK_S

# Where a JIT runner registers when GITHUB_REPOSITORY is not the right scope (an organization).
RUNNER_SCOPE_ENV = "GPULINE_RUNNER_SCOPE"


def run(args: argparse.Namespace) -> dict[str, Any]:
    ctx = Context.from_args(args)
    return provision(ctx, provider_name=args.provider, runner_label=args.runner_label)


def provision(
    ctx: Context,
    provider_name: str | None = None,
    runner_label: str | None = None,
    *,
    process_bound: bool = False,
) -> dict[str, Any]:
    """Lease, then launch. ``process_bound``: this process will also tear the lease down (``gpuline
    run`` passes True), so its death means the lease is abandoned."""
    spec = ctx.spec
    record = ctx.ensure_run()
    name = PROVIDERS.canonical(provider_name or spec.resources.provider)
    with recorded(ctx, "provision"):
        if record.lease_id:
            return _already(ctx, record)
        catalog = load_catalog(ctx.project_dir)
        catalog_name = name if name in catalog.providers else "local"
        instance_type, _ = catalog.choose(
            catalog_name,
            spec.resources.gpu_type,
            spec.resources.gpu_count,
            spec.resources.instance_type,
            spec.resources.lane,
        )
        now = utcnow()
        ttl = spec.resources.max_duration + LEASE_SLACK_S
        expires = ttl_expiry(now, ttl)
        lease_id = f"lease-{secrets.token_hex(6)}"
        tags = lease_tags(record, lease_id, expires.isoformat(timespec="seconds"))
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
        _hold_quota_until(ctx, record.run_id, expires)
        ctx.event(
            "lease.recorded",
            lease_id=lease_id,
            expires_at=expires.isoformat(),
            ttl_s=ttl,
            tags=tags,
            holder=holder(process_bound),
        )
        pause_at("lease-recorded")
        provider = open_provider(name, ctx.project_dir, _options(ctx, spec))
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
            runner=_runner(ctx, name, provider, runner_label, record.run_id),
        )
        try:
            machine = provider.provision(request)
        except BaseException as exc:
            if isinstance(exc, CapacityExhausted):
                ctx.event("machine.failed", failures=[f.as_dict() for f in exc.failures])
            _unregister_runner(ctx, record.run_id)
            raise
        pause_at("launched")
        record = _record_machine(ctx, record, lease_id, machine, leased_at=now)
    return _result(record)


def lease_tags(record: RunRecord, lease_id: str, expires_iso: str) -> dict[str, str]:
    return {
        TAG_RUN_ID: record.run_id,
        TAG_LEASE_ID: lease_id,
        TAG_EXPIRES_AT: expires_iso,
        TAG_MANAGED: "true",
        "gpuline:repo": record.lineage.repo[:200],
        "gpuline:team": record.team,
        "gpuline:tier": record.tier,
    }


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


def _record_machine(
    ctx: Context, record: RunRecord, lease_id: str, machine: Machine, *, leased_at: datetime
) -> RunRecord:
    ctx.ledger.update_lease(lease_id, instance_id=machine.instance_id)

    def started(r: RunRecord) -> None:
        r.instance_id, r.runner_label = machine.instance_id, machine.runner_label
        r.instance_type = machine.instance_type or r.instance_type
        r.lane = machine.lane or r.lane
        r.region = machine.region or r.region
        # Clouds report launch times to the second: never let the machine appear before its lease.
        r.times.provisioned = max(machine.launched_at or utcnow(), leased_at)

    record = ctx.ledger.update_run(record.run_id, started)
    provisioned = record.times.provisioned or utcnow()
    waited = None
    if record.times.requested:
        waited = round((provisioned - record.times.requested).total_seconds(), 3)
    ctx.event(
        "machine.provisioned",
        instance_id=machine.instance_id,
        failures=machine.failures,
        instance_type=record.instance_type,
        lane=record.lane,
        region=record.region,
        requested_to_provisioned_s=waited,
        launch_s=round((provisioned - leased_at).total_seconds(), 3),
    )
    for failure in machine.failures:
        gha.info(f"failed over: {failure.get('instance_type')} {failure.get('lane')} {failure.get('code')}")
    return record


# ---------------------------------------------------------------- the lease's holder


def holder(process_bound: bool) -> dict[str, Any]:
    """Who will end this lease: this process (``gpuline run``) and/or this workflow run."""
    found: dict[str, Any] = {}
    if process_bound:
        found["process"] = {
            "host": socket.gethostname(),
            "boot_id": boot_id(),
            "pid": os.getpid(),
            "started": process_start(os.getpid()),
        }
    env = os.environ
    if env.get("GITHUB_RUN_ID") and env.get("GITHUB_REPOSITORY"):
        found["workflow"] = {
            "repo": env["GITHUB_REPOSITORY"],
            "run_id": env["GITHUB_RUN_ID"],
            "attempt": env.get("GITHUB_RUN_ATTEMPT", "1"),
        }
    return found


def boot_id() -> str:
    with contextlib.suppress(OSError):
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return ""


def process_start(pid: int) -> str:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), which tells a
    reused pid from the original; "" where /proc does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    # The command name (field 2) may contain spaces and parentheses: split after its closing one.
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else ""


# ---------------------------------------------------------------- the JIT runner


def _runner(ctx: Context, provider_name: str, provider: Any, label: str | None, run_id: str) -> RunnerRequest | None:
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

    scope = os.environ.get(RUNNER_SCOPE_ENV) or os.environ.get("GITHUB_REPOSITORY")
    if not scope:
        raise InputError(
            "a runner label was given but no repository to register the runner with",
            hint=f"set GITHUB_REPOSITORY (set in Actions) or {RUNNER_SCOPE_ENV}=ORG",
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


def _hold_quota_until(ctx: Context, run_id: str, expires: datetime) -> None:
    """Make the run's budget hold expire with its lease, not with the estimate's guess of when it would
    start, so the reaper never frees the budget of a machine that is still allowed to run."""
    held = next((r for r in ctx.ledger.reservations(state="held") if r.run_id == run_id), None)
    if held is not None and held.expires_at != expires:
        # Re-reserving replaces the same amounts; no cap, since the budget check already admitted them.
        ctx.ledger.reserve(held.model_copy(update={"expires_at": expires}), Cap(), None)


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
    rows = [(k, f"`{v}`") for k, v in values.items()]
    if record.times.requested and record.times.provisioned:
        waited = (record.times.provisioned - record.times.requested).total_seconds()
        rows.append(("requested → provisioned", f"{waited:.1f} s"))
    gha.append_summary("### gpuline provision\n\n" + table(rows, ("", "")))
    return {
        "run_id": record.run_id,
        "lease_id": record.lease_id,
        "instance_id": record.instance_id,
        "runner_label": record.runner_label,
        "expires_at": expires,
        "provider": record.provider,
        "instance_type": record.instance_type,
        "lane": record.lane,
    }
