"""Evaluates ONE trained model on the held-out digits: gpuline.yml's eval.command.

gpuline runs it on the candidate and on the production model in eval-gate, and on the promoted
model again after promotion (``gpuline verify``). The model's files are in ``GPULINE_MODEL_PATH``,
the dataset in ``GPULINE_DATASET_PATH``; the metrics go to ``GPULINE_EVAL_PATH`` as JSON. Outside
gpuline: ``GPULINE_MODEL_PATH=DIR python evaluate.py`` prints them.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from train import HERE, DigitsMLP, evaluate, load_split


def main() -> int:
    model_dir = Path(os.environ["GPULINE_MODEL_PATH"])
    config = json.loads((model_dir / "model.json").read_text())
    model = DigitsMLP(int(config["hidden"]))
    model.load_state_dict(torch.load(model_dir / "model.pt", weights_only=True))
    torch.set_num_threads(1)
    _, _, x_test, y_test = load_split(Path(os.environ.get("GPULINE_DATASET_PATH") or HERE / "data" / "digits.npz"))
    metrics = evaluate(model, x_test, y_test)
    out = os.environ.get("GPULINE_EVAL_PATH")
    if out:
        Path(out).write_text(json.dumps(metrics, indent=2))
    print(f"evaluated {model_dir}: accuracy {metrics['accuracy']:.4f}, loss {metrics['loss']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
