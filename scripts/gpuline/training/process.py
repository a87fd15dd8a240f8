"""Child processes: starting the trainer in its own process group, signalling it, reading its output.

The trainer runs in a session of its own so one signal reaches torchrun and every rank, and Linux is
asked to SIGTERM it should the supervisor die. A pid file records the trainer's pid *and* its start
time (:func:`process_start_ticks`), so a later supervisor can tell a trainer left behind from an
unrelated process that reused the pid.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import IO

from gpuline.errors import InputError

TAIL_LINES = 40


def process_start_ticks(pid: int) -> str | None:
    """When process ``pid`` started, in clock ticks since boot (field 22 of ``/proc/PID/stat``).

    Together with the pid it names one process: a pid reused later has a different start time.
    None where ``/proc`` does not exist (not Linux) or no process has that pid.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22 counted after the ")" that ends the command name (field 2), which may hold spaces
    # and parentheses.
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None


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


def start_child(argv: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start the entrypoint with its output piped (stderr folded into stdout) for a :class:`LineReader`."""
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


def signal_group(pgid: int, sig: signal.Signals) -> None:
    """Signal every process of the group; one already gone is not an error."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def exit_code(returncode: int) -> int:
    """Shell convention: killed by signal N reads as 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_group(pgid: int, grace_s: float) -> None:
    """SIGTERM the group, give it ``grace_s`` to exit (a trainer saves its final checkpoint), then SIGKILL."""
    signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    signal_group(pgid, signal.SIGKILL)
    while group_alive(pgid) and time.monotonic() < deadline + 5:
        time.sleep(0.05)


def write_pidfile(path: Path, pid: int) -> None:
    path.write_text(json.dumps({"pid": pid, "start": process_start_ticks(pid)}))


def running_from_pidfile(path: Path) -> int | None:
    """The pid in ``path`` when that very process (same start time) still leads a live group."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    pid = int(record.get("pid", 0))
    if pid <= 0 or process_start_ticks(pid) != record.get("start") or not group_alive(pid):
        return None
    return pid


class LineReader(threading.Thread):
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
