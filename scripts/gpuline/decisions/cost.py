"""What a run will cost: a duration estimate x the catalog's price x the provider's billing increments.

The duration comes from the best evidence at hand, and always says which it used:

1. ``history``: finished runs of the same model and config hash in the ledger (training wall time,
   first step to last step), with a robust trend so a dataset that grows every night is followed;
2. ``smoke``: the spec's step count x the step time the CPU smoke test measured in preflight x the
   catalog's CPU-to-GPU speed ratio;
3. ``max_duration``: the spec's hard stop, labelled as an upper bound.

That is the training phase. A lease is billed from the machine starting to its release, so the
estimate adds every other paid phase (boot, setup, checkpoints, eval, idle, teardown; see
:mod:`gpuline.decisions.phases`), each from its own best evidence, and prices the whole paid time.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from gpuline.decisions.phases import BEFORE_TRAINING, Evidence, PhaseEstimate, SmokeTimings, estimate_phases
from gpuline.decisions.phases import expected_error as stated_error
from gpuline.decisions.phases import total as phases_total
from gpuline.decisions.pricing import Catalog, Instance
from gpuline.errors import InputError
from gpuline.runs import Ledger, RunRecord
from gpuline.spec import Spec

Basis = Literal["history", "smoke", "max_duration"]

MIN_HISTORY = 3
"""Fewer finished runs than this are not a history: one odd run would set the estimate."""
HISTORY_WINDOW = 30
"""Only the most recent runs count, so an old regime (a smaller dataset, older code) fades out."""
TREND_MIN = 8
"""From this many runs on, a trend is fitted instead of taking the plain median."""
SMOKE_P90_FACTOR = 1.5
"""Without history there is no measured spread; p90 is p50 x this, and the note says so."""
STEP_KEYS = ("steps", "max_steps", "train_steps", "total_steps")


@dataclass
class DurationEstimate:
    """Training wall time (first step to last step), the start-up before it, and every paid phase."""

    p50_s: float
    p90_s: float
    basis: Basis
    runs: int = 0
    note: str = ""
    startup_s: float = 0.0
    """Paid before the first step (boot + setup, p50): added to max_duration for the most a run may cost."""
    startup_note: str = ""
    trend_pct_per_run: float | None = None
    phases: list[PhaseEstimate] = field(default_factory=list)
    expected_error: float | None = None
    """The stated error of the paid p50 when training has no history (a fraction); None with history."""
    dataset_bytes: int | None = None
    """Pulled onto the machine once per node per run (egress from the store)."""
    checkpoint_bytes: int | None = None
    """One checkpoint, as the smoke test saved it; checkpoint.keep of them stay in storage."""

    @property
    def upper_bound(self) -> bool:
        return self.basis == "max_duration"

    @property
    def paid_p50_s(self) -> float:
        """The whole paid time on a typical run: every paid phase, or start-up + training without phases."""
        return phases_total(self.phases)[0] if self.phases else self.startup_s + self.p50_s

    @property
    def paid_p90_s(self) -> float:
        return phases_total(self.phases)[1] if self.phases else self.startup_s + self.p90_s


@dataclass
class CostEstimate:
    provider: str
    instance_type: str
    gpu_type: str
    gpus_per_node: int
    nodes: int
    lane: str
    hourly_usd: float
    duration: DurationEstimate
    max_duration_s: int
    gpu_hours_p50: float
    gpu_hours_p90: float
    usd_p50: float
    usd_p90: float
    # What the run may spend at most before max_duration stops it: this is what quota reserves.
    gpu_hours_cap: float
    usd_cap: float
    catalog_version: str
    billing_increment_s: int = 1
    billing_minimum_s: int = 0
    notes: list[str] = field(default_factory=list)
    egress_usd: float = 0.0
    """The dataset pulled onto the machines, per run (included in the dollars above)."""
    storage_usd_month: float | None = None
    """A month of the kept checkpoints in the store (included above); None when their size is unknown."""

    @property
    def lease_p50_s(self) -> float:
        """Seconds the machine is expected to be held: the whole paid time, p50."""
        return self.duration.paid_p50_s

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def device_count(instance: Instance, nodes: int) -> int:
    # A CPU-only machine still occupies one slot; counting it as one device keeps local and CPU runs
    # visible in GPU-second accounting instead of showing zero.
    return max(instance.gpus, 1) * nodes


# ---------------------------------------------------------------- duration


@dataclass
class HistorySample:
    training_s: float
    held_s: float | None


def history_samples(records: Sequence[RunRecord], config_hash: str) -> list[HistorySample]:
    """Finished runs of one config, oldest first, with their training and lease-held seconds."""
    samples: list[tuple[Any, HistorySample]] = []
    for r in records:
        t = r.times
        if r.lineage.config_hash != config_hash or r.status != "succeeded":
            continue
        if t.first_step is None or t.last_step is None:
            continue
        training = (t.last_step - t.first_step).total_seconds()
        if training <= 0:
            continue
        held = (t.released - t.provisioned).total_seconds() if t.released and t.provisioned else None
        samples.append((t.first_step, HistorySample(training, held if held and held >= training else None)))
    samples.sort(key=lambda pair: pair[0])
    return [s for _, s in samples]


def from_history(durations: Sequence[float]) -> tuple[float, float, float | None]:
    """(p50, p90, trend per run as a fraction) of the next run, from durations oldest first.

    With enough runs a Theil-Sen line (the median of all pairwise slopes: one outlier cannot tilt it)
    is extrapolated one run ahead; the spread around the line gives p90. With few runs, the plain
    median and 90th percentile.
    """
    window = list(durations[-HISTORY_WINDOW:])
    n = len(window)
    if n == 0:
        raise ValueError("no durations")
    if n < TREND_MIN:
        p50 = statistics.median(window)
        p90 = statistics.quantiles(window, n=10, method="inclusive")[8] if n >= 2 else p50
        return p50, max(p90, p50), None
    slopes = [(window[j] - window[i]) / (j - i) for i in range(n) for j in range(i + 1, n)]
    slope = statistics.median(slopes)
    intercept = statistics.median(y - slope * x for x, y in enumerate(window))
    residuals = [y - (intercept + slope * x) for x, y in enumerate(window)]
    # Extrapolate one run ahead, but never far outside what was actually observed.
    predicted = intercept + slope * n
    predicted = min(max(predicted, 0.5 * min(window)), 1.5 * max(window))
    spread = statistics.quantiles(residuals, n=10, method="inclusive")[8] - statistics.median(residuals)
    p90 = predicted + max(spread, 0.0)
    level = statistics.median(window)
    return predicted, p90, (slope / level if level > 0 else None)


def spec_steps(spec: Spec) -> int | None:
    for key in STEP_KEYS:
        value = spec.hyperparameters.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def estimate_duration(
    spec: Spec,
    ledger: Ledger | None,
    smoke_step_s: float | None = None,
    catalog: Catalog | None = None,
    *,
    smoke: SmokeTimings | None = None,
    dataset_bytes: int | None = None,
) -> DurationEstimate:
    """p50/p90 training time from history, else from the smoke test, else the max duration (an upper bound);
    and around it every other paid phase, from the ledger, the smoke test's timings and the catalog."""
    model_runs: list[RunRecord] = []
    all_runs: list[RunRecord] = []
    if ledger is not None:
        model_runs = ledger.list_runs(model=spec.model.name, limit=500)
        all_runs = ledger.list_runs(limit=500)
    samples = history_samples(model_runs, spec.config_hash())
    if smoke_step_s is None and smoke is not None:
        smoke_step_s = smoke.step_s
    d = _training(spec, samples, smoke_step_s, catalog)
    evidence = Evidence(
        smoke=smoke,
        runs=_unique(model_runs + all_runs),
        config_hash=spec.config_hash(),
        instance_type=_instance_type(spec, catalog),
        dataset_bytes=dataset_bytes,
    )
    train = PhaseEstimate("train", d.p50_s, d.p90_s, _train_evidence(d), d.note)
    d.phases = estimate_phases(spec, catalog, train, d.basis, spec_steps(spec), evidence)
    before = [p for p in d.phases if p.name in BEFORE_TRAINING]
    d.startup_s = sum(p.p50_s for p in before)
    d.startup_note = "; ".join(f"{p.name} {p.p50_s:,.1f} s ({p.evidence})" for p in before)
    d.expected_error = stated_error(d.phases)
    d.dataset_bytes = dataset_bytes
    d.checkpoint_bytes = smoke.checkpoint_bytes if smoke else None
    return d


def _train_evidence(d: DurationEstimate) -> str:
    return {"history": f"history n={d.runs}", "smoke": "smoke test", "max_duration": "max_duration"}[d.basis]


def _unique(runs: list[RunRecord]) -> list[RunRecord]:
    return list({r.run_id: r for r in runs}.values())


def _instance_type(spec: Spec, catalog: Catalog | None) -> str:
    """The instance the run will get, for learning its boot time; "" when the catalog cannot say."""
    res = spec.resources
    if catalog is None:
        return res.instance_type or ""
    try:
        return catalog.choose(res.provider, res.gpu_type, res.gpu_count, res.instance_type, res.lane)[0]
    except InputError:
        return res.instance_type or ""


def _training(
    spec: Spec, samples: list[HistorySample], smoke_step_s: float | None, catalog: Catalog | None
) -> DurationEstimate:
    """The training phase alone (first step to last step)."""
    max_s = float(spec.resources.max_duration)
    if len(samples) >= MIN_HISTORY:
        p50, p90, trend = from_history([s.training_s for s in samples])
        used = min(len(samples), HISTORY_WINDOW)
        note = f"from the last {used} finished runs of this config"
        if trend is not None:
            note += f" (trend {trend * 100:+.1f}% per run)"
        if p90 > max_s:
            note += "; capped at max_duration"
        return DurationEstimate(min(p50, max_s), min(p90, max_s), "history", used, note, trend_pct_per_run=trend)
    steps = spec_steps(spec)
    factor, factor_note = _speed_factor(spec, catalog)
    if smoke_step_s is not None and smoke_step_s > 0 and steps is not None and factor is not None:
        p50 = min(steps * smoke_step_s * factor, max_s)
        p90 = min(p50 * SMOKE_P90_FACTOR, max_s)
        note = (
            f"{steps} steps x {smoke_step_s * 1000:.1f} ms/step measured on CPU{factor_note}; "
            f"p90 = {SMOKE_P90_FACTOR:g} x p50 until there is history"
        )
        if len(samples):
            note += f" ({len(samples)} finished run(s) so far, {MIN_HISTORY} needed)"
        return DurationEstimate(p50, p90, "smoke", 0, note)
    missing = []
    if smoke_step_s is None:
        missing.append("no smoke-test step time (run `gpuline preflight` first)")
    if steps is None:
        missing.append(f"no step count in hyperparameters ({', '.join(STEP_KEYS[:2])})")
    if factor is None:
        missing.append(factor_note.strip("; "))
    note = "upper bound (max_duration): no history for this config yet"
    if missing:
        note += "; " + "; ".join(missing)
    return DurationEstimate(max_s, max_s, "max_duration", 0, note)


def _speed_factor(spec: Spec, catalog: Catalog | None) -> tuple[float | None, str]:
    """Multiply a CPU step time by this to get the GPU's; None when the catalog cannot say."""
    gpu = spec.resources.gpu_type
    if gpu == "cpu":
        return 1.0, ""
    if catalog is None:
        return None, "; no pricing catalog to convert CPU to GPU step time"
    cpu, target = catalog.speed("cpu"), catalog.speed(gpu)
    if cpu is None or target is None or target <= 0:
        return None, f"; the catalog has no gpu_speed for {'cpu' if cpu is None else gpu}"
    return cpu / target, f" / {target / cpu:g} ({gpu} vs CPU speed from the catalog)"


# ---------------------------------------------------------------- price


def estimate(spec: Spec, catalog: Catalog, duration: DurationEstimate) -> CostEstimate:
    """Dollars and GPU-hours of the whole paid time (p50, p90) and of the most max_duration allows,
    plus the data the run moves and keeps (egress per run, a month of its kept checkpoints)."""
    res = spec.resources
    name, instance = catalog.choose(res.provider, res.gpu_type, res.gpu_count, res.instance_type, res.lane)
    billing = catalog.provider(res.provider).billing
    hourly = instance.hourly(res.lane)
    devices = device_count(instance, res.nodes)
    notes: list[str] = []
    if res.lane == "spot" and not instance.has_spot():
        notes.append(f"{name} has no spot price in the catalog: priced on-demand")
    egress, storage = data_costs(spec, catalog, duration)

    def usd(lease_s: float) -> float:
        return round(billing.billed_seconds(lease_s) / 3600 * hourly * res.nodes + egress + (storage or 0.0), 4)

    def gpu_hours(lease_s: float) -> float:
        return round(lease_s / 3600 * devices, 4)

    most_s = duration.startup_s + res.max_duration
    return CostEstimate(
        provider=res.provider,
        instance_type=name,
        gpu_type=instance.gpu,
        gpus_per_node=instance.gpus,
        nodes=res.nodes,
        lane=res.lane,
        hourly_usd=hourly,
        duration=duration,
        max_duration_s=res.max_duration,
        gpu_hours_p50=gpu_hours(duration.paid_p50_s),
        gpu_hours_p90=gpu_hours(duration.paid_p90_s),
        usd_p50=usd(duration.paid_p50_s),
        usd_p90=usd(duration.paid_p90_s),
        gpu_hours_cap=gpu_hours(most_s),
        usd_cap=usd(most_s),
        catalog_version=catalog.version,
        billing_increment_s=billing.increment_s,
        billing_minimum_s=billing.minimum_s,
        notes=notes,
        egress_usd=egress,
        storage_usd_month=storage,
    )


def data_costs(spec: Spec, catalog: Catalog, duration: DurationEstimate) -> tuple[float, float | None]:
    """(egress dollars per run, storage dollars per month of the kept checkpoints; None: size unknown).

    Each node pulls the dataset once; ``checkpoint.keep`` checkpoints stay in the store."""
    res = spec.resources
    gb = 1e9
    egress = (duration.dataset_bytes or 0) / gb * res.nodes * catalog.egress_price(res.provider)
    if duration.checkpoint_bytes is None:
        return round(egress, 4), None
    kept = spec.checkpoint.keep * duration.checkpoint_bytes / gb
    return round(egress, 4), round(kept * catalog.storage_price(res.provider), 4)


def billing_text(est: CostEstimate) -> str:
    """How the provider rounds, in words: "billed per second, 60 s minimum"."""
    text = f"billed per {_span(est.billing_increment_s)}"
    if est.billing_minimum_s > est.billing_increment_s:
        text += f", {_span(est.billing_minimum_s, count=True)} minimum"
    return text


def _span(seconds: int, count: bool = False) -> str:
    """``3600`` -> "hour" (or "1 h" with ``count``), ``60`` -> "minute", ``1`` -> "second"."""
    for size, unit, short in ((3600, "hour", "h"), (60, "minute", "min"), (1, "second", "s")):
        if seconds >= size and seconds % size == 0:
            n = seconds // size
            if count:
                return f"{n} {short}"
            return unit if n == 1 else f"{n} {unit}s"
    return f"{seconds} s"


def actual_cost(catalog: Catalog, provider: str, instance_type: str, lane: str, nodes: int, seconds: float) -> float:
    """What a lease held for ``seconds`` costs, with the provider's rounding (0 when the catalog lacks it)."""
    prices = catalog.providers.get(provider)
    instance = prices.instances.get(instance_type) if prices else None
    if prices is None or instance is None:
        return 0.0
    return round(prices.billing.billed_seconds(seconds) / 3600 * instance.hourly(lane) * nodes, 4)
