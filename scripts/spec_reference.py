"""Generate the field reference in docs/spec.md from the JSON Schema, or check that it is current.

    python scripts/spec_reference.py          # rewrite the generated part of docs/spec.md
    python scripts/spec_reference.py --check  # exit 1 when it is stale (CI runs this)

The tables come from `gpuline schema` and `gpuline schema --policy`, so the reference cannot drift from
what gpuline.yml and policy.yml accept. Only the text between the two markers is generated; the
explanation and the examples around it are written by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SPEC_DOC = ROOT / "docs" / "spec.md"
START = "<!-- generated:spec-reference -->"
END = "<!-- /generated:spec-reference -->"
NOTE = (
    "<!-- Generated from `gpuline schema` and `gpuline schema --policy` by scripts/spec_reference.py; "
    "edit the models, then rerun it. -->"
)
# Which file each schema describes, and the command that prints it.
FILES = (("gpuline.yml", ["schema"]), ("policy.yml", ["schema", "--policy"]))


def load_schema(args: list[str]) -> dict[str, Any]:
    """The JSON Schema exactly as the CLI prints it."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "scripts"), env.get("PYTHONPATH", "")) if p)
    done = subprocess.run(
        [sys.executable, "-m", "gpuline.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"error: gpuline {' '.join(args)} failed: {done.stderr.strip()}")
    schema: dict[str, Any] = json.loads(done.stdout)
    return schema


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.lower().replace("`", ""))
    return text.replace(" ", "-")


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ").strip()


def _code(value: object) -> str:
    """A value as it is written in YAML: plain words bare, everything else as JSON."""
    if isinstance(value, str) and re.fullmatch(r"[\w./:@+-]+", value) and value not in ("null", "true", "false"):
        return f"`{value}`"
    return f"`{json.dumps(value)}`"


@dataclass
class Section:
    """One object of the schema: where it appears in the file, and its fields."""

    name: str  # the $defs key, or "" for the top level
    paths: list[str] = field(default_factory=list)
    schema: dict[str, Any] = field(default_factory=dict)

    def heading(self, filename: str) -> str:
        if not self.name:
            return f"Top level of {filename}"
        shown = [f"`{p}`" for p in self.paths]
        where = shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + f" and {shown[-1]}"
        return f"{where} in {filename}"


class Reference:
    """The sections of one file's schema, in the order a reader meets them."""

    def __init__(self, filename: str, schema: dict[str, Any]) -> None:
        self.filename = filename
        self.defs: dict[str, Any] = schema.get("$defs", {})
        self.sections: dict[str, Section] = {"": Section("", [filename], schema)}
        self._walk(schema, "")

    # ------------------------------------------------------------ finding the objects

    def _ref(self, schema: dict[str, Any]) -> str | None:
        ref = schema.get("$ref")
        return str(ref).rsplit("/", 1)[-1] if ref else None

    def _children(self, schema: dict[str, Any], path: str) -> list[tuple[str, str]]:
        """(def name, path) of every object with fields that this property's value holds."""
        found: list[tuple[str, str]] = []
        name = self._ref(schema)
        if name is not None and self.defs.get(name, {}).get("properties"):
            found.append((name, path))
        for option in schema.get("anyOf", []):
            found += self._children(option, path)
        if isinstance(schema.get("items"), dict):
            found += self._children(schema["items"], f"{path}[]")
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            found += self._children(extra, f"{path}.<{_key_name(path)}>")
        return found

    def _walk(self, schema: dict[str, Any], prefix: str) -> None:
        for key, prop in (schema.get("properties") or {}).items():
            for name, path in self._children(prop, f"{prefix}{key}"):
                first = name not in self.sections
                section = self.sections.setdefault(name, Section(name, [], self.defs[name]))
                section.paths.append(path)
                if first:  # a model met again (or recursively) is described once
                    self._walk(self.defs[name], f"{path}.")

    # ------------------------------------------------------------ rendering

    def anchor(self, name: str) -> str:
        return slug(self.sections[name].heading(self.filename))

    def type_of(self, schema: dict[str, Any], path: str) -> str:
        name = self._ref(schema)
        if name is not None:
            if name in self.sections:
                paths = self.sections[name].paths
                return f"[`{path if path in paths else paths[0]}`](#{self.anchor(name)})"
            return self.type_of(self.defs[name], path)
        if "const" in schema:
            return f"always {_code(schema['const'])}"
        if "enum" in schema:
            return "one of " + ", ".join(_code(v) for v in schema["enum"])
        if "anyOf" in schema:
            options = [o for o in schema["anyOf"] if o.get("type") != "null"]
            text = " or ".join(self.type_of(o, path) for o in options)
            return text + " or null" if len(options) < len(schema["anyOf"]) else text
        kind = schema.get("type")
        if isinstance(kind, list):
            text = " or ".join(str(k) for k in kind)
        elif kind == "array":
            items = schema.get("items")
            inner = self.type_of(items, f"{path}[]") if isinstance(items, dict) else "anything"
            text = f"list, each {inner}" if inner.startswith("one of") else f"list of {inner}"
        elif kind == "object":
            text = self._mapping(schema, path)
        else:
            text = str(kind or "anything")
        return text + _limits(schema)

    def _mapping(self, schema: dict[str, Any], path: str) -> str:
        extra = schema.get("additionalProperties")
        keys = (schema.get("propertyNames") or {}).get("enum")
        if not isinstance(extra, dict):
            return "mapping of any keys" if extra is not False else "object"
        key = _key_name(path)
        value = self.type_of(extra, f"{path}.<{key}>")
        if keys:
            return "mapping from " + ", ".join(_code(k) for k in keys) + f" to {value}"
        return f"mapping from each `<{key}>` to {value}"

    def table(self, section: Section) -> str:
        required = set(section.schema.get("required", []))
        prefix = "" if not section.name else f"{section.paths[0]}."
        rows = ["| Field | Type | Default | Meaning |", "| --- | --- | --- | --- |"]
        for key, prop in (section.schema.get("properties") or {}).items():
            if key in required:
                default = "required"
            elif "default" in prop:
                default = _code(prop["default"])
            else:
                default = ""
            kind = self.type_of(prop, f"{prefix}{key}")
            rows.append(f"| `{key}` | {_cell(kind)} | {_cell(default)} | {_cell(prop.get('description', ''))} |")
        return "\n".join(rows)

    def render(self) -> list[str]:
        parts = [f"## Field reference: {self.filename}"]
        for section in self.sections.values():
            parts.append(f"### {section.heading(self.filename)}")
            about = section.schema.get("description")
            if about:
                parts.append(str(about))
            parts.append(self.table(section))
        return parts


def _key_name(path: str) -> str:
    last = path.rsplit(".", 1)[-1].rstrip("[]")
    return {"tiers": "tier", "teams": "team", "lanes": "lane", "schema": "array"}.get(last, "name")


def _limits(schema: dict[str, Any]) -> str:
    low, high = schema.get("minimum"), schema.get("maximum")
    words = []
    if low is not None and high is not None:
        words.append(f"{low} to {high}")
    elif low is not None:
        words.append(f"at least {low}")
    elif high is not None:
        words.append(f"at most {high}")
    if "minItems" in schema:
        words.append(f"at least {schema['minItems']} item{'s' if schema['minItems'] != 1 else ''}")
    if "pattern" in schema:
        words.append(f"matching `{schema['pattern']}`")
    return f" ({', '.join(words)})" if words else ""


def render(schemas: dict[str, dict[str, Any]]) -> str:
    """The generated part of docs/spec.md, markers included."""
    parts = [START, NOTE]
    for filename, schema in schemas.items():
        parts += Reference(filename, schema).render()
    parts.append(END)
    return "\n\n".join(parts)


def replace(document: str, generated: str) -> str | None:
    """The document with its generated part replaced, or None when it lacks the markers."""
    start, end = document.find(START), document.find(END)
    if start < 0 or end < start:
        return None
    return document[:start] + generated + document[end + len(END) :]


def _shown(path: Path) -> str:
    try:
        return path.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate or check the field reference in docs/spec.md.")
    parser.add_argument("--check", action="store_true", help="exit 1 when the reference is stale")
    parser.add_argument("--file", type=Path, default=SPEC_DOC, help="the document (default: docs/spec.md)")
    args = parser.parse_args(argv)
    path: Path = args.file
    shown = _shown(path)
    current = path.read_text(encoding="utf-8") if path.exists() else ""
    generated = render({filename: load_schema(cli) for filename, cli in FILES})
    expected = replace(current, generated)
    if expected is None:
        print(f"error: {shown} lacks the markers {START} and {END}", file=sys.stderr)
        return 1
    if expected == current:
        return 0
    if args.check:
        print(f"error: {shown} is stale: run python scripts/spec_reference.py", file=sys.stderr)
        return 1
    path.write_text(expected, encoding="utf-8")
    print(f"wrote {shown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
