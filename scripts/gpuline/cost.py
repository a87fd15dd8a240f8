"""What a run will cost: duration estimate x catalog price x the provider's billing increments."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Any, Literal

from gpuline.pricing import Catalog, Instance
from gpuline.runs import Ledger
from gpuline.spec import Spec

Basis = Literal["history", "smoke", "max_duration"]

MIN_HISTORY = 3


@dataclass
class DurationEstimate:
    p50_s: float
    p90_s: float
    basis: Basis
    runs: int = 0
    note: str = ""


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
    # What the run may spend at most before its TTL stops it: this is what quota reserves.
    gpu_hours_cap: float
    usd_cap: float
    catalog_version: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def device_count(instance: Instance, nodes: int) -> int:
    # A CPU-only machine still occupies one slot; counting it as one device keeps local and CPU runs
    # visible in GPU-second accounting instead of showing zero.
    return max(instance.gpus, 1) * nodes


def estimate_duration(spec: Spec, ledger: Ledger | None, smoke_step_s: float | None = None) -> DurationEstimate:
    """p50/p90 from finished runs of the same config; else from a measured step time; else the max duration."""
    max_s = float(spec.resources.max_duration)
    if ledger is not None:
        config_hash = spec.config_hash()
        past = [
            r.gpu_seconds / max(r.gpu_count, 1) / max(spec.resources.nodes, 1)
            for r in ledger.list_runs(model=spec.model.name, limit=200)
            if r.lineage.config_hash == config_hash and r.status == "succeeded" and r.gpu_seconds > 0
        ]
        if len(past) >= MIN_HISTORY:
            p50 = statistics.median(past)
            p90 = statistics.quantiles(past, n=10, method="inclusive")[8]
            return DurationEstimate(
                min(p50, max_s),
                min(p90, max_s),
                "history",
                len(past),
                f"from {len(past)} finished runs of this config",
            )
    steps = spec.hyperparameters.get("steps")
    if smoke_step_s is not None and isinstance(steps, int) and steps > 0:
        seconds = min(steps * smoke_step_s, max_s)
        return DurationEstimate(seconds, min(seconds * 1.5, max_s), "smoke", 0, "steps x measured step time")
    return DurationEstimate(max_s, max_s, "max_duration", 0, "upper bound: no history for this config yet")


def estimate(spec: Spec, catalog: Catalog, duration: DurationEstimate) -> CostEstimate:
    res = spec.resources
    name, instance = catalog.choose(res.provider, res.gpu_type, res.gpu_count, res.instance_type)
    billing = catalog.provider(res.provider).billing
    hourly = instance.hourly(res.lane)
    devices = device_count(instance, res.nodes)

    def usd(seconds: float) -> float:
        return round(billing.billed_seconds(seconds) / 3600 * hourly * res.nodes, 4)

    def gpu_hours(seconds: float) -> float:
        return round(seconds / 3600 * devices, 4)

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
        gpu_hours_p50=gpu_hours(duration.p50_s),
        gpu_hours_p90=gpu_hours(duration.p90_s),
        usd_p50=usd(duration.p50_s),
        usd_p90=usd(duration.p90_s),
        gpu_hours_cap=gpu_hours(res.max_duration),
        usd_cap=usd(res.max_duration),
        catalog_version=catalog.version,
    )


def actual_cost(catalog: Catalog, provider: str, instance_type: str, lane: str, nodes: int, seconds: float) -> float:
    prices = catalog.provider(provider)
    instance = prices.instances.get(instance_type)
    if instance is None:
        return 0.0
    return round(prices.billing.billed_seconds(seconds) / 3600 * instance.hourly(lane) * nodes, 4)
