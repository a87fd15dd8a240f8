"""The entrypoint contract, read from the environment the gpuline supervisor sets.

Run outside the supervisor (``python train.py`` on a laptop) every path falls back to a folder in the
working directory, so the same script works both ways. The names and their parsing live in
:mod:`gpuline.contract` (the standard library only), shared with the supervisor that writes them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpuline.contract import TrainerContract
from gpuline_trainer.output import keep_output_alive


@dataclass(frozen=True)
class Contract:
    run_id: str
    checkpoint_dir: Path
    resume_from: Path | None
    checkpoint_interval: int
    metrics_path: Path
    eval_path: Path
    output_dir: Path
    dataset_path: Path | None
    hparams: dict[str, Any] = field(default_factory=dict)
    smoke: bool = False
    max_duration_s: float | None = None
    stopped_path: Path | None = None

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, local_dir: Path = Path(".gpuline-local")
    ) -> Contract:
        """Raises ``ValueError`` naming the variable when a value cannot be parsed.

        Reading the contract also makes this process's stdout and stderr survive the supervisor
        that reads them dying (:func:`gpuline_trainer.output.keep_output_alive`).
        """
        keep_output_alive()
        read = TrainerContract.from_env(os.environ if environ is None else environ, local_dir=local_dir)
        return cls(
            run_id=read.run_id,
            checkpoint_dir=read.checkpoint_dir,
            resume_from=read.resume_from,
            checkpoint_interval=read.checkpoint_interval,
            metrics_path=read.metrics_path,
            eval_path=read.eval_path,
            output_dir=read.output_dir,
            dataset_path=read.dataset_path,
            hparams=read.hparams,
            smoke=read.smoke,
            max_duration_s=read.max_duration_s,
            stopped_path=read.stopped_path,
        )

    def hparam(self, name: str, default: Any) -> Any:
        """A hyperparameter, converted to the type of its default (JSON gives ints for 1.0 and so on)."""
        value = self.hparams.get(name, default)
        if default is not None and value is not None and not isinstance(value, type(default)):
            return type(default)(value)
        return value

    def note_stopped(self, step: int, reason: str) -> None:
        """Tell the supervisor this process stopped early on request (not crashed, not finished)."""
        if self.stopped_path is None:
            return
        self.stopped_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.stopped_path.with_name(f".{self.stopped_path.name}.{os.getpid()}")
        tmp.write_text(json.dumps({"step": step, "reason": reason}))
        os.replace(tmp, self.stopped_path)  # several ranks of one node may write it; each write is whole

    def dataset(self, fallback: Path) -> Path:
        return self.dataset_path if self.dataset_path is not None else fallback
