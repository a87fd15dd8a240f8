"""The README's framework-free trainer, run as a user would copy it: the whole nightly tier without
torch, and the refusals at the end of the pipeline (a failed gate, a promote without gates)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import write_project

README = Path(__file__).resolve().parents[1] / "docs" / "training.md"


def readme_trainer() -> str:
    section = README.read_text().split("<!-- section:training -->")[1].split("<!-- /section:training -->")[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    code = next(b for b in blocks if "GPULINE_CHECKPOINT_DIR" in b)
    return code


def gpuline(project: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    result = subprocess.run(
        [sys.executable, "-m", "gpuline.cli", *args, "--json"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    return result.returncode, json.loads(result.stdout), result.stderr


GATES = "eval:\n  gates:\n    - {metric: loss, goal: minimize, max: %s}\ncheckpoint: {interval_steps: 4}\n"


@pytest.fixture
def make(tmp_path: Path) -> Any:
    def build(max_loss: str) -> Path:
        config = write_project(tmp_path / f"p{max_loss}", spec_extra=GATES % max_loss, train_py=readme_trainer())
        return config.parent

    return build


def test_the_readme_trainer_runs_the_nightly_tier(make: Any) -> None:
    project = make("1.5")
    code, body, err = gpuline(project, "run", "--tier", "nightly")
    assert code == 0, err
    assert (body["version"], body["stage"]) == (1, "staging")
    # 10 steps, interval 4: the supervisor adopted plain step-4, step-8 and the final step-10.
    assert [c["step"] for c in body["train"]["checkpoints"]] == [4, 8, 10]
    assert body["teardown"]["status"] == "succeeded"


def test_a_failed_gate_exits_1_promotes_nothing_and_still_tears_down(make: Any) -> None:
    project = make("0.0001")
    code, body, _ = gpuline(project, "run", "--tier", "release")
    assert code == 1
    assert "loss" in body["error"] and "above the maximum" in body["error"]
    _, status, _ = gpuline(project, "status")
    run = status["runs"][0]
    assert run["status"] == "refused" and run["stage"] == "eval-gate"
    assert run["promoted_version"] is None
    assert run["times"]["released"] is not None  # teardown ran after the refusal
    assert not run["gates"][0]["passed"]
    # Torn down, the run is closed: it is never promoted, whatever its gates said.
    code, body, _ = gpuline(project, "promote", "--run-id", run["run_id"])
    assert code == 2 and "a closed run is never resumed" in body["error"]
    code, body, _ = gpuline(project, "rollback", "--model", "tiny", "--stage", "production")
    assert code == 2 and "never been in production" in body["error"]


def test_sigterm_to_train_is_a_preemption_that_says_how_to_resume(tmp_path: Path) -> None:
    slow = readme_trainer().replace("step, w = step + 1,", "time.sleep(0.02)\n            step, w = step + 1,")
    slow = slow.replace("import json, os, signal, sys", "import json, os, signal, sys, time")
    config = write_project(tmp_path / "slow", spec_extra=GATES % "1.5", train_py=slow)
    config.write_text(config.read_text().replace("steps: 10", "steps: 5000"))
    project = config.parent
    code, prov, err = gpuline(project, "provision")
    assert code == 0, err
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpuline.cli", "train", "--run-id", prov["run_id"], "--json"],
        cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    local = project / ".gpuline" / "runs" / prov["run_id"]
    deadline = time.monotonic() + 120
    while not list(local.rglob("step-*/manifest.json")):
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint before the deadline"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 3
    error = json.loads(out)["error"]
    assert "preempted at step" in error and f"gpuline train --run-id {prov['run_id']}" in error
