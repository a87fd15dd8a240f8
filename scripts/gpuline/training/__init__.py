"""The training side of the orchestrator: supervising the trainer, checkpoints, datasets, preflight checks.

The modules, each with one job:

- :mod:`~gpuline.training.request`: what the supervisor takes and returns (TrainRequest, TrainOutcome,
  SmokeResult) and where a run keeps its local state (RunPaths)
- :mod:`~gpuline.training.supervisor`: the supervise loop and its one stop path
- :mod:`~gpuline.training.launch`: the torchrun command line, the project's interpreter, the child's environment
- :mod:`~gpuline.training.process`: child processes, their process groups and signals
- :mod:`~gpuline.training.metrics`: the metrics and eval files the trainer writes
- :mod:`~gpuline.training.uploader`: the background checkpoint uploader
- :mod:`~gpuline.training.resume`: choosing the checkpoint a run resumes from
- :mod:`~gpuline.training.smoke`: preflight's import check and smoke test
- :mod:`~gpuline.training.checkpoints`, :mod:`~gpuline.training.dataset`, :mod:`~gpuline.training.compat`,
  :mod:`~gpuline.training.imds`: checkpoint layout, datasets, torch/CUDA compatibility, EC2 spot notices

The names below are loaded on first use, so importing this package costs nothing: the supervisor
pulls in the storage layer, and the CLI must start without it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gpuline.training.launch import entry_command, launch_argv
    from gpuline.training.metrics import loss_curve, read_metrics
    from gpuline.training.process import process_start_ticks
    from gpuline.training.request import RunPaths, SmokeResult, StopReason, TrainOutcome, TrainRequest
    from gpuline.training.resume import ResumePoint, find_resume_point
    from gpuline.training.smoke import check_entrypoint_imports, smoke_test
    from gpuline.training.supervisor import supervise

# Public name -> the module it lives in.
_HOMES = {
    "RunPaths": "request",
    "SmokeResult": "request",
    "StopReason": "request",
    "TrainOutcome": "request",
    "TrainRequest": "request",
    "supervise": "supervisor",
    "launch_argv": "launch",
    "entry_command": "launch",
    "read_metrics": "metrics",
    "loss_curve": "metrics",
    "process_start_ticks": "process",
    "ResumePoint": "resume",
    "find_resume_point": "resume",
    "smoke_test": "smoke",
    "check_entrypoint_imports": "smoke",
}

__all__ = [
    "ResumePoint",
    "RunPaths",
    "SmokeResult",
    "StopReason",
    "TrainOutcome",
    "TrainRequest",
    "check_entrypoint_imports",
    "entry_command",
    "find_resume_point",
    "launch_argv",
    "loss_curve",
    "process_start_ticks",
    "read_metrics",
    "smoke_test",
    "supervise",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
