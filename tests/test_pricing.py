"""The pricing catalog: shipped data, per-repo overrides, billing increments, choosing an instance."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from gpuline.decisions import pricing
from gpuline.decisions.pricing import Billing, Catalog, load_catalog
from gpuline.errors import ConfigError, InputError


@pytest.fixture
def catalog() -> Catalog:
    return load_catalog(None)


def test_the_shipped_catalog_is_versioned_and_prices_every_provider(catalog: Catalog) -> None:
    assert catalog.version and catalog.currency == "USD"
    assert {"local", "ec2", "github", "kubernetes", "rest"} <= set(catalog.providers)
    for name, prices in catalog.providers.items():
        assert prices.instances, name
        for instance in prices.instances.values():
            assert instance.gpu in catalog.gpu_speed, f"{name}: no speed for {instance.gpu}"
            assert instance.spot is None or instance.spot <= instance.on_demand


@pytest.mark.parametrize(
    ("provider", "used_s", "billed_s"),
    [
        ("ec2", 1, 60),  # per second, 60 s minimum
        ("ec2", 59.5, 60),
        ("ec2", 61.2, 62),
        ("ec2", 3600, 3600),
        ("github", 1, 60),  # per started minute
        ("github", 61, 120),
        ("github", 120, 120),
        ("rest", 15 * 60, 3600),  # per started hour
        ("rest", 3601, 7200),
        ("kubernetes", 0.5, 1),
        ("ec2", 0, 0),  # nothing used, nothing billed
    ],
)
def test_billing_rounds_as_the_provider_does(catalog: Catalog, provider: str, used_s: float, billed_s: int) -> None:
    assert catalog.provider(provider).billing.billed_seconds(used_s) == billed_s


def test_float_noise_does_not_buy_another_increment() -> None:
    assert Billing(increment_s=60).billed_seconds(120.0000001) == 120


def test_choose_takes_the_cheapest_instance_with_enough_gpus_on_the_lane(catalog: Catalog) -> None:
    name, instance = catalog.choose("ec2", "t4", 1, None)
    assert name == "g4dn.xlarge" and instance.gpus == 1
    name, instance = catalog.choose("ec2", "t4", 2, None, lane="spot")
    assert name == "g4dn.12xlarge" and instance.hourly("spot") == instance.spot


def test_a_pinned_instance_type_wins(catalog: Catalog) -> None:
    assert catalog.choose("ec2", "t4", 1, "g5.xlarge")[0] == "g5.xlarge"


def test_an_unknown_pinned_instance_lists_the_known_ones(catalog: Catalog) -> None:
    with pytest.raises(InputError, match="not in the pricing catalog for ec2") as caught:
        catalog.choose("ec2", "t4", 1, "g99.huge")
    assert "g4dn.xlarge" in (caught.value.hint or "")


def test_no_instance_with_that_many_gpus_lists_what_is_offered(catalog: Catalog) -> None:
    with pytest.raises(InputError, match="offers no instance with 16 x t4") as caught:
        catalog.choose("ec2", "t4", 16, None)
    assert "t4 x4" in (caught.value.hint or "")


def test_an_unknown_provider_names_the_file_to_add_it_to(catalog: Catalog) -> None:
    with pytest.raises(InputError, match="no provider 'azure'") as caught:
        catalog.provider("azure")
    assert "pricing.yaml" in (caught.value.hint or "") and "ec2" in (caught.value.hint or "")


def test_a_lane_without_a_spot_price_is_priced_on_demand(catalog: Catalog) -> None:
    _, runner = catalog.choose("github", "t4", 1, None, lane="spot")
    assert not runner.has_spot() and runner.hourly("spot") == runner.on_demand == 4.20


def test_storage_and_egress_prices_fall_back_to_the_catalog_wide_ones(catalog: Catalog) -> None:
    assert catalog.egress_price("ec2") == catalog.egress_usd_per_gb == 0.09
    assert catalog.egress_price("local") == 0.0
    assert catalog.storage_price("ec2") == 0.023
    assert catalog.speed("h100") == 8.0 and catalog.speed("tpu") is None


def test_a_repo_pricing_yaml_overrides_one_price_and_adds_instances(tmp_path: Path) -> None:
    (tmp_path / "pricing.yaml").write_text(
        textwrap.dedent("""\
        version: "2026-11+acme"
        providers:
          ec2:
            instances:
              g4dn.xlarge: {gpu: t4, gpus: 1, on_demand: 0.40, spot: 0.12}
              g6e.xlarge: {gpu: l40s, gpus: 1, on_demand: 1.861}
          onprem:
            billing: {increment_s: 3600, minimum_s: 3600}
            instances:
              rack-a100: {gpu: a100, gpus: 8, on_demand: 10.0}
        gpu_speed:
          l40s: 3.0
        """)
    )
    catalog = load_catalog(tmp_path)
    assert catalog.version == "2026-11+acme"
    ec2 = catalog.provider("ec2")
    assert ec2.instances["g4dn.xlarge"].on_demand == 0.40
    assert ec2.instances["g5.xlarge"].on_demand == 1.006  # untouched entries stay
    assert ec2.billing.minimum_s == 60  # merged key by key, not replaced
    assert catalog.choose("ec2", "l40s", 1, None)[0] == "g6e.xlarge"
    assert catalog.provider("onprem").billing.billed_seconds(10) == 3600
    assert catalog.speed("l40s") == 3.0 and catalog.speed("t4") == 1.0


def test_an_invalid_override_points_at_its_line(tmp_path: Path) -> None:
    (tmp_path / "pricing.yaml").write_text("providers:\n  ec2:\n    billing:\n      increment_s: 0\n")
    with pytest.raises(ConfigError, match="invalid pricing catalog") as caught:
        load_catalog(tmp_path)
    location = caught.value.location
    assert location is not None and location.line == 4
    assert location.field == "providers.ec2.billing.increment_s"


def test_an_unknown_key_in_an_override_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "pricing.yaml").write_text(
        "providers:\n  ec2:\n    instances:\n      x: {gpu: t4, gpus: 1, ondemand: 1}\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_catalog(tmp_path)
    assert caught.value.location is not None and caught.value.location.line == 4


def test_an_override_that_is_not_a_mapping_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "pricing.yaml").write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_catalog(tmp_path)


def test_an_empty_override_changes_nothing(tmp_path: Path) -> None:
    (tmp_path / "pricing.yaml").write_text("# nothing yet\n")
    assert load_catalog(tmp_path) == load_catalog(None)


def test_a_broken_shipped_catalog_names_the_shipped_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pricing, "_shipped", lambda: {"version": "x", "providers": {"ec2": {"billing": "hourly"}}})
    with pytest.raises(ConfigError, match="invalid pricing catalog") as caught:
        load_catalog(None)
    assert caught.value.location is not None and str(caught.value.location.file) == "gpuline/data/pricing.yaml"
