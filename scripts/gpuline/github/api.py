"""The PyGithub client, and GitHub's failures translated into gpuline's errors.

PyGithub is imported inside functions only, so ``import gpuline.cli`` never pays for it and the
package works without the ``github`` extra until one of these calls is actually made. (Inside this
package ``github`` is PyGithub: every import is absolute.)

Every call honours ``GITHUB_API_URL`` (set by the runner, and pointing at ``https://HOST/api/v3`` on
GitHub Enterprise Server), so the same code talks to github.com, a GHES instance or a local fake.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from gpuline import gha, inputs
from gpuline.errors import GpulineError, InfraError, InputError, NotFoundError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from github import Github

DEFAULT_API_URL = "https://api.github.com"
DEFAULT_RETRIES = 3


def api_url(env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    return (env.get("GITHUB_API_URL") or DEFAULT_API_URL).rstrip("/")


def token_from_env(env: Mapping[str, str] | None = None) -> str | None:
    """The token for GitHub's API (see :func:`gpuline.inputs.github_token` for the order)."""
    return inputs.github_token(env)


def client(
    token: str | None = None, *, base_url: str | None = None, retries: int | None = None, throttle: bool = True
) -> Github:
    """A PyGithub client for ``base_url`` (default: ``GITHUB_API_URL``), authenticated by ``token``.

    ``retries`` defaults to the ``GITHUB_RETRIES`` input. ``throttle=False`` drops PyGithub's pause
    between writes (GitHub asks for it against secondary rate limits; a local fake does not need it).
    """
    try:
        from github import Auth, Github, GithubRetry
    except ModuleNotFoundError:
        raise InputError(
            "talking to GitHub needs the Python package 'PyGithub', which is not installed",
            hint="pip install 'gpuline[github]'",
        ) from None
    token = token or token_from_env()
    if token:
        gha.mask(token)
    if retries is None:
        retries = inputs.Inputs.from_env().retries(DEFAULT_RETRIES)
    retry = GithubRetry(total=retries, backoff_factor=0.5) if retries > 0 else None
    return Github(
        base_url=base_url or api_url(),
        auth=Auth.Token(token) if token else None,
        retry=retry,
        per_page=100,
        timeout=30,
        seconds_between_requests=0.25 if throttle else None,
        seconds_between_writes=1.0 if throttle else None,
        user_agent="gpuline",
        # Lazy objects: get_repo()/get_issue() cost no request until something is read or written.
        lazy=True,
    )


def status_of(exc: Exception) -> int | None:
    """The HTTP status GitHub answered with, where the failure carries one."""
    status = getattr(exc, "status", None)
    return status if isinstance(status, int) else None


def github_errors() -> tuple[type[Exception], ...]:
    """The exception types a PyGithub call raises when GitHub (or the network) fails."""
    from github import GithubException
    from requests import RequestException

    return (GithubException, RequestException)


class GitHubPermissionError(InputError):
    """GitHub said 401/403: the token is missing a right (or is a fork PR's read-only token)."""

    title = "GitHub permission denied"


def translate_error(exc: Exception, doing: str, *, permission_hint: str | None = None) -> GpulineError:
    """A PyGithub/requests failure as one of our errors: what was being done, and what to change."""
    status = status_of(exc)
    data = getattr(exc, "data", None)
    detail = data.get("message") if isinstance(data, dict) else None
    text = f"{doing}: GitHub answered {status}" + (f" ({detail})" if detail else "") if status else f"{doing}: {exc}"
    if status in (401, 403):
        return GitHubPermissionError(text, hint=permission_hint or "check the token and the job's `permissions:`")
    if status == 404:
        return NotFoundError(text, hint=permission_hint or "check the repository name and that the token can see it")
    if status == 422:
        return InputError(text, hint="GitHub rejected the request body; see the message above")
    return InfraError(text, hint="GitHub may be unavailable; retry the job")


# Older names of the two helpers above, which other modules still call.
_status_of = status_of
_github_errors = github_errors
