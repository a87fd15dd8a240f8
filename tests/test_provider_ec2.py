"""The ec2 provider against moto's server on 127.0.0.1: tags at launch, IMDSv2, self-termination,
failover across types, zones and lanes (capacity errors injected through our own seam, since moto
never runs out), and the boot script run for real in a scratch directory."""

from __future__ import annotations

import functools
import os
import shutil
import stat
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError

from conftest import write_project
from gpuline.errors import ConfigError, InfraError
from gpuline.providers import open_provider
from gpuline.providers.base import TAG_EXPIRES_AT, TAG_LEASE_ID, TAG_MANAGED, TAG_RUN_ID, LeaseRequest, RunnerRequest
from gpuline.providers.ec2 import FAULTS_ENV, Ec2Provider
from gpuline.providers.failover import Backoff, CapacityExhausted
from gpuline.providers.userdata import MAX_USER_DATA_BYTES, render_user_data
from gpuline.runs import utcnow
from gpuline.spec import load_spec

pytestmark = pytest.mark.integration
pytest_plugins = ["github_fake"]

JIT = "c2VjcmV0LWppdC1jb25maWctdmFsdWU="
RUN_ID = "run-20260101-000000-abcdef"


@pytest.fixture(autouse=True)
def _validate_instance_types(monkeypatch: pytest.MonkeyPatch) -> None:
    """moto reads MOTO_EC2_ENABLE_INSTANCE_TYPE_VALIDATION once, when it is first imported; the server
    runs in this process, so switch the setting on directly in case moto was imported before the env."""
    from moto import settings

    monkeypatch.setattr(settings, "EC2_ENABLE_INSTANCE_TYPE_VALIDATION", True)


def ec2() -> Any:
    return boto3.client("ec2", region_name="us-east-1", endpoint_url=os.environ["AWS_ENDPOINT_URL"])


@functools.cache
def ami() -> str:
    # Listing moto's bundled images takes a second; they are the same after every reset.
    return str(ec2().describe_images(Owners=["amazon"])["Images"][0]["ImageId"])


def lease(
    tmp_path: Path,
    *,
    lane: str = "on-demand",
    instance_type: str = "g4dn.xlarge",
    runner: bool = False,
    expires_in: float = 1800,
    gpu_type: str = "t4",
) -> LeaseRequest:
    config = write_project(tmp_path / "proj")
    spec = load_spec(config)
    spec.resources.gpu_type, spec.resources.gpu_count, spec.resources.lane = gpu_type, 1, lane  # type: ignore[assignment]
    now = utcnow()
    expires = now + timedelta(seconds=expires_in)
    lease_id = f"lease-{os.urandom(6).hex()}"
    return LeaseRequest(
        run_id=RUN_ID,
        lease_id=lease_id,
        spec=spec,
        instance_type=instance_type,
        lane=lane,
        region="us-east-1",
        ttl_seconds=int(expires_in),
        expires_at=expires,
        tags={
            TAG_RUN_ID: RUN_ID,
            TAG_LEASE_ID: lease_id,
            TAG_EXPIRES_AT: expires.isoformat(timespec="seconds"),
            TAG_MANAGED: "true",
            "gpuline:repo": "octo/models",
            "gpuline:team": "vision",
            "gpuline:tier": "nightly",
        },
        project_dir=config.parent,
        runner=RunnerRequest(label=f"gpuline-{RUN_ID}", jit_config=JIT) if runner else None,
    )


class Sleeps:
    def __init__(self) -> None:
        self.delays: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


def provider(tmp_path: Path, options: dict[str, Any] | None = None, sleeps: Sleeps | None = None) -> Ec2Provider:
    backoff = Backoff(base_s=1.0, retries=3, sleep=sleeps or Sleeps(), rng=lambda: 1.0)
    return Ec2Provider(tmp_path, {"image_id": ami(), **(options or {})}, backoff=backoff)


def running() -> list[dict[str, Any]]:
    pages = ec2().describe_instances(Filters=[{"Name": "instance-state-name", "Values": ["pending", "running"]}])
    return [i for r in pages["Reservations"] for i in r["Instances"]]


def tags_of(resource: dict[str, Any]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in resource.get("Tags", [])}


# ---------------------------------------------------------------- launch


def test_launch_tags_instance_and_volumes_requires_imdsv2_and_terminates_on_shutdown(
    tmp_path: Path, aws_env: str
) -> None:
    request = lease(tmp_path, runner=True)
    machine = provider(tmp_path, {"root_volume_gb": 100}).provision(request)
    (instance,) = running()
    assert instance["InstanceId"] == machine.instance_id
    tags = tags_of(instance)
    assert tags[TAG_RUN_ID] == RUN_ID and tags[TAG_LEASE_ID] == request.lease_id
    assert tags[TAG_EXPIRES_AT] == request.tags[TAG_EXPIRES_AT] and tags[TAG_MANAGED] == "true"
    assert tags["gpuline:repo"] == "octo/models" and tags["gpuline:team"] == "vision"
    assert JIT not in repr(tags), "the JIT config is a credential: never a tag"
    assert instance["MetadataOptions"]["HttpTokens"] == "required"
    behaviour = ec2().describe_instance_attribute(
        InstanceId=machine.instance_id, Attribute="instanceInitiatedShutdownBehavior"
    )
    assert behaviour["InstanceInitiatedShutdownBehavior"]["Value"] == "terminate"
    volumes = ec2().describe_volumes(Filters=[{"Name": f"tag:{TAG_LEASE_ID}", "Values": [request.lease_id]}])
    assert [v["Size"] for v in volumes["Volumes"]] == [100]
    assert machine.lane == "on-demand" and machine.instance_type == "g4dn.xlarge" and machine.failures == []
    assert machine.launched_at is not None and machine.run_id == RUN_ID


def test_user_data_carries_the_watchdog_and_the_runner_but_the_log_does_not(
    tmp_path: Path, aws_env: str, capsys: pytest.CaptureFixture[str]
) -> None:
    machine = provider(tmp_path).provision(lease(tmp_path, runner=True))
    import base64

    raw = ec2().describe_instance_attribute(InstanceId=machine.instance_id, Attribute="userData")
    script = base64.b64decode(raw["UserData"]["Value"]).decode()
    assert "OnCalendar=" in script and "poweroff" in script
    assert JIT in script and "ACTIONS_RUNNER_INPUT_JITCONFIG" in script
    out = capsys.readouterr()
    assert JIT not in out.out + out.err
    assert machine.runner_label == f"gpuline-{RUN_ID}"


def test_spot_lane_launches_a_one_time_spot_instance(tmp_path: Path, aws_env: str) -> None:
    machine = provider(tmp_path, {"spot_max_price": "0.30"}).provision(lease(tmp_path, lane="spot"))
    (instance,) = running()
    assert instance.get("InstanceLifecycle") == "spot"
    assert machine.lane == "spot"


def test_capacity_on_the_first_two_types_launches_the_third_and_lists_both_failures(
    tmp_path: Path, aws_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(FAULTS_ENV, "g4dn.xlarge=InsufficientInstanceCapacity,g5.xlarge=VcpuLimitExceeded")
    options = {"instance_types": ["g4dn.xlarge", "g5.xlarge", "g6.xlarge"]}
    machine = provider(tmp_path, options).provision(lease(tmp_path))
    assert machine.instance_type == "g6.xlarge"
    assert [(f["instance_type"], f["kind"], f["code"]) for f in machine.failures] == [
        ("g4dn.xlarge", "capacity", "InsufficientInstanceCapacity"),
        ("g5.xlarge", "quota", "VcpuLimitExceeded"),
    ]
    assert [i["InstanceType"] for i in running()] == ["g6.xlarge"]


def test_default_candidates_are_the_catalog_types_with_the_same_gpu(tmp_path: Path, aws_env: str) -> None:
    request = lease(tmp_path, instance_type="g4dn.xlarge")
    types = [c.instance_type for c in provider(tmp_path).candidates(request)]
    assert types == ["g4dn.xlarge", "g4dn.12xlarge"]


def test_failover_across_subnets_before_the_next_type(
    tmp_path: Path, aws_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    subnets = [s["SubnetId"] for s in ec2().describe_subnets()["Subnets"]][:2]
    monkeypatch.setenv(FAULTS_ENV, f"g4dn.xlarge@{subnets[0]}=InsufficientInstanceCapacity")
    machine = provider(tmp_path, {"subnet_ids": subnets}).provision(lease(tmp_path))
    (instance,) = running()
    assert instance["SubnetId"] == subnets[1] and machine.instance_type == "g4dn.xlarge"
    assert [f["zone"] for f in machine.failures] == [subnets[0]]


def test_a_quota_error_skips_the_other_zones_of_that_type(
    tmp_path: Path, aws_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(FAULTS_ENV, "g4dn.xlarge=MaxSpotInstanceCountExceeded")
    options = {"availability_zones": ["us-east-1a", "us-east-1b"], "instance_types": ["g4dn.xlarge", "g5.xlarge"]}
    machine = provider(tmp_path, options).provision(lease(tmp_path, lane="spot"))
    assert [(f["instance_type"], f["zone"]) for f in machine.failures] == [("g4dn.xlarge", "us-east-1a")]
    assert machine.instance_type == "g5.xlarge"
    assert running()[0]["Placement"]["AvailabilityZone"] == "us-east-1a"


def test_throttling_is_retried_with_backoff_on_the_same_candidate(
    tmp_path: Path, aws_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(FAULTS_ENV, "*=RequestLimitExceeded*2")
    sleeps = Sleeps()
    machine = provider(tmp_path, {}, sleeps).provision(lease(tmp_path))
    assert machine.failures == [] and machine.instance_type == "g4dn.xlarge"
    assert sleeps.delays == [1.0, 2.0]  # exponential (jitter pinned to its maximum here)
    assert len(running()) == 1


def test_throttling_that_never_stops_is_recorded_and_failed_over(
    tmp_path: Path, aws_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(FAULTS_ENV, "g4dn.xlarge=RequestLimitExceeded")
    sleeps = Sleeps()
    machine = provider(tmp_path, {"instance_types": ["g4dn.xlarge", "g5.xlarge"]}, sleeps).provision(lease(tmp_path))
    assert machine.instance_type == "g5.xlarge"
    (failure,) = machine.failures
    assert failure["kind"] == "throttling" and failure["message"].startswith("after 3 retries")
    assert sleeps.delays == [1.0, 2.0, 4.0]


def test_spot_exhausted_falls_back_to_on_demand_only_when_allowed(
    tmp_path: Path, aws_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(FAULTS_ENV, "spot=InsufficientInstanceCapacity")
    with pytest.raises(CapacityExhausted):
        provider(tmp_path, {"instance_types": ["g4dn.xlarge"]}).provision(lease(tmp_path, lane="spot"))
    machine = provider(tmp_path, {"instance_types": ["g4dn.xlarge"], "on_demand_fallback": True}).provision(
        lease(tmp_path, lane="spot")
    )
    assert machine.lane == "on-demand"
    assert [(f["lane"], f["code"]) for f in machine.failures] == [("spot", "InsufficientInstanceCapacity")]
    (instance,) = running()
    assert instance.get("InstanceLifecycle") is None


def test_all_exhausted_lists_every_failure_and_leaves_nothing_running(
    tmp_path: Path, aws_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(FAULTS_ENV, "*=InsufficientInstanceCapacity")
    options = {"instance_types": ["g4dn.xlarge", "g5.xlarge"], "availability_zones": ["us-east-1a", "us-east-1b"]}
    with pytest.raises(CapacityExhausted) as info:
        provider(tmp_path, options).provision(lease(tmp_path))
    assert info.value.exit_code == 3
    assert len(info.value.failures) == 4
    for expected in ("g4dn.xlarge on-demand in us-east-1a", "g5.xlarge on-demand in us-east-1b"):
        assert expected in info.value.message
    assert running() == []


def test_a_mistake_in_the_request_is_not_failed_over(tmp_path: Path, aws_env: str) -> None:
    options = {"instance_types": ["g9x.nope", "g4dn.xlarge"]}
    with pytest.raises(ConfigError, match="InvalidInstanceType"):
        provider(tmp_path, options).provision(lease(tmp_path))
    assert running() == []


def test_an_unknown_image_is_a_config_error(tmp_path: Path, aws_env: str) -> None:
    with pytest.raises(ConfigError, match=r"InvalidAMIID.NotFound: The image id .*ami-00000000.* does not exist"):
        Ec2Provider(tmp_path, {"image_id": "ami-00000000", "root_volume_gb": 50}).provision(lease(tmp_path))


def test_options_are_checked_with_their_field_names(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"resources\.options\.subnet_id: unknown key") as info:
        Ec2Provider(tmp_path, {"subnet_id": "subnet-1"})
    assert info.value.hint == "did you mean `subnet_ids`?"
    with pytest.raises(ConfigError, match=r"resources\.options\.root_volume_gb"):
        Ec2Provider(tmp_path, {"root_volume_gb": 1})


def test_an_image_is_required_and_must_be_an_ami(tmp_path: Path, aws_env: str) -> None:
    with pytest.raises(ConfigError, match="needs a machine image"):
        Ec2Provider(tmp_path, {}).provision(lease(tmp_path))
    with pytest.raises(ConfigError, match="is not an AMI id"):
        Ec2Provider(tmp_path, {"image_id": "ubuntu:22.04"}).provision(lease(tmp_path))


def test_no_region_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match="no AWS region"):
        Ec2Provider(tmp_path, {}).list_owned()


def test_missing_credentials_is_an_infrastructure_error(
    tmp_path: Path, aws_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    empty = tmp_path / "empty"
    empty.write_text("")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(empty))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)  # it caches the credentials it found first
    with pytest.raises(InfraError, match="Unable to locate credentials"):
        Ec2Provider(tmp_path, {}).list_owned()


def test_a_permission_error_says_which_permissions(tmp_path: Path, aws_env: str) -> None:
    def refuse(client: Any, params: dict[str, Any]) -> dict[str, Any]:
        raise ClientError({"Error": {"Code": "UnauthorizedOperation", "Message": "no"}}, "RunInstances")

    with pytest.raises(InfraError, match="AWS refused") as info:
        Ec2Provider(tmp_path, {"image_id": ami()}, launch=refuse).provision(lease(tmp_path))
    assert "README" in (info.value.hint or "")


# ---------------------------------------------------------------- describe, release, list


def test_release_terminates_once_and_is_idempotent(tmp_path: Path, aws_env: str) -> None:
    p = provider(tmp_path)
    machine = p.provision(lease(tmp_path))
    assert p.describe(machine.instance_id).state in ("pending", "running")
    assert p.release(machine.instance_id) is True
    assert p.describe(machine.instance_id).state == "terminated"
    assert p.release(machine.instance_id) is False
    assert p.release("i-0123456789abcdef0") is False
    assert running() == []


def test_list_owned_finds_only_live_gpuline_instances(tmp_path: Path, aws_env: str) -> None:
    ec2().run_instances(ImageId=ami(), InstanceType="t3.micro", MinCount=1, MaxCount=1)
    p = open_provider("aws", tmp_path, {"image_id": ami()})
    first = p.provision(lease(tmp_path))
    second = p.provision(lease(tmp_path))
    p.release(first.instance_id)
    owned = p.list_owned()
    assert [m.instance_id for m in owned] == [second.instance_id]
    assert owned[0].lease_id == second.lease_id and owned[0].expires_at is not None


def test_fault_rules_count_down(tmp_path: Path, aws_env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FAULTS_ENV, "g4dn.xlarge=InsufficientInstanceCapacity*1")
    p = provider(tmp_path, {"instance_types": ["g4dn.xlarge"]})
    with pytest.raises(CapacityExhausted):
        p.provision(lease(tmp_path))
    assert p.provision(lease(tmp_path)).instance_type == "g4dn.xlarge"


# ---------------------------------------------------------------- the boot script, run for real


def stub_bin(tmp_path: Path) -> tuple[Path, Path]:
    """Commands the script calls, replaced by stubs that log their argv (and env where it matters)."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    stubs = {
        "poweroff": 'echo "poweroff $*" >>"$CALLS"',
        "systemctl": 'echo "systemctl $*" >>"$CALLS"',
        "useradd": 'echo "useradd $*" >>"$CALLS"',
        "chown": 'echo "chown $*" >>"$CALLS"',
        "nohup": 'echo "nohup $*" >>"$CALLS"',
        "id": "exit 1",
        "runuser": 'echo "runuser $* jit=${ACTIONS_RUNNER_INPUT_JITCONFIG:-}" >>"$CALLS"',
    }
    for name, body in stubs.items():
        path = bin_dir / name
        path.write_text(f"#!/bin/bash\n{body}\n")
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return bin_dir, log


def run_script(tmp_path: Path, script: str) -> tuple[str, Path]:
    bin_dir, log = stub_bin(tmp_path)
    root = tmp_path / "root"
    runner = root / "opt" / "actions-runner"
    runner.mkdir(parents=True)
    (runner / "run.sh").write_text("#!/bin/bash\n")
    (runner / "run.sh").chmod(0o755)
    path = tmp_path / "user-data.sh"
    path.write_text(script)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "GPULINE_ROOT": str(root), "CALLS": str(log)}
    subprocess.run(["bash", str(path)], env=env, check=True, timeout=30)
    return log.read_text() if log.exists() else "", root


def test_boot_script_arms_a_persistent_timer_at_the_expiry_and_starts_the_runner_without_argv_secrets(
    tmp_path: Path,
) -> None:
    request = lease(tmp_path, runner=True, expires_in=3600)
    request.expires_at = datetime(2099, 1, 2, 3, 4, 5, tzinfo=UTC)
    calls, root = run_script(tmp_path, render_user_data(request))
    timer = (root / "etc/systemd/system/gpuline-ttl.timer").read_text()
    assert "OnCalendar=2099-01-02 03:04:05 UTC" in timer and "Persistent=true" in timer
    assert "systemctl enable --now gpuline-ttl.timer" in calls
    assert "nohup sh -c sleep" in calls  # the second, independent watchdog
    runner_line = next(line for line in calls.splitlines() if line.startswith("runuser"))
    # The config reaches the runner by environment only, never on its command line.
    assert runner_line.endswith(f"jit={JIT}") and JIT not in runner_line.removesuffix(f"jit={JIT}")
    assert calls.splitlines()[-1] == "poweroff "  # single use: the machine ends with the runner
    assert not (root / "run/gpuline/jit").exists()
    assert JIT not in (root / "var/log/gpuline-boot.log").read_text()


def test_boot_script_powers_off_at_once_when_the_lease_already_expired(tmp_path: Path) -> None:
    request = lease(tmp_path, runner=True)
    request.expires_at = utcnow() - timedelta(seconds=5)
    calls, _ = run_script(tmp_path, render_user_data(request))
    assert calls.splitlines() == ["poweroff "]


def test_boot_script_passes_shellcheck(tmp_path: Path) -> None:
    checker = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    if not Path(checker).exists():
        pytest.skip("shellcheck is not installed")
    path = tmp_path / "user-data.sh"
    path.write_text(render_user_data(lease(tmp_path, runner=True), startup_script="echo setup"))
    result = subprocess.run([checker, "-S", "warning", str(path)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout


def test_boot_script_rejects_what_is_not_a_jit_config_and_oversized_setup(tmp_path: Path) -> None:
    request = lease(tmp_path, runner=True)
    assert request.runner is not None
    request.runner.jit_config = "abc\nJIT\nrm -rf /"
    with pytest.raises(ConfigError, match="not base64"):
        render_user_data(request)
    with pytest.raises(ConfigError, match="EC2 allows 16384") as info:
        render_user_data(lease(tmp_path), startup_script="x" * MAX_USER_DATA_BYTES)
    assert "startup_script" in (info.value.hint or "")


# ---------------------------------------------------------------- the provision step (lease, then launch)


def ec2_project(tmp_path: Path, options: str = "", policy: str | None = None) -> Path:
    config = write_project(
        tmp_path / "proj",
        spec_extra=f"  region: us-east-1\n  options:\n    image_id: {ami()}\n{options}",
        policy=policy,
    )
    text = config.read_text().replace("provider: local", "provider: ec2").replace("gpu_type: cpu", "gpu_type: t4")
    config.write_text(text.replace("  max_duration: 10m", "  gpu_count: 1\n  max_duration: 10m"))
    return config


def events(config: Path, kind: str) -> list[dict[str, Any]]:
    from gpuline.context import Context

    ctx = Context(config_path=config, tier="nightly")
    (record,) = ctx.ledger.list_runs()
    return [e.data for e in ctx.ledger.events(record.run_id) if e.kind == kind]


def the_run(config: Path) -> Any:
    from gpuline.context import Context

    (record,) = Context(config_path=config, tier="nightly").ledger.list_runs()
    return record


def test_provision_step_records_the_failed_over_attempts_in_the_run_record(
    tmp_path: Path, aws_env: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(FAULTS_ENV, "g4dn.xlarge=InsufficientInstanceCapacity,g5.xlarge=InsufficientInstanceCapacity")
    config = ec2_project(tmp_path, "    instance_types: [g4dn.xlarge, g5.xlarge, g6.xlarge]\n")
    code = cli_main(config)
    assert code == 0, capsys.readouterr().err
    record = the_run(config)
    assert record.instance_type == "g6.xlarge" and record.instance_id == running()[0]["InstanceId"]
    assert record.times.requested <= record.times.provisioned
    (provisioned,) = events(config, "machine.provisioned")
    assert [(f["instance_type"], f["code"]) for f in provisioned["failures"]] == [
        ("g4dn.xlarge", "InsufficientInstanceCapacity"),
        ("g5.xlarge", "InsufficientInstanceCapacity"),
    ]
    assert provisioned["launch_s"] >= 0
    # The lease was recorded before the launch, with its holder.
    (leased,) = events(config, "lease.recorded")
    assert leased["lease_id"] == record.lease_id and "holder" in leased


def cli_main(config: Path, *args: str) -> int:
    from gpuline import cli

    return cli.main(["provision", "--config", str(config), "--tier", "nightly", *args])


def test_provision_step_exits_3_with_every_failure_when_all_are_exhausted(
    tmp_path: Path, aws_env: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(FAULTS_ENV, "*=InsufficientInstanceCapacity")
    config = ec2_project(tmp_path, "    instance_types: [g4dn.xlarge, g5.xlarge, g6.xlarge]\n")
    assert cli_main(config) == 3
    err = capsys.readouterr().err
    for itype in ("g4dn.xlarge", "g5.xlarge", "g6.xlarge"):
        assert f"{itype} on-demand: InsufficientInstanceCapacity" in err
    assert running() == []
    record = the_run(config)
    assert record.status == "failed" and record.instance_id is None
    (failed,) = events(config, "machine.failed")
    assert len(failed["failures"]) == 3


def test_policy_that_allows_only_spot_turns_the_on_demand_fallback_off(
    tmp_path: Path, aws_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(FAULTS_ENV, "spot=InsufficientInstanceCapacity")
    options = "    instance_types: [g4dn.xlarge]\n    on_demand_fallback: true\n"
    config = ec2_project(tmp_path, options, policy="version: 1\ntiers:\n  nightly:\n    allowed_lanes: [spot]\n")
    config.write_text(config.read_text().replace("  gpu_count: 1\n", "  gpu_count: 1\n  lane: spot\n"))
    assert cli_main(config) == 3
    assert running() == []
    allowed = ec2_project(tmp_path / "b", options)
    allowed.write_text(allowed.read_text().replace("  gpu_count: 1\n", "  gpu_count: 1\n  lane: spot\n"))
    assert cli_main(allowed) == 0
    assert the_run(allowed).lane == "on-demand"


def test_a_runner_label_registers_a_single_use_runner_with_a_unique_label(
    tmp_path: Path, aws_env: str, monkeypatch: pytest.MonkeyPatch, fake_github: Any
) -> None:
    monkeypatch.setenv("GITHUB_API_URL", fake_github.base_url)
    monkeypatch.setenv("GPULINE_GITHUB_TOKEN", "t")
    monkeypatch.setenv("GITHUB_REPOSITORY", "octo/models")
    config = ec2_project(tmp_path)
    assert cli_main(config, "--runner-label", "gpu") == 0
    record = the_run(config)
    assert record.runner_label == f"gpuline-{record.run_id}"
    (runner,) = fake_github.runners["octo/models"].values()
    assert runner["name"] == f"gpuline-{record.run_id}" and runner["labels"] == [record.runner_label, "gpu"]
    (registered,) = events(config, "runner.registered")
    assert registered["runner_id"] == runner["id"]
    import base64

    raw = ec2().describe_instance_attribute(InstanceId=record.instance_id, Attribute="userData")
    script = base64.b64decode(raw["UserData"]["Value"]).decode()
    jit = script.split("<<'JIT'\n")[1].split("\n")[0]
    assert jit and jit not in json_dump_events(config)
    assert jit not in repr(tags_of(running()[0]))


def json_dump_events(config: Path) -> str:
    from gpuline.context import Context

    ctx = Context(config_path=config, tier="nightly")
    (record,) = ctx.ledger.list_runs()
    return repr([e.data for e in ctx.ledger.events(record.run_id)]) + record.model_dump_json()


def test_a_runner_label_without_a_token_fails_before_anything_is_launched(
    tmp_path: Path, aws_env: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GITHUB_REPOSITORY", "octo/models")
    config = ec2_project(tmp_path)
    assert cli_main(config, "--runner-label", "gpu") == 2
    assert "needs a GitHub token" in capsys.readouterr().err
    assert running() == []


def test_a_runner_registered_for_a_launch_that_failed_is_deleted_again(
    tmp_path: Path, aws_env: str, monkeypatch: pytest.MonkeyPatch, fake_github: Any
) -> None:
    monkeypatch.setenv("GITHUB_API_URL", fake_github.base_url)
    monkeypatch.setenv("GPULINE_GITHUB_TOKEN", "t")
    monkeypatch.setenv("GITHUB_REPOSITORY", "octo/models")
    monkeypatch.setenv(FAULTS_ENV, "*=InsufficientInstanceCapacity")
    config = ec2_project(tmp_path, "    instance_types: [g4dn.xlarge]\n")
    assert cli_main(config, "--runner-label", "gpu") == 3
    assert events(config, "runner.registered") != []
    assert fake_github.runners["octo/models"] == {}


def test_importing_the_cli_and_every_provider_module_loads_no_cloud_sdk() -> None:
    code = (
        "import sys, gpuline.cli, gpuline.steps.provision, gpuline.steps.reap, gpuline.providers.ec2, "
        "gpuline.providers.kubernetes, gpuline.providers.rest, gpuline.providers.userdata\n"
        "loaded = sorted({m.split('.')[0] for m in sys.modules} & {'boto3', 'botocore', 'kubernetes', 'github'})\n"
        "print(','.join(loaded))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert done.stdout.strip() == ""
