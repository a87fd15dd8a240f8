"""A name -> implementation registry with aliases and lazy imports.

Providers, ledger, storage and registry backends are plug-ins: adding one is one module plus one line
in its table. Modules are imported only when chosen, so an SDK that is not installed (or slow to
import) costs nothing until it is actually needed.
"""

from __future__ import annotations

import importlib
from typing import Any

from gpuline.errors import InputError

# Which extra of the gpuline distribution brings an optional SDK.
_EXTRAS = {
    "boto3": "aws",
    "botocore": "aws",
    "github": "github",
    "kubernetes": "kubernetes",
    "torch": "train",
}


class Registry:
    def __init__(self, kind: str, entries: dict[str, str], aliases: dict[str, str] | None = None) -> None:
        self.kind = kind
        self.entries = dict(entries)
        self.aliases = dict(aliases or {})

    def knows(self, name: str) -> bool:
        """Whether ``name`` (or an alias of it) is an entry, for callers with their own error text."""
        key = name.strip().lower()
        return self.aliases.get(key, key) in self.entries

    def canonical(self, name: str) -> str:
        key = name.strip().lower()
        key = self.aliases.get(key, key)
        if key not in self.entries:
            valid = ", ".join(sorted(self.entries))
            raise InputError(f"{name!r} is not a valid {self.kind}", hint=f"valid choices are {valid}")
        return key

    def load(self, name: str) -> Any:
        target = self.entries[self.canonical(name)]
        module_name, _, attr = target.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            missing = exc.name or "a dependency"
            if missing.startswith("gpuline"):
                raise
            extra = _EXTRAS.get(missing.split(".")[0], "all")
            raise InputError(
                f"the {self.kind} {name!r} needs the Python package {missing!r}, which is not installed",
                hint=f"pip install 'gpuline[{extra}]'",
            ) from None
        return getattr(module, attr)

    def names(self) -> list[str]:
        return sorted(self.entries)
