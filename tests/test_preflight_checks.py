"""What preflight checks before anything is bought: every value that would fail only once a machine is
leased, or would silently weaken a gate, fails here, as one line naming the file, the line, the
field and the fix, with exit 2, and nothing leased or reserved."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from conftest import TINY_TRAIN, write_project
from gpuline.cli import main
from gpuline.ledger.sqlite import SqliteLedger
from gpuline.spec import load_spec

GPU = "  provider: local\n  gpu_type: cpu\n  max_duration: 10m\n"


def preflight(capsys: pytest.CaptureFixture[str], config: Path) -> tuple[int, dict[str, Any], str]:
    code = main(["preflight", "--config", str(config), "--json"])
    captured = capsys.readouterr()
    return code, json.loads(captured.out), captured.err


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    assert "Traceback" not in err and "internal error" not in err, err
    return lines[0]


def nothing_held(config: Path) -> None:
    path = config.parent / ".gpuline" / "ledger.db"
    if path.exists():
        ledger = SqliteLedger(path)
        assert ledger.leases() == [] and ledger.reservations() == []


def edited(tmp_path: Path, old: str, new: str, *, extra: str = "") -> Path:
    config = write_project(tmp_path / "p", spec_extra=extra)
    text = config.read_text()
    assert old in text
    config.write_text(text.replace(old, new, 1))
    return config


CASES = [
    # (id, (old, new) in gpuline.yml or None, appended text, expected "line: field", words in the message)
    (
        "registry-ftp",
        None,
        "backends:\n  registry: ftp://x\n",
        "19: backends.registry",
        "'ftp' is not a valid model registry backend",
    ),
    (
        "storage-gs",
        None,
        "backends:\n  storage: gs://bucket/p\n",
        "19: backends.storage",
        "'gs' is not a valid storage backend",
    ),
    (
        "ledger-unknown",
        None,
        "backends:\n  ledger: mongo://x\n",
        "19: backends.ledger",
        "'mongo' is not a valid ledger backend",
    ),
    ("provider-nope", ("provider: local", "provider: nope"), "", "15: resources.provider", "not a provider gpuline"),
    (
        "provider-nope-in-a-tier",
        None,
        "tiers:\n  release:\n    resources:\n      provider: github\n",
        "21: tiers.release.resources.provider",
        "'github' is not a provider gpuline can launch",
    ),
    (
        "instance-type-nope",
        ("gpu_type: cpu", "gpu_type: cpu\n  instance_type: nope.xlarge"),
        "",
        "17: resources.instance_type",
        "'nope.xlarge' is not in the pricing catalog for local",
    ),
    (
        "instance-type-in-a-tier",
        None,
        "tiers:\n  release:\n    resources:\n      instance_type: g9.huge\n",
        "21: tiers.release.resources.instance_type",
        "'g9.huge' is not in the pricing catalog",
    ),
    (
        "no-instance-with-those-gpus",
        ("provider: local\n  gpu_type: cpu", "provider: ec2\n  gpu_type: t4\n  gpu_count: 16"),
        "",
        "16: resources.gpu_type",
        "ec2 offers no instance with 16 x t4",
    ),
    (
        "gpu-count-true",
        ("gpu_type: cpu", "gpu_type: cpu\n  gpu_count: true"),
        "",
        "17: resources.gpu_count",
        "valid integer (got True)",
    ),
    ("nodes-true", ("gpu_type: cpu", "gpu_type: cpu\n  nodes: yes"), "", "17: resources.nodes", "(got True)"),
    ("steps-abc", ("steps: 10", "steps: abc"), "", "13: hyperparameters.steps", "positive whole number (got 'abc')"),
    ("steps-zero", ("steps: 10", "steps: 0"), "", "13: hyperparameters.steps", "(got 0)"),
    (
        "steps-in-a-tier",
        None,
        "tiers:\n  nightly:\n    hyperparameters:\n      steps: 1.5\n",
        "21: tiers.nightly.hyperparameters.steps",
        "(got 1.5)",
    ),
    ("baseline-typo", None, "eval:\n  baseline: prod\n", "19: eval.baseline", "'staging' or 'production' (got 'prod')"),
    (
        "gate-metric-empty",
        None,
        "eval:\n  gates:\n    - {metric: '', min: 0.5}\n",
        "20: eval.gates[0].metric",
        "at least 1 character",
    ),
]


@pytest.mark.parametrize(("edit", "extra", "where", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_what_would_fail_after_the_lease_fails_in_preflight(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    edit: tuple[str, str] | None,
    extra: str,
    where: str,
    words: str,
) -> None:
    config = edited(tmp_path, *edit, extra=extra) if edit else write_project(tmp_path / "p", spec_extra=extra)
    code, body, err = preflight(capsys, config)
    assert code == 2 and body["exit_code"] == 2, err
    line = one_line(err)
    assert f"error: {config}:{where}: " in line and words in line and "(fix: " in line
    nothing_held(config)


@pytest.mark.parametrize(
    ("variable", "value", "words"),
    [
        ("GPULINE_REGISTRY", "ftp://x", "registry URI 'ftp://x': 'ftp' is not a valid model registry backend"),
        ("GPULINE_STORAGE", "gs://bucket/p", "storage URI 'gs://bucket/p': 'gs' is not a valid storage backend"),
        ("GPULINE_LEDGER", "mongo://x", "ledger URI 'mongo://x': 'mongo' is not a valid ledger backend"),
    ],
)
def test_a_backend_override_with_an_unknown_scheme_is_named_by_its_variable(
    project: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
    value: str,
    words: str,
) -> None:
    monkeypatch.setenv(variable, value)
    code, _body, err = preflight(capsys, project)
    assert code == 2
    assert one_line(err).startswith(f"error: {variable}: {words}") and f"or unset {variable})" in err
    # Refused before the run record: nothing exists that a teardown would have to end.
    assert not (project.parent / ".gpuline" / "ledger.db").exists()


# ---------------------------------------------------------------- gates against what the script writes

WRITES_EVAL = TINY_TRAIN.replace(
    "        sys.exit(0)",
    "        pathlib.Path(os.environ['GPULINE_EVAL_PATH']).write_text(\n"
    "            json.dumps({'accuracy': 0.5, 'loss': 1.0, 'slices': {'digit=1': {'accuracy': 0.5}}}))\n"
    "        sys.exit(0)",
)


@pytest.mark.parametrize(
    ("gate", "where", "words"),
    [
        ("{metric: acuracy, min: 0.5}", "20: eval.gates[0].metric", "no metric 'acuracy' in its eval metrics"),
        ("{metric: accuracy, slice: 'digit=7', min: 0.5}", "20: eval.gates[0].slice", "no slice 'digit=7'"),
    ],
    ids=["metric", "slice"],
)
def test_a_gate_on_a_metric_the_script_does_not_write_fails_in_preflight(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], gate: str, where: str, words: str
) -> None:
    config = write_project(tmp_path / "p", spec_extra=f"eval:\n  gates:\n    - {gate}\n", train_py=WRITES_EVAL)
    code, _body, err = preflight(capsys, config)
    assert code == 2, err
    line = one_line(err)
    assert f"{config}:{where}: the script writes {words}" in line
    assert "accuracy, loss, slices" in line or "digit=1" in line


def test_gates_on_metrics_the_script_writes_pass(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gates = (
        "eval:\n  gates:\n    - {metric: loss, goal: minimize, max: 2}\n"
        "    - {metric: accuracy, slice: 'digit=1', min: 0}\n"
    )
    config = write_project(tmp_path / "p", spec_extra=gates, train_py=WRITES_EVAL)
    code, body, err = preflight(capsys, config)
    assert code == 0, err
    assert body["checks"]["gate metrics"] == "2 gate(s) read metrics the script writes"


# A smoke run that leaves a model behind, and an eval.command that scores it (or crashes on it).
WRITES_MODEL = TINY_TRAIN.replace(
    "        sys.exit(0)",
    "        out = pathlib.Path(os.environ['GPULINE_OUTPUT_DIR'])\n"
    "        out.mkdir(parents=True, exist_ok=True)\n"
    "        (out / 'model.bin').write_bytes(b'weights')\n"
    "        sys.exit(0)",
)
EVALUATE = """
import json, os, pathlib, sys
assert (pathlib.Path(os.environ["GPULINE_MODEL_PATH"]) / "model.bin").read_bytes() == b"weights"
if os.environ.get("CRASH"):
    sys.exit(3)
pathlib.Path(os.environ["GPULINE_EVAL_PATH"]).write_text(json.dumps({"accuracy": 0.1, "loss": 2.0}))
"""


def eval_project(root: Path, gate: str) -> Path:
    extra = f"eval:\n  command: [python, evaluate.py]\n  gates:\n    - {gate}\n"
    config = write_project(root, spec_extra=extra, train_py=WRITES_MODEL)
    (root / "evaluate.py").write_text(EVALUATE)
    return config


def test_gates_are_checked_on_what_eval_command_writes_for_the_smoke_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, body, err = preflight(capsys, eval_project(tmp_path / "ok", "{metric: accuracy, min: 0.5}"))
    assert code == 0, err
    # The smoke model is barely trained: its accuracy (0.1) is below the gate, and that is not preflight's call.
    assert body["checks"]["gate metrics"] == "1 gate(s) read metrics eval.command writes"
    config = eval_project(tmp_path / "typo", "{metric: acuracy, min: 0.5}")
    code, _body, err = preflight(capsys, config)
    assert code == 2, err
    line = one_line(err)
    assert f"{config}:21: eval.gates[0].metric: eval.command writes no metric 'acuracy'" in line
    assert "(it writes: accuracy, loss)" in line


def test_an_eval_command_that_fails_on_the_smoke_model_leaves_the_gates_to_eval_gate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CRASH", "1")
    code, body, err = preflight(capsys, eval_project(tmp_path / "p", "{metric: accuracy, min: 0.5}"))
    assert code == 0, err
    assert body["checks"]["gate metrics"] == (
        "1 gate(s); eval.command exited 3 on the smoke model (eval-gate runs it on the trained one), "
        "so none could be checked"
    )


def test_gates_are_not_guessed_at_when_the_script_writes_no_metrics_in_smoke_mode(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_project(tmp_path / "p", spec_extra="eval:\n  gates:\n    - {metric: anything, min: 0}\n")
    code, body, err = preflight(capsys, config)
    assert code == 0, err
    assert "none could be checked" in body["checks"]["gate metrics"]


# ---------------------------------------------------------------- provider aliases


def test_a_provider_alias_is_the_provider_everywhere(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = edited(tmp_path, GPU, "  provider: aws\n  gpu_type: t4\n  gpu_count: 1\n  max_duration: 1h\n")
    assert load_spec(config).resources.provider == "ec2"
    code = main(["cost-estimate", "--config", str(config), "--json", "--no-reserve"])
    body = json.loads(capsys.readouterr().out)
    assert code == 0, body
    assert body["estimate"]["provider"] == "ec2" and body["estimate"]["instance_type"] == "g4dn.xlarge"
    run = SqliteLedger(config.parent / ".gpuline" / "ledger.db").get_run(body["run_id"])
    assert run.provider == "ec2" and run.resolved_config["resources"]["provider"] == "ec2"
