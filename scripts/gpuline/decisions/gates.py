"""Gate arithmetic: a candidate's metrics against absolute thresholds and a baseline's metrics."""

from __future__ import annotations

from typing import Any

from gpuline.runs import GateVerdict
from gpuline.spec import Gate


def metric_value(metrics: dict[str, Any], gate: Gate) -> float | None:
    source = metrics
    if gate.slice is not None:
        source = (metrics.get("slices") or {}).get(gate.slice) or {}
    value = source.get(gate.metric)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def gate_name(gate: Gate) -> str:
    return f"{gate.metric}[{gate.slice}]" if gate.slice else gate.metric


def evaluate(gate: Gate, candidate: dict[str, Any], baseline: dict[str, Any] | None) -> GateVerdict:
    name = gate_name(gate)
    value = metric_value(candidate, gate)
    if value is None:
        return GateVerdict(gate=name, passed=False, detail="metric missing from the candidate's eval output")
    problems: list[str] = []
    thresholds: list[str] = []
    if gate.min is not None:
        thresholds.append(f">= {gate.min:g}")
        if value < gate.min:
            problems.append(f"{value:.4g} is below the minimum {gate.min:g}")
    if gate.max is not None:
        thresholds.append(f"<= {gate.max:g}")
        if value > gate.max:
            problems.append(f"{value:.4g} is above the maximum {gate.max:g}")
    base_value = metric_value(baseline, gate) if baseline is not None else None
    if gate.max_regression is not None:
        thresholds.append(f"regression <= {gate.max_regression:.1%}")
        if base_value is not None and base_value != 0:
            # Relative change for the worse: a drop when maximizing, a rise when minimizing.
            worse = (base_value - value) if gate.goal == "maximize" else (value - base_value)
            change = worse / abs(base_value)
            if change > gate.max_regression + 1e-12:
                problems.append(f"{change:.1%} worse than the baseline's {base_value:.4g}")
    detail = (
        "; ".join(problems)
        if problems
        else ("no baseline yet" if base_value is None and gate.max_regression is not None else "")
    )
    return GateVerdict(
        gate=name,
        passed=not problems,
        value=value,
        threshold=", ".join(thresholds),
        baseline=base_value,
        detail=detail,
    )
