"""A test hook for EC2: make RunInstances fail with a real AWS error code before it is sent.

moto cannot run out of capacity, so ``GPULINE_TEST_EC2_FAULTS`` holds ``SELECTOR=CODE[*N]`` rules,
comma-separated. SELECTOR is ``*``, an instance type, a lane, or ``TYPE@ZONE``; ``*N`` fails only
the first N matching calls. Unset in real use, where the launch function is returned unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gpuline import contract
from gpuline.adaptors import aws

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client

FAULTS_ENV = contract.TEST_EC2_FAULTS

Launch = Callable[["EC2Client", dict[str, Any]], dict[str, Any]]


class _Rule:
    def __init__(self, selector: str, code: str, times: int | None) -> None:
        self.selector, self.code, self.times = selector, code, times

    def matches(self, params: dict[str, Any]) -> bool:
        if self.times is not None and self.times <= 0:
            return False
        itype = str(params.get("InstanceType", ""))
        zone = str(params.get("Placement", {}).get("AvailabilityZone", "") or params.get("SubnetId", ""))
        lane = "spot" if "InstanceMarketOptions" in params else "on-demand"
        sel = self.selector
        return sel in ("*", itype, lane) or sel == f"{itype}@{zone}"


def parse_faults(text: str) -> list[_Rule]:
    rules = []
    for raw in text.split(","):
        if not raw.strip():
            continue
        selector, _, rest = raw.strip().partition("=")
        code, _, times = rest.partition("*")
        rules.append(_Rule(selector.strip(), code.strip(), int(times) if times.strip() else None))
    return rules


def with_injected_faults(launch: Launch) -> Launch:
    """``launch``, failing first as the rules in the environment say (a real ClientError each time)."""
    text = os.environ.get(FAULTS_ENV, "")
    if not text:
        return launch
    rules = parse_faults(text)

    def faulty(client: EC2Client, params: dict[str, Any]) -> dict[str, Any]:
        for rule in rules:
            if rule.matches(params):
                if rule.times is not None:
                    rule.times -= 1
                message = f"injected {rule.code} for {params.get('InstanceType')}"
                raise aws.client_error(rule.code, message, "RunInstances")
        return launch(client, params)

    return faulty
