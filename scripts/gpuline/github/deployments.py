"""Promotions recorded as GitHub deployments, and their statuses."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from gpuline.github.api import client, github_errors, translate_error

if TYPE_CHECKING:  # pragma: no cover - typing only
    from github import Github

DeploymentState = Literal["error", "failure", "inactive", "in_progress", "queued", "pending", "success"]
DEPLOYMENT_PERMISSION_HINT = "give the job `deployments: write`"
# GitHub cuts deployment and status descriptions at this many characters.
MAX_DESCRIPTION_CHARS = 140


def create_deployment(
    repo: str,
    ref: str,
    environment: str,
    *,
    description: str = "",
    payload: Mapping[str, Any] | None = None,
    production: bool | None = None,
    gh: Github | None = None,
) -> int:
    """Record a deployment of ``ref`` (a commit SHA) to ``environment``; returns its id.

    ``required_contexts=[]`` because the workflow that promotes has already run its checks; GitHub's
    own status-check gate would otherwise refuse while this very run is still in progress.
    """
    gh = gh or client()
    try:
        deployment = gh.get_repo(repo).create_deployment(
            ref=ref,
            task="deploy:model",
            auto_merge=False,
            required_contexts=[],
            payload=dict(payload or {}),
            environment=environment,
            description=description[:MAX_DESCRIPTION_CHARS],
            production_environment=production if production is not None else environment == "production",
        )
    except github_errors() as exc:
        raise translate_error(
            exc, f"creating a deployment to {environment}", permission_hint=DEPLOYMENT_PERMISSION_HINT
        ) from None
    return int(deployment.id)


def set_deployment_status(
    repo: str,
    deployment_id: int,
    state: DeploymentState,
    *,
    description: str = "",
    environment_url: str | None = None,
    log_url: str | None = None,
    gh: Github | None = None,
) -> None:
    gh = gh or client()
    kwargs: dict[str, Any] = {"description": description[:MAX_DESCRIPTION_CHARS]}
    if log_url:
        kwargs["target_url"] = log_url
    if environment_url:
        kwargs["environment_url"] = environment_url
    try:
        gh.get_repo(repo).get_deployment(deployment_id).create_status(state, **kwargs)
    except github_errors() as exc:
        raise translate_error(
            exc, f"setting deployment {deployment_id} to {state}", permission_hint=DEPLOYMENT_PERMISSION_HINT
        ) from None
