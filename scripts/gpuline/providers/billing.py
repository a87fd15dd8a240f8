"""What a provider can tell about what it billed: when its meter started and stopped for a machine.

A provider that knows (EC2's ``LaunchTime`` and the time in ``StateTransitionReason``; a REST cloud's
``created_at``) implements :class:`BillingClock`; teardown then costs the lease from those times,
with the catalog's billing increment, and labels the cost "provider". One that does not is costed
from the lease as gpuline held it, labelled "catalog estimate".
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class BilledSpan:
    """The provider's own times for a machine. ``end`` None: it reported no stop time, and the meter
    is taken to stop when teardown saw the machine ended."""

    start: datetime
    end: datetime | None = None


@runtime_checkable
class BillingClock(Protocol):
    def billed_span(self, instance_id: str) -> BilledSpan | None:
        """The machine's billed span once it has ended; None while it still runs or when unknown."""
        ...
