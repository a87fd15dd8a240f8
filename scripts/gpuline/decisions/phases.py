"""The paid time of a run, phase by phase: what each phase will take (p50, p90) and on what evidence.

A lease is paid from the machine starting to its release, and on a short run most of that is not
training: the machine boots and registers its runner, the job installs and pulls, the script starts,
imports its framework and loads data, saves checkpoints, is evaluated, and the machine is torn down.
Each phase is estimated from the best evidence for it, and says which:

- ``history n=N``: what past runs measured (boot per provider and instance type; the rest per config);
- ``smoke test``: what preflight's CPU smoke test measured (the script's start-up, its step time, a
  checkpoint save, an evaluation);
- ``catalog``: the pricing catalog's typical times for the provider and lane.

The phase names are the ones the run record's ledger of actual seconds uses, so an estimate can be
shown beside what the run really spent (``render.cost_comment.phase_comparison``).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from gpuline.decisions.pricing import Catalog, PhaseTimes, Span
from gpuline.runs import RunRecord
from gpuline.spec import Spec

PhaseName = Literal["queue", "boot", "setup", "train", "checkpoint", "eval", "idle", "teardown"]
PHASES: tuple[PhaseName, ...] = ("queue", "boot", "setup", "train", "checkpoint", "eval", "idle", "teardown")
BEFORE_TRAINING: tuple[PhaseName, ...] = ("boot", "setup")
"""The start-up: paid before the first step, and added to max_duration for what may be spent at most."""

MIN_HISTORY = 3
"""Fewer measurements than this are not a history: one odd run would set the phase."""
HISTORY_WINDOW = 30
SLOW_FACTOR = 1.5
"""A smoke-measured phase's p90 is its p50 x this: the smoke test ran once, on another machine."""
EVAL_P90_RUNS = 2
"""eval-gate evaluates the candidate, and the baseline too when the baseline stage has a version."""
NO_HISTORY_ERROR = 0.21
"""Median error of the whole run's p50 without history, measured by ``bench/estimate.py --no-history``
(two projects of different shape, several step counts, on a busy 2-core machine)."""


class SmokeTimings(BaseModel):
    """What the smoke test measured besides the loss, in seconds on the CPU it ran on."""

    model_config = ConfigDict(extra="ignore")

    start_s: float = Field(ge=0, description="Process start to the first step written: interpreter, imports, data.")
    step_s: float | None = Field(default=None, ge=0, description="The steady time of one step.")
    exit_s: float = Field(default=0.0, ge=0, description="The last step written to the process gone.")
    checkpoint_s: float | None = Field(default=None, ge=0, description="One checkpoint save's stall.")
    checkpoint_bytes: int | None = Field(default=None, ge=0, description="The size of one checkpoint.")
    eval_s: float | None = Field(default=None, ge=0, description="eval.command on the smoke run's model.")

    def to_json(self) -> dict[str, Any]:
        return self.model_dump()


@dataclass
class PhaseEstimate:
    name: PhaseName
    p50_s: float
    p90_s: float
    evidence: str
    """Where the numbers come from: "catalog", "smoke test", "history n=5", or several joined by " + "."""
    detail: str = ""
    paid: bool = True

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Evidence:
    """Everything a phase can be learned from, gathered once per estimate."""

    smoke: SmokeTimings | None = None
    runs: Sequence[RunRecord] = ()
    """Finished runs, newest or oldest first: boot is learned from any run on the same machine type."""
    config_hash: str = ""
    instance_type: str = ""
    dataset_bytes: int | None = None


def total(phases: Sequence[PhaseEstimate], *, paid_only: bool = True) -> tuple[float, float]:
    """(p50, p90) of the phases added up. Adding p90s overstates the slow case a little: on a busy
    machine every phase is slow together, so the phases are not independent enough to do better."""
    chosen = [p for p in phases if p.paid or not paid_only]
    return sum(p.p50_s for p in chosen), sum(p.p90_s for p in chosen)


def phases_from_json(raw: object) -> list[PhaseEstimate]:
    """The phases of an estimate as kept in the ledger (``PhaseEstimate.to_json``); unreadable entries
    are left out, so an estimate written by an older gpuline compares on what it has."""
    out: list[PhaseEstimate] = []
    for item in raw if isinstance(raw, list) else []:
        if not isinstance(item, dict) or item.get("name") not in PHASES:
            continue
        try:
            out.append(
                PhaseEstimate(
                    item["name"],
                    float(item["p50_s"]),
                    float(item["p90_s"]),
                    str(item.get("evidence", "")),
                    str(item.get("detail", "")),
                    bool(item.get("paid", True)),
                )
            )
        except (KeyError, TypeError, ValueError):
            continue
    return out


def phase(phases: Sequence[PhaseEstimate], name: PhaseName) -> PhaseEstimate | None:
    return next((p for p in phases if p.name == name), None)


# ---------------------------------------------------------------- history


def recorded_phases(record: RunRecord) -> Mapping[str, float]:
    """Actual seconds per phase as the run record keeps them (``phase_seconds``), when it does."""
    raw = getattr(record, "phase_seconds", None)
    if not isinstance(raw, Mapping):
        return {}
    return {str(k): float(v) for k, v in raw.items() if isinstance(v, int | float) and v >= 0}


@dataclass(frozen=True)
class Learned:
    span: Span
    runs: int

    @property
    def evidence(self) -> str:
        return f"history n={self.runs}"


def _learned(ev: Evidence, measure: Callable[[RunRecord], float | None], same_config: bool = True) -> Learned | None:
    """A phase's p50/p90 from the last runs that measured it (succeeded ones; of this config by default)."""
    runs = [r for r in ev.runs if r.status == "succeeded"]
    if same_config:
        runs = [r for r in runs if r.lineage.config_hash == ev.config_hash]
    runs.sort(key=lambda r: r.created_at)
    window = [v for v in (measure(r) for r in runs) if v is not None and v >= 0][-HISTORY_WINDOW:]
    if len(window) < MIN_HISTORY:
        return None
    p50 = statistics.median(window)
    p90 = statistics.quantiles(window, n=10, method="inclusive")[8]
    return Learned(Span(p50_s=p50, p90_s=max(p90, p50)), len(window))


def _seconds(later: Any, earlier: Any) -> float | None:
    return (later - earlier).total_seconds() if later is not None and earlier is not None else None


def _from_record(name: PhaseName) -> Callable[[RunRecord], float | None]:
    return lambda r: recorded_phases(r).get(name)


# ---------------------------------------------------------------- the phases


def _boot(spec: Spec, times: PhaseTimes, ev: Evidence, startup_s: int) -> PhaseEstimate:
    """Machine start to runner (or pod) ready, learned per provider and instance type from any model."""

    def measured(r: RunRecord) -> float | None:
        if r.provider != spec.resources.provider or r.instance_type != ev.instance_type:
            return None
        return recorded_phases(r).get("boot", _seconds(r.times.runner_online, r.times.provisioned))

    learned = _learned(ev, measured, same_config=False)
    if learned is not None:
        return _make("boot", learned.span, learned.evidence, f"{spec.resources.provider} {ev.instance_type}")
    span = times.boot_for(spec.resources.lane)
    if span is None:
        # A repo's own provider with only the older startup_s: all of it counts as boot.
        return PhaseEstimate("boot", startup_s, startup_s * SLOW_FACTOR, "catalog", "startup_s")
    return _make("boot", span, "catalog", f"{spec.resources.provider}, {spec.resources.lane} lane")


def _setup(times: PhaseTimes, ev: Evidence) -> tuple[PhaseEstimate, bool]:
    """Install and pull, the dataset download, and the script's own start-up up to its first step.

    Returns the phase and whether its history also covers boot (runs that recorded no runner-online
    time measure setup from the machine starting)."""
    learned = _learned(ev, _from_record("setup"))
    covers_boot = False
    if learned is None:
        learned = _learned(ev, lambda r: _seconds(r.times.first_step, r.times.runner_online or r.times.provisioned))
        same = [r for r in ev.runs if r.lineage.config_hash == ev.config_hash]
        covers_boot = learned is not None and not any(r.times.runner_online for r in same)
    if learned is not None:
        detail = "machine start to the first step" if covers_boot else "runner ready to the first step"
        return _make("setup", learned.span, learned.evidence, detail), covers_boot
    parts: list[tuple[float, float, str, str]] = []
    if times.setup is not None:
        parts.append((times.setup.p50_s, times.setup.p90_s, "catalog", "install and pull"))
    if ev.dataset_bytes and times.download_mb_per_s:
        seconds = ev.dataset_bytes / 1e6 / times.download_mb_per_s
        parts.append((seconds, seconds * SLOW_FACTOR, "catalog", f"dataset download {size_text(ev.dataset_bytes)}"))
    if ev.smoke is not None:
        start = ev.smoke.start_s
        parts.append((start, start * SLOW_FACTOR, "smoke test", "script start, imports, data load, first step"))
    return _joined("setup", parts), False


def _checkpoints(spec: Spec, steps: int | None, times: PhaseTimes, ev: Evidence, train_basis: str) -> PhaseEstimate:
    """The training stalls while checkpoints are saved: one save x the number of saves."""
    learned = _learned(ev, _from_record("checkpoint"))
    if learned is not None:
        return _make("checkpoint", learned.span, learned.evidence, "save stalls")
    if train_basis == "history":
        return PhaseEstimate("checkpoint", 0.0, 0.0, "history", "inside the measured training time")
    # A save at every interval before the last step, and the final save that is always made.
    saves = math.ceil(steps / spec.checkpoint.interval_steps) if steps else 1
    if ev.smoke is not None and ev.smoke.checkpoint_s is not None:
        one = ev.smoke.checkpoint_s
        span, evidence = Span(p50_s=one, p90_s=one * SLOW_FACTOR), "smoke test"
    elif times.checkpoint_save is not None:
        span, evidence = times.checkpoint_save, "catalog"
    else:
        return PhaseEstimate("checkpoint", 0.0, 0.0, "catalog", "no save time known")
    return PhaseEstimate(
        "checkpoint", saves * span.p50_s, saves * span.p90_s, evidence, f"{saves} x {span.p50_s:.2g} s per save"
    )


def _eval(spec: Spec, ev: Evidence) -> PhaseEstimate:
    """eval.command in eval-gate: measured on the smoke model, else the script's start-up stands in
    (the same interpreter, imports and dataset: on a small model the start-up is most of it)."""
    if spec.eval.command is None:
        return PhaseEstimate("eval", 0.0, 0.0, "gpuline.yml", "no eval.command")
    learned = _learned(ev, _from_record("eval"))
    if learned is not None:
        return _make("eval", learned.span, learned.evidence, "eval.command")
    if ev.smoke is None:
        return PhaseEstimate("eval", 0.0, 0.0, "none", "not measured (no smoke test)")
    if ev.smoke.eval_s is not None:
        one, how = ev.smoke.eval_s, "eval.command on the smoke model"
    else:
        # Measured against eval-gate on the reference example: start-up alone is within ~30%, adding
        # the exit overstated it by 1.8x (evaluation skips the trainer's loop set-up and final writes).
        one, how = ev.smoke.start_s, "the script's start-up as a stand-in"
    return PhaseEstimate("eval", one, one * SLOW_FACTOR * EVAL_P90_RUNS, "smoke test", how)


def _after(ev: Evidence, times: PhaseTimes) -> list[PhaseEstimate]:
    """idle and teardown; a history without per-phase seconds measures them with eval as one span."""
    idle = _learned(ev, _from_record("idle"))
    teardown = _learned(ev, _from_record("teardown"))
    if idle is None and teardown is None:
        lump = _learned(ev, lambda r: _seconds(r.times.released, r.times.last_step))
        if lump is not None:
            return [
                _make("idle", lump.span, lump.evidence, "last step to release: eval, hand-offs, teardown"),
                PhaseEstimate("teardown", 0.0, 0.0, lump.evidence, "inside idle"),
            ]
    out: list[PhaseEstimate] = []
    if idle is not None:
        out.append(_make("idle", idle.span, idle.evidence, "between phases"))
    else:
        parts = [(times.idle.p50_s, times.idle.p90_s, "catalog", "hand-offs")] if times.idle else []
        if ev.smoke is not None and ev.smoke.exit_s:
            exit_s = ev.smoke.exit_s
            parts.append((exit_s, exit_s * SLOW_FACTOR, "smoke test", "the script's exit"))
        out.append(_joined("idle", parts))
    if teardown is not None:
        out.append(_make("teardown", teardown.span, teardown.evidence, "release"))
    elif times.teardown is not None:
        out.append(_make("teardown", times.teardown, "catalog", "release"))
    else:
        out.append(PhaseEstimate("teardown", 0.0, 0.0, "catalog", "not in the catalog"))
    return out


def size_text(nbytes: float) -> str:
    """``1234567`` -> "1.2 MB", ``480000`` -> "480 kB"."""
    for size, unit in ((1e9, "GB"), (1e6, "MB")):
        if nbytes >= size:
            return f"{nbytes / size:,.1f} {unit}"
    return f"{nbytes / 1e3:,.0f} kB"


def _make(name: PhaseName, span: Span, evidence: str, detail: str = "") -> PhaseEstimate:
    return PhaseEstimate(name, span.p50_s, span.p90_s, evidence, detail)


def _joined(name: PhaseName, parts: Sequence[tuple[float, float, str, str]]) -> PhaseEstimate:
    """One phase from several parts, each with its own evidence (named once each, in order)."""
    evidence = " + ".join(dict.fromkeys(e for _, _, e, _ in parts)) or "catalog"
    detail = ", ".join(d for _, _, _, d in parts)
    return PhaseEstimate(name, sum(p[0] for p in parts), sum(p[1] for p in parts), evidence, detail)


def estimate_phases(
    spec: Spec, catalog: Catalog | None, train: PhaseEstimate, train_basis: str, steps: int | None, ev: Evidence
) -> list[PhaseEstimate]:
    """Every paid phase of the run, in order, around the training phase the caller estimated."""
    times = PhaseTimes()
    startup_s = 0
    if catalog is not None and catalog.key(spec.resources.provider) in catalog.providers:
        prices = catalog.provider(spec.resources.provider)
        times, startup_s = prices.phases, prices.startup_s
    setup, covers_boot = _setup(times, ev)
    boot = _boot(spec, times, ev, startup_s)
    if covers_boot:
        boot = PhaseEstimate("boot", 0.0, 0.0, setup.evidence, "inside setup (no runner-online time recorded)")
    phases = [boot, setup, train, _checkpoints(spec, steps, times, ev, train_basis), _eval(spec, ev)]
    return phases + _after(ev, times)


def expected_error(phases: Sequence[PhaseEstimate]) -> float | None:
    """The stated error of the whole run's p50 when the training phase has no history; None when it has."""
    train = phase(phases, "train")
    return None if train is not None and train.evidence.startswith("history") else NO_HISTORY_ERROR
