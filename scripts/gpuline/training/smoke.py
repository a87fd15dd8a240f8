"""Preflight's checks of the entrypoint, on a CPU runner before any GPU is bought.

The import check imports the entrypoint in a child interpreter (its ``__main__`` block does not run)
and names the missing module and the line that imports it. The smoke test runs the entrypoint with
``GPULINE_SMOKE=1``: it trains ~20 steps on one batch, and the loss must fall. A script that also
writes its eval metrics (``GPULINE_EVAL_PATH``) in smoke mode reports their names with the result.

The smoke test is also the estimate's stopwatch (:class:`~gpuline.decisions.phases.SmokeTimings`):
process start to the first step written (interpreter, imports, data load, the first step), the steady
step time, the exit, and, when the script does them in smoke mode, a checkpoint save (it is asked
for one at step ``SMOKE_CHECKPOINT_AT``) and ``eval.command`` on the model it wrote.
"""

from __future__ import annotations

import itertools
import json
import os
import shlex
import signal
import statistics
import subprocess
import tempfile
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpuline import contract
from gpuline.decisions.phases import SmokeTimings
from gpuline.errors import InputError, Location
from gpuline.inputs import given
from gpuline.training.launch import child_env, python_interpreter
from gpuline.training.metrics import read_eval, read_metrics
from gpuline.training.process import TAIL_LINES, LineReader, exit_code, signal_group, start_child
from gpuline.training.request import RunPaths, SmokeResult

SMOKE_DROP = 0.9  # the one-batch loss must end below 90% of where it started
SMOKE_CHECKPOINT_AT = 10
"""The checkpoint interval a smoke run is given: a script that honours it saves once mid-run, and the
save's stall shows as the gap after that step."""
_IMPORT_TIME_HINT = "keep work at import time small; start training under `if __name__ == '__main__':`"


@dataclass
class TimedSmokeResult(SmokeResult):
    """The smoke result with what it measured for the estimate's phases."""

    timings: SmokeTimings | None = None
    # eval.command run on the smoke model: what it wrote, or why it could not say (None: not run).
    evaluated: SmokeEval | None = None


@dataclass
class SmokeEval:
    """eval.command on the smoke run's model: its exit code and the metrics it wrote (when it did)."""

    exit_code: int | None
    metrics: dict[str, Any] | None


def smoke_test(
    command: list[str],
    cwd: Path,
    dataset_path: Path | None,
    hyperparameters: Mapping[str, Any],
    timeout_s: float,
    *,
    extra_env: Mapping[str, str] | None = None,
    eval_command: list[str] | None = None,
) -> TimedSmokeResult:
    """Run the entrypoint with ``GPULINE_SMOKE=1`` on CPU: it trains ~20 steps on one batch.

    Returns the losses, whether they fell, and the timings of the phases it went through; with
    ``eval_command`` (gpuline.yml's eval.command) that command is timed on the model the smoke run
    wrote, when it wrote one. Raises InputError when the script fails, times out or writes no losses,
    since no GPU should be bought for a script that cannot do that much.
    """
    with tempfile.TemporaryDirectory(prefix="gpuline-smoke-") as tmp:
        paths = RunPaths(Path(tmp))
        trainer = paths.contract(
            run_id="smoke",
            hyperparameters=hyperparameters,
            dataset_path=dataset_path,
            checkpoint_interval=SMOKE_CHECKPOINT_AT,
            resume_from=None,
            max_duration_s=timeout_s,
            smoke=True,
        )
        env = child_env(trainer.to_env(), {"CUDA_VISIBLE_DEVICES": "", **(extra_env or {})})
        shown = shlex.join(command)
        launched, started = time.time(), time.monotonic()
        code, lines = _run_to_exit(command, cwd, env, timeout_s, shown)
        wall = time.monotonic() - started
        if code != 0:
            last = next((line for line in reversed(lines) if line.strip()), "(no output)")
            raise InputError(
                f"the smoke test of `{shown}` exited with code {code}: {last}",
                hint=f"run it locally with {contract.SMOKE}=1 and fix the error shown",
            )
        rows = read_metrics(paths.metrics)
        base = _smoke_result(rows, wall, code, lines, shown)
        # A script that evaluates in smoke mode too names the metrics it writes, so preflight can
        # check the gates against them before a GPU trains a model whose gates cannot be read.
        eval_metrics = read_eval(paths.eval) if paths.eval.is_file() else None
        timings = measure(rows, launched, wall, paths.checkpoints)
        evaluated = None
        if eval_command and _has_files(paths.output):
            took, evaluated = _time_eval(eval_command, cwd, env, paths, timeout_s)
            if timings is not None:
                timings.eval_s = took
        return TimedSmokeResult(
            base.losses,
            base.fell,
            base.step_seconds,
            code,
            lines,
            eval_metrics=eval_metrics,
            timings=timings,
            evaluated=evaluated,
        )


def measure(rows: list[dict[str, Any]], launched: float, wall: float, checkpoints: Path) -> SmokeTimings | None:
    """The phases a smoke run went through, from its metrics rows' wall-clock times (None: no times).

    ``launched`` is the wall-clock time the process was started, ``wall`` how long it ran."""
    stamped = [(int(r["step"]), float(r["time"])) for r in rows if _number(r.get("time")) and _number(r.get("step"))]
    if not stamped:
        return None
    times = [t for _, t in stamped]
    gaps = [b - a for a, b in itertools.pairwise(times) if b >= a]
    step_s = statistics.median(gaps) if gaps else None
    # The gap after a step that saved holds the save's stall and one ordinary step.
    stalls = [
        (t_next - t) - (step_s or 0.0)
        for (step, t), (_, t_next) in itertools.pairwise(stamped)
        if step % SMOKE_CHECKPOINT_AT == 0 and t_next >= t
    ]
    saved = _checkpoint_sizes(checkpoints)
    return SmokeTimings(
        start_s=max(0.0, times[0] - launched),
        step_s=step_s,
        exit_s=max(0.0, launched + wall - times[-1]),
        checkpoint_s=max(0.0, statistics.median(stalls)) if saved and stalls else None,
        checkpoint_bytes=round(statistics.median(saved)) if saved else None,
    )


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _checkpoint_sizes(folder: Path) -> list[int]:
    """The size of each checkpoint the smoke run saved (each a file or a folder in ``folder``)."""
    if not folder.is_dir():
        return []
    sizes = []
    for entry in folder.iterdir():
        files = [entry] if entry.is_file() else [f for f in entry.rglob("*") if f.is_file()]
        sizes.append(sum(f.stat().st_size for f in files))
    return [size for size in sizes if size > 0]


def _has_files(folder: Path) -> bool:
    return folder.is_dir() and any(f.is_file() for f in folder.rglob("*"))


def _time_eval(
    command: list[str], cwd: Path, env: dict[str, str], paths: RunPaths, timeout_s: float
) -> tuple[float | None, SmokeEval]:
    """Seconds eval.command takes on the smoke run's model (None when it does not finish cleanly) and
    what it wrote. The smoke model is barely trained: eval-gate, not preflight, judges the values;
    preflight checks only that the gates' metrics are among the names."""
    out = paths.root / "smoke-eval.json"
    env = {**env, contract.MODEL_PATH: str(paths.output), contract.EVAL_PATH: str(out)}
    started = time.monotonic()
    try:
        code, _ = _run_to_exit(command, cwd, env, timeout_s, shlex.join(command))
    except InputError:
        return None, SmokeEval(None, None)
    took = time.monotonic() - started
    try:
        metrics = read_eval(out) if code == 0 and out.is_file() else None
    except InputError:
        metrics = None
    return (took if code == 0 else None), SmokeEval(code, metrics)


def _run_to_exit(
    command: list[str], cwd: Path, env: dict[str, str], timeout_s: float, shown: str
) -> tuple[int, list[str]]:
    """Run the smoke command to its end: its exit code and the tail of its output."""
    proc = start_child(list(command), cwd, env)
    assert proc.stdout is not None
    lines: deque[str] = deque(maxlen=TAIL_LINES)
    reader = LineReader(proc.stdout, lines.append)
    reader.start()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        signal_group(proc.pid, signal.SIGKILL)
        proc.wait()
        raise InputError(
            f"the smoke test of `{shown}` did not finish within {timeout_s:.0f}s",
            hint=f"with {contract.SMOKE}=1 the script should train about 20 steps on one batch and exit",
        ) from None
    finally:
        signal_group(proc.pid, signal.SIGKILL)
        reader.join()
    return exit_code(proc.returncode), list(lines)


def _smoke_result(rows: list[dict[str, Any]], wall: float, code: int, lines: list[str], shown: str) -> SmokeResult:
    """The losses the smoke run wrote, whether they fell, and how long one step took."""
    losses = [float(r["loss"]) for r in rows if isinstance(r.get("loss"), int | float)]
    if not losses:
        raise InputError(
            f"the smoke test of `{shown}` wrote no losses to {contract.METRICS_PATH}",
            hint='append one JSON line {"step": N, "loss": L} per training step',
        )
    times = [float(r["time"]) for r in rows if isinstance(r.get("time"), int | float)]
    gaps = [b - a for a, b in itertools.pairwise(times) if b >= a]
    step_seconds = statistics.median(gaps) if gaps else wall / len(losses)
    fell = len(losses) >= 2 and losses[-1] < losses[0] * SMOKE_DROP
    return SmokeResult(losses, fell, step_seconds, code, lines)


# Runs in the project's interpreter, which need not have gpuline: the standard library only. It prints
# one line, the marker (argv[2]) and a JSON report, so output of the entrypoint itself cannot be taken
# for it.
_IMPORT_CHECK = r"""
import json, os, runpy, sys, traceback
path = os.path.abspath(sys.argv[1])
marker = sys.argv[2]
sys.path.insert(0, os.path.dirname(path))
sys.argv = [path]

def line_in_entrypoint(exc):
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if os.path.abspath(f.filename) == path]
    return frames[-1].lineno if frames else None

try:
    runpy.run_path(path, run_name="__gpuline_import_check__")
except SyntaxError as exc:
    report = {"kind": "syntax", "type": "SyntaxError", "message": exc.msg, "line": exc.lineno, "name": None}
except ImportError as exc:
    report = {"kind": "import", "type": type(exc).__name__, "message": str(exc), "name": exc.name,
              "line": line_in_entrypoint(exc)}
except BaseException as exc:
    report = {"kind": "other", "type": type(exc).__name__, "message": str(exc), "name": None,
              "line": line_in_entrypoint(exc)}
else:
    report = None
print(marker + " " + json.dumps(report), flush=True)
"""


def check_entrypoint_imports(path: Path, cwd: Path, *, python: str | None = None, timeout_s: float = 300) -> None:
    """Import the entrypoint (its ``__main__`` block does not run) in a child interpreter.

    ``python`` is the interpreter to import it with: by default ``GPULINE_PYTHON``, else gpuline's own.
    Raises InputError naming the missing module and the line that imports it.
    """
    if not path.is_file():
        raise InputError(f"entrypoint {path} does not exist", hint="fix entrypoint.import_check in gpuline.yml")
    interpreter = python_interpreter(python=python or given(os.environ, contract.PYTHON))
    try:
        done = subprocess.run(
            [interpreter, "-c", _IMPORT_CHECK, str(path), contract.IMPORT_CHECK],
            cwd=cwd,
            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise InputError(f"importing {path.name} took longer than {timeout_s:.0f}s", hint=_IMPORT_TIME_HINT) from None
    prefix = contract.IMPORT_CHECK + " "
    marker = [ln for ln in done.stdout.splitlines() if ln.startswith(prefix)]
    if not marker:
        raise InputError(
            f"importing {path.name} ended the interpreter (exit {done.returncode}): "
            + (done.stderr.strip().splitlines() or ["no output"])[-1],
            hint=_IMPORT_TIME_HINT,
            location=Location(path),
        )
    report = json.loads(marker[-1].removeprefix(prefix))
    if report is not None:
        raise _import_failure(path, report)


def _import_failure(path: Path, report: dict[str, Any]) -> InputError:
    """The error for a failed import, from the child's report."""
    where = Location(path, line=report.get("line"))
    if report["kind"] == "import":
        missing = report.get("name") or "a module"
        return InputError(
            f"{path.name} cannot be imported: {report['type']}: {report['message']}",
            hint=f"install {missing} in the training environment (add it to your requirements)",
            location=where,
        )
    if report["kind"] == "syntax":
        return InputError(f"{path.name} has a syntax error: {report['message']}", hint="fix the syntax", location=where)
    return InputError(
        f"importing {path.name} raised {report['type']}: {report['message']}",
        hint="move work that needs data or a GPU under `if __name__ == '__main__':`",
        location=where,
    )
