"""Uploading a checkpoint while it is still being written: parts leave as they exist, the manifest last.

The trainer appends each file of a checkpoint front to back in its commit directory (see
:func:`gpuline.training.checkpoints.commit_checkpoint`). :func:`stream_checkpoint` follows that
directory through a :class:`~gpuline.training.commit_watch.CommitWatch`: every file that appears is
streamed into the store as a :class:`GrowingFile`, a part of the store's part size as soon as that many
bytes exist. The end of a file is learnt only from the commit (the directory renamed to ``step-N``
with a manifest giving every file's size and sha256), never from a pause in its growth. Then each
stream checks that what it read is exactly the finished file (same inode, size and sha256) before the
object is completed, a file that does not match is uploaded again whole, and only after every file is
in place is the manifest written. A writer that dies before committing leaves no object and no
multipart upload behind: every stream is aborted.

A store can stream when it has ``put_stream`` (:class:`StreamingStorage`); others upload once the
checkpoint is committed, as before. On S3 a streamed object's sha256 is known only at its end, after
S3 fixed the object's metadata, so it carries none: the manifest, written after it, holds the hash, and
a download checks every file against the manifest.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from gpuline.errors import InfraError
from gpuline.storage.base import Cancel, Storage, UploadCancelled
from gpuline.training import checkpoints
from gpuline.training.checkpoints import MANIFEST, CheckpointInfo
from gpuline.training.commit_watch import CommitWatch

POLL_S = 0.01  # how often a stream looks for new bytes or the commit: small against any part's upload
MAX_FILES = 8  # files streamed at once; more wait for a slot


class StreamAborted(InfraError):
    """A streamed upload stopped without an object: the writer died, or what was read is not the file."""

    title = "streamed upload stopped"


@dataclass(frozen=True)
class FileEnd:
    """The finished file, as its commit describes it."""

    size: int
    sha256: str
    inode: int


# None while the file is still being written; raises StreamAborted when it never will be finished.
EndOf = Callable[[], FileEnd | None]


class PartSource(Protocol):
    def parts(self, size: int) -> Iterator[bytes]:
        """Full parts of ``size`` bytes, then a shorter last one (none when the end falls on a part).

        The object is complete only once the iterator is exhausted without an error: the source checks
        what it gave out at that point, so a consumer completes an upload only after the loop ends.
        """
        ...


@runtime_checkable
class StreamingStorage(Protocol):
    def put_stream(self, source: PartSource, key: str, *, cancel: Cancel | None = None) -> None: ...


def can_stream(storage: Storage) -> bool:
    return isinstance(storage, StreamingStorage)


class GrowingFile:
    """A file another thread or process is still appending to, read front to back as it grows."""

    def __init__(self, fd: int, end: EndOf, *, name: str, poll_s: float = POLL_S) -> None:
        self._fd = fd
        self._end = end
        self._poll_s = poll_s
        self._digest = hashlib.sha256()
        self.name = name
        self.offset = 0

    def parts(self, size: int) -> Iterator[bytes]:
        while (end := self._end()) is None:
            if os.fstat(self._fd).st_size - self.offset >= size:
                yield self._read(size)
            else:
                time.sleep(self._poll_s)  # the writer is at work; only its commit says it is done
        while self.offset < end.size:
            data = self._read(min(size, end.size - self.offset))
            if not data:
                break  # shorter than its commit says: the check below refuses it
            yield data
        self._check(end)

    def _read(self, size: int) -> bytes:
        data = os.pread(self._fd, size, self.offset)
        self._digest.update(data)
        self.offset += len(data)
        return data

    def _check(self, end: FileEnd) -> None:
        info = os.fstat(self._fd)
        if info.st_ino != end.inode:
            raise StreamAborted(f"{self.name} in the committed checkpoint is another file than the one streamed")
        if self.offset != end.size or info.st_size != end.size:
            raise StreamAborted(f"{self.name}: streamed {self.offset} bytes, the committed file has {end.size}")
        if self._digest.hexdigest() != end.sha256:
            raise StreamAborted(f"{self.name}: the streamed bytes do not match the committed file's sha256")


@dataclass(frozen=True)
class StreamResult:
    info: CheckpointInfo
    streamed: tuple[str, ...]  # files that went up while they were written
    whole: tuple[str, ...]  # files uploaded whole after the commit (appeared late, or not at the top)
    mismatched: tuple[tuple[str, str], ...]  # (file, why): streamed, refused, then uploaded whole


class _CheckpointStream:
    """The streams of one checkpoint's files, and what they learn from its commit."""

    def __init__(
        self, storage: Storage, watch: CommitWatch, key: str, cancel: Cancel, stop_waiting: Callable[[], bool]
    ) -> None:
        self.storage = storage
        self.watch = watch
        self.key = key
        self.cancel = cancel
        self.stop_waiting = stop_waiting
        self._ends: dict[str, FileEnd] | None = None
        self._failure: str | None = None
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(MAX_FILES, thread_name_prefix="gpuline-stream")
        self._streams: dict[str, Future[None]] = {}
        self._fds: list[int] = []

    def _end_of(self, name: str) -> EndOf:
        def end() -> FileEnd | None:
            with self._lock:
                failure, ends = self._failure, self._ends
            if failure is not None:
                raise StreamAborted(failure)
            if ends is None:
                return None
            if name not in ends:
                raise StreamAborted(f"{name} is not part of the committed checkpoint")
            return ends[name]

        return end

    def follow(self) -> dict[str, Any]:
        """Stream each file as it appears until the commit; its manifest, or StreamAborted."""
        while True:
            self._start_new_streams()
            self._raise_broken_streams()
            manifest = self.watch.committed()
            if manifest is None and not self.watch.writer_at_work():
                manifest = self.watch.committed()  # the lock was let go: renamed just now, or died
                if manifest is None:
                    raise StreamAborted(f"the writer of checkpoint step {self.watch.step} stopped before committing it")
            if manifest is not None:
                self._learn_ends(manifest)
                return manifest
            if self.cancel():
                raise UploadCancelled(f"upload to {self.storage.uri_for(self.key)} cancelled")
            if self.stop_waiting():
                raise StreamAborted(f"stopped waiting for the writer of checkpoint step {self.watch.step}")
            time.sleep(POLL_S)

    def _start_new_streams(self) -> None:
        for name in self.watch.files():
            if name in self._streams:
                continue
            try:
                fd = self.watch.open_file(name)
            except OSError:
                continue  # renamed away or removed at this instant; the commit's manifest will tell
            self._fds.append(fd)
            source = GrowingFile(fd, self._end_of(name), name=name)
            self._streams[name] = self._pool.submit(self._put, source, f"{self.key}/{name}")

    def _put(self, source: PartSource, key: str) -> None:
        assert isinstance(self.storage, StreamingStorage)
        self.storage.put_stream(source, key, cancel=self.cancel)

    def _raise_broken_streams(self) -> None:
        """A stream that failed for another reason than the file (the network, a cancel) ends them all."""
        for future in self._streams.values():
            if future.done() and future.exception() is not None and not isinstance(future.exception(), StreamAborted):
                future.result()

    def _learn_ends(self, manifest: dict[str, Any]) -> None:
        ends = {}
        for name, entry in manifest["files"].items():
            try:
                ends[name] = FileEnd(entry["size"], entry["sha256"], self.watch.inode_of(name))
            except OSError:
                continue  # gone already: its stream (if any) is refused, the whole upload then fails loudly
        with self._lock:
            self._ends = ends

    def finish(self, manifest: dict[str, Any]) -> tuple[list[str], list[str], list[tuple[str, str]]]:
        """Wait for every file's stream; upload whole each file that was not streamed or did not match."""
        streamed, whole, mismatched = [], [], []
        for name, entry in sorted(manifest["files"].items()):
            future = self._streams.get(name)
            reason = None
            if future is not None:
                try:
                    future.result()
                    streamed.append(name)
                    continue
                except StreamAborted as exc:
                    reason = exc.message
            self.storage.put_file(
                self.watch.final / name, f"{self.key}/{name}", sha256=entry["sha256"], cancel=self.cancel
            )
            if reason is None:
                whole.append(name)
            else:
                mismatched.append((name, reason))
        return streamed, whole, mismatched

    def close(self, failure: str | None) -> None:
        """End every stream (aborting those still open when ``failure`` says why) and let go of the files."""
        if failure is not None:
            with self._lock:
                self._failure = failure
        self._pool.shutdown(wait=True)
        for fd in self._fds:
            os.close(fd)


def stream_checkpoint(
    storage: Storage,
    watch: CommitWatch,
    prefix: str,
    *,
    cancel: Cancel | None = None,
    stop_waiting: Callable[[], bool] | None = None,
    replace: bool = True,
) -> StreamResult:
    """Upload the checkpoint being committed in ``watch``'s directory while it is written.

    Raises StreamAborted when the writer stops without committing (nothing is left in the store that
    claims completeness, and no multipart upload stays open), UploadCancelled when ``cancel`` says
    so, and the store's errors as they come. ``stop_waiting`` ends the wait for a writer still at work.
    ``replace=False`` says the caller knows the store has no manifest for this step yet.
    """
    key = f"{prefix.strip('/')}/{checkpoints.step_dir_name(watch.step)}"
    if replace:
        storage.delete(f"{key}/{MANIFEST}")
    stream = _CheckpointStream(storage, watch, key, cancel or (lambda: False), stop_waiting or (lambda: False))
    failure: str | None = "the streamed upload was called off"
    try:
        manifest = stream.follow()
        streamed, whole, mismatched = stream.finish(manifest)
        failure = None
    finally:
        stream.close(failure)
    manifest_bytes = (watch.final / MANIFEST).read_bytes()
    storage.put_bytes(f"{key}/{MANIFEST}", manifest_bytes)
    info = CheckpointInfo(storage.uri_for(key), watch.step, hashlib.sha256(manifest_bytes).hexdigest())
    return StreamResult(info, tuple(streamed), tuple(whole), tuple(mismatched))
