"""The audit of a stage change, as the promote and rollback steps build it: who, why, from where."""

from __future__ import annotations

import getpass
import os
from collections.abc import Mapping, Sequence

from gpuline.registry.base import Audit
from gpuline.runs import GateVerdict


def actor(env: Mapping[str, str] | None = None) -> str:
    """``GITHUB_ACTOR`` inside Actions, else the local user."""
    env = os.environ if env is None else env
    found = env.get("GITHUB_ACTOR") or env.get("USER") or env.get("USERNAME")
    if found:
        return found
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no login name (a container without an /etc/passwd entry)
        return "unknown"


def workflow_run_url(env: Mapping[str, str] | None = None) -> str:
    """The URL of the workflow run this process is part of ("" outside Actions)."""
    env = os.environ if env is None else env
    repo, run = env.get("GITHUB_REPOSITORY"), env.get("GITHUB_RUN_ID")
    if not (repo and run):
        return ""
    server = env.get("GITHUB_SERVER_URL") or "https://github.com"
    return f"{server}/{repo}/actions/runs/{run}"


def gate_reason(verdicts: Sequence[GateVerdict]) -> str:
    """Why a promotion was allowed, in one line: the verdict of each gate."""
    if not verdicts:
        return "no eval gates configured"
    parts = []
    for v in verdicts:
        value = "—" if v.value is None else f"{v.value:.4g}"
        parts.append(f"{v.gate}={value} {'pass' if v.passed else 'FAIL'}")
    verdict = "passed" if all(v.passed for v in verdicts) else "did not all pass"
    return f"gates {verdict}: " + ", ".join(parts)


def for_promotion(run_id: str, verdicts: Sequence[GateVerdict], run_url: str = "") -> Audit:
    return Audit(
        actor=actor(),
        reason=gate_reason(verdicts),
        run_id=run_id,
        workflow_run_url=workflow_run_url() or run_url,
        gates=list(verdicts),
    )


def for_rollback(reason: str, run_id: str = "") -> Audit:
    return Audit(actor=actor(), reason=reason, run_id=run_id, workflow_run_url=workflow_run_url())
