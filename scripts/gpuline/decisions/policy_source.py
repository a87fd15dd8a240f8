"""Read a file as it is at a git ref: the trusted base branch, not the PR's working tree.

A pull request may edit policy.yml to raise its own budget; reading the policy from the base ref
makes that edit take effect only after it is reviewed and merged.

Order of sources: the local clone (``git show REF:path``, trying ``origin/REF`` too, because
actions/checkout leaves the base branch only as a remote-tracking ref), then GitHub's contents API at
the ref when a token and ``GITHUB_REPOSITORY`` are available (a shallow checkout lacks the base).
"""

from __future__ import annotations

import base64
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path

from gpuline import inputs
from gpuline.errors import InfraError, InputError, NotFoundError

_GIT_TIMEOUT_S = 30


class FileNotAtRef(NotFoundError):
    """The ref exists but the file does not exist in it."""

    title = "file not at ref"


def read_at_ref(ref: str, path: Path | str, *, default: str | None = None) -> str:
    """The text of ``path`` (absolute, or relative to the current directory) at git ``ref``.

    Raises :class:`FileNotAtRef` when the ref has no such file (unless ``default`` is given, which is
    returned instead), :class:`InputError` when the ref cannot be found anywhere.
    """
    ref = _checked_ref(ref)
    target = Path(path)
    if not target.is_absolute():
        target = Path.cwd() / target
    top = _toplevel(target.parent)
    try:
        return _read_local(ref, target, top) if top else _read_remote(ref, target, None)
    except FileNotAtRef:
        if default is not None:
            return default
        raise


def _checked_ref(ref: str) -> str:
    ref = ref.strip()
    # A ref beginning with '-' would be read by git as an option; refs come from event payloads.
    if not ref or ref.startswith("-") or any(c in ref for c in "\0\n\r :") or ".." in ref:
        raise InputError(f"not a valid git ref: {ref!r}", hint="pass a branch name such as main")
    return ref


def _git(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=_GIT_TIMEOUT_S, check=False
        )
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


def _read_local(ref: str, target: Path, top: Path) -> str:
    rel = _relative(target, top)
    for candidate in (ref, f"origin/{ref}", f"refs/remotes/origin/{ref}"):
        commit = _git(top, "rev-parse", "--verify", "--quiet", "--end-of-options", f"{candidate}^{{commit}}")
        if commit.returncode != 0:
            continue
        sha = commit.stdout.strip()
        shown = _git(top, "show", f"{sha}:{rel}")
        if shown.returncode == 0:
            return shown.stdout
        raise FileNotAtRef(
            f"{rel} does not exist at {ref} ({sha[:12]})",
            hint=f"merge {rel} into {ref} first; changes to it take effect only once they are on {ref}",
        )
    # The ref is not in this clone (a shallow checkout): ask GitHub, if we may.
    return _read_remote(ref, target, top)


def _read_remote(ref: str, target: Path, top: Path | None, env: Mapping[str, str] | None = None) -> str:
    from gpuline import github

    env = os.environ if env is None else env
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
