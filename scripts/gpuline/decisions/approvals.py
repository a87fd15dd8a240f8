"""Approvals: the PR label or the environment review, named in policy.yml, that overrides a deny."""

from __future__ import annotations

from collections.abc import Iterable

from gpuline.spec import Policy


def approval_how(policy: Policy) -> str:
    """How to ask for an exception under ``policy`` ("" when policy.yml names no approval)."""
    ways = []
    if policy.approval.label:
        ways.append(f"add the PR label '{policy.approval.label}'")
    if policy.approval.environment:
        ways.append(f"approve the '{policy.approval.environment}' environment")
    return " or ".join(ways)


def approvals_from(policy: Policy, labels: Iterable[str], approved_environment: str | None) -> frozenset[str]:
    """The approvals that policy.yml accepts among the PR's labels and the environment the job ran in."""
    found: set[str] = set()
    wanted_label = policy.approval.label
    if wanted_label and wanted_label in set(labels):
        found.add(f"label:{wanted_label}")
    wanted_env = policy.approval.environment
    if wanted_env and approved_environment == wanted_env:
        found.add(f"environment:{wanted_env}")
    return frozenset(found)


def first_approval(approvals: Iterable[str]) -> str | None:
    """The approval a decision names (the first in sorted order), or None when there is none."""
    return next(iter(sorted(approvals)), None)
