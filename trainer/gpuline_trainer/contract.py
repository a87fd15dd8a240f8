"""The entrypoint contract, read from the environment the gpuline supervisor sets.

Run outside the supervisor (``python train.py`` on a laptop) every path falls back to a folder in the
working directory, so the same script works both ways.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


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
        env = os.environ if environ is None else environ

        def path(name: str, default: Path) -> Path:
            value = env.get(name)
            return Path(value) if value else default

        raw = env.get("GPULINE_HPARAMS") or "{}"
        try:
            hparams = json.loads(raw)
        except ValueError as exc:
            raise ValueError(f"GPULINE_HPARAMS is not JSON: {exc}") from exc
        if not isinstance(hparams, dict):
            raise ValueError("GPULINE_HPARAMS must be a JSON object")
        resume = env.get("GPULINE_RESUME_FROM")
        dataset = env.get("GPULINE_DATASET_PATH")
        duration = env.get("GPULINE_MAX_DURATION_S")
        stopped = env.get("GPULINE_STOPPED_PATH")
        return cls(
            run_id=env.get("GPULINE_RUN_ID") or "local",
            checkpoint_dir=path("GPULINE_CHECKPOINT_DIR", local_dir / "checkpoints"),
            resume_from=Path(resume) if resume else None,
            checkpoint_interval=max(int(env.get("GPULINE_CHECKPOINT_INTERVAL") or 100), 1),
            metrics_path=path("GPULINE_METRICS_PATH", local_dir / "metrics.jsonl"),
            eval_path=path("GPULINE_EVAL_PATH", local_dir / "eval.json"),
            output_dir=path("GPULINE_OUTPUT_DIR", local_dir / "output"),
            dataset_path=Path(dataset) if dataset else None,
            hparams=hparams,
            smoke=env.get("GPULINE_SMOKE") == "1",
            max_duration_s=float(duration) if duration else None,
            stopped_path=Path(stopped) if stopped else None,
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
