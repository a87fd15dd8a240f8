"""The train supervisor: runs the entrypoint, keeps its checkpoints durable, survives preemption.

One path for every way a run can be told to stop (SIGTERM to the supervisor, an EC2 spot notice,
max duration): SIGTERM to the trainer's process group, which saves a final checkpoint and exits;
SIGKILL after the grace budget; then the final checkpoint is uploaded before ``supervise`` returns.
A trainer that crashes (or is killed from outside) is restarted from the newest checkpoint, up to
``max_restarts`` times. Before the first launch the newest *valid* checkpoint is found, locally or in
the store, skipping corrupt ones and saying so, so a re-run after anything resumes instead of
starting over.

The supervisor never imports torch: it launches processes (``torch.distributed.run`` for more than one
process) and speaks to them only through the environment contract (``GPULINE_*``, see
:class:`gpuline.contract.TrainerContract`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from gpuline import contract
from gpuline.errors import GpulineError, InfraError, InputError
from gpuline.training import checkpoints, imds
from gpuline.training.checkpoints import CheckpointInfo
from gpuline.training.launch import child_env, launch_argv
from gpuline.training.metrics import MetricsTail, loss_curve, read_eval, read_metrics
from gpuline.training.phase_clock import PhaseClock
from gpuline.training.process import (
    LineReader,
    exit_code,
    running_from_pidfile,
    signal_group,
    start_child,
    stop_group,
    write_pidfile,
)
from gpuline.training.request import RunPaths, SmokeResult, StopReason, TrainOutcome, TrainRequest
from gpuline.training.resume import ResumePoint, find_resume_point
from gpuline.training.smoke import check_entrypoint_imports, smoke_test
from gpuline.training.uploader import CheckpointUploader, durable_remote

# Also importable from here, where callers found them when the supervisor was one module.
__all__ = [
    "SmokeResult",
    "Supervisor",
    "TrainOutcome",
    "TrainRequest",
    "check_entrypoint_imports",
    "launch_argv",
    "smoke_test",
    "supervise",
]

POLL_S = 0.2


class _StopRequest:
    def __init__(self) -> None:
        self.event = threading.Event()
        self.reason: StopReason | None = None
        self.source = ""
        self.detail: dict[str, Any] = {}

    def request(self, reason: StopReason, source: str, **detail: Any) -> bool:
        """First request wins; True if this call was it."""
        if self.event.is_set():
            return False
        self.reason, self.source, self.detail = reason, source, detail
        self.event.set()
        return True


@contextlib.contextmanager
def _stop_on_signals(stop: _StopRequest) -> Iterator[None]:
    """SIGTERM/SIGINT to the supervisor become a stop request (only the main thread can catch them)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.request("preempted", signal.Signals(signum).name.lower())

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def _exclusive(paths: RunPaths, run_id: str) -> Iterator[None]:
    """One supervisor per run directory; the lock dies with its holder, even on SIGKILL."""
    paths.root.mkdir(parents=True, exist_ok=True)
    with paths.lock.open("a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InfraError(
                f"another gpuline supervisor is already training run {run_id} in {paths.root}",
                hint="wait for it to finish, or stop it (SIGTERM) and run again to resume",
            ) from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class Supervisor:
    def __init__(self, req: TrainRequest) -> None:
        self.req = req
        self.paths = RunPaths(req.workdir)
        self.stop = _StopRequest()
        self.started = time.monotonic()
        # Where the seconds go (setup, train, checkpoint), reported per launch as ``phases`` events.
        self.clock = PhaseClock(self.paths.metrics, req.checkpoint_interval)
        self.preemptions = 0
        self.restarts = 0
        self.uploaded: dict[int, CheckpointInfo] = {}
        # The run's first step, as an earlier supervisor of it saw it (None: none saw one).
        self.first_step_at: datetime | None = None

    # ------------------------------------------------------------ lifecycle

    def run(self) -> TrainOutcome:
        req = self.req
        with _exclusive(self.paths, req.run_id), _stop_on_signals(self.stop):
            self._reclaim_orphan()
            for path in (self.paths.checkpoints, self.paths.output):
                path.mkdir(parents=True, exist_ok=True)
            checkpoints.clean_temporaries(self.paths.checkpoints)
            self.first_step_at = _noted_first_step(self.paths.first_step)
            resume = find_resume_point(req, self.paths.checkpoints)
            if resume.step is None:
                req.log(f"starting run {req.run_id} fresh (no checkpoint to resume from)")
                req.on_event("fresh_start", {})
            else:
                req.log(f"resuming run {req.run_id} from checkpoint step {resume.step} ({resume.uri})")
                req.on_event("resume", {"step": resume.step, "uri": resume.uri})
            self.uploaded.update(durable_remote(req))
            uploader = CheckpointUploader(req, self.paths.checkpoints, self.uploaded, self.stop.event)
            watcher = self._start_spot_watcher()
            uploader.start()
            tail = MetricsTail(self.paths.metrics)
            try:
                code, reason = self._train(resume, uploader, tail)
            finally:
                if watcher is not None:
                    watcher.stop()
                uploader.stop()
            flush_from = self.clock.now()
            uploader.flush()
            self._phases([self.clock.interval_event("checkpoint", flush_from, self.clock.now())])
            return self._outcome(code, reason, resume, tail)

    def _train(self, resume: ResumePoint, uploader: CheckpointUploader, tail: MetricsTail) -> tuple[int, StopReason]:
        req = self.req
        resume_path = resume.path
        while True:
            self.paths.eval.unlink(missing_ok=True)
            self.paths.stopped.unlink(missing_ok=True)
            uploader.trainer_exited_cleanly = False
            code = self._run_once(resume_path, tail)
            # A script that exited by itself (done, or saved-and-stopped on SIGTERM) has finished
            # writing its newest checkpoint; one that crashed or was killed may have left it torn.
            uploader.trainer_exited_cleanly = code in (0, 128 + signal.SIGTERM)
            finished = code == 0 and (self.paths.eval.exists() or not self.stop.event.is_set())
            if finished:
                req.log(f"trainer finished (exit 0) after {time.monotonic() - self.started:.1f}s")
                return code, "completed"
            if self.stop.event.is_set():
                assert self.stop.reason is not None
                return code, self.stop.reason
            if self._stopped_from_outside(code) and req.nnodes > 1:
                # Relaunching one node alone would only wait for a rendezvous that never fills.
                req.log("trainer stopped together with its peer nodes; not restarting a multi-node run alone")
                return code, "preempted"
            if self.restarts >= req.max_restarts:
                req.log(f"trainer exited with code {code}; no restarts left (max_restarts={req.max_restarts})")
                return code, "failed"
            resume_path = self._restart_point(code, uploader, resume.path)

    def _stopped_from_outside(self, code: int) -> bool:
        """Stopped on request from outside this supervisor: SIGTERM straight to the trainer, or (on a
        multi-node run) a peer node that was told to stop. Counted as a preemption."""
        # torchrun turns a rank's 143 into 1, so the trainer's GPULINE_STOPPED_PATH note is the
        # reliable sign; 143 covers scripts that do not write it.
        if not (self.paths.stopped.exists() or code == 128 + signal.SIGTERM):
            return False
        self.preemptions += 1
        source = "peer" if self.req.nnodes > 1 else "trainer_sigterm"
        self.req.on_event("preemption", {"source": source, "exit_code": code})
        return True

    def _restart_point(self, code: int, uploader: CheckpointUploader, fallback: Path | None) -> Path | None:
        """Count a restart and choose the checkpoint it starts from: the newest valid one, else ``fallback``."""
        req = self.req
        self.restarts += 1
        # Upload what the dead trainer committed before choosing where to restart from.
        uploader.sync()
        newest, skipped = checkpoints.newest_valid(self.paths.checkpoints)
        for s in skipped:
            req.log(f"skipping checkpoint step {s.step} ({s.path.as_uri()}): {s.reason}")
        resume_path = newest if newest is not None else fallback
        step = checkpoints.parse_step(resume_path.name) if resume_path is not None else None
        req.log(
            f"trainer exited with code {code}; restart {self.restarts}/{req.max_restarts} "
            + (f"from checkpoint step {step}" if step is not None else "from step 0")
        )
        req.on_event("restart", {"attempt": self.restarts, "exit_code": code, "from_step": step})
        return resume_path

    def _launch(self, resume_path: Path | None) -> subprocess.Popen[bytes]:
        req = self.req
        trainer = self.paths.contract(
            run_id=req.run_id,
            hyperparameters=req.hyperparameters,
            dataset_path=req.dataset_path,
            checkpoint_interval=req.checkpoint_interval,
            resume_from=resume_path,
            max_duration_s=req.max_duration_s - (time.monotonic() - self.started),
        )
        argv = launch_argv(
            req.command,
            run_id=req.run_id,
            nnodes=req.nnodes,
            nprocs_per_node=req.nprocs_per_node,
            rdzv=req.rdzv_endpoint or os.environ.get(contract.RDZV_ENDPOINT),
        )
        proc = start_child(argv, req.cwd, child_env(trainer.to_env(), req.extra_env))
        write_pidfile(self.paths.trainer_pid, proc.pid)
        return proc

    def _run_once(self, resume_path: Path | None, tail: MetricsTail) -> int:
        req = self.req
        self.clock.launched()
        proc = self._launch(resume_path)
        assert proc.stdout is not None
        reader = LineReader(proc.stdout, req.log)
        reader.start()
        signalled_at: float | None = None
        killed = False
        while proc.poll() is None:
            now = time.monotonic()
            if now - self.started >= req.max_duration_s and self.stop.request("max_duration", "max_duration"):
                req.log(f"max duration of {req.max_duration_s:.0f}s reached; asking the trainer to save and stop")
            if self.stop.event.is_set() and signalled_at is None:
                self._announce_stop()
                signal_group(proc.pid, signal.SIGTERM)
                signalled_at = now
            if signalled_at is not None and not killed and now - signalled_at > req.grace_s:
                req.log(f"trainer did not exit {req.grace_s:.0f}s after SIGTERM; killing it")
                signal_group(proc.pid, signal.SIGKILL)
                killed = True
            self._poll(tail)
            if signalled_at is None:
                self.stop.event.wait(POLL_S)  # wakes at once when a stop is requested
            else:
                time.sleep(POLL_S / 2)
        # Ranks that outlived their launcher must not keep writing checkpoints.
        signal_group(proc.pid, signal.SIGKILL)
        reader.join()
        self._poll(tail)
        self.paths.trainer_pid.unlink(missing_ok=True)
        code = exit_code(proc.returncode)
        self._phases(self.clock.ended(clean=code in (0, 128 + signal.SIGTERM)))
        return code

    def _poll(self, tail: MetricsTail) -> None:
        """Follow the metrics, noting the run's first step the moment it is seen: a supervisor
        started after this one was killed starts reading after what is already there, and without
        the note the first train's work would count as time the machine sat idle."""
        before = tail.offset
        tail.poll()
        if tail.offset > before:
            self._phases(self.clock.saw_steps())
        if self.first_step_at is None and tail.first_step_at is not None:
            self.first_step_at = tail.first_step_at
            _note_first_step(self.paths.first_step, tail.first_step_at)

    def _phases(self, intervals: list[dict[str, Any]]) -> None:
        # Bookkeeping: a ledger that cannot take it (a full disk) must not stop the training it is
        # about; the seconds it would have placed count as idle.
        if intervals:
            with contextlib.suppress(GpulineError, OSError):
                self.req.on_event("phases", {"intervals": intervals})

    def _announce_stop(self) -> None:
        reason, source = self.stop.reason, self.stop.source
        if reason == "preempted":
            self.preemptions += 1
            self.req.log(f"stop requested ({source}); asking the trainer to save a final checkpoint")
            self.req.on_event("preemption", {"source": source, **self.stop.detail})
        else:
            self.req.on_event("max_duration", {"max_duration_s": self.req.max_duration_s})

    def _start_spot_watcher(self) -> imds.SpotWatcher | None:
        endpoint = self.req.imds_endpoint
        if endpoint is None:
            endpoint = imds.endpoint_from_env()
        elif endpoint.lower() == "off":
            endpoint = None
        if endpoint is None:
            return None

        def on_notice(notice: imds.SpotNotice) -> None:
            self.req.log(f"spot interruption notice: {notice.action} at {notice.time}")
            self.stop.request("preempted", "spot", action=notice.action, time=notice.time)

        watcher = imds.SpotWatcher(
            imds.ImdsClient(endpoint), on_notice, interval_s=self.req.imds_poll_s, log=self.req.log
        )
        watcher.start()
        return watcher

    # ------------------------------------------------------------ orphans and bookkeeping

    def _reclaim_orphan(self) -> None:
        """A trainer left behind by a supervisor that was SIGKILLed gets to finish its final save first."""
        pid = running_from_pidfile(self.paths.trainer_pid)
        if pid is not None:
            self.req.log(f"a trainer from an earlier supervisor (pid {pid}) is still running; stopping it")
            stop_group(pid, self.req.grace_s)
        self.paths.trainer_pid.unlink(missing_ok=True)

    def _outcome(self, code: int, reason: StopReason, resume: ResumePoint, tail: MetricsTail) -> TrainOutcome:
        curve = loss_curve(read_metrics(self.paths.metrics))
        durable = sorted(self.uploaded.values(), key=lambda c: c.step)
        steps = [s for s, _ in curve] + [c.step for c in durable]
        outcome = TrainOutcome(
            exit_code=code,
            resumed_from_step=resume.step,
            final_step=max(steps) if steps else None,
            checkpoints=durable,
            eval_metrics=read_eval(self.paths.eval),
            loss_curve=curve,
            preemptions=self.preemptions,
            restarts=self.restarts,
            first_step_at=self.first_step_at or tail.first_step_at,
            last_step_at=tail.last_step_at or _last_write(self.paths.metrics, self.first_step_at),
            output_dir=self.paths.output,
            stop_reason=reason,
        )
        self.req.on_event("finished", {"stop_reason": reason, "exit_code": code, "final_step": outcome.final_step})
        return outcome


def _note_first_step(path: Path, at: datetime) -> None:
    # Bookkeeping only: a disk too full for the note must not stop the training it is about.
    with contextlib.suppress(OSError):
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps({"at": at.isoformat()}))
        os.replace(tmp, path)


def _noted_first_step(path: Path) -> datetime | None:
    """The note of an earlier supervisor of this run; a missing or unreadable one is no note."""
    try:
        at = datetime.fromisoformat(json.loads(path.read_text())["at"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return at if at.tzinfo is not None else None


def _last_write(metrics: Path, first: datetime | None) -> datetime | None:
    """When the metrics were last written, for a run whose steps were all seen by earlier supervisors
    (this one resumed at the end and trained no step): the end of the work they saw."""
    if first is None:
        return None
    try:
        return datetime.fromtimestamp(metrics.stat().st_mtime, UTC)
    except OSError:
        return None


def supervise(req: TrainRequest) -> TrainOutcome:
    """Run the entrypoint to completion (or to a stop), resuming and restarting as needed."""
    if req.keep < 1:
        raise InputError("checkpoint.keep must be at least 1", hint="keep the newest 1 or more checkpoints")
    return Supervisor(req).run()
