"""The columns of a csv or jsonl dataset, from its header and a bounded sample of its rows.

Preflight checks ``dataset.schema`` against these without loading the data: the csv header names the
columns, the first rows (at most :data:`SAMPLE_ROWS`, and :data:`SAMPLE_BYTES` of the file) give each
column's type and, for jsonl lists, the shape of one value. The number of rows is not counted, so a
column's first dimension is always -1 (any length).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SAMPLE_ROWS = 1000
SAMPLE_BYTES = 1 << 20


@dataclass
class Column:
    kinds: set[str] = field(default_factory=set)
    shapes: set[tuple[int, ...]] = field(default_factory=set)
    negative: bool = False

    def add(self, value: Any) -> None:
        if value is None:
            return  # a missing value says nothing about the column's type
        if isinstance(value, list):
            shape, leaves = _nested(value)
            self.shapes.add(shape)
            for leaf in leaves:
                self._kind(leaf)
            return
        self.shapes.add(())
        self._kind(value)

    def _kind(self, value: Any) -> None:
        if isinstance(value, bool):
            self.kinds.add("bool")
        elif isinstance(value, int):
            self.kinds.add("int64")
            self.negative = self.negative or value < 0
        elif isinstance(value, float):
            self.kinds.add("float64")
        elif isinstance(value, str):
            self.kinds.add("string")
        else:
            self.kinds.add("object")

    @property
    def dtype(self) -> str:
        """The narrowest type that reads every sampled value (``string`` when they do not agree)."""
        if not self.kinds:
            return "empty"
        if len(self.kinds) == 1:
            return next(iter(self.kinds))
        if self.kinds <= {"int64", "float64"}:
            return "float64"
        return "string"

    @property
    def shape(self) -> list[int]:
        """[-1] for one value per row, [-1, n, ...] for lists; a dimension that varies is -1."""
        if len(self.shapes) <= 1:
            inner = list(next(iter(self.shapes), ()))
        else:
            ranks = {len(s) for s in self.shapes}
            inner = [-1] * max(ranks)
        return [-1, *inner]


def _nested(value: list[Any]) -> tuple[tuple[int, ...], list[Any]]:
    """A nested list's shape (-1 where its rows differ) and its leaves."""
    if not value or not all(isinstance(v, list) for v in value):
        return (len(value),), [v for v in value if not isinstance(v, list)]
    shapes, leaves = set(), []
    for item in value:
        shape, found = _nested(item)
        shapes.add(shape)
        leaves += found
    inner = next(iter(shapes)) if len(shapes) == 1 else (-1,) * max(len(s) for s in shapes)
    return (len(value), *inner), leaves


def _head(path: Path) -> str:
    """The file's first :data:`SAMPLE_BYTES`, cut at the last whole line when there is more."""
    with path.open("rb") as fh:
        data = fh.read(SAMPLE_BYTES + 1)
    if len(data) > SAMPLE_BYTES:
        data = data[: data.rfind(b"\n", 0, SAMPLE_BYTES) + 1]
    return data.decode("utf-8", errors="replace")


def _csv_value(text: str) -> Any:
    if text == "":
        return None
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            continue
    return text


def csv_columns(path: Path) -> dict[str, Column]:
    """The header's columns, typed from the sampled rows; ValueError when there is no header."""
    reader = csv.reader(io.StringIO(_head(path)))
    header = next(reader, None)
    if not header or any(not name.strip() for name in header):
        raise ValueError("its first line is not a header naming every column")
    columns = {name.strip(): Column() for name in header}
    names = list(columns)
    for number, row in enumerate(reader):
        if number >= SAMPLE_ROWS:
            break
        for name, text in zip(names, row, strict=False):
            columns[name].add(_csv_value(text.strip()))
    return columns


def jsonl_columns(path: Path) -> dict[str, Column]:
    """Every key of the sampled rows, typed from their values; ValueError on a row that is not an object."""
    columns: dict[str, Column] = {}
    lines = [line for line in _head(path).splitlines() if line.strip()][:SAMPLE_ROWS]
    for number, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
        except ValueError:
            raise ValueError(f"line {number} is not JSON") from None
        if not isinstance(row, dict):
            raise ValueError(f"line {number} is not a JSON object")
        for name, value in row.items():
            columns.setdefault(name, Column()).add(value)
    return columns


def accepts(want: str, column: Column) -> bool | None:
    """Whether a column of the sampled type is readable as ``want``; None when ``want`` is no dtype."""
    got = column.dtype
    if want in ("str", "string", "object"):
        return True
    if got == "empty":
        return True  # every sampled value was missing: nothing contradicts the schema
    if want == "bool":
        return got == "bool"
    if want.startswith(("int", "uint")) and want.removeprefix("u").removeprefix("int") in ("", "8", "16", "32", "64"):
        return got == "int64" and not (want.startswith("u") and column.negative)
    if want in ("float", "double", "float16", "float32", "float64"):
        return got in ("int64", "float64")  # whole numbers read as floats too
    return None
