"""Distributed setup from torchrun's environment; gloo on CPU, NCCL on GPUs.

A single process (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) gets a context whose collectives are no-ops,
so one training script serves one process, many processes and many nodes.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        if self.backend == "nccl":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")


def init_from_env(backend: str | None = None, timeout_s: float = 300) -> DistContext:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    chosen = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if chosen == "nccl":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=chosen, timeout=timedelta(seconds=timeout_s))
    return DistContext(rank, world, local_rank, chosen)


def any_true(ctx: DistContext, flag: bool) -> bool:
    """True on every rank if it is true on any: ranks must agree to stop at the same step."""
    if not ctx.enabled:
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=ctx.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def broadcast_object(ctx: DistContext, obj: Any, src: int = 0) -> Any:
    if not ctx.enabled:
        return obj
    box = [obj if ctx.rank == src else None]
    dist.broadcast_object_list(box, src=src, device=ctx.device if ctx.backend == "nccl" else None)
    return box[0]


def all_gather_object(ctx: DistContext, obj: Any) -> list[Any]:
    if not ctx.enabled:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def shutdown(ctx: DistContext) -> None:
    """Leave together, after the objects that use the group (a DDP wrapper) are gone.

    Call it once training code has returned: a process group torn down under a live DDP reducer can
    leave the process hanging at exit.
    """
    if ctx.enabled and dist.is_initialized():
        gc.collect()  # DDP modules sit in reference cycles; free them while the group still exists
        dist.barrier()
        dist.destroy_process_group()
