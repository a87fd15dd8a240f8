"""GitHub through PyGithub: sticky PR comments, job-summary rendering, deployments, JIT runners.

PyGithub is imported inside functions only, so ``import gpuline.cli`` never pays for it and the
package works without the ``github`` extra until one of these calls is actually made.

Every call honours ``GITHUB_API_URL`` (set by the runner, and pointing at ``https://HOST/api/v3`` on
GitHub Enterprise Server), so the same code talks to github.com, a GHES instance or a local fake.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from gpuline import gha
from gpuline.errors import GpulineError, InfraError, InputError, NotFoundError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from github import Github

DEFAULT_API_URL = "https://api.github.com"
# Tokens are looked up in this order; GPULINE_GITHUB_TOKEN lets a workflow hand gpuline a token with
# more rights (e.g. to create runners) without changing what other tools see as GITHUB_TOKEN.
TOKEN_ENV_VARS = ("GPULINE_GITHUB_TOKEN", "GITHUB_TOKEN", "GH_TOKEN")


# ---------------------------------------------------------------- client


def api_url(env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    return (env.get("GITHUB_API_URL") or DEFAULT_API_URL).rstrip("/")


def token_from_env(env: Mapping[str, str] | None = None) -> str | None:
    env = os.environ if env is None else env
    for name in TOKEN_ENV_VARS:
        value = env.get(name, "").strip()
        if value:
            return value
    return None


def client(
    token: str | None = None, *, base_url: str | None = None, retries: int | None = None, throttle: bool = True
) -> Github:
    """A PyGithub client for ``base_url`` (default: ``GITHUB_API_URL``), authenticated by ``token``.

    ``throttle=False`` drops PyGithub's pause between writes (GitHub asks for it against secondary rate
    limits; a local fake does not need it).
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
        retries = _int_env("GPULINE_GITHUB_RETRIES", 3)
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


def _int_env(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    if not value.isdigit():
        raise InputError(f"{name} must be a whole number (got {value!r})", hint=f"unset {name} or give e.g. 3")
    return int(value)


def _status_of(exc: Exception) -> int | None:
    status = getattr(exc, "status", None)
    return status if isinstance(status, int) else None


class GitHubPermissionError(InputError):
    """GitHub said 401/403: the token is missing a right (or is a fork PR's read-only token)."""

    title = "GitHub permission denied"


def translate_error(exc: Exception, doing: str, *, permission_hint: str | None = None) -> GpulineError:
    """A PyGithub/requests failure as one of our errors: what was being done, and what to change."""
    status = _status_of(exc)
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


def _github_errors() -> tuple[type[Exception], ...]:
    from github import GithubException
    from requests import RequestException

    return (GithubException, RequestException)


# ---------------------------------------------------------------- the pull request of this run


@dataclass(frozen=True)
class PullRequestRef:
    repo: str
    number: int


def current_pull_request(env: Mapping[str, str] | None = None) -> PullRequestRef | None:
    """The PR this workflow run is about, from ``GPULINE_PR_NUMBER`` or the event payload; else None."""
    env = os.environ if env is None else env
    repo = env.get("GITHUB_REPOSITORY", "")
    explicit = env.get("GPULINE_PR_NUMBER", "").strip()
    if explicit:
        if not explicit.isdigit():
            raise InputError(f"GPULINE_PR_NUMBER must be a number (got {explicit!r})", hint="pass the PR number")
        return PullRequestRef(repo, int(explicit)) if repo else None
    event_path = env.get("GITHUB_EVENT_PATH", "")
    if not repo or not event_path:
        return None
    try:
        event = json.loads(Path(event_path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(event, dict):
        return None
    for key in ("pull_request", "issue"):
        item = event.get(key)
        if isinstance(item, dict) and isinstance(item.get("number"), int):
            # An issue event is a PR only when it carries a pull_request link.
            if key == "issue" and "pull_request" not in item:
                continue
            return PullRequestRef(repo, item["number"])
    return None


# ---------------------------------------------------------------- sticky comments

_SECTION = re.compile(r"<!-- gpuline:section (?P<name>[\w.-]+) -->\n.*?\n<!-- /gpuline:section (?P=name) -->", re.S)
_KEY = re.compile(r"[^\w.:/@ -]")


def sticky_marker(key: str) -> str:
    """The hidden first line that identifies our comment for ``key`` (e.g. ``workflow:config``)."""
    return f"<!-- gpuline:sticky {_KEY.sub('_', key.strip())} -->"


def merge_sections(body: str, sections: Mapping[str, str], order: Sequence[str] = ()) -> str:
    """Replace (or add) named sections of a sticky comment, keeping the others.

    The estimate written by ``cost-estimate`` and the actual cost written later by ``teardown`` live
    side by side in one comment this way, each replaceable on its own.
    """
    found: dict[str, str] = {m.group("name"): m.group(0) for m in _SECTION.finditer(body)}
    for name, content in sections.items():
        if not re.fullmatch(r"[\w.-]+", name):
            raise InputError(f"comment section name {name!r} is not valid", hint="use letters, digits, '.', '_' or '-'")
        found[name] = f"<!-- gpuline:section {name} -->\n{content.strip()}\n<!-- /gpuline:section {name} -->"
    names = [n for n in order if n in found] + [n for n in found if n not in order]
    return "\n\n".join(found[n] for n in names)


@dataclass(frozen=True)
class CommentResult:
    action: Literal["created", "updated", "unchanged"]
    comment_id: int
    url: str


def upsert_sticky_comment(
    pr: PullRequestRef,
    sections: Mapping[str, str],
    *,
    key: str,
    order: Sequence[str] = (),
    gh: Github | None = None,
) -> CommentResult:
    """Create the PR's one comment for ``key``, or update it in place; never a second one.

    Found by the hidden marker, as iterative/cml's watermark does. If a race left two, the oldest is
    kept and the others are deleted.
    """
    gh = gh or client()
    marker = sticky_marker(key)
    try:
        issue = gh.get_repo(pr.repo).get_issue(pr.number)
        ours = [c for c in issue.get_comments() if (c.body or "").startswith(marker)]
        if not ours:
            body = marker + "\n" + merge_sections("", sections, order)
            created = issue.create_comment(body)
            return CommentResult("created", created.id, created.html_url or created.url)
        keep, *duplicates = sorted(ours, key=lambda c: c.id)
        body = marker + "\n" + merge_sections((keep.body or "").removeprefix(marker).lstrip("\n"), sections, order)
        for extra in duplicates:
            extra.delete()
        if body == keep.body:
            return CommentResult("unchanged", keep.id, keep.html_url or keep.url)
        keep.edit(body)
        return CommentResult("updated", keep.id, keep.html_url or keep.url)
    except _github_errors() as exc:
        raise translate_error(
            exc,
            f"updating the gpuline comment on {pr.repo}#{pr.number}",
            permission_hint="give the job `permissions: pull-requests: write`; fork PRs only get a read-only token",
        ) from None


# ---------------------------------------------------------------- deployments

DeploymentState = Literal["error", "failure", "inactive", "in_progress", "queued", "pending", "success"]


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
            description=description[:140],
            production_environment=production if production is not None else environment == "production",
        )
    except _github_errors() as exc:
        raise translate_error(
            exc, f"creating a deployment to {environment}", permission_hint="give the job `deployments: write`"
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
    kwargs: dict[str, Any] = {"description": description[:140]}
    if log_url:
        kwargs["target_url"] = log_url
    if environment_url:
        kwargs["environment_url"] = environment_url
    try:
        gh.get_repo(repo).get_deployment(deployment_id).create_status(state, **kwargs)
    except _github_errors() as exc:
        raise translate_error(
            exc, f"setting deployment {deployment_id} to {state}", permission_hint="give the job `deployments: write`"
        ) from None


# ---------------------------------------------------------------- just-in-time runners

RUNNER_PERMISSION_HINT = (
    "creating or deleting self-hosted runners needs a token with 'Administration: write' on the repository "
    "(or 'Self-hosted runners: write' on the organization); the workflow's GITHUB_TOKEN cannot do it"
)


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
    except _github_errors() as exc:
        raise translate_error(exc, f"creating JIT runner {name}", permission_hint=RUNNER_PERMISSION_HINT) from None
    config = str(data["encoded_jit_config"])
    gha.mask(config)
    runner = data.get("runner") or {}
    return JitRunner(
        runner_id=int(runner["id"]),
        name=str(runner.get("name", name)),
        labels=tuple(str(label.get("name")) for label in runner.get("labels", []) if isinstance(label, dict)),
        encoded_jit_config=config,
    )


def delete_runner(scope: str, runner_id: int, *, gh: Github | None = None) -> bool:
    """Remove a runner registration; False when it was already gone (teardown is idempotent)."""
    gh = gh or client()
    try:
        gh.requester.requestJsonAndCheck("DELETE", f"{_runners_path(scope)}/{int(runner_id)}")
    except _github_errors() as exc:
        if _status_of(exc) == 404:
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
                "GET", _runners_path(scope), parameters={"per_page": 100, "page": page}
            )
            batch = data.get("runners", [])
            for r in batch:
                out.append(
                    RunnerInfo(
                        runner_id=int(r["id"]),
                        name=str(r.get("name", "")),
                        status=str(r.get("status", "")),
                        busy=bool(r.get("busy", False)),
                        labels=tuple(str(x.get("name")) for x in r.get("labels", []) if isinstance(x, dict)),
                    )
                )
            if len(batch) < 100:
                return out
            page += 1
    except _github_errors() as exc:
        raise translate_error(exc, "listing runners", permission_hint=RUNNER_PERMISSION_HINT) from None
