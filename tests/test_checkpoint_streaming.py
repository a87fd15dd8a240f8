"""Checkpoints streamed to the store while they are written: parts leave as soon as they exist, the
manifest still last, and a writer that dies (or bytes that do not match) never leaves anything that
claims completeness. Against a real S3 API (moto server on 127.0.0.1) and a local directory.

Every wait here is for something observable (a part listed by S3, a file in the store, a line from a
process), with a long deadline only as a hang guard.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import pytest

from fixtures_training import Recorder, make_request, when_metrics_reach
from gpuline.storage import LocalStorage, S3Storage, Storage, download_checkpoint, open_storage, remote_checkpoints
from gpuline.training import TrainRequest, checkpoints, supervise
from gpuline.training.checkpoints import MANIFEST, CheckpointInfo, commit_checkpoint
from gpuline.training.commit_watch import CommitWatch, in_progress
from gpuline.training.uploader import CheckpointUploader
from servers import MotoServer

MIB = 1024 * 1024
BUCKET = "ckpts"
PREFIX = "runs/run-test/checkpoints"
HANG_GUARD_S = 60.0


def wait_for(what: str, predicate: Callable[[], Any], timeout_s: float = HANG_GUARD_S) -> Any:
    """Poll an observable condition; the deadline only keeps a broken build from hanging."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def open_uploads() -> list[Any]:
    return list(boto3.client("s3").list_multipart_uploads(Bucket=BUCKET).get("Uploads", []))


def parts_in_flight() -> int:
    """Parts S3 already holds for the multipart uploads still open (before any object exists)."""
    client = boto3.client("s3")
    return sum(
        len(client.list_parts(Bucket=BUCKET, Key=u["Key"], UploadId=u["UploadId"]).get("Parts", []))
        for u in open_uploads()
    )


class ManifestOrder(S3Storage):
    """Notes, whenever a manifest is written, which of the checkpoint's objects already exist."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.present_at_manifest: list[list[str]] = []

    def put_bytes(self, key: str, data: bytes) -> None:
        if key.endswith(MANIFEST):
            names = json.loads(data)["files"]
            base = key.rsplit("/", 1)[0]
            self.present_at_manifest.append(sorted(n for n in names if self.exists(f"{base}/{n}")))
        super().put_bytes(key, data)


@pytest.fixture
def s3_store(aws_env: MotoServer, monkeypatch: pytest.MonkeyPatch) -> ManifestOrder:
    monkeypatch.setenv("GPULINE_S3_CHUNK_MB", "5")  # S3's smallest part: several parts per test file
    monkeypatch.setenv("GPULINE_S3_CONCURRENCY", "2")
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    return ManifestOrder(BUCKET, "team")


def uploader_for(tmp_path: Path, storage: Storage, rec: Recorder) -> CheckpointUploader:
    return CheckpointUploader(make_request(tmp_path, storage=storage, recorder=rec), tmp_path / "ckpts", {})


def sync_in_background(uploader: CheckpointUploader) -> tuple[threading.Thread, list[CheckpointInfo | None]]:
    result: list[CheckpointInfo | None] = []
    thread = threading.Thread(target=lambda: result.append(uploader.sync()), daemon=True)
    thread.start()
    return thread, result


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def remote_bytes(storage: S3Storage, key: str) -> bytes:
    body: bytes = boto3.client("s3").get_object(Bucket=BUCKET, Key=f"{storage.prefix}/{key}")["Body"].read()
    return body


# ---------------------------------------------------------------- the commit, watched from outside


def test_a_commit_under_way_is_writing_then_committed(tmp_path: Path) -> None:
    written, release = threading.Event(), threading.Event()
    states: list[str] = []

    def write(tmp: Path) -> None:
        (tmp / "model.pt").write_bytes(b"weights")
        written.set()
        release.wait(HANG_GUARD_S)

    writer = threading.Thread(target=lambda: commit_checkpoint(tmp_path, 3, run_id="r", writer=write))
    writer.start()
    assert written.wait(HANG_GUARD_S)
    [(step, path)] = in_progress(tmp_path)
    watch = CommitWatch(path)
    try:
        assert step == watch.step == 3 and watch.files() == ["model.pt"]
        states.append(watch.state())
        release.set()
        writer.join(HANG_GUARD_S)
        states.append(watch.state())
        assert watch.committed() == checkpoints.read_manifest(tmp_path / "step-00000003")
    finally:
        watch.close()
    assert states == ["writing", "committed"]
    assert in_progress(tmp_path) == []


def test_a_writer_that_fails_leaves_an_abandoned_commit(tmp_path: Path) -> None:
    written, release = threading.Event(), threading.Event()

    def write(tmp: Path) -> None:
        (tmp / "model.pt").write_bytes(b"half")
        written.set()
        release.wait(HANG_GUARD_S)
        raise RuntimeError("disk full")

    def commit() -> None:
        with pytest.raises(RuntimeError):
            commit_checkpoint(tmp_path, 4, run_id="r", writer=write)

    writer = threading.Thread(target=commit)
    writer.start()
    assert written.wait(HANG_GUARD_S)
    watch = CommitWatch(in_progress(tmp_path)[0][1])
    try:
        release.set()
        writer.join(HANG_GUARD_S)
        assert watch.state() == "abandoned"
    finally:
        watch.close()


# ---------------------------------------------------------------- S3


def test_a_checkpoint_written_in_slow_chunks_streams_into_exactly_that_file(
    tmp_path: Path, s3_store: ManifestOrder
) -> None:
    payload = os.urandom(23 * MIB)  # four 5 MiB parts and a short last one
    rec = Recorder()
    uploader = uploader_for(tmp_path, s3_store, rec)
    started = threading.Event()
    seen: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        with (tmp / "model.pt").open("wb") as fh:
            fh.write(payload[: 6 * MIB])
            fh.flush()
            started.set()
            # The writer is not finished, yet part of the file is already in S3 (and no object, no manifest).
            seen["parts"] = wait_for("a part uploaded while writing", parts_in_flight)
            seen["objects"] = s3_store.list(PREFIX)
            for offset in range(6 * MIB, len(payload), MIB):  # the rest in small, slow pieces
                fh.write(payload[offset : offset + MIB])
                fh.flush()
        (tmp / "extra.json").write_text('{"epoch": 3}')

    writer = threading.Thread(target=lambda: commit_checkpoint(tmp_path / "ckpts", 7, run_id="run-test", writer=write))
    writer.start()
    assert started.wait(HANG_GUARD_S)
    info = uploader.sync()
    writer.join(HANG_GUARD_S)

    assert info is not None and info.step == 7
    assert seen["parts"] >= 1 and seen["objects"] == []
    assert rec.matching("streaming checkpoint step 7")
    assert sha256(remote_bytes(s3_store, f"{PREFIX}/step-00000007/model.pt")) == sha256(payload)
    assert s3_store.present_at_manifest == [["extra.json", "model.pt"]]  # the manifest went last
    assert open_uploads() == []
    restored = download_checkpoint(s3_store, f"{PREFIX}/step-00000007", tmp_path / "restore")
    assert (restored / "model.pt").read_bytes() == payload and checkpoints.verify(restored).ok
    assert uploader.sync() is None  # nothing left to do


WRITER_THAT_DIES = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from gpuline.training import checkpoints

    def write(tmp):
        with (tmp / "model.pt").open("wb") as fh:
            fh.write(os.urandom(12 * 1024 * 1024))
            fh.flush()
            print("written", flush=True)
            sys.stdin.read()  # until killed

    checkpoints.commit_checkpoint(Path(sys.argv[1]), 9, run_id="run-test", writer=write)
    """
)


def test_a_writer_that_dies_mid_file_leaves_no_checkpoint_and_no_open_upload(
    tmp_path: Path, s3_store: ManifestOrder
) -> None:
    rec = Recorder()
    uploader = uploader_for(tmp_path, s3_store, rec)
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER_THAT_DIES, str(tmp_path / "ckpts")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "written"
        thread, result = sync_in_background(uploader)
        wait_for("a part uploaded while writing", parts_in_flight)
        proc.kill()  # no commit, ever: the lock dies with the process
        proc.wait()
        thread.join(HANG_GUARD_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not thread.is_alive() and result == [None]
    assert rec.matching("streamed upload of checkpoint step 9 stopped: the writer of checkpoint step 9 stopped")
    assert open_uploads() == []  # aborted
    assert s3_store.list(PREFIX) == [] and remote_checkpoints(s3_store, PREFIX) == []
    assert s3_store.present_at_manifest == []
    assert uploader.sync() is None  # the abandoned directory is not streamed again


def test_bytes_that_do_not_match_the_finished_file_are_uploaded_again_whole(
    tmp_path: Path, s3_store: ManifestOrder
) -> None:
    rec = Recorder()
    uploader = uploader_for(tmp_path, s3_store, rec)
    started = threading.Event()

    def write(tmp: Path) -> None:
        with (tmp / "model.pt").open("wb") as fh:
            fh.write(b"a" * (12 * MIB))
            fh.flush()
            started.set()
            wait_for("a part uploaded while writing", parts_in_flight)
            fh.seek(0)  # not append-only: what was streamed is no longer the file
            fh.write(b"b" * MIB)
            fh.seek(0, os.SEEK_END)
            fh.write(b"c" * MIB)

    writer = threading.Thread(target=lambda: commit_checkpoint(tmp_path / "ckpts", 5, run_id="run-test", writer=write))
    writer.start()
    assert started.wait(HANG_GUARD_S)
    info = uploader.sync()
    writer.join(HANG_GUARD_S)

    assert info is not None
    assert rec.matching("model.pt uploaded again whole (model.pt: the streamed bytes do not match")
    committed = (tmp_path / "ckpts" / "step-00000005" / "model.pt").read_bytes()
    assert remote_bytes(s3_store, f"{PREFIX}/step-00000005/model.pt") == committed
    assert open_uploads() == []
    assert checkpoints.verify(download_checkpoint(s3_store, f"{PREFIX}/step-00000005", tmp_path / "restore")).ok


# ---------------------------------------------------------------- a local directory


def test_a_local_store_copies_a_checkpoint_while_it_is_written(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path / "store")
    store.part_size = MIB
    payload = os.urandom(5 * MIB + 123)
    rec = Recorder()
    uploader = uploader_for(tmp_path, store, rec)
    started = threading.Event()
    seen: dict[str, Any] = {}

    def copy_in_progress() -> int:
        return sum(p.stat().st_size for p in (tmp_path / "store").rglob(".gpuline-tmp-model.pt.*"))

    def write(tmp: Path) -> None:
        with (tmp / "model.pt").open("wb") as fh:
            fh.write(payload[: 2 * MIB])
            fh.flush()
            started.set()
            seen["copied"] = wait_for("part of the file copied while writing", copy_in_progress)
            seen["exists"] = store.exists(f"{PREFIX}/step-00000002/model.pt")
            fh.write(payload[2 * MIB :])

    writer = threading.Thread(target=lambda: commit_checkpoint(tmp_path / "ckpts", 2, run_id="run-test", writer=write))
    writer.start()
    assert started.wait(HANG_GUARD_S)
    info = uploader.sync()
    writer.join(HANG_GUARD_S)

    assert info is not None and rec.matching("streaming checkpoint step 2")
    assert seen["copied"] >= MIB and seen["exists"] is False  # the object takes its name only when checked
    assert (tmp_path / "store" / PREFIX / "step-00000002" / "model.pt").read_bytes() == payload
    assert checkpoints.verify(tmp_path / "store" / PREFIX / "step-00000002").ok
    assert not list((tmp_path / "store").rglob(".gpuline-tmp-*"))


# ---------------------------------------------------------------- the stop path, through the supervisor

GATED_TRAINER = textwrap.dedent(
    """
    import json, os, signal, sys, time
    from pathlib import Path
    import boto3
    from gpuline.training import checkpoints

    env = os.environ
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    step = 0
    if env.get("GPULINE_RESUME_FROM"):
        step = json.loads(Path(env["GPULINE_RESUME_FROM"], "state.json").read_text())["step"]
        print(f"resumed at step {step}", flush=True)

    def parts_in_s3():
        s3 = boto3.client("s3")
        uploads = s3.list_multipart_uploads(Bucket="ckpts").get("Uploads", [])
        return sum(len(s3.list_parts(Bucket="ckpts", Key=u["Key"], UploadId=u["UploadId"]).get("Parts", []))
                   for u in uploads)

    def write(tmp):
        with (tmp / "model.bin").open("wb") as fh:
            fh.write(os.urandom(6 * 1024 * 1024))
            fh.flush()
            deadline = time.monotonic() + 60  # a hang guard: without streaming the test fails below
            while not (seen := parts_in_s3()) and time.monotonic() < deadline:
                time.sleep(0.01)
            print(f"{seen} parts in S3 before the save finished", flush=True)
            fh.write(os.urandom(4 * 1024 * 1024))
        (tmp / "state.json").write_text(json.dumps({"step": step}))

    with open(env["GPULINE_METRICS_PATH"], "a") as metrics:
        while step < 10**6:
            if stop:
                checkpoints.commit_checkpoint(Path(env["GPULINE_CHECKPOINT_DIR"]), step,
                                              run_id=env["GPULINE_RUN_ID"], writer=write)
                sys.exit(143)
            step += 1
            metrics.write(json.dumps({"step": step, "loss": 1.0 / step}) + "\\n")
            metrics.flush()
            time.sleep(0.01)
    """
)


def _s3_request(tmp_path: Path, workdir: Path, rec: Recorder, script: str, **hparams: Any) -> TrainRequest:
    (tmp_path / "train.py").write_text(script)
    return TrainRequest(
        run_id="run-test",
        command=[sys.executable, "train.py"],
        cwd=tmp_path,
        workdir=workdir,
        storage=open_storage(f"s3://{BUCKET}/team", tmp_path),
        storage_prefix="runs/run-test",
        hyperparameters=hparams,
        dataset_path=None,
        checkpoint_interval=10**6,  # the stop-time save is the run's only checkpoint
        keep=2,
        max_duration_s=300,
        max_restarts=0,
        allow_fresh_start=True,
        on_event=rec.event,
        log=rec.log,
        imds_endpoint="off",
    )


def test_on_sigterm_the_final_checkpoint_streams_while_the_trainer_saves(
    tmp_path: Path, s3_store: ManifestOrder
) -> None:
    rec = Recorder()
    request = _s3_request(tmp_path, tmp_path / "work", rec, GATED_TRAINER)
    when_metrics_reach(request.workdir / "metrics.jsonl", 3, lambda: os.kill(os.getpid(), signal.SIGTERM))
    outcome = supervise(request)

    final = outcome.final_step
    assert outcome.stop_reason == "preempted" and final is not None and final >= 3
    assert outcome.checkpoints[-1].step == final
    assert rec.matching(f"streaming checkpoint step {final}")
    [line] = rec.matching("parts in S3 before the save finished")
    assert int(line.split()[0]) >= 1  # the save could finish only once a part of it was in S3
    assert open_uploads() == []
    assert checkpoints.verify(
        download_checkpoint(s3_store, f"{PREFIX}/{checkpoints.step_dir_name(final)}", tmp_path / "restore")
    ).ok

    again = Recorder()
    elsewhere = _s3_request(tmp_path, tmp_path / "elsewhere", again, GATED_TRAINER)
    when_metrics_reach(elsewhere.workdir / "metrics.jsonl", final + 1, lambda: os.kill(os.getpid(), signal.SIGTERM))
    resumed = supervise(elsewhere)
    assert resumed.resumed_from_step == final
    assert again.matching(f"resumed at step {final}")


TORCH_TRAINER = textwrap.dedent(
    """
    import sys, torch
    from gpuline_trainer import Contract, run_loop

    contract = Contract.from_env()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 512))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(32, 512)

    def train_step(step):
        optimizer.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        optimizer.step()
        return float(loss)

    def load_state(state):
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])

    result = run_loop(contract, total_steps=contract.hparam("steps", 10**6), train_step=train_step,
                      state=lambda: {"model": model.state_dict(), "optimizer": optimizer.state_dict()},
                      load_state=load_state, log_every=0)
    sys.exit(143 if result.stopped else 0)
    """
)


@pytest.mark.slow
def test_a_real_torch_training_stopped_by_sigterm_leaves_a_durable_resumable_checkpoint(
    tmp_path: Path, s3_store: ManifestOrder
) -> None:
    torch = pytest.importorskip("torch")
    from gpuline_trainer import TorchCheckpointer

    rec = Recorder()
    request = _s3_request(tmp_path, tmp_path / "work", rec, TORCH_TRAINER)
    when_metrics_reach(request.workdir / "metrics.jsonl", 5, lambda: os.kill(os.getpid(), signal.SIGTERM))
    outcome = supervise(request)

    final = outcome.final_step
    assert outcome.stop_reason == "preempted" and outcome.exit_code == 143 and final is not None
    assert outcome.checkpoints[-1].step == final
    assert rec.matching(f"checkpoint step {final} is durable at s3://{BUCKET}/team/{PREFIX}/step-")
    assert open_uploads() == []
    restored = download_checkpoint(s3_store, f"{PREFIX}/{checkpoints.step_dir_name(final)}", tmp_path / "restore")
    state = TorchCheckpointer.load(restored)
    assert state["loop"]["step"] == final and isinstance(state["model"]["0.weight"], torch.Tensor)

    again = Recorder()
    resumed = supervise(_s3_request(tmp_path, tmp_path / "elsewhere", again, TORCH_TRAINER, steps=final + 3))
    assert resumed.stop_reason == "completed" and resumed.resumed_from_step == final
    assert again.matching(f"resuming run run-test from checkpoint step {final}")
    assert resumed.checkpoints[-1].step == final + 3
