"""Try launch candidates in order until one gets a machine, keeping every failure for the run record.

A cloud says no for three kinds of reasons, and each calls for a different move: no *capacity* for
this type in this zone (try the next zone or type), a *quota* that will say no in every zone (skip
the other zones of this type and lane), *throttling* (wait with jittered exponential backoff, try the
same candidate again). Anything else is a mistake in the request that failover cannot fix, so it is
raised at once, with the failures so far in its message.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Generic, Literal, TypeVar

from gpuline.errors import GpulineError, InfraError
from gpuline.runs import utcnow

FailureKind = Literal["capacity", "quota", "throttling"]
T = TypeVar("T")


@dataclass(frozen=True)
class Candidate:
    """One way to get a machine: a type, a lane, and (optionally) where."""

    instance_type: str
    lane: str
    zone: str = ""
    subnet: str = ""

    def describe(self) -> str:
        where = self.zone or self.subnet
        return f"{self.instance_type} ({self.lane}{', ' + where if where else ''})"


@dataclass(frozen=True)
class Refusal:
    """What a provider-specific classifier says about an error it recognises."""

    kind: FailureKind
    code: str
    message: str


@dataclass
class Failure:
    instance_type: str
    lane: str
    zone: str
    kind: FailureKind
    code: str
    message: str
    at: datetime = field(default_factory=utcnow)

    def as_dict(self) -> dict[str, str]:
        body = asdict(self)
        body["at"] = self.at.isoformat(timespec="seconds")
        return body

    def one_line(self) -> str:
        where = f" in {self.zone}" if self.zone else ""
        return f"{self.instance_type} {self.lane}{where}: {self.code}"


class CapacityExhausted(InfraError):
    """Every candidate failed; ``failures`` lists each attempt in order."""

    title = "no capacity"

    def __init__(self, failures: Sequence[Failure], *, hint: str | None = None) -> None:
        listed = "; ".join(f.one_line() for f in failures) or "no candidates to try"
        super().__init__(
            f"no machine could be launched after {len(failures)} attempt(s): {listed}",
            hint=hint or "add instance types or zones to resources.options, allow on-demand fallback, or retry later",
        )
        self.failures = list(failures)


@dataclass
class Launched(Generic[T]):
    value: T
    candidate: Candidate
    failures: list[Failure]


@dataclass
class Backoff:
    """Full-jitter exponential backoff (AWS's recommendation): sleep U(0, min(cap, base * 2**n))."""

    base_s: float = 1.0
    cap_s: float = 20.0
    retries: int = 3
    sleep: Callable[[float], None] = time.sleep
    rng: Callable[[], float] = random.random

    def wait(self, attempt: int) -> float:
        delay = float(min(self.cap_s, self.base_s * 2**attempt) * self.rng())
        self.sleep(delay)
        return delay


def first_that_launches(
    candidates: Sequence[Candidate],
    launch: Callable[[Candidate], T],
    classify: Callable[[Exception], Refusal | None],
    *,
    backoff: Backoff | None = None,
    on_failure: Callable[[Failure], None] | None = None,
) -> Launched[T]:
    backoff = backoff or Backoff()
    failures: list[Failure] = []
    over_quota: set[tuple[str, str]] = set()
    for candidate in candidates:
        if (candidate.instance_type, candidate.lane) in over_quota:
            continue
        attempt = 0
        while True:
            try:
                return Launched(launch(candidate), candidate, failures)
            except GpulineError:
                raise
            except Exception as exc:
                refusal = classify(exc)
                if refusal is None:
                    raise
                failure = Failure(
                    candidate.instance_type,
                    candidate.lane,
                    candidate.zone or candidate.subnet,
                    refusal.kind,
                    refusal.code,
                    (f"after {attempt} retries: " if attempt else "") + refusal.message[:300],
                )
                if refusal.kind == "throttling" and attempt < backoff.retries:
                    backoff.wait(attempt)
                    attempt += 1
                    continue
                failures.append(failure)
                if on_failure is not None:
                    on_failure(failure)
                if refusal.kind == "quota":
                    over_quota.add((candidate.instance_type, candidate.lane))
                break
    raise CapacityExhausted(failures)
