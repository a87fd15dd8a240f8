from __future__ import annotations

from pathlib import Path

import pytest

from conftest import read_outputs
from gpuline import gha
from gpuline.errors import Location


def test_outputs_use_a_random_delimiter_and_survive_newlines(actions_env: dict[str, Path]) -> None:
    gha.set_output("plain", "v1")
    gha.set_output("multi", "line one\nline two\nEOF")
    text = actions_env["GITHUB_OUTPUT"].read_text()
    assert "ghadelimiter_" in text
    assert read_outputs(actions_env["GITHUB_OUTPUT"]) == {"plain": "v1", "multi": "line one\nline two\nEOF"}
    delimiters = {line.partition("<<")[2] for line in text.splitlines() if "<<" in line}
    assert len(delimiters) == 2  # a fresh delimiter per value


def test_outputs_outside_actions_are_silently_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GITHUB_OUTPUT", raising=False)
    gha.set_output("x", "y")  # must not raise


def test_export_env_writes_env_file(actions_env: dict[str, Path]) -> None:
    gha.export_env("GPULINE_RUN_ID", "run-1")
    assert read_outputs(actions_env["GITHUB_ENV"]) == {"GPULINE_RUN_ID": "run-1"}


def test_mask_each_line(actions_env: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    gha.mask("s3cr3t\nsecond")
    assert capsys.readouterr().out.splitlines() == ["::add-mask::s3cr3t", "::add-mask::second"]


def test_mask_is_silent_outside_actions(capsys: pytest.CaptureFixture[str]) -> None:
    gha.mask("s3cr3t")
    assert "s3cr3t" not in capsys.readouterr().out


def test_annotation_escapes_properties_and_data(
    actions_env: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    gha.annotate("error", "bad: 100%\nnext", title="a, b", location=Location("dir/gpuline.yml", line=7))
    out = capsys.readouterr().out.strip()
    assert out == "::error file=dir/gpuline.yml,line=7,title=a%2C b::bad: 100%25%0Anext"


def test_annotation_outside_actions_is_plain(capsys: pytest.CaptureFixture[str]) -> None:
    gha.annotate("warning", "careful")
    assert capsys.readouterr().err.strip() == "warning: careful"


def test_summary_appends_markdown(actions_env: dict[str, Path]) -> None:
    gha.append_summary("# one")
    gha.append_summary("two")
    assert actions_env["GITHUB_STEP_SUMMARY"].read_text() == "# one\n\ntwo\n\n"


def test_groups_in_actions_and_json_mode_goes_to_stderr(
    actions_env: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    with gha.group("step"):
        gha.info("inside")
    assert capsys.readouterr().out.splitlines() == ["::group::step", "inside", "::endgroup::"]
    gha.set_json_mode(True)
    try:
        gha.info("human")
        captured = capsys.readouterr()
        assert captured.out == "" and "human" in captured.err
    finally:
        gha.set_json_mode(False)


def test_annotation_paths_are_relative_to_the_workspace(
    actions_env: dict[str, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GITHUB_WORKSPACE", str(tmp_path))
    gha.annotate("error", "x", location=Location(tmp_path / "ml" / "gpuline.yml", line=3))
    gha.annotate("error", "y", location=Location("/elsewhere/gpuline.yml", line=4))
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("::error file=ml/gpuline.yml,line=3")
    assert out[1].startswith("::error file=/elsewhere/gpuline.yml,line=4")
