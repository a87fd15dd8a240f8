"""The objects the kubernetes provider creates, read back: instance ids, ownership, times, pod order."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from gpuline.providers.base import TAG_MANAGED
from gpuline.providers.k8s_manifests import label_key, object_name


def raw_json(response: Any) -> dict[str, Any]:
    # Custom objects are read raw: the client's generic "object" decoding is not reliable across versions.
    body = json.loads(response.data or b"{}")
    return body if isinstance(body, dict) else {}


def is_ours(obj: dict[str, Any]) -> bool:
    labels = obj.get("metadata", {}).get("labels") or {}
    return bool(labels.get(label_key(TAG_MANAGED)) == "true")


def launched_at(meta: dict[str, Any], annotations: dict[str, str]) -> datetime | None:
    return parse_time(annotations.get(label_key("created-at")) or meta.get("creationTimestamp"))


def parse_time(raw: Any) -> datetime | None:
    """A Kubernetes timestamp (RFC 3339 text, or a datetime from the client); None when absent or unreadable."""
    if isinstance(raw, datetime):
        return raw
    if not raw:
        return None
    try:
        return datetime.fromisoformat(str(raw).replace("Z", "+00:00"))
    except ValueError:
        return None


def owner_reference(obj: dict[str, Any]) -> dict[str, Any] | None:
    meta = obj.get("metadata", {})
    if not meta.get("uid"):
        return None  # an owner reference needs the owner's uid; without it, release() deletes by name
    return {
        "apiVersion": obj.get("apiVersion", "batch/v1"),
        "kind": obj.get("kind", "Job"),
        "name": meta["name"],
        "uid": meta["uid"],
        "blockOwnerDeletion": False,
    }


def job_id(namespace: str, lease_id: str) -> str:
    """The instance id a lease's Job gets (for tests and tools that know only the lease)."""
    return f"job/{namespace}/{object_name(lease_id)}"
