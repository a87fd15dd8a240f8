"""The train supervisor: runs the entrypoint, keeps its checkpoints durable, survives preemption.

One path for every way a run can be told to stop (SIGTERM to the supervisor, an EC2 spot notice,
max duration): SIGTERM to the trainer's process group, which saves a final checkpoint and exits;
SIGKILL after the grace budget; then the final checkpoint is uploaded before ``supervise`` returns.
A trainer that crashes (or is killed from outside) is restarted from the newest checkpoint, up to
``max_restarts`` times. Before the first launch the newest *valid* checkpoint is found, locally or in
the store, skipping corrupt ones and saying so, so a re-run after anything resumes instead of
starting over.

The supervisor never imports torch: it launches processes (``torch.distributed.run`` for more than one
process) and speaks to them only through the environment contract (``GPULINE_*``, see ``contract_env``).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import itertools
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import IO, Any, Literal

from gpuline.errors import InfraError, InputError, Location
from gpuline.storage import (
    CorruptCheckpoint,
    Storage,
    UploadCancelled,
    download_checkpoint,
    prune_remote,
    remote_checkpoints,
    upload_checkpoint,
)
from gpuline.training import checkpoints, imds
from gpuline.training.checkpoints import CheckpointInfo

StopReason = Literal["completed", "max_duration", "preempted", "failed"]
GRACE_S = 25.0  # fits GCP's and Kubernetes' 30 s between SIGTERM and SIGKILL
POLL_S = 0.2
UPLOAD_POLL_S = 0.25
TAIL_LINES = 40
SMOKE_DROP = 0.9  # the one-batch loss must end below 90% of where it started


def _ignore_event(kind: str, data: dict[str, Any]) -> None:
    return None


@dataclass
class TrainRequest:
    run_id: str
    command: list[str]
    cwd: Path
    workdir: Path
    storage: Storage
    storage_prefix: str
    hyperparameters: dict[str, Any]
    dataset_path: Path | None
    checkpoint_interval: int
    keep: int
    max_duration_s: float
    max_restarts: int
    allow_fresh_start: bool
    nprocs_per_node: int = 1
    nnodes: int = 1
    extra_env: dict[str, str] = field(default_factory=dict)
    on_event: Callable[[str, dict[str, Any]], None] = _ignore_event
    log: Callable[[str], None] = print
    grace_s: float = GRACE_S
    # None: GPULINE_IMDS_ENDPOINT, or EC2's own endpoint when running on EC2; "off" disables.
    imds_endpoint: str | None = None
    imds_poll_s: float = imds.POLL_S
    # host:port that every node's torchrun meets at (c10d); env GPULINE_RDZV_ENDPOINT when None.
    rdzv_endpoint: str | None = None

    @property
    def checkpoint_prefix(self) -> str:
        """Checkpoints live beside the run's other artifacts: ``<storage_prefix>/checkpoints/step-N``."""
        return f"{self.storage_prefix.strip('/')}/checkpoints"


@dataclass
class TrainOutcome:
    exit_code: int
    resumed_from_step: int | None
    final_step: int | None
    checkpoints: list[CheckpointInfo]
    eval_metrics: dict[str, Any]
    loss_curve: list[tuple[int, float]]
    preemptions: int
    restarts: int
    first_step_at: datetime | None
    last_step_at: datetime | None
    output_dir: Path
    stop_reason: StopReason


@dataclass
class SmokeResult:
    losses: list[float]
    fell: bool
    step_seconds: float | None
    exit_code: int
    output_tail: list[str]


@dataclass(frozen=True)
class RunPaths:
    """Where one run keeps its local state (all under the request's workdir)."""

    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def eval(self) -> Path:
        return self.root / "eval.json"

    @property
    def output(self) -> Path:
        return self.root / "output"

    @property
    def lock(self) -> Path:
        return self.root / "supervisor.lock"

    @property
    def trainer_pid(self) -> Path:
        return self.root / "trainer.pid"

    @property
    def stopped(self) -> Path:
        return self.root / "stopped.json"


# ---------------------------------------------------------------- the environment contract


def contract_env(
    *,
    run_id: str,
    paths: RunPaths,
    hyperparameters: Mapping[str, Any],
    dataset_path: Path | None,
    checkpoint_interval: int,
    resume_from: Path | None,
    max_duration_s: float | None,
    smoke: bool = False,
) -> dict[str, str]:
    env = {
        "GPULINE_RUN_ID": run_id,
        "GPULINE_CHECKPOINT_DIR": str(paths.checkpoints),
        "GPULINE_CHECKPOINT_INTERVAL": str(checkpoint_interval),
        "GPULINE_METRICS_PATH": str(paths.metrics),
        "GPULINE_EVAL_PATH": str(paths.eval),
        "GPULINE_OUTPUT_DIR": str(paths.output),
        "GPULINE_HPARAMS": json.dumps(dict(hyperparameters), sort_keys=True),
        "GPULINE_SMOKE": "1" if smoke else "0",
        # Optional for scripts: note here that they stopped early because they were asked to.
        "GPULINE_STOPPED_PATH": str(paths.stopped),
        # Lines reach the log as they are printed, not when a buffer fills.
        "PYTHONUNBUFFERED": "1",
    }
    if dataset_path is not None:
        env["GPULINE_DATASET_PATH"] = str(dataset_path)
    if resume_from is not None:
        env["GPULINE_RESUME_FROM"] = str(resume_from)
    if max_duration_s is not None:
        env["GPULINE_MAX_DURATION_S"] = f"{max(max_duration_s, 0.0):.0f}"
    return env


def _child_env(contract: Mapping[str, str], extra: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"GPULINE_RESUME_FROM", "GPULINE_DATASET_PATH"}}
    env.update(contract)
    env.update(extra)
    return env


def launch_argv(command: list[str], *, run_id: str, nnodes: int, nprocs_per_node: int, rdzv: str | None) -> list[str]:
    """The command itself, or torchrun around it when the run has more than one process."""
    if nnodes * nprocs_per_node <= 1:
        return list(command)
    python_like = Path(command[0]).name.startswith("python")
    interpreter = command[0] if python_like else sys.executable
    argv = [interpreter, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc-per-node={nprocs_per_node}"]
    # Restarts are the supervisor's job: it resumes from the newest checkpoint, torchrun would not.
    argv.append("--max-restarts=0")
    if nnodes > 1:
        if not rdzv:
            raise InputError(
                f"run {run_id} spans {nnodes} nodes but no rendezvous endpoint is set",
                hint="set GPULINE_RDZV_ENDPOINT=HOST:PORT (reachable from every node) on each node",
            )
        argv += ["--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv}", f"--rdzv-id={run_id}"]
    else:
        argv.append("--standalone")
    return argv + (command[1:] if python_like else ["--no-python", *command])


# ---------------------------------------------------------------- child processes


def _parent_death_signal() -> Callable[[], None] | None:
    """A preexec hook asking Linux to SIGTERM the trainer if the supervisor dies (even by SIGKILL)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def hook() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)

    return hook


def _start(argv: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    if not cwd.is_dir():
        raise InputError(f"entrypoint directory {cwd} does not exist", hint="fix entrypoint.workdir in gpuline.yml")
    try:
        return subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: signals reach torchrun and every rank
            preexec_fn=_parent_death_signal(),  # noqa: PLW1509 - only calls a pre-resolved prctl
        )
    except (FileNotFoundError, PermissionError) as exc:
        raise InputError(
            f"entrypoint command cannot be run: {argv[0]} ({exc.strerror})",
            hint="fix entrypoint.command in gpuline.yml",
        ) from exc


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _exit_code(returncode: int) -> int:
    """Shell convention: killed by signal N reads as 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


class _LineReader(threading.Thread):
    """Streams the child's output, line by line, to the log; keeps a tail for error messages."""

    def __init__(self, stream: IO[bytes], log: Callable[[str], None]) -> None:
        super().__init__(name="gpuline-trainer-output", daemon=True)
        self.stream = stream
        self.log = log
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)

    def run(self) -> None:
        for raw in iter(self.stream.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            self.tail.append(line)
            self.log(line)
        self.stream.close()


def _proc_start_ticks(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22 (start time) counted after the ")" that ends the command name, which may hold spaces.
    return stat.rsplit(")", 1)[1].split()[19]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------- metrics


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The metrics JSONL, skipping a torn last line (the trainer may be writing it right now)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def loss_curve(rows: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """(step, loss) pairs; a step repeated after a resume keeps its latest value."""
    by_step: dict[int, float] = {}
    for row in rows:
        step, loss = row.get("step"), row.get("loss")
        if isinstance(step, int) and isinstance(loss, int | float):
            by_step[step] = float(loss)
    return sorted(by_step.items())


class _MetricsTail:
    """Follows the metrics file to know when the first and last training steps happened."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.is_file() else 0
        self.first_step_at: datetime | None = None
        self.last_step_at: datetime | None = None

    def poll(self) -> None:
        try:
            size = self.path.stat().st_size
        except OSError:
            return
        if size > self.offset:
            with self.path.open("rb") as fh:
                fh.seek(self.offset)
                chunk = fh.read(size - self.offset)
            complete = chunk.rfind(b"\n") + 1
            if complete:
                self.offset += complete
                now = datetime.now(UTC)
                self.first_step_at = self.first_step_at or now
                self.last_step_at = now


# ---------------------------------------------------------------- background upload


class _Uploader(threading.Thread):
    """Uploads newly committed local checkpoints (newest first, one at a time) and prunes.

    Only the newest ``keep`` local checkpoints are candidates: an older one would be pruned from the
    store as soon as it arrived, so a trainer that commits faster than the network drains simply has
    its in-between checkpoints skipped.
    """

    def __init__(
        self,
        req: TrainRequest,
        local_dir: Path,
        uploaded: dict[int, CheckpointInfo],
        stopping: threading.Event | None = None,
    ) -> None:
        super().__init__(name="gpuline-checkpoint-upload", daemon=True)
        self.req = req
        self.local_dir = local_dir
        self.uploaded = uploaded
        self.stopping = stopping or threading.Event()
        self.trainer_exited_cleanly = False
        self._halt = threading.Event()
        self._lock = threading.Lock()  # one upload in flight, whoever starts it
        self.failures = 0

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                while not self._halt.is_set() and self.sync() is not None:
                    pass
            except UploadCancelled:
                continue  # a newer checkpoint superseded it: go straight to that one
            except Exception as exc:  # keep training; the final flush raises if it still fails
                self.failures += 1
                self.req.log(f"checkpoint upload failed (will retry): {exc}")
                self.req.on_event("checkpoint_upload_failed", {"error": str(exc)})
                self._halt.wait(min(2.0 * self.failures, 10.0))
            # During a stop the final checkpoint is on its way: look for it often.
            self._halt.wait(UPLOAD_POLL_S / 5 if self.stopping.is_set() else UPLOAD_POLL_S)

    def stop(self) -> None:
        self._halt.set()
        if self.is_alive():
            self.join()

    def _adopt_manifestless(self) -> None:
        """Commit manifests for a framework-free script's ``step-N`` dirs once it has moved past them."""
        found = checkpoints.step_dirs(self.local_dir)
        newest = max((s for s, _ in found), default=None)
        for step, path in found:
            if (path / checkpoints.MANIFEST).exists():
                continue
            if step != newest or self.trainer_exited_cleanly:
                checkpoints.adopt(path, run_id=self.req.run_id)
                self.req.log(f"committed a manifest for checkpoint step {step} written without one")

    def _superseded(self, step: int) -> Callable[[], bool]:
        """Once a stop is under way, an older upload gives way to the final checkpoint.

        Otherwise a long upload of the last interval checkpoint would hold back the one that must be
        durable before the machine goes away.
        """

        def check() -> bool:
            if not self.stopping.is_set():
                return False
            newest = checkpoints.complete(self.local_dir)
            if newest and newest[-1][0] > step and newest[-1][0] not in self.uploaded:
                self.req.log(f"upload of checkpoint step {step} cancelled: step {newest[-1][0]} supersedes it")
                return True
            return False

        return check

    def pending(self) -> list[tuple[int, Path]]:
        newest = checkpoints.complete(self.local_dir)[-self.req.keep :]
        return [(s, p) for s, p in newest if s not in self.uploaded]

    def sync(self) -> CheckpointInfo | None:
        """Upload the newest checkpoint not yet in the store; None when there is nothing to do."""
        with self._lock:
            self._adopt_manifestless()
            fresh = self.pending()
            if not fresh:
                return None
            step, path = fresh[-1]
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            self.req.log(f"uploading checkpoint step {step} ({size / 1024**2:.1f} MiB)")
            # Steps in the store were all listed at start, so a step not in ``uploaded`` has no manifest there.
            info = upload_checkpoint(
                self.req.storage, path, self.req.checkpoint_prefix, replace=False, cancel=self._superseded(step)
            )
            self.uploaded[step] = info
            self.req.log(f"checkpoint step {step} is durable at {info.uri}")
            self.req.on_event("checkpoint", {"uri": info.uri, "step": step, "sha256": info.sha256})
            for gone in prune_remote(self.req.storage, self.req.checkpoint_prefix, self.req.keep):
                self.uploaded.pop(gone, None)
            checkpoints.prune(self.local_dir, self.req.keep)
            self.failures = 0
            return info


# ---------------------------------------------------------------- choosing where to resume


@dataclass
class ResumePoint:
    path: Path | None
    step: int | None
    uri: str | None


def find_resume_point(req: TrainRequest, local_dir: Path) -> ResumePoint:
    """The newest checkpoint that verifies, local or remote; corrupt ones are skipped and said so."""
    local = dict(checkpoints.step_dirs(local_dir))
    remote = {c.step: c for c in remote_checkpoints(req.storage, req.checkpoint_prefix)}
    claimed_complete: set[int] = set()  # steps whose manifest said "complete" somewhere
    reasons: list[str] = []

    def skip(step: int, uri: str, reason: str) -> None:
        req.log(f"skipping checkpoint step {step} ({uri}): {reason}")
        req.on_event("checkpoint_skipped", {"step": step, "uri": uri, "reason": reason})
        reasons.append(f"step {step}: {reason}")

    for step in sorted(set(local) | set(remote), reverse=True):
        remote_uri = req.storage.uri_for(remote[step].key) if step in remote else None
        if step in local:
            result = checkpoints.verify(local[step])
            if result.ok:
                durable = step in remote and remote[step].complete
                return ResumePoint(local[step], step, remote_uri if durable else local[step].as_uri())
            if (local[step] / checkpoints.MANIFEST).exists():
                claimed_complete.add(step)
            skip(step, local[step].as_uri(), result.reason)
        if step in remote:
            assert remote_uri is not None
            if not remote[step].complete:
                skip(step, remote_uri, "incomplete: no manifest.json")
                continue
            claimed_complete.add(step)
            try:
                path = download_checkpoint(req.storage, remote[step].key, local_dir)
            except CorruptCheckpoint as exc:
                skip(step, remote_uri, str(exc).removeprefix(f"{remote_uri}: "))
                continue
            return ResumePoint(path, step, remote_uri)
    if claimed_complete:
        where = req.storage.uri_for(req.checkpoint_prefix)
        if not req.allow_fresh_start:
            raise InfraError(
                f"all {len(claimed_complete)} checkpoints of run {req.run_id} are corrupt ({'; '.join(reasons)})",
                hint=f"restore a good checkpoint under {where}, or set checkpoint.allow_fresh_start: true "
                "to train from step 0",
            )
        req.log(f"all checkpoints of run {req.run_id} are corrupt; starting fresh (checkpoint.allow_fresh_start)")
    return ResumePoint(None, None, None)


# ---------------------------------------------------------------- supervise


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
        self.preemptions = 0
        self.restarts = 0
        self.uploaded: dict[int, CheckpointInfo] = {}

    # ------------------------------------------------------------ lifecycle

    def run(self) -> TrainOutcome:
        req = self.req
        with _exclusive(self.paths, req.run_id), _stop_on_signals(self.stop):
            self._reclaim_orphan()
            for path in (self.paths.checkpoints, self.paths.output):
                path.mkdir(parents=True, exist_ok=True)
            checkpoints.clean_temporaries(self.paths.checkpoints)
            resume = find_resume_point(req, self.paths.checkpoints)
            if resume.step is None:
                req.log(f"starting run {req.run_id} fresh (no checkpoint to resume from)")
                req.on_event("fresh_start", {})
            else:
                req.log(f"resuming run {req.run_id} from checkpoint step {resume.step} ({resume.uri})")
                req.on_event("resume", {"step": resume.step, "uri": resume.uri})
            self._remember_remote()
            uploader = _Uploader(req, self.paths.checkpoints, self.uploaded, self.stop.event)
            watcher = self._start_spot_watcher()
            uploader.start()
            tail = _MetricsTail(self.paths.metrics)
            try:
                exit_code, reason = self._train(resume, uploader, tail)
            finally:
                if watcher is not None:
                    watcher.stop()
                uploader.stop()
            self._final_flush(uploader)
            return self._outcome(exit_code, reason, resume, tail)

    def _train(self, resume: ResumePoint, uploader: _Uploader, tail: _MetricsTail) -> tuple[int, StopReason]:
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
            # Stopped on request from outside this supervisor: SIGTERM straight to the trainer, or (on
            # a multi-node run) a peer node that was told to stop. torchrun turns a rank's 143 into 1,
            # so the trainer's GPULINE_STOPPED_PATH note is the reliable sign; 143 covers scripts
            # that do not write it.
            if self.paths.stopped.exists() or code == 128 + signal.SIGTERM:
                self.preemptions += 1
                source = "peer" if req.nnodes > 1 else "trainer_sigterm"
                req.on_event("preemption", {"source": source, "exit_code": code})
                if req.nnodes > 1:
                    # Relaunching one node alone would only wait for a rendezvous that never fills.
                    req.log("trainer stopped together with its peer nodes; not restarting a multi-node run alone")
                    return code, "preempted"
            if self.restarts >= req.max_restarts:
                req.log(f"trainer exited with code {code}; no restarts left (max_restarts={req.max_restarts})")
                return code, "failed"
            self.restarts += 1
            # Upload what the dead trainer committed before choosing where to restart from.
            uploader.sync()
            newest, skipped = checkpoints.newest_valid(self.paths.checkpoints)
            for s in skipped:
                req.log(f"skipping checkpoint step {s.step} ({s.path.as_uri()}): {s.reason}")
            resume_path = newest if newest is not None else resume.path
            step = checkpoints.parse_step(resume_path.name) if resume_path is not None else None
            req.log(
                f"trainer exited with code {code}; restart {self.restarts}/{req.max_restarts} "
                + (f"from checkpoint step {step}" if step is not None else "from step 0")
            )
            req.on_event("restart", {"attempt": self.restarts, "exit_code": code, "from_step": step})

    def _run_once(self, resume_path: Path | None, tail: _MetricsTail) -> int:
        req = self.req
        remaining = req.max_duration_s - (time.monotonic() - self.started)
        env = contract_env(
            run_id=req.run_id,
            paths=self.paths,
            hyperparameters=req.hyperparameters,
            dataset_path=req.dataset_path,
            checkpoint_interval=req.checkpoint_interval,
            resume_from=resume_path,
            max_duration_s=remaining,
        )
        argv = launch_argv(
            req.command,
            run_id=req.run_id,
            nnodes=req.nnodes,
            nprocs_per_node=req.nprocs_per_node,
            rdzv=req.rdzv_endpoint or os.environ.get("GPULINE_RDZV_ENDPOINT"),
        )
        proc = _start(argv, req.cwd, _child_env(env, req.extra_env))
        self._write_pidfile(proc)
        assert proc.stdout is not None
        reader = _LineReader(proc.stdout, req.log)
        reader.start()
        signalled_at: float | None = None
        killed = False
        while proc.poll() is None:
            now = time.monotonic()
            if now - self.started >= req.max_duration_s and self.stop.request("max_duration", "max_duration"):
                req.log(f"max duration of {req.max_duration_s:.0f}s reached; asking the trainer to save and stop")
            if self.stop.event.is_set() and signalled_at is None:
                self._announce_stop()
                _signal_group(proc, signal.SIGTERM)
                signalled_at = now
            if signalled_at is not None and not killed and now - signalled_at > req.grace_s:
                req.log(f"trainer did not exit {req.grace_s:.0f}s after SIGTERM; killing it")
                _signal_group(proc, signal.SIGKILL)
                killed = True
            tail.poll()
            if signalled_at is None:
                self.stop.event.wait(POLL_S)  # wakes at once when a stop is requested
            else:
                time.sleep(POLL_S / 2)
        # Ranks that outlived their launcher must not keep writing checkpoints.
        _signal_group(proc, signal.SIGKILL)
        reader.join()
        tail.poll()
        self.paths.trainer_pid.unlink(missing_ok=True)
        return _exit_code(proc.returncode)

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

    def _write_pidfile(self, proc: subprocess.Popen[bytes]) -> None:
        record = {"pid": proc.pid, "start": _proc_start_ticks(proc.pid)}
        self.paths.trainer_pid.write_text(json.dumps(record))

    def _reclaim_orphan(self) -> None:
        """A trainer left behind by a supervisor that was SIGKILLed gets to finish its final save first."""
        try:
            record = json.loads(self.paths.trainer_pid.read_text())
        except (OSError, ValueError):
            return
        pid = int(record.get("pid", 0))
        if pid <= 0 or _proc_start_ticks(pid) != record.get("start") or not _group_alive(pid):
            self.paths.trainer_pid.unlink(missing_ok=True)
            return
        self.req.log(f"a trainer from an earlier supervisor (pid {pid}) is still running; stopping it")
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.req.grace_s
        while _group_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        while _group_alive(pid) and time.monotonic() < deadline + 5:
            time.sleep(0.05)
        self.paths.trainer_pid.unlink(missing_ok=True)

    def _remember_remote(self) -> None:
        for ckpt in remote_checkpoints(self.req.storage, self.req.checkpoint_prefix):
            if ckpt.complete and ckpt.step not in self.uploaded:
                self.uploaded[ckpt.step] = self._remote_info(ckpt.key, ckpt.step)

    def _remote_info(self, key: str, step: int) -> CheckpointInfo:
        import hashlib

        manifest = self.req.storage.get_bytes(f"{key}/{checkpoints.MANIFEST}")
        return CheckpointInfo(self.req.storage.uri_for(key), step, hashlib.sha256(manifest).hexdigest())

    def _final_flush(self, uploader: _Uploader) -> None:
        """The newest committed checkpoint must be durable before we report; retry a little, then fail."""
        for attempt in range(3):
            try:
                # The newest goes first (it is what a preempted machine must not lose), then the rest
                # of the newest ``keep``.
                while True:
                    try:
                        if uploader.sync() is None:
                            return
                    except UploadCancelled:
                        continue
            except Exception as exc:
                if attempt == 2:
                    raise InfraError(
                        f"the final checkpoint of run {self.req.run_id} could not be uploaded to "
                        f"{self.req.storage.uri_for(self.req.checkpoint_prefix)}: {exc}",
                        hint="check the storage backend; the local copy is under " + str(self.paths.checkpoints),
                    ) from exc
                time.sleep(1.0 * (attempt + 1))

    def _outcome(self, exit_code: int, reason: StopReason, resume: ResumePoint, tail: _MetricsTail) -> TrainOutcome:
        curve = loss_curve(read_metrics(self.paths.metrics))
        durable = sorted(self.uploaded.values(), key=lambda c: c.step)
        steps = [s for s, _ in curve] + [c.step for c in durable]
        eval_metrics: dict[str, Any] = {}
        if self.paths.eval.is_file():
            try:
                loaded = json.loads(self.paths.eval.read_text())
                eval_metrics = loaded if isinstance(loaded, dict) else {"value": loaded}
            except ValueError as exc:
                raise InputError(
                    f"the trainer wrote an unreadable GPULINE_EVAL_PATH ({self.paths.eval}): {exc}",
                    hint="write one JSON object of metric name -> value",
                ) from exc
        outcome = TrainOutcome(
            exit_code=exit_code,
            resumed_from_step=resume.step,
            final_step=max(steps) if steps else None,
            checkpoints=durable,
            eval_metrics=eval_metrics,
            loss_curve=curve,
            preemptions=self.preemptions,
            restarts=self.restarts,
            first_step_at=tail.first_step_at,
            last_step_at=tail.last_step_at,
            output_dir=self.paths.output,
            stop_reason=reason,
        )
        self.req.on_event("finished", {"stop_reason": reason, "exit_code": exit_code, "final_step": outcome.final_step})
        return outcome


def supervise(req: TrainRequest) -> TrainOutcome:
    """Run the entrypoint to completion (or to a stop), resuming and restarting as needed."""
    if req.keep < 1:
        raise InputError("checkpoint.keep must be at least 1", hint="keep the newest 1 or more checkpoints")
    return Supervisor(req).run()


# ---------------------------------------------------------------- preflight helpers


def smoke_test(
    command: list[str],
    cwd: Path,
    dataset_path: Path | None,
    hyperparameters: Mapping[str, Any],
    timeout_s: float,
    *,
    extra_env: Mapping[str, str] | None = None,
) -> SmokeResult:
    """Run the entrypoint with ``GPULINE_SMOKE=1`` on CPU: it trains ~20 steps on one batch.

    Returns the losses and whether they fell; raises InputError when the script fails, times out or
    writes no losses, since no GPU should be bought for a script that cannot do that much.
    """
    with tempfile.TemporaryDirectory(prefix="gpuline-smoke-") as tmp:
        paths = RunPaths(Path(tmp))
        env = contract_env(
            run_id="smoke",
            paths=paths,
            hyperparameters=hyperparameters,
            dataset_path=dataset_path,
            checkpoint_interval=10**9,
            resume_from=None,
            max_duration_s=timeout_s,
            smoke=True,
        )
        child_env = _child_env(env, {"CUDA_VISIBLE_DEVICES": "", **(extra_env or {})})
        shown = shlex.join(command)
        started = time.monotonic()
        proc = _start(list(command), cwd, child_env)
        assert proc.stdout is not None
        lines: deque[str] = deque(maxlen=TAIL_LINES)
        reader = _LineReader(proc.stdout, lines.append)
        reader.start()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
            raise InputError(
                f"the smoke test of `{shown}` did not finish within {timeout_s:.0f}s",
                hint="with GPULINE_SMOKE=1 the script should train about 20 steps on one batch and exit",
            ) from None
        finally:
            _signal_group(proc, signal.SIGKILL)
            reader.join()
        wall = time.monotonic() - started
        code = _exit_code(proc.returncode)
        if code != 0:
            last = next((line for line in reversed(lines) if line.strip()), "(no output)")
            raise InputError(
                f"the smoke test of `{shown}` exited with code {code}: {last}",
                hint="run it locally with GPULINE_SMOKE=1 and fix the error shown",
            )
        rows = read_metrics(paths.metrics)
        losses = [float(r["loss"]) for r in rows if isinstance(r.get("loss"), int | float)]
        if not losses:
            raise InputError(
                f"the smoke test of `{shown}` wrote no losses to GPULINE_METRICS_PATH",
                hint='append one JSON line {"step": N, "loss": L} per training step',
            )
        times = [float(r["time"]) for r in rows if isinstance(r.get("time"), int | float)]
        gaps = [b - a for a, b in itertools.pairwise(times) if b >= a]
        step_seconds = statistics.median(gaps) if gaps else wall / len(losses)
        fell = len(losses) >= 2 and losses[-1] < losses[0] * SMOKE_DROP
        return SmokeResult(losses, fell, step_seconds, code, list(lines))


_IMPORT_CHECK = r"""
import json, os, runpy, sys, traceback
path = os.path.abspath(sys.argv[1])
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
print("GPULINE_IMPORT_CHECK " + json.dumps(report), flush=True)
"""


def check_entrypoint_imports(path: Path, cwd: Path, *, python: str | None = None, timeout_s: float = 300) -> None:
    """Import the entrypoint (its ``__main__`` block does not run) in a child interpreter.

    Raises InputError naming the missing module and the line that imports it.
    """
    if not path.is_file():
        raise InputError(f"entrypoint {path} does not exist", hint="fix entrypoint.import_check in gpuline.yml")
    interpreter = python or os.environ.get("GPULINE_PYTHON") or sys.executable
    try:
        done = subprocess.run(
            [interpreter, "-c", _IMPORT_CHECK, str(path)],
            cwd=cwd,
            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise InputError(
            f"importing {path.name} took longer than {timeout_s:.0f}s",
            hint="keep work at import time small; start training under `if __name__ == '__main__':`",
        ) from None
    marker = [ln for ln in done.stdout.splitlines() if ln.startswith("GPULINE_IMPORT_CHECK ")]
    if not marker:
        raise InputError(
            f"importing {path.name} ended the interpreter (exit {done.returncode}): "
            + (done.stderr.strip().splitlines() or ["no output"])[-1],
            hint="keep work at import time small; start training under `if __name__ == '__main__':`",
            location=Location(path),
        )
    report = json.loads(marker[-1].removeprefix("GPULINE_IMPORT_CHECK "))
    if report is None:
        return
    where = Location(path, line=report.get("line"))
    if report["kind"] == "import":
        missing = report.get("name") or "a module"
        raise InputError(
            f"{path.name} cannot be imported: {report['type']}: {report['message']}",
            hint=f"install {missing} in the training environment (add it to your requirements)",
            location=where,
        )
    if report["kind"] == "syntax":
        raise InputError(f"{path.name} has a syntax error: {report['message']}", hint="fix the syntax", location=where)
    raise InputError(
        f"importing {path.name} raised {report['type']}: {report['message']}",
        hint="move work that needs data or a GPU under `if __name__ == '__main__':`",
        location=where,
    )
