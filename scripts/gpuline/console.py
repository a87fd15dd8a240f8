"""What the CLI's error boundary needs from the operating system, kept out of cli.py and import-light
(standard library and gpuline.errors only): a stdout that survives its reader going away, and an
OSError (a full disk, a file gone unreadable) as the infrastructure error it is."""

from __future__ import annotations

import errno
import io
import os
from typing import TextIO

from gpuline.errors import GpulineError, InfraError, clip


class SafeStdout(io.TextIOBase):
    """stdout that a reader going away cannot break (``gpuline status --json | head``): what it
    cannot take is dropped, and the command finishes, releases and exits as it would have."""

    def __init__(self, inner: TextIO) -> None:
        self.inner = inner
        self.broken = False

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                self.inner.write(text)
            except BrokenPipeError:
                self._drop()
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                self.inner.flush()
            except BrokenPipeError:
                self._drop()

    def fileno(self) -> int:
        return self.inner.fileno()

    def isatty(self) -> bool:
        return self.inner.isatty()

    def _drop(self) -> None:
        self.broken = True
        # Point the descriptor at /dev/null so the interpreter's last flush at exit finds no pipe either.
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self.inner.fileno())
            os.close(null)
        except (OSError, ValueError):
            pass  # not a real descriptor (a test's capture): dropping the writes is enough


def os_error(exc: OSError) -> GpulineError:
    name = errno.errorcode.get(exc.errno or 0, "")
    where = f": {clip(str(exc.filename), 200)}" if exc.filename else ""
    hint = "free disk space and rerun" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "check the path and rerun"
    return InfraError(f"{exc.strerror or exc}{f' ({name})' if name else ''}{where}", hint=hint)
