"""The pricing catalog: what an instance costs and how its provider rounds the bill.

Shipped as data (``data/pricing.yaml``) and overridable per repo with a ``pricing.yaml`` beside
gpuline.yml, merged over the shipped one key by key. Prices decide money, so on a pull request the
override is the trusted base's copy (passed in as text), never the one in the PR's working tree.
"""

from __future__ import annotations

import math
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gpuline.errors import ConfigError, InputError, Location

CATALOG_FILE = "pricing.yaml"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Billing(_Model):
    increment_s: int = Field(default=1, ge=1, description="The bill is rounded up to a multiple of this.")
    minimum_s: int = Field(default=0, ge=0, description="Any use is billed at least this long.")

    def billed_seconds(self, seconds: float) -> int:
        """Round ``seconds`` of use up to what the provider charges for (0 for no use at all)."""
        if seconds <= 0:
            return 0
        # Round before ceil so that 120.0000001 s of float noise is not billed as another hour.
        rounded = math.ceil(round(seconds / self.increment_s, 6)) * self.increment_s
        return max(rounded, self.minimum_s)


class Instance(_Model):
    gpu: str
    gpus: int = Field(ge=0)
    on_demand: float = Field(ge=0, description="USD per instance-hour.")
    spot: float | None = Field(default=None, ge=0, description="USD per instance-hour on the spot lane.")

    def hourly(self, lane: str) -> float:
        if lane == "spot" and self.spot is not None:
            return self.spot
        return self.on_demand

    def has_spot(self) -> bool:
        return self.spot is not None


class ProviderPrices(_Model):
    billing: Billing = Field(default_factory=Billing)
    startup_s: int = Field(default=0, ge=0, description="Typical billed seconds before the first training step.")
    storage_usd_per_gb_month: float | None = Field(default=None, ge=0)
    egress_usd_per_gb: float | None = Field(default=None, ge=0)
    instances: dict[str, Instance] = Field(default_factory=dict)


class Catalog(_Model):
    version: str = Field(min_length=1)
    currency: Literal["USD"] = "USD"
    storage_usd_per_gb_month: float = Field(default=0.0, ge=0)
    egress_usd_per_gb: float = Field(default=0.0, ge=0)
    providers: dict[str, ProviderPrices]
    gpu_speed: dict[str, float] = Field(default_factory=dict)

    def key(self, provider: str) -> str:
        """The catalog's key for ``provider``: the name itself, else the provider an alias stands for
        (aws -> ec2), so the names gpuline.yml may use all find their prices."""
        if provider in self.providers:
            return provider
        from gpuline.providers import PROVIDERS

        return PROVIDERS.canonical(provider) if PROVIDERS.knows(provider) else provider

    def provider(self, name: str) -> ProviderPrices:
        try:
            return self.providers[self.key(name)]
        except KeyError:
            raise InputError(
                f"the pricing catalog has no provider {name!r}",
                hint=f"add it to {CATALOG_FILE} beside gpuline.yml; known: {', '.join(sorted(self.providers))}",
            ) from None

    def instance(self, provider: str, instance_type: str) -> Instance | None:
        prices = self.providers.get(self.key(provider))
        return prices.instances.get(instance_type) if prices else None

    def choose(
        self, provider: str, gpu_type: str, gpu_count: int, instance_type: str | None, lane: str = "on-demand"
    ) -> tuple[str, Instance]:
        """The instance a run will get: the pinned one, else the cheapest on its lane with enough GPUs of that type."""
        prices = self.provider(provider)
        if instance_type:
            if instance_type not in prices.instances:
                raise InputError(
                    f"instance type {instance_type!r} is not in the pricing catalog for {provider}",
                    hint=f"use one of {', '.join(sorted(prices.instances))} or add it to {CATALOG_FILE}",
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
        return min(fitting, key=lambda item: (item[1].hourly(lane), item[1].gpus, item[0]))

    def speed(self, gpu_type: str) -> float | None:
        """Throughput relative to one T4, or None when the catalog does not know this GPU."""
        return self.gpu_speed.get(gpu_type)

    def storage_price(self, provider: str) -> float:
        prices = self.providers.get(self.key(provider))
        own = prices.storage_usd_per_gb_month if prices else None
        return self.storage_usd_per_gb_month if own is None else own

    def egress_price(self, provider: str) -> float:
        prices = self.providers.get(self.key(provider))
        own = prices.egress_usd_per_gb if prices else None
        return self.egress_usd_per_gb if own is None else own


@cache
def _shipped() -> dict[str, Any]:
    text = resources.files("gpuline").joinpath("data/pricing.yaml").read_text(encoding="utf-8")
    data: dict[str, Any] = yaml.safe_load(text)
    return data


def load_catalog(project_dir: Path | None = None, *, override_text: str | None = None) -> Catalog:
    """The shipped catalog with the repo's ``pricing.yaml`` (beside gpuline.yml) merged over it.

    ``override_text`` is that file's text as the trusted ref has it ("" when the ref has none); when
    given, the working tree's copy is not read at all.
    """
    data = _deep_merge({}, _shipped())
    override = project_dir / CATALOG_FILE if project_dir else None
    doc = None
    if override is not None and (override_text is not None or override.exists()):
        from gpuline.yamlsource import load_yaml

        doc = load_yaml(override, override_text)
        if doc.data is not None and not isinstance(doc.data, dict):
            raise ConfigError(
                "expected a mapping at the top level",
                location=Location(override, line=1),
                hint="start with keys such as providers: or version:",
            )
        data = _deep_merge(data, doc.data or {})
    try:
        return Catalog.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = tuple(first["loc"])
        from gpuline.yamlsource import dotted

        field = dotted(loc)
        message = f"invalid pricing catalog: {first['msg']}"
        if doc is not None and override is not None:
            where = Location(override, line=doc.line_of(loc), field=field)
            raise ConfigError(message, location=where, hint="fix this entry (see the shipped catalog)") from None
        raise ConfigError(message, location=Location("gpuline/data/pricing.yaml", field=field)) from None


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        current = out.get(key)
        if isinstance(current, dict) and isinstance(value, dict):
            out[key] = _deep_merge(current, value)
        else:
            out[key] = value
    return out
