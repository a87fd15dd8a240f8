"""Optimistic concurrency for the cloud ledgers: read, write on a condition, and on losing the race
read again, with jittered exponential backoff, until a deadline."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

from gpuline.errors import InfraError

T = TypeVar("T")


class Retry(Exception):
    """Lost an optimistic race: read again and retry."""


def retrying(service: str, what: str, attempt: Callable[[], T], deadline_s: float) -> T:
    """Call ``attempt`` until it stops raising ``Retry``; an InfraError after ``deadline_s`` seconds."""
    deadline = time.monotonic() + deadline_s
    delay = 0.01
    while True:
        try:
            return attempt()
        except Retry:
            if time.monotonic() > deadline:
                raise InfraError(
                    f"{service} {what} kept losing to concurrent writers for {deadline_s:.0f}s",
                    hint="retry the step; if it persists, look for a writer stuck in a loop",
                ) from None
            # Full jitter: racing writers spread out instead of colliding again in lockstep.
            time.sleep(random.uniform(0, delay))
            delay = min(delay * 2, 1.0)
