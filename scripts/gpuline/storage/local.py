"""A store in a local directory: ``file://rel/or/abs`` (relative to gpuline.yml) or a plain path.

:meth:`LocalStorage.put_stream` copies a file while it is written (see :mod:`gpuline.storage.streaming`)
into a temporary name beside the object, which takes the object's name only once the copy is checked.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from gpuline.filelock import locked
from gpuline.storage.base import (
    LOCKS,
    TMP_MARK,
    Cancel,
    ObjectNotFound,
    UploadCancelled,
    changed_since_read,
    check_key,
    sha256_file,
)
from gpuline.training import checkpoints

if TYPE_CHECKING:
    from gpuline.storage.streaming import PartSource


def open_local(uri: str, base_dir: Path) -> LocalStorage:
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        # file://relative/dir keeps "relative" in netloc; file:///abs/dir has an empty netloc.
        path = Path(parsed.netloc + parsed.path) if parsed.netloc else Path(parsed.path)
    else:
        path = Path(uri)
    return LocalStorage(path if path.is_absolute() else base_dir / path)


def _copy(source: Path, target: Path) -> None:
    shutil.copyfile(source, target)


def _write(target: Path, data: bytes) -> None:
    target.write_bytes(data)


class LocalStorage:
    """A directory on a filesystem; writes are atomic (temp file, fsync, rename)."""

    part_size = 8 * 1024 * 1024  # what a streamed copy reads and writes at a time

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _write_atomically(self, target: Path, fill: Callable[[Path], None]) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f"{TMP_MARK}{target.name}.{secrets.token_hex(4)}"
        try:
            fill(tmp)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, target)
            checkpoints.fsync_dir(target.parent)
        finally:
            tmp.unlink(missing_ok=True)

    def put_file(self, local: Path, key: str, *, sha256: str | None = None, cancel: Cancel | None = None) -> None:
        if cancel is not None and cancel():
            raise UploadCancelled(f"upload to {self.uri_for(key)} cancelled")
        self._write_atomically(self._path(key), lambda tmp: _copy(local, tmp))

    def put_stream(self, source: PartSource, key: str, *, cancel: Cancel | None = None) -> None:
        """Copy what ``source`` yields as it comes; the object appears once the source ends checked."""

        def fill(tmp: Path) -> None:
            with tmp.open("wb") as fh:
                for data in source.parts(self.part_size):
                    if cancel is not None and cancel():
                        raise UploadCancelled(f"upload to {self.uri_for(key)} cancelled")
                    fh.write(data)

        self._write_atomically(self._path(key), fill)

    def get_file(self, key: str, local: Path) -> None:
        source = self._path(key)
        if not source.is_file():
            raise ObjectNotFound(f"{self.uri_for(key)} does not exist")
        local.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, local)

    def put_bytes(self, key: str, data: bytes) -> None:
        self._write_atomically(self._path(key), lambda tmp: _write(tmp, data))

    def get_bytes(self, key: str) -> bytes:
        source = self._path(key)
        try:
            return source.read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise ObjectNotFound(f"{self.uri_for(key)} does not exist") from None

    def list(self, prefix: str = "") -> list[str]:
        if not self.root.is_dir():
            return []
        keys = []
        for path in self.root.rglob("*"):
            rel = path.relative_to(self.root).as_posix()
            hidden = rel.startswith(LOCKS + "/") or TMP_MARK in path.name
            if path.is_file() and not hidden and rel.startswith(prefix):
                keys.append(rel)
        return sorted(keys)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        # Leave no empty directories behind, so a listing shows only what holds objects.
        parent = path.parent
        while parent != self.root and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent

    def uri_for(self, key: str) -> str:
        return (self.root / key.strip("/")).as_uri() if key else self.root.as_uri()

    def etag(self, key: str) -> str | None:
        path = self._path(key)
        return sha256_file(path) if path.is_file() else None

    @contextlib.contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        locks = self.root / LOCKS
        locks.mkdir(parents=True, exist_ok=True)
        name = hashlib.sha256(key.encode()).hexdigest()[:32]
        with locked(locks / f"{name}.lock", f"the stored object {key}"):
            yield

    def put_if(self, key: str, data: bytes, expected_etag: str | None) -> str:
        """Write ``data`` only if the object's etag is still ``expected_etag`` (None: must not exist)."""
        with self._locked(check_key(key)):
            current = self.etag(key)
            if current != expected_etag:
                raise changed_since_read(self.uri_for(key))
            self.put_bytes(key, data)
        return hashlib.sha256(data).hexdigest()
