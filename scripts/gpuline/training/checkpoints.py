"""Framework-free checkpoints: a directory of files plus a manifest that makes it complete.

A checkpoint is ``step-00000100/`` holding any files and ``manifest.json``::

    {"format": 1, "run_id": ..., "step": 100, "wall_time": ..., "created_at": ...,
     "files": {"model.pt": {"sha256": ..., "size": ...}, ...}}

The manifest is the commit record: a directory without a valid one is never complete, whatever else it
holds. Committing writes under a temporary name, fsyncs every file, writes the manifest last, renames
the directory into place and fsyncs the parent, so a crash at any instant leaves either the old state
or a complete new checkpoint, never something in between that looks finished.

While a commit is under way its writer holds an exclusive ``flock`` on the temporary directory, from
before the first file appears until after the rename. An uploader that streams the files out while
they are written learns the outcome from that and from the rename alone
(:mod:`gpuline.training.commit_watch`): the directory became ``step-N`` with its manifest, or the lock
was let go without it (the writer died or gave up: a lock dies with its process, even on SIGKILL). A
pause in growth means nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

FORMAT = 1
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d{8,})$")
_TMP_PREFIX = ".tmp-"
_HASH_CHUNK = 8 * 1024 * 1024

# A writer fills the temporary directory and may return the sha256 of files it already hashed while
# writing them, which saves reading a large file a second time.
Writer = Callable[[Path], object]


@dataclass(frozen=True)
class CheckpointInfo:
    """A durable checkpoint as the run record lists it."""

    uri: str
    step: int
    sha256: str  # of the manifest bytes, which pins every file through their hashes


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    path: Path
    step: int | None
    reason: str = ""
    manifest: dict[str, Any] | None = None


@dataclass(frozen=True)
class Skipped:
    path: Path
    step: int | None
    reason: str


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def parse_step(name: str) -> int | None:
    match = _STEP_DIR.match(name)
    return int(match.group(1)) if match else None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_sha256(checkpoint: Path) -> str:
    return hashlib.sha256((checkpoint / MANIFEST).read_bytes()).hexdigest()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files_under(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def build_manifest(
    root: Path,
    *,
    run_id: str,
    step: int,
    wall_time: float | None = None,
    known_sha256: Mapping[str, str] | None = None,
    fsync: bool = True,
) -> dict[str, Any]:
    """Hash (or take the known hash of) and fsync every file under ``root``."""
    known = dict(known_sha256 or {})
    files: dict[str, dict[str, Any]] = {}
    for rel in _files_under(root):
        path = root / rel
        if fsync:
            _fsync_file(path)
        files[rel] = {"sha256": known.get(rel) or sha256_file(path), "size": path.stat().st_size}
    return {
        "format": FORMAT,
        "run_id": run_id,
        "step": step,
        "wall_time": time.time() if wall_time is None else wall_time,
        "created_at": datetime.now(UTC).isoformat(),
        "files": files,
    }


def write_manifest(root: Path, manifest: Mapping[str, Any]) -> None:
    """Write the manifest atomically (temp file, fsync, rename, fsync dir): the last act of a commit."""
    tmp = root / f"{_TMP_PREFIX}{MANIFEST}.{secrets.token_hex(4)}"
    with tmp.open("w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, root / MANIFEST)
    fsync_dir(root)


def commit_checkpoint(
    checkpoint_dir: Path,
    step: int,
    *,
    run_id: str,
    files: Mapping[str, Path] | None = None,
    writer: Writer | None = None,
    wall_time: float | None = None,
) -> Path:
    """Commit a checkpoint for ``step`` under ``checkpoint_dir`` and return its final path.

    Give ``files`` (relative name -> existing file, copied in) or a ``writer`` that writes into the
    temporary directory it is handed, or both. An exception from the writer leaves nothing behind.
    Files written front to back (appended, as ``torch.save`` does) can be streamed to the store while
    they grow.
    """
    if files is None and writer is None:
        raise ValueError("commit_checkpoint needs files or a writer")
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir / step_dir_name(step)
    tmp = checkpoint_dir / f"{_TMP_PREFIX}{final.name}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        with _writer_lock(tmp):
            known = _fill(tmp, files or {}, writer)
            manifest = build_manifest(tmp, run_id=run_id, step=step, wall_time=wall_time, known_sha256=known)
            for sub in sorted({p.parent for p in tmp.rglob("*") if p.is_file()}, reverse=True):
                fsync_dir(sub)
            write_manifest(tmp, manifest)
            if final.exists():
                # Re-committing a step (a resumed run saving the step it resumed at) replaces the old
                # one; the old one stops being complete before it is removed.
                _discard(final)
            os.rename(tmp, final)
            fsync_dir(checkpoint_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _fill(tmp: Path, files: Mapping[str, Path], writer: Writer | None) -> Mapping[str, str] | None:
    """Copy ``files`` in and run ``writer``; the hashes the writer says it computed, if any."""
    for rel, source in files.items():
        target = tmp / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    returned = writer(tmp) if writer is not None else None
    # Only a mapping counts as known hashes (a lambda around write_text returns an int).
    return returned if isinstance(returned, Mapping) else None


# Lock descriptors held by commits under way in this process. A child forked meanwhile (a data
# loader's worker) closes its copies, so the lock still dies with the writer, not with the child.
_held_locks: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in list(_held_locks):
        with contextlib.suppress(OSError):
            os.close(fd)
    _held_locks.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


@contextlib.contextmanager
def _writer_lock(tmp: Path) -> Iterator[None]:
    """Hold an exclusive flock on the commit's directory while it is written (see commit_watch).

    Where the filesystem has no flock the commit goes on unlocked: a watcher then sees no writer at
    work and uploads the checkpoint only once it is committed, the ordinary way.
    """
    try:
        fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)  # a new directory: at most a watcher's probe holds it, briefly
        _held_locks.add(fd)
        yield
    finally:
        _held_locks.discard(fd)
        os.close(fd)


def adopt(step_dir: Path, *, run_id: str) -> Path:
    """Commit a manifest for a ``step-N`` directory that a framework-free script wrote without one.

    Only call this once the script has moved on from that directory (a newer one exists, or the script
    exited cleanly): the manifest vouches for whatever the files hold at this moment.
    """
    step = parse_step(step_dir.name)
    if step is None:
        raise ValueError(f"{step_dir} is not named step-NNNNNNNN")
    manifest = build_manifest(step_dir, run_id=run_id, step=step, wall_time=step_dir.stat().st_mtime)
    write_manifest(step_dir, manifest)
    return step_dir


def read_manifest(path: Path) -> dict[str, Any]:
    data = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError("manifest is not a JSON object")
    return data


def check_manifest(data: Mapping[str, Any], expected_step: int | None) -> str:
    """Why a manifest's structure is unusable, or '' when it is fine."""
    if data.get("format") != FORMAT:
        return f"manifest format {data.get('format')!r} is not {FORMAT}"
    step = data.get("step")
    if not isinstance(step, int) or isinstance(step, bool):
        return "manifest has no integer step"
    if expected_step is not None and step != expected_step:
        return f"manifest says step {step} but the directory is step {expected_step}"
    files = data.get("files")
    if not isinstance(files, dict):
        return "manifest has no files table"
    for rel, entry in files.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            return f"manifest entry for {rel!r} has no sha256"
        if not isinstance(entry.get("size"), int):
            return f"manifest entry for {rel!r} has no size"
        if rel.startswith("/") or ".." in Path(rel).parts:
            return f"manifest entry {rel!r} points outside the checkpoint"
    return ""


def verify(path: Path, *, hashes: bool = True) -> VerifyResult:
    """Is ``path`` a complete checkpoint whose files match their manifest (sizes, and hashes)?"""
    expected_step = parse_step(path.name)
    if not (path / MANIFEST).is_file():
        return VerifyResult(False, path, expected_step, "incomplete: no manifest.json")
    try:
        manifest = read_manifest(path)
    except (OSError, ValueError) as exc:
        return VerifyResult(False, path, expected_step, f"unreadable manifest: {exc}")
    problem = check_manifest(manifest, expected_step)
    if problem:
        return VerifyResult(False, path, expected_step, problem, manifest)
    step = int(manifest["step"])
    for rel, entry in sorted(manifest["files"].items()):
        file = path / rel
        if not file.is_file():
            return VerifyResult(False, path, step, f"missing file {rel}", manifest)
        size = file.stat().st_size
        if size != entry["size"]:
            return VerifyResult(False, path, step, f"{rel} is {size} bytes, manifest says {entry['size']}", manifest)
        if hashes and sha256_file(file) != entry["sha256"]:
            return VerifyResult(False, path, step, f"sha256 mismatch for {rel}", manifest)
    return VerifyResult(True, path, step, "", manifest)


def step_dirs(checkpoint_dir: Path) -> list[tuple[int, Path]]:
    """``step-N`` directories (complete or not), oldest first; temporary ones are not listed."""
    if not checkpoint_dir.is_dir():
        return []
    found = []
    for child in checkpoint_dir.iterdir():
        step = parse_step(child.name)
        if step is not None and child.is_dir():
            found.append((step, child))
    return sorted(found)


def complete(checkpoint_dir: Path) -> list[tuple[int, Path]]:
    """Checkpoints that have a manifest (not verified), oldest first."""
    return [(s, p) for s, p in step_dirs(checkpoint_dir) if (p / MANIFEST).is_file()]


def newest_valid(checkpoint_dir: Path) -> tuple[Path | None, list[Skipped]]:
    """The newest checkpoint that verifies, and the newer ones skipped on the way with the reason."""
    skipped: list[Skipped] = []
    for step, path in reversed(step_dirs(checkpoint_dir)):
        result = verify(path)
        if result.ok:
            return path, skipped
        skipped.append(Skipped(path, step, result.reason))
    return None, skipped


def _discard(path: Path) -> None:
    # Drop the manifest first: from that instant the directory no longer claims to be complete, so an
    # interrupted delete can never leave a half-deleted checkpoint that looks finished.
    with contextlib.suppress(FileNotFoundError):
        (path / MANIFEST).unlink()
    shutil.rmtree(path, ignore_errors=True)


def prune(checkpoint_dir: Path, keep: int, *, protect: Iterable[Path] = ()) -> list[Path]:
    """Delete complete checkpoints older than the newest ``keep``; returns what was deleted.

    Incomplete directories are left alone: one may be a script's checkpoint still being written.
    """
    if keep < 1:
        raise ValueError("keep must be at least 1")
    protected = {p.resolve() for p in protect}
    done = complete(checkpoint_dir)
    doomed = [p for _, p in done[: max(len(done) - keep, 0)] if p.resolve() not in protected]
    for path in doomed:
        _discard(path)
    return doomed


def clean_temporaries(checkpoint_dir: Path, older_than_s: float = 0.0) -> list[Path]:
    """Remove leftovers of interrupted commits (call only when no writer is active)."""
    removed: list[Path] = []
    if not checkpoint_dir.is_dir():
        return removed
    now = time.time()
    for child in checkpoint_dir.iterdir():
        if child.name.startswith(_TMP_PREFIX) and now - child.stat().st_mtime >= older_than_s:
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
            removed.append(child)
    return removed
