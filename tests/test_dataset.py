from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import write_project
from gpuline.errors import ConfigError, InputError
from gpuline.spec import load_spec
from gpuline.training import dataset


def npz_project(tmp_path: Path, schema: str) -> Path:
    config = write_project(tmp_path / "p")
    data = config.parent / "d.npz"
    np.savez(data, x=np.zeros((10, 64), dtype=np.float32), y=np.zeros(10, dtype=np.int64))
    digest = dataset.sha256_file(data)
    text = config.read_text()
    old_sha = text.split("sha256: ")[1].split()[0]
    config.write_text(
        text.replace("uri: data.bin", "uri: d.npz")
        .replace(old_sha, digest)
        .replace(f"sha256: {digest}", f"sha256: {digest}\n  format: npz\n  schema:\n{schema}")
    )
    return config


def test_npz_headers_are_read_without_loading(tmp_path: Path) -> None:
    config = npz_project(tmp_path, "    x: {dtype: float32, shape: [-1, 64]}\n")
    spec = load_spec(config)
    found = dataset.check(spec, dataset.resolve(spec, config.parent, config), config)
    assert found.arrays == {"x": {"dtype": "float32", "shape": [10, 64]}, "y": {"dtype": "int64", "shape": [10]}}


def test_schema_mismatch_names_the_array(tmp_path: Path) -> None:
    config = npz_project(tmp_path, "    x: {dtype: float32, shape: [-1, 32]}\n")
    spec = load_spec(config)
    with pytest.raises(ConfigError) as err:
        dataset.check(spec, dataset.resolve(spec, config.parent, config), config)
    assert err.value.location is not None and err.value.location.field == "dataset.schema.x"
    assert "float32[10, 64]" in err.value.message


def test_missing_array(tmp_path: Path) -> None:
    config = npz_project(tmp_path, "    labels: {dtype: int64, shape: [-1]}\n")
    spec = load_spec(config)
    with pytest.raises(ConfigError, match="no array 'labels'"):
        dataset.check(spec, dataset.resolve(spec, config.parent, config), config)


def test_hash_mismatch_names_the_line(project: Path) -> None:
    (project.parent / "data.bin").write_bytes(b"changed")
    spec = load_spec(project)
    with pytest.raises(ConfigError) as err:
        dataset.check(spec, dataset.resolve(spec, project.parent, project), project, lambda loc: 9)
    assert err.value.location is not None and err.value.location.line == 9
    assert "dataset.sha256" in err.value.one_line()


def test_missing_dataset(project: Path) -> None:
    (project.parent / "data.bin").unlink()
    with pytest.raises(ConfigError, match="dataset not found"):
        dataset.resolve(load_spec(project), project.parent, project)


def test_unreadable_npz(tmp_path: Path) -> None:
    bad = tmp_path / "x.npz"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("x.npy", b"not an npy header")
    bad.write_bytes(buf.getvalue())
    with pytest.raises(InputError, match=r"not a readable \.npz"):
        dataset.npz_arrays(bad)
    bad.write_bytes(b"not a zip")
    with pytest.raises(InputError):
        dataset.npz_arrays(bad)


# ---------------------------------------------------------------- csv, jsonl and formats gpuline cannot read

CSV = "pixels,label,weight,name\n1,3,0.5,a\n2,4,1,b\n"
JSONL = '{"x": [[1, 2], [3, 4]], "y": 3, "ok": true}\n{"x": [[5, 6], [7, 8.5]], "y": 4, "ok": false}\n'


def table_project(tmp_path: Path, fmt: str, body: str, schema: str) -> Path:
    config = write_project(tmp_path / "p")
    data = config.parent / f"d.{fmt}"
    data.write_text(body)
    digest = dataset.sha256_file(data)
    text = config.read_text()
    old_sha = text.split("sha256: ")[1].split()[0]
    config.write_text(
        text.replace("uri: data.bin", f"uri: d.{fmt}")
        .replace(old_sha, digest)
        .replace(f"sha256: {digest}", f"sha256: {digest}\n  format: {fmt}\n  schema:\n{schema}")
    )
    return config


def checked(config: Path) -> dataset.DatasetCheck:
    spec = load_spec(config)
    return dataset.check(spec, dataset.resolve(spec, config.parent, config), config)


def test_a_csv_schema_is_checked_against_the_header_and_the_first_rows(tmp_path: Path) -> None:
    schema = "    label: {dtype: int64, shape: [-1]}\n    weight: {dtype: float32, shape: [-1]}\n"
    found = checked(table_project(tmp_path / "ok", "csv", CSV, schema))
    assert found.arrays == {"label": {"dtype": "int64", "shape": [-1]}, "weight": {"dtype": "float64", "shape": [-1]}}
    cases = {
        "    name: {dtype: float32, shape: [-1]}\n": "column 'name' is string[-1] in the first rows",
        "    weight: {dtype: int64, shape: [-1]}\n": "column 'weight' is float64[-1]",
        "    colour: {dtype: int64, shape: [-1]}\n": "no column 'colour' (it has label, name, pixels, weight)",
        "    label: {dtype: int64, shape: [2]}\n": "first dimension of 'label' must be -1",
        "    label: {dtype: complex, shape: [-1]}\n": "'complex' is not a column type",
    }
    for i, (bad, message) in enumerate(cases.items()):
        with pytest.raises(ConfigError) as err:
            checked(table_project(tmp_path / f"bad{i}", "csv", CSV, bad))
        assert message in err.value.message
        assert err.value.location is not None and (err.value.location.field or "").startswith("dataset.schema.")


def test_a_jsonl_schema_checks_types_and_the_shape_of_list_values(tmp_path: Path) -> None:
    schema = (
        "    x: {dtype: float32, shape: [-1, 2, 2]}\n"
        "    y: {dtype: uint8, shape: [-1]}\n"
        "    ok: {dtype: bool, shape: [-1]}\n"
    )
    found = checked(table_project(tmp_path / "ok", "jsonl", JSONL, schema))
    assert found.arrays["x"] == {"dtype": "float64", "shape": [-1, 2, 2]}
    with pytest.raises(ConfigError, match=r"column 'x' is float64\[-1, 2, 2\].*expects float32\[-1, 4\]"):
        checked(table_project(tmp_path / "shape", "jsonl", JSONL, "    x: {dtype: float32, shape: [-1, 4]}\n"))
    with pytest.raises(ConfigError, match="column 'ok' is bool"):
        checked(table_project(tmp_path / "type", "jsonl", JSONL, "    ok: {dtype: int64, shape: [-1]}\n"))
    with pytest.raises(InputError, match="line 2 is not a JSON object"):
        checked(table_project(tmp_path / "junk", "jsonl", '{"y": 1}\n[1]\n', "    y: {dtype: int64, shape: [-1]}\n"))


def test_only_a_bounded_sample_is_read(tmp_path: Path) -> None:
    # The rows after the sample would contradict the schema; they are not read, so it passes quickly.
    rows = "".join(f"{i}\n" for i in range(dataset.tabular.SAMPLE_ROWS)) + "not a number\n"
    config = table_project(tmp_path, "csv", "n\n" + rows, "    n: {dtype: int64, shape: [-1]}\n")
    assert checked(config).arrays == {"n": {"dtype": "int64", "shape": [-1]}}


@pytest.mark.parametrize("fmt", ["parquet", "other"])
def test_a_schema_for_a_format_gpuline_cannot_read_is_refused_not_ignored(tmp_path: Path, fmt: str) -> None:
    config = table_project(tmp_path, fmt, "PAR1 not really", "    x: {dtype: float32, shape: [-1]}\n")
    with pytest.raises(ConfigError, match=f"dataset.schema cannot be checked for a {fmt} dataset") as err:
        checked(config)
    assert err.value.location is not None and err.value.location.field == "dataset.schema"
    # Without a schema the same dataset is fine: only its hash is checked.
    config.write_text(config.read_text().replace("  schema:\n    x: {dtype: float32, shape: [-1]}\n", ""))
    assert checked(config).arrays == {}
