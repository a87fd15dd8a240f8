"""The rest provider against a local HTTP server that follows the generic instance-API contract."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from conftest import write_project
from gpuline.errors import ConfigError, InfraError, NotFoundError
from gpuline.providers import open_provider
from gpuline.providers.base import TAG_EXPIRES_AT, TAG_LEASE_ID, TAG_MANAGED, TAG_RUN_ID, LeaseRequest
from gpuline.providers.failover import Backoff, CapacityExhausted
from gpuline.providers.rest import RestProvider, instance_name
from gpuline.runs import utcnow
from gpuline.spec import load_spec

if TYPE_CHECKING:
    from fixtures_rest import RestCloud

pytest_plugins = ["fixtures_rest"]

RUN_ID = "run-20260101-000000-abcdef"


def lease(tmp_path: Path, lease_id: str = "lease-aaaaaaaaaaaa") -> LeaseRequest:
    config = write_project(tmp_path / "proj", spec_extra="  image: ubuntu-22.04-cuda\n")
    now = utcnow()
    expires = now + timedelta(hours=1)
    return LeaseRequest(
        run_id=RUN_ID,
        lease_id=lease_id,
        spec=load_spec(config),
        instance_type="gpu_1x_a100",
        lane="on-demand",
        region="",
        ttl_seconds=3600,
        expires_at=expires,
        tags={
            TAG_RUN_ID: RUN_ID,
            TAG_LEASE_ID: lease_id,
            TAG_EXPIRES_AT: expires.isoformat(timespec="seconds"),
            TAG_MANAGED: "true",
        },
        project_dir=config.parent,
    )


class Sleeps(list[float]):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def provider(tmp_path: Path, cloud: RestCloud, sleeps: Sleeps | None = None, **options: Any) -> RestProvider:
    backoff = Backoff(base_s=0.5, retries=2, sleep=sleeps if sleeps is not None else Sleeps(), rng=lambda: 1.0)
    return RestProvider(tmp_path, {"base_url": cloud.url, "retries": 2, **options}, backoff=backoff)


def test_provision_creates_a_tagged_instance_with_the_boot_script(tmp_path: Path, rest_cloud: RestCloud) -> None:
    request = lease(tmp_path)
    machine = provider(tmp_path, rest_cloud).provision(request)
    (instance,) = rest_cloud.live()
    assert machine.instance_id == instance["id"] and machine.state == "pending"
    assert instance["name"] == instance_name(request.lease_id)
    assert instance["instance_type"] == "gpu_1x_a100" and instance["image"] == "ubuntu-22.04-cuda"
    assert instance["tags"][TAG_LEASE_ID] == request.lease_id and instance["tags"][TAG_MANAGED] == "true"
    assert "OnCalendar=" in instance["user_data"]
    method, path, headers, _ = rest_cloud.requests[-1]
    assert (method, path) == ("POST", "/v1/instances")
    assert headers["Idempotency-Key"] == request.lease_id
    assert machine.launched_at is not None and machine.lease_id == request.lease_id


def test_describe_release_and_list_follow_the_instance_through_its_life(tmp_path: Path, rest_cloud: RestCloud) -> None:
    p = open_provider("rest", tmp_path, {"base_url": rest_cloud.url})
    machine = p.provision(lease(tmp_path))
    described = p.describe(machine.instance_id)
    assert described.state == "running" and described.address == "10.0.0.7"
    assert [m.instance_id for m in p.list_owned()] == [machine.instance_id]
    assert p.release(machine.instance_id) is True
    assert p.describe(machine.instance_id).state == "terminated"
    assert p.release(machine.instance_id) is False
    assert p.list_owned() == []
    assert p.release("inst-missing") is False
    with pytest.raises(NotFoundError):
        p.describe("inst-missing")


def test_list_owned_skips_instances_that_are_not_ours(tmp_path: Path, rest_cloud: RestCloud) -> None:
    p = provider(tmp_path, rest_cloud)
    rest_cloud.handle(
        "POST",
        "/v1/instances",
        {"Authorization": f"Bearer {__import__('fixtures_rest').TOKEN}"},
        {"instance_type": "x", "image": "y", "name": "someone-else"},
    )
    mine = p.provision(lease(tmp_path))
    assert [m.instance_id for m in p.list_owned()] == [mine.instance_id]


def test_the_token_is_sent_as_a_bearer_header_and_masked_in_actions(
    tmp_path: Path, rest_cloud: RestCloud, actions_env: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from fixtures_rest import TOKEN
    from gpuline.lease.machines import masked

    # Steps open every provider through `masked`: the provider names its secrets, the step masks them.
    masked(provider(tmp_path, rest_cloud)).list_owned()
    assert rest_cloud.requests[-1][2]["Authorization"] == f"Bearer {TOKEN}"
    out = capsys.readouterr().out
    assert f"::add-mask::{TOKEN}" in out
    assert out.count(TOKEN) == 1  # only in the mask command itself


def test_a_missing_token_names_the_variable(
    tmp_path: Path, rest_cloud: RestCloud, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GPULINE_REST_TOKEN")
    with pytest.raises(ConfigError, match=r"\$GPULINE_REST_TOKEN, which is not set"):
        provider(tmp_path, rest_cloud).list_owned()


def test_a_wrong_token_is_an_infrastructure_error_without_the_token(
    tmp_path: Path, rest_cloud: RestCloud, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLOUD_TOKEN", "wrong-token-value")
    with pytest.raises(InfraError, match="HTTP 401") as info:
        provider(tmp_path, rest_cloud, token_env="CLOUD_TOKEN").list_owned()
    assert "wrong-token-value" not in info.value.one_line()
    assert "$CLOUD_TOKEN" in (info.value.hint or "")


def test_capacity_errors_fail_over_to_the_next_type(tmp_path: Path, rest_cloud: RestCloud) -> None:
    rest_cloud.fail_next("POST", "/v1/instances", 503, "insufficient-capacity")
    rest_cloud.fail_next("POST", "/v1/instances", 400, "quota-exceeded")
    p = provider(tmp_path, rest_cloud, instance_types=["gpu_1x_h100", "gpu_1x_a100", "gpu_1x_a10"])
    machine = p.provision(lease(tmp_path))
    assert [(f["instance_type"], f["kind"]) for f in machine.failures] == [
        ("gpu_1x_h100", "capacity"),
        ("gpu_1x_a100", "quota"),
    ]
    assert [i["instance_type"] for i in rest_cloud.live()] == ["gpu_1x_a10"]


def test_all_exhausted_raises_with_every_failure(tmp_path: Path, rest_cloud: RestCloud) -> None:
    rest_cloud.fail_next("POST", "/v1/instances", 503, "insufficient-capacity", times=4)
    p = provider(tmp_path, rest_cloud, instance_types=["a", "b"], regions=["us-west-1", "us-east-1"])
    with pytest.raises(CapacityExhausted) as info:
        p.provision(lease(tmp_path))
    assert len(info.value.failures) == 4
    assert rest_cloud.live() == []


def test_throttling_is_retried_with_backoff(tmp_path: Path, rest_cloud: RestCloud) -> None:
    rest_cloud.fail_next("GET", "/v1/instances", 429, times=2)
    sleeps = Sleeps()
    assert provider(tmp_path, rest_cloud, sleeps).list_owned() == []
    assert sleeps == [0.5, 1.0]


def test_a_lost_create_answer_adopts_the_instance_instead_of_buying_a_second(
    tmp_path: Path, rest_cloud: RestCloud
) -> None:
    rest_cloud.fail_next("POST", "/v1/instances", 502, times=3, apply=True)
    machine = provider(tmp_path, rest_cloud).provision(lease(tmp_path))
    # Each retry created one (as a cloud without idempotency keys would); we adopted the first found
    # and the others carry our lease tag, so the reaper finds them.
    assert machine.instance_id in {i["id"] for i in rest_cloud.live()}
    assert machine.lease_id == "lease-aaaaaaaaaaaa"


def test_a_bad_request_is_a_config_error(tmp_path: Path, rest_cloud: RestCloud) -> None:
    with pytest.raises(ConfigError, match="instance_type is required"):
        provider(tmp_path, rest_cloud, request_fields={"instance_type": None}).provision(lease(tmp_path))


def test_an_unreachable_api_is_an_infrastructure_error(tmp_path: Path, rest_cloud: RestCloud) -> None:
    sleeps = Sleeps()
    p = RestProvider(
        tmp_path, {"base_url": "http://127.0.0.1:9", "retries": 1}, backoff=Backoff(sleep=sleeps, rng=lambda: 1.0)
    )
    with pytest.raises(InfraError, match="Connection refused") as info:
        p.list_owned()
    assert "base_url" in (info.value.hint or "")
    assert len(sleeps) == 1


def test_field_names_and_endpoints_adapt_to_another_cloud(tmp_path: Path, rest_cloud: RestCloud) -> None:
    # The same server, described through custom paths: dotted fields and a cloud without tags.
    p = provider(
        tmp_path,
        rest_cloud,
        fields={"tags": None, "status": "status", "id": "id"},
        request_fields={"tags": None, "user_data": None},
    )
    request = lease(tmp_path, lease_id="lease-bbbbbbbbbbbb")
    machine = p.provision(request)
    (instance,) = rest_cloud.live()
    assert instance["tags"] == {} and instance["user_data"] is None
    # Without tags the name carries the lease, so the reaper can still match it to the ledger.
    (owned,) = p.list_owned()
    assert owned.instance_id == machine.instance_id and owned.lease_id == request.lease_id


def test_options_are_validated_with_field_names(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"resources\.options\.base_url"):
        RestProvider(tmp_path, {})
    with pytest.raises(ConfigError, match=r"resources\.options\.endpoint: unknown key") as info:
        RestProvider(tmp_path, {"base_url": "http://x", "endpoint": {}})
    assert info.value.hint == "did you mean `endpoints`?"


def test_an_image_is_required(tmp_path: Path, rest_cloud: RestCloud) -> None:
    request = lease(tmp_path)
    request.spec.resources.image = None
    with pytest.raises(ConfigError, match="needs an image"):
        provider(tmp_path, rest_cloud).provision(request)
