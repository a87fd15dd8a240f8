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
