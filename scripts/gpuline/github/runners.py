"""Just-in-time self-hosted runners: create one for a job, list them, delete them."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gpuline import gha
from gpuline.errors import InputError
from gpuline.github.api import client, github_errors, status_of, translate_error

if TYPE_CHECKING:  # pragma: no cover - typing only
    from github import Github

RUNNER_PERMISSION_HINT = (
    "creating or deleting self-hosted runners needs a token with 'Administration: write' on the repository "
    "(or 'Self-hosted runners: write' on the organization); the workflow's GITHUB_TOKEN cannot do it"
)
PAGE_SIZE = 100


def _runners_path(scope: str) -> str:
    """``owner/repo`` -> repository runners; ``owner`` -> organization runners."""
    scope = scope.strip().strip("/")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", scope):
        return f"/repos/{scope}/actions/runners"
    if re.fullmatch(r"[\w.-]+", scope):
        return f"/orgs/{scope}/actions/runners"
    raise InputError(f"runner scope {scope!r} is neither OWNER/REPO nor an organization", hint="pass OWNER/REPO")


@dataclass(frozen=True)
class JitRunner:
    runner_id: int
    name: str
    labels: tuple[str, ...]
    # A credential: whoever holds it can register a runner. Kept out of repr and masked on creation.
    encoded_jit_config: str = field(repr=False)


@dataclass(frozen=True)
class RunnerInfo:
    runner_id: int
    name: str
    status: str
    busy: bool
    labels: tuple[str, ...]


def _label_names(runner: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(str(label.get("name")) for label in runner.get("labels", []) if isinstance(label, dict))


def create_jit_runner(
    scope: str,
    name: str,
    labels: Sequence[str],
    *,
    runner_group_id: int = 1,
    work_folder: str = "_work",
    gh: Github | None = None,
) -> JitRunner:
    """A just-in-time runner config: the machine registers with it, runs one job, and is removed.

    The config is single-use and bound to ``name``; it is masked in the log at once.
    """
    if not labels:
        raise InputError("a JIT runner needs at least one label", hint="pass the label the train job runs on")
    gh = gh or client()
    body = {"name": name, "runner_group_id": runner_group_id, "labels": list(labels), "work_folder": work_folder}
    try:
        _, data = gh.requester.requestJsonAndCheck("POST", f"{_runners_path(scope)}/generate-jitconfig", input=body)
    except github_errors() as exc:
        raise translate_error(exc, f"creating JIT runner {name}", permission_hint=RUNNER_PERMISSION_HINT) from None
    config = str(data["encoded_jit_config"])
    gha.mask(config)
    runner = data.get("runner") or {}
    return JitRunner(
        runner_id=int(runner["id"]),
        name=str(runner.get("name", name)),
        labels=_label_names(runner),
        encoded_jit_config=config,
    )


def delete_runner(scope: str, runner_id: int, *, gh: Github | None = None) -> bool:
    """Remove a runner registration; False when it was already gone (teardown is idempotent)."""
    gh = gh or client()
    try:
        gh.requester.requestJsonAndCheck("DELETE", f"{_runners_path(scope)}/{int(runner_id)}")
    except github_errors() as exc:
        if status_of(exc) == 404:
            return False
        raise translate_error(exc, f"deleting runner {runner_id}", permission_hint=RUNNER_PERMISSION_HINT) from None
    return True


def list_runners(scope: str, *, gh: Github | None = None) -> list[RunnerInfo]:
    """Every self-hosted runner of the scope (for the reaper to match against run records)."""
    gh = gh or client()
    out: list[RunnerInfo] = []
    page = 1
    try:
        while True:
            _, data = gh.requester.requestJsonAndCheck(
                "GET", _runners_path(scope), parameters={"per_page": PAGE_SIZE, "page": page}
            )
            batch = data.get("runners", [])
            out.extend(_runner_info(r) for r in batch)
            if len(batch) < PAGE_SIZE:
                return out
            page += 1
    except github_errors() as exc:
        raise translate_error(exc, "listing runners", permission_hint=RUNNER_PERMISSION_HINT) from None


def _runner_info(runner: Mapping[str, Any]) -> RunnerInfo:
    return RunnerInfo(
        runner_id=int(runner["id"]),
        name=str(runner.get("name", "")),
        status=str(runner.get("status", "")),
        busy=bool(runner.get("busy", False)),
        labels=_label_names(runner),
    )
