"""schema: the JSON Schema of gpuline.yml or policy.yml, for editors and validators."""

from __future__ import annotations

import argparse
import json
from typing import Any

from gpuline.spec import json_schema


def run(args: argparse.Namespace) -> dict[str, Any]:
    schema = json_schema(policy=args.for_policy)
    if not args.json:
        print(json.dumps(schema, indent=2))
    return {"schema": schema}
