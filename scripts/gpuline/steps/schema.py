"""schema: the JSON Schema of gpuline.yml or policy.yml, for editors and validators."""

from __future__ import annotations

import argparse
import json

from gpuline.context import Context
from gpuline.results import DataResult
from gpuline.spec import json_schema


def run(ctx: Context, args: argparse.Namespace) -> DataResult:
    schema = json_schema(policy=args.for_policy)
    return DataResult("schema", {"schema": schema}, text=json.dumps(schema, indent=2))
