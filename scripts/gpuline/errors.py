"""One small exception hierarchy; ``cli.main`` is the only place that turns it into output.

Exit codes are part of the command contract that scripts and CI rely on:
2 for bad input, 1 for a refusal (a gate or a policy said no), 3 for infrastructure.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class Location:
    """Where in a user's file the problem is, so annotations can point at the line."""

    file: Path | str
    line: int | None = None
    column: int | None = None
    field: str | None = None

    def render(self) -> str:
        where = str(self.file)
        if self.line is not None:
            where += f":{self.line}"
        if self.field:
            where += f": {self.field}"
        return where


class GpulineError(Exception):
    """Base class: a message for people, a hint saying what to change, an exit code."""

    exit_code = 3
    title = "gpuline error"

    def __init__(self, message: str, *, hint: str | None = None, location: Location | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
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
