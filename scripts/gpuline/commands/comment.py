"""``gpuline comment``: post or update the one sticky gpuline comment on the current pull request.

Each named section (``preflight``, ``estimate``, ``actual``) is replaced on its own, so the estimate
posted by the PR tier and the actual cost written later by teardown share one comment.

Skipping is not failing: outside a pull request, without a token, or with a read-only token (every
fork PR gets one) the command says why in the log and the job summary and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from gpuline import gha
from gpuline.errors import GpulineError, InputError
from gpuline.inputs import Inputs, github_token

SECTION_ORDER = ("preflight", "estimate", "actual")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gpuline comment",
        description="Create or update the sticky gpuline comment on the current pull request.",
    )
    p.add_argument(
        "--section",
        action="append",
        default=[],
        metavar="NAME",
        help="section to replace, paired in order with --body-file (default: estimate)",
    )
    p.add_argument("--body-file", action="append", default=[], metavar="PATH", help="markdown of the section")
    p.add_argument(
        "--key",
        default=Inputs.from_env().comment_key,
        help="which sticky comment (default: the config path, shared by every tier)",
    )
    p.add_argument(
        "--bot-login",
        default=None,
        metavar="LOGIN",
        help="who a GitHub App token comments as (e.g. my-app[bot]); GITHUB_TOKEN's is github-actions[bot]",
    )
    p.add_argument("--pr", type=int, default=None, help="PR number (default: from the event)")
    p.add_argument("--repo", default=None, help="OWNER/REPO (default: GITHUB_REPOSITORY)")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def default_key() -> str:
    """One comment per config, whichever tier writes to it: the estimate a PR tier posted and the actual
    cost a later tier settled for the same config land together (the workflow's name is not part of it)."""
    return Inputs.from_env().config or "gpuline.yml"


def _read_sections(names: list[str], files: list[str]) -> dict[str, str]:
    if not files:
        raise InputError("no comment body given", hint="pass --body-file PATH (e.g. cost-estimate's comment-path)")
    if not names:
        names = ["estimate"] if len(files) == 1 else []
    if len(names) != len(files):
        raise InputError(
            f"{len(names)} --section names for {len(files)} --body-file paths",
            hint="give one --section NAME before each --body-file PATH",
        )
    sections: dict[str, str] = {}
    for name, file in zip(names, files, strict=True):
        try:
            text = Path(file).read_text(encoding="utf-8")
        except OSError as exc:
            raise InputError(f"cannot read comment body {file}: {exc.strerror}", hint="check the path") from None
        sections[name] = text
    # The size limit is GitHub's on the whole body, sections already there included: the upsert keeps it.
    return sections


def _skip(reason: str, level: str = "notice") -> dict[str, str]:
    gha.annotate(level, f"PR comment skipped: {reason}", title="gpuline comment")
    gha.append_summary(f"PR comment skipped: {reason}.")
    gha.set_output("comment-action", "skipped")
    return {"action": "skipped", "reason": reason}


def run(args: argparse.Namespace) -> dict[str, str]:
    from gpuline import github

    sections = _read_sections(args.section, args.body_file)
    repo = args.repo or os.environ.get("GITHUB_REPOSITORY", "")
    if args.pr is not None:
        pr: github.PullRequestRef | None = github.PullRequestRef(repo, args.pr) if repo else None
    else:
        pr = github.current_pull_request()
        if pr is not None and args.repo:
            pr = github.PullRequestRef(args.repo, pr.number)
    if pr is None or not pr.repo:
        return _skip("this run is not about a pull request")
    token = github_token()
    if not token:
        return _skip("no GitHub token was given (set GITHUB_TOKEN on the step)")
    try:
        result = github.upsert_sticky_comment(
            pr,
            sections,
            key=args.key or default_key(),
            order=SECTION_ORDER,
            gh=github.client(token),
            bot_login=args.bot_login,
        )
    except github.GitHubPermissionError as exc:
        # Expected on fork PRs: their GITHUB_TOKEN is read-only whatever the workflow asks for.
        return _skip(f"the token may not comment on {pr.repo}#{pr.number} ({exc.message})", level="warning")
    gha.set_output("comment-action", result.action)
    gha.set_output("comment-id", str(result.comment_id))
    gha.set_output("comment-url", result.url)
    gha.append_summary(f"PR comment {result.action}: {result.url}")
    gha.info(f"PR comment {result.action}: {result.url}")
    return {"action": result.action, "comment_id": str(result.comment_id), "url": result.url}


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    gha.set_json_mode(args.json)
    try:
        result = run(args)
    except GpulineError as exc:
        if args.debug:
            raise
        message = exc.message + (f" (fix: {exc.hint})" if exc.hint else "")
        gha.annotate("error", message, title=f"gpuline comment: {exc.title}", location=exc.location)
        gha.append_summary(f"### :x: gpuline comment: {exc.title}\n\n{message}")
        if args.json:
            print(json.dumps({"ok": False, "error": exc.one_line(), "exit_code": exc.exit_code}))
        return exc.exit_code
    if args.json:
        print(json.dumps({"ok": True, **result}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
