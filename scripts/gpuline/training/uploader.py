"""Keeping checkpoints durable while the trainer runs: upload each one it commits, prune the store.

A background thread uploads while training goes on; :meth:`CheckpointUploader.flush` makes the
newest one durable before the supervisor reports, retrying a little and then failing loudly, because
a preempted machine takes its local disk with it.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from pathlib import Path

from gpuline.errors import InfraError
from gpuline.storage import UploadCancelled, prune_remote, remote_checkpoints, upload_checkpoint
from gpuline.training import checkpoints
from gpuline.training.checkpoints import CheckpointInfo
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
        durable before the machine goes away.
        """

        def check() -> bool:
            if not self.stopping.is_set():
                return False
            newest = checkpoints.complete(self.local_dir)
            if newest and newest[-1][0] > step and newest[-1][0] not in self.uploaded:
                self.req.log(f"upload of checkpoint step {step} cancelled: step {newest[-1][0]} supersedes it")
                return True
            return False

        return check

    def pending(self) -> list[tuple[int, Path]]:
        newest = checkpoints.complete(self.local_dir)[-self.req.keep :]
        return [(s, p) for s, p in newest if s not in self.uploaded]

    def sync(self) -> CheckpointInfo | None:
        """Upload the newest checkpoint not yet in the store; None when there is nothing to do."""
        with self._lock:
            self._adopt_manifestless()
            fresh = self.pending()
            if not fresh:
                return None
            step, path = fresh[-1]
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            self.req.log(f"uploading checkpoint step {step} ({size / 1024**2:.1f} MiB)")
            # Steps in the store were all listed at start, so a step not in ``uploaded`` has no manifest there.
            info = upload_checkpoint(
                self.req.storage, path, self.req.checkpoint_prefix, replace=False, cancel=self._superseded(step)
            )
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
