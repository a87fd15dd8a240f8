"""EC2 through boto3: one tagged, self-terminating instance per lease, with failover across types,
zones and (when allowed) lanes.

Leak-proofing, in the order it matters:

* the lease (ids, tags, TTL) is in the ledger before ``RunInstances`` (the provision step does that);
* the tags go on *at launch* (``TagSpecifications`` for the instance and its volumes), so even a
  process killed while ``RunInstances`` is in flight leaves an instance the reaper can find;
* ``InstanceInitiatedShutdownBehavior=terminate`` plus a boot-script watchdog at the TTL, so the
  machine ends itself when everything else is gone;
* ``ClientToken`` per candidate, so a retried call never buys a second machine.

IMDSv2 is required (``HttpTokens=required``). Credentials come from the environment (an OIDC role in
Actions, or keys); ``AWS_ENDPOINT_URL`` points the client elsewhere (a local moto server in tests).
The request itself is built in :mod:`gpuline.providers.ec2_launch`; errors are read in
:mod:`gpuline.providers.ec2_errors`.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpuline.adaptors import aws
from gpuline.errors import ConfigError, GpulineError, NotFoundError
from gpuline.providers.base import TAG_MANAGED, LeaseRequest, Machine, MachineState
from gpuline.providers.billing import BilledSpan
from gpuline.providers.ec2_errors import NOT_FOUND_CODES, as_error, classify
from gpuline.providers.ec2_faults import FAULTS_ENV, Launch, with_injected_faults
from gpuline.providers.ec2_launch import Ec2Options, base_params, candidates, image_for, params_for
from gpuline.providers.failover import Backoff, Candidate, first_that_launches
from gpuline.providers.options import parse_options
from gpuline.providers.testhooks import pause_at

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client

__all__ = ["FAULTS_ENV", "Ec2Options", "Ec2Provider", "billed_span_of"]

_MAX_ATTEMPTS = 4
_LIVE_STATES = ["pending", "running", "stopping", "stopped"]
_STATES: dict[str, MachineState] = {
    "pending": "pending",
    "running": "running",
    "stopping": "stopping",
    "stopped": "stopped",
    "shutting-down": "terminated",
    "terminated": "terminated",
}


# "User initiated (2026-11-30 14:02:09 GMT)": when the instance left running, to the second (AWS
# writes GMT, moto UTC). EC2 bills Linux instances per second from running to that moment.
_TRANSITION_AT = re.compile(r"\((\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}) (?:GMT|UTC)\)")
_ENDED = ("shutting-down", "terminated")


def transition_time(reason: str) -> datetime | None:
    """The time in a ``StateTransitionReason``, None when it carries none (an instance-initiated shutdown)."""
    found = _TRANSITION_AT.search(reason or "")
    return datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC) if found else None


def billed_span_of(instance: dict[str, Any]) -> BilledSpan | None:
    """``LaunchTime`` to the state transition that ended it, for an instance that has ended; the end
    is None (teardown's own time stands in) when the reason carries no time."""
    launched = instance.get("LaunchTime")
    if not isinstance(launched, datetime) or instance.get("State", {}).get("Name") not in _ENDED:
        return None
    ended = transition_time(str(instance.get("StateTransitionReason") or ""))
    return BilledSpan(start=launched, end=max(ended, launched) if ended else None)


def _run_instances(client: EC2Client, params: dict[str, Any]) -> dict[str, Any]:
    response: dict[str, Any] = dict(client.run_instances(**params))
    return response


class Ec2Provider:
    name = "ec2"
    max_nodes = 1  # one instance per lease; a rendezvous across instances is the Kubernetes provider's job

    def __init__(
        self,
        project_dir: Path,
        options: dict[str, Any] | None = None,
        *,
        launch: Launch | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        self.project_dir = project_dir
        self.options = parse_options(Ec2Options, options or {}, "ec2")
        # Seams for tests: what actually calls RunInstances, and how failover waits.
        self._launch = launch or with_injected_faults(_run_instances)
        self._backoff = backoff or Backoff(base_s=self.options.backoff_base_s, retries=self.options.throttle_retries)
        self._clients: dict[str, EC2Client] = {}

    def secrets(self) -> list[str]:
        return []  # credentials stay with the SDK's own chain

    def client(self, region: str | None = None) -> EC2Client:
        region = region or self.options.region or aws.default_region()
        if not region:
            raise ConfigError(
                "no AWS region for the ec2 provider",
                hint="set resources.region (or resources.options.region, or AWS_REGION)",
            )
        if region not in self._clients:
            self._clients[region] = aws.client(
                "ec2",
                needed_by="the ec2 provider",
                region=region,
                endpoint_url=self.options.endpoint_url,
                max_attempts=_MAX_ATTEMPTS,
            )
        return self._clients[region]

    # ------------------------------------------------------------ provision

    def provision(self, request: LeaseRequest) -> Machine:
        region = request.region or self.options.region
        client = self.client(region)
        base = base_params(self.options, request, image_for(self.options, request), client)
        candidates = self.candidates(request)

        def launch(candidate: Candidate) -> dict[str, Any]:
            params = params_for(self.options, base, candidate, request, candidates.index(candidate))
            return self._launch(client, params)

        try:
            launched = first_that_launches(candidates, launch, classify, backoff=self._backoff)
        except GpulineError:
            raise
        except Exception as exc:
            raise as_error(exc, "launching an instance") from None
        instance = launched.value["Instances"][0]
        machine = self._machine(instance, region or client.meta.region_name)
        machine.failures = [f.as_dict() for f in launched.failures]
        machine.lane = launched.candidate.lane
        machine.runner_label = request.runner.label if request.runner else None
        return machine

    def candidates(self, request: LeaseRequest) -> list[Candidate]:
        """Every (type, lane, place) to try, in order (see :func:`gpuline.providers.ec2_launch.candidates`)."""
        return candidates(self.options, request, self.project_dir)

    # ------------------------------------------------------------ describe, release, list

    def describe(self, instance_id: str) -> Machine:
        instance = self._find(instance_id)
        if instance is None:
            raise NotFoundError(f"ec2 instance {instance_id} does not exist")
        return self._machine(instance, self.client().meta.region_name)

    def _find(self, instance_id: str) -> dict[str, Any] | None:
        try:
            reservations = self.client().describe_instances(InstanceIds=[instance_id])["Reservations"]
        except Exception as exc:
            if aws.error_code(exc) in NOT_FOUND_CODES:
                return None
            raise as_error(exc, f"describing {instance_id}") from None
        for reservation in reservations:
            for instance in reservation.get("Instances", []):
                return dict(instance)
        return None

    def release(self, instance_id: str) -> bool:
        instance = self._find(instance_id)
        if instance is None or _STATES.get(instance["State"]["Name"], "unknown") == "terminated":
            return False
        pause_at("release")
        try:
            self.client().terminate_instances(InstanceIds=[instance_id])
        except Exception as exc:
            if aws.error_code(exc) == "InvalidInstanceID.NotFound":
                return False
            raise as_error(exc, f"terminating {instance_id}") from None
        return True

    def billed_span(self, instance_id: str) -> BilledSpan | None:
        """What EC2 bills for: see :func:`billed_span_of` (None while the instance still runs)."""
        instance = self._find(instance_id)
        return billed_span_of(instance) if instance is not None else None

    def list_owned(self) -> list[Machine]:
        client = self.client()
        filters = [
            {"Name": f"tag:{TAG_MANAGED}", "Values": ["true"]},
            {"Name": "instance-state-name", "Values": _LIVE_STATES},
        ]
        machines: list[Machine] = []
        try:
            for page in client.get_paginator("describe_instances").paginate(Filters=filters):  # type: ignore[arg-type]
                for reservation in page.get("Reservations", []):
                    for instance in reservation.get("Instances", []):
                        machines.append(self._machine(dict(instance), client.meta.region_name))
        except Exception as exc:
            raise as_error(exc, "listing gpuline instances") from None
        return machines

    def _machine(self, instance: dict[str, Any], region: str) -> Machine:
        tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
        launched = instance.get("LaunchTime")
        return Machine(
            instance_id=instance["InstanceId"],
            provider=self.name,
            state=_STATES.get(instance.get("State", {}).get("Name", ""), "unknown"),
            tags=tags,
            launched_at=launched if isinstance(launched, datetime) else None,
            address=instance.get("PrivateIpAddress") or instance.get("PublicIpAddress"),
            instance_type=instance.get("InstanceType", ""),
            lane="spot" if instance.get("InstanceLifecycle") == "spot" else "on-demand",
            region=region,
        )
