"""The local provider: the job runs on this machine. Nothing is bought, but the lease is real.

A lease file per machine under ``.gpuline/local-leases`` plays the part of the cloud's instance list,
so teardown, status and the reaper treat a laptop run exactly like a cloud one.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

from gpuline.errors import NotFoundError
from gpuline.providers.base import TAG_MANAGED, LeaseRequest, Machine, still_running
from gpuline.runs import utcnow


class LocalProvider:
    name = "local"
    max_nodes = 64  # torchrun on this host, or one node of a run whose peers run the same command

    def __init__(self, project_dir: Path, options: dict[str, Any] | None = None) -> None:
        self.dir = project_dir / ".gpuline" / "local-leases"

    def secrets(self) -> list[str]:
        return []

    def _path(self, instance_id: str) -> Path:
        return self.dir / f"{instance_id}.json"

    def provision(self, request: LeaseRequest) -> Machine:
        self.dir.mkdir(parents=True, exist_ok=True)
        machine = Machine(
            instance_id=f"local-{request.lease_id}",
            provider=self.name,
            state="running",
            tags={**request.tags, TAG_MANAGED: "true"},
            launched_at=utcnow(),
            # On the local provider the "runner" is the machine the command runs on.
            runner_label=request.runner.label if request.runner else "self",
            address=socket.gethostname(),
            instance_type=request.instance_type,
            lane=request.lane,
            region="local",
        )
        self._write(machine)
        return machine

    def _write(self, machine: Machine) -> None:
        body = {
            "instance_id": machine.instance_id,
            "state": machine.state,
            "tags": machine.tags,
            "launched_at": machine.launched_at.isoformat() if machine.launched_at else None,
            "runner_label": machine.runner_label,
            "address": machine.address,
            "instance_type": machine.instance_type,
            "lane": machine.lane,
        }
        tmp = self._path(machine.instance_id).with_suffix(".tmp")
        tmp.write_text(json.dumps(body))
        os.replace(tmp, self._path(machine.instance_id))

    def describe(self, instance_id: str) -> Machine:
        path = self._path(instance_id)
        if not path.exists():
            raise NotFoundError(f"local machine {instance_id} is not known")
        body = json.loads(path.read_text())
        from datetime import datetime

        return Machine(
            instance_id=body["instance_id"],
            provider=self.name,
            state=body["state"],
            tags=body["tags"],
            launched_at=datetime.fromisoformat(body["launched_at"]) if body["launched_at"] else None,
            runner_label=body.get("runner_label"),
            address=body.get("address"),
            instance_type=body.get("instance_type", ""),
            lane=body.get("lane", ""),
            region="local",
        )

    def release(self, instance_id: str) -> bool:
        machine = still_running(self, instance_id)
        if machine is None:
            return False
        machine.state = "terminated"
        self._write(machine)
        return True

    def list_owned(self) -> list[Machine]:
        if not self.dir.exists():
            return []
        machines = [self.describe(p.stem) for p in sorted(self.dir.glob("*.json"))]
        return [m for m in machines if m.state != "terminated"]
