"""Two nodes x one process through torchrun's c10d rendezvous on 127.0.0.1 (gloo on CPU).

Each "node" is its own supervisor with its own local disk, sharing only the durable store, as two
machines would. A stop on one node stops every rank at the same step; only rank 0 commits checkpoints;
when the run is resumed, every rank resumes from the same step.
"""

from __future__ import annotations

import socket
import sys
import threading
from pathlib import Path

import pytest

from fixtures_training import Recorder, when_metrics_reach
from gpuline.storage import open_storage
from gpuline.training import TrainOutcome, TrainRequest, checkpoints, supervise
from servers import ImdsServer

EXAMPLE = Path(__file__).resolve().parents[1] / "templates" / "example"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _run_two_nodes(
    tmp_path: Path, steps: int, interval: int = 20, imds: tuple[str, str] = ("off", "off")
) -> list[tuple[TrainOutcome, Recorder]]:
    endpoint = f"127.0.0.1:{_free_port()}"
    results: dict[int, tuple[TrainOutcome, Recorder]] = {}
    errors: list[BaseException] = []

    def node(index: int) -> None:
        rec = Recorder()
        request = TrainRequest(
            run_id="run-multi",
            command=[sys.executable, "train.py"],
            cwd=EXAMPLE,
            workdir=tmp_path / f"node{index}",
            storage=open_storage("file://shared-store", tmp_path),
            storage_prefix="runs/run-multi",
            hyperparameters={"steps": steps, "batch_size": 32, "lr": 0.05, "seed": 0, "hidden": 32},
            dataset_path=EXAMPLE / "data" / "digits.npz",
            checkpoint_interval=interval,
            keep=3,
            max_duration_s=240,
            max_restarts=0,
            allow_fresh_start=False,
            nnodes=2,
            nprocs_per_node=1,
            on_event=rec.event,
            log=rec.log,
            imds_endpoint=imds[index],
            imds_poll_s=0.05,
            rdzv_endpoint=endpoint,
        )
        try:
            results[index] = (supervise(request), rec)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=node, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=280)
    assert not errors, errors
    assert len(results) == 2, "a node did not finish"
    return [results[0], results[1]]


@pytest.mark.slow
def test_two_nodes_stop_together_and_resume_from_the_same_step(tmp_path: Path, imds_server: ImdsServer) -> None:
    # Node 0's spot instance is reclaimed once both ranks are training (not after a fixed time, which a
    # busy machine may spend starting the process group): its rank gets SIGTERM, node 1's rank learns
    # it at the next step (ranks agree on stopping through an all-reduce), both save together and rank
    # 0 commits.
    # Rank 0 (which writes the metrics) is whichever node the rendezvous made it: watch both nodes' files.
    once = threading.Lock()

    def reclaim_node0() -> None:
        if once.acquire(blocking=False):
            imds_server.schedule_interruption()

    for i in range(2):
        when_metrics_reach(tmp_path / f"node{i}" / "metrics.jsonl", 5, reclaim_node0, timeout_s=240)
    first = _run_two_nodes(tmp_path, steps=10**6, interval=500, imds=(imds_server.url, "off"))
    reasons = [o.stop_reason for o, _ in first]
    assert reasons == ["preempted", "preempted"], [rec.lines[-10:] for _, rec in first]
    assert first[0][1].matching("spot")  # node 0 stopped for its spot notice, node 1 for its peer
    committed = [checkpoints.complete(tmp_path / f"node{i}" / "checkpoints") for i in range(2)]
    assert sorted(len(c) > 0 for c in committed) == [False, True]  # rank 0's node alone wrote checkpoints
    stop_step = max(s for c in committed for s, _ in c)
    stored = open_storage("file://shared-store", tmp_path)
    manifests = [k for k in stored.list("runs/run-multi/checkpoints/") if k.endswith("manifest.json")]
    assert f"runs/run-multi/checkpoints/{checkpoints.step_dir_name(stop_step)}/manifest.json" in manifests

    second = _run_two_nodes(tmp_path, steps=stop_step + 40)
    lines = [line for _, rec in second for line in rec.lines]
    for outcome, rec in second:
        assert outcome.stop_reason == "completed", rec.lines[-20:]
        assert outcome.resumed_from_step == stop_step
        assert len(rec.matching(f"resuming run run-multi from checkpoint step {stop_step}")) == 1
    assert sum(f"[rank 0] resumed at step {stop_step}" in line for line in lines) == 1
    assert sum(f"[rank 1] resumed at step {stop_step}" in line for line in lines) == 1
    evaluated = [o.eval_metrics for o, _ in second if o.eval_metrics]
    assert len(evaluated) == 1 and evaluated[0]["accuracy"] > 0.5


@pytest.mark.slow
def test_one_node_two_processes_run_standalone_and_exit_cleanly(tmp_path: Path) -> None:
    rec = Recorder()
    request = TrainRequest(
        run_id="run-local2",
        command=[sys.executable, "train.py"],
        cwd=EXAMPLE,
        workdir=tmp_path / "node",
        storage=open_storage("file://store", tmp_path),
        storage_prefix="runs/run-local2",
        hyperparameters={"steps": 40, "batch_size": 32, "lr": 0.05, "seed": 0, "hidden": 32},
        dataset_path=EXAMPLE / "data" / "digits.npz",
        checkpoint_interval=20,
        keep=3,
        max_duration_s=120,
        max_restarts=0,
        allow_fresh_start=False,
        nprocs_per_node=2,
        on_event=rec.event,
        log=rec.log,
        imds_endpoint="off",
    )
    outcome = supervise(request)
    # Both ranks leave on their own (a rank hanging at exit would end in max_duration instead).
    assert outcome.stop_reason == "completed", rec.lines[-20:]
    assert [c.step for c in outcome.checkpoints] == [20, 40]
    assert outcome.eval_metrics["accuracy"] > 0.5
