"""Keep the reusable workflows on the actions of their own release.

Inside a reusable workflow ``uses: ./actions/x`` resolves to the *caller's* repository, so the tiers
name their sibling actions in full: ``gpuline/gpuline/actions/x@REF``. On the main branch REF is
``main``; the release process rewrites every such reference (and the templates' references to the
tiers) to the tag being released, as slsa-github-generator does, so ``nightly.yml@v1.4.0`` runs
``actions/train@v1.4.0`` and nothing else.

    python scripts/release_refs.py check            # every reference agrees (CI runs this)
    python scripts/release_refs.py release v1.4.0   # the release commit: tiers pinned to a commit SHA
    python scripts/release_refs.py set v1.4.0       # rewrite them by hand

A tag can be moved; a commit cannot. ``release`` therefore pins the tiers' references to the SHA of
the commit it starts from (whose ``actions/`` is what is being released), points the templates at
the version, and commits that; tag the new commit. Whoever calls ``nightly.yml@v1.4.0`` then runs
the actions at that SHA, byte for byte the ``actions/`` of the tagged commit: ``check`` fails when a
tier pins a SHA whose ``actions/`` differs from the working tree's.

This file holds the repository slug; the workflows and templates are the only other places it is
spelled out, because ``uses:`` cannot be computed.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

SLUG = "gpuline/gpuline"
ROOT = Path(__file__).resolve().parents[1]
TIERS = ("pr-fast", "nightly", "release", "reaper")
# Files whose self-references must all carry the same ref.
TIER_FILES = tuple(f".github/workflows/{t}.yml" for t in TIERS)
TEMPLATE_GLOB = "templates/workflows/*.yml"

_SELF_REF = re.compile(rf"(uses:\s*{re.escape(SLUG)}/(?P<path>[\w./-]+)@)(?P<ref>[\w.+-]+)")
_REF = re.compile(r"^(main|v\d+(\.\d+){0,2}([-+][\w.]+)?|[0-9a-f]{40})$")


def self_references(text: str) -> list[tuple[str, str]]:
    """(path, ref) of every ``uses: gpuline/gpuline/...@ref`` in ``text``."""
    return [(m.group("path"), m.group("ref")) for m in _SELF_REF.finditer(text)]


def files(root: Path = ROOT) -> list[Path]:
    return [root / f for f in TIER_FILES if (root / f).exists()] + sorted(root.glob(TEMPLATE_GLOB))


def check(root: Path = ROOT) -> list[str]:
    """Problems: tiers calling ``./actions`` (the caller's repo), self-references that disagree, or
    none at all.

    The tiers must all name one ref (``main`` between releases, the tag on a release commit); the
    templates must all name one version tag or SHA, never ``main``: users copy them. Finding no
    reference is a failure, not a pass: it means the slug here no longer matches the workflows (a
    renamed repository, a fork that rewrote one side), and every check above would hold vacuously.
    """
    problems: list[str] = _missing(root) + pinned_actions(root)
    tier_refs: dict[str, set[str]] = {}
    template_refs: dict[str, set[str]] = {}
    for path in files(root):
        text = path.read_text(encoding="utf-8")
        rel = path.relative_to(root).as_posix()
        is_tier = rel in TIER_FILES
        if is_tier and re.search(r"uses:\s*\./actions/", text):
            problems.append(
                f"{rel}: uses ./actions/..., which resolves to the caller's repository; use {SLUG}/actions/...@REF"
            )
        for action_path, ref in self_references(text):
            if not _REF.match(ref):
                problems.append(f"{rel}: {SLUG}/{action_path}@{ref} is not main, a version tag or a full SHA")
            elif not is_tier and ref == "main":
                problems.append(f"{rel}: {SLUG}/{action_path}@main in a template; pin a version")
            (tier_refs if is_tier else template_refs).setdefault(ref, set()).add(rel)
    for kind, refs in (("tiers", tier_refs), ("templates", template_refs)):
        if len(refs) > 1:
            found = "; ".join(f"@{ref} in {', '.join(sorted(where))}" for ref, where in sorted(refs.items()))
            problems.append(f"the {kind}' self-references disagree: {found}")
    return problems


def _git(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=False)


def pinned_actions(root: Path) -> list[str]:
    """When the tiers pin a commit SHA: problems unless that commit's ``actions/`` is the tree's."""
    refs = {ref for path in files(root) if path.relative_to(root).as_posix() in TIER_FILES
            for _, ref in self_references(path.read_text(encoding="utf-8"))}  # fmt: skip
    problems = []
    for sha in sorted(r for r in refs if re.fullmatch(r"[0-9a-f]{40}", r)):
        if _git(root, "cat-file", "-e", f"{sha}^{{commit}}").returncode != 0:
            problems.append(f"the tiers pin {sha}, which is not a commit of this repository")
        elif _git(root, "diff", "--quiet", sha, "--", "actions").returncode != 0:
            problems.append(
                f"the tiers pin the actions at {sha[:12]}, but actions/ changed since: the tiers would run "
                "other actions than these; run `release_refs.py release VERSION` again"
            )
    return problems


def release(version: str, root: Path = ROOT) -> str:
    """Commit the release: tiers pinned to HEAD's SHA, templates to ``version``; returns the new SHA."""
    if not re.fullmatch(r"v\d+\.\d+\.\d+([-+][\w.]+)?", version):
        raise ValueError(f"{version!r} is not a full version such as v1.4.0")
    if _git(root, "status", "--porcelain").stdout.strip():
        raise ValueError("the working tree has changes: commit them first (the release pins HEAD)")
    head = _git(root, "rev-parse", "HEAD").stdout.strip()
    changed = set_ref(head, root, templates=False) + set_ref(version, root, tiers=False)
    _git(root, "add", *[str(p) for p in changed])
    done = _git(root, "commit", "-q", "-m", f"release {version}: the tiers run the actions of {head}")
    if done.returncode != 0:
        raise ValueError(f"git commit failed: {done.stderr.strip()}")
    return _git(root, "rev-parse", "HEAD").stdout.strip()


def _missing(root: Path) -> list[str]:
    """Each tier without any ``uses: SLUG/...`` reference, and templates that have none among them."""
    problems = []
    templates = 0
    for path in files(root):
        rel = path.relative_to(root).as_posix()
        count = len(self_references(path.read_text(encoding="utf-8")))
        if rel in TIER_FILES and count == 0:
            problems.append(f"{rel}: no `uses: {SLUG}/...@REF` found")
        templates += 0 if rel in TIER_FILES else count
    if templates == 0:
        problems.append(f"templates/workflows: no `uses: {SLUG}/...@REF` found")
    if problems:
        problems.append(
            "0 references is not agreement: if the repository was renamed or forked, set SLUG in "
            "scripts/release_refs.py and rewrite the workflows' references to match"
        )
    return problems


def set_ref(ref: str, root: Path = ROOT, *, tiers: bool = True, templates: bool = True) -> list[Path]:
    """Rewrite every self-reference (of the tiers, the templates or both) to ``ref``; the files changed."""
    if not _REF.match(ref):
        raise ValueError(f"{ref!r} is not main, a version tag such as v1.4.0, or a full commit SHA")
    changed: list[Path] = []
    for path in files(root):
        is_template = path.relative_to(root).as_posix() not in TIER_FILES
        if (is_template and (ref == "main" or not templates)) or (not is_template and not tiers):
            continue  # templates keep the last released version between releases
        text = path.read_text(encoding="utf-8")
        new = _SELF_REF.sub(lambda m: m.group(1) + ref, text)
        if new != text:
            path.write_text(new, encoding="utf-8")
            changed.append(path)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("check", help="fail when the self-references disagree")
    set_parser = sub.add_parser("set", help="rewrite the self-references to REF")
    set_parser.add_argument("ref")
    release_parser = sub.add_parser("release", help="commit a release: tiers pinned to HEAD's SHA")
    release_parser.add_argument("version")
    args = parser.parse_args(argv)
    if args.command == "release":
        try:
            sha = release(args.version)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"committed {sha}; tag it: git tag {args.version} {sha} && git push origin {args.version}")
    if args.command == "set":
        try:
            changed = set_ref(args.ref)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        for path in changed:
            print(f"rewrote {path.relative_to(ROOT)}")
    problems = check()
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if not problems:
        print(f"ok: every {SLUG} reference agrees")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
