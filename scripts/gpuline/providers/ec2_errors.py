"""What an EC2 error means: a refusal failover can route around (capacity, quota, throttling), a
mistake in the request (a ConfigError), or an infrastructure failure."""

from __future__ import annotations

from gpuline.adaptors import aws
from gpuline.errors import ConfigError, GpulineError
from gpuline.providers.failover import Refusal

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
NOT_FOUND_CODES = frozenset({"InvalidInstanceID.NotFound", "InvalidInstanceID.Malformed"})
_REQUEST_MISTAKES = ("InvalidAMIID", "InvalidParameter", "InvalidSubnet", "InvalidGroup", "InvalidKeyPair")
_PERMISSIONS_HINT = "the role needs the ec2 permissions listed in the README's providers page (docs/providers.md)"


def classify(exc: Exception) -> Refusal | None:
    """A refusal failover can act on, or None for anything it cannot fix by trying elsewhere."""
    code = aws.error_code(exc)
    message = aws.error_message(exc) if code else str(exc)
    if code in CAPACITY_CODES:
        return Refusal("capacity", code, message)
    if code in QUOTA_CODES:
        return Refusal("quota", code, message)
    if code in THROTTLING_CODES:
        return Refusal("throttling", code, message)
    return None


def as_error(exc: Exception, doing: str) -> GpulineError:
    """A boto3/botocore failure as one of our errors, saying what to change."""
    code = aws.error_code(exc)
    if code.startswith(_REQUEST_MISTAKES):
        return ConfigError(
            f"{doing}: {code}: {aws.error_message(exc)}", hint="check resources.options and resources.image"
        )
    if code.startswith("InvalidInstanceType"):
        return ConfigError(f"{doing}: {code}", hint="check resources.instance_type / resources.options.instance_types")
    return aws.translate(exc, doing, permissions_hint=_PERMISSIONS_HINT)
