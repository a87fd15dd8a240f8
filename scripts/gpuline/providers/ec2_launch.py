"""The EC2 launch request: ``resources.options`` for ec2, the candidates to fail over across, and the
RunInstances parameters for each (tags at launch, IMDSv2, self-termination, an idempotency token)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from gpuline.decisions.pricing import load_catalog
from gpuline.errors import ConfigError
from gpuline.providers.base import TAG_MANAGED, LeaseRequest
from gpuline.providers.ec2_errors import as_error
from gpuline.providers.failover import Candidate
from gpuline.providers.userdata import render_user_data

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client


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


def candidates(options: Ec2Options, request: LeaseRequest, project_dir: Path) -> list[Candidate]:
    """Every (type, lane, place) to try, in order: all zones of a type before the next type,
    the requested lane before the on-demand fallback."""
    types = options.instance_types or catalog_types(request, project_dir)
    if request.instance_type not in types and not options.instance_types:
        types.insert(0, request.instance_type)
    places: list[tuple[str, str]] = [("", s) for s in options.subnet_ids] or [
        (z, "") for z in options.availability_zones
    ]
    places = places or [("", "")]
    lanes = [request.lane]
    if request.lane == "spot" and options.on_demand_fallback:
        lanes.append("on-demand")
    return [Candidate(t, lane, zone, subnet) for lane in lanes for t in types for zone, subnet in places]


def catalog_types(request: LeaseRequest, project_dir: Path) -> list[str]:
    """The chosen type, then the catalog's other types with the same GPU and enough of them, cheapest first."""
    resources = request.spec.resources
    if resources.instance_type:
        return [request.instance_type]
    prices = load_catalog(project_dir).providers.get("ec2")
    if prices is None:
        return [request.instance_type]
    fitting = sorted(
        (inst.on_demand, name)
        for name, inst in prices.instances.items()
        if inst.gpu == resources.gpu_type and inst.gpus >= resources.gpu_count
    )
    return [request.instance_type] + [name for _, name in fitting if name != request.instance_type]


def image_for(options: Ec2Options, request: LeaseRequest) -> str:
    image = options.image_id or request.spec.resources.image
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


def base_params(options: Ec2Options, request: LeaseRequest, image: str, client: EC2Client) -> dict[str, Any]:
    """What every candidate's RunInstances call has in common."""
    o = options
    tags = [{"Key": k, "Value": v} for k, v in launch_tags(o, request).items()]
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
                "DeviceName": _root_device(client, image),
                "Ebs": {
                    "VolumeSize": o.root_volume_gb,
                    "VolumeType": o.root_volume_type,
                    "DeleteOnTermination": True,
                    "Encrypted": True,
                },
            }
        ]
    return params


def params_for(
    options: Ec2Options, base: dict[str, Any], c: Candidate, request: LeaseRequest, index: int
) -> dict[str, Any]:
    """The RunInstances parameters for candidate number ``index``."""
    params = dict(base, InstanceType=c.instance_type)
    # One idempotency token per candidate: a retried call (throttling, a lost response) returns the
    # instance the first call started instead of buying a second one.
    params["ClientToken"] = f"{request.lease_id}-{index}"[:64]
    if c.subnet:
        params["SubnetId"] = c.subnet
    elif c.zone:
        params["Placement"] = {"AvailabilityZone": c.zone}
    if options.security_group_ids:
        params["SecurityGroupIds"] = list(options.security_group_ids)
    if c.lane == "spot":
        spot: dict[str, Any] = {"SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"}
        if options.spot_max_price:
            spot["MaxPrice"] = options.spot_max_price
        params["InstanceMarketOptions"] = {"MarketType": "spot", "SpotOptions": spot}
    return params


def launch_tags(options: Ec2Options, request: LeaseRequest) -> dict[str, str]:
    tags = {**options.extra_tags, **request.tags, TAG_MANAGED: "true", "Name": f"gpuline-{request.run_id}"}
    # EC2 limits: 50 tags, keys <= 128 and values <= 256 characters.
    return {k[:128]: v[:256] for k, v in list(tags.items())[:50]}


def _root_device(client: EC2Client, image: str) -> str:
    if image.startswith("resolve:ssm:"):
        return "/dev/xvda"
    try:
        images = client.describe_images(ImageIds=[image])["Images"]
    except Exception as exc:
        raise as_error(exc, f"looking up image {image}") from None
    if not images:
        raise ConfigError(f"image {image} does not exist in this region", hint="check resources.options.image_id")
    return str(images[0].get("RootDeviceName") or "/dev/xvda")
