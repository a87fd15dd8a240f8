"""Fixtures for the training tests: a framework-free trainer script and request builders.

The trainer is plain Python (no torch, so it starts in milliseconds) and honours the whole entrypoint
contract: it resumes from GPULINE_RESUME_FROM, commits checkpoints every GPULINE_CHECKPOINT_INTERVAL
steps, writes metrics, eval and a model file, saves and exits 143 on SIGTERM, and runs a smoke mode.
Hyperparameters steer failures: ``crash_at`` (once, using ``crash_marker``), ``crash_always``,
``ignore_sigterm``, ``plain`` (checkpoints without a manifest), ``sleep`` (seconds per step).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gpuline.storage import Storage, open_storage
from gpuline.training import TrainRequest

TRAINER = r"""
import json, os, signal, sys, time
from pathlib import Path
from gpuline.training import checkpoints

hp = json.loads(os.environ.get("GPULINE_HPARAMS", "{}"))
metrics = open(os.environ["GPULINE_METRICS_PATH"], "a")

if os.environ.get("GPULINE_SMOKE") == "1":
    if hp.get("smoke_fail"):
        print("ValueError: labels out of range", flush=True)
        sys.exit(2)
    if hp.get("smoke_hang"):
        time.sleep(60)
    w = 0.0
    for i in range(1, 21):
        if not hp.get("smoke_flat"):
            w += 0.2 * (3.0 - w)
        if not hp.get("smoke_silent"):
            metrics.write(json.dumps({"step": i, "loss": (3.0 - w) ** 2, "time": i * 0.01}) + "\n")
    sys.exit(0)

ckdir = Path(os.environ["GPULINE_CHECKPOINT_DIR"])
interval = int(os.environ["GPULINE_CHECKPOINT_INTERVAL"])
steps = int(hp.get("steps", 20))
stop = False

def on_term(signum, frame):
    global stop
    stop = True

signal.signal(signal.SIGTERM, signal.SIG_IGN if hp.get("ignore_sigterm") else on_term)

w, step = 0.0, 0
resume = os.environ.get("GPULINE_RESUME_FROM")
if resume:
    state = json.loads((Path(resume) / "state.json").read_text())
    w, step = state["w"], state["step"]
    print(f"resumed at step {step}", flush=True)

def save(step):
    body = json.dumps({"w": w, "step": step})
    if hp.get("plain"):
        d = ckdir / f"step-{step:08d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / "state.json").write_text(body)
    else:
        checkpoints.commit_checkpoint(
            ckdir, step, run_id=os.environ["GPULINE_RUN_ID"], writer=lambda tmp: (tmp / "state.json").write_text(body)
        )

while step < steps:
    if stop:
        save(step)
        print(f"saved final checkpoint at step {step}", flush=True)
        sys.exit(143)
    step += 1
    w += 0.1 * (3.0 - w)
    loss = (3.0 - w) ** 2
    metrics.write(json.dumps({"step": step, "loss": loss, "time": time.time()}) + "\n")
    metrics.flush()
    if step % interval == 0:
        save(step)
    if hp.get("crash_always") and step == hp["crash_always"]:
        print("boom", flush=True)
        os._exit(1)
    marker = hp.get("crash_marker")
    if hp.get("crash_at") == step and marker and not Path(marker).exists():
        Path(marker).touch()
        print("boom", flush=True)
        os._exit(1)
    time.sleep(float(hp.get("sleep", 0.005)))

if step % interval:
    save(step)
out = Path(os.environ["GPULINE_OUTPUT_DIR"])
(out / "model.json").write_text(json.dumps({"w": w}))
Path(os.environ["GPULINE_EVAL_PATH"]).write_text(json.dumps({"accuracy": round(1 - (3.0 - w) ** 2 / 9, 6), "w": w}))
print(f"done at step {step}", flush=True)
"""


def write_trainer(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "train.py"
    path.write_text(TRAINER)
    return path


class Recorder:
    """Collects the supervisor's log lines and events, thread-safely."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.events: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()

    def log(self, line: str) -> None:
        with self._lock:
            self.lines.append(line)

    def event(self, kind: str, data: dict[str, Any]) -> None:
        with self._lock:
            self.events.append((kind, dict(data)))

    def kinds(self) -> list[str]:
        with self._lock:
            return [k for k, _ in self.events]

    def matching(self, text: str) -> list[str]:
        with self._lock:
            return [line for line in self.lines if text in line]


def make_request(
    project: Path,
    *,
    workdir: Path | None = None,
    storage: Storage | None = None,
    recorder: Recorder | None = None,
    run_id: str = "run-test",
    interval: int = 5,
    keep: int = 3,
    max_duration_s: float = 120.0,
    max_restarts: int = 2,
    allow_fresh_start: bool = False,
    **hyperparameters: Any,
) -> TrainRequest:
    script = write_trainer(project)
    rec = recorder or Recorder()
    return TrainRequest(
        run_id=run_id,
        command=[sys.executable, script.name],
        cwd=project,
        workdir=workdir or project / ".gpuline" / "runs" / run_id,
        storage=storage or open_storage("file://store", project),
        storage_prefix=f"runs/{run_id}",
        hyperparameters={"steps": 20, **hyperparameters},
        dataset_path=None,
        checkpoint_interval=interval,
        keep=keep,
        max_duration_s=max_duration_s,
        max_restarts=max_restarts,
        allow_fresh_start=allow_fresh_start,
        on_event=rec.event,
        log=rec.log,
        imds_endpoint="off",
    )


def when_metrics_reach(path: Path, step: int, action: Callable[[], None], timeout_s: float = 60) -> threading.Thread:
    """In a thread: wait until the metrics file shows ``step``, then run ``action``."""

    def watch() -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if path.is_file():
                for line in path.read_text().splitlines():
                    try:
                        if json.loads(line).get("step", -1) >= step:
                            action()
                            return
                    except ValueError:
                        continue
            time.sleep(0.01)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def wait_for_metrics(path: Path, step: int, timeout_s: float = 60) -> None:
    done = threading.Event()
    when_metrics_reach(path, step, done.set, timeout_s).join(timeout_s)
    if not done.is_set():
        raise TimeoutError(f"{path} never reached step {step}")


# A supervisor in a child process, so a test can SIGKILL it. argv: JSON of make_request's arguments.
DRIVER = r"""
import json, sys
from dataclasses import asdict
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from fixtures_training import make_request
from gpuline.training import supervise

args = json.loads(sys.argv[1])
project = Path(args.pop("project"))
workdir = Path(args.pop("workdir"))
slow = args.pop("slow_upload_s", None)
if slow:
    import time
    from gpuline.storage import LocalStorage

    class SlowStorage(LocalStorage):  # a slow network: each file takes a while to land
        def put_file(self, local, key, *, sha256=None, cancel=None):
            super().put_file(local, key, sha256=sha256, cancel=cancel)
            time.sleep(slow)

    args["storage"] = SlowStorage(project / "store")
req = make_request(project, workdir=workdir, **args)
req.log = lambda line: print(line, flush=True)
outcome = supervise(req)
print("OUTCOME " + json.dumps({"stop_reason": outcome.stop_reason, "final_step": outcome.final_step,
                               "resumed_from_step": outcome.resumed_from_step, "exit_code": outcome.exit_code,
                               "preemptions": outcome.preemptions}), flush=True)
"""


def driver_argv(project: Path, workdir: Path, **kwargs: Any) -> list[str]:
    args = {"project": str(project), "workdir": str(workdir), **kwargs}
    return [sys.executable, "-c", DRIVER, json.dumps(args), os.path.dirname(__file__)]
