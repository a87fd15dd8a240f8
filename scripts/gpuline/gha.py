"""GitHub Actions workflow commands and file commands, done as actions/toolkit's core does them.

Outside Actions (no ``GITHUB_ACTIONS``) everything degrades to plain terminal output, so the same
commands read well on a laptop.
"""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from gpuline.errors import Location


def in_actions() -> bool:
    return os.environ.get("GITHUB_ACTIONS") == "true"


def _escape_data(value: str) -> str:
    return value.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(value: str) -> str:
    return _escape_data(value).replace(":", "%3A").replace(",", "%2C")


def _stream() -> TextIO:
    # The runner reads workflow commands from stderr as well as stdout; with --json stdout is reserved
    # for the one JSON document.
    return sys.stderr if _json_mode else sys.stdout


def _command(name: str, message: str, props: dict[str, str | int | None] | None = None) -> None:
    rendered = ",".join(f"{k}={_escape_property(str(v))}" for k, v in (props or {}).items() if v is not None)
    print(f"::{name}{' ' + rendered if rendered else ''}::{_escape_data(message)}", file=_stream(), flush=True)


def _append_file_command(env_name: str, key: str, value: str) -> bool:
    """Write ``key<<DELIM\\nvalue\\nDELIM`` to the file named by ``env_name``; False if not in Actions."""
    target = os.environ.get(env_name)
    if not target:
        return False
    # A random delimiter, checked against the content, so a value can never end the block early and
    # inject further outputs (the toolkit does the same).
    delimiter = f"ghadelimiter_{secrets.token_hex(16)}"
    if delimiter in key or delimiter in value:
        raise ValueError("output value contains the delimiter")
    with Path(target).open("a", encoding="utf-8") as fh:
        fh.write(f"{key}<<{delimiter}\n{value}\n{delimiter}\n")
    return True


def set_output(name: str, value: str) -> None:
    _append_file_command("GITHUB_OUTPUT", name, value)


def export_env(name: str, value: str) -> None:
    if not _append_file_command("GITHUB_ENV", name, value):
        os.environ[name] = value


def mask(value: str) -> None:
    """Ask the runner to redact ``value`` from every later log line (each line of it, as the runner masks lines)."""
    if not value or not in_actions():
        return
    for line in value.splitlines():
        if line.strip():
            _command("add-mask", line)


def append_summary(markdown: str) -> None:
    target = os.environ.get("GITHUB_STEP_SUMMARY")
    if target:
        with Path(target).open("a", encoding="utf-8") as fh:
            fh.write(markdown.rstrip() + "\n\n")


def annotate(level: str, message: str, *, title: str | None = None, location: Location | None = None) -> None:
    """An error/warning/notice: an annotation in Actions, a plain ``level: message`` line elsewhere."""
    if in_actions():
        props: dict[str, str | int | None] = {"title": title}
        if location is not None:
            props = {
                "file": _workspace_path(location.file),
                "line": location.line,
                "col": location.column,
                "title": title,
            }
        _command(level, message, props)
    else:
        print(f"{level}: {message}", file=sys.stderr, flush=True)


def _workspace_path(file: Path | str) -> str:
    """GitHub attaches an annotation to a file only by its path relative to the repository root."""
    workspace = os.environ.get("GITHUB_WORKSPACE")
    path = Path(file)
    if not workspace:
        return str(path)
    try:
        return path.resolve().relative_to(Path(workspace).resolve()).as_posix()
    except ValueError:
        return str(path)


def info(message: str) -> None:
    print(message, file=_stream(), flush=True)


@contextmanager
def group(title: str) -> Iterator[None]:
    if in_actions():
        print(f"::group::{title}", file=_stream(), flush=True)
        try:
            yield
        finally:
            print("::endgroup::", file=_stream(), flush=True)
    else:
        info(f"== {title}")
        yield


# With --json, stdout carries exactly one JSON document; human lines go to stderr.
_json_mode = False


def set_json_mode(enabled: bool) -> None:
    global _json_mode
    _json_mode = enabled
