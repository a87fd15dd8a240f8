"""Printing never kills the trainer: a closed stdout or stderr is dropped, and training goes on.

The supervisor reads the trainer's output through a pipe. When the supervisor dies (SIGKILL, a lost
runner), the next ``print`` meets a pipe with no reader: Python ignores SIGPIPE, so the write raises
``BrokenPipeError``, and a trainer that was about to save its final checkpoint ("saving step N")
died before saving. Wrapped here, such a stream turns into /dev/null at its first failed write (its
file descriptor included, so the interpreter's own flush at exit fails neither), and the write
returns as if it had been read. Nothing else changes: other errors still raise.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from typing import Any, TextIO, cast

_GONE = (errno.EPIPE, errno.ECONNRESET)


def _reader_gone(exc: OSError) -> bool:
    return isinstance(exc, BrokenPipeError) or exc.errno in _GONE


class SurvivingStream:
    """A text stream whose writes and flushes survive the reader at the other end going away."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.dropped = False

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as exc:
            if not _reader_gone(exc):
                raise
            self._drop()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as exc:
            if not _reader_gone(exc):
                raise
            self._drop()

    def _drop(self) -> None:
        """Point the stream's descriptor at /dev/null, so what it still buffers goes nowhere quietly."""
        self.dropped = True
        try:
            fd = self._stream.fileno()
        except (OSError, ValueError):
            return  # no descriptor (a test's capture): the next write fails again and is dropped again
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, fd)
        finally:
            os.close(devnull)
        with contextlib.suppress(OSError):
            self._stream.flush()  # the bytes that met the broken pipe, now written to /dev/null

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def keep_output_alive() -> None:
    """Wrap ``sys.stdout`` and ``sys.stderr`` (once) so printing to a dead reader never raises."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, SurvivingStream):
            setattr(sys, name, cast(TextIO, SurvivingStream(stream)))
