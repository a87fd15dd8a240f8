"""Ledger backends, chosen by URI scheme: ``sqlite:///path`` (default), ``dynamodb://table``, ``s3://bucket/prefix``."""

from __future__ import annotations

from pathlib import Path

from gpuline.errors import InputError, clip_repr
from gpuline.plugins import Registry
from gpuline.runs import Ledger

# scheme -> "module:factory"; each factory takes (uri, base_dir). Imported only when chosen, so the
# default path never loads boto3.
BACKENDS: Registry = Registry(
    "ledger backend",
    {
        "sqlite": "gpuline.ledger.sqlite:open_sqlite",
        "dynamodb": "gpuline.ledger.dynamodb:open_dynamodb",
        "s3": "gpuline.ledger.s3:open_s3",
    },
)


HINT = "use sqlite:///.gpuline/ledger.db, dynamodb://TABLE or s3://BUCKET/PREFIX"


def check_uri(uri: str) -> str:
    """The URI's scheme, when it names a ledger backend; an InputError otherwise (preflight calls this
    before the run record exists, so a bad URI never gets as far as a step that needs the ledger)."""
    scheme, sep, _ = uri.partition("://")
    if not sep:
        raise InputError(f"ledger URI {clip_repr(uri)} has no scheme", hint=HINT)
    if not BACKENDS.knows(scheme):
        raise InputError(
            f"ledger URI {clip_repr(uri)}: {clip_repr(scheme)} is not a valid {BACKENDS.kind}",
            hint=f"valid choices are {', '.join(BACKENDS.names())}",
        )
    return scheme


def open_ledger(uri: str, base_dir: Path) -> Ledger:
    factory = BACKENDS.load(check_uri(uri))
    ledger: Ledger = factory(uri, base_dir)
    return ledger
