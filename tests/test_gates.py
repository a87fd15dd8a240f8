from __future__ import annotations

import pytest

from gpuline.decisions.gates import evaluate
from gpuline.spec import Gate

CANDIDATE = {"accuracy": 0.90, "loss": 0.30, "slices": {"night": {"accuracy": 0.70}}, "flag": True}


def test_absolute_thresholds() -> None:
    assert evaluate(Gate(metric="accuracy", min=0.85), CANDIDATE, None).passed
    verdict = evaluate(Gate(metric="accuracy", min=0.95), CANDIDATE, None)
    assert not verdict.passed and "below the minimum 0.95" in verdict.detail
    verdict = evaluate(Gate(metric="loss", goal="minimize", max=0.25), CANDIDATE, None)
    assert not verdict.passed and "above the maximum" in verdict.detail


def test_relative_regression_against_the_baseline() -> None:
    gate = Gate(metric="accuracy", max_regression=0.02)
    assert evaluate(gate, CANDIDATE, {"accuracy": 0.91}).passed  # 1.1% drop
    verdict = evaluate(gate, CANDIDATE, {"accuracy": 0.95})  # 5.3% drop
    assert not verdict.passed and "5.3% worse" in verdict.detail and verdict.baseline == 0.95
    assert evaluate(gate, CANDIDATE, {"accuracy": 0.80}).passed  # better is always fine


def test_regression_for_a_metric_to_minimize() -> None:
    gate = Gate(metric="loss", goal="minimize", max_regression=0.1)
    assert evaluate(gate, CANDIDATE, {"loss": 0.29}).passed  # 3% worse
    assert not evaluate(gate, CANDIDATE, {"loss": 0.20}).passed  # 50% worse


def test_no_baseline_yet_passes_and_says_so() -> None:
    verdict = evaluate(Gate(metric="accuracy", max_regression=0.02), CANDIDATE, None)
    assert verdict.passed and verdict.detail == "no baseline yet"


def test_slices() -> None:
    assert evaluate(Gate(metric="accuracy", slice="night", min=0.6), CANDIDATE, None).passed
    verdict = evaluate(Gate(metric="accuracy", slice="night", min=0.8), CANDIDATE, None)
    assert not verdict.passed and verdict.gate == "accuracy[night]"
    missing = evaluate(Gate(metric="accuracy", slice="day", min=0.1), CANDIDATE, None)
    assert not missing.passed and "missing" in missing.detail


@pytest.mark.parametrize("metric", ["recall", "flag"])
def test_missing_or_non_numeric_metric_fails(metric: str) -> None:
    verdict = evaluate(Gate(metric=metric, min=0.1), CANDIDATE, None)
    assert not verdict.passed and "missing" in verdict.detail
