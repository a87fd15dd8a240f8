"""The torch side: async atomic checkpoints, RNG capture, resumable batches, and the reference example
stopped by SIGTERM at a random step then resumed, ending bit-identical to an uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fixtures_training import Recorder, when_metrics_reach
from gpuline.storage import open_storage
from gpuline.training import TrainOutcome, TrainRequest, checkpoints, smoke_test, supervise
from gpuline_trainer import Contract, ResumableBatches, StopFlag, TorchCheckpointer, rng_state, set_rng_state

EXAMPLE = Path(__file__).resolve().parents[1] / "templates" / "example"
HPARAMS = {"steps": 300, "batch_size": 64, "lr": 0.05, "seed": 0, "hidden": 64}


def _model_state() -> dict[str, Any]:
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(3, 8)).sum().backward()
    optimizer.step()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "extra": {"epoch": 3}}


def test_save_commits_a_verified_checkpoint_that_loads_weights_only(tmp_path: Path) -> None:
    ckpt = TorchCheckpointer(tmp_path, "run-1")
    state = _model_state()
    stall = ckpt.save(10, state, block=True)
    assert stall >= 0 and ckpt.stalls == [stall]
    path = tmp_path / "step-00000010"
    assert ckpt.last_committed == path
    result = checkpoints.verify(path)  # the hashes taken while writing match the bytes on disk
    assert result.ok and set(result.manifest["files"]) == {"model.pt", "optimizer.pt", "extra.pt"}  # type: ignore[index]
    loaded = TorchCheckpointer.load(path)
    assert torch.equal(loaded["model"]["weight"], state["model"]["weight"])
    assert loaded["optimizer"]["state"][0]["momentum_buffer"].shape == (4, 8)
    assert loaded["extra"] == {"epoch": 3}


def test_snapshot_is_independent_of_the_live_state(tmp_path: Path) -> None:
    ckpt = TorchCheckpointer(tmp_path, "r")
    weight = torch.zeros(1000)
    ckpt.save(1, {"model": {"w": weight}})
    weight.add_(1.0)  # the loop keeps training while the save is written
    ckpt.wait()
    assert torch.count_nonzero(TorchCheckpointer.load(tmp_path / "step-00000001")["model"]["w"]) == 0


def test_later_saves_copy_into_the_previous_snapshot_memory(tmp_path: Path) -> None:
    ckpt = TorchCheckpointer(tmp_path, "r")
    live = {"model": {"w": torch.zeros(1000), "b": torch.zeros(3)}}
    ckpt.save(1, live, block=True)
    first_buffer = ckpt._buffers["model"]["w"]  # type: ignore[index]
    live["model"]["w"].add_(2.0)
    live["model"]["b"] = torch.zeros(5)  # a changed shape gets fresh memory
    ckpt.save(2, live, block=True)
    assert ckpt._buffers["model"]["w"] is first_buffer  # type: ignore[index]
    assert TorchCheckpointer.load(tmp_path / "step-00000002")["model"]["w"].sum().item() == 2000.0
    assert TorchCheckpointer.load(tmp_path / "step-00000002")["model"]["b"].shape == (5,)
    assert TorchCheckpointer.load(tmp_path / "step-00000001")["model"]["w"].sum().item() == 0.0


def test_at_most_one_save_in_flight(tmp_path: Path) -> None:
    ckpt = TorchCheckpointer(tmp_path, "r")
    big = {"model": {"w": torch.randn(2_000_000)}}
    ckpt.save(1, big)
    ckpt.save(2, big)  # waits for step 1 before snapshotting
    assert checkpoints.verify(tmp_path / "step-00000001").ok
    ckpt.wait()
    assert not ckpt.in_flight
    assert [s for s, _ in checkpoints.complete(tmp_path)] == [1, 2]


def test_save_returns_before_the_write_so_the_stall_is_only_the_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The write waits until ``save`` has returned: a save that joined its writer (a synchronous save,
    or a stall that includes the write) would still be inside ``save`` when the write looks, and fail."""
    returned, seen = threading.Event(), []
    real = checkpoints.commit_checkpoint

    def commit_after_return(*args: Any, **kwargs: Any) -> Path:
        # A safety net for a save that never returns, not a margin: the async save sets it at once.
        seen.append(returned.wait(timeout=20))
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoints, "commit_checkpoint", commit_after_return)
    ckpt = TorchCheckpointer(tmp_path, "r")
    ckpt.save(1, {"model": {"w": torch.ones(10)}})
    returned.set()
    assert ckpt.in_flight or seen  # the write runs beside the caller
    ckpt.wait()
    assert seen == [True]  # it began only after save had returned
    assert checkpoints.verify(tmp_path / "step-00000001").ok and len(ckpt.stalls) == 1


def test_keep_prunes_locally(tmp_path: Path) -> None:
    ckpt = TorchCheckpointer(tmp_path, "r", keep=2)
    for step in (1, 2, 3):
        ckpt.save(step, {"x": {"v": torch.tensor([step])}}, block=True)
    assert [s for s, _ in checkpoints.complete(tmp_path)] == [2, 3]


def test_a_failed_background_save_surfaces_in_the_caller(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    ckpt = TorchCheckpointer(blocker, "r")
    ckpt.save(1, {"x": {"v": torch.tensor([1])}})
    with pytest.raises(RuntimeError, match="saving a checkpoint failed"):
        ckpt.wait()
    ckpt.wait()  # reported once


def test_load_refuses_a_corrupt_checkpoint(tmp_path: Path) -> None:
    ckpt = TorchCheckpointer(tmp_path, "r")
    ckpt.save(1, {"model": {"w": torch.ones(10)}}, block=True)
    (tmp_path / "step-00000001" / "model.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not usable"):
        TorchCheckpointer.load(tmp_path / "step-00000001")


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    ckpt = TorchCheckpointer(tmp_path, "r")
    ckpt.save(1, {"rng": rng_state()}, block=True)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    set_rng_state(TorchCheckpointer.load(tmp_path / "step-00000001")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_resumable_batches_continue_exactly() -> None:
    straight = ResumableBatches(100, 16, seed=7)
    first = [straight.next() for _ in range(9)]  # crosses an epoch boundary (6 batches per epoch)
    resumed = ResumableBatches(100, 16, seed=7)
    for _ in range(4):
        resumed.next()
    copy = ResumableBatches(100, 16, seed=7)
    copy.load_state_dict(resumed.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(first[4:], [copy.next() for _ in range(5)], strict=True))


def test_resumable_batches_shard_by_rank() -> None:
    ranks = [ResumableBatches(64, 8, seed=1, rank=r, world_size=2).next() for r in range(2)]
    assert not set(ranks[0].tolist()) & set(ranks[1].tolist())
    with pytest.raises(ValueError, match="cannot fill a batch"):
        ResumableBatches(10, 8, seed=1, world_size=2)


def test_contract_from_env_and_defaults(tmp_path: Path) -> None:
    env = {
        "GPULINE_RUN_ID": "run-9",
        "GPULINE_CHECKPOINT_DIR": str(tmp_path / "c"),
        "GPULINE_RESUME_FROM": str(tmp_path / "c" / "step-00000005"),
        "GPULINE_CHECKPOINT_INTERVAL": "25",
        "GPULINE_HPARAMS": '{"lr": 1, "steps": 10}',
        "GPULINE_SMOKE": "1",
        "GPULINE_MAX_DURATION_S": "60",
    }
    contract = Contract.from_env(env)
    assert contract.run_id == "run-9" and contract.checkpoint_interval == 25 and contract.smoke
    assert contract.resume_from == tmp_path / "c" / "step-00000005"
    assert contract.hparam("lr", 0.5) == 1.0 and isinstance(contract.hparam("lr", 0.5), float)
    assert contract.hparam("missing", 3) == 3 and contract.max_duration_s == 60
    local = Contract.from_env({})
    assert local.run_id == "local" and local.resume_from is None and not local.smoke
    assert local.checkpoint_dir == Path(".gpuline-local/checkpoints")
    with pytest.raises(ValueError, match="GPULINE_HPARAMS is not JSON"):
        Contract.from_env({"GPULINE_HPARAMS": "{nope"})
    with pytest.raises(ValueError, match="must be a JSON object"):
        Contract.from_env({"GPULINE_HPARAMS": "[1]"})


def test_stop_flag_turns_sigterm_into_a_request() -> None:
    with StopFlag() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signal_name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


# A trainer on run_loop that logs every step; argv[1]: a file it writes once it is training.
PIPE_TRAINER = r"""
import sys, time
from pathlib import Path
import torch
from gpuline_trainer import STOPPED_EXIT_CODE, Contract, run_loop

contract, ready, w = Contract.from_env(), Path(sys.argv[1]), torch.zeros(4)

def step(i):
    if i == 3:
        ready.write_text("training")
    time.sleep(0.005)
    return 1.0

result = run_loop(contract, total_steps=10**9, train_step=step, state=lambda: {"w": w},
                  load_state=lambda s: None, log_every=1)
print(f"stopped at step {result.step}")
sys.exit(STOPPED_EXIT_CODE if result.stopped else 0)
"""


def test_a_trainer_whose_output_reader_died_still_saves_its_final_checkpoint(tmp_path: Path) -> None:
    """The supervisor reading the trainer's output is SIGKILLed: every later print meets a pipe with
    no reader. The trainer is then told to stop, logs "saving", and must still save and exit 143."""
    from gpuline.training.request import RunPaths

    paths, ready = RunPaths(tmp_path / "work"), tmp_path / "ready"
    env = {
        **os.environ,
        **paths.contract(
            run_id="r",
            hyperparameters={},
            dataset_path=None,
            checkpoint_interval=10**6,
            resume_from=None,
            max_duration_s=None,
        ).to_env(),
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", PIPE_TRAINER, str(ready)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        while not ready.exists() and proc.poll() is None:
            threading.Event().wait(0.01)
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()  # the reader is gone, as when the supervisor is SIGKILLed
        proc.stderr.close()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 143
    newest, _ = checkpoints.newest_valid(paths.checkpoints)
    stopped = json.loads(paths.stopped.read_text())
    assert newest is not None and checkpoints.parse_step(newest.name) == stopped["step"] >= 3


# ---------------------------------------------------------------- the reference example


def _example_request(tmp_path: Path, name: str, rec: Recorder) -> TrainRequest:
    return TrainRequest(
        run_id=f"run-{name}",
        command=[sys.executable, "train.py"],
        cwd=EXAMPLE,
        workdir=tmp_path / name,
        storage=open_storage("file://store", tmp_path),
        storage_prefix=f"runs/{name}",
        hyperparameters=HPARAMS,
        dataset_path=EXAMPLE / "data" / "digits.npz",
        checkpoint_interval=100,
        keep=3,
        max_duration_s=300,
        max_restarts=0,
        allow_fresh_start=False,
        on_event=rec.event,
        log=rec.log,
        imds_endpoint="off",
    )


def _weights(outcome: TrainOutcome) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = torch.load(outcome.output_dir / "model.pt", weights_only=True)
    return state


def preempt_now(workdir: Path) -> None:
    """A preemption at this very step, on a machine of any speed: the trainer's process group is frozen
    first (so it cannot train on to its last step before the signal lands), then the supervisor and the
    trainer get their SIGTERM, as a reclaimed machine's processes do, and the trainer goes on to save."""
    pid = int(json.loads((workdir / "trainer.pid").read_text())["pid"])
    os.killpg(pid, signal.SIGSTOP)
    os.killpg(pid, signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGTERM)
    os.killpg(pid, signal.SIGCONT)


@pytest.mark.slow
def test_example_sigterm_at_a_random_step_then_resume_is_bit_identical(tmp_path: Path) -> None:
    straight = supervise(_example_request(tmp_path, "straight", Recorder()))
    assert straight.stop_reason == "completed"
    metrics = straight.eval_metrics
    assert metrics["accuracy"] > 0.85 and metrics["loss"] < 0.6  # the gates in gpuline.yml
    assert set(metrics["slices"]) == {f"digit={d}" for d in range(10)} and metrics["latency_ms_p50"] > 0

    stop_at = random.Random().randint(5, 290)
    print(f"SIGTERM once the metrics show step {stop_at}")
    rec = Recorder()
    request = _example_request(tmp_path, "interrupted", rec)
    when_metrics_reach(request.workdir / "metrics.jsonl", stop_at, lambda: preempt_now(request.workdir))
    stopped = supervise(request)
    assert stopped.stop_reason == "preempted" and stopped.exit_code == 143
    assert stopped.final_step is not None and stopped.final_step < 300
    assert stopped.checkpoints[-1].step == stopped.final_step  # the stop-time save is durable

    resumed = supervise(_example_request(tmp_path, "interrupted", Recorder()))
    assert resumed.stop_reason == "completed"
    assert resumed.resumed_from_step == stopped.final_step
    final, expected = _weights(resumed), _weights(straight)
    assert final.keys() == expected.keys()
    assert all(torch.equal(final[k], expected[k]) for k in expected)  # bit for bit
    assert resumed.loss_curve == straight.loss_curve
    assert resumed.eval_metrics["accuracy"] == metrics["accuracy"]


def test_example_smoke_mode_overfits_one_batch(tmp_path: Path) -> None:
    result = smoke_test([sys.executable, "train.py"], EXAMPLE, EXAMPLE / "data" / "digits.npz", HPARAMS, 120)
    assert result.fell and len(result.losses) == 20
    assert result.step_seconds is not None and result.step_seconds > 0
