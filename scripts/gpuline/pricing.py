"""The pricing catalog: what an instance costs and how its provider rounds the bill.

Shipped as data (``data/pricing.yaml``) and overridable per repo with a ``pricing.yaml`` beside
gpuline.yml, merged over the shipped one entry by entry.
"""

from __future__ import annotations

import math
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from gpuline.errors import ConfigError, InputError, Location


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Billing(_Model):
    increment_s: int = Field(default=1, ge=1)
    minimum_s: int = Field(default=0, ge=0)

    def billed_seconds(self, seconds: float) -> int:
        """Round ``seconds`` of use up to what the provider charges for."""
        if seconds <= 0:
            return 0
        rounded = math.ceil(seconds / self.increment_s) * self.increment_s
        return max(rounded, self.minimum_s)


class Instance(_Model):
    gpu: str
    gpus: int = Field(ge=0)
    on_demand: float = Field(ge=0)
    spot: float | None = Field(default=None, ge=0)

    def hourly(self, lane: str) -> float:
        if lane == "spot" and self.spot is not None:
            return self.spot
        return self.on_demand


class ProviderPrices(_Model):
    billing: Billing = Field(default_factory=Billing)
    instances: dict[str, Instance] = Field(default_factory=dict)


class Catalog(_Model):
    version: str
    currency: Literal["USD"] = "USD"
    storage_usd_per_gb_month: float = 0.0
    egress_usd_per_gb: float = 0.0
    providers: dict[str, ProviderPrices]
    gpu_speed: dict[str, float] = Field(default_factory=dict)

    def provider(self, name: str) -> ProviderPrices:
        try:
            return self.providers[name]
        except KeyError:
            raise InputError(
                f"the pricing catalog has no provider {name!r}",
                hint=f"add it to pricing.yaml; known: {', '.join(sorted(self.providers))}",
            ) from None

    def choose(self, provider: str, gpu_type: str, gpu_count: int, instance_type: str | None) -> tuple[str, Instance]:
        """The instance a run will get: the pinned one, else the cheapest with enough GPUs of that type."""
        prices = self.provider(provider)
        if instance_type:
            if instance_type not in prices.instances:
                raise InputError(
                    f"instance type {instance_type!r} is not in the pricing catalog for {provider}",
                    hint=f"use one of {', '.join(sorted(prices.instances))} or add it to pricing.yaml",
                )
            return instance_type, prices.instances[instance_type]
        fitting = [
            (name, inst) for name, inst in prices.instances.items() if inst.gpu == gpu_type and inst.gpus >= gpu_count
        ]
        if not fitting:
            offered = sorted({f"{i.gpu} x{i.gpus}" for i in prices.instances.values()})
            raise InputError(
                f"{provider} offers no instance with {gpu_count} x {gpu_type}",
                hint=f"choose from {', '.join(offered)}",
            )
        return min(fitting, key=lambda item: (item[1].on_demand, item[1].gpus))

    def speed(self, gpu_type: str) -> float:
        return self.gpu_speed.get(gpu_type, 1.0)


@cache
def _shipped() -> dict[str, object]:
    text = resources.files("gpuline").joinpath("data/pricing.yaml").read_text(encoding="utf-8")
    data: dict[str, object] = yaml.safe_load(text)
    return data


def load_catalog(project_dir: Path | None = None) -> Catalog:
    data = _deep_merge({}, _shipped())
    override = project_dir / "pricing.yaml" if project_dir else None
    if override is not None and override.exists():
        from gpuline.yamlsource import load_yaml

        doc = load_yaml(override)
        if not isinstance(doc.data, dict):
            raise ConfigError("expected a mapping", location=Location(override, line=1))
        data = _deep_merge(data, doc.data)
    try:
        return Catalog.model_validate(data)
    except Exception as exc:
        where = override if override is not None and override.exists() else Path("pricing.yaml")
        raise ConfigError(f"invalid pricing catalog: {exc}".splitlines()[0], location=Location(where)) from None


def _deep_merge(base: dict[str, object], over: dict[str, object]) -> dict[str, object]:
    out = dict(base)
    for key, value in over.items():
        current = out.get(key)
        if isinstance(current, dict) and isinstance(value, dict):
            out[key] = _deep_merge(current, value)
        else:
            out[key] = value
    return out
