"""Who holds a lease: the process (``gpuline run``) and/or the workflow run that will tear it down,
and whether that holder is certainly gone, so the reaper can tell an abandoned lease from a live one
before its TTL."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gpuline.errors import GpulineError
from gpuline.runs import Ledger
from gpuline.training.process import process_start_ticks


def holder(process_bound: bool, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Who will end this lease: this process (when it will also tear down) and/or this workflow run."""
    env = os.environ if env is None else env
    found: dict[str, Any] = {}
    if process_bound:
        found["process"] = {
            "host": socket.gethostname(),
            "boot_id": boot_id(),
            "pid": os.getpid(),
            "started": process_start_ticks(os.getpid()) or "",
        }
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


def holder_gone(ledger: Ledger, run_id: str) -> str | None:
    """Why the process or workflow run that holds ``run_id``'s lease is certainly gone; None when it
    is alive or cannot be told (then only the TTL ends the lease)."""
    found: dict[str, Any] = {}
    with contextlib.suppress(GpulineError):
        for event in ledger.events(run_id):
            if event.kind == "lease.recorded":
                found = dict(event.data.get("holder") or {})
    process = found.get("process")
    if isinstance(process, dict) and process.get("host") == socket.gethostname():
        if process.get("boot_id") and process.get("boot_id") != boot_id():
            return f"its orchestrator ran on {process['host']} before a reboot"
        pid = int(process.get("pid", 0))
        if pid and not _alive(pid, str(process.get("started", ""))):
            return f"its orchestrator (pid {pid} on {process['host']}) exited without teardown"
        return None
    workflow = found.get("workflow")
    if isinstance(workflow, dict):
        return _workflow_finished(workflow)
    return None


def _alive(pid: int, started: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    # Same pid, different start time: the pid was reused by an unrelated process.
    return not (started and (process_start_ticks(pid) or "") not in ("", started))


def _workflow_finished(workflow: dict[str, Any]) -> str | None:
    from gpuline import github

    if not github.token_from_env():
        return None
    path = f"/repos/{workflow['repo']}/actions/runs/{int(workflow['run_id'])}"
    try:
        _, found = github.client().requester.requestJsonAndCheck("GET", path)
    except Exception:  # unknown is not gone: leave it to the TTL
        return None
    if isinstance(found, dict) and found.get("status") == "completed":
        return f"its workflow run {workflow['run_id']} is completed ({found.get('conclusion')})"
    return None
