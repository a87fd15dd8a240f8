"""docs/spec.md's field reference is generated from the JSON Schema: the real script's --check passes on
the repository and fails, with one line saying what to run, on a copy whose generated part was edited."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "spec_reference.py"
SPEC_DOC = ROOT / "docs" / "spec.md"
START, END = "<!-- generated:spec-reference -->", "<!-- /generated:spec-reference -->"


def check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--check", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_repository_reference_is_current() -> None:
    done = check()
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""


def test_an_edited_reference_fails_the_check(tmp_path: Path) -> None:
    text = SPEC_DOC.read_text(encoding="utf-8")
    start, end = text.index(START), text.index(END)
    generated = text[start:end]
    assert "| `max_duration` |" in generated and "| `capacity` |" in generated
    copy = tmp_path / "spec.md"
    copy.write_text(text[:start] + generated.replace("| `capacity` |", "| `capacity_x` |") + text[end:])
    done = check("--file", str(copy))
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [f"error: {copy} is stale: run python scripts/spec_reference.py"]
    # Text outside the markers is the hand-written part: editing it is not staleness.
    copy.write_text(text.replace(START, "Hand-written.\n\n" + START, 1))
    assert check("--file", str(copy)).returncode == 0


def test_a_document_without_markers_fails_the_check(tmp_path: Path) -> None:
    copy = tmp_path / "spec.md"
    copy.write_text("# no markers\n")
    done = check("--file", str(copy))
    assert done.returncode == 1
    assert "lacks the markers" in done.stderr
