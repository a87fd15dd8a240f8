"""The run record: the control plane's truth about one training run, and the ledger that keeps it.

A run record is created before any money is spent; every step appends events and fills in fields,
so a crash at any point leaves enough behind for teardown or the reaper to finish the job.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from gpuline.phases import Phase

RunStatus = Literal["created", "running", "succeeded", "failed", "refused"]
CostSource = Literal["provider", "catalog estimate"]


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_run_id(now: datetime | None = None) -> str:
    """Sortable by creation time and unique enough for many concurrent runs."""
    stamp = (now or utcnow()).strftime("%Y%m%d-%H%M%S")
    return f"run-{stamp}-{secrets.token_hex(3)}"


def period_key(when: datetime, period: str = "week") -> str:
    """The budget period a moment belongs to: ``2026-W48`` or ``2026-11``."""
    if period == "month":
        return when.strftime("%Y-%m")
    year, week, _ = when.isocalendar()
    return f"{year}-W{week:02d}"


class _Record(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Checkpoint(_Record):
    uri: str
    step: int
    sha256: str


class GateVerdict(_Record):
    gate: str
    passed: bool
    value: float | None = None
    threshold: str = ""
    baseline: float | None = None
    detail: str = ""


class Timestamps(_Record):
    requested: datetime | None = None
    provisioned: datetime | None = None
    runner_online: datetime | None = None
    first_step: datetime | None = None
    last_step: datetime | None = None
    admitted: datetime | None = None
    """On a cluster with a queue (Kueue): when the workload was admitted; the wait before is queue time."""
    pod_running: datetime | None = None
    """On a cluster: when the workload's first pod started running (the wait before it is queue time)."""
    pod_finished: datetime | None = None
    """On a cluster: when its last pod ended."""
    released: datetime | None = None


class Lineage(_Record):
    repo: str = ""
    commit: str = ""
    ref: str = ""
    workflow_run_url: str = ""
    actor: str = ""
    config_path: str = ""
    config_hash: str = ""
    image_digest: str = ""
    dataset_uri: str = ""
    dataset_sha256: str = ""


class Project(_Record):
    """The project a run belongs to: its repository (``owner/name``, empty when it cannot be told) and
    its gpuline.yml's path inside that repository (the absolute path when it is in none). A step
    acts only on runs of its own project, so a run reached through a shared ledger is never trained,
    gated or promoted into another project's registry."""

    repository: str = ""
    config: str = ""

    def same_as(self, other: Project) -> bool:
        if self.config != other.config:
            return False
        # One side unable to name its repository (a clone without a remote) is no mismatch by itself.
        if not (self.repository and other.repository):
            return True
        return self.repository.casefold() == other.repository.casefold()

    def describe(self) -> str:
        return f"{self.repository}:{self.config}" if self.repository else self.config


class RunRecord(_Record):
    run_id: str
    model: str
    team: str
    tier: str
    project: Project | None = None
    """Which project created the run; None on runs recorded before runs carried it (any project may act on those)."""
    status: RunStatus = "created"
    stage: str = "created"
    """The last step that finished (or the one that failed), so a person sees where it stopped."""
    error: str | None = None
    lineage: Lineage = Field(default_factory=Lineage)
    resolved_config: dict[str, Any] = Field(default_factory=dict)
    provider: str = ""
    instance_type: str = ""
    gpu_type: str = ""
    gpu_count: int = 0
    lane: str = ""
    region: str = ""
    lease_id: str | None = None
    instance_id: str | None = None
    runner_label: str | None = None
    ttl_seconds: int | None = None
    expires_at: datetime | None = None
    times: Timestamps = Field(default_factory=Timestamps)
    gpu_seconds: float = 0.0
    pod_seconds: float = 0.0
    """On a cluster: seconds the workload's pods ran, summed over pods; GPU-seconds and cost come from it."""
    idle_seconds: float = 0.0
    """The idle phase's GPU-seconds (``phases["idle"]``): paid for while nothing ran."""
    phase_seconds: dict[Phase, float] = Field(default_factory=dict)
    """Paid seconds of the lease per phase (:mod:`gpuline.phases`), per node: what an estimate of the
    phase compares with. Stamped at close; empty on a run not closed yet (or closed before phases)."""
    phase_gpu_seconds: dict[Phase, float] = Field(default_factory=dict)
    """The same in GPU-seconds (times the devices per node): they add up to ``gpu_seconds``."""
    queue_seconds: float = 0.0
    """Seconds a cluster's workload waited to run, never paid: Kueue's admission wait when it was
    measured, else the Job's creation to its first pod running (stamped at close)."""
    billed_seconds: float | None = None
    """Seconds per node the provider bills, after its increment and minimum (60 s on EC2, say)."""
    cost_source: CostSource | None = None
    """Where ``actual_usd``'s seconds come from: the provider's own times (EC2's launch and
    termination, the pods' start and finish), or the lease as gpuline held it ("catalog estimate")."""
    estimated_usd: float | None = None
    estimated_gpu_hours: float | None = None
    estimated_seconds: float | None = None
    """Seconds the lease is expected to be held (start-up + p50 training), from cost-estimate; queue waits use it."""
    actual_usd: float | None = None
    preemptions: int = 0
    restarts: int = 0
    smoke_step_s: float | None = None
    """Seconds per step measured by preflight's CPU smoke test (one input to the duration estimate)."""
    checkpoints: list[Checkpoint] = Field(default_factory=list)
    model_sha256: str = ""
    """sha256 of the manifest of the trained model's files (their checksums); empty: no model written."""
    metrics: dict[str, Any] = Field(default_factory=dict)
    evaluated_by: str = ""
    """Where ``metrics`` come from: empty for the training script's own, else how eval.command measured them."""
    gates: list[GateVerdict] = Field(default_factory=list)
    promoted_version: int | None = None
    promoted_stage: str | None = None
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class Event(_Record):
    run_id: str
    seq: int
    at: datetime
    kind: str
    data: dict[str, Any] = Field(default_factory=dict)


class Reservation(_Record):
    """Budget held for a run from estimate until settle/release; it expires with the lease's TTL."""

    run_id: str
    team: str
    period: str
    gpu_hours: float
    usd: float
    expires_at: datetime
    state: Literal["held", "settled", "released"] = "held"


class Usage(_Record):
    team: str
    period: str
    held_gpu_hours: float = 0.0
    held_usd: float = 0.0
    settled_gpu_hours: float = 0.0
    settled_usd: float = 0.0

    @property
    def gpu_hours(self) -> float:
        return self.held_gpu_hours + self.settled_gpu_hours

    @property
    def usd(self) -> float:
        return self.held_usd + self.settled_usd


class Cap(_Record):
    """Hard ceilings a reservation must fit under; None means unlimited."""

    gpu_hours: float | None = None
    usd: float | None = None


class LeaseRecord(_Record):
    """A machine we are paying for (or about to): recorded before the provider is called."""

    lease_id: str
    run_id: str
    provider: str
    instance_id: str | None = None
    lane: str = ""
    region: str = ""
    instance_type: str = ""
    requested_at: datetime = Field(default_factory=utcnow)
    expires_at: datetime
    released_at: datetime | None = None


class Ledger(Protocol):
    """Where run records, events, quota reservations and leases live. Every backend is atomic per call."""

    def create_run(self, record: RunRecord) -> None: ...
    def get_run(self, run_id: str) -> RunRecord: ...
    def update_run(self, run_id: str, change: Callable[[RunRecord], None]) -> RunRecord:
        """Read-modify-write under the backend's lock/condition, so concurrent steps never lose fields."""
        ...

    def list_runs(self, *, model: str | None = None, team: str | None = None, limit: int = 100) -> list[RunRecord]: ...
    def append_event(self, run_id: str, kind: str, data: dict[str, Any] | None = None) -> Event: ...
    def events(self, run_id: str) -> list[Event]: ...

    def reserve(self, reservation: Reservation, team_cap: Cap, org_cap: Cap | None = None) -> bool:
        """Hold budget iff held+settled+new stays within the caps; False (nothing held) otherwise.

        Re-reserving for a run that already holds budget replaces its amounts (idempotent)."""
        ...

    def settle(self, run_id: str, gpu_hours: float, usd: float) -> None:
        """Replace the run's reservation with what it actually cost."""
        ...

    def release(self, run_id: str) -> bool:
        """Drop a held reservation; False when there was none held (already settled or released)."""
        ...

    def usage(self, team: str, period: str) -> Usage: ...
    def reservations(self, *, state: str | None = None) -> list[Reservation]: ...

    def record_lease(self, lease: LeaseRecord) -> None: ...
    def update_lease(self, lease_id: str, *, instance_id: str | None = None) -> None: ...
    def release_lease(self, lease_id: str, at: datetime) -> bool:
        """Mark the lease released; False when it already was (teardown is idempotent)."""
        ...

    def leases(self, *, active_only: bool = False) -> list[LeaseRecord]: ...
    def close(self) -> None: ...


def ttl_expiry(start: datetime, seconds: float) -> datetime:
    return start + timedelta(seconds=seconds)


# Machines need time to boot and register before the training clock starts; a lease (and so the
# quota held for it) lives this much longer than the run's max_duration.
LEASE_SLACK_S = 15 * 60


def lease_ttl_s(max_duration_s: int) -> int:
    """How long a lease may live: the run's max_duration plus the boot and registration slack."""
    return max_duration_s + LEASE_SLACK_S


def model_prefix(run_id: str) -> str:
    """Where a run's trained model lives in the run's storage."""
    return f"runs/{run_id}/model"
