"""The error contract for hostile and broken inputs: every failure is one line naming the file, the
line, the field and the fix, with exit 2 (input), 1 (refused) or 3 (infrastructure), one JSON
document under ``--json``, and never a traceback, a hang or a flood."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import random
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import write_project
from gpuline.cli import main
from gpuline.errors import MAX_TEXT, InfraError
from gpuline.ledger.sqlite import SqliteLedger
from gpuline.registry.local import LocalRegistry
from gpuline.yamlsource import MAX_BYTES, MAX_DEPTH, MAX_NODES

HANG_GUARD_S = 120  # only so a regression fails instead of hanging the suite; never a measurement


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any], str]:
    """Run ``gpuline ARGS --json`` in-process: the exit code, the one JSON document, the stderr."""
    code = main([*args, "--json"])
    captured = capsys.readouterr()
    body = json.loads(captured.out)  # exactly one document: json.loads refuses anything after it
    assert isinstance(body, dict)
    return code, body, captured.err


def one_line(err: str) -> str:
    """The one error line of a failed command (progress lines such as '== preflight: x' aside)."""
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    assert "Traceback" not in err and "internal error" not in err, err
    return lines[0]


def gpuline(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpuline.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
        check=False,
    )


# ---------------------------------------------------------------- bytes and structure of a config file


@pytest.mark.parametrize(
    ("body", "line", "words"),
    [
        (b"version: 1\nmodel: \xff\xfe\n", 2, "not UTF-8 text"),
        (b"version: 1\nmodel:\n  name: a\x00b\n", 3, "#x0000"),
        (b"version: 1\n\x07model: x\n", 2, "#x0007"),
    ],
    ids=["not-utf8", "nul-byte", "control-character"],
)
def test_bytes_a_config_cannot_hold_name_their_line(
    project: Path, capsys: pytest.CaptureFixture[str], body: bytes, line: int, words: str
) -> None:
    project.write_bytes(body)
    code, doc, err = cli(capsys, "preflight", "--config", str(project))
    assert code == 2 and doc["exit_code"] == 2
    assert f"gpuline.yml:{line}: " in one_line(err) and words in doc["error"] and "(fix: " in doc["error"]


def test_a_binary_file_as_config_is_an_input_error(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    project.write_bytes(random.Random(13).randbytes(4096))
    code, _doc, err = cli(capsys, "preflight", "--config", str(project))
    assert code == 2 and "gpuline.yml:" in one_line(err)


def test_deep_nesting_is_refused_with_its_line_and_field(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    project.write_text(project.read_text() + "  options: " + "[" * 5000 + "]" * 5000 + "\n")
    code, doc, err = cli(capsys, "preflight", "--config", str(project))
    assert code == 2
    assert f"nested more than {MAX_DEPTH} levels deep" in doc["error"]
    assert "gpuline.yml:18: resources.options[0][0]" in one_line(err)


def test_a_config_that_is_a_device_is_not_read(capsys: pytest.CaptureFixture[str]) -> None:
    code, _doc, err = cli(capsys, "preflight", "--config", "/dev/zero")
    assert code == 2 and "/dev/zero: not a regular file" in one_line(err)


def test_a_config_over_the_size_bound_is_refused_unread(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    project.write_text(project.read_text() + "hyperparameters:\n  blob: " + "x" * (50 << 20) + "\n")
    code, doc, err = cli(capsys, "preflight", "--config", str(project))
    assert code == 2 and f"passes the {MAX_BYTES:,}-byte bound" in doc["error"] and "gpuline.yml:19: " in one_line(err)
    assert len(one_line(err)) < 1000


def test_an_alias_bomb_is_refused_without_expanding_it(project: Path) -> None:
    lines = ["version: 1", "a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 12)]
    project.write_text("\n".join(lines) + "\n")
    result = gpuline("preflight", "--config", str(project), "--json")
    assert result.returncode == 2, result.stderr
    assert f"more than {MAX_NODES:,} values (aliases expanded)" in json.loads(result.stdout)["error"]


def test_a_policy_with_countless_teams_is_refused(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    teams = ", ".join(f"t{i}" for i in range(MAX_NODES // 2 + 1))  # under the size bound, over the node bound
    (project.parent / "policy.yml").write_text("budgets:\n  teams: {" + teams + "}\n")
    code, doc, err = cli(capsys, "preflight", "--config", str(project))
    assert code == 2 and "policy.yml:2: budgets.teams.t" in one_line(err)
    assert f"more than {MAX_NODES:,} values (fix: " in doc["error"]


def test_countless_hyperparameters_are_refused(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    values = ", ".join("0" for _ in range(MAX_NODES))
    project.write_text(project.read_text().replace("  steps: 10", "  steps: 10\n  grid: [" + values + "]"))
    code, _doc, err = cli(capsys, "preflight", "--config", str(project))
    assert code == 2 and "gpuline.yml:14: hyperparameters.grid[" in one_line(err)


def test_a_long_value_is_clipped_in_the_message(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    project.write_text(project.read_text().replace("gpu_type: cpu", "gpu_type: cpu\n  gpu_count: x" + "9" * 60000))
    code, doc, _err = cli(capsys, "preflight", "--config", str(project))
    assert code == 2 and "resources.gpu_count" in doc["error"]
    assert len(doc["error"]) <= MAX_TEXT + 200 and "characters" in doc["error"]


def test_a_number_too_long_to_read_names_its_line(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Python refuses to turn more than a few thousand digits into an int; YAML would ask it to.
    project.write_text(project.read_text().replace("gpu_type: cpu", "gpu_type: cpu\n  gpu_count: " + "9" * 60000))
    code, _doc, err = cli(capsys, "preflight", "--config", str(project))
    assert code == 2 and "gpuline.yml:17: resources.gpu_count: a number of 60,000 digits" in one_line(err)


def test_an_infinite_duration_is_an_input_error(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    project.write_text(project.read_text().replace("max_duration: 10m", "max_duration: .inf"))
    code, _doc, err = cli(capsys, "preflight", "--config", str(project))
    assert code == 2 and "gpuline.yml:17: resources.max_duration" in one_line(err)


# ---------------------------------------------------------------- tiers.* overrides


def test_the_readme_typo_under_a_tier_names_file_line_field_and_fix(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    project.write_text(project.read_text() + "tiers:\n  nightly:\n    resources:\n      max_duraton: 5m\n")
    code, _doc, err = cli(capsys, "preflight", "--config", str(project))
    assert code == 2
    assert one_line(err) == (
        f"error: {project}:21: tiers.nightly.resources.max_duraton: unknown key (fix: did you mean `max_duration`?)"
    )


def test_a_bad_value_in_another_tier_fails_at_load(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Not the tier being run: the file is wrong, and saying so now beats failing at release time.
    project.write_text(project.read_text() + "tiers:\n  release:\n    checkpoint:\n      keep: 0\n")
    code, doc, err = cli(capsys, "preflight", "--config", str(project), "--tier", "pr-fast")
    assert code == 2 and "gpuline.yml:21: tiers.release.checkpoint.keep: " in one_line(err)
    assert "(got 0)" in doc["error"]


# ---------------------------------------------------------------- the dataset


def test_a_dataset_that_is_a_directory(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (project.parent / "folder").mkdir()
    project.write_text(project.read_text().replace("uri: data.bin", "uri: folder"))
    code, doc, err = cli(capsys, "preflight", "--config", str(project))
    assert code == 2 and "gpuline.yml:8: dataset.uri: " in one_line(err) and "is a directory" in doc["error"]


def test_a_dataset_that_never_ends_is_not_hashed(project: Path) -> None:
    project.write_text(project.read_text().replace("uri: data.bin", "uri: /dev/zero"))
    result = gpuline("preflight", "--config", str(project), "--json")
    assert result.returncode == 2, result.stderr
    assert "the dataset /dev/zero is a device" in json.loads(result.stdout)["error"]


def test_an_unreadable_dataset(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # As root a chmod does not stop a read, so the refusal is the file system's own error, injected.
    data, opened = project.parent / "data.bin", Path.open

    def refuse(self: Path, *args: Any, **kwargs: Any) -> Any:
        if self == data:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return opened(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", refuse)
    code, _doc, err = cli(capsys, "preflight", "--config", str(project))
    assert code == 2 and "dataset.uri: cannot read the dataset data.bin: Permission denied" in one_line(err)


# ---------------------------------------------------------------- the file registry


def _two_releases(root: Path) -> LocalRegistry:
    registry = LocalRegistry(root / ".gpuline" / "registry")
    for run in ("r1", "r2"):
        version = registry.register("tiny", f"file://x/{run}", run, {"loss": 0.1}, {}).version
        registry.promote("tiny", version, "production")
    return registry


@pytest.mark.parametrize("name", ["stage-production.json", "versions/2.json"])
def test_corrupt_registry_json_names_the_file(project: Path, capsys: pytest.CaptureFixture[str], name: str) -> None:
    _two_releases(project.parent)
    broken = project.parent / ".gpuline" / "registry" / "tiny" / name
    broken.write_text('{"stack": [1, 2')
    code, _doc, err = cli(capsys, "models", "--config", str(project))
    assert code == 3 and f"the registry file {broken} is corrupt" in one_line(err)


def test_an_unreadable_registry_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    registry = _two_releases(tmp_path)
    monkeypatch.setattr(
        Path, "read_bytes", lambda self: (_ for _ in ()).throw(PermissionError(13, "Permission denied"))
    )
    with pytest.raises(InfraError, match=r"cannot read the registry file .*stage-production\.json: Permission denied"):
        registry.in_stage("tiny", "production")


def test_a_held_registry_lock_times_out_naming_its_holder(project: Path) -> None:
    _two_releases(project.parent)
    lock_path = project.parent / ".gpuline" / "registry" / "tiny" / ".lock"
    # In a child process, so that a lock that waits forever fails the test at the hang guard.
    code = (
        "import sys; import gpuline.registry.local as r; r.LOCK_TIMEOUT_S = 0.2; from gpuline.cli import main; "
        "sys.exit(main(sys.argv[1:]))"
    )
    with lock_path.open("a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another promotion, stuck, with the note a holder leaves
        lock.truncate(0)
        lock.write("pid 4242 on ci-7 since 2026-01-01T00:00:00+00:00: gpuline promote\n")
        lock.flush()
        result = subprocess.run(
            [sys.executable, "-c", code, "rollback", "--config", str(project), "--stage", "production", "--json"],
            capture_output=True,
            text=True,
            timeout=HANG_GUARD_S,
            check=False,
        )
    assert result.returncode == 3, result.stderr
    assert "stayed locked for 0s by pid 4242 on ci-7" in one_line(result.stderr)
    assert str(lock_path) in json.loads(result.stdout)["error"]


# ---------------------------------------------------------------- the sqlite ledger


def _ledger_file(project: Path) -> Path:
    path = project.parent / ".gpuline" / "ledger.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def test_a_zero_byte_ledger_is_an_error_not_no_runs(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _ledger_file(project)
    path.write_bytes(b"")
    code, _doc, err = cli(capsys, "status", "--config", str(project))
    assert code == 3 and "is empty (0 bytes)" in one_line(err)
    assert path.stat().st_size == 0  # left as found, for whoever restores it


def _ledger_with_a_run(project: Path) -> Path:
    path = _ledger_file(project)
    assert main(["preflight", "--config", str(project), "--json"]) == 0
    with sqlite3.connect(path) as db:  # every page into the file itself, none left in the WAL
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return path


def test_a_malformed_ledger_page(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _ledger_with_a_run(project)
    capsys.readouterr()
    data = bytearray(path.read_bytes())
    data[4096:] = b"\xde\xad" * ((len(data) - 4096) // 2)
    path.write_bytes(bytes(data))
    code, _doc, err = cli(capsys, "status", "--config", str(project))
    assert code == 3 and "is corrupt (database disk image is malformed)" in one_line(err)


def test_a_malformed_run_record_in_the_ledger(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _ledger_with_a_run(project)
    capsys.readouterr()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE runs SET body = '{torn'")
    code, _doc, err = cli(capsys, "status", "--config", str(project))
    assert code == 3 and "holds a malformed run record" in one_line(err)


class _FullDisk:
    """Stands in for the ledger's connection once the disk is full: every statement fails as SQLite's does."""

    def execute(self, *args: Any) -> Any:
        raise sqlite3.OperationalError("database or disk is full")


def test_a_full_disk_under_the_ledger_says_so(tmp_path: Path) -> None:
    ledger = SqliteLedger(tmp_path / "ledger.db")
    ledger._db.close()
    ledger._db = _FullDisk()  # type: ignore[assignment]
    with pytest.raises(InfraError, match="database or disk is full") as caught:
        ledger.release("run-1")
    assert caught.value.hint == "free disk space on the ledger's volume and rerun"


def test_a_full_disk_anywhere_is_one_line_exit_3(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(*args: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device", "/work/.gpuline/runs/x/metrics.jsonl")

    monkeypatch.setattr("gpuline.steps.status.run", full)
    code, _doc, err = cli(capsys, "status", "--config", str(project))
    assert code == 3
    assert one_line(err) == (
        "error: No space left on device (ENOSPC): /work/.gpuline/runs/x/metrics.jsonl (fix: free disk space and rerun)"
    )


# ---------------------------------------------------------------- policy and flags


def test_a_closed_lane_is_a_refusal_that_reserves_nothing(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (project.parent / "policy.yml").write_text("lanes:\n  on-demand:\n    capacity: 0\n")
    code, _doc, err = cli(capsys, "cost-estimate", "--config", str(project))
    assert code == 1 and "closes the on-demand lane (lanes.on-demand.capacity: 0)" in one_line(err)
    ledger = SqliteLedger(project.parent / ".gpuline" / "ledger.db")
    assert ledger.reservations() == [] and ledger.leases() == []


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("reap", "--grace", "abc"), "--grace 'abc' is not a duration"),
        (("report", "--weeks", "100000000"), "--weeks 100000000 must be at most 520"),
        (("report", "--weeks", "abc"), "argument --weeks: invalid int value: 'abc'"),
        (("status", "--limit", "99999999999999999999999"), "--limit 99999999999999999999999 must be between"),
    ],
    ids=["reap-grace", "report-weeks", "report-weeks-not-a-number", "status-limit"],
)
def test_bad_flags_are_input_errors(
    project: Path, capsys: pytest.CaptureFixture[str], args: tuple[str, ...], words: str
) -> None:
    code, doc, err = cli(capsys, *args, "--config", str(project))
    assert code == 2 and doc == {"ok": False, "error": doc["error"], "exit_code": 2}
    assert words in one_line(err)


def test_a_reader_that_goes_away_breaks_nothing(project: Path) -> None:
    # `gpuline status --json | true`, made certain: the pipe's read end is closed before anything is written.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "gpuline.cli", "status", "--json", "--config", str(project)],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=HANG_GUARD_S,
            check=False,
        )
    finally:
        os.close(write_end)
    assert result.returncode == 0 and result.stderr == ""


def test_a_bug_is_still_one_line_and_one_json_document(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def bug(*args: Any) -> Any:
        raise RuntimeError("line one\nline two")

    monkeypatch.setattr("gpuline.steps.status.run", bug)
    code, doc, err = cli(capsys, "status", "--config", str(project))
    assert code == 3 and doc["exit_code"] == 3
    assert doc["error"].startswith("internal error: RuntimeError: line one line two (fix: this is a bug")
    assert len([line for line in err.splitlines() if line.strip()]) == 1


def test_a_fresh_project_still_gets_a_new_ledger(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_project(tmp_path / "fresh")
    code, doc, _err = cli(capsys, "status", "--config", str(config))
    assert code == 0 and doc == {"ok": True, "runs": []}
    assert (config.parent / ".gpuline" / "ledger.db").stat().st_size > 0
    assert [p.name for p in (config.parent / ".gpuline").iterdir() if p.name.endswith(".tmp")] == []
