"""What a Kubernetes API error means, as one of gpuline's errors saying what to change."""

from __future__ import annotations

from gpuline.errors import ConfigError, GpulineError, InfraError


def status_of(exc: Exception) -> int | None:
    """The HTTP status the API server answered with, or None when it never answered."""
    status = getattr(exc, "status", None)
    return status if isinstance(status, int) else None


def as_error(exc: Exception, doing: str) -> GpulineError:
    """``exc`` (an ApiException, or a connection failure) as a gpuline error starting with ``doing``."""
    if isinstance(exc, GpulineError):
        return exc  # already ours (a configuration problem found on the way)
    status = status_of(exc)
    reason = getattr(exc, "reason", None) or type(exc).__name__
    if status in (401, 403):
        return InfraError(
            f"{doing}: the cluster refused ({status} {reason})",
            hint="the service account needs the RBAC rules in the README's providers page (docs/providers.md)",
        )
    if status == 404:
        return ConfigError(f"{doing}: not found ({reason})", hint="check resources.options.namespace exists")
    if status == 409:
        return InfraError(f"{doing}: it already exists", hint="a previous attempt created it; run `gpuline reap`")
    if status == 422:
        body = getattr(exc, "body", "") or ""
        return ConfigError(f"{doing}: the cluster rejected the manifest: {str(body)[:300]}", hint="check resources")
    if status is not None:
        return InfraError(f"{doing}: the cluster answered {status} {reason}", hint="retry; check the cluster's health")
    return InfraError(f"{doing}: {reason}: {exc}"[:400], hint="check the cluster is reachable (kubeconfig server)")
