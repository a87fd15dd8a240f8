"""Build data/features.npz: 20,000 synthetic examples of 256 features in 10 classes, reproducibly.

Written as an uncompressed zip with fixed timestamps, so the same seed always gives the same sha256;
``bench/estimate.py`` builds it and pins the hash into its copy of gpuline.yml.

    python make_dataset.py            # writes data/features.npz and prints its sha256
"""

from __future__ import annotations

import hashlib
import io
import sys
import zipfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
TARGET = HERE / "data" / "features.npz"
EXAMPLES, FEATURES, CLASSES = 20_000, 256, 10


def build(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (CLASSES, FEATURES)).astype(np.float32)
    y = rng.integers(0, CLASSES, EXAMPLES)
    x = centres[y] + rng.normal(0, 2.0, (EXAMPLES, FEATURES)).astype(np.float32)
    return {"x": x.astype(np.float32), "y": y.astype(np.int64)}


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            archive.writestr(info, buffer.getvalue())
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> int:
    print(write_npz(TARGET, build()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
