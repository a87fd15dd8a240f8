"""Where the steps of a tier meet, through the CLI as the actions call it: the machine a run buys becomes
the train job's runner, a run keeps its tier from step to step, the environment's inputs are checked
like flags, and nothing is bought that cannot be used (a cloud machine under `gpuline run`, N nodes on a
one-machine provider)."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import boto3
import pytest

from conftest import read_outputs, write_project
from github_fake import FakeGitHub
from gpuline import cli
from gpuline.ledger.sqlite import SqliteLedger

pytest_plugins = ["github_fake"]
REPO = "acme/vision"


def gpuline(project: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpuline.cli", *args],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        check=False,
    )


def ledger_of(config: Path) -> SqliteLedger:
    return SqliteLedger(config.parent / ".gpuline" / "ledger.db")


def ec2() -> Any:
    return boto3.client("ec2", region_name="us-east-1", endpoint_url=os.environ["AWS_ENDPOINT_URL"])


def ec2_project(tmp_path: Path, extra: str = "") -> Path:
    image = str(ec2().describe_images(Owners=["amazon"])["Images"][0]["ImageId"])
    config = write_project(tmp_path / "proj", spec_extra=f"  region: us-east-1\n  options:\n    image_id: {image}\n")
    text = config.read_text().replace("provider: local", "provider: ec2").replace("gpu_type: cpu", "gpu_type: t4")
    config.write_text(text.replace("  max_duration: 10m", f"  gpu_count: 1\n  max_duration: 10m{extra}"))
    return config


def live_instances() -> list[dict[str, Any]]:
    pages = ec2().describe_instances(Filters=[{"Name": "instance-state-name", "Values": ["pending", "running"]}])
    return [i for r in pages["Reservations"] for i in r["Instances"]]


def user_data(instance_id: str) -> str:
    attr = ec2().describe_instance_attribute(InstanceId=instance_id, Attribute="userData")
    return base64.b64decode(attr["UserData"]["Value"]).decode()


# ---------------------------------------------------------------- the machine becomes the runner


@pytest.fixture
def in_a_workflow(actions_env: dict[str, Path], fake_github: FakeGitHub, monkeypatch: pytest.MonkeyPatch) -> FakeGitHub:
    monkeypatch.setenv("GITHUB_API_URL", fake_github.base_url)
    monkeypatch.setenv("GITHUB_REPOSITORY", REPO)
    monkeypatch.setenv("GPULINE_GITHUB_RETRIES", "0")
    return fake_github


@pytest.mark.integration
def test_in_actions_a_cloud_machine_registers_the_run_s_runner_and_the_train_job_runs_on_it(
    tmp_path: Path,
    aws_env: str,
    in_a_workflow: FakeGitHub,
    actions_env: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GPULINE_GITHUB_TOKEN", "ghs_runner_token")
    config = ec2_project(tmp_path)
    # No runner label given, as nightly.yml calls provision-gpu.
    assert cli.main(["provision", "--config", str(config), "--tier", "nightly"]) == 0
    out = read_outputs(actions_env["GITHUB_OUTPUT"])
    run_id = out["run-id"]
    assert out["runner-label"] == f"gpuline-{run_id}"
    assert json.loads(out["runs-on"]) == ["self-hosted", f"gpuline-{run_id}"]

    (runner,) = in_a_workflow.runners[REPO].values()
    assert runner["name"] == f"gpuline-{run_id}" and runner["labels"] == [f"gpuline-{run_id}"]
    (instance,) = live_instances()
    # The boot script carries exactly the config GitHub returned for that runner.
    found = re.search(r"<<'JIT'\n(.+)\nJIT", user_data(instance["InstanceId"]))
    assert found is not None
    assert json.loads(base64.b64decode(found.group(1)))["runner"] == runner["id"]
    assert in_a_workflow.violations == []

    # Teardown ends the machine and deletes the registration a runner that never ran would leave.
    assert cli.main(["teardown", "--config", str(config), "--run-id", run_id]) == 0
    assert live_instances() == []
    assert in_a_workflow.runners[REPO] == {}


@pytest.mark.integration
def test_without_a_runner_token_nothing_is_bought(
    tmp_path: Path, aws_env: str, in_a_workflow: FakeGitHub, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    for name in ("GPULINE_GITHUB_TOKEN", "GITHUB_TOKEN", "GH_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    config = ec2_project(tmp_path)
    assert cli.main(["provision", "--config", str(config), "--tier", "nightly"]) == 2
    assert "needs a GitHub token" in capsys.readouterr().out
    assert live_instances() == []
    assert ledger_of(config).leases() == []


# ---------------------------------------------------------------- `gpuline run` never buys an idle machine


def test_gpuline_run_refuses_a_cloud_provider_before_anything_is_recorded(tmp_path: Path) -> None:
    config = write_project(tmp_path / "proj")
    config.write_text(config.read_text().replace("provider: local", "provider: ec2"))
    done = gpuline(config.parent, "run", "--tier", "nightly")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "would pay for a machine that trains nothing" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (config.parent / ".gpuline" / "ledger.db").exists() or ledger_of(config).list_runs() == []


# ---------------------------------------------------------------- a run keeps its tier


RELEASE_LONGER = """
tiers:
  release:
    resources:
      max_duration: 50m
"""


def test_every_step_on_a_run_uses_the_run_s_tier_and_refuses_another(tmp_path: Path) -> None:
    config = write_project(tmp_path / "proj")
    config.write_text(config.read_text() + RELEASE_LONGER)
    project = config.parent
    made = gpuline(project, "preflight", "--tier", "release", "--json")
    assert made.returncode == 0, made.stdout + made.stderr
    run_id = json.loads(made.stdout)["run_id"]

    # No --tier: cost-estimate and provision act as the run's tier (release), not the default (nightly).
    assert gpuline(project, "cost-estimate", "--run-id", run_id).returncode == 0
    assert gpuline(project, "provision", "--run-id", run_id).returncode == 0
    record = ledger_of(config).get_run(run_id)
    assert record.ttl_seconds == 50 * 60 + 15 * 60  # release's max_duration plus the boot slack
    (held,) = ledger_of(config).reservations(state="held")
    assert held.expires_at >= record.expires_at

    wrong = gpuline(project, "train", "--run-id", run_id, "--tier", "nightly")
    assert wrong.returncode == 2
    assert f"run {run_id} is a release run; it cannot be acted on as nightly" in wrong.stderr
    via_env = gpuline(project, "teardown", "--run-id", run_id, env={"GPULINE_TIER": "pr-fast"})
    assert via_env.returncode == 2 and "is a release run" in via_env.stderr
    assert gpuline(project, "teardown", "--run-id", run_id).returncode == 0


@pytest.mark.parametrize("command", ["run", "preflight", "status"])
def test_an_unknown_tier_in_the_environment_is_refused_like_the_flag(tmp_path: Path, command: str) -> None:
    config = write_project(tmp_path / "proj")
    done = gpuline(config.parent, command, env={"GPULINE_TIER": "nigthly"})
    assert done.returncode == 2, done.stdout + done.stderr
    assert "GPULINE_TIER='nigthly' is not a tier" in done.stderr and "pr-fast, nightly, release" in done.stderr
    assert not (config.parent / ".gpuline" / "ledger.db").exists() or ledger_of(config).list_runs() == []


# ---------------------------------------------------------------- multi-node where one machine is launched


@pytest.mark.parametrize("provider", ["ec2", "rest"])
def test_preflight_refuses_nodes_that_the_provider_would_not_launch(tmp_path: Path, provider: str) -> None:
    config = write_project(tmp_path / "proj")
    text = config.read_text().replace("provider: local", f"provider: {provider}")
    config.write_text(text.replace("  max_duration: 10m", "  nodes: 2\n  max_duration: 10m"))
    line = next(i for i, t in enumerate(config.read_text().splitlines(), 1) if t.strip() == "nodes: 2")
    done = gpuline(config.parent, "preflight", "--tier", "nightly")
    assert done.returncode == 2, done.stdout + done.stderr
    (message,) = [m for m in done.stderr.splitlines() if m.startswith("error:")]
    assert f"gpuline.yml:{line}: resources.nodes" in message
    assert f"the {provider} provider launches one machine per run" in message and "provider: kubernetes" in message
