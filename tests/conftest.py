"""Shared fixtures: Actions file-command files, a minimal project on disk, and the real local servers."""

from __future__ import annotations

import hashlib
import os
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

# Real servers (moto, the instance-metadata server) started once per test run live in servers.py;
# registering it here makes its fixtures available to every test module.
pytest_plugins = ["servers", "github_fake", "fixtures_k8s", "fixtures_rest"]


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees the developer's or CI's own Actions/gpuline environment."""
    for name in list(os.environ):
        if name.startswith(("GPULINE_", "GITHUB_", "INPUT_")) or name == "ACT":
            monkeypatch.delenv(name, raising=False)


@pytest.fixture
def actions_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Pretend to run inside GitHub Actions: file commands go to temp files the test can read."""
    files = {name: tmp_path / f"{name.lower()}.txt" for name in ("GITHUB_OUTPUT", "GITHUB_ENV", "GITHUB_STEP_SUMMARY")}
    for name, path in files.items():
        path.write_text("")
        monkeypatch.setenv(name, str(path))
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    return files


def read_outputs(path: Path) -> dict[str, str]:
    """Parse a GITHUB_OUTPUT file written with heredoc delimiters."""
    out: dict[str, str] = {}
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        key, _, delim = lines[i].partition("<<")
        value: list[str] = []
        i += 1
        while lines[i] != delim:
            value.append(lines[i])
            i += 1
        out[key] = "\n".join(value)
        i += 1
    return out


TINY_TRAIN = '''
"""A tiny pure-Python trainer that honours the gpuline contract (no torch), for fast pipeline tests."""
import json, os, pathlib, sys


def main() -> None:
    metrics = pathlib.Path(os.environ["GPULINE_METRICS_PATH"])
    w, target = 0.0, 3.0
    if os.environ.get("GPULINE_SMOKE") == "1":
        with metrics.open("a") as fh:
            for step in range(20):
                w += 0.2 * (target - w)
                fh.write(json.dumps({"step": step, "loss": (target - w) ** 2}) + "\\n")
        sys.exit(0)


if __name__ == "__main__":
    main()
'''


def write_project(root: Path, *, spec_extra: str = "", policy: str | None = None, train_py: str | None = None) -> Path:
    """A complete gpuline project in ``root``; returns the path of its gpuline.yml."""
    root.mkdir(parents=True, exist_ok=True)
    data = root / "data.bin"
    data.write_bytes(b"0123456789" * 100)
    digest = hashlib.sha256(data.read_bytes()).hexdigest()
    (root / "train.py").write_text(train_py if train_py is not None else TINY_TRAIN)
    config = root / "gpuline.yml"
    config.write_text(
        textwrap.dedent(f"""\
        version: 1
        model:
          name: tiny
          owner: team@example.com
          team: vision
          intended_use: tests
        dataset:
          uri: data.bin
          sha256: {digest}
        entrypoint:
          command: [python, train.py]
        hyperparameters:
          steps: 10
        resources:
          provider: local
          gpu_type: cpu
          max_duration: 10m
        """)
        + spec_extra
    )
    if policy is not None:
        (root / "policy.yml").write_text(textwrap.dedent(policy))
    return config


@pytest.fixture
def project(tmp_path: Path) -> Iterator[Path]:
    yield write_project(tmp_path / "proj")
