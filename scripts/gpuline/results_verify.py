"""The result of ``gpuline verify``: what was checked on the version a stage now holds."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gpuline.results import StepResult
from gpuline.runs import GateVerdict


@dataclass
class VerifyResult(StepResult):
    model: str
    stage: str
    version: int
    checks: list[tuple[str, str]]
    """(what was checked, what was found), in order."""
    verdicts: list[GateVerdict] = field(default_factory=list)
    baseline: str = ""
    passed: bool = True
    command: str = field(init=False, default="verify")

    def outputs(self) -> dict[str, object]:
        return {"verdict": "pass" if self.passed else "fail", "version": self.version}

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "stage": self.stage,
            "version": self.version,
            "verdict": "pass" if self.passed else "fail",
            "checks": dict(self.checks),
            "gates": [v.model_dump(mode="json") for v in self.verdicts],
            "baseline": self.baseline,
        }
