"""eval.command, the check after promotion (``gpuline verify``) and the deploy hook, run through the CLI
on a copied project as a user runs them.

The project is framework-free so each run takes a second: its trainer writes a one-number model
(``model.json``), its eval command scores a model on the dataset file (score = w * bytes / 1000), so a
changed dataset changes every model's score the way new eval data would.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import write_project
from github_fake import FakeGitHub

TRAIN = """
import json, os, pathlib, sys


def main() -> None:
    metrics = pathlib.Path(os.environ["GPULINE_METRICS_PATH"])
    if os.environ.get("GPULINE_SMOKE") == "1":
        with metrics.open("a") as fh:
            for step, loss in enumerate([4.0, 2.0, 1.0, 0.5]):
                fh.write(json.dumps({"step": step, "loss": loss}) + "\\n")
        sys.exit(0)
    w = json.loads(os.environ["GPULINE_HPARAMS"])["steps"]
    out = pathlib.Path(os.environ["GPULINE_OUTPUT_DIR"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.json").write_text(json.dumps({"w": w}))
    (out / "weights.bin").write_bytes(bytes(range(256)) * 4)
    pathlib.Path(os.environ["GPULINE_EVAL_PATH"]).write_text(json.dumps({"score": -1}))  # never trusted


if __name__ == "__main__":
    main()
"""

EVAL = """
import json, os, pathlib

model = pathlib.Path(os.environ["GPULINE_MODEL_PATH"])
w = json.loads((model / "model.json").read_text())["w"]
assert (model / "weights.bin").stat().st_size == 1024
n = pathlib.Path(os.environ["GPULINE_DATASET_PATH"]).stat().st_size
score = w * n / 1000
out = pathlib.Path(os.environ["GPULINE_EVAL_PATH"])
if os.environ.get("BREAK_AFTER_PROMOTION") and "verify-" in str(out):
    score = -5.0  # what a model that no longer works scores
out.write_text(json.dumps({"score": score}))
print(f"scored {score} on {n} bytes")
"""

DEPLOY = """
import json, os, pathlib, sys

keys = ("GPULINE_MODEL", "GPULINE_MODEL_VERSION", "GPULINE_STAGE", "GPULINE_ARTIFACTS_URI")
pathlib.Path("deployed.jsonl").open("a").write(json.dumps({k: os.environ.get(k) for k in keys}) + "\\n")
sys.exit(3 if os.environ.get("DEPLOY_FAILS") else 0)
"""

GATES = """eval:
  command: [python, eval.py]
  gates:
    - {metric: score, min: 0, max_regression: 0.05}
"""


def cli(project: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, dict[str, Any], str]:
    result = subprocess.run(
        [sys.executable, "-m", "gpuline.cli", *args, "--json"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, **(env or {})},
    )
    return result.returncode, json.loads(result.stdout), result.stderr


def make_project(root: Path, extra: str = GATES) -> Path:
    write_project(root, spec_extra=extra, train_py=TRAIN)
    (root / "eval.py").write_text(EVAL)
    (root / "deploy.py").write_text(DEPLOY)
    return root


def change_dataset(project: Path, size: int) -> None:
    """New eval data: every model's score changes with it."""
    data = project / "data.bin"
    old = hashlib.sha256(data.read_bytes()).hexdigest()
    data.write_bytes(b"x" * size)
    config = project / "gpuline.yml"
    config.write_text(config.read_text().replace(old, hashlib.sha256(data.read_bytes()).hexdigest()))


def models(project: Path) -> dict[str, Any]:
    code, body, err = cli(project, "models", "tiny")
    assert code == 0, err
    (model,) = body["models"]
    return dict(model)


def production(project: Path) -> int | None:
    held = models(project)["stages"]["production"]
    return None if held is None else int(held["version"])


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return make_project(tmp_path / "proj")


def test_eval_gate_scores_candidate_and_baseline_on_the_same_data_in_the_same_job(project: Path) -> None:
    code, first, err = cli(project, "run", "--tier", "release")
    assert code == 0, err
    assert first["eval-gate"]["baseline"] == "none yet"
    # The training script's own eval file (-1) is not what the gates read: eval.command's is.
    assert [v["value"] for v in first["eval-gate"]["gates"]] == [10.0]

    # The eval data changes. The production model's stored score (10) would make the new candidate
    # (5 on the new data) a 50% regression; measured side by side on today's data, they are equal.
    change_dataset(project, 500)
    code, second, err = cli(project, "run", "--tier", "release")
    assert code == 0, err
    (verdict,) = second["eval-gate"]["gates"]
    assert (verdict["value"], verdict["baseline"], verdict["passed"]) == (5.0, 5.0, True)
    assert second["eval-gate"]["baseline"] == "v1 (production; evaluated in this job)"
    assert production(project) == 2


def test_the_check_after_promotion_passes_then_fails_on_a_corrupt_or_missing_file(project: Path) -> None:
    code, body, err = cli(project, "run", "--tier", "release")
    assert code == 0, err
    assert body["verify"]["verdict"] == "pass" and body["teardown"]["status"] == "succeeded"
    code, ok, err = cli(project, "verify")
    assert code == 0, err
    assert ok["version"] == 1 and "match the registry's checksums" in ok["checks"]["files"]

    model_dir = next((project / ".gpuline/artifacts/runs").glob("*/model"))
    weights = model_dir / "weights.bin"
    good = weights.read_bytes()
    weights.write_bytes(good[:-1] + b"\x00")
    code, _, err = cli(project, "verify")
    assert code == 1 and "weights.bin does not match its recorded sha256" in err

    weights.unlink()
    code, _, err = cli(project, "verify")
    assert code == 1 and "weights.bin is missing" in err

    weights.write_bytes(good)
    (model_dir / "gpuline-model.json").write_text('{"files": {"model.json": {}}}')
    code, _, err = cli(project, "verify")
    assert code == 1 and "manifest does not match the registry's record" in err


def test_metrics_that_no_longer_pass_fail_the_check(project: Path) -> None:
    assert cli(project, "run", "--tier", "release")[0] == 0
    change_dataset(project, 0)  # every model now scores 0 ... and a broken one below the gate
    code, _, err = cli(project, "verify", env={"BREAK_AFTER_PROMOTION": "1"})
    assert code == 1 and "no longer passes its gates" in err and "score" in err


def test_a_failed_check_in_gpuline_run_rolls_production_back(project: Path) -> None:
    assert cli(project, "run", "--tier", "release")[0] == 0
    code, _, err = cli(project, "run", "--tier", "release", env={"BREAK_AFTER_PROMOTION": "1"})
    assert code == 1 and "no longer passes its gates" in err
    assert production(project) == 1
    rollback = models(project)["history"][0]
    assert rollback["action"] == "rollback" and rollback["version"] == 1 and rollback["previous"] == 2
    assert rollback["reason"].startswith("verify failed: tiny v2 in production no longer passes")
    assert rollback["actor"]
    code, records, _ = cli(project, "status")
    second = records["runs"][0]
    assert (second["status"], second["stage"]) == ("refused", "verify")


def test_without_eval_command_the_check_still_verifies_checksums(tmp_path: Path) -> None:
    project = make_project(tmp_path / "plain", extra="eval:\n  gates: []\n")
    assert cli(project, "run", "--tier", "release")[0] == 0
    code, ok, err = cli(project, "verify")
    assert code == 0, err
    assert ok["checks"]["metrics"] == "not evaluated: gpuline.yml has no eval.command"
    (next((project / ".gpuline/artifacts/runs").glob("*/model")) / "model.json").write_text('{"w": 99}')
    code, _, err = cli(project, "verify")
    assert code == 1 and "model.json does not match its recorded sha256" in err


def test_eval_command_errors_are_one_clear_line(project: Path) -> None:
    (project / "eval.py").write_text("import sys\nsys.exit(4)\n")
    code, _, err = cli(project, "run", "--tier", "nightly")
    assert code == 1 and "eval.command failed (exit 4)" in err
    (project / "eval.py").write_text("print('no metrics')\n")
    code, _, err = cli(project, "run", "--tier", "nightly")
    assert code == 1 and "eval.command wrote no metrics" in err
    (project / "eval.py").unlink()
    code, _, err = cli(project, "preflight")
    assert code == 2 and "eval.command" in err and "eval.py does not exist" in err
    assert "Traceback" not in err


DEPLOY_SPEC = GATES + "deploy:\n  command: [python, deploy.py]\n"


def test_deploy_runs_after_promotion_with_the_version_in_its_environment(tmp_path: Path) -> None:
    project = make_project(tmp_path / "dep", DEPLOY_SPEC)
    code, _, err = cli(project, "run", "--tier", "nightly")
    assert code == 0, err
    assert not (project / "deployed.jsonl").exists()  # staging is not in deploy.stages
    code, body, err = cli(project, "run", "--tier", "release")
    assert code == 0, err
    assert body["promote"]["deployed"] is True
    (seen,) = [json.loads(line) for line in (project / "deployed.jsonl").read_text().splitlines()]
    assert (seen["GPULINE_MODEL"], seen["GPULINE_MODEL_VERSION"], seen["GPULINE_STAGE"]) == ("tiny", "2", "production")
    assert seen["GPULINE_ARTIFACTS_URI"].endswith("/model") and body["run_id"] in seen["GPULINE_ARTIFACTS_URI"]


def test_a_failed_deploy_rolls_the_stage_back(tmp_path: Path) -> None:
    project = make_project(tmp_path / "dep", DEPLOY_SPEC)
    assert cli(project, "run", "--tier", "release")[0] == 0
    code, _, err = cli(project, "run", "--tier", "release", env={"DEPLOY_FAILS": "1"})
    assert code == 1 and "deploy of tiny v2 to production failed (deploy.command failed (exit 3))" in err
    assert "production is back at v1" in err
    assert production(project) == 1
    assert models(project)["history"][0]["reason"].startswith("deploy failed: deploy.command failed")


def test_a_first_deploy_that_fails_says_the_stage_still_holds_it(tmp_path: Path) -> None:
    project = make_project(tmp_path / "dep", DEPLOY_SPEC)
    code, _, err = cli(project, "run", "--tier", "release", env={"DEPLOY_FAILS": "1"})
    assert code == 1 and "production still holds it" in err and "v1 was the first" in err


def test_a_deploy_in_actions_is_a_github_deployment_with_its_status(tmp_path: Path, fake_github: FakeGitHub) -> None:
    project = make_project(tmp_path / "dep", DEPLOY_SPEC)
    env = {
        "GITHUB_API_URL": fake_github.base_url,
        "GITHUB_REPOSITORY": "acme/vision",
        "GITHUB_SHA": "c" * 40,
        "GITHUB_RUN_ID": "77",
        "GITHUB_TOKEN": "ghs_deploytoken",
        "GPULINE_GITHUB_RETRIES": "0",
    }
    assert cli(project, "run", "--tier", "release", env=env)[0] == 0
    code, _, err = cli(project, "run", "--tier", "release", env={**env, "DEPLOY_FAILS": "1"})
    assert code == 1, err
    first, second = sorted(fake_github.deployments["acme/vision"].values(), key=lambda d: d["id"])
    assert (first["ref"], first["environment"], first["payload"]["version"]) == ("c" * 40, "production", 1)
    assert [s["state"] for s in fake_github.statuses[first["id"]]] == ["in_progress", "success"]
    assert [s["state"] for s in fake_github.statuses[second["id"]]] == ["in_progress", "failure"]
    assert fake_github.violations == []
