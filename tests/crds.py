"""The published CRD schemas shipped in tests/data/crds, applied as strictly as an API server would."""

from __future__ import annotations

from typing import Any


def closed(schema: Any) -> Any:
    """The schema as the API server applies it: a field it does not know is pruned (dropped without a
    word), so here it is an error; only ``x-kubernetes-preserve-unknown-fields`` keeps one open."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out
