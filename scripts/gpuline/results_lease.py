"""The results of the steps that open and close a lease: ``provision`` (the machine and its runner
label) and ``teardown`` (what was released, and what the run used and cost)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gpuline.lease.runner import runs_on
from gpuline.results import StepResult
from gpuline.runs import RunRecord


@dataclass
class ProvisionResult(StepResult):
    record: RunRecord
    already: bool = False
    command: str = field(init=False, default="provision")

    @property
    def run_id(self) -> str:
        return self.record.run_id

    @property
    def expires_at(self) -> str:
        return self.record.expires_at.isoformat(timespec="seconds") if self.record.expires_at else ""

    def outputs(self) -> dict[str, object]:
        r = self.record
        return {
            "run-id": r.run_id,
            "runner-label": r.runner_label or "",
            "lease-id": r.lease_id or "",
            "instance-id": r.instance_id or "",
            "expires-at": self.expires_at,
            "runs-on": runs_on(r.provider, r.runner_label),
        }

    def to_json(self) -> dict[str, Any]:
        r = self.record
        return {
            "run_id": r.run_id,
            "lease_id": r.lease_id,
            "instance_id": r.instance_id,
            "runner_label": r.runner_label,
            "expires_at": self.expires_at,
            "provider": r.provider,
            "instance_type": r.instance_type,
            "lane": r.lane,
        }


@dataclass
class TeardownResult(StepResult):
    record: RunRecord
    machine_released: bool
    lease_released: bool
    runners_deleted: list[str]
    quota: str
    first_time: bool
    comment_path: str
    command: str = field(init=False, default="teardown")

    def outputs(self) -> dict[str, object]:
        r = self.record
        return {
            "actual-usd": f"{r.actual_usd or 0:.2f}",
            "gpu-seconds": f"{r.gpu_seconds:.0f}",
            "comment-path": self.comment_path,
        }

    def to_json(self) -> dict[str, Any]:
        r = self.record
        return {
            "run_id": r.run_id,
            "status": r.status,
            "machine_released": self.machine_released,
            "lease_released": self.lease_released,
            "runners_deleted": self.runners_deleted,
            "gpu_seconds": r.gpu_seconds,
            "phase_gpu_seconds": r.phase_gpu_seconds,
            "phase_seconds": r.phase_seconds,
            "queue_seconds": r.queue_seconds,
            "actual_usd": r.actual_usd,
            "billed_seconds": r.billed_seconds,
            "cost_source": r.cost_source,
            "quota": self.quota,
            "already_torn_down": not self.first_time,
        }
