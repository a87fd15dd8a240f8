"""Find the dataset, prove it is the one the spec names (sha256), and check its schema.

The npz check reads only the .npy headers inside the zip, so preflight needs neither numpy nor the
time to load the data; a csv or jsonl schema is checked against the header and a bounded sample of
rows (:mod:`gpuline.training.tabular`). A schema for a format gpuline cannot read (parquet, other)
is refused rather than passed unchecked.
"""

from __future__ import annotations

import ast
import errno
import hashlib
import os
import stat
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpuline.errors import ConfigError, InputError, Location
from gpuline.spec import ArraySchema, Spec
from gpuline.training import tabular

_NPY_DTYPES = {
    "f2": "float16",
    "f4": "float32",
    "f8": "float64",
    "i1": "int8",
    "i2": "int16",
    "i4": "int32",
    "i8": "int64",
    "u1": "uint8",
    "u2": "uint16",
    "u4": "uint32",
    "u8": "uint64",
    "b1": "bool",
}


@dataclass
class DatasetCheck:
    path: Path
    sha256: str
    size: int
    arrays: dict[str, dict[str, Any]]


LineOf = Callable[[tuple[int | str, ...]], int | None]


def sha256_file(path: Path) -> str:
    """The file's sha256; only a regular file, whose end is known, is read (never /dev/zero or a FIFO)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _where(config_path: Path, line_of: LineOf | None, *loc: str) -> Location:
    return Location(config_path, line=line_of(loc) if line_of else None, field=".".join(loc))


def _kind(path: Path) -> str:
    mode = path.stat().st_mode
    if stat.S_ISDIR(mode):
        return "a directory"
    return "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file"


def resolve(
    spec: Spec, project_dir: Path, config_path: Path, workdir: Path | None = None, line_of: LineOf | None = None
) -> Path:
    """A local path for the dataset, a regular file; remote URIs are fetched into ``workdir`` first."""
    uri = spec.dataset.uri
    if uri.startswith("s3://"):
        if workdir is None:
            raise InputError("an s3:// dataset needs a work directory to download into")
        from gpuline.storage import open_storage

        bucket_and_key = uri.removeprefix("s3://")
        bucket, _, key = bucket_and_key.partition("/")
        target = workdir / "dataset" / Path(key).name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            open_storage(f"s3://{bucket}", project_dir).get_file(key, target)
        return target
    rest = uri.removeprefix("file://")
    path = Path(rest) if Path(rest).is_absolute() else project_dir / rest
    if not path.exists():
        raise ConfigError(
            f"dataset not found at {path}",
            location=_where(config_path, line_of, "dataset", "uri"),
            hint="fix dataset.uri (paths are relative to gpuline.yml) or create the file",
        )
    if not path.is_file():
        # A folder fails to open, and a device such as /dev/zero never ends: hashing it hangs the run.
        raise ConfigError(
            f"the dataset {path} is {_kind(path)}",
            location=_where(config_path, line_of, "dataset", "uri"),
            hint="point dataset.uri at the dataset file itself (one regular file; pack a folder into one)",
        )
    return path


def check(spec: Spec, path: Path, config_path: Path, line_of: LineOf | None = None) -> DatasetCheck:
    try:
        actual = sha256_file(path)
        size = path.stat().st_size
    except OSError as exc:
        raise ConfigError(
            f"cannot read the dataset {path.name}: {exc.strerror or exc}",
            location=_where(config_path, line_of, "dataset", "uri"),
            hint="make the dataset a readable regular file (check its permissions)",
        ) from None
    if actual != spec.dataset.sha256:
        raise ConfigError(
            f"dataset hash mismatch: {path.name} has sha256 {actual}, the spec expects {spec.dataset.sha256}",
            location=Location(
                config_path, line=line_of(("dataset", "sha256")) if line_of else None, field="dataset.sha256"
            ),
            hint="if the data changed on purpose, put the new hash in dataset.sha256; otherwise restore the file",
        )
    arrays: dict[str, dict[str, Any]] = {}
    if spec.dataset.format == "npz":
        arrays = npz_arrays(path)
        _check_schema(spec, arrays, config_path, line_of)
    elif spec.dataset.schema_:
        arrays = _check_columns(spec, path, config_path, line_of)
    return DatasetCheck(path=path, sha256=actual, size=size, arrays=arrays)


def npz_arrays(path: Path) -> dict[str, dict[str, Any]]:
    """{name: {"dtype", "shape"}} for each array of an .npz, from the .npy headers alone."""
    out: dict[str, dict[str, Any]] = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for name in zf.namelist():
                if not name.endswith(".npy"):
                    continue
                with zf.open(name) as fh:
                    out[name.removesuffix(".npy")] = _npy_header(fh.read(4096))
    except (zipfile.BadZipFile, OSError, EOFError, RuntimeError, NotImplementedError) as exc:
        # zipfile's ways to refuse an archive: corrupt, truncated, encrypted, an unknown compression.
        raise InputError(f"{path.name} is not a readable .npz file: {exc}", hint="regenerate the dataset") from None
    except (ValueError, SyntaxError, KeyError, IndexError, TypeError, struct.error) as exc:
        # A .npy header that does not parse, whatever the parser tripped on.
        raise InputError(
            f"{path.name} is not a readable .npz file: {exc or type(exc).__name__}", hint="regenerate the dataset"
        ) from None
    return out


def _npy_header(head: bytes) -> dict[str, Any]:
    if head[:6] != b"\x93NUMPY":
        raise ValueError("missing .npy magic")
    major = head[6]
    if major == 1:
        (length,) = struct.unpack("<H", head[8:10])
        start = 10
    else:
        (length,) = struct.unpack("<I", head[8:12])
        start = 12
    header = ast.literal_eval(head[start : start + length].decode("latin1"))
    descr = str(header["descr"]).lstrip("<>|=")
    return {"dtype": _NPY_DTYPES.get(descr, descr), "shape": list(header["shape"])}


def _check_schema(spec: Spec, arrays: dict[str, dict[str, Any]], config_path: Path, line_of: Any) -> None:
    expected = spec.dataset.schema_ or {}
    for name, want in expected.items():
        field = f"dataset.schema.{name}"
        line = line_of(("dataset", "schema", name)) if line_of else None
        got = arrays.get(name)
        if got is None:
            raise ConfigError(
                f"the dataset has no array {name!r} (it has {', '.join(sorted(arrays)) or 'none'})",
                location=Location(config_path, line=line, field=field),
                hint="fix the schema or the dataset",
            )
        shape_ok = len(want.shape) == len(got["shape"]) and all(
            w in (-1, g) for w, g in zip(want.shape, got["shape"], strict=True)
        )
        if got["dtype"] != want.dtype or not shape_ok:
            raise ConfigError(
                f"array {name!r} is {got['dtype']}{got['shape']}, the schema expects {want.dtype}{want.shape}",
                location=Location(config_path, line=line, field=field),
                hint="fix the schema or the dataset",
            )


_COLUMNS: dict[str, Callable[[Path], dict[str, tabular.Column]]] = {
    "csv": tabular.csv_columns,
    "jsonl": tabular.jsonl_columns,
}


def _check_columns(spec: Spec, path: Path, config_path: Path, line_of: LineOf | None) -> dict[str, dict[str, Any]]:
    """The schema's columns as sampled, when each matches; a ConfigError at the first that does not."""
    fmt = spec.dataset.format
    read = _COLUMNS.get(fmt)
    if read is None:
        raise ConfigError(
            f"dataset.schema cannot be checked for a {fmt} dataset (gpuline reads npz, csv and jsonl)",
            location=_where(config_path, line_of, "dataset", "schema"),
            hint="remove dataset.schema, or set dataset.format to the npz, csv or jsonl the file is",
        )
    try:
        columns = read(path)
    except (ValueError, OSError) as exc:
        raise InputError(f"{path.name} is not a readable {fmt} file: {exc}", hint="regenerate the dataset") from None
    found: dict[str, dict[str, Any]] = {}
    for name, want in (spec.dataset.schema_ or {}).items():
        column = columns.get(name)
        where = _where(config_path, line_of, "dataset", "schema", name)
        if column is None:
            shown = ", ".join(sorted(columns)[:20]) or "none"
            raise ConfigError(
                f"the dataset has no column {name!r} (it has {shown})",
                location=where,
                hint="fix the schema or the dataset",
            )
        _check_column(fmt, name, want, column, where)
        found[name] = {"dtype": column.dtype, "shape": column.shape}
    return found


def _check_column(fmt: str, name: str, want: ArraySchema, column: tabular.Column, where: Location) -> None:
    readable = tabular.accepts(want.dtype, column)
    if readable is None:
        raise ConfigError(
            f"{want.dtype!r} is not a column type gpuline can check",
            location=where,
            hint="use bool, int8 to int64, uint8 to uint64, float16 to float64, or string",
        )
    if want.shape[:1] != [-1]:
        raise ConfigError(
            f"the rows of a {fmt} dataset are not counted (only a sample is read), "
            f"so the first dimension of {name!r} must be -1",
            location=where,
            hint=f"write shape: {[-1, *want.shape[1:]]}",
        )
    got = column.shape
    shape_ok = len(want.shape) == len(got) and all(w in (-1, g) for w, g in zip(want.shape, got, strict=True))
    if not readable or not shape_ok:
        raise ConfigError(
            f"column {name!r} is {column.dtype}{got} in the first rows, the schema expects {want.dtype}{want.shape}",
            location=where,
            hint="fix the schema or the dataset",
        )
