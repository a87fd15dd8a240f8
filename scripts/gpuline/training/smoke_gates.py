"""Preflight's check that every gate names a metric the project writes, on what its smoke run wrote:
the script's own eval metrics in smoke mode, or eval.command run on the smoke run's model. A gate
that cannot be read would otherwise fail only after training, on a GPU that was paid for."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from gpuline.errors import ConfigError, Location, clip
from gpuline.spec import Gate, Spec
from gpuline.training.smoke import TimedSmokeResult


@dataclass
class SmokeMetrics:
    """The eval metrics the gates can be checked against, and who wrote them."""

    metrics: dict[str, Any] | None
    source: str  # "the script" or "eval.command"
    why_not: str = ""  # when metrics is None


def smoke_metrics(spec: Spec, result: TimedSmokeResult) -> SmokeMetrics:
    if not spec.eval.command:
        why = "the script wrote no eval metrics in smoke mode"
        return SmokeMetrics(result.eval_metrics, "the script", why)
    ran = result.evaluated
    if ran is None:
        why = "eval.command could not run in preflight: the smoke run wrote no model to GPULINE_OUTPUT_DIR"
    elif ran.exit_code != 0:
        code = "timed out" if ran.exit_code is None else f"exited {ran.exit_code}"
        why = f"eval.command {code} on the smoke model (eval-gate runs it on the trained one)"
    else:
        why = "eval.command wrote no metrics on the smoke model"
    return SmokeMetrics(ran.metrics if ran else None, "eval.command", why)


def check(gates: Sequence[Gate], found: SmokeMetrics, where: Callable[[int, str], Location]) -> str:
    """The preflight row; raises ConfigError at the first gate whose metric or slice is not written."""
    if not gates:
        return "no gates"
    metrics, by = found.metrics, found.source
    if metrics is None:
        return f"{len(gates)} gate(s); {found.why_not}, so none could be checked"
    for i, gate in enumerate(gates):
        source = metrics if gate.slice is None else (metrics.get("slices") or {}).get(gate.slice)
        key = "metric" if isinstance(source, dict) else "slice"
        if isinstance(source, dict) and gate.metric in source:
            continue
        names = sorted(str(k) for k in (source if isinstance(source, dict) else metrics.get("slices") or {}))
        what = f"metric {gate.metric!r}" if key == "metric" else f"slice {gate.slice!r}"
        raise ConfigError(
            f"{by} writes no {what} in its eval metrics (it writes: {clip(', '.join(names) or 'none', 200)})",
            location=where(i, key),
            hint=f"name one that {by} writes in eval.gates[{i}].{key}, or write it from there",
        )
    return f"{len(gates)} gate(s) read metrics {by} writes"
