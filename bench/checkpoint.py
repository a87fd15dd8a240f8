"""Checkpoint benchmark: how long training stalls, how fast checkpoints reach S3, how fast a stop is safe.

Measures, in one run, against an S3 server (moto, started here on 127.0.0.1 unless --endpoint is given)
with a state of --size-mb (default 1024, half "model", half "optimizer"):

  (a) the loop's stall per checkpoint: gpuline_trainer's TorchCheckpointer vs the synchronous pattern
      (torch.save to a file, then boto3 upload_file) and vs torch.distributed.checkpoint.async_save;
  (b) upload throughput, best of a few: gpuline.storage.upload_checkpoint vs bare boto3 upload_file
      (same TransferConfig);
  (c) seconds from SIGTERM (to the supervisor) until the final checkpoint is durable in S3, both ways
      side by side: pipelined (the uploader streams each file's parts while the trainer serialises
      it) and sequential (the upload starts once the checkpoint is committed), against the floor
      (one copy into fresh memory) plus a bare upload_file of the same bytes, and the bare upload alone;
  and the floor: one copy of the state into fresh CPU memory.

    python bench/checkpoint.py                 # 1 GiB, a few minutes
    python bench/checkpoint.py --size-mb 64    # a quick check
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import boto3
import torch

from gpuline.storage import S3Storage, open_storage, transfer_config, upload_checkpoint
from gpuline.training import TrainRequest, checkpoints, supervise
from gpuline.training.uploader import CheckpointUploader
from gpuline_trainer import TorchCheckpointer

BUCKET = "gpuline-bench"
MIB = 1024 * 1024


# ---------------------------------------------------------------- setup


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def s3_server(endpoint: str | None) -> Iterator[str]:
    """A moto server in its own process (so it does not share this process's GIL), or the given one."""
    os.environ.update(
        {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    )
    if endpoint:
        os.environ["AWS_ENDPOINT_URL"] = endpoint
        yield endpoint
        return
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/moto-api/", timeout=1).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        os.environ["AWS_ENDPOINT_URL"] = url
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def reset_bucket(endpoint: str) -> None:
    """Empty the server between phases: moto keeps objects in RAM."""
    if "127.0.0.1" in endpoint:
        with urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST", data=b"")):
            pass
    client = boto3.client("s3")
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
        client.create_bucket(Bucket=BUCKET)


def make_state(size_mb: int, tensors: int = 8) -> dict[str, dict[str, torch.Tensor]]:
    per = size_mb * MIB // 4 // tensors
    torch.manual_seed(0)
    flat = [torch.randn(per) for _ in range(tensors)]
    half = tensors // 2
    return {
        "model": {f"layer{i}.weight": t for i, t in enumerate(flat[:half])},
        "optimizer": {f"layer{i}.momentum": t for i, t in enumerate(flat[half:])},
    }


def tensors_of(state: dict[str, dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    return [t for group in state.values() for t in group.values()]


def timed(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


# ---------------------------------------------------------------- (a) stalls


def floor_copy(state: dict[str, dict[str, torch.Tensor]], repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        copies = [t.clone() for t in tensors_of(state)]
        samples.append(time.perf_counter() - started)
        del copies
    return statistics.median(samples)


def ours_stalls(state: dict[str, dict[str, torch.Tensor]], work: Path, saves: int) -> list[float]:
    ckpt = TorchCheckpointer(work / "ours", "bench")
    stalls = []
    for step in range(1, saves + 1):
        stalls.append(ckpt.save(step, state))
        ckpt.wait()  # training steps between saves outlast the background write
        for t in tensors_of(state):
            t.add_(1e-3)
        checkpoints.prune(work / "ours", 1)
    return stalls


def synchronous_stall(state: dict[str, dict[str, torch.Tensor]], work: Path, saves: int) -> float:
    client = boto3.client("s3")
    config = transfer_config()
    samples = []
    for step in range(saves):
        path = work / "sync.pt"

        def save_and_upload(path: Path = path, step: int = step) -> None:
            torch.save(state, path)
            client.upload_file(str(path), BUCKET, f"sync/step-{step}.pt", Config=config)

        samples.append(timed(save_and_upload))
        path.unlink()
    return statistics.median(samples)


def dcp_stalls(state: dict[str, dict[str, torch.Tensor]], work: Path, saves: int) -> list[float] | str:
    try:
        from torch.distributed.checkpoint.state_dict_saver import async_save
    except ImportError as exc:
        return f"n/a ({exc})"
    stalls = []
    try:
        for step in range(saves):
            target = work / f"dcp-{step}"
            started = time.perf_counter()
            future: Any = async_save(state, checkpoint_id=str(target), no_dist=True)
            stalls.append(time.perf_counter() - started)
            # Older torch returns a Future; newer may return a response holding one.
            (future if hasattr(future, "result") else future.upload_completion).result()
            shutil.rmtree(target, ignore_errors=True)
    except Exception as exc:  # a torch build without async DCP support on this platform
        return f"n/a ({type(exc).__name__}: {exc})"
    return stalls


# ---------------------------------------------------------------- (b) throughput


def throughput(
    state: dict[str, dict[str, torch.Tensor]], work: Path, endpoint: str, repeats: int
) -> tuple[float, float]:
    ckpt = TorchCheckpointer(work / "tp", "bench")
    ckpt.save(1, state, block=True)
    local = work / "tp" / "step-00000001"
    files = sorted(p for p in local.iterdir() if p.name != checkpoints.MANIFEST)
    size = sum(p.stat().st_size for p in files)
    client = boto3.client("s3")
    config = transfer_config()
    store = S3Storage(BUCKET, "ours")
    store.client.list_objects_v2(Bucket=BUCKET)  # a warm client, as in a running supervisor
    ours, bare = [], []

    def upload_bare(prefix: str) -> None:
        for path in files:
            client.upload_file(str(path), BUCKET, f"{prefix}/{path.name}", Config=config)

    def measure_bare(i: int) -> None:
        reset_bucket(endpoint)
        bare.append(size / MIB / timed(functools.partial(upload_bare, f"bare/{i}")))

    def measure_ours(i: int) -> None:
        reset_bucket(endpoint)
        ours.append(size / MIB / timed(functools.partial(upload_checkpoint, store, local, f"ours/{i}")))

    # ABBA order, best of each: what other work on a shared machine takes away hits both alike.
    for i in range(repeats):
        first, second = (measure_bare, measure_ours) if i % 2 == 0 else (measure_ours, measure_bare)
        first(i)
        second(i)
    shutil.rmtree(work / "tp")
    return max(ours), max(bare)


def bare_upload_seconds(state: dict[str, dict[str, torch.Tensor]], work: Path, endpoint: str) -> float:
    path = work / "bare.pt"
    torch.save(state, path)
    reset_bucket(endpoint)
    seconds = timed(lambda: boto3.client("s3").upload_file(str(path), BUCKET, "bare.pt", Config=transfer_config()))
    path.unlink()
    return seconds


# ---------------------------------------------------------------- (c) SIGTERM to durable

TRAINER = textwrap.dedent(
    """
    import sys, time, torch
    from gpuline_trainer import Contract, run_loop

    contract = Contract.from_env()
    per = contract.hparam("size_mb", 1024) * 1024 * 1024 // 4 // 8
    torch.manual_seed(0)
    flat = [torch.randn(per) for _ in range(8)]

    def state():
        return {"model": {f"p{i}": t for i, t in enumerate(flat[:4])},
                "optimizer": {f"m{i}": t for i, t in enumerate(flat[4:])}}

    def train_step(step):
        time.sleep(0.02)
        return 1.0 / step

    result = run_loop(contract, total_steps=10**9, train_step=train_step, state=state,
                      load_state=lambda s: None, log_every=0)
    sys.exit(143 if result.stopped else 0)
    """
)


@contextmanager
def upload_path(pipelined: bool) -> Iterator[None]:
    """The supervisor's uploader streams checkpoints being written (pipelined) or waits for the commit."""
    before = CheckpointUploader.streaming
    CheckpointUploader.streaming = pipelined
    try:
        yield
    finally:
        CheckpointUploader.streaming = before


def sigterm_to_durable(size_mb: int, work: Path, endpoint: str, *, pipelined: bool) -> float:
    reset_bucket(endpoint)
    name = "pipelined" if pipelined else "sequential"
    project = work / f"project-{name}"
    project.mkdir(exist_ok=True)
    (project / "train.py").write_text(TRAINER)
    lines: list[tuple[float, str]] = []
    sent: list[float] = []

    def log(line: str) -> None:
        lines.append((time.perf_counter(), line))

    request = TrainRequest(
        run_id="bench",
        command=[sys.executable, "train.py"],
        cwd=project,
        workdir=work / f"run-{name}",
        storage=open_storage(f"s3://{BUCKET}/sigterm", work),
        storage_prefix="runs/bench",
        hyperparameters={"size_mb": size_mb},
        dataset_path=None,
        checkpoint_interval=10**9,  # no interval saves: the stop-time save is the first, as on a fresh node
        keep=1,
        max_duration_s=3600,
        max_restarts=0,
        allow_fresh_start=True,
        log=log,
        imds_endpoint="off",
    )
    metrics = request.workdir / "metrics.jsonl"

    def stop_when_training() -> None:
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 20):
            time.sleep(0.05)
        sent.append(time.perf_counter())
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=stop_when_training, daemon=True).start()
    with upload_path(pipelined):
        outcome = supervise(request)

    def first(*texts: str) -> float:
        found = [t for t, line in lines if any(text in line for text in texts)]
        if not found or not sent or outcome.stop_reason != "preempted":
            raise RuntimeError(f"the stop did not go as planned: {outcome.stop_reason}; {lines[-5:]}")
        return found[0] - sent[0]

    step = outcome.final_step
    durable = first(f"checkpoint step {step} is durable")
    saving = first("stop requested (SIGTERM)")
    uploading = first(f"uploading checkpoint step {step}", f"streaming checkpoint step {step}")
    streamed = any(f"streaming checkpoint step {step}" in line for _, line in lines)
    how = "streaming while it is written" if streamed else "committed and uploading"
    print(
        f"SIGTERM path ({name}): trainer saving at +{saving:.2f} s, {how} at +{uploading:.2f} s, "
        f"durable at +{durable:.2f} s"
    )
    if pipelined and not streamed:
        print("  (the save was committed before the uploader looked: this pipelined run went the sequential way)")
    shutil.rmtree(request.workdir, ignore_errors=True)
    return durable


def stop_paths(size_mb: int, work: Path, endpoint: str, rounds: int) -> tuple[float, float]:
    """Median seconds SIGTERM-to-durable, (sequential, pipelined), in ABBA order over ``rounds``."""
    sequential, pipelined = [], []
    for i in range(rounds):
        for streaming in (False, True) if i % 2 == 0 else (True, False):
            seconds = sigterm_to_durable(size_mb, work, endpoint, pipelined=streaming)
            (pipelined if streaming else sequential).append(seconds)
    return statistics.median(sequential), statistics.median(pipelined)


# ---------------------------------------------------------------- report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=1024, help="size of the state (default 1024)")
    parser.add_argument("--saves", type=int, default=3, help="saves per stall measurement (default 3)")
    parser.add_argument("--endpoint", help="an S3 endpoint to use instead of starting a moto server")
    parser.add_argument(
        "--stop-rounds", type=int, default=1, help="SIGTERM runs of each stop path, ABBA order, median (default 1)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    with s3_server(args.endpoint) as endpoint, tempfile.TemporaryDirectory(prefix="gpuline-bench-") as tmp:
        work = Path(tmp)
        reset_bucket(endpoint)
        state = make_state(args.size_mb)
        size_mib = sum(t.numel() * t.element_size() for t in tensors_of(state)) / MIB
        print(f"state: {size_mib:.0f} MiB in {len(tensors_of(state))} tensors; S3 at {endpoint}; {os.cpu_count()} CPUs")
        floor = floor_copy(state, args.saves)
        ours = ours_stalls(state, work, args.saves)
        dcp = dcp_stalls(state, work, args.saves)
        reset_bucket(endpoint)
        sync = synchronous_stall(state, work, max(1, args.saves - 1))
        ours_tp, bare_tp = throughput(state, work, endpoint, max(2, args.saves))
        # (c) is bracketed by its baseline, so load from other work on the machine hits both alike.
        bare_before = bare_upload_seconds(state, work, endpoint)
        floor_c = floor_copy(state, 1)
        sequential_s, pipelined_s = stop_paths(args.size_mb, work, endpoint, max(1, args.stop_rounds))
        bare_s = (bare_before + bare_upload_seconds(state, work, endpoint)) / 2
        del state

    steady = statistics.median(ours[1:]) if len(ours) > 1 else ours[0]
    rows: list[tuple[str, str, str, str, str]] = [
        ("floor: one copy into fresh CPU memory", f"{floor:.3f} s", "", "", ""),
        (
            "stall per checkpoint, first save",
            f"{ours[0]:.3f} s",
            f"floor {floor:.3f} s",
            f"{ours[0] / floor:.2f}x",
            "<= 1.2x",
        ),
        (
            "stall per checkpoint, later saves",
            f"{steady:.3f} s",
            f"floor {floor:.3f} s",
            f"{steady / floor:.2f}x",
            "<= 1.2x",
        ),
    ]
    if isinstance(dcp, list):
        dcp_s = statistics.median(dcp)
        rows.append(
            ("stall vs DCP async_save", f"{steady:.3f} s", f"{dcp_s:.3f} s", f"{steady / dcp_s:.2f}x", "<= 1.0x")
        )
    else:
        rows.append(("stall vs DCP async_save", f"{steady:.3f} s", dcp, "", "<= 1.0x"))
    rows += [
        ("stall vs torch.save + upload_file", f"{steady:.3f} s", f"{sync:.2f} s", f"{steady / sync:.3f}x", ""),
        (
            "upload throughput",
            f"{ours_tp:.0f} MiB/s",
            f"bare upload_file {bare_tp:.0f} MiB/s",
            f"{ours_tp / bare_tp:.2f}x",
            ">= 0.9x",
        ),
        (
            "SIGTERM to durable checkpoint, sequential",
            f"{sequential_s:.2f} s",
            f"floor + bare upload {floor_c + bare_s:.2f} s",
            f"{sequential_s / (floor_c + bare_s):.2f}x",
            "<= 1.3x and < 30 s",
        ),
        (
            "SIGTERM to durable checkpoint, pipelined",
            f"{pipelined_s:.2f} s",
            f"floor + bare upload {floor_c + bare_s:.2f} s",
            f"{pipelined_s / (floor_c + bare_s):.2f}x",
            "< sequential",
        ),
        (
            "pipelined vs bare upload alone",
            f"{pipelined_s:.2f} s",
            f"bare upload {bare_s:.2f} s",
            f"{pipelined_s / bare_s:.2f}x",
            "-> 1.0x",
        ),
        (
            "pipelined vs sequential",
            f"{pipelined_s:.2f} s",
            f"sequential {sequential_s:.2f} s",
            f"{pipelined_s / sequential_s:.2f}x",
            "< 1.0x",
        ),
    ]
    print()
    print("| measure | gpuline | baseline | ratio | goal |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
