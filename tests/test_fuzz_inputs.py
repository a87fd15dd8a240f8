"""A seeded fuzz of gpuline.yml and policy.yml: every leaf and every level of both files deleted,
retyped, renamed and nested, plus byte-level damage and hostile sizes. For every case the command
either accepts the files or says what is wrong in one line naming the file, the line, the field and
the fix; it exits 0, 1 or 2 (never 3, never a traceback), prints exactly one JSON document, and holds
nothing: no lease, no quota reservation.

The seed is fixed, so a failure names a case that reproduces: ``CASES[i]`` is the same every run.
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
import re
import signal
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
import yaml

from conftest import write_project
from gpuline.cli import main
from gpuline.ledger.sqlite import SqliteLedger

SEED = 13
# The dataset conftest.write_project writes, and its hash.
DATASET_SHA256 = hashlib.sha256(b"0123456789" * 100).hexdigest()
HANG_GUARD_S = 60  # a case still running after this has hung; no case is timed against it

POLICY = """\
version: 1
budgets:
  period: week
  teams:
    vision:
      gpu_hours: {soft: 50, hard: 100}
      usd: {soft: 500, hard: 1000}
  default:
    gpu_hours: {hard: 20}
  org:
    usd: {hard: 10000}
tiers:
  nightly:
    max_duration: 2h
    allowed_gpu_types: [cpu, t4]
    max_gpus: 8
    allowed_lanes: [on-demand, spot]
lanes:
  on-demand: {capacity: 4}
  spot: {capacity: 2}
approval:
  label: gpu-approved
"""

SPEC_EXTRA = """\
checkpoint:
  interval_steps: 5
  keep: 2
eval:
  baseline: production
  gates:
    - {metric: loss, goal: minimize, max: 10.0}
tiers:
  nightly:
    hyperparameters: {steps: 5}
    resources: {max_duration: 5m}
    checkpoint: {keep: 1}
backends:
  ledger: sqlite:///.gpuline/ledger.db
"""

# Values a leaf is replaced with: every YAML type, the edges of numbers, and strings that must be
# clipped when echoed.
VALUES: list[Any] = [
    None,
    True,
    0,
    -1,
    10**30,
    1.5,
    float("inf"),
    "",
    "abc",
    "ünïcødé ✓",
    "x" * 5000,
    [1, "two"],
    {"k": 1},
    [[[[[]]]]],
]


@dataclass(frozen=True)
class Case:
    name: str
    spec: bytes
    policy: bytes


def _levels(node: Any, trail: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every path into ``node``: each mapping key and list item, containers and leaves alike."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield (*trail, key)
            yield from _levels(value, (*trail, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield (*trail, index)
            yield from _levels(value, (*trail, index))


def _edit(data: Any, trail: tuple[Any, ...], how: Callable[[Any, Any], None]) -> Any:
    out = copy.deepcopy(data)
    parent = out
    for part in trail[:-1]:
        parent = parent[part]
    how(parent, trail[-1])
    return out


def _structural(data: Any, rng: random.Random) -> Iterator[tuple[str, Any]]:
    """Each path deleted, retyped (two random values), renamed (a typo) and nested one level deeper."""
    for trail in _levels(data):
        where = ".".join(map(str, trail))
        yield f"delete {where}", _edit(data, trail, lambda p, k: p.pop(k))
        for value in rng.sample(VALUES, 2):
            yield f"set {where}={str(value)[:20]!r}", _edit(data, trail, lambda p, k, v=value: p.__setitem__(k, v))
        if isinstance(trail[-1], str):
            yield f"rename {where}", _edit(data, trail, lambda p, k: p.__setitem__(k[:-1] + "q", p.pop(k)))
        yield f"nest {where}", _edit(data, trail, lambda p, k: p.__setitem__(k, {"extra": p[k]}))


def _byte_damage(text: bytes, rng: random.Random) -> Iterator[tuple[str, bytes]]:
    """Damage a file can take on its way to disk: flipped bits, cuts, stray bytes, broken indentation."""
    for _ in range(6):
        at = rng.randrange(len(text))
        yield f"flip byte {at}", text[:at] + bytes([text[at] ^ (1 << rng.randrange(8))]) + text[at + 1 :]
        yield f"cut at {at}", text[:at]
        yield f"NUL at {at}", text[:at] + b"\x00" + text[at:]
        yield f"bad UTF-8 at {at}", text[:at] + b"\xc3\x28" + text[at:]
        line_start = text.rfind(b"\n", 0, at) + 1
        yield f"indent line at {at}", text[:line_start] + b"   " + text[line_start:]
        yield f"tab at {at}", text[:line_start] + b"\t" + text[line_start:]
    yield "undefined alias", text + b"extra: *nowhere\n"
    yield "two documents", text + b"---\nversion: 1\n"
    yield "every line twice", b"".join(line + b"\n" + line + b"\n" for line in text.splitlines())
    yield "random bytes", rng.randbytes(2048)
    yield "empty", b""
    yield "a list, not a mapping", b"- version: 1\n"
    yield "a python tag", text + b"evil: !!python/object/apply:os.system [true]\n"


def _sizes() -> Iterator[tuple[str, bytes]]:
    """The hostile sizes: each must be refused by a bound, not survived by luck."""
    bomb = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    bomb += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 12)]
    yield "alias bomb", ("\n".join(bomb) + "\n").encode()
    yield "deep nesting", b"x: " + b"[" * 10000 + b"]" * 10000 + b"\n"
    yield "deep block nesting", "".join("  " * i + f"k{i}:\n" for i in range(200)).encode()
    yield "50 MB field", b"version: 1\nx: " + b"y" * (50 << 20) + b"\n"
    yield "long scalar", b"version: 1\nx: '" + b"y" * 100_000 + b"'\n"
    yield "huge integer", b"version: 1\nx: " + b"9" * 50_000 + b"\n"
    yield "many keys", b"".join(b"k%d: 1\n" % i for i in range(60_000))


def _dump(data: Any) -> bytes:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True).encode()


def _cases() -> list[Case]:
    rng = random.Random(SEED)
    spec_text = _base_spec_text()
    spec_data, policy_data = yaml.safe_load(spec_text), yaml.safe_load(POLICY)
    spec, policy = spec_text.encode(), POLICY.encode()
    cases = [Case("unchanged", spec, policy)]
    cases += [Case(f"gpuline.yml: {n}", _dump(d), policy) for n, d in _structural(spec_data, rng)]
    cases += [Case(f"policy.yml: {n}", spec, _dump(d)) for n, d in _structural(policy_data, rng)]
    cases += [Case(f"gpuline.yml: {n}", b, policy) for n, b in _byte_damage(spec, rng)]
    cases += [Case(f"policy.yml: {n}", spec, b) for n, b in _byte_damage(policy, rng)]
    for name, body in _sizes():
        cases += [Case(f"gpuline.yml: {name}", body, policy), Case(f"policy.yml: {name}", spec, body)]
    return cases


def _base_spec_text() -> str:
    # The project's own gpuline.yml (its dataset hash included) with every section filled in.
    lines = textwrap.dedent(
        """\
        version: 1
        model: {name: tiny, owner: team@example.com, team: vision, intended_use: tests}
        dataset: {uri: data.bin, sha256: %s}
        entrypoint: {command: [python, train.py]}
        hyperparameters: {steps: 10, lr: 0.1}
        resources: {provider: local, gpu_type: cpu, gpu_count: 0, max_duration: 10m, lane: on-demand}
        secrets: []
        """
    )
    return lines % DATASET_SHA256 + SPEC_EXTRA


CASES = _cases()


class Hung(BaseException):
    """Raised by the hang guard; a BaseException, so the CLI's own error boundary cannot swallow it."""


def _hang(signum: int, frame: FrameType | None) -> None:
    raise Hung()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One project for every case (its ledger collects their runs); each case rewrites both files."""
    config = write_project(tmp_path_factory.mktemp("fuzz") / "proj")
    assert f"sha256: {DATASET_SHA256}" in config.read_text()
    return config


def _check(case: Case, config: Path, capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """Run one command on the case's files and check the contract; returns the error line, if any."""
    config.write_bytes(case.spec)
    (config.parent / "policy.yml").write_bytes(case.policy)
    previous = signal.signal(signal.SIGALRM, _hang)
    signal.alarm(HANG_GUARD_S)
    try:
        code = main([*args, "--config", str(config), "--json"])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    out, err = capsys.readouterr()
    assert code in (0, 1, 2), f"{case.name}: exit {code}\n{err[-2000:]}"
    assert "Traceback" not in err and "internal error" not in err, f"{case.name}:\n{err[-2000:]}"
    body = json.loads(out)  # exactly one document: anything after it is an error here
    assert body["ok"] is (code == 0), case.name
    if code == 0:
        return ""
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, f"{case.name}: {err[-2000:]}"
    line = lines[0]
    assert line == f"error: {body['error']}", case.name
    assert len(line) < 1500, f"{case.name}: a {len(line)}-character line"
    assert "(fix: " in line, f"{case.name}: no fix in {line}"
    return line


def _names_its_place(case: Case, config: Path, line: str) -> None:
    """An input error about one of the two files names that file, and the line, for the file it broke."""
    broken = "policy.yml" if case.name.startswith("policy.yml") else "gpuline.yml"
    file = str(config.parent / broken)
    if f"error: {file}" in line:
        assert re.match(rf"error: {re.escape(file)}:\d+", line), f"{case.name}: no line in {line}"


def _nothing_held(config: Path) -> None:
    ledger = SqliteLedger(config.parent / ".gpuline" / "ledger.db")
    try:
        assert ledger.leases(active_only=True) == []
        assert ledger.reservations(state="held") == []
    finally:
        ledger.close()


def test_the_mutator_reaches_every_leaf_and_level_of_both_files() -> None:
    names = [c.name for c in CASES]
    for path in ("tiers.nightly.resources.max_duration", "eval.gates.0.max", "lanes.spot.capacity"):
        assert any(path in n for n in names), path
    assert sum(n.startswith("policy.yml") for n in names) > 100 and len(names) > 400


@pytest.mark.slow  # each case is quick; the ~500 of them together take about a minute
@pytest.mark.parametrize("index", range(len(CASES)), ids=lambda i: f"{i}-{CASES[i].name[:60]}")
def test_every_mutated_config_keeps_the_contract(
    index: int, workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    case = CASES[index]
    line = _check(case, workspace, capsys, "preflight")
    if case.name == "unchanged":
        assert line == "", line  # the base is valid, so each mutation is what a failure is about
        assert _check(case, workspace, capsys, "cost-estimate", "--no-reserve") == ""
    if line:
        _names_its_place(case, workspace, line)
    if case.name.startswith("policy.yml"):
        # The policy decides at cost-estimate: a refusal or an error holds no quota.
        line = _check(case, workspace, capsys, "cost-estimate")
        if line:
            _nothing_held(workspace)
            return
        _release_what_an_accepted_estimate_held(workspace)
    _nothing_held(workspace)


def _release_what_an_accepted_estimate_held(config: Path) -> None:
    # An estimate that passed holds quota for its run, as it should; release it so the next case starts clean.
    ledger = SqliteLedger(config.parent / ".gpuline" / "ledger.db")
    try:
        for reservation in ledger.reservations(state="held"):
            ledger.release(reservation.run_id)
    finally:
        ledger.close()
