"""eval.command of the wide MLP: accuracy and loss of one model (GPULINE_MODEL_PATH) on a held-out slice."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from torch import nn
from train import HERE, load, model_for


def main() -> int:
    model_dir = Path(os.environ["GPULINE_MODEL_PATH"])
    model = model_for(int(json.loads((model_dir / "model.json").read_text())["hidden"]))
    model.load_state_dict(torch.load(model_dir / "model.pt", weights_only=True))
    x, y = load(Path(os.environ.get("GPULINE_DATASET_PATH") or HERE / "data" / "features.npz"))
    x, y = x[-4000:], y[-4000:]
    with torch.no_grad():
        logits = model(x)
    metrics = {
        "accuracy": round((logits.argmax(1) == y).float().mean().item(), 4),
        "loss": round(nn.functional.cross_entropy(logits, y).item(), 4),
    }
    out = os.environ.get("GPULINE_EVAL_PATH")
    if out:
        Path(out).write_text(json.dumps(metrics))
    print(f"evaluated {model_dir}: accuracy {metrics['accuracy']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
