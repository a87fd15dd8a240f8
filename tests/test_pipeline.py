"""The whole loop on the reference project, as a user runs it: nightly, release, rollback, status,
a SIGKILLed train that resumes, and preflight refusals that provision nothing."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "templates" / "example"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (EXAMPLE / "gpuline.yml").exists(), reason="reference project not present"),
]


def gpuline(
    project: Path, *args: str, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "gpuline.cli", *args],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={**os.environ, **env} if env else None,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"gpuline {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def as_json(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(result.stdout)
    return body


COMMIT = "0123456789abcdef0123456789abcdef01234567"  # the commit the nightly run is told it builds


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("example") / "example"
    shutil.copytree(EXAMPLE, target, ignore=shutil.ignore_patterns(".gpuline", "__pycache__"))
    return target


@pytest.fixture(scope="module")
def nightly(example: Path) -> dict[str, Any]:
    return as_json(gpuline(example, "run", "--tier", "nightly", "--json", env={"GITHUB_SHA": COMMIT}))


def test_nightly_runs_every_step_and_stages_version_1(nightly: dict[str, Any]) -> None:
    assert nightly["preflight"]["verdict"] == "pass"
    assert "loss" in nightly["preflight"]["checks"]["smoke test"]
    assert nightly["cost-estimate"]["decision"]["decision"] in ("allow", "warn")
    assert "usd_p90" in nightly["cost-estimate"]["estimate"]
    assert len(nightly["train"]["checkpoints"]) >= 2
    assert nightly["train"]["resumed_from"] is None
    assert nightly["eval-gate"]["verdict"] == "pass"
    assert (nightly["version"], nightly["stage"]) == (1, "staging")
    assert nightly["teardown"]["status"] == "succeeded"
    assert nightly["teardown"]["lease_released"] is True


def test_release_promotes_production_and_rollback_restores_the_previous(example: Path, nightly: dict[str, Any]) -> None:
    first = as_json(gpuline(example, "run", "--tier", "release", "--json"))
    assert (first["version"], first["stage"]) == (2, "production")
    second = as_json(gpuline(example, "run", "--tier", "release", "--json"))
    assert (second["version"], second["stage"]) == (3, "production")
    # The second release was gated against the first one, both evaluated by eval.command in this job.
    assert second["eval-gate"]["baseline"] == "v2 (production; evaluated in this job)"
    back = as_json(gpuline(example, "rollback", "--model", "digits-mlp", "--stage", "production", "--json"))
    assert (back["version"], back["replaced"]) == (2, 3)


def test_status_shows_lineage_and_gpu_seconds(example: Path, nightly: dict[str, Any]) -> None:
    runs = as_json(gpuline(example, "status", nightly["run_id"], "--json"))["runs"]
    record = runs[0]
    lineage = record["lineage"]
    assert len(lineage["config_hash"]) == 64
    assert len(lineage["dataset_sha256"]) == 64
    assert lineage["commit"] == COMMIT
    assert record["gpu_seconds"] > 0
    # Every paid GPU-second is in one phase; the steps, the saves and eval.command each have theirs.
    phases = record["phase_gpu_seconds"]
    assert abs(sum(phases.values()) - record["gpu_seconds"]) <= 0.01 * record["gpu_seconds"]
    assert min(phases["train"], phases["checkpoint"], phases["eval"]) > 0
    assert record["idle_seconds"] == phases["idle"] and record["cost_source"] == "catalog estimate"
    assert record["times"]["provisioned"] and record["times"]["first_step"] and record["times"]["released"]
    assert record["promoted_version"] == 1
    assert all(g["passed"] for g in record["gates"])
    assert all(len(c["sha256"]) == 64 for c in record["checkpoints"])


def test_sigkilled_train_resumes_from_the_newest_checkpoint(example: Path) -> None:
    run_id = as_json(gpuline(example, "provision", "--tier", "release", "--json"))["run_id"]
    checkpoints = example / ".gpuline" / "artifacts" / "runs" / run_id / "checkpoints"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpuline.cli", "train", "--run-id", run_id],
        cwd=example,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            done = (
                [p for p in checkpoints.glob("step-*") if (p / "manifest.json").exists()]
                if checkpoints.exists()
                else []
            )
            if len(done) >= 2:
                break
            assert proc.poll() is None, "train finished before it could be killed"
            time.sleep(0.2)
        else:
            raise AssertionError("no two checkpoints within the deadline")
        os.killpg(proc.pid, signal.SIGKILL)  # the supervisor and the trainer, as a lost machine would
    finally:
        proc.wait(timeout=30)
    again = gpuline(example, "train", "--run-id", run_id, "--json")
    resumed = as_json(again)["resumed_from"]
    assert resumed is not None and resumed > 0
    assert f"from checkpoint step {resumed}" in again.stderr
    down = as_json(gpuline(example, "teardown", "--run-id", run_id, "--json"))
    # The killed supervisor reported no intervals (its seconds count as idle); still every paid
    # second is in exactly one phase, and the resumed train's steps are in train.
    assert abs(sum(down["phase_gpu_seconds"].values()) - down["gpu_seconds"]) <= 0.01 * down["gpu_seconds"]
    assert down["phase_gpu_seconds"]["train"] > 0


def test_bad_dataset_hash_fails_preflight_and_provisions_nothing(example: Path, tmp_path: Path) -> None:
    project = tmp_path / "bad"
    shutil.copytree(example, project, ignore=shutil.ignore_patterns(".gpuline"))
    config = project / "gpuline.yml"
    text = config.read_text()
    line = next(i for i, t in enumerate(text.splitlines(), 1) if "sha256:" in t)
    old = text.splitlines()[line - 1].split("sha256:")[1].strip().strip('"')
    config.write_text(text.replace(old, "f" * 64))
    result = gpuline(project, "run", "--tier", "nightly", check=False)
    assert result.returncode == 2
    assert f"gpuline.yml:{line}: dataset.sha256: dataset hash mismatch" in result.stderr
    runs = as_json(gpuline(project, "status", "--json"))["runs"]
    assert runs[0]["status"] == "failed" and runs[0]["stage"] == "preflight"
    assert runs[0]["lease_id"] is None and runs[0]["times"]["provisioned"] is None
