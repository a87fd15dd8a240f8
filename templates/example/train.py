"""Reference trainer: a small MLP on the 8x8 handwritten digits, written against the gpuline contract.

Deterministic given ``seed``: a run stopped by SIGTERM at any step and resumed from its checkpoint ends
with the same weights, bit for bit, as a run that never stopped. Works as one process, under
``torchrun`` on many (gloo on CPU), and standalone (``python train.py``) outside gpuline.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from gpuline_trainer import Contract, ResumableBatches, StopFlag, ddp, run_loop, run_smoke
from gpuline_trainer.signals import EXIT_CODE

HERE = Path(__file__).resolve().parent
SPLIT_SEED = 20240601  # the train/test split never changes with the training seed
TEST_FRACTION = 0.2


class DigitsMLP(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out


def load_split(path: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    with np.load(path) as data:
        x = torch.from_numpy(data["x"].astype(np.float32))
        y = torch.from_numpy(data["y"].astype(np.int64))
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_test = int(len(y) * TEST_FRACTION)
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    model.eval()
    with torch.no_grad():
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, y).item()
        predicted = logits.argmax(dim=1)
        slices = {
            f"digit={d}": {"accuracy": round((predicted[y == d] == d).float().mean().item(), 4)} for d in range(10)
        }
        timings = []
        for i in range(200):  # one-example latency, the way a serving path calls it
            sample = x[i % len(x)].unsqueeze(0)
            started = time.perf_counter()
            model(sample)
            timings.append((time.perf_counter() - started) * 1000)
    return {
        "accuracy": round((predicted == y).float().mean().item(), 4),
        "loss": round(loss, 4),
        "slices": slices,
        "latency_ms_p50": round(statistics.median(timings), 4),
        "examples": len(y),
    }


def main() -> int:
    contract = Contract.from_env()
    ctx = ddp.init_from_env()
    try:
        return train(contract, ctx)
    finally:
        # Everything that holds the process group (the DDP wrapper, its reducer) is gone by now.
        ddp.shutdown(ctx)


def train(contract: Contract, ctx: ddp.DistContext) -> int:
    steps = contract.hparam("steps", 600)
    batch_size = contract.hparam("batch_size", 64)
    lr = contract.hparam("lr", 0.05)
    seed = contract.hparam("seed", 0)
    hidden = contract.hparam("hidden", 64)

    # Bit-identical resumes need deterministic kernels and a fixed thread count.
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    torch.manual_seed(seed)

    x_train, y_train, x_test, y_test = load_split(contract.dataset(HERE / "data" / "digits.npz"))
    model = DigitsMLP(hidden)
    trained: nn.Module = DistributedDataParallel(model) if ctx.enabled else model
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    # Linear decay over the real run; the smoke test keeps the full rate so its verdict does not depend
    # on how many steps a tier trains.
    decay_over = 10**9 if contract.smoke else max(steps, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.1, 1.0 - s / decay_over))
    loss_fn = nn.CrossEntropyLoss()

    def step_on(idx: torch.Tensor) -> float:
        trained.train()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(trained(x_train[idx]), y_train[idx])
        loss.backward()
        optimizer.step()
        scheduler.step()
        return float(loss.item())

    if contract.smoke:
        one_batch = torch.arange(batch_size)
        run_smoke(contract, lambda _: step_on(one_batch))
        # The smoke model too: preflight runs eval.command on it, so a gate naming a metric that
        # evaluate.py never writes fails before a GPU is bought (and the estimate times the eval).
        save_model(contract, model, hidden, steps=20)
        return 0

    batches = ResumableBatches(len(y_train), batch_size, seed, rank=ctx.rank, world_size=ctx.world_size)

    def state() -> dict[str, Any]:
        return {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "data": batches.state_dict(),
        }

    def load_state(saved: dict[str, Any]) -> None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        batches.load_state_dict(saved["data"])

    result = run_loop(
        contract,
        total_steps=steps,
        train_step=lambda _: step_on(batches.next()),
        state=state,
        load_state=load_state,
        ctx=ctx,
        stop=StopFlag(),
        log_every=100,
    )
    if result.stopped:
        return EXIT_CODE
    if ctx.is_main:
        metrics = evaluate(model, x_test, y_test)
        save_model(contract, model, hidden, steps=result.step)
        contract.eval_path.parent.mkdir(parents=True, exist_ok=True)
        contract.eval_path.write_text(json.dumps(metrics, indent=2))
        print(f"eval: accuracy {metrics['accuracy']:.4f}, loss {metrics['loss']:.4f} on {len(y_test)} examples")
    return 0


def save_model(contract: Contract, model: torch.nn.Module, hidden: int, *, steps: int) -> None:
    """The model's weights and the shape evaluate.py rebuilds it from, in GPULINE_OUTPUT_DIR."""
    contract.output_dir.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), contract.output_dir / "model.pt")
    config = {"architecture": "mlp", "inputs": 64, "hidden": hidden, "classes": 10, "steps": steps}
    (contract.output_dir / "model.json").write_text(json.dumps(config, indent=2))


if __name__ == "__main__":
    sys.exit(main())
