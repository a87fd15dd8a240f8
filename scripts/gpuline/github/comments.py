"""The pull request of this run, and the one sticky gpuline comment on it.

A sticky comment starts with a hidden marker naming its key and holds named sections, each one
replaceable on its own: the estimate written by ``cost-estimate`` and the actual cost written later
by ``teardown`` live side by side in one comment this way.

Anyone can post a comment that starts with the marker, so the marker alone never identifies ours:
only comments authored by the token's own identity count, and other people's are never edited or
deleted. The whole body, sections already there included, is kept under GitHub's size limit.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from gpuline import contract, inputs
from gpuline.errors import InputError
from gpuline.github.api import client, github_errors, status_of, translate_error

if TYPE_CHECKING:  # pragma: no cover - typing only
    from github import Github
    from github.IssueComment import IssueComment

_SECTION = re.compile(
    r"<!-- gpuline:section (?P<name>[\w.-]+) -->\n(?P<content>.*?)\n<!-- /gpuline:section (?P=name) -->", re.S
)
_SECTION_NAME = re.compile(r"[\w.-]+")
_KEY = re.compile(r"[^\w.:/@ -]")
# GitHub rejects comment bodies of this many characters or more ("maximum is 65536"): stay under it.
MAX_BODY_CHARS = 65536
TRUNCATED_NOTE = "\n\n_(truncated: see the job summary for the rest)_"
# Who GITHUB_TOKEN comments as; an installation token may not read GET /user.
ACTIONS_BOT = "github-actions[bot]"
COMMENT_PERMISSION_HINT = "give the job `permissions: pull-requests: write`; fork PRs only get a read-only token"


# ---------------------------------------------------------------- the pull request of this run


@dataclass(frozen=True)
class PullRequestRef:
    repo: str
    number: int


def current_pull_request(env: Mapping[str, str] | None = None) -> PullRequestRef | None:
    """The PR this workflow run is about, from the ``PR_NUMBER`` input or the event payload; else None."""
    env = os.environ if env is None else env
    repo = env.get("GITHUB_REPOSITORY", "")
    explicit = inputs.Inputs.from_env(env).pr_number
    if explicit:
        if not explicit.isdigit():
            raise InputError(f"{contract.PR_NUMBER} must be a number (got {explicit!r})", hint="pass the PR number")
        return PullRequestRef(repo, int(explicit)) if repo else None
    event_path = env.get("GITHUB_EVENT_PATH", "")
    if not repo or not event_path:
        return None
    number = _pull_request_number(event_path)
    return PullRequestRef(repo, number) if number is not None else None


def _pull_request_number(event_path: str) -> int | None:
    """The PR number in the event payload at ``event_path``; None when it is about no PR."""
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
            return int(item["number"])
    return None


# ---------------------------------------------------------------- sticky comments


def sticky_marker(key: str) -> str:
    """The hidden first line that identifies our comment for ``key`` (e.g. ``workflow:config``)."""
    return f"<!-- gpuline:sticky {_KEY.sub('_', key.strip())} -->"


def merge_sections(
    body: str, sections: Mapping[str, str], order: Sequence[str] = (), *, limit: int | None = None
) -> str:
    """Replace (or add) named sections of a sticky comment, keeping the others, in ``order`` first.

    With ``limit`` the result is at most that many characters: the longest sections are cut first
    (each says so), so a short one such as the preflight line stays whole."""
    found: dict[str, str] = {m.group("name"): m.group("content") for m in _SECTION.finditer(body)}
    for name, content in sections.items():
        if not _SECTION_NAME.fullmatch(name):
            raise InputError(f"comment section name {name!r} is not valid", hint="use letters, digits, '.', '_' or '-'")
        found[name] = content
    names = [n for n in order if n in found] + [n for n in found if n not in order]
    contents = {n: found[n].strip() for n in names}
    text = _joined(contents)
    if limit is None or len(text) <= limit:
        return text
    for name in sorted(names, key=lambda n: len(contents[n]), reverse=True):
        over = len(_joined(contents)) - limit
        if over <= 0:
            break
        content = contents[name]
        if len(content) > len(TRUNCATED_NOTE):
            contents[name] = content[: max(len(content) - over - len(TRUNCATED_NOTE), 0)] + TRUNCATED_NOTE
    # Only many tiny sections could still be over; cutting the text keeps GitHub from refusing it.
    return _joined(contents)[:limit]


def _joined(contents: Mapping[str, str]) -> str:
    return "\n\n".join(f"<!-- gpuline:section {n} -->\n{c}\n<!-- /gpuline:section {n} -->" for n, c in contents.items())


@dataclass(frozen=True)
class CommentResult:
    action: Literal["created", "updated", "unchanged"]
    comment_id: int
    url: str


def token_login(gh: Github, bot_login: str | None = None) -> str:
    """The login this token's comments are authored by.

    ``GET /user`` names a user token's owner. An installation token (GITHUB_TOKEN, a GitHub App's)
    is refused there (403) and comments as its app's bot: ``bot_login``, else GITHUB_TOKEN's.
    """
    try:
        login = gh.get_user().login
    except github_errors() as exc:
        if status_of(exc) != 403:
            raise
        return bot_login or ACTIONS_BOT
    return str(login)


def upsert_sticky_comment(
    pr: PullRequestRef,
    sections: Mapping[str, str],
    *,
    key: str,
    order: Sequence[str] = (),
    gh: Github | None = None,
    bot_login: str | None = None,
) -> CommentResult:
    """Create the PR's one comment for ``key``, or update it in place; never a second one.

    Found by the hidden marker, as iterative/cml's watermark does, among the comments this token's
    identity wrote (see :func:`token_login`). If a race left two of ours, the oldest is kept and
    our others are deleted; a comment by anyone else is never touched, marker or not.
    """
    gh = gh or client()
    marker = sticky_marker(key)
    limit = MAX_BODY_CHARS - 1 - len(marker + "\n")
    try:
        me = token_login(gh, bot_login).casefold()
        issue = gh.get_repo(pr.repo).get_issue(pr.number)
        ours = [c for c in issue.get_comments() if _author(c) == me and (c.body or "").startswith(marker)]
        if not ours:
            created = issue.create_comment(marker + "\n" + merge_sections("", sections, order, limit=limit))
            return CommentResult("created", created.id, _url_of(created))
        return _update_oldest(ours, marker, sections, order, limit)
    except github_errors() as exc:
        raise translate_error(
            exc, f"updating the gpuline comment on {pr.repo}#{pr.number}", permission_hint=COMMENT_PERMISSION_HINT
        ) from None


def _author(comment: IssueComment) -> str:
    # Logins are case-insensitive on GitHub.
    return comment.user.login.casefold() if comment.user is not None and comment.user.login else ""


def _update_oldest(
    ours: list[IssueComment], marker: str, sections: Mapping[str, str], order: Sequence[str], limit: int
) -> CommentResult:
    """Merge ``sections`` into the oldest of our comments and delete our others."""
    keep, *duplicates = sorted(ours, key=lambda c: c.id)
    old = (keep.body or "").removeprefix(marker).lstrip("\n")
    body = marker + "\n" + merge_sections(old, sections, order, limit=limit)
    for extra in duplicates:
        extra.delete()
    if body == keep.body:
        return CommentResult("unchanged", keep.id, _url_of(keep))
    keep.edit(body)
    return CommentResult("updated", keep.id, _url_of(keep))


def _url_of(comment: IssueComment) -> str:
    return comment.html_url or comment.url
