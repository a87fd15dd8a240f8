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
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from gpuline import gha
from gpuline.decisions.pricing import load_catalog
from gpuline.errors import ConfigError, GpulineError, InfraError, NotFoundError
from gpuline.providers.base import TAG_MANAGED, LeaseRequest, Machine, MachineState
from gpuline.providers.failover import Backoff, Candidate, Failure, Refusal, first_that_launches
from gpuline.providers.options import parse_options
from gpuline.providers.testhooks import pause_at
from gpuline.providers.userdata import render_user_data

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client

# Test hook: ``SELECTOR=CODE[*N]`` rules, comma-separated, make RunInstances fail with a real AWS
# error code before it is sent (moto cannot run out of capacity). SELECTOR is ``*``, an instance
# type, a lane, or ``TYPE@ZONE``; ``*N`` fails only the first N matching calls.
FAULTS_ENV = "GPULINE_TEST_EC2_FAULTS"

CAPACITY_CODES = frozenset(
    {
        "InsufficientInstanceCapacity",
        "InsufficientHostCapacity",
        "InsufficientReservedInstanceCapacity",
        "InsufficientCapacity",
        "InsufficientFreeAddressesInSubnet",
        "SpotMaxPriceTooLow",
        "Unsupported",  # the type is not offered in this zone: another zone may have it
    }
)
QUOTA_CODES = frozenset(
    {"VcpuLimitExceeded", "MaxSpotInstanceCountExceeded", "InstanceLimitExceeded", "MaxSpotFleetRequestCountExceeded"}
)
THROTTLING_CODES = frozenset(
    {
        "RequestLimitExceeded",
        "Throttling",
        "ThrottlingException",
        "RequestThrottled",
        "ServiceUnavailable",
        "Unavailable",
        "InternalError",
    }
)
_PERMISSION_CODES = frozenset({"UnauthorizedOperation", "AuthFailure", "OptInRequired", "Blocked"})

_LIVE_STATES = ["pending", "running", "stopping", "stopped"]
_STATES: dict[str, MachineState] = {
    "pending": "pending",
    "running": "running",
    "stopping": "stopping",
    "stopped": "stopped",
    "shutting-down": "terminated",
    "terminated": "terminated",
}


class Ec2Options(BaseModel):
    """``resources.options`` for the ec2 provider."""

    model_config = ConfigDict(extra="forbid")

    image_id: str | None = Field(default=None, description="AMI id or resolve:ssm:/path (default: resources.image).")
    region: str | None = Field(default=None, description="Default: resources.region, then AWS_REGION.")
    instance_types: list[str] | None = Field(
        default=None,
        description="Types to try, in order (default: the chosen type, then catalog types with the same GPU).",
    )
    subnet_ids: list[str] = Field(default_factory=list, description="One per zone to fail over across.")
    availability_zones: list[str] = Field(default_factory=list, description="Zones to try when no subnets.")
    security_group_ids: list[str] = Field(default_factory=list)
    iam_instance_profile: str | None = Field(default=None, description="Instance profile name or ARN.")
    key_name: str | None = None
    on_demand_fallback: bool = Field(default=False, description="When spot is exhausted, try on-demand.")
    spot_max_price: str | None = Field(default=None, description="USD/hour cap; default: the on-demand price.")
    root_volume_gb: int | None = Field(default=None, ge=8, le=16384)
    root_volume_type: Literal["gp3", "gp2", "io1", "io2"] = "gp3"
    startup_script: str = Field(default="", description="Bash run at boot before the runner starts.")
    runner_dir: str = "/opt/actions-runner"
    runner_user: str = "runner"
    runner_version: str = "2.321.0"
    extra_tags: dict[str, str] = Field(default_factory=dict)
    throttle_retries: int = Field(default=3, ge=0, le=10)
    backoff_base_s: float = Field(default=1.0, ge=0)
    endpoint_url: str | None = Field(default=None, description="Default: AWS_ENDPOINT_URL.")


Launch = Callable[["EC2Client", dict[str, Any]], dict[str, Any]]


def _run_instances(client: EC2Client, params: dict[str, Any]) -> dict[str, Any]:
    response: dict[str, Any] = dict(client.run_instances(**params))
    return response


class Ec2Provider:
    name = "ec2"

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
        self._launch = launch or _with_injected_faults(_run_instances)
        self._backoff = backoff or Backoff(base_s=self.options.backoff_base_s, retries=self.options.throttle_retries)
        self._clients: dict[str, EC2Client] = {}

    # ------------------------------------------------------------ the AWS client

    def client(self, region: str | None = None) -> EC2Client:
        region = region or self.options.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if not region:
            raise ConfigError(
                "no AWS region for the ec2 provider",
                hint="set resources.region (or resources.options.region, or AWS_REGION)",
            )
        if region not in self._clients:
            import boto3
            from botocore.config import Config

            endpoint = self.options.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
            self._clients[region] = boto3.client(
                "ec2",
                region_name=region,
                endpoint_url=endpoint,
                config=Config(retries={"mode": "standard", "max_attempts": 4}, user_agent_extra="gpuline"),
            )
        return self._clients[region]

    # ------------------------------------------------------------ provision

    def provision(self, request: LeaseRequest) -> Machine:
        region = request.region or self.options.region
        client = self.client(region)
        image = self._image(request)
        base = self._base_params(request, image, client)
        candidates = self.candidates(request)

        def launch(candidate: Candidate) -> dict[str, Any]:
            params = self._params_for(base, candidate, request, candidates.index(candidate))
            return self._launch(client, params)

        def report(failure: Failure) -> None:
            gha.annotate("warning", f"ec2: {failure.one_line()}: {failure.message}", title="gpuline failover")

        try:
            launched = first_that_launches(candidates, launch, _classify, backoff=self._backoff, on_failure=report)
        except GpulineError:
            raise
        except Exception as exc:
            raise _as_error(exc, "launching an instance") from None
        instance = launched.value["Instances"][0]
        machine = self._machine(instance, region or client.meta.region_name)
        machine.failures = [f.as_dict() for f in launched.failures]
        machine.lane = launched.candidate.lane
        machine.runner_label = request.runner.label if request.runner else None
        return machine

    def candidates(self, request: LeaseRequest) -> list[Candidate]:
        """Every (type, lane, place) to try, in order: all zones of a type before the next type,
        the requested lane before the on-demand fallback."""
        types = self.options.instance_types or self._catalog_types(request)
        if request.instance_type not in types and not self.options.instance_types:
            types.insert(0, request.instance_type)
        places: list[tuple[str, str]] = [("", s) for s in self.options.subnet_ids] or [
            (z, "") for z in self.options.availability_zones
        ]
        places = places or [("", "")]
        lanes = [request.lane]
        if request.lane == "spot" and self.options.on_demand_fallback:
            lanes.append("on-demand")
        return [Candidate(t, lane, zone, subnet) for lane in lanes for t in types for zone, subnet in places]

    def _catalog_types(self, request: LeaseRequest) -> list[str]:
        """The chosen type, then the catalog's other types with the same GPU and enough of them, cheapest first."""
        resources = request.spec.resources
        if resources.instance_type:
            return [request.instance_type]
        prices = load_catalog(self.project_dir).providers.get("ec2")
        if prices is None:
            return [request.instance_type]
        fitting = sorted(
            (inst.on_demand, name)
            for name, inst in prices.instances.items()
            if inst.gpu == resources.gpu_type and inst.gpus >= resources.gpu_count
        )
        return [request.instance_type] + [name for _, name in fitting if name != request.instance_type]

    def _image(self, request: LeaseRequest) -> str:
        image = self.options.image_id or request.spec.resources.image
        if not image:
            raise ConfigError(
                "the ec2 provider needs a machine image",
                hint="set resources.options.image_id (an AMI id, or resolve:ssm:/aws/service/...) or resources.image",
            )
        if not (image.startswith(("ami-", "resolve:ssm:"))):
            raise ConfigError(
                f"resources.options.image_id {image!r} is not an AMI id",
                hint="use ami-... or resolve:ssm:/aws/service/deeplearning/... (a container image goes in the runner)",
            )
        return image

    def _base_params(self, request: LeaseRequest, image: str, client: EC2Client) -> dict[str, Any]:
        o = self.options
        tags = [{"Key": k, "Value": v} for k, v in self._tags(request).items()]
        user_data = render_user_data(
            request,
            runner_dir=o.runner_dir,
            runner_user=o.runner_user,
            runner_version=o.runner_version,
            startup_script=o.startup_script,
        )
        params: dict[str, Any] = {
            "ImageId": image,
            "MinCount": 1,
            "MaxCount": 1,
            "UserData": user_data,
            "InstanceInitiatedShutdownBehavior": "terminate",
            # IMDSv2 only; hop limit 2 so a container on the machine can still reach it.
            "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled", "HttpPutResponseHopLimit": 2},
            "TagSpecifications": [
                {"ResourceType": "instance", "Tags": tags},
                {"ResourceType": "volume", "Tags": tags},
            ],
        }
        if o.iam_instance_profile:
            key = "Arn" if o.iam_instance_profile.startswith("arn:") else "Name"
            params["IamInstanceProfile"] = {key: o.iam_instance_profile}
        if o.key_name:
            params["KeyName"] = o.key_name
        if o.root_volume_gb:
            params["BlockDeviceMappings"] = [
                {
                    "DeviceName": self._root_device(client, image),
                    "Ebs": {
                        "VolumeSize": o.root_volume_gb,
                        "VolumeType": o.root_volume_type,
                        "DeleteOnTermination": True,
                        "Encrypted": True,
                    },
                }
            ]
        return params

    def _params_for(self, base: dict[str, Any], c: Candidate, request: LeaseRequest, index: int) -> dict[str, Any]:
        params = dict(base, InstanceType=c.instance_type)
        # One idempotency token per candidate: a retried call (throttling, a lost response) returns the
        # instance the first call started instead of buying a second one.
        params["ClientToken"] = f"{request.lease_id}-{index}"[:64]
        if c.subnet:
            params["SubnetId"] = c.subnet
            if self.options.security_group_ids:
                params["SecurityGroupIds"] = list(self.options.security_group_ids)
        else:
            if c.zone:
                params["Placement"] = {"AvailabilityZone": c.zone}
            if self.options.security_group_ids:
                params["SecurityGroupIds"] = list(self.options.security_group_ids)
        if c.lane == "spot":
            spot: dict[str, Any] = {"SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"}
            if self.options.spot_max_price:
                spot["MaxPrice"] = self.options.spot_max_price
            params["InstanceMarketOptions"] = {"MarketType": "spot", "SpotOptions": spot}
        return params

    def _tags(self, request: LeaseRequest) -> dict[str, str]:
        tags = {**self.options.extra_tags, **request.tags, TAG_MANAGED: "true", "Name": f"gpuline-{request.run_id}"}
        # EC2 limits: 50 tags, keys <= 128 and values <= 256 characters.
        return {k[:128]: v[:256] for k, v in list(tags.items())[:50]}

    def _root_device(self, client: EC2Client, image: str) -> str:
        if image.startswith("resolve:ssm:"):
            return "/dev/xvda"
        try:
            images = client.describe_images(ImageIds=[image])["Images"]
        except Exception as exc:
            raise _as_error(exc, f"looking up image {image}") from None
        if not images:
            raise ConfigError(f"image {image} does not exist in this region", hint="check resources.options.image_id")
        return str(images[0].get("RootDeviceName") or "/dev/xvda")

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
            if _code(exc) in ("InvalidInstanceID.NotFound", "InvalidInstanceID.Malformed"):
                return None
            raise _as_error(exc, f"describing {instance_id}") from None
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
            if _code(exc) == "InvalidInstanceID.NotFound":
                return False
            raise _as_error(exc, f"terminating {instance_id}") from None
        return True

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
            raise _as_error(exc, "listing gpuline instances") from None
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


# ---------------------------------------------------------------- errors


def _code(exc: Exception) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


def _classify(exc: Exception) -> Refusal | None:
    code = _code(exc)
    message = str(getattr(exc, "response", {}).get("Error", {}).get("Message", "")) if code else str(exc)
    if code in CAPACITY_CODES:
        return Refusal("capacity", code, message)
    if code in QUOTA_CODES:
        return Refusal("quota", code, message)
    if code in THROTTLING_CODES:
        return Refusal("throttling", code, message)
    return None


def _as_error(exc: Exception, doing: str) -> GpulineError:
    """A boto3/botocore failure as one of our errors, saying what to change."""
    code = _code(exc)
    if code in _PERMISSION_CODES:
        return InfraError(
            f"{doing}: AWS refused ({code})",
            hint="the role needs the ec2 permissions listed in the README's providers section",
        )
    if code.startswith(("InvalidAMIID", "InvalidParameter", "InvalidSubnet", "InvalidGroup", "InvalidKeyPair")):
        message = getattr(exc, "response", {}).get("Error", {}).get("Message", "")
        return ConfigError(f"{doing}: {code}: {message}", hint="check resources.options and resources.image")
    if code.startswith("InvalidInstanceType"):
        return ConfigError(f"{doing}: {code}", hint="check resources.instance_type / resources.options.instance_types")
    name = type(exc).__name__
    if name in ("NoCredentialsError", "PartialCredentialsError", "NoRegionError"):
        return InfraError(
            f"{doing}: {exc}", hint="configure AWS credentials (aws-actions/configure-aws-credentials with OIDC)"
        )
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError"):
        return InfraError(f"{doing}: {exc}", hint="AWS is unreachable from here; check the network or AWS_ENDPOINT_URL")
    return InfraError(f"{doing}: {code or name}: {exc}", hint="see the AWS error above")


# ---------------------------------------------------------------- test fault injection


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


def _parse_faults(text: str) -> list[_Rule]:
    rules = []
    for raw in text.split(","):
        if not raw.strip():
            continue
        selector, _, rest = raw.strip().partition("=")
        code, _, times = rest.partition("*")
        rules.append(_Rule(selector.strip(), code.strip(), int(times) if times.strip() else None))
    return rules


def _with_injected_faults(launch: Launch) -> Launch:
    """Honour GPULINE_TEST_EC2_FAULTS (a test hook; unset in real use): raise a real ClientError first."""
    text = os.environ.get(FAULTS_ENV, "")
    if not text:
        return launch
    rules = _parse_faults(text)

    def faulty(client: EC2Client, params: dict[str, Any]) -> dict[str, Any]:
        from botocore.exceptions import ClientError

        for rule in rules:
            if rule.matches(params):
                if rule.times is not None:
                    rule.times -= 1
                message = f"injected {rule.code} for {params.get('InstanceType')}"
                raise ClientError({"Error": {"Code": rule.code, "Message": message}}, "RunInstances")
        return launch(client, params)

    return faulty
