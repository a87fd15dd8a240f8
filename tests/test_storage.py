"""Stores behind one protocol, against a local directory and a real S3 API (moto server on 127.0.0.1)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from gpuline.errors import InfraError, InputError
from gpuline.storage import (
    ChecksumMismatch,
    CorruptCheckpoint,
    LocalStorage,
    ObjectNotFound,
    PreconditionFailed,
    S3Storage,
    Storage,
    UploadCancelled,
    download_checkpoint,
    open_storage,
    prune_remote,
    remote_checkpoints,
    upload_checkpoint,
)
from gpuline.training import checkpoints
from servers import MotoServer

BUCKET = "gpuline-test"


@pytest.fixture
def s3_bucket(aws_env: MotoServer) -> str:
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    return BUCKET


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    if request.param == "local":
        yield open_storage("file://store", tmp_path)
    else:
        request.getfixturevalue("s3_bucket")
        yield open_storage(f"s3://{BUCKET}/some/prefix", tmp_path)


def test_open_storage_resolves_uris(tmp_path: Path) -> None:
    rel = open_storage("file://.gpuline/artifacts", tmp_path)
    assert isinstance(rel, LocalStorage) and rel.root == (tmp_path / ".gpuline/artifacts").resolve()
    absolute = open_storage(f"file://{tmp_path}/abs", Path("/elsewhere"))
    assert isinstance(absolute, LocalStorage) and absolute.root == tmp_path / "abs"
    plain = open_storage("plain/dir", tmp_path)
    assert isinstance(plain, LocalStorage) and plain.root == tmp_path / "plain/dir"
    s3 = open_storage("s3://bucket/a/b/", tmp_path)
    assert isinstance(s3, S3Storage) and (s3.bucket, s3.prefix) == ("bucket", "a/b")
    assert s3.uri_for("x/y") == "s3://bucket/a/b/x/y"


@pytest.mark.parametrize("uri", ["gs://bucket/x", "s3:///nobucket"])
def test_open_storage_rejects_bad_uris(tmp_path: Path, uri: str) -> None:
    with pytest.raises(InputError) as info:
        open_storage(uri, tmp_path)
    assert info.value.hint


def test_bytes_files_list_exists_delete(store: Storage, tmp_path: Path) -> None:
    store.put_bytes("a/one.txt", b"1")
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(1000))
    store.put_file(src, "a/b/two.bin")
    assert store.get_bytes("a/one.txt") == b"1"
    store.get_file("a/b/two.bin", tmp_path / "out" / "two.bin")
    assert (tmp_path / "out" / "two.bin").read_bytes() == src.read_bytes()
    assert store.list("a/") == ["a/b/two.bin", "a/one.txt"]
    assert store.list("a/b") == ["a/b/two.bin"]
    assert store.exists("a/one.txt") and not store.exists("a/nope")
    store.delete("a/one.txt")
    store.delete("a/never-existed")
    assert store.list() == ["a/b/two.bin"]
    assert store.uri_for("a/b/two.bin").endswith("a/b/two.bin")


def test_missing_objects_raise_not_found(store: Storage, tmp_path: Path) -> None:
    with pytest.raises(ObjectNotFound):
        store.get_bytes("missing")
    with pytest.raises(ObjectNotFound):
        store.get_file("missing", tmp_path / "x")
    assert store.etag("missing") is None


@pytest.mark.parametrize("key", ["../escape", "", "a/../../b"])
def test_keys_cannot_escape(store: Storage, key: str) -> None:
    with pytest.raises(InputError):
        store.put_bytes(key, b"x")


def test_put_if_is_a_compare_and_swap(store: Storage) -> None:
    first = store.put_if("pointer.json", b'{"v": 1}', None)
    with pytest.raises(PreconditionFailed):
        store.put_if("pointer.json", b'{"v": 1}', None)  # create-only, but it exists
    second = store.put_if("pointer.json", b'{"v": 2}', first)
    assert second != first
    with pytest.raises(PreconditionFailed):
        store.put_if("pointer.json", b'{"v": 3}', first)  # stale etag
    assert store.get_bytes("pointer.json") == b'{"v": 2}'
    assert store.etag("pointer.json") == second
    with pytest.raises(PreconditionFailed):
        store.put_if("absent.json", b"x", second)  # expected an object that is not there


def test_s3_download_verifies_sha256(s3_bucket: str, tmp_path: Path) -> None:
    store = S3Storage(s3_bucket, "p")
    src = tmp_path / "model.bin"
    src.write_bytes(b"good weights")
    store.put_file(src, "model.bin")
    head = boto3.client("s3").head_object(Bucket=s3_bucket, Key="p/model.bin")
    assert head["Metadata"]["sha256"] == hashlib.sha256(b"good weights").hexdigest()
    # Damage the object behind the store's back, keeping the recorded checksum.
    boto3.client("s3").put_object(Bucket=s3_bucket, Key="p/model.bin", Body=b"bad weights!", Metadata=head["Metadata"])
    with pytest.raises(ChecksumMismatch):
        store.get_file("model.bin", tmp_path / "copy.bin")
    assert not (tmp_path / "copy.bin").exists()
    with pytest.raises(ChecksumMismatch):
        store.get_bytes("model.bin")


def test_s3_multipart_upload_round_trips(s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPULINE_S3_CHUNK_MB", "5")  # S3's smallest part size
    store = S3Storage(s3_bucket)
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(12 * 1024 * 1024))
    store.put_file(src, "big.bin")
    etag = boto3.client("s3").head_object(Bucket=s3_bucket, Key="big.bin")["ETag"]
    assert etag.endswith('-3"')  # three parts
    store.get_file("big.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == src.read_bytes()


def test_s3_errors_are_infra_errors(aws_env: MotoServer) -> None:
    store = S3Storage("no-such-bucket")
    with pytest.raises(InfraError) as info:
        store.put_bytes("k", b"x")
    assert "no-such-bucket" in str(info.value)
    assert info.value.hint


def _checkpoint(root: Path, step: int, size: int = 100) -> Path:
    def write(tmp: Path) -> None:
        (tmp / "model.bin").write_bytes(os.urandom(size))
        (tmp / "meta.json").write_text(json.dumps({"step": step}))

    return checkpoints.commit_checkpoint(root, step, run_id="r", writer=write)


def test_checkpoint_round_trip(store: Storage, tmp_path: Path) -> None:
    local = _checkpoint(tmp_path / "ckpt", 100)
    uploaded: list[str] = []
    info = upload_checkpoint(store, local, "runs/r", on_file=uploaded.append)
    assert uploaded == ["meta.json", "model.bin"]
    assert info.step == 100
    assert info.sha256 == checkpoints.manifest_sha256(local)
    assert info.uri == store.uri_for("runs/r/step-00000100")
    assert remote_checkpoints(store, "runs/r")[0].complete
    back = download_checkpoint(store, "runs/r/step-00000100", tmp_path / "restore")
    assert back == tmp_path / "restore" / "step-00000100"
    assert checkpoints.verify(back).ok
    assert (back / "model.bin").read_bytes() == (local / "model.bin").read_bytes()


def test_remote_checkpoint_without_manifest_is_incomplete(store: Storage, tmp_path: Path) -> None:
    local = _checkpoint(tmp_path / "ckpt", 5)
    store.put_file(local / "model.bin", "runs/r/step-00000005/model.bin")
    [remote] = remote_checkpoints(store, "runs/r")
    assert (remote.step, remote.complete) == (5, False)
    with pytest.raises(CorruptCheckpoint, match=r"incomplete: no manifest\.json"):
        download_checkpoint(store, remote.key, tmp_path / "restore")
    assert not (tmp_path / "restore" / "step-00000005").exists()


def test_download_detects_a_damaged_file(store: Storage, tmp_path: Path) -> None:
    local = _checkpoint(tmp_path / "ckpt", 5)
    upload_checkpoint(store, local, "runs/r")
    # Replace a file with other content through the store itself (so S3 metadata is consistent).
    damaged = tmp_path / "damaged.bin"
    damaged.write_bytes(b"x" * 100)
    store.put_file(damaged, "runs/r/step-00000005/model.bin")
    with pytest.raises(CorruptCheckpoint, match=r"model\.bin"):
        download_checkpoint(store, "runs/r/step-00000005", tmp_path / "restore")
    assert list((tmp_path / "restore").iterdir()) == []


def test_upload_refuses_an_incomplete_local_checkpoint(store: Storage, tmp_path: Path) -> None:
    local = _checkpoint(tmp_path / "ckpt", 5)
    (local / checkpoints.MANIFEST).unlink()
    with pytest.raises(CorruptCheckpoint):
        upload_checkpoint(store, local, "runs/r")
    assert store.list() == []


def test_prune_remote_keeps_newest_and_drops_stale_incomplete(store: Storage, tmp_path: Path) -> None:
    for step in (1, 2, 3):
        upload_checkpoint(store, _checkpoint(tmp_path / "ckpt", step), "runs/r")
    store.put_bytes("runs/r/step-00000000/model.bin", b"leftover of a killed upload")
    store.put_bytes("runs/r/step-00000009/model.bin", b"an upload in flight")
    assert prune_remote(store, "runs/r", keep=2) == [0, 1]
    assert [(c.step, c.complete) for c in remote_checkpoints(store, "runs/r")] == [
        (2, True),
        (3, True),
        (9, False),
    ]


UPLOADER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from gpuline.storage import open_storage, upload_checkpoint

    store = open_storage(sys.argv[1], Path(sys.argv[2]))

    def on_file(rel):
        print("uploaded", rel, flush=True)
        time.sleep(60)  # killed here, between a file and the manifest

    upload_checkpoint(store, Path(sys.argv[3]), "runs/r", on_file=on_file)
    """
)


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_sigkill_mid_upload_never_leaves_a_complete_remote_checkpoint(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if kind == "s3":
        request.getfixturevalue("s3_bucket")
    uri = "file://store" if kind == "local" else f"s3://{BUCKET}/k"
    store = open_storage(uri, tmp_path)
    upload_checkpoint(store, _checkpoint(tmp_path / "old", 1), "runs/r")
    local = _checkpoint(tmp_path / "ckpt", 2, size=256 * 1024)
    proc = subprocess.Popen(
        [sys.executable, "-c", UPLOADER, uri, str(tmp_path), str(local)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().startswith("uploaded")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    found = {c.step: c.complete for c in remote_checkpoints(store, "runs/r")}
    assert found == {1: True, 2: False}
    with pytest.raises(CorruptCheckpoint, match="incomplete"):
        download_checkpoint(store, "runs/r/step-00000002", tmp_path / "restore")


def test_a_cancelled_upload_leaves_no_object(store: Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPULINE_S3_CHUNK_MB", "5")
    monkeypatch.setenv("GPULINE_S3_CONCURRENCY", "1")
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(30 * 1024 * 1024))
    with pytest.raises(UploadCancelled):
        store.put_file(src, "big.bin", cancel=lambda: True)  # S3: called off once the transfer has begun
    assert not store.exists("big.bin")
    store.put_file(src, "big.bin", cancel=lambda: False)  # a cancel that never fires changes nothing
    assert store.exists("big.bin")


def test_a_cancelled_checkpoint_upload_writes_no_manifest(store: Storage, tmp_path: Path) -> None:
    local = _checkpoint(tmp_path / "ckpt", 7)
    with pytest.raises(UploadCancelled):
        upload_checkpoint(store, local, "runs/r", cancel=lambda: True)
    assert [c.complete for c in remote_checkpoints(store, "runs/r")] in ([], [False])


def test_s3_upload_failure_is_an_infra_error(aws_env: MotoServer, tmp_path: Path) -> None:
    src = tmp_path / "f.bin"
    src.write_bytes(b"x")
    with pytest.raises(InfraError) as info:
        S3Storage("no-such-bucket").put_file(src, "f.bin")
    assert "no-such-bucket" in info.value.message
