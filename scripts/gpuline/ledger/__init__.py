"""Ledger backends, chosen by URI scheme: ``sqlite:///path`` (default), ``dynamodb://table``, ``s3://bucket/prefix``."""

from __future__ import annotations

from pathlib import Path

from gpuline.errors import InputError
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


def open_ledger(uri: str, base_dir: Path) -> Ledger:
    scheme, sep, _ = uri.partition("://")
    if not sep:
        raise InputError(
            f"ledger URI {uri!r} has no scheme",
            hint="use sqlite:///.gpuline/ledger.db, dynamodb://TABLE or s3://BUCKET/PREFIX",
        )
    factory = BACKENDS.load(scheme)
    ledger: Ledger = factory(uri, base_dir)
    return ledger
