"""The framework-free checkpoint core: atomic commits, verification, newest-valid selection, pruning."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import pytest

from gpuline.training import checkpoints
from gpuline.training.checkpoints import MANIFEST, commit_checkpoint, newest_valid, prune, verify


def _commit(root: Path, step: int, payload: bytes = b"weights", run_id: str = "run-1") -> Path:
    def write(tmp: Path) -> None:
        (tmp / "model.bin").write_bytes(payload + str(step).encode())
        (tmp / "sub").mkdir()
        (tmp / "sub" / "state.json").write_text(json.dumps({"step": step}))

    return commit_checkpoint(root, step, run_id=run_id, writer=write)


def test_commit_writes_manifest_with_hashes_and_sizes(tmp_path: Path) -> None:
    path = _commit(tmp_path, 100)
    assert path.name == "step-00000100"
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["format"] == 1
    assert manifest["run_id"] == "run-1"
    assert manifest["step"] == 100
    assert set(manifest["files"]) == {"model.bin", "sub/state.json"}
    entry = manifest["files"]["model.bin"]
    assert entry["size"] == len(b"weights100")
    assert entry["sha256"] == checkpoints.sha256_file(path / "model.bin")
    assert "created_at" in manifest and isinstance(manifest["wall_time"], float)
    assert verify(path).ok


def test_commit_copies_given_files(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"abc")
    path = commit_checkpoint(tmp_path / "ckpt", 5, run_id="r", files={"a/b.bin": src})
    assert (path / "a" / "b.bin").read_bytes() == b"abc"
    assert verify(path).ok


def test_writer_may_supply_known_hashes(tmp_path: Path) -> None:
    def write(tmp: Path) -> Mapping[str, str]:
        (tmp / "x").write_bytes(b"x")
        return {"x": "0" * 64}  # trusted as given: the writer hashed while writing

    path = commit_checkpoint(tmp_path, 1, run_id="r", writer=write)
    assert checkpoints.read_manifest(path)["files"]["x"]["sha256"] == "0" * 64


def test_failing_writer_leaves_nothing_behind(tmp_path: Path) -> None:
    def write(tmp: Path) -> None:
        (tmp / "half").write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        commit_checkpoint(tmp_path, 7, run_id="r", writer=write)
    assert list(tmp_path.iterdir()) == []


def test_commit_needs_files_or_writer(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="files or a writer"):
        commit_checkpoint(tmp_path, 1, run_id="r")


def test_recommitting_a_step_replaces_it(tmp_path: Path) -> None:
    _commit(tmp_path, 3, b"old")
    path = _commit(tmp_path, 3, b"new")
    assert (path / "model.bin").read_bytes() == b"new3"
    assert verify(path).ok


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda p: (p / MANIFEST).unlink(), "incomplete: no manifest.json"),
        (lambda p: (p / MANIFEST).write_text("{not json"), "unreadable manifest"),
        (lambda p: (p / "model.bin").unlink(), "missing file model.bin"),
        (lambda p: (p / "model.bin").write_bytes(b"w"), "model.bin is 1 bytes, manifest says 8"),
        (lambda p: (p / "model.bin").write_bytes(b"weights2"), "sha256 mismatch for model.bin"),
    ],
)
def test_verify_names_what_is_wrong(tmp_path: Path, damage: object, reason: str) -> None:
    path = _commit(tmp_path, 1, b"weights")
    assert callable(damage)
    damage(path)
    result = verify(path)
    assert not result.ok
    assert reason in result.reason


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        ({"format": 2}, "format 2 is not 1"),
        ({"step": 5}, "manifest says step 5 but the directory is step 1"),
        ({"step": "1"}, "no integer step"),
        ({"files": []}, "no files table"),
        ({"files": {"../x": {"sha256": "a", "size": 1}}}, "points outside"),
        ({"files": {"x": {"size": 1}}}, "has no sha256"),
        ({"files": {"x": {"sha256": "a"}}}, "has no size"),
    ],
)
def test_verify_rejects_malformed_manifests(tmp_path: Path, edit: dict[str, object], reason: str) -> None:
    path = _commit(tmp_path, 1)
    manifest = checkpoints.read_manifest(path)
    manifest.update(edit)
    (path / MANIFEST).write_text(json.dumps(manifest))
    result = verify(path)
    assert not result.ok
    assert reason in result.reason


def test_newest_valid_skips_corrupt_and_says_why(tmp_path: Path) -> None:
    _commit(tmp_path, 100)
    _commit(tmp_path, 200)
    newest = _commit(tmp_path, 300)
    (newest / "model.bin").write_bytes(b"x")
    (tmp_path / "step-00000400").mkdir()  # a script's checkpoint in progress
    path, skipped = newest_valid(tmp_path)
    assert path == tmp_path / "step-00000200"
    assert [(s.step, s.reason) for s in skipped] == [
        (400, "incomplete: no manifest.json"),
        (300, "model.bin is 1 bytes, manifest says 10"),
    ]


def test_newest_valid_of_nothing(tmp_path: Path) -> None:
    assert newest_valid(tmp_path / "missing") == (None, [])
    bad = _commit(tmp_path, 1)
    (bad / MANIFEST).unlink()
    path, skipped = newest_valid(tmp_path)
    assert path is None and len(skipped) == 1


def test_temporaries_are_not_checkpoints(tmp_path: Path) -> None:
    (tmp_path / ".tmp-step-00000009-abcd").mkdir()
    assert checkpoints.step_dirs(tmp_path) == []
    assert checkpoints.clean_temporaries(tmp_path) == [tmp_path / ".tmp-step-00000009-abcd"]
    assert list(tmp_path.iterdir()) == []


def test_prune_keeps_newest_complete_and_leaves_incomplete(tmp_path: Path) -> None:
    for step in (1, 2, 3, 4):
        _commit(tmp_path, step)
    (tmp_path / "step-00000005").mkdir()
    deleted = prune(tmp_path, 2)
    assert [p.name for p in deleted] == ["step-00000001", "step-00000002"]
    assert [s for s, _ in checkpoints.step_dirs(tmp_path)] == [3, 4, 5]


def test_prune_respects_protected(tmp_path: Path) -> None:
    first = _commit(tmp_path, 1)
    _commit(tmp_path, 2)
    assert prune(tmp_path, 1, protect=[first]) == []
    with pytest.raises(ValueError):
        prune(tmp_path, 0)


def test_adopt_commits_a_manifest_for_a_plain_step_dir(tmp_path: Path) -> None:
    plain = tmp_path / "step-00000042"
    plain.mkdir()
    (plain / "weights.npy").write_bytes(b"123")
    assert not verify(plain).ok
    checkpoints.adopt(plain, run_id="r")
    result = verify(plain)
    assert result.ok and result.step == 42
    with pytest.raises(ValueError):
        checkpoints.adopt(tmp_path, run_id="r")
