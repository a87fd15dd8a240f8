"""The pricing catalog: what an instance costs and how its provider rounds the bill.

Shipped as data (``data/pricing.yaml``) and overridable per repo with a ``pricing.yaml`` beside
gpuline.yml, merged over the shipped one key by key. Prices decide money, so on a pull request the
override is the trusted base's copy (passed in as text), never the one in the PR's working tree.

A MIG slice of a GPU (``gpu_type: a100-mig-1g.5gb``, see :mod:`gpuline.providers.k8s_gpu`) is priced
as its share of the card: ``g`` compute slices of a card cut into ``mig_slices[card]`` (7 for an A100
or H100) cost ``g / mig_slices`` of the provider's price for one whole card of that kind, per slice
asked for. The catalog need not list slices: a provider's ``instances`` answer for ``<gpu_type>`` (one
slice) and ``<gpu_type>-x<N>`` (N slices) from its whole-card prices, unless the repo prices them itself.
"""

from __future__ import annotations

import math
import re
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gpuline.errors import ConfigError, InputError, Location
from gpuline.providers.k8s_gpu import is_mig, parse_mig

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


class Span(_Model):
    """A typical duration and a slow one: what a phase takes on the median run and on the 90th percentile."""

    p50_s: float = Field(ge=0)
    p90_s: float = Field(ge=0)

    @model_validator(mode="after")
    def _p90_not_below_p50(self) -> Span:
        if self.p90_s < self.p50_s:
            raise ValueError(f"p90_s ({self.p90_s:g}) must be at least p50_s ({self.p50_s:g})")
        return self


class PhaseTimes(_Model):
    """How long a provider's paid phases around the training script take, until the ledger has measured them."""

    boot: dict[str, Span] = Field(
        default_factory=dict, description="Per lane: machine start to runner/pod ready (launch, boot, registration)."
    )
    setup: Span | None = Field(default=None, description="Install, image pull, checkout before the script starts.")
    teardown: Span | None = Field(default=None, description="Last step of the pipeline to the machine released.")
    idle: Span | None = Field(default=None, description="gpuline's hand-offs between phases (uploads, registry).")
    checkpoint_save: Span | None = Field(default=None, description="One save, when the smoke test saw none.")
    download_mb_per_s: float | None = Field(default=None, gt=0, description="Dataset download bandwidth.")

    def boot_for(self, lane: str) -> Span | None:
        return self.boot.get(lane) or self.boot.get("on-demand")


class SliceInstances(dict[str, Instance]):
    """A provider's instances, which also answer for MIG slices of its cards: the rule in the module's
    docstring. A dict, so every reader of the catalog (estimate, provision, the cost at teardown) finds
    a slice's price the same way as a listed instance's."""

    def __init__(self, listed: dict[str, Instance], slices: dict[str, int]) -> None:
        super().__init__(listed)
        self.slices = dict(slices)

    def __missing__(self, name: str) -> Instance:
        derived = self.derive(name)
        if derived is None:
            raise KeyError(name)
        return derived

    def get(self, name: str, default: Instance | None = None) -> Instance | None:  # type: ignore[override]
        return super().get(name) or self.derive(name) or default

    def __contains__(self, name: object) -> bool:
        return super().__contains__(name) or (isinstance(name, str) and self.derive(name) is not None)

    def derive(self, name: str) -> Instance | None:
        """``name`` (``a100-mig-1g.5gb`` or ``a100-mig-1g.5gb-x3``) priced from the whole card; None
        when it names no slice of a card this provider prices and ``mig_slices`` knows."""
        gpu_type, _, count = name.rpartition("-x") if re.search(r"-x[1-9][0-9]*$", name) else (name, "", "1")
        if not is_mig(gpu_type):
            return None
        try:
            mig = parse_mig(gpu_type)
        except ConfigError:
            return None
        card = self.whole_card(mig.card) if mig else None
        total = self.slices.get(mig.card, 0) if mig else 0
        if mig is None or card is None or not 0 < mig.compute <= total:
            return None
        share = mig.compute / total * int(count) / card.gpus
        spot = None if card.spot is None else round(card.spot * share, 6)
        return Instance(gpu=gpu_type, gpus=int(count), on_demand=round(card.on_demand * share, 6), spot=spot)

    def whole_card(self, gpu: str) -> Instance | None:
        """The listed instance with the lowest price per card of ``gpu`` (the one-card shape, usually)."""
        cards = [i for i in dict.values(self) if i.gpu == gpu and i.gpus > 0]
        return min(cards, key=lambda i: (i.on_demand / i.gpus, i.gpus), default=None)


def slice_name(gpu_type: str, count: int) -> str:
    """The catalog name of ``count`` slices of a MIG ``gpu_type``, in the pod-shape style (``a100-x4``)."""
    return gpu_type if count <= 1 else f"{gpu_type}-x{count}"


class ProviderPrices(_Model):
    billing: Billing = Field(default_factory=Billing)
    startup_s: int = Field(default=0, ge=0, description="Typical billed seconds before the first training step.")
    phases: PhaseTimes = Field(default_factory=PhaseTimes)
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
    mig_slices: dict[str, int] = Field(
        default_factory=dict, description="Compute slices per card for MIG (a100: 7): a slice's share of its price."
    )

    @model_validator(mode="after")
    def _price_slices(self) -> Catalog:
        for prices in self.providers.values():
            prices.instances = SliceInstances(prices.instances, self.mig_slices)
        return self

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
        listed = [i for i in prices.instances.values() if i.gpu == gpu_type and i.gpus >= gpu_count]
        if is_mig(gpu_type) and not listed:
            return self._slices(provider, prices, gpu_type, gpu_count)
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

    def _slices(self, provider: str, prices: ProviderPrices, gpu_type: str, count: int) -> tuple[str, Instance]:
        """``count`` MIG slices, priced by the rule in the module's docstring."""
        mig = parse_mig(gpu_type)  # a malformed profile is refused here, with the fix
        assert mig is not None
        name = slice_name(gpu_type, max(count, 1))
        derived = prices.instances.get(name)
        if derived is None:
            cards = sorted({i.gpu for i in prices.instances.values() if i.gpus > 0})
            raise InputError(
                f"{provider} prices no {mig.card} to cut into MIG slices ({gpu_type})",
                hint=f"use a card the catalog prices ({', '.join(cards)}) whose slices mig_slices names, "
                f"or add {mig.card} to {CATALOG_FILE} (providers.{provider}.instances and mig_slices)",
            )
        return name, derived

    def speed(self, gpu_type: str) -> float | None:
        """Throughput relative to one T4, or None when the catalog does not know this GPU. A MIG slice
        runs at its share of the card (a 1g slice of a 7-slice A100: a seventh)."""
        if gpu_type in self.gpu_speed or not is_mig(gpu_type):
            return self.gpu_speed.get(gpu_type)
        try:
            mig = parse_mig(gpu_type)
        except ConfigError:
            return None
        whole, total = (self.gpu_speed.get(mig.card), self.mig_slices.get(mig.card)) if mig else (None, None)
        if mig is None or whole is None or not total:
            return None
        return whole * mig.compute / total

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
