"""GitHub through PyGithub: sticky PR comments, deployments, just-in-time runners.

- :mod:`~gpuline.github.api`: the API URL, the token, the PyGithub client and its retries, and
  GitHub's failures as gpuline errors;
- :mod:`~gpuline.github.comments`: the pull request of this run and its one sticky gpuline comment;
- :mod:`~gpuline.github.deployments`: promotions recorded as GitHub deployments;
- :mod:`~gpuline.github.runners`: just-in-time self-hosted runners.

Importing this package imports no PyGithub: every module imports it inside the functions that call
GitHub, so ``import gpuline.cli`` stays light and works without the ``github`` extra.
"""

from __future__ import annotations

from gpuline.github.api import (
    DEFAULT_API_URL,
    DEFAULT_RETRIES,
    GitHubPermissionError,
    _github_errors,
    _status_of,
    api_url,
    client,
    github_errors,
    status_of,
    token_from_env,
    translate_error,
)
from gpuline.github.comments import (
    MAX_BODY_CHARS,
    CommentResult,
    PullRequestRef,
    current_pull_request,
    merge_sections,
    sticky_marker,
    token_login,
    upsert_sticky_comment,
)
from gpuline.github.deployments import DeploymentState, create_deployment, set_deployment_status
from gpuline.github.runners import (
    RUNNER_PERMISSION_HINT,
    JitRunner,
    RunnerInfo,
    create_jit_runner,
    delete_runner,
    list_runners,
)

__all__ = [
    "DEFAULT_API_URL",
    "DEFAULT_RETRIES",
    "MAX_BODY_CHARS",
    "RUNNER_PERMISSION_HINT",
    "CommentResult",
    "DeploymentState",
    "GitHubPermissionError",
    "JitRunner",
    "PullRequestRef",
    "RunnerInfo",
    "_github_errors",
    "_status_of",
    "api_url",
    "client",
    "create_deployment",
    "create_jit_runner",
    "current_pull_request",
    "delete_runner",
    "github_errors",
    "list_runners",
    "merge_sections",
    "set_deployment_status",
    "status_of",
    "sticky_marker",
    "token_from_env",
    "token_login",
    "translate_error",
    "upsert_sticky_comment",
]
