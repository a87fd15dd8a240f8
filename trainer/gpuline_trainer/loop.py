"""A small reusable training loop that honours the contract: resume, interval saves, stop-and-save.

The script supplies three functions: ``train_step(step) -> loss``, ``state() -> dict`` of everything
that must survive a restart (model, optimizer, scheduler, data position ...) and ``load_state(dict)``.
The loop adds the step counter and every RNG state, so a run stopped by SIGTERM at any step and
resumed gives the same weights, bit for bit, as one that never stopped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gpuline_trainer import ddp
from gpuline_trainer.checkpoint import TorchCheckpointer, rng_state, set_rng_state
from gpuline_trainer.contract import Contract
from gpuline_trainer.output import keep_output_alive
from gpuline_trainer.signals import StopFlag


class ResumableBatches:
    """Shuffled mini-batch indices that depend only on (seed, epoch, position): resumable exactly.

    Each epoch's order is a permutation drawn from its own generator seeded with (seed, epoch), so the
    position inside an epoch is all the state there is. With several ranks, each takes its own stride
    of the permutation.
    """

    def __init__(self, size: int, batch_size: int, seed: int, *, rank: int = 0, world_size: int = 1) -> None:
        per_rank = size // world_size
        if per_rank < batch_size:
            raise ValueError(f"{size} examples over {world_size} ranks cannot fill a batch of {batch_size}")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.batches_per_epoch = per_rank // batch_size
        self.epoch, self.position = 0, 0
        self._order: torch.Tensor | None = None

    def _epoch_order(self) -> torch.Tensor:
        if self._order is None:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._order = torch.randperm(self.size, generator=generator)[self.rank :: self.world_size]
        return self._order

    def next(self) -> torch.Tensor:
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        start = self.position * self.batch_size
        batch = self._epoch_order()[start : start + self.batch_size]
        self.position += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position, self._order = int(state["epoch"]), int(state["position"]), None


class MetricsWriter:
    """Appends ``{"step", "loss", "time", ...}`` lines to GPULINE_METRICS_PATH (main rank only)."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path = path
        self.enabled = enabled
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, step: int, loss: float, **extra: Any) -> None:
        if not self.enabled:
            return
        row = {"step": step, "loss": loss, "time": time.time(), **extra}
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")


@dataclass
class LoopResult:
    step: int
    stopped: bool
    resumed_from: int | None
    losses: list[tuple[int, float]] = field(default_factory=list)
    save_stalls_s: list[float] = field(default_factory=list)


def _load_resume(contract: Contract, ctx: ddp.DistContext) -> dict[str, Any] | None:
    """Rank 0 reads the checkpoint and hands it to every rank, so all resume from the same step."""
    loaded = None
    if ctx.is_main and contract.resume_from is not None:
        loaded = TorchCheckpointer.load(contract.resume_from)
    return ddp.broadcast_object(ctx, loaded) if ctx.enabled else loaded


def run_loop(
    contract: Contract,
    *,
    total_steps: int,
    train_step: Callable[[int], float],
    state: Callable[[], dict[str, Any]],
    load_state: Callable[[dict[str, Any]], None],
    ctx: ddp.DistContext | None = None,
    stop: StopFlag | None = None,
    log: Callable[[str], None] = print,
    log_every: int = 50,
) -> LoopResult:
    """Train from the resume point (or step 0) to ``total_steps``, or until asked to stop."""
    keep_output_alive()  # a log line to a supervisor that died must not cost the final save
    ctx = ctx or ddp.DistContext()
    stop = stop or StopFlag()
    checkpointer = TorchCheckpointer(contract.checkpoint_dir, contract.run_id)
    metrics = MetricsWriter(contract.metrics_path, enabled=ctx.is_main)
    step, resumed_from = 0, None
    loaded = _load_resume(contract, ctx)
    if loaded is not None:
        step = resumed_from = int(loaded["loop"]["step"])
        rngs = loaded["rng"]["ranks"]
        set_rng_state(rngs[ctx.rank] if ctx.rank < len(rngs) else rngs[0])
        load_state(loaded)
        log(f"[rank {ctx.rank}] resumed at step {step}")

    def save(at: int, *, block: bool) -> None:
        # Every rank takes part (the RNG gather is collective); only rank 0 writes.
        rngs = ddp.all_gather_object(ctx, rng_state())
        if ctx.is_main:
            checkpointer.save(at, {**state(), "loop": {"step": at}, "rng": {"ranks": rngs}}, block=block)

    result = LoopResult(step=step, stopped=False, resumed_from=resumed_from)
    with stop:
        while step < total_steps:
            if ddp.any_true(ctx, stop.requested):
                result.stopped = True
                log(f"[rank {ctx.rank}] stop requested ({stop.signal_name or 'by a peer rank'}); saving step {step}")
                break
            step += 1
            loss = train_step(step)
            metrics.write(step, loss)
            result.losses.append((step, loss))
            if log_every and step % log_every == 0 and ctx.is_main:
                log(f"step {step} loss {loss:.4f}")
            if step % contract.checkpoint_interval == 0 and step < total_steps:
                save(step, block=False)
        # The final state is always committed: after a stop it is what the next machine resumes from;
        # after the last step it is the checkpoint the run record points at. The decision uses only
        # step numbers, which every rank agrees on, because saving is collective.
        saved_at_interval = step % contract.checkpoint_interval == 0 and step < total_steps
        if not saved_at_interval or step == (resumed_from or 0):
            save(step, block=True)
        checkpointer.wait()
    if result.stopped:
        contract.note_stopped(step, stop.signal_name or "peer rank")
    result.step = step
    result.save_stalls_s = list(checkpointer.stalls)
    return result


def run_smoke(
    contract: Contract, train_step: Callable[[int], float], *, steps: int = 20, log: Callable[[str], None] = print
) -> list[float]:
    """Smoke mode (GPULINE_SMOKE=1): ``train_step`` should train on one fixed batch; losses go to the metrics file."""
    keep_output_alive()
    metrics = MetricsWriter(contract.metrics_path)
    losses = []
    for step in range(1, steps + 1):
        loss = train_step(step)
        metrics.write(step, loss)
        losses.append(loss)
    log(f"smoke test: loss {losses[0]:.4f} -> {losses[-1]:.4f} over {steps} steps on one batch")
    return losses
