"""YAML loading that remembers where every value came from.

pydantic reports a location as a path of keys (``("resources", "gpu_count")``); people need a line
number. We compose the YAML node tree once and walk it along that path to find the line.
"""

from __future__ import annotations

import difflib
import os
import re
import stat
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


# Bounds on what a config file may be. gpuline.yml and policy.yml are a few kilobytes; these are far
# above any real one and far below what hangs the loader or floods the ledger: an alias bomb expands
# exponentially, a deep nesting overflows the recursive composer, a 50 MB value is copied into every
# run record.
MAX_BYTES = 256 * 1024
MAX_NODES = 50_000
"""Nodes after expanding every alias: what validation and every later walk of the data visit."""
MAX_DEPTH = 64
MAX_SCALAR = 64 * 1024
_MAX_DIGITS = 4000
_DIGITS = re.compile(r"[-+]?[0-9_]+")
_FEWER = "an alias counts as a copy of its anchor: use fewer aliases or fewer values"


def load_yaml(path: Path, text: str | None = None) -> YamlDocument:
    """Parse ``path`` (or ``text`` said to come from it); syntax errors, duplicate keys and inputs over
    the bounds above are ConfigErrors naming the line."""
    if text is None:
        text = _decode(path, _read_bounded(path))
    elif len(text) > MAX_BYTES:
        raise _too_big(path, len(text.encode("utf-8", "replace")), text.count("\n", 0, MAX_BYTES) + 1)
    try:
        _check_bounds(path, text)
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        _reject_duplicate_keys(path, root)
        data = _construct(root)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line = mark.line + 1 if mark is not None else None
        raise ConfigError(
            f"not valid YAML: {exc.problem}",
            location=Location(path, line=line),
            hint="fix the YAML syntax at that line (indentation, quotes, a missing colon)",
        ) from None
    except yaml.reader.ReaderError as exc:
        raise ConfigError(
            f"contains a character YAML does not allow ({_codepoint(exc.character)})",
            location=Location(path, line=text.count("\n", 0, exc.position) + 1),
            hint="remove the control character or binary data at that line (a config file is plain text)",
        ) from None
    except (yaml.YAMLError, RecursionError, ValueError) as exc:
        # Any other refusal of the parser: still the file's fault, still one line.
        raise ConfigError(f"not valid YAML: {type(exc).__name__}", location=Location(path)) from None
    return YamlDocument(path=path, data=data, root=root)


def _construct(root: yaml.Node | None) -> Any:
    """The Python data of the composed tree (what ``yaml.safe_load`` returns, without parsing again)."""
    if root is None:
        return None
    return yaml.SafeLoader("").construct_document(root)


def _read_bounded(path: Path) -> bytes:
    """The file's bytes: a regular file of at most MAX_BYTES (never /dev/zero, a FIFO or a folder)."""
    try:
        with path.open("rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                raise ConfigError(
                    "not a regular file", location=Location(path), hint="point --config or --policy at a YAML file"
                )
            data = fh.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(
            "file not found", location=Location(path), hint=f"create {path.name} or pass --config PATH"
        ) from None
    except IsADirectoryError:
        raise ConfigError("is a directory", location=Location(path), hint="point at the YAML file itself") from None
    except OSError as exc:
        raise ConfigError(
            f"cannot read: {exc.strerror}", location=Location(path), hint="check the file's permissions"
        ) from None
    if len(data) > MAX_BYTES:
        raise _too_big(path, len(data), data.count(b"\n", 0, MAX_BYTES) + 1)
    return data


def _too_big(path: Path, size: int, line: int) -> ConfigError:
    """The file over the size bound, pointing at the line where it crosses it (the likely culprit)."""
    return ConfigError(
        f"the file passes the {MAX_BYTES:,}-byte bound of a config file on this line ({size:,} bytes read)",
        location=Location(path, line=line),
        hint="keep large data out of the config: point at it (dataset.uri) instead of inlining it",
    )


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})",
            location=Location(path, line=data.count(b"\n", 0, exc.start) + 1),
            hint="save the file as UTF-8; a config file holds no binary data",
        ) from None


def _codepoint(character: object) -> str:
    # PyYAML gives the offending character as a code point (an int) or a one-character string.
    if isinstance(character, str) and len(character) == 1:
        character = ord(character)
    return f"#x{character:04x}" if isinstance(character, int) else "a control character"


@dataclass
class _Frame:
    """A collection being scanned: its field path, its size so far, and (in a mapping) the next key."""

    trail: str
    anchor: str | None
    mapping: bool
    nodes: int = 1
    items: int = 0
    key: str | None = None


def _trail_of(top: _Frame | None) -> str:
    """The dotted field of the next node inside ``top`` (a key is shown at its mapping)."""
    if top is None:
        return ""
    if not top.mapping:
        return f"{top.trail}[{top.items}]"
    if top.items % 2 == 0:
        return top.trail
    return f"{top.trail}.{top.key}" if top.trail else str(top.key)


def _check_bounds(path: Path, text: str) -> None:
    """One pass over the parser's events (iterative, so safe at any depth) before anything recursive
    or expanding runs: depth, scalar length, and the node count with every alias expanded."""
    stack: list[_Frame] = []
    anchors: dict[str, int] = {}
    total = 0

    def fail(event: yaml.Event, what: str, hint: str, trail: str) -> ConfigError:
        line = event.start_mark.line + 1 if event.start_mark is not None else None
        return ConfigError(what, location=Location(path, line=line, field=trail or None), hint=hint)

    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.CollectionEndEvent):
            done = stack.pop()
            if done.anchor:
                anchors[done.anchor] = done.nodes
            _count(stack, done.nodes)
            continue
        if not isinstance(event, yaml.NodeEvent):
            continue
        top = stack[-1] if stack else None
        trail = _trail_of(top)
        size = anchors.get(event.anchor or "", 1) if isinstance(event, yaml.AliasEvent) else 1
        total += size
        if total > MAX_NODES:
            if anchors:
                raise fail(event, f"more than {MAX_NODES:,} values (aliases expanded)", _FEWER, trail)
            raise fail(event, f"more than {MAX_NODES:,} values", "keep large data out of the config", trail)
        if isinstance(event, yaml.CollectionStartEvent):
            if len(stack) >= MAX_DEPTH:
                raise fail(event, f"nested more than {MAX_DEPTH} levels deep", "flatten the structure", trail)
            stack.append(_Frame(trail, event.anchor, isinstance(event, yaml.MappingStartEvent)))
            continue
        if isinstance(event, yaml.ScalarEvent):
            problem = _scalar_problem(event)
            if problem is not None:
                raise fail(event, problem, "point at large data instead of inlining it", trail)
            if event.anchor:
                anchors[event.anchor] = 1
            if top is not None and top.mapping and top.items % 2 == 0:
                top.key = event.value
        _count(stack, size)


def _scalar_problem(event: yaml.ScalarEvent) -> str | None:
    if len(event.value) > MAX_SCALAR:
        return f"a value of {len(event.value):,} characters; the most allowed is {MAX_SCALAR:,}"
    # An unquoted run of digits becomes an int, and Python refuses to convert more than a few thousand.
    if event.style is None and len(event.value) > _MAX_DIGITS and _DIGITS.fullmatch(event.value):
        return f"a number of {len(event.value):,} digits; the most allowed is {_MAX_DIGITS:,}"
    return None


def _count(stack: list[_Frame], nodes: int) -> None:
    if stack:
        stack[-1].nodes += nodes
        stack[-1].items += 1


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
