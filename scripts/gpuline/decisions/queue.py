"""How long a run will wait for a machine in its lane, from the leases held now.

A lane's capacity comes from the policy (``lanes: {spot: {capacity: 4}}``). When the lane is full,
the run starts when enough of the active leases end: each is expected to end at its start plus the
lease time its own cost estimate predicted, and at the latest at its TTL. Both waits are reported,
so a person sees the likely case and the worst one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from gpuline.errors import GpulineError, PolicyDenied
from gpuline.runs import LeaseRecord, Ledger, utcnow
from gpuline.spec import Policy


@dataclass
class QueueEstimate:
    lane: str
    capacity: int | None
    """None when the policy sets no capacity for the lane: nothing to wait for."""
    active: int
    ahead: int
    """Active leases that must end before this run can start (0 when there is room)."""
    expected_wait_s: float
    worst_wait_s: float
    note: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        if self.capacity is None:
            return f"{self.lane} lane: no capacity limit set, starts at once"
        if self.ahead == 0:
            return f"{self.lane} lane: {self.active}/{self.capacity} machines busy, starts at once"
        return (
            f"{self.lane} lane full ({self.active}/{self.capacity}): expected wait ~{_minutes(self.expected_wait_s)}, "
            f"at most {_minutes(self.worst_wait_s)} (when the TTLs end)"
        )


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"


def lease_ends(ledger: Ledger, lease: LeaseRecord) -> tuple[datetime, datetime, bool]:
    """(expected end, latest end, whether the expected end came from the run's own estimate)."""
    try:
        record = ledger.get_run(lease.run_id)
    except GpulineError:
        record = None
    seconds = record.estimated_seconds if record is not None else None
    if seconds is None:
        return lease.expires_at, lease.expires_at, False
    start = (record.times.provisioned if record is not None else None) or lease.requested_at
    expected = min(start + timedelta(seconds=seconds), lease.expires_at)
    return expected, lease.expires_at, True


def estimate_wait(ledger: Ledger, policy: Policy, lane: str, now: datetime | None = None) -> QueueEstimate:
    now = now or utcnow()
    lane_policy = next((rule for name, rule in policy.lanes.items() if name == lane), None)
    active = [lease for lease in ledger.leases(active_only=True) if lease.lane == lane and lease.expires_at > now]
    if lane_policy is None:
        return QueueEstimate(lane, None, len(active), 0, 0.0, 0.0, "the policy sets no capacity for this lane")
    capacity = lane_policy.capacity
    if capacity == 0:
        # A closed lane: no machine may ever start in it, so there is no wait to estimate.
        raise PolicyDenied(
            f"the policy closes the {lane} lane (lanes.{lane}.capacity: 0): no machine may run in it",
            hint=f"use another lane (resources.lane) or raise lanes.{lane}.capacity in policy.yml",
        )
    ahead = len(active) - capacity + 1
    if ahead <= 0:
        return QueueEstimate(lane, capacity, len(active), 0, 0.0, 0.0, "a machine is free")
    ends = [lease_ends(ledger, lease) for lease in active]
    expected = sorted(max(0.0, (e - now).total_seconds()) for e, _, _ in ends)
    worst = sorted(max(0.0, (w - now).total_seconds()) for _, w, _ in ends)
    known = sum(1 for _, _, k in ends if k)
    note = f"{known} of {len(active)} active leases have an estimate; the others are assumed to run to their TTL"
    # Past its expected end but still active: it may end any moment, or only at its TTL; the
    # expected wait counts it as ending now, the worst case at its TTL.
    return QueueEstimate(lane, capacity, len(active), ahead, expected[ahead - 1], worst[ahead - 1], note)
