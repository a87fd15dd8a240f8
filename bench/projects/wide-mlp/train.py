"""A differently shaped trainer for the estimate benchmark: a wide MLP on 20 MB of features.

Against the reference example it has a heavier data load (the dataset is standardised on load), a
step about 30x as expensive, a model of ~3 MB whose checkpoints are saved every 20 steps, and an
evaluation in eval.command only. In smoke mode it honours the contract's checkpoint interval and
writes its model, so the smoke test can time a checkpoint save and eval.command too.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gpuline_trainer import Contract, MetricsWriter, ResumableBatches, StopFlag, TorchCheckpointer, run_loop
from gpuline_trainer.signals import EXIT_CODE

HERE = Path(__file__).resolve().parent


def load(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    with np.load(path) as data:
        x, y = data["x"], data["y"]
    x = (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-6)  # standardised on load, as real pipelines do
    return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y)


def model_for(hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(256, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def save_model(contract: Contract, model: nn.Module, hidden: int, steps: int) -> None:
    contract.output_dir.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), contract.output_dir / "model.pt")
    (contract.output_dir / "model.json").write_text(json.dumps({"hidden": hidden, "steps": steps}))


def smoke(contract: Contract, step_on: Any, state: Any, model: nn.Module, hidden: int, batch: int) -> int:
    """20 steps on one batch; saves at the contract's interval and writes the model, like a real run."""
    metrics = MetricsWriter(contract.metrics_path)
    checkpointer = TorchCheckpointer(contract.checkpoint_dir, contract.run_id)
    one_batch = torch.arange(batch)
    for step in range(1, 21):
        metrics.write(step, step_on(one_batch))
        if step % contract.checkpoint_interval == 0:
            checkpointer.save(step, state())
    checkpointer.wait()
    save_model(contract, model, hidden, 20)
    return 0


def main() -> int:
    contract = Contract.from_env()
    steps, batch, hidden = (
        contract.hparam("steps", 200),
        contract.hparam("batch_size", 512),
        contract.hparam("hidden", 512),
    )
    torch.set_num_threads(1)
    torch.manual_seed(contract.hparam("seed", 0))
    x, y = load(contract.dataset(HERE / "data" / "features.npz"))
    model = model_for(hidden)
    optimizer = torch.optim.SGD(model.parameters(), lr=contract.hparam("lr", 0.05), momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    def step_on(idx: torch.Tensor) -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x[idx]), y[idx])
        loss.backward()
        optimizer.step()
        return float(loss.item())

    batches = ResumableBatches(len(y), batch, 0)

    def state() -> dict[str, Any]:
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "data": batches.state_dict()}

    def load_state(saved: dict[str, Any]) -> None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        batches.load_state_dict(saved["data"])

    if contract.smoke:
        return smoke(contract, step_on, state, model, hidden, batch)
    result = run_loop(
        contract,
        total_steps=steps,
        train_step=lambda _: step_on(batches.next()),
        state=state,
        load_state=load_state,
        stop=StopFlag(),
        log_every=50,
    )
    if result.stopped:
        return EXIT_CODE
    save_model(contract, model, hidden, result.step)
    return 0


if __name__ == "__main__":
    sys.exit(main())
