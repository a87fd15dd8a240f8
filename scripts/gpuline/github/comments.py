"""The pull request of this run, and the one sticky gpuline comment on it.

A sticky comment starts with a hidden marker naming its key and holds named sections, each one
replaceable on its own: the estimate written by ``cost-estimate`` and the actual cost written later
by ``teardown`` live side by side in one comment this way.
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
from gpuline.github.api import client, github_errors, translate_error

if TYPE_CHECKING:  # pragma: no cover - typing only
    from github import Github
    from github.IssueComment import IssueComment

_SECTION = re.compile(r"<!-- gpuline:section (?P<name>[\w.-]+) -->\n.*?\n<!-- /gpuline:section (?P=name) -->", re.S)
_SECTION_NAME = re.compile(r"[\w.-]+")
_KEY = re.compile(r"[^\w.:/@ -]")
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


def merge_sections(body: str, sections: Mapping[str, str], order: Sequence[str] = ()) -> str:
    """Replace (or add) named sections of a sticky comment, keeping the others, in ``order`` first."""
    found: dict[str, str] = {m.group("name"): m.group(0) for m in _SECTION.finditer(body)}
    for name, content in sections.items():
        if not _SECTION_NAME.fullmatch(name):
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
            created = issue.create_comment(marker + "\n" + merge_sections("", sections, order))
            return CommentResult("created", created.id, _url_of(created))
        return _update_oldest(ours, marker, sections, order)
    except github_errors() as exc:
        raise translate_error(
            exc, f"updating the gpuline comment on {pr.repo}#{pr.number}", permission_hint=COMMENT_PERMISSION_HINT
        ) from None


def _update_oldest(
    ours: list[IssueComment], marker: str, sections: Mapping[str, str], order: Sequence[str]
) -> CommentResult:
    """Merge ``sections`` into the oldest of our comments and delete the others."""
    keep, *duplicates = sorted(ours, key=lambda c: c.id)
    body = marker + "\n" + merge_sections((keep.body or "").removeprefix(marker).lstrip("\n"), sections, order)
    for extra in duplicates:
        extra.delete()
    if body == keep.body:
        return CommentResult("unchanged", keep.id, _url_of(keep))
    keep.edit(body)
    return CommentResult("updated", keep.id, _url_of(keep))


def _url_of(comment: IssueComment) -> str:
    return comment.html_url or comment.url
