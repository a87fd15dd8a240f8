"""Checkpoints in a store: upload (files first, the manifest last), find, download and verify, prune.

A remote checkpoint without a manifest is incomplete by construction, however its upload was
interrupted; a download checks every file against the manifest before the checkpoint is used.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpuline.storage.base import Cancel, ChecksumMismatch, CorruptCheckpoint, ObjectNotFound, Storage
from gpuline.training import checkpoints
from gpuline.training.checkpoints import MANIFEST, CheckpointInfo


@dataclass(frozen=True)
class RemoteCheckpoint:
    step: int
    key: str  # prefix/step-NNNNNNNN
    complete: bool  # has a manifest (not yet verified)


def remote_checkpoints(storage: Storage, prefix: str) -> list[RemoteCheckpoint]:
    """Checkpoint directories under ``prefix``, oldest first, with whether a manifest exists."""
    base = prefix.strip("/")
    steps: dict[int, bool] = {}
    for key in storage.list(f"{base}/"):
        parts = key[len(base) + 1 :].split("/")
        step = checkpoints.parse_step(parts[0])
        if step is None or len(parts) < 2:
            continue
        steps[step] = steps.get(step, False) or parts[1:] == [MANIFEST]
    return [
        RemoteCheckpoint(step, f"{base}/{checkpoints.step_dir_name(step)}", done)
        for step, done in sorted(steps.items())
    ]


def upload_checkpoint(
    storage: Storage,
    checkpoint: Path,
    prefix: str,
    *,
    on_file: Callable[[str], None] | None = None,
    replace: bool = True,
    cancel: Cancel | None = None,
) -> CheckpointInfo:
    """Upload a committed local checkpoint: every file first, its manifest last.

    ``replace=False`` says the caller knows this step has no manifest in the store yet, which saves
    a request. ``cancel`` is polled during the upload; when it says so, UploadCancelled is raised
    before the manifest is written.
    """
    result = checkpoints.verify(checkpoint, hashes=False)
    if not result.ok or result.manifest is None or result.step is None:
        raise CorruptCheckpoint(f"{checkpoint} is not a complete checkpoint: {result.reason}")
    key = f"{prefix.strip('/')}/{checkpoints.step_dir_name(result.step)}"
    # If this step was uploaded before (a resumed run re-saving it), it stops claiming completeness
    # before any of its files change.
    if replace:
        storage.delete(f"{key}/{MANIFEST}")
    for rel, entry in sorted(result.manifest["files"].items()):
        storage.put_file(checkpoint / rel, f"{key}/{rel}", sha256=entry["sha256"], cancel=cancel)
        if on_file is not None:
            on_file(rel)
    manifest_bytes = (checkpoint / MANIFEST).read_bytes()
    storage.put_bytes(f"{key}/{MANIFEST}", manifest_bytes)
    return CheckpointInfo(storage.uri_for(key), result.step, hashlib.sha256(manifest_bytes).hexdigest())


def _read_manifest(storage: Storage, key: str) -> tuple[dict[str, Any], bytes]:
    """The checkpoint's manifest, parsed and checked, and its bytes; CorruptCheckpoint if unusable."""
    uri = storage.uri_for(key)
    try:
        manifest_bytes = storage.get_bytes(f"{key}/{MANIFEST}")
    except ObjectNotFound:
        raise CorruptCheckpoint(f"{uri} is incomplete: no manifest.json") from None
    except ChecksumMismatch:
        raise CorruptCheckpoint(f"{uri}: manifest.json does not match its recorded sha256") from None
    try:
        manifest = json.loads(manifest_bytes)
    except ValueError as exc:
        raise CorruptCheckpoint(f"{uri}: unreadable manifest: {exc}") from None
    step = checkpoints.parse_step(key.rsplit("/", 1)[-1])
    problem = checkpoints.check_manifest(manifest, step) if isinstance(manifest, dict) else "not an object"
    if problem:
        raise CorruptCheckpoint(f"{uri}: {problem}")
    return manifest, manifest_bytes


def download_checkpoint(storage: Storage, key: str, local_dir: Path) -> Path:
    """Fetch the checkpoint at ``key`` into ``local_dir/step-N`` and verify every file; return its path."""
    uri = storage.uri_for(key)
    manifest, manifest_bytes = _read_manifest(storage, key)
    local_dir.mkdir(parents=True, exist_ok=True)
    final = local_dir / checkpoints.step_dir_name(int(manifest["step"]))
    tmp = local_dir / f".tmp-{final.name}-{secrets.token_hex(4)}"
    try:
        for rel in sorted(manifest["files"]):
            try:
                storage.get_file(f"{key}/{rel}", tmp / rel)
            except ObjectNotFound:
                raise CorruptCheckpoint(f"{uri}: missing file {rel}") from None
            except ChecksumMismatch:
                raise CorruptCheckpoint(f"{uri}: sha256 mismatch for {rel}") from None
        (tmp / MANIFEST).write_bytes(manifest_bytes)
        result = checkpoints.verify(tmp)
        if not result.ok:
            raise CorruptCheckpoint(f"{uri}: {result.reason}")
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def delete_checkpoint(storage: Storage, key: str) -> None:
    """Manifest first, so the checkpoint stops being complete before its files go."""
    storage.delete(f"{key}/{MANIFEST}")
    for obj in storage.list(f"{key}/"):
        storage.delete(obj)


def prune_remote(storage: Storage, prefix: str, keep: int) -> list[int]:
    """Keep the newest ``keep`` complete checkpoints; also drop incomplete ones older than those kept."""
    found = remote_checkpoints(storage, prefix)
    done = [c for c in found if c.complete]
    kept = done[-keep:] if keep > 0 else []
    oldest_kept = kept[0].step if kept else None
    doomed = [c for c in done if c not in kept]
    if oldest_kept is not None:
        doomed += [c for c in found if not c.complete and c.step < oldest_kept]
    for ckpt in doomed:
        delete_checkpoint(storage, ckpt.key)
    return sorted(c.step for c in doomed)
