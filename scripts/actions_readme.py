"""Generate each action's README.md from its action.yml, or check that it is current.

    python scripts/actions_readme.py          # rewrite actions/*/README.md
    python scripts/actions_readme.py --check  # exit 1 when one is stale (CI runs this)

The inputs and outputs tables come from action.yml, so the documentation cannot drift from what the
action accepts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from release_refs import SLUG

ROOT = Path(__file__).resolve().parents[1]
ACTIONS = ROOT / "actions"
PIN = "v1"
INTERNAL = {"setup"}


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ").strip()


def _example(name: str, meta: dict[str, Any]) -> str:
    inputs: dict[str, Any] = meta.get("inputs") or {}
    shown = [k for k in ("config", "tier", "stage", "provider", "run-id") if k in inputs]
    lines = [f"- id: {name.replace('-', '_')}", f"  uses: {SLUG}/actions/{name}@{PIN}"]
    if shown:
        lines.append("  with:")
        samples = {
            "config": "ml/gpuline.yml",
            "tier": "nightly",
            "stage": "staging",
            "provider": "ec2",
            "run-id": "${{ needs.plan.outputs.run-id }}",
        }
        lines += [f"    {key}: {samples[key]}" for key in shown]
    outputs: dict[str, Any] = meta.get("outputs") or {}
    if outputs:
        first = next(iter(outputs))
        lines += [
            f'- run: echo "{first}: $VALUE"',
            "  env:",
            f"    VALUE: ${{{{ steps.{name.replace('-', '_')}.outputs.{first} }}}}",
        ]
    return "\n".join(lines)


def render(name: str, meta: dict[str, Any]) -> str:
    inputs: dict[str, Any] = meta.get("inputs") or {}
    outputs: dict[str, Any] = meta.get("outputs") or {}
    parts = [
        f"# {meta['name']}",
        "<!-- Generated from action.yml by scripts/actions_readme.py; edit action.yml, then rerun it. -->",
        str(meta["description"]),
    ]
    if name in INTERNAL:
        parts.append(
            "Used by the other gpuline actions and the reusable workflows; use it directly only to run "
            "`gpuline` commands of your own (`gpuline status`, `gpuline rollback`)."
        )
    parts += ["## Usage", f"```yaml\n{_example(name, meta)}\n```"]
    parts.append(
        f"Pin a full version (`@{PIN}.2.0`) or a commit SHA and let Dependabot's `github-actions` ecosystem "
        "raise the pin. Inputs reach the command only through environment variables, never as script text."
    )
    rows = ["| Input | Description | Default |", "| --- | --- | --- |"]
    for key, spec in inputs.items():
        default = spec.get("default", "")
        rows.append(f"| `{key}` | {_cell(spec.get('description', ''))} | {f'`{default}`' if default else '(empty)'} |")
    parts += ["## Inputs", "\n".join(rows)]
    rows = ["| Output | Description |", "| --- | --- |"]
    rows += [f"| `{key}` | {_cell(spec.get('description', ''))} |" for key, spec in outputs.items()]
    parts += ["## Outputs", "\n".join(rows)]
    return "\n\n".join(parts) + "\n"


def action_dirs(root: Path | None = None) -> list[Path]:
    return sorted(p.parent for p in (root or ACTIONS).glob("*/action.yml"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate or check actions/*/README.md.")
    parser.add_argument("--check", action="store_true", help="exit 1 when a README is stale")
    args = parser.parse_args(argv)
    stale = []
    for directory in action_dirs():
        meta = yaml.safe_load((directory / "action.yml").read_text(encoding="utf-8"))
        expected = render(directory.name, meta)
        readme = directory / "README.md"
        current = readme.read_text(encoding="utf-8") if readme.exists() else None
        if current == expected:
            continue
        if args.check:
            stale.append(readme.relative_to(ROOT).as_posix())
        else:
            readme.write_text(expected, encoding="utf-8")
            print(f"wrote {readme.relative_to(ROOT)}")
    for path in stale:
        print(f"error: {path} is stale: run python scripts/actions_readme.py", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
