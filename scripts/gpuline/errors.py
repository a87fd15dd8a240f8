"""One small exception hierarchy; ``cli.main`` is the only place that turns it into output.

Exit codes are part of the command contract that scripts and CI rely on:
2 for bad input, 1 for a refusal (a gate or a policy said no), 3 for infrastructure.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# The longest message, hint or field an error carries. An error echoes what it was given (a value, a
# key, a path), and a hostile input must not turn one line of output into megabytes.
MAX_TEXT = 500
MAX_FIELD = 120


def clip(text: str, limit: int = MAX_TEXT) -> str:
    """``text`` on one line and at most ``limit`` characters, saying how much was cut."""
    flat = " ".join(text.splitlines()) if "\n" in text or "\r" in text else text
    if len(flat) <= limit:
        return flat
    return f"{flat[: max(limit - 30, 1)]}… ({len(flat):,} characters)"


def clip_repr(value: object, limit: int = 80) -> str:
    """``repr(value)`` for an error message, clipped (a 50 MB value is shown by its start and length)."""
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]!r}… ({len(value):,} characters)"
    return clip(repr(value), limit)


@dataclass
class Location:
    """Where in a user's file the problem is, so annotations can point at the line."""

    file: Path | str
    line: int | None = None
    column: int | None = None
    field: str | None = None

    def render(self) -> str:
        where = clip(str(self.file), MAX_FIELD * 2)
        if self.line is not None:
            where += f":{self.line}"
        if self.field:
            where += f": {clip(self.field, MAX_FIELD)}"
        return where


class GpulineError(Exception):
    """Base class: a message for people, a hint saying what to change, an exit code."""

    exit_code = 3
    title = "gpuline error"

    def __init__(self, message: str, *, hint: str | None = None, location: Location | None = None) -> None:
        message = clip(message)
        super().__init__(message)
        self.message = message
        self.hint = clip(hint) if hint is not None else None
        self.location = location
        # What the failing step produced before it failed (a gpuline.results.StepResult: a denied
        # estimate, a failed gate), written out by the CLI before the error itself.
        self.result: object | None = None

    def with_result(self, result: object) -> GpulineError:
        self.result = result
        return self

    def one_line(self) -> str:
        text = self.message
        if self.location is not None:
            text = f"{self.location.render()}: {text}"
        if self.hint:
            text = f"{text} (fix: {self.hint})"
        return text


class InputError(GpulineError):
    """The user's files, flags or environment are wrong: exit 2."""

    exit_code = 2
    title = "invalid input"


class ConfigError(InputError):
    """gpuline.yml or policy.yml does not match its schema."""

    title = "invalid configuration"


class RefusedError(GpulineError):
    """A policy or a gate said no: exit 1. Not a bug, a decision."""

    exit_code = 1
    title = "refused"


class PolicyDenied(RefusedError):
    title = "denied by policy"


class GateFailed(RefusedError):
    title = "eval gate failed"


class InfraError(GpulineError):
    """A provider, ledger, store or registry failed: exit 3."""

    exit_code = 3
    title = "infrastructure error"


class NotFoundError(InputError):
    """A run id, model or version that does not exist."""

    title = "not found"
