"""A trained model's files in storage, with a manifest of their checksums, and fetching them back verified.

The manifest (:data:`MANIFEST`, written after every file) lists each file with its sha256 and size.
Its own sha256 is kept in the run record and in the registry with the version, so wherever a
version's files are fetched again (eval-gate's baseline, ``gpuline verify``) they are checked
against what the registry recorded: a missing, extra-short or altered file is an error, never a
silently different model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gpuline.errors import InfraError
from gpuline.storage.base import ChecksumMismatch, ObjectNotFound, sha256_file

if TYPE_CHECKING:
    from gpuline.storage.base import Storage

MANIFEST = "gpuline-model.json"
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MAX_FILES = 10_000


class ModelDamaged(InfraError):
    """A version's files do not match what was recorded when it was registered."""

    title = "model files damaged"


@dataclass(frozen=True)
class Bundle:
    uris: list[str]
    manifest_sha256: str


def upload(storage: Storage, output_dir: Path, prefix: str) -> Bundle | None:
    """Upload every file under ``output_dir`` to ``prefix``, then the manifest; None when there is none."""
    if not output_dir.is_dir():
        return None
    paths = sorted(p for p in output_dir.rglob("*") if p.is_file())
    if not paths:
        return None
    files: dict[str, dict[str, object]] = {}
    uris = []
    for path in paths[:MAX_FILES]:
        rel = path.relative_to(output_dir).as_posix()
        digest = sha256_file(path)
        storage.put_file(path, f"{prefix}/{rel}", sha256=digest)
        files[rel] = {"sha256": digest, "size": path.stat().st_size}
        uris.append(storage.uri_for(f"{prefix}/{rel}"))
    body = json.dumps({"files": files}, sort_keys=True, indent=1).encode()
    storage.put_bytes(f"{prefix}/{MANIFEST}", body)
    return Bundle(uris=uris, manifest_sha256=hashlib.sha256(body).hexdigest())


def fetch(storage: Storage, where: str, dest: Path, manifest_sha256: str) -> Path:
    """Download the bundle ``storage`` holds (at its root) into ``dest``, each file checked; returns ``dest``."""
    manifest = _manifest(storage, where, manifest_sha256)
    dest.mkdir(parents=True, exist_ok=True)
    for rel, entry in manifest.items():
        target = dest / rel
        if not target.resolve().is_relative_to(dest.resolve()):
            raise ModelDamaged(f"{where}: the manifest names {rel!r}, outside the model", hint=_REGISTER_AGAIN)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            storage.get_file(rel, target)
        except ObjectNotFound:
            raise ModelDamaged(f"{where}: {rel} is missing", hint=_REGISTER_AGAIN) from None
        except ChecksumMismatch:
            raise ModelDamaged(f"{where}: {rel} does not match its stored checksum", hint=_REGISTER_AGAIN) from None
        if sha256_file(target) != entry.get("sha256"):
            raise ModelDamaged(f"{where}: {rel} does not match its recorded sha256", hint=_REGISTER_AGAIN)
    return dest


_REGISTER_AGAIN = (
    "the stored model changed or was lost after it was registered; promote a version whose files are intact"
)


def _manifest(storage: Storage, where: str, expected: str) -> dict[str, dict[str, object]]:
    if not expected:
        raise ModelDamaged(
            f"{where}: the registry holds no checksum for this model's files",
            hint="versions registered before checksums were recorded cannot be verified; promote a new one",
        )
    try:
        body = storage.get_bytes(MANIFEST)
    except ObjectNotFound:
        raise ModelDamaged(f"{where}: its manifest {MANIFEST} is missing", hint=_REGISTER_AGAIN) from None
    except ChecksumMismatch:
        raise ModelDamaged(f"{where}: its manifest {MANIFEST} is damaged", hint=_REGISTER_AGAIN) from None
    if len(body) > MAX_MANIFEST_BYTES or hashlib.sha256(body).hexdigest() != expected:
        raise ModelDamaged(f"{where}: its manifest does not match the registry's record", hint=_REGISTER_AGAIN)
    files = json.loads(body).get("files")
    if not isinstance(files, dict) or not files:
        raise ModelDamaged(f"{where}: its manifest lists no files", hint=_REGISTER_AGAIN)
    return {str(k): v if isinstance(v, dict) else {} for k, v in files.items()}
