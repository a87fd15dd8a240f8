"""Torch checkpoints on top of ``gpuline.training.checkpoints``: snapshot fast, write in the background.

``save(step, state)`` copies every tensor of ``state`` into CPU memory (the only time the training
loop waits), then background threads serialise each top-level entry to ``<name>.pt`` side by side,
hashing the bytes as they are written, and commits the directory atomically with its manifest. At most one
save is in flight: a second ``save`` first waits for the previous one (back-pressure), so memory
never holds more than one snapshot beside the live state.

Each file is written front to back, never sought back into, so the supervisor's uploader can stream
it to the store while it grows; the commit (the manifest, then the rename) is what tells the uploader
the file is finished and what it must hash to.

RNG states (python, numpy, torch, CUDA) are captured as plain tensors and ints so checkpoints load
with ``torch.load(weights_only=True)``: loading a checkpoint never runs pickled code.
"""

from __future__ import annotations

import hashlib
import os
import random
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

import torch

from gpuline.training import checkpoints


class _HashingWriter:
    """A file that hashes what passes through it, so the manifest needs no second read."""

    def __init__(self, fh: IO[bytes]) -> None:
        self.fh = fh
        self.digest = hashlib.sha256()

    def write(self, data: bytes | memoryview) -> int:
        # Appending only: the hash of the stream is the hash of the file, here and for a streamed upload.
        self.digest.update(data)
        return self.fh.write(data)

    def flush(self) -> None:
        self.fh.flush()


def snapshot(value: Any, *, pin: bool = False, reuse: Any = None) -> Any:
    """A deep copy with every tensor copied to CPU memory; plain values are copied as containers.

    ``reuse`` is an earlier snapshot of the same structure: tensors whose shape and dtype still match
    are overwritten in place instead of allocated, which skips the page faults of fresh memory (the
    larger part of a copy's cost for big states).
    """
    if isinstance(value, torch.Tensor):
        tensor = value.detach()
        # Pinned memory only helps (and only matters) for copies out of a GPU.
        target = reuse if _fits(reuse, tensor, pin and tensor.device.type != "cpu") else None
        if target is None:
            if tensor.device.type == "cpu":
                return tensor.clone()
            target = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=pin)
        target.copy_(tensor, non_blocking=pin)
        return target
    if isinstance(value, Mapping):
        old = reuse if isinstance(reuse, Mapping) else {}
        return {k: snapshot(v, pin=pin, reuse=old.get(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        old_items = list(reuse) if isinstance(reuse, list | tuple) and len(reuse) == len(value) else [None] * len(value)
        items = [snapshot(v, pin=pin, reuse=r) for v, r in zip(value, old_items, strict=True)]
        return items if isinstance(value, list) else tuple(items)
    return value


def _fits(buffer: Any, tensor: torch.Tensor, pin: bool) -> bool:
    return (
        isinstance(buffer, torch.Tensor)
        and buffer.device.type == "cpu"
        and buffer.shape == tensor.shape
        and buffer.dtype == tensor.dtype
        and buffer.is_contiguous()
        and (not pin or buffer.is_pinned())
    )


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from, in a weights_only-loadable form."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "torch": torch.get_rng_state(),
    }
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
        assert not isinstance(keys, str)
        state["numpy"] = {
            "kind": str(kind),
            "keys": torch.from_numpy(keys.astype("int64")),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        }
    except ImportError:
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(x) for x in py["internal"].tolist()), py["gauss"]))
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        npy = state["numpy"]
        keys = npy["keys"].numpy().astype("uint32")
        np.random.set_state((npy["kind"], keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class TorchCheckpointer:
    """Asynchronous, atomic checkpoints of a dict of state (model, optimizer, scheduler, ...)."""

    def __init__(
        self, checkpoint_dir: Path, run_id: str, *, keep: int | None = None, reuse_buffers: bool = True
    ) -> None:
        self.checkpoint_dir = checkpoint_dir
        self.run_id = run_id
        self.keep = keep  # prune locally after each commit; leave None under the supervisor (it prunes)
        # Keep the last snapshot's CPU memory for the next one: one extra copy of the state stays
        # resident, and every save after the first copies into warm pages.
        self.reuse_buffers = reuse_buffers
        self._buffers: dict[str, Any] | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last_committed: Path | None = None
        self.stalls: list[float] = []

    # ------------------------------------------------------------ saving

    def save(self, step: int, state: Mapping[str, Any], *, block: bool = False) -> float:
        """Snapshot ``state`` and commit it as checkpoint ``step``; returns how long the caller waited."""
        started = time.perf_counter()
        self.wait()  # back-pressure: at most one save in flight
        pin = torch.cuda.is_available()
        previous = self._buffers or {}
        copy = {name: snapshot(value, pin=pin, reuse=previous.get(name)) for name, value in state.items()}
        self._buffers = copy if self.reuse_buffers else None
        if pin:
            torch.cuda.synchronize()  # the non-blocking copies must land before the writer reads them
        stall = time.perf_counter() - started
        self.stalls.append(stall)
        self._error = None
        self._thread = threading.Thread(target=self._write, args=(step, copy), name=f"gpuline-save-{step}", daemon=True)
        self._thread.start()
        if block:
            self.wait()
        return stall

    def _write(self, step: int, copy: dict[str, Any]) -> None:
        try:

            def write_one(tmp: Path, name: str, value: Any) -> tuple[str, str]:
                path = tmp / f"{name}.pt"
                with path.open("wb") as fh:
                    writer = _HashingWriter(fh)
                    torch.save(value, writer)  # type: ignore[arg-type]
                    fh.flush()
                    os.fsync(fh.fileno())
                return path.name, writer.digest.hexdigest()

            def write_files(tmp: Path) -> dict[str, str]:
                # One file per entry, written side by side: writing and hashing release the GIL, so
                # model and optimizer serialise in parallel (about twice as fast on two cores).
                workers = max(1, min(len(copy), os.cpu_count() or 1, 4))
                with ThreadPoolExecutor(workers, thread_name_prefix="gpuline-serialise") as pool:
                    futures = [pool.submit(write_one, tmp, name, value) for name, value in copy.items()]
                    return dict(f.result() for f in futures)

            self.last_committed = checkpoints.commit_checkpoint(
                self.checkpoint_dir, step, run_id=self.run_id, writer=write_files
            )
            if self.keep is not None:
                checkpoints.prune(self.checkpoint_dir, self.keep)
        except BaseException as exc:
            self._error = exc

    def wait(self) -> None:
        """Block until the save in flight is committed; re-raise its error here, in the caller."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"saving a checkpoint failed: {error}") from error

    @property
    def in_flight(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------ loading

    @staticmethod
    def load(path: Path, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
        """Verify the checkpoint against its manifest, then load each ``<name>.pt`` (weights only)."""
        result = checkpoints.verify(path)
        if not result.ok or result.manifest is None:
            raise ValueError(f"checkpoint {path} is not usable: {result.reason}")
        state: dict[str, Any] = {}
        for rel in sorted(result.manifest["files"]):
            if rel.endswith(".pt") and "/" not in rel:
                state[rel.removesuffix(".pt")] = torch.load(path / rel, map_location=map_location, weights_only=True)
        return state
