"""How the trainer is launched: its command line, the interpreter behind it, and its environment.

The one builder of a torchrun command line. The supervisor runs it as ``<python> -m
torch.distributed.run`` (the project's interpreter, which has torch); a Kubernetes pod runs the
image's ``torchrun``. Both decide the same way whether the entrypoint is a Python script (torchrun
runs it itself) or another program (``--no-python``).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from gpuline import contract
from gpuline.errors import InputError

TORCHRUN = ("torchrun",)
_PYTHON_NAME = re.compile(r"python(3(\.\d+)?)?")


def runs_python(command: Sequence[str]) -> bool:
    """Whether the command's program is a Python interpreter: ``python``, ``python3.12``, ``/venv/bin/python``."""
    return bool(command) and _PYTHON_NAME.fullmatch(Path(command[0]).name) is not None


def python_interpreter(command: Sequence[str] = (), python: str | None = None) -> str:
    """The interpreter that runs the project's code.

    The command's own program when that is Python (it is the one with the project's packages, torch
    among them); else ``python``, the project's interpreter where the caller knows it
    (``GPULINE_PYTHON``, set when gpuline lives in a venv of its own); else the one gpuline runs under.
    """
    if runs_python(command):
        return command[0]
    return python or sys.executable


def entry_command(command: Sequence[str], python: str | None = None) -> list[str]:
    """gpuline.yml's command as the project runs it: a bare ``python`` (or ``python3``) there means the
    project's interpreter (see :func:`python_interpreter`), not whichever is first on PATH."""
    argv = list(command)
    if argv and argv[0] in ("python", "python3"):
        argv[0] = python_interpreter(python=python)
    return argv


def entrypoint_args(command: Sequence[str]) -> list[str]:
    """What follows torchrun's options: torchrun runs a Python script itself, any other program with ``--no-python``."""
    return list(command[1:]) if runs_python(command) else ["--no-python", *command]


def torchrun_argv(
    command: Sequence[str],
    *,
    run_id: str,
    nnodes: int,
    nprocs_per_node: int,
    rdzv: str | None,
    launcher: Sequence[str] = TORCHRUN,
) -> list[str]:
    """torchrun around ``command``: standalone on one node, else meeting at the c10d endpoint ``rdzv``."""
    argv = [*launcher, f"--nnodes={nnodes}", f"--nproc-per-node={nprocs_per_node}"]
    # Restarts belong to whoever runs torchrun: the supervisor resumes from the newest checkpoint,
    # torchrun would not (and a Kubernetes Job has its own backoffLimit).
    argv.append("--max-restarts=0")
    if nnodes > 1:
        if not rdzv:
            raise InputError(
                f"run {run_id} spans {nnodes} nodes but no rendezvous endpoint is set",
                hint=f"set {contract.RDZV_ENDPOINT}=HOST:PORT (reachable from every node) on each node",
            )
        argv += ["--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv}", f"--rdzv-id={run_id}"]
    else:
        argv.append("--standalone")
    return argv + entrypoint_args(command)


def launch_argv(command: list[str], *, run_id: str, nnodes: int, nprocs_per_node: int, rdzv: str | None) -> list[str]:
    """The command itself, or torchrun around it when the run has more than one process."""
    if nnodes * nprocs_per_node <= 1:
        return list(command)
    launcher = [python_interpreter(command), "-m", "torch.distributed.run"]
    return torchrun_argv(
        command, run_id=run_id, nnodes=nnodes, nprocs_per_node=nprocs_per_node, rdzv=rdzv, launcher=launcher
    )


def child_env(trainer_env: Mapping[str, str], extra: Mapping[str, str]) -> dict[str, str]:
    """This process's environment less the names that describe one launch, then the contract, then extras."""
    env = {k: v for k, v in os.environ.items() if k not in contract.PER_LAUNCH}
    env.update(trainer_env)
    env.update(extra)
    return env
