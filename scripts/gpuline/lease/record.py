"""Lease before launch: decide the lease (id, tags, TTL), record it, and only then is a machine asked for.

A crash at any moment after :func:`record_lease` leaves a ledger entry and (once the provider has
answered) a tagged machine, which teardown or the reaper can match up.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from gpuline.providers.base import TAG_EXPIRES_AT, TAG_LEASE_ID, TAG_MANAGED, TAG_RUN_ID, Machine
from gpuline.runs import LeaseRecord, Ledger, RunRecord, lease_ttl_s, ttl_expiry, utcnow


@dataclass(frozen=True)
class Lease:
    """A lease as recorded: what the provider is then asked to launch under."""

    lease_id: str
    provider: str
    instance_type: str
    lane: str
    region: str
    ttl_s: int
    leased_at: datetime
    expires_at: datetime
    tags: dict[str, str]


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


def record_lease(
    ledger: Ledger,
    record: RunRecord,
    *,
    provider: str,
    instance_type: str,
    lane: str,
    region: str,
    max_duration_s: int,
    holder: dict[str, Any],
) -> Lease:
    """Record the lease in the ledger and on the run record, before any provider is called."""
    now = utcnow()
    ttl = lease_ttl_s(max_duration_s)
    expires = ttl_expiry(now, ttl)
    lease_id = f"lease-{secrets.token_hex(6)}"
    tags = lease_tags(record, lease_id, expires.isoformat(timespec="seconds"))
    lease = Lease(lease_id, provider, instance_type, lane, region, ttl, now, expires, tags)
    ledger.record_lease(
        LeaseRecord(
            lease_id=lease_id,
            run_id=record.run_id,
            provider=provider,
            lane=lane,
            region=region,
            instance_type=instance_type,
            requested_at=now,
            expires_at=expires,
        )
    )

    def leased(r: RunRecord) -> None:
        r.lease_id, r.ttl_seconds, r.expires_at = lease_id, ttl, expires
        r.provider, r.instance_type, r.lane, r.region = provider, instance_type, lane, region

    ledger.update_run(record.run_id, leased)
    ledger.append_event(
        record.run_id,
        "lease.recorded",
        {"lease_id": lease_id, "expires_at": expires.isoformat(), "ttl_s": ttl, "tags": lease.tags, "holder": holder},
    )
    return lease


def record_machine(ledger: Ledger, record: RunRecord, lease: Lease, machine: Machine) -> RunRecord:
    """The provider answered: note the machine on the lease and the run record."""
    ledger.update_lease(lease.lease_id, instance_id=machine.instance_id)

    def started(r: RunRecord) -> None:
        r.instance_id, r.runner_label = machine.instance_id, machine.runner_label
        r.instance_type = machine.instance_type or r.instance_type
        r.lane = machine.lane or r.lane
        r.region = machine.region or r.region
        # Clouds report launch times to the second: never let the machine appear before its lease.
        r.times.provisioned = max(machine.launched_at or utcnow(), lease.leased_at)

    record = ledger.update_run(record.run_id, started)
    provisioned = record.times.provisioned or utcnow()
    waited = None
    if record.times.requested:
        waited = round((provisioned - record.times.requested).total_seconds(), 3)
    ledger.append_event(
        record.run_id,
        "machine.provisioned",
        {
            "instance_id": machine.instance_id,
            "failures": machine.failures,
            "instance_type": record.instance_type,
            "lane": record.lane,
            "region": record.region,
            "requested_to_provisioned_s": waited,
            "launch_s": round((provisioned - lease.leased_at).total_seconds(), 3),
        },
    )
    return record
