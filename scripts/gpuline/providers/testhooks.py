"""Test hooks: let a test stop the orchestrator at a chosen moment, to kill it exactly there.

``GPULINE_TEST_PAUSE_AT=<stage>`` makes the process wait when it reaches ``stage``; it first writes
its pid to ``GPULINE_TEST_PAUSE_FILE`` (when set) so the test knows it got there. Stages:
``lease-recorded`` (the lease is in the ledger, no provider call yet), ``launched`` (the provider
answered, the ledger does not know the instance id yet) and ``release`` (teardown is about to give
the machine back). Unset in real use, where ``pause_at`` costs one dictionary lookup.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from gpuline import contract

PAUSE_ENV = contract.TEST_PAUSE_AT
PAUSE_FILE_ENV = contract.TEST_PAUSE_FILE
# A forgotten pause must not hang a job forever: give up waiting after this long and carry on.
MAX_PAUSE_S = 300.0


def pause_at(stage: str) -> None:
    if os.environ.get(PAUSE_ENV) != stage:
        return
    marker = os.environ.get(PAUSE_FILE_ENV)
    if marker:
        Path(marker).write_text(f"{os.getpid()} {stage}\n")
    deadline = time.monotonic() + MAX_PAUSE_S
    while time.monotonic() < deadline:
        time.sleep(0.05)
