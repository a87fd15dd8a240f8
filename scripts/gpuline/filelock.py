"""An exclusive lock on a file that never waits forever: after a timeout, an error naming who holds it.

The holder writes a note into the lock file (pid, host, since when, the command), so the process that
gives up can say whom it waited for instead of hanging without a word.
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from gpuline.errors import InfraError, clip

LOCK_TIMEOUT_S = 60.0
_POLL_S = 0.05


def note() -> str:
    """Who this process is, as a waiter that times out will read it."""
    started = datetime.now(UTC).isoformat(timespec="seconds")
    return f"pid {os.getpid()} on {socket.gethostname()} since {started}: {clip(' '.join(sys.argv), 200)}"


@contextmanager
def locked(path: Path, what: str, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold ``path`` exclusively; an InfraError naming the holder after ``timeout_s`` seconds."""
    # "a+", not "w": opening must not erase the holder's note, which a waiter that times out reads.
    with path.open("a+") as lock:
        _acquire(lock, what, timeout_s)
        try:
            lock.seek(0)
            lock.truncate()
            lock.write(note() + "\n")
            lock.flush()
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _acquire(lock: IO[str], what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                break
            time.sleep(_POLL_S)
    lock.seek(0)
    holder = clip(lock.read(1000).strip(), 300) or "a process that left no note"
    raise InfraError(
        f"{what} stayed locked for {timeout_s:.0f}s by {holder}",
        hint=f"wait for that process to finish, or end it if it is stuck; the lock is {lock.name}",
    )
