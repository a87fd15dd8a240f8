"""gpuline_trainer: the torch side of gpuline (install with the ``train`` extra).

Checkpoints that survive preemption, the entrypoint contract as a typed object, SIGTERM handling,
DDP setup from torchrun's environment and a small resumable training loop. Output that cannot be
written (a supervisor gone) is dropped rather than raised, so it never costs the final checkpoint.
"""

from gpuline_trainer.checkpoint import TorchCheckpointer, rng_state, set_rng_state, snapshot
from gpuline_trainer.contract import Contract
from gpuline_trainer.ddp import DistContext
from gpuline_trainer.loop import LoopResult, MetricsWriter, ResumableBatches, run_loop, run_smoke
from gpuline_trainer.output import keep_output_alive
from gpuline_trainer.signals import EXIT_CODE as STOPPED_EXIT_CODE
from gpuline_trainer.signals import StopFlag

__all__ = [
    "STOPPED_EXIT_CODE",
    "Contract",
    "DistContext",
    "LoopResult",
    "MetricsWriter",
    "ResumableBatches",
    "StopFlag",
    "TorchCheckpointer",
    "keep_output_alive",
    "rng_state",
    "run_loop",
    "run_smoke",
    "set_rng_state",
    "snapshot",
]
