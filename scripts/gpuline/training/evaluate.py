"""Running a project's own command on one model: ``eval.command`` (metrics back) and ``deploy.command``.

Both run from the project with a bounded time, in a process group of their own that a timeout ends
whole. Their output goes to stderr, so ``--json`` keeps stdout for the one JSON document.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gpuline import contract as c
from gpuline.errors import RefusedError
from gpuline.training.launch import entry_command

MAX_METRICS_BYTES = 1024 * 1024


def run_command(
    what: str, command: Sequence[str], *, cwd: Path, env: Mapping[str, str], timeout_s: int, python: str | None
) -> None:
    """Run ``command``; a RefusedError naming ``what`` when it fails, cannot start or runs out of time."""
    argv = entry_command(command, python)
    child_env = {k: v for k, v in os.environ.items() if k not in c.PER_LAUNCH}
    child_env.update({**env, "PYTHONUNBUFFERED": "1"})
    try:
        proc = subprocess.Popen(argv, cwd=cwd, env=child_env, stdout=sys.stderr, start_new_session=True)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise RefusedError(f"{what} could not start: {reason}", hint=f"check {what} in gpuline.yml") from None
    try:
        code = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _end_group(proc)
        section = what.partition(".")[0]
        raise RefusedError(
            f"{what} ran past its timeout ({timeout_s}s) and was stopped", hint=f"raise {section}.timeout"
        ) from None
    except BaseException:
        _end_group(proc)  # a stop of gpuline (SIGTERM, Ctrl-C) never leaves the command running
        raise
    if code != 0:
        raise RefusedError(f"{what} failed (exit {code})", hint="see its output above")


def evaluate_model(
    command: Sequence[str],
    model_dir: Path,
    *,
    cwd: Path,
    dataset: Path,
    out_dir: Path,
    timeout_s: int,
    python: str | None,
) -> dict[str, Any]:
    """The metrics ``eval.command`` writes for the model in ``model_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    eval_path = out_dir / "eval.json"
    eval_path.unlink(missing_ok=True)
    env = {c.MODEL_PATH: str(model_dir), c.DATASET_PATH: str(dataset), c.EVAL_PATH: str(eval_path)}
    run_command("eval.command", command, cwd=cwd, env=env, timeout_s=timeout_s, python=python)
    return read_eval(eval_path)


def read_eval(path: Path) -> dict[str, Any]:
    hint = f"eval.command must write a JSON object of metrics to ${c.EVAL_PATH}"
    try:
        with path.open("rb") as f:
            body = f.read(MAX_METRICS_BYTES + 1)
    except FileNotFoundError:
        raise RefusedError("eval.command wrote no metrics", hint=hint) from None
    if len(body) > MAX_METRICS_BYTES:
        raise RefusedError(f"eval.command wrote more than {MAX_METRICS_BYTES} bytes of metrics", hint=hint)
    try:
        metrics = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise RefusedError("eval.command wrote metrics that are not JSON", hint=hint) from None
    if not isinstance(metrics, dict):
        raise RefusedError("eval.command wrote JSON that is not an object of metrics", hint=hint)
    return metrics


def _end_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
