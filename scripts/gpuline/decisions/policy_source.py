"""Read a file as it is at a git ref: the trusted base, not the PR's working tree.

A pull request may edit policy.yml to raise its own budget; reading the policy from the base makes
that edit take effect only after it is reviewed and merged.

The base is named by a commit SHA wherever one is known: the ref itself when it is a full SHA, or the
event's base commit (``pull_request.base.sha``, ``merge_group.base_sha``) when the ref names the
event's base branch. A branch name in the clone is never trusted on a pull request, since code that
ran in the job could have created ``main`` or moved ``origin/main``; a missing commit is fetched
from origin by its SHA (git checks the objects it receives against their names), else read through
GitHub's contents API at that SHA. Replace refs are ignored (``--no-replace-objects``).

Without a known SHA (a laptop, a push event) the name is resolved as ``origin/REF`` first, then the
local branch, then GitHub's contents API at the ref when a token and ``GITHUB_REPOSITORY`` are there.
"""

from __future__ import annotations

import base64
import difflib
import json
import os
import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from gpuline import inputs
from gpuline.errors import InfraError, InputError, NotFoundError

_GIT_TIMEOUT_S = 30
_SHA = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
# A proposed change is shown, not used, so a short excerpt is enough to review it by.
MAX_DIFF_LINES = 40
MAX_DIFF_LINE_CHARS = 160


class FileNotAtRef(NotFoundError):
    """The ref exists but the file does not exist in it."""

    title = "file not at ref"


def read_at_ref(ref: str, path: Path | str, *, default: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """The text of ``path`` (absolute, or relative to the current directory) at git ``ref``.

    Raises :class:`FileNotAtRef` when the ref has no such file (unless ``default`` is given, which is
    returned instead), :class:`InputError` when the ref cannot be found anywhere.
    """
    env = os.environ if env is None else env
    ref = _checked_ref(ref)
    commit = trusted_commit(ref, env)
    target = Path(path)
    if not target.is_absolute():
        target = Path.cwd() / target
    top = _toplevel(target.parent)
    try:
        if commit is not None:
            return _read_commit(commit, ref, target, top, env)
        return _read_local(ref, target, top, env) if top else _read_remote(ref, target, None, env)
    except FileNotAtRef:
        if default is not None:
            return default
        raise


def trusted_commit(ref: str, env: Mapping[str, str] | None = None) -> str | None:
    """The commit SHA ``ref`` stands for without asking the clone: ``ref`` itself when it is a full
    SHA, else the event's base commit when ``ref`` names the event's base branch; None otherwise."""
    if _SHA.fullmatch(ref):
        return ref
    env = os.environ if env is None else env
    event = _event(env.get("GITHUB_EVENT_PATH", ""))
    pr_base = _mapping(_mapping(event.get("pull_request")).get("base"))
    if pr_base.get("ref") == ref and _is_sha(pr_base.get("sha")):
        return str(pr_base["sha"])
    group = _mapping(event.get("merge_group"))
    if str(group.get("base_ref", "")).removeprefix("refs/heads/") == ref and _is_sha(group.get("base_sha")):
        return str(group["base_sha"])
    return None


def _event(event_path: str) -> dict[str, object]:
    if not event_path:
        return {}
    try:
        data = json.loads(Path(event_path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _mapping(value: object) -> dict[str, object]:
    return value if isinstance(value, dict) else {}


def _is_sha(value: object) -> bool:
    return isinstance(value, str) and _SHA.fullmatch(value) is not None


def _checked_ref(ref: str) -> str:
    ref = ref.strip()
    # A ref beginning with '-' would be read by git as an option; refs come from event payloads.
    if not ref or ref.startswith("-") or any(c in ref for c in "\0\n\r :") or ".." in ref:
        raise InputError(f"not a valid git ref: {ref!r}", hint="pass a branch name such as main, or a commit SHA")
    return ref


def _git(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # Replace refs (refs/replace/*) would let anyone who wrote to the clone substitute an object.
    command = ["git", "--no-replace-objects", *args]
    try:
        return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=_GIT_TIMEOUT_S, check=False)
    except FileNotFoundError:
        raise InfraError("git is not installed", hint="install git on the runner") from None
    except subprocess.TimeoutExpired:
        raise InfraError(f"git {args[0]} timed out after {_GIT_TIMEOUT_S}s", hint="retry the job") from None


def _toplevel(directory: Path) -> Path | None:
    probe = directory
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    out = _git(probe, "rev-parse", "--show-toplevel")
    return Path(out.stdout.strip()).resolve() if out.returncode == 0 else None


def _relative(target: Path, top: Path) -> str:
    resolved = target.parent.resolve() / target.name
    try:
        return resolved.relative_to(top).as_posix()
    except ValueError:
        raise InputError(
            f"{target} is outside the git repository {top}", hint="keep the policy in the repository"
        ) from None


def _not_at(rel: str, ref: str, sha: str) -> FileNotAtRef:
    return FileNotAtRef(
        f"{rel} does not exist at {ref} ({sha[:12]})",
        hint=f"merge {rel} into {ref} first; changes to it take effect only once they are on {ref}",
    )


def _read_commit(sha: str, ref: str, target: Path, top: Path | None, env: Mapping[str, str]) -> str:
    """``path`` at the commit ``sha``: from the clone, fetched by SHA if missing, else from GitHub."""
    if top is None:
        return _read_remote(sha, target, None, env)
    rel = _relative(target, top)
    present = _git(top, "cat-file", "-e", f"{sha}^{{commit}}").returncode == 0
    if not present:
        # A shallow checkout lacks the base; fetching by SHA cannot be redirected by a branch name.
        present = _git(top, "fetch", "--quiet", "--no-tags", "--depth=1", "origin", sha).returncode == 0
    if not present:
        return _read_remote(sha, target, top, env)
    shown = _git(top, "show", f"{sha}:{rel}")
    if shown.returncode == 0:
        return shown.stdout
    raise _not_at(rel, ref, sha)


def _read_local(ref: str, target: Path, top: Path, env: Mapping[str, str]) -> str:
    rel = _relative(target, top)
    # Fully qualified, the remote-tracking branch first, so a local branch or a tag of the same name
    # cannot shadow the base that actions/checkout fetched; the bare name last (HEAD, a tag).
    for candidate in (f"refs/remotes/origin/{ref}", f"refs/heads/{ref}", ref):
        commit = _git(top, "rev-parse", "--verify", "--quiet", "--end-of-options", f"{candidate}^{{commit}}")
        if commit.returncode != 0:
            continue
        sha = commit.stdout.strip()
        shown = _git(top, "show", f"{sha}:{rel}")
        if shown.returncode == 0:
            return shown.stdout
        raise _not_at(rel, ref, sha)
    # The ref is not in this clone (a shallow checkout): ask GitHub, if we may.
    return _read_remote(ref, target, top, env)


def _read_remote(ref: str, target: Path, top: Path | None, env: Mapping[str, str]) -> str:
    from gpuline import github

    repo = env.get("GITHUB_REPOSITORY", "")
    token = inputs.github_token(env)
    if not repo or not token:
        raise InputError(
            f"git ref {ref!r} is not in this clone and GitHub cannot be asked (no token or GITHUB_REPOSITORY)",
            hint="fetch the base branch (actions/checkout with fetch-depth: 0) or set GITHUB_TOKEN",
        )
    base = top or Path(env.get("GITHUB_WORKSPACE") or Path.cwd()).resolve()
    rel = _relative(target, base)
    gh = github.client(token)
    try:
        content = gh.get_repo(repo).get_contents(rel, ref=ref)
    except github.github_errors() as exc:
        if github.status_of(exc) == 404:
            raise FileNotAtRef(
                f"{rel} does not exist at {ref} in {repo}",
                hint=f"merge {rel} into {ref} first; changes to it take effect only once they are on {ref}",
            ) from None
        raise github.translate_error(
            exc, f"reading {rel} at {ref}", permission_hint="give the job `permissions: contents: read`"
        ) from None
    if isinstance(content, list):
        raise InputError(f"{rel} is a directory at {ref}", hint="point --policy at a file")
    raw = content.raw_data.get("content")
    if not isinstance(raw, str):
        raise InfraError(f"GitHub returned no content for {rel} at {ref}", hint="retry the job")
    return base64.b64decode(raw).decode("utf-8")


@dataclass(frozen=True)
class ProposedChange:
    """A trusted file (policy, prices) that the PR's working tree changes: reported, never used."""

    name: str
    diff: str


def proposed_change(path: Path, trusted_text: str, name: str | None = None) -> ProposedChange | None:
    """How the working tree's ``path`` differs from ``trusted_text`` (its text at the trusted ref),
    as a bounded unified diff; None when they agree."""
    try:
        head_text = path.read_text(encoding="utf-8") if path.exists() else ""
    except (OSError, UnicodeDecodeError):
        head_text = "(unreadable)\n"
    if head_text == trusted_text:
        return None
    label = name or path.name
    lines = list(
        difflib.unified_diff(
            trusted_text.splitlines(), head_text.splitlines(), f"base/{label}", f"pr/{label}", lineterm="", n=1
        )
    )
    shown = [line[:MAX_DIFF_LINE_CHARS] for line in lines[:MAX_DIFF_LINES]]
    if len(lines) > MAX_DIFF_LINES:
        shown.append(f"... {len(lines) - MAX_DIFF_LINES} more diff lines")
    return ProposedChange(label, "\n".join(shown))
