"""Keeping checkpoints durable while the trainer runs: upload each one it commits, prune the store.

A background thread uploads while training goes on; :meth:`CheckpointUploader.flush` makes the
newest one durable before the supervisor reports, retrying a little and then failing loudly, because
a preempted machine takes its local disk with it.

A checkpoint the trainer is still writing is streamed (when the store can): its parts leave as they
are serialised, so on a stop the upload overlaps the save instead of waiting for it, and the manifest
still goes last (:mod:`gpuline.storage.streaming`). A stream that stops short (the writer died, the
bytes did not match) leaves nothing that claims completeness; a committed checkpoint is then uploaded
the ordinary way.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from pathlib import Path

from gpuline.errors import InfraError
from gpuline.storage import (
    StreamAborted,
    UploadCancelled,
    can_stream,
    prune_remote,
    remote_checkpoints,
    stream_checkpoint,
    upload_checkpoint,
)
from gpuline.training import checkpoints
from gpuline.training.checkpoints import CheckpointInfo
from gpuline.training.commit_watch import CommitWatch, in_progress
from gpuline.training.request import TrainRequest

UPLOAD_POLL_S = 0.25


def durable_remote(req: TrainRequest) -> dict[int, CheckpointInfo]:
    """The run's complete checkpoints already in the store, by step."""
    found = {}
    for ckpt in remote_checkpoints(req.storage, req.checkpoint_prefix):
        if ckpt.complete:
            manifest = req.storage.get_bytes(f"{ckpt.key}/{checkpoints.MANIFEST}")
            found[ckpt.step] = CheckpointInfo(
                req.storage.uri_for(ckpt.key), ckpt.step, hashlib.sha256(manifest).hexdigest()
            )
    return found


class CheckpointUploader(threading.Thread):
    """Uploads newly committed local checkpoints (newest first, one at a time) and prunes.

    Only the newest ``keep`` local checkpoints are candidates: an older one would be pruned from the
    store as soon as it arrived, so a trainer that commits faster than the network drains simply has
    its in-between checkpoints skipped.
    """

    # Stream a checkpoint to the store while the trainer writes it. False uploads only committed
    # checkpoints: the sequential path, which bench/checkpoint.py measures beside the streamed one.
    streaming = True

    def __init__(
        self,
        req: TrainRequest,
        local_dir: Path,
        uploaded: dict[int, CheckpointInfo],
        stopping: threading.Event | None = None,
    ) -> None:
        super().__init__(name="gpuline-checkpoint-upload", daemon=True)
        self.req = req
        self.local_dir = local_dir
        self.uploaded = uploaded
        self.stopping = stopping or threading.Event()
        self.trainer_exited_cleanly = False
        self._halt = threading.Event()
        self._lock = threading.Lock()  # one upload in flight, whoever starts it
        self.failures = 0

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                while not self._halt.is_set() and self.sync() is not None:
                    pass
            except UploadCancelled:
                continue  # a newer checkpoint superseded it: go straight to that one
            except Exception as exc:  # keep training; the final flush raises if it still fails
                self.failures += 1
                self.req.log(f"checkpoint upload failed (will retry): {exc}")
                self.req.on_event("checkpoint_upload_failed", {"error": str(exc)})
                self._halt.wait(min(2.0 * self.failures, 10.0))
            # During a stop the final checkpoint is on its way: look for it often.
            self._halt.wait(UPLOAD_POLL_S / 5 if self.stopping.is_set() else UPLOAD_POLL_S)

    def stop(self) -> None:
        self._halt.set()
        if self.is_alive():
            self.join()

    def _adopt_manifestless(self) -> None:
        """Commit manifests for a framework-free script's ``step-N`` dirs once it has moved past them."""
        found = checkpoints.step_dirs(self.local_dir)
        newest = max((s for s, _ in found), default=None)
        for step, path in found:
            if (path / checkpoints.MANIFEST).exists():
                continue
            if step != newest or self.trainer_exited_cleanly:
                checkpoints.adopt(path, run_id=self.req.run_id)
                self.req.log(f"committed a manifest for checkpoint step {step} written without one")

    def _superseded(self, step: int) -> Callable[[], bool]:
        """Once a stop is under way, an older upload gives way to the final checkpoint.

        Otherwise a long upload of the last interval checkpoint would hold back the one that must be
        durable before the machine goes away. The final one counts from its first written byte.
        """

        def check() -> bool:
            if not self.stopping.is_set():
                return False
            newest = checkpoints.complete(self.local_dir)[-1:]
            newer = [s for s, _ in newest if s > step and s not in self.uploaded]
            for watch in self._being_written():
                watch.close()
                newer += [watch.step] if watch.step > step else []
            if newer:
                self.req.log(f"upload of checkpoint step {step} cancelled: step {max(newer)} supersedes it")
                return True
            return False

        return check

    def _being_written(self) -> list[CommitWatch]:
        """Commits under way with their writer at work and a file written, newest first (caller closes)."""
        if not self.streaming or not can_stream(self.req.storage):
            return []
        found = []
        for step, path in reversed(in_progress(self.local_dir)):
            if step in self.uploaded:
                continue  # a resumed run re-saving the step it resumed at: that step is durable already
            try:
                watch = CommitWatch(path)
            except OSError:
                continue  # committed or removed since the listing
            # The writer locks before its first file, so with a file written a free lock means it is gone.
            if watch.files() and watch.state() == "writing":
                found.append(watch)
            else:
                watch.close()
        return found

    def _newest_being_written(self, newer_than: int | None) -> CommitWatch | None:
        """The newest commit under way, if it is newer than ``newer_than`` (the newest committed step)."""
        writing = self._being_written()
        for other in writing[1:]:
            other.close()
        newest = writing[0] if writing else None
        if newest is not None and newer_than is not None and newest.step <= newer_than:
            newest.close()
            return None
        return newest

    def pending(self) -> list[tuple[int, Path]]:
        newest = checkpoints.complete(self.local_dir)[-self.req.keep :]
        return [(s, p) for s, p in newest if s not in self.uploaded]

    def sync(self) -> CheckpointInfo | None:
        """Upload the newest checkpoint not yet in the store; None when there is nothing to do."""
        with self._lock:
            self._adopt_manifestless()
            fresh = self.pending()
            newest = self._newest_being_written(newer_than=fresh[-1][0] if fresh else None)
            if newest is not None:
                info = self._stream(newest)
                if info is not None:
                    return info
                fresh = self.pending()  # committed meanwhile, to be uploaded whole; or nothing new
            if not fresh:
                return None
            step, path = fresh[-1]
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            self.req.log(f"uploading checkpoint step {step} ({size / 1024**2:.1f} MiB)")
            # Steps in the store were all listed at start, so a step not in ``uploaded`` has no manifest there.
            info = upload_checkpoint(
                self.req.storage, path, self.req.checkpoint_prefix, replace=False, cancel=self._superseded(step)
            )
            return self._durable(step, info)

    def _stream(self, watch: CommitWatch) -> CheckpointInfo | None:
        """Stream the checkpoint being written; None when the stream stopped short (nothing claims completeness)."""
        step = watch.step
        self.req.log(f"streaming checkpoint step {step} to the store while it is written")
        try:
            result = stream_checkpoint(
                self.req.storage,
                watch,
                self.req.checkpoint_prefix,
                cancel=self._superseded(step),
                stop_waiting=self._halt.is_set,
                replace=False,
            )
        except StreamAborted as exc:
            self.req.log(f"streamed upload of checkpoint step {step} stopped: {exc.message}")
            return None
        finally:
            watch.close()
        for name, reason in result.mismatched:
            self.req.log(f"checkpoint step {step}: {name} uploaded again whole ({reason})")
        return self._durable(step, result.info)

    def _durable(self, step: int, info: CheckpointInfo) -> CheckpointInfo:
        self.uploaded[step] = info
        self.req.log(f"checkpoint step {step} is durable at {info.uri}")
        self.req.on_event("checkpoint", {"uri": info.uri, "step": step, "sha256": info.sha256})
        for gone in prune_remote(self.req.storage, self.req.checkpoint_prefix, self.req.keep):
            self.uploaded.pop(gone, None)
        checkpoints.prune(self.local_dir, self.req.keep)
        self.failures = 0
        return info

    def flush(self) -> None:
        """The newest committed checkpoint must be durable before we report; retry a little, then fail."""
        for attempt in range(3):
            try:
                # The newest goes first (it is what a preempted machine must not lose), then the rest
                # of the newest ``keep``.
                while True:
                    try:
                        if self.sync() is None:
                            return
                    except UploadCancelled:
                        continue
            except Exception as exc:
                if attempt == 2:
                    raise InfraError(
                        f"the final checkpoint of run {self.req.run_id} could not be uploaded to "
                        f"{self.req.storage.uri_for(self.req.checkpoint_prefix)}: {exc}",
                        hint="check the storage backend; the local copy is under " + str(self.local_dir),
                    ) from exc
                time.sleep(1.0 * (attempt + 1))
