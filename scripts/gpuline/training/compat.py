"""Will the requested GPU run this torch build? Checked from package metadata and tables, never by
importing torch (preflight runs on a CPU runner before any GPU is bought).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field
from importlib import metadata

# Compute capability of each GPU model (NVIDIA's published table).
COMPUTE_CAPABILITY = {
    "t4": 7.5,
    "v100": 7.0,
    "a10g": 8.6,
    "l4": 8.9,
    "a100": 8.0,
    "h100": 9.0,
    "h200": 9.0,
    "l40s": 8.9,
}
# Oldest and newest architectures shipped in the official CUDA wheels of torch 2.4-2.13 per CUDA line.
CUDA_ARCH_RANGE = {
    "11.8": (3.7, 9.0),
    "12.1": (5.0, 9.0),
    "12.4": (5.0, 9.0),
    "12.6": (5.0, 9.0),
    "12.8": (7.5, 12.0),
    "12.9": (7.5, 12.0),
    "13.0": (7.5, 12.0),
}
# Minimum Linux driver for each CUDA runtime (CUDA release notes, table 3; minor-version compatibility).
MIN_DRIVER = {"11": (450, 80), "12": (525, 60), "13": (580, 0)}


@dataclass
class CompatReport:
    torch_version: str | None
    cuda: str | None
    driver: str | None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def torch_build() -> tuple[str | None, str | None]:
    """(torch version, CUDA version of the build or None for CPU builds), from installed metadata."""
    try:
        version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None, None
    local = version.partition("+")[2]
    match = re.fullmatch(r"cu(\d+)(\d)", local)
    if match:
        return version, f"{int(match.group(1))}.{match.group(2)}"
    if local == "cpu":
        return version, None
    # Plain versions from the default index are CUDA builds on Linux (12.x).
    return version, "12.8" if local == "" else None


def driver_version() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def check(
    gpu_type: str,
    gpu_count: int,
    torch_version: str | None = None,
    cuda: str | None = None,
    driver: str | None = None,
    detect: bool = True,
) -> CompatReport:
    if detect:
        torch_version, cuda = torch_build()
        driver = driver_version()
    report = CompatReport(torch_version, cuda, driver)
    if gpu_count == 0 or gpu_type == "cpu":
        report.notes.append("CPU-only run: no CUDA requirements")
        return report
    if torch_version is None:
        report.notes.append("torch is not installed here; the training image's torch is checked on the machine")
        return report
    if cuda is None:
        report.notes.append(f"torch {torch_version} here is a CPU build; the GPU machine must install a CUDA build")
        return report
    capability = COMPUTE_CAPABILITY.get(gpu_type)
    arch = CUDA_ARCH_RANGE.get(cuda)
    if capability is not None and arch is not None and not arch[0] <= capability <= arch[1]:
        report.problems.append(
            f"torch {torch_version} (CUDA {cuda}) has no kernels for {gpu_type} (compute capability {capability})"
        )
    if driver is not None:
        need = MIN_DRIVER.get(cuda.split(".")[0])
        have = tuple(int(p) for p in driver.split(".")[:2])
        if need is not None and have < need:
            report.problems.append(f"driver {driver} is older than CUDA {cuda} needs ({need[0]}.{need[1]}+)")
    return report
