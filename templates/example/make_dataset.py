"""Build data/digits.npz from data/digits.csv.gz, byte for byte reproducibly.

The source is the UCI "Optical Recognition of Handwritten Digits" test set (1797 8x8 images, pixel
counts 0..16, by E. Alpaydin and C. Kaynak, CC BY 4.0; see data/README.md). The npz holds
``x`` float32 [N, 64] scaled to 0..1 and ``y`` int64 [N]. It is written as an uncompressed zip with
fixed timestamps so the same input always gives the same sha256 (the one pinned in gpuline.yml).

    python make_dataset.py            # writes data/digits.npz and prints its sha256
"""

from __future__ import annotations

import gzip
import hashlib
import io
import sys
import zipfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "data" / "digits.csv.gz"
TARGET = HERE / "data" / "digits.npz"


def load_source(path: Path = SOURCE) -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(path, "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.int64)
    return (table[:, :64] / 16.0).astype(np.float32), table[:, 64].astype(np.int64)


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            archive.writestr(info, buffer.getvalue())


def main() -> int:
    x, y = load_source()
    write_npz(TARGET, {"x": x, "y": y})
    digest = hashlib.sha256(TARGET.read_bytes()).hexdigest()
    print(f"{TARGET.relative_to(HERE)}: {x.shape[0]} examples, sha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
