"""The train supervisor end to end with a framework-free trainer: resume, preemption, restarts, limits."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import boto3
import pytest

from fixtures_training import Recorder, driver_argv, make_request, wait_for_metrics, when_metrics_reach, write_trainer
from gpuline.errors import InfraError, InputError
from gpuline.storage import Cancel, LocalStorage, UploadCancelled, open_storage, remote_checkpoints
from gpuline.training import SmokeResult, check_entrypoint_imports, checkpoints, launch_argv, smoke_test, supervise
from servers import ImdsServer, MotoServer


def remote_steps(project: Path, run_id: str = "run-test") -> list[tuple[int, bool]]:
    store = open_storage("file://store", project)
    return [(c.step, c.complete) for c in remote_checkpoints(store, f"runs/{run_id}/checkpoints")]


def test_fresh_run_completes_and_keeps_newest_checkpoints(tmp_path: Path) -> None:
    rec = Recorder()
    req = make_request(tmp_path, recorder=rec, steps=22)
    outcome = supervise(req)
    assert outcome.stop_reason == "completed" and outcome.exit_code == 0
    assert outcome.resumed_from_step is None
    assert outcome.final_step == 22
    assert [c.step for c in outcome.checkpoints] == [15, 20, 22]
    assert remote_steps(tmp_path) == [(15, True), (20, True), (22, True)]
    for info in outcome.checkpoints:
        assert info.uri.startswith("file://") and info.uri.endswith(checkpoints.step_dir_name(info.step))
    local = checkpoints.complete(req.workdir / "checkpoints")
    assert [s for s, _ in local] == [15, 20, 22]
    assert outcome.checkpoints[-1].sha256 == checkpoints.manifest_sha256(local[-1][1])
    assert outcome.eval_metrics["accuracy"] > 0.9
    assert [s for s, _ in outcome.loss_curve] == list(range(1, 23))
    assert outcome.loss_curve[-1][1] < outcome.loss_curve[0][1]
    assert (outcome.output_dir / "model.json").is_file()
    assert outcome.first_step_at is not None and outcome.last_step_at is not None
    assert outcome.first_step_at <= outcome.last_step_at
    assert rec.matching("starting run run-test fresh") == ["starting run run-test fresh (no checkpoint to resume from)"]
    assert rec.matching("resuming run") == []
    assert "done at step 22" in rec.lines
    kinds = rec.kinds()
    assert kinds[0] == "fresh_start" and kinds[-1] == "finished" and kinds.count("checkpoint") >= 3


def test_a_new_machine_resumes_from_the_newest_checkpoint_in_storage(tmp_path: Path) -> None:
    supervise(make_request(tmp_path, steps=20))
    rec = Recorder()
    outcome = supervise(make_request(tmp_path, recorder=rec, workdir=tmp_path / "other-machine", steps=30))
    uri = (tmp_path / "store" / "runs" / "run-test" / "checkpoints" / "step-00000020").as_uri()
    assert rec.matching("resuming run") == [f"resuming run run-test from checkpoint step 20 ({uri})"]
    assert rec.matching("starting run") == []
    assert "resumed at step 20" in rec.lines
    assert outcome.resumed_from_step == 20 and outcome.final_step == 30
    assert [s for s, _ in outcome.loss_curve] == list(range(21, 31))
    assert ("resume", {"step": 20, "uri": uri}) in rec.events


def test_resumed_run_matches_an_uninterrupted_one(tmp_path: Path) -> None:
    straight = supervise(make_request(tmp_path / "a", steps=30))
    supervise(make_request(tmp_path / "b", steps=17))
    resumed = supervise(make_request(tmp_path / "b", workdir=tmp_path / "b2", steps=30))
    assert resumed.resumed_from_step == 17
    assert resumed.eval_metrics == straight.eval_metrics


def test_corrupt_newest_checkpoint_is_skipped_and_said(tmp_path: Path) -> None:
    supervise(make_request(tmp_path, steps=20))
    newest = tmp_path / "store" / "runs" / "run-test" / "checkpoints" / "step-00000020" / "state.json"
    newest.write_text(newest.read_text().replace("20", "99"))
    rec = Recorder()
    outcome = supervise(make_request(tmp_path, recorder=rec, workdir=tmp_path / "fresh-disk", steps=20))
    skipped = rec.matching("skipping checkpoint step 20")
    assert len(skipped) == 1 and "sha256 mismatch for state.json" in skipped[0]
    assert rec.matching("resuming run")[0].startswith("resuming run run-test from checkpoint step 15 (")
    assert outcome.resumed_from_step == 15
    assert any(kind == "checkpoint_skipped" and data["step"] == 20 for kind, data in rec.events)


def test_corrupt_local_checkpoint_falls_back_to_storage(tmp_path: Path) -> None:
    req = make_request(tmp_path, steps=20)
    supervise(req)
    (req.workdir / "checkpoints" / "step-00000020" / "state.json").write_text("{}")
    rec = Recorder()
    outcome = supervise(make_request(tmp_path, recorder=rec, steps=25))
    assert outcome.resumed_from_step == 20  # the stored copy of the same step verified
    assert len(rec.matching("skipping checkpoint step 20 (file://")) == 1


def test_incomplete_upload_is_skipped_not_fatal(tmp_path: Path) -> None:
    store = tmp_path / "store" / "runs" / "run-test" / "checkpoints" / "step-00000005"
    store.mkdir(parents=True)
    (store / "state.json").write_text("{}")  # no manifest: an upload that was killed
    rec = Recorder()
    outcome = supervise(make_request(tmp_path, recorder=rec, steps=6))
    assert outcome.resumed_from_step is None and outcome.stop_reason == "completed"
    assert "incomplete: no manifest.json" in rec.matching("skipping checkpoint step 5")[0]


def _corrupt_all(tmp_path: Path) -> None:
    for state in (tmp_path / "store" / "runs" / "run-test" / "checkpoints").glob("step-*/state.json"):
        state.write_text("garbage")


def test_all_corrupt_is_a_clear_error(tmp_path: Path) -> None:
    supervise(make_request(tmp_path, steps=15))
    _corrupt_all(tmp_path)
    with pytest.raises(InfraError) as info:
        supervise(make_request(tmp_path, workdir=tmp_path / "new", steps=15))
    assert "all 3 checkpoints of run run-test are corrupt" in info.value.message
    assert "allow_fresh_start" in (info.value.hint or "")


def test_all_corrupt_starts_fresh_when_allowed(tmp_path: Path) -> None:
    supervise(make_request(tmp_path, steps=15))
    _corrupt_all(tmp_path)
    rec = Recorder()
    outcome = supervise(
        make_request(tmp_path, recorder=rec, workdir=tmp_path / "new", steps=15, allow_fresh_start=True)
    )
    assert outcome.resumed_from_step is None and outcome.final_step == 15
    assert rec.matching("starting fresh (checkpoint.allow_fresh_start)")


def test_sigterm_to_the_supervisor_saves_and_uploads_a_final_checkpoint(tmp_path: Path) -> None:
    rec = Recorder()
    req = make_request(tmp_path, recorder=rec, steps=400, sleep=0.02)
    when_metrics_reach(
        tmp_path / ".gpuline/runs/run-test/metrics.jsonl", 7, lambda: os.kill(os.getpid(), signal.SIGTERM)
    )
    outcome = supervise(req)
    assert outcome.stop_reason == "preempted"
    assert outcome.preemptions == 1 and outcome.restarts == 0
    assert outcome.exit_code == 143
    final = outcome.final_step
    assert final is not None and 7 <= final < 400
    assert outcome.checkpoints[-1].step == final  # the final save is durable, not just the last interval
    assert (final, True) in remote_steps(tmp_path)
    assert rec.matching(f"saved final checkpoint at step {final}")
    assert ("preemption", {"source": "sigterm"}) in rec.events
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored


def test_spot_interruption_notice_stops_training(tmp_path: Path, imds_server: ImdsServer) -> None:
    rec = Recorder()
    req = make_request(tmp_path, recorder=rec, steps=400, sleep=0.02)
    req.imds_endpoint, req.imds_poll_s = imds_server.url, 0.05
    when_metrics_reach(req.workdir / "metrics.jsonl", 5, imds_server.schedule_interruption)
    outcome = supervise(req)
    assert outcome.stop_reason == "preempted" and outcome.preemptions == 1
    assert outcome.checkpoints[-1].step == outcome.final_step
    spot = [data for kind, data in rec.events if kind == "preemption"]
    assert spot == [{"source": "spot", "action": "terminate", "time": "2030-01-01T00:00:00Z"}]
    assert ("PUT", "/latest/api/token") in imds_server.requests


def test_max_duration_stops_with_a_durable_checkpoint(tmp_path: Path) -> None:
    rec = Recorder()
    req = make_request(tmp_path, recorder=rec, steps=10_000, sleep=0.02, max_duration_s=1.0)
    outcome = supervise(req)
    assert outcome.stop_reason == "max_duration"
    assert outcome.preemptions == 0
    assert outcome.checkpoints and outcome.checkpoints[-1].step == outcome.final_step
    assert rec.matching("max duration of 1s reached")
    assert "max_duration" in rec.kinds()


def test_trainer_that_ignores_sigterm_is_killed_after_the_grace_budget(tmp_path: Path) -> None:
    rec = Recorder()
    req = make_request(tmp_path, recorder=rec, steps=10_000, sleep=0.02, max_duration_s=0.8, ignore_sigterm=True)
    req.grace_s = 0.5
    outcome = supervise(req)
    assert outcome.stop_reason == "max_duration"
    assert outcome.exit_code == 128 + signal.SIGKILL
    assert rec.matching("trainer did not exit 0s after SIGTERM; killing it")
    # Whatever interval checkpoint was committed last is still made durable.
    assert outcome.checkpoints and outcome.checkpoints[-1].step % 5 == 0


def test_crashed_trainer_restarts_from_the_newest_checkpoint(tmp_path: Path) -> None:
    rec = Recorder()
    req = make_request(tmp_path, recorder=rec, steps=20, crash_at=12, crash_marker=str(tmp_path / "crashed"))
    outcome = supervise(req)
    assert outcome.stop_reason == "completed" and outcome.restarts == 1 and outcome.preemptions == 0
    assert ("restart", {"attempt": 1, "exit_code": 1, "from_step": 10}) in rec.events
    assert "resumed at step 10" in rec.lines
    straight = supervise(make_request(tmp_path / "straight", steps=20))
    assert outcome.eval_metrics == straight.eval_metrics
    assert outcome.loss_curve == straight.loss_curve


def test_restarts_are_bounded(tmp_path: Path) -> None:
    rec = Recorder()
    outcome = supervise(make_request(tmp_path, recorder=rec, steps=20, crash_always=12, max_restarts=1))
    assert outcome.stop_reason == "failed" and outcome.exit_code == 1
    assert outcome.restarts == 1
    assert rec.matching("no restarts left (max_restarts=1)")
    assert outcome.checkpoints[-1].step == 10


def test_trainer_sigterm_from_outside_counts_as_preemption_and_restarts(tmp_path: Path) -> None:
    rec = Recorder()
    req = make_request(tmp_path, recorder=rec, steps=40, sleep=0.02)

    def kill_trainer() -> None:
        pid = json.loads((req.workdir / "trainer.pid").read_text())["pid"]
        os.kill(pid, signal.SIGTERM)

    when_metrics_reach(req.workdir / "metrics.jsonl", 8, kill_trainer)
    outcome = supervise(req)
    assert outcome.stop_reason == "completed" and outcome.final_step == 40
    assert outcome.preemptions == 1 and outcome.restarts == 1
    assert ("preemption", {"source": "trainer_sigterm", "exit_code": 143}) in rec.events


def test_checkpoints_written_without_a_manifest_are_committed_by_the_supervisor(tmp_path: Path) -> None:
    rec = Recorder()
    outcome = supervise(make_request(tmp_path, recorder=rec, steps=12, plain=True))
    assert [c.step for c in outcome.checkpoints] == [5, 10, 12]
    for step in (5, 10, 12):
        assert checkpoints.verify(
            tmp_path / "store" / "runs" / "run-test" / "checkpoints" / checkpoints.step_dir_name(step)
        ).ok
    assert rec.matching("committed a manifest for checkpoint step 12")


def test_a_plain_final_save_on_sigterm_is_committed_but_a_torn_one_after_a_crash_is_not(tmp_path: Path) -> None:
    req = make_request(tmp_path, steps=400, sleep=0.02, plain=True)
    when_metrics_reach(req.workdir / "metrics.jsonl", 7, lambda: os.kill(os.getpid(), signal.SIGTERM))
    outcome = supervise(req)
    assert outcome.stop_reason == "preempted" and outcome.final_step is not None
    assert outcome.checkpoints[-1].step == outcome.final_step  # saved on SIGTERM, exit 143: adopted

    crashed = tmp_path / "crashed"
    req = make_request(crashed, steps=20, plain=True, crash_always=12, max_restarts=0)
    torn = req.workdir / "checkpoints" / "step-00000011"
    torn.mkdir(parents=True)  # what a crash mid-save leaves: the newest directory, half written
    outcome = supervise(req)
    assert outcome.stop_reason == "failed"
    assert not (torn / checkpoints.MANIFEST).exists()
    assert [c.step for c in outcome.checkpoints] == [5, 10]


def test_sigkill_of_the_supervisor_then_rerun_resumes(tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    write_trainer(tmp_path)
    proc = subprocess.Popen(
        driver_argv(tmp_path, workdir, steps=400, sleep=0.02), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    wait_for_metrics(workdir / "metrics.jsonl", 12)
    proc.kill()
    proc.wait()
    rec = Recorder()
    outcome = supervise(make_request(tmp_path, recorder=rec, workdir=workdir, steps=30))
    assert outcome.resumed_from_step is not None and outcome.resumed_from_step >= 10
    assert outcome.final_step == 30 and outcome.stop_reason == "completed"
    assert len(rec.matching("resuming run run-test from checkpoint step")) == 1


def test_after_a_sigkilled_supervisor_the_first_step_is_the_first_trains(tmp_path: Path) -> None:
    """The run's first step is when its first train began stepping, not when the supervisor started
    after the kill resumed it: otherwise the first train's work counts as idle machine time."""
    workdir = tmp_path / "work"
    write_trainer(tmp_path)
    proc = subprocess.Popen(driver_argv(tmp_path, workdir, steps=400, sleep=0.02), stdout=subprocess.DEVNULL)
    try:
        wait_for_metrics(workdir / "metrics.jsonl", 12)
        note = workdir / "first-step.json"
        while not note.exists() and proc.poll() is None:
            time.sleep(0.01)  # the first supervisor has seen a step (it notes it the moment it does)
    finally:
        proc.kill()
        proc.wait()
    killed_at = datetime.now(UTC)
    outcome = supervise(make_request(tmp_path, workdir=workdir, steps=30))
    assert outcome.resumed_from_step is not None and outcome.stop_reason == "completed"
    assert outcome.first_step_at is not None and outcome.last_step_at is not None
    assert outcome.first_step_at < killed_at < outcome.last_step_at  # both trains' work is in between
    assert outcome.first_step_at.isoformat() == json.loads(note.read_text())["at"]


def test_sigkill_of_the_supervisor_mid_upload_leaves_no_checkpoint_claiming_completeness(tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    write_trainer(tmp_path)
    proc = subprocess.Popen(
        driver_argv(tmp_path, workdir, steps=400, sleep=0.02, slow_upload_s=1.0), stdout=subprocess.DEVNULL
    )
    remote = tmp_path / "store" / "runs" / "run-test" / "checkpoints"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        half = [d for d in remote.glob("step-*") if (d / "state.json").exists() and not (d / "manifest.json").exists()]
        if half and any((d / "manifest.json").exists() for d in remote.glob("step-*")):
            break  # one checkpoint is durable and the next is half uploaded
        time.sleep(0.01)
    else:
        raise AssertionError("never caught an upload in flight")
    proc.kill()
    proc.wait()
    found = remote_steps(tmp_path)
    assert any(not done for _, done in found) and any(done for _, done in found)
    store = open_storage("file://store", tmp_path)
    for step, done in found:  # whatever claims completeness is complete
        if done:
            assert checkpoints.verify(
                tmp_path / "store" / "runs" / "run-test" / "checkpoints" / checkpoints.step_dir_name(step)
            ).ok
    rec = Recorder()
    outcome = supervise(make_request(tmp_path, storage=store, recorder=rec, workdir=tmp_path / "elsewhere", steps=60))
    newest_durable = max(step for step, done in found if done)
    assert outcome.resumed_from_step == newest_durable
    assert rec.matching("incomplete: no manifest.json")


def test_a_second_supervisor_for_the_same_run_is_refused(tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    proc = subprocess.Popen(driver_argv(tmp_path, workdir, steps=400, sleep=0.02), stdout=subprocess.DEVNULL)
    try:
        wait_for_metrics(workdir / "metrics.jsonl", 2)
        with pytest.raises(InfraError, match="already training run run-test"):
            supervise(make_request(tmp_path, workdir=workdir))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def test_s3_storage_end_to_end(tmp_path: Path, aws_env: MotoServer) -> None:
    boto3.client("s3").create_bucket(Bucket="ckpts")
    store = open_storage("s3://ckpts/team", tmp_path)
    supervise(make_request(tmp_path, storage=store, steps=12))
    rec = Recorder()
    outcome = supervise(make_request(tmp_path, storage=store, recorder=rec, workdir=tmp_path / "w2", steps=16))
    assert rec.matching("resuming run") == [
        "resuming run run-test from checkpoint step 12 (s3://ckpts/team/runs/run-test/checkpoints/step-00000012)"
    ]
    assert outcome.checkpoints[-1].uri == "s3://ckpts/team/runs/run-test/checkpoints/step-00000016"


class SlowStorage(LocalStorage):
    """Each file takes two seconds to land, unless the upload is called off."""

    def put_file(self, local: Path, key: str, *, sha256: str | None = None, cancel: Cancel | None = None) -> None:
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            if cancel is not None and cancel():
                raise UploadCancelled(f"upload to {key} cancelled")
            time.sleep(0.02)
        super().put_file(local, key, sha256=sha256)


def test_on_stop_an_older_upload_gives_way_to_the_final_checkpoint(tmp_path: Path) -> None:
    rec = Recorder()
    req = make_request(tmp_path, recorder=rec, storage=SlowStorage(tmp_path / "slow"), steps=400, sleep=0.02)

    def stop_once_an_upload_is_under_way() -> None:
        deadline = time.monotonic() + 60
        while not rec.matching("uploading checkpoint step") and time.monotonic() < deadline:
            time.sleep(0.01)
        uploading = int(rec.matching("uploading checkpoint step")[0].split()[3])
        wait_for_metrics(req.workdir / "metrics.jsonl", uploading + 2)  # the trainer has moved on
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=stop_once_an_upload_is_under_way, daemon=True).start()
    outcome = supervise(req)
    assert outcome.stop_reason == "preempted"
    assert outcome.checkpoints[-1].step == outcome.final_step
    first_upload = int(rec.matching("uploading checkpoint step")[0].split()[3])
    assert first_upload < outcome.final_step  # a 2 s upload is under way when the stop comes
    assert rec.matching(f"upload of checkpoint step {first_upload} cancelled")


class FailingStorage(LocalStorage):
    def put_file(self, local: Path, key: str, *, sha256: str | None = None, cancel: Cancel | None = None) -> None:
        raise InfraError("the store is down")


def test_final_checkpoint_that_cannot_be_made_durable_is_an_error(tmp_path: Path) -> None:
    rec = Recorder()
    req = make_request(tmp_path, recorder=rec, storage=FailingStorage(tmp_path / "s"), steps=6)
    with pytest.raises(InfraError, match="final checkpoint of run run-test could not be uploaded"):
        supervise(req)


def test_missing_command_is_an_input_error(tmp_path: Path) -> None:
    req = make_request(tmp_path)
    req.command = ["definitely-not-a-command-gpuline"]
    with pytest.raises(InputError, match="entrypoint command cannot be run: definitely-not-a-command-gpuline"):
        supervise(req)


def test_missing_workdir_is_an_input_error(tmp_path: Path) -> None:
    req = make_request(tmp_path)
    req.cwd = tmp_path / "nope"
    with pytest.raises(InputError, match=r"entrypoint directory .* does not exist"):
        supervise(req)


def test_keep_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(InputError):
        supervise(make_request(tmp_path, keep=0))


def _readme_trainer(directory: Path) -> Path:
    readme = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    block = readme.split("A\nframework-free trainer:\n\n```python\n", 1)[1].split("```", 1)[0]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "readme_train.py").write_text(block)
    return directory / "readme_train.py"


def test_the_readme_framework_free_trainer_honours_the_contract(tmp_path: Path) -> None:
    script = _readme_trainer(tmp_path)
    req = make_request(tmp_path)
    req.command = [sys.executable, script.name]
    req.hyperparameters = {"steps": 12}
    first = supervise(req)
    assert first.stop_reason == "completed" and [c.step for c in first.checkpoints] == [5, 10, 12]
    req.hyperparameters = {"steps": 20}
    done = supervise(req)
    assert done.resumed_from_step == 12 and done.final_step == 20
    assert done.stop_reason == "completed" and "loss" in done.eval_metrics
    assert smoke_test([sys.executable, script.name], tmp_path, None, {"steps": 5}, 60).fell


# ---------------------------------------------------------------- launching


def test_launch_argv_single_process_is_the_command() -> None:
    assert launch_argv(["python", "t.py"], run_id="r", nnodes=1, nprocs_per_node=1, rdzv=None) == ["python", "t.py"]


def test_launch_argv_wraps_torchrun() -> None:
    argv = launch_argv(["/venv/bin/python", "t.py", "--x"], run_id="r", nnodes=1, nprocs_per_node=2, rdzv=None)
    assert argv[:3] == ["/venv/bin/python", "-m", "torch.distributed.run"]
    assert "--standalone" in argv and "--nproc-per-node=2" in argv and argv[-2:] == ["t.py", "--x"]
    multi = launch_argv(["python", "t.py"], run_id="r", nnodes=2, nprocs_per_node=1, rdzv="10.0.0.1:29400")
    assert {"--rdzv-backend=c10d", "--rdzv-endpoint=10.0.0.1:29400", "--rdzv-id=r", "--nnodes=2"} <= set(multi)
    binary = launch_argv(["./train"], run_id="r", nnodes=1, nprocs_per_node=2, rdzv=None)
    assert binary[0] == sys.executable and binary[-2:] == ["--no-python", "./train"]


def test_multi_node_needs_a_rendezvous_endpoint() -> None:
    with pytest.raises(InputError, match="no rendezvous endpoint"):
        launch_argv(["python", "t.py"], run_id="r", nnodes=2, nprocs_per_node=1, rdzv=None)


# ---------------------------------------------------------------- preflight helpers


def _smoke(tmp_path: Path, timeout_s: float = 60, **hp: object) -> SmokeResult:
    script = write_trainer(tmp_path)
    return smoke_test([sys.executable, script.name], tmp_path, None, hp, timeout_s)


def test_smoke_test_reports_falling_loss(tmp_path: Path) -> None:
    result = _smoke(tmp_path)
    assert result.fell is True
    assert len(result.losses) == 20
    assert result.step_seconds == pytest.approx(0.01)


def test_smoke_test_reports_flat_loss(tmp_path: Path) -> None:
    result = _smoke(tmp_path, smoke_flat=True)
    assert result.fell is False


@pytest.mark.parametrize(
    ("hp", "message"),
    [
        ({"smoke_fail": True}, "exited with code 2: ValueError: labels out of range"),
        ({"smoke_silent": True}, "wrote no losses to GPULINE_METRICS_PATH"),
    ],
)
def test_smoke_test_failures_are_input_errors(tmp_path: Path, hp: dict[str, object], message: str) -> None:
    with pytest.raises(InputError) as info:
        _smoke(tmp_path, **hp)
    assert message in info.value.message
    assert info.value.hint


def test_smoke_test_timeout(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(InputError, match="did not finish within 1s"):
        _smoke(tmp_path, timeout_s=1, smoke_hang=True)
    assert time.monotonic() - started < 30  # the hanging child was killed, not waited for


def test_import_check_passes_and_does_not_run_main(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text("import json\nif __name__ == '__main__':\n    raise SystemExit('ran main')\n")
    check_entrypoint_imports(script, tmp_path)


def test_import_check_names_the_missing_module_and_line(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text("import os\n\nimport definitely_missing_module_gpuline\n")
    with pytest.raises(InputError) as info:
        check_entrypoint_imports(script, tmp_path)
    err = info.value
    assert "ModuleNotFoundError" in err.message and "definitely_missing_module_gpuline" in err.message
    assert err.location is not None and err.location.line == 3
    assert err.hint and "definitely_missing_module_gpuline" in err.hint


def test_import_check_finds_sibling_modules(tmp_path: Path) -> None:
    (tmp_path / "helpers.py").write_text("X = 1\n")
    script = tmp_path / "train.py"
    script.write_text("from helpers import X\n")
    check_entrypoint_imports(script, tmp_path)


@pytest.mark.parametrize(
    ("source", "message", "line"),
    [
        ("def broken(:\n", "syntax error", 1),
        ("x = 1\nraise RuntimeError('needs a GPU')\n", "raised RuntimeError: needs a GPU", 2),
        ("import os\nos._exit(4)\n", "ended the interpreter (exit 4)", None),
    ],
)
def test_import_check_other_failures(tmp_path: Path, source: str, message: str, line: int | None) -> None:
    script = tmp_path / "train.py"
    script.write_text(source)
    with pytest.raises(InputError) as info:
        check_entrypoint_imports(script, tmp_path)
    assert message in info.value.message
    assert info.value.location is not None and info.value.location.line == line


def test_import_check_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        check_entrypoint_imports(tmp_path / "nope.py", tmp_path)
