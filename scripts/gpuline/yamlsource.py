"""YAML loading that remembers where every value came from.

pydantic reports a location as a path of keys (``("resources", "gpu_count")``); people need a line
number. We compose the YAML node tree once and walk it along that path to find the line.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gpuline.errors import ConfigError, Location


@dataclass
class YamlDocument:
    path: Path
    data: Any
    root: yaml.Node | None

    def line_of(self, loc: tuple[int | str, ...]) -> int | None:
        """1-based line of the deepest node along ``loc`` that exists (a missing key points at its parent)."""
        node = self.root
        line = node.start_mark.line + 1 if node is not None else None
        for part in loc:
            child = _child(node, part)
            if child is None:
                break
            key_node, node = child
            # An unknown key is best shown at the key itself; a value at the value.
            line = (key_node or node).start_mark.line + 1
        return line


def _child(node: yaml.Node | None, part: int | str) -> tuple[yaml.Node | None, yaml.Node] | None:
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.value == str(part):
                return key, value
    elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
        child: yaml.Node = node.value[part]
        return None, child
    return None


def load_yaml(path: Path, text: str | None = None) -> YamlDocument:
    """Parse ``path`` (or ``text`` said to come from it); syntax errors and duplicate keys are ConfigErrors."""
    if text is None:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(
                "file not found", location=Location(path), hint=f"create {path.name} or pass --config PATH"
            ) from None
        except OSError as exc:
            raise ConfigError(f"cannot read: {exc.strerror}", location=Location(path)) from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        _reject_duplicate_keys(path, root)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line = mark.line + 1 if mark is not None else None
        raise ConfigError(
            f"not valid YAML: {exc.problem}",
            location=Location(path, line=line),
            hint="fix the YAML syntax at that line (indentation, quotes, a missing colon)",
        ) from None
    return YamlDocument(path=path, data=data, root=root)


def _reject_duplicate_keys(path: Path, node: yaml.Node | None, trail: str = "") -> None:
    # PyYAML silently keeps the last of two equal keys; a config where half the settings vanish is worse
    # than an error.
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key, value in node.value:
            name = str(key.value)
            dotted = f"{trail}.{name}" if trail else name
            if name in seen:
                raise ConfigError(
                    f"duplicate key (first defined on line {seen[name]})",
                    location=Location(path, line=key.start_mark.line + 1, field=dotted),
                    hint="keep one of the two",
                )
            seen[name] = key.start_mark.line + 1
            _reject_duplicate_keys(path, value, dotted)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _reject_duplicate_keys(path, item, f"{trail}[{index}]")


def dotted(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def closest(word: str, choices: list[str]) -> str | None:
    match = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return match[0] if match else None
