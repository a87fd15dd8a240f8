"""Who holds a lease: the process (``gpuline run``) and/or the workflow run that will tear it down,
and whether that holder is certainly gone, so the reaper can tell an abandoned lease from a live one
before its TTL."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from gpuline.errors import GpulineError
from gpuline.runs import Ledger
from gpuline.training.process import process_start_ticks

# The pid of a process that will tear down every run it works on (`gpuline run`), while it does.
_bound_pid: int | None = None


@contextlib.contextmanager
def bound_to_this_process() -> Iterator[None]:
    """While inside, this process holds the runs it works on: it tears them down itself, so its death
    means they are abandoned (`gpuline run` from its first step, not only from provision)."""
    global _bound_pid
    previous, _bound_pid = _bound_pid, os.getpid()
    try:
        yield
    finally:
        _bound_pid = previous


def current() -> dict[str, Any]:
    """The holder of what this process starts now (each step's start records it, as a lease does)."""
    return holder(_bound_pid == os.getpid())


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


def last_holder(ledger: Ledger, run_id: str) -> dict[str, Any]:
    """The holder the run's latest step recorded (a step's start or its lease): whoever acted last."""
    found: dict[str, Any] = {}
    with contextlib.suppress(GpulineError):
        for event in ledger.events(run_id):
            if isinstance(event.data.get("holder"), dict):
                found = dict(event.data["holder"])
    return found


def holder_gone(ledger: Ledger, run_id: str) -> str | None:
    """Why the process or workflow run that holds ``run_id`` (its lease, or its steps before one) is
    certainly gone; None when it is alive or cannot be told (then only the TTL ends the lease)."""
    found = last_holder(ledger, run_id)
    process = found.get("process")
    if isinstance(process, dict) and process.get("host") == socket.gethostname():
        return _process_gone(process)
    workflow = found.get("workflow")
    if isinstance(workflow, dict):
        return _workflow_finished(workflow)
    return None


def dead_here(ledger: Ledger, run_id: str) -> str | None:
    """Why the run's holder is a process of this host that is certainly gone; None otherwise. Unlike
    a workflow's status, seen from elsewhere and later, this is known at once and for sure."""
    process = last_holder(ledger, run_id).get("process")
    if isinstance(process, dict) and process.get("host") == socket.gethostname():
        return _process_gone(process)
    return None


def _process_gone(process: dict[str, Any]) -> str | None:
    if process.get("boot_id") and process.get("boot_id") != boot_id():
        return f"its orchestrator ran on {process['host']} before a reboot"
    pid = int(process.get("pid", 0))
    if pid and not _alive(pid, str(process.get("started", ""))):
        return f"its orchestrator (pid {pid} on {process['host']}) exited without teardown"
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
