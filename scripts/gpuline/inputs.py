"""The orchestrator's inputs, read from the environment once, in one place.

An action step maps its ``with:`` inputs to ``GPULINE_*`` variables, and a workflow may set the same
variables at its own level; a shell on a laptop sets a few by hand. Every one of them is read here and
nowhere else, and an empty value means "not given", so an action input left empty never hides a value
set by the workflow (``env:`` of a step always sets its variables, empty ones included). Command-line
flags win over these (see :mod:`gpuline.cli`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields

from gpuline import contract as c
from gpuline.errors import InputError

# Where a token for GitHub's API is looked for, in this order. GPULINE_GITHUB_TOKEN lets a workflow
# give gpuline a token with more rights (to create runners) without changing what other tools see.
TOKEN_NAMES = (c.GITHUB_TOKEN, "GITHUB_TOKEN", "GH_TOKEN")


@dataclass(frozen=True)
class Inputs:
    """Every input, as text; ``None`` when unset or empty."""

    config: str | None = None
    policy: str | None = None
    policy_ref: str | None = None
    run_id: str | None = None
    tier: str | None = None
    provider: str | None = None
    runner_label: str | None = None
    runner_scope: str | None = None
    stage: str | None = None
    model: str | None = None
    pr_labels: str | None = None
    pr_number: str | None = None
    base_ref: str | None = None
    boot_grace: str | None = None
    ledger: str | None = None
    registry: str | None = None
    storage: str | None = None
    image_digest: str | None = None
    python: str | None = None
    github_retries: str | None = None
    comment_key: str | None = None
    approved_environment: str | None = None
    estimate_tier: str | None = None
    rollback_reason: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Inputs:
        env = os.environ if env is None else env
        values = {f.name: given(env, c.PREFIX + f.name.upper()) for f in fields(cls)}
        return cls(**values)

    def retries(self, default: int) -> int:
        return whole_number(c.GITHUB_RETRIES, self.github_retries, default)


def given(env: Mapping[str, str], name: str) -> str | None:
    """The variable's value, or None where it is unset or only white space."""
    value = env.get(name, "").strip()
    return value or None


def github_token(env: Mapping[str, str] | None = None) -> str | None:
    """The first token set among :data:`TOKEN_NAMES`."""
    env = os.environ if env is None else env
    for name in TOKEN_NAMES:
        value = given(env, name)
        if value:
            return value
    return None


def whole_number(name: str, value: str | None, default: int) -> int:
    if value is None:
        return default
    if not value.isdigit():
        raise InputError(f"{name} must be a whole number (got {value!r})", hint=f"unset {name} or give e.g. 3")
    return int(value)


def runner_scope(inputs: Inputs, env: Mapping[str, str] | None = None) -> str | None:
    """Where a just-in-time runner registers: GPULINE_RUNNER_SCOPE (an organization, or OWNER/REPO),
    else the repository the workflow runs in."""
    env = os.environ if env is None else env
    return inputs.runner_scope or given(env, "GITHUB_REPOSITORY")
