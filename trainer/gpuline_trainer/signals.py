"""SIGTERM becomes a flag the training loop checks between steps: save, then exit.

A handler must not raise (an exception mid-``optimizer.step()`` would leave half-updated weights);
it only records that a stop was asked for. The loop finishes the step it is in, saves a final
checkpoint and returns; the script then exits with 143 (128 + SIGTERM), the conventional code.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterable
from types import FrameType, TracebackType

from gpuline_trainer.output import keep_output_alive

EXIT_CODE = 128 + signal.SIGTERM


class StopFlag:
    def __init__(self, signals: Iterable[signal.Signals] = (signal.SIGTERM,)) -> None:
        self.signals = tuple(signals)
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[signal.Signals, object] = {}

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def request(self, reason: str = "requested") -> None:
        self.requested = True
        self.signal_name = self.signal_name or reason

    def install(self) -> StopFlag:
        # A stop usually comes with a dying supervisor: the "saving" line must not kill the save.
        keep_output_alive()
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def uninstall(self) -> None:
        for sig, old in self._previous.items():
            signal.signal(sig, old)  # type: ignore[arg-type]
        self._previous.clear()

    def __enter__(self) -> StopFlag:
        return self.install()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.uninstall()
