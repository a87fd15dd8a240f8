"""How long the pr-fast tier takes under act, cold (an empty uv cache) and warm (the cache it left).

Runs the consumer's caller (templates/workflows/pr.yml, with the runner's python: torch comes from the
runner's environment, as on an image that has it or after a cached setup-python) in act's host mode,
as tests/test_workflows.py does, and prints the wall time of each run and the warm/cold ratio. Each
round starts from a fresh, empty uv cache, then runs again on the cache the first run filled.

Where the seconds go comes from act's own step timings (each finished step's log line ends with its
duration), grouped into the phases a reviewer waits on: installs (every "Set up uv" and "Install
gpuline" step, the composite actions' own included), the estimate and preflight commands themselves,
the comment, and the rest (guard, checkout, job start). Preflight's own phases come from its
``--json`` timings line in the log.

    .venv/bin/python bench/pr_fast.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from act_harness import Act  # noqa: E402
from test_workflows import consumer_repo  # noqa: E402

# e.g. "[gpuline PR/gpuline/preflight and cost estimate (CPU)]   ✅  Success - Main Cost estimate [3.1s]"
_STEP = re.compile(
    r"^\[[^\]]*\]\s+(?:✅|❌)\s+(?:Success|Failure) - (?:Main|Pre|Post) (?P<step>.+?) \[(?P<took>[0-9.hmsµ]+)\]$"
)
_GO_UNIT = re.compile(r"([0-9.]+)(h|ms|µs|m|s)")
_UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "µs": 1e-6}
# The composite actions' steps that install (a job's own "Set up gpuline" step wraps these two, so
# it is not counted again), and the steps that run a gpuline command.
_INSTALL = ("Set up uv", "Install gpuline")
_PHASES = {
    "gpuline cost-estimate": "estimate",
    "gpuline preflight": "preflight",
    "Post or update the sticky comment": "comment",
}


def go_seconds(text: str) -> float:
    """A Go duration (act prints time.Duration): 1m2.5s, 812.3ms, 4.57s."""
    return sum(float(n) * _UNIT_S[u] for n, u in _GO_UNIT.findall(text))


def step_seconds(log: str) -> list[tuple[str, float]]:
    """Every finished step in act's log, in order, with its own duration."""
    found = (_STEP.match(line.strip()) for line in log.splitlines())
    return [(m["step"], go_seconds(m["took"])) for m in found if m]


def preflight_phases(log: str) -> dict[str, float]:
    """Preflight's own line, "preflight phases: policy 0.01 s, ..., smoke 3.20 s", prefixed by act."""
    for line in log.splitlines():
        _, found, rest = line.partition("preflight phases: ")
        if found:
            pairs = (part.rsplit(" ", 2) for part in rest.strip().split(", "))
            return {f"preflight {name}": float(value) for name, value, _unit in pairs}
    return {}


def phases(log: str, wall: float) -> dict[str, float]:
    """Seconds per phase; a composite action's line includes its inner steps, so only leaves count."""
    out = dict.fromkeys(("install", "estimate", "preflight", "comment"), 0.0)
    for step, took in step_seconds(log):
        if step in _INSTALL:
            out["install"] += took
        elif step in _PHASES:
            out[_PHASES[step]] += took
    out["other"] = max(0.0, wall - sum(out.values()))
    return {**out, **preflight_phases(log)}


def one_run(act: Act, repo: Path, event: Path, cache: Path) -> tuple[float, dict[str, float]]:
    start = time.perf_counter()
    result = act.run(
        repo, "pull_request", ".github/workflows/pr.yml", event_file=event, env={"UV_CACHE_DIR": str(cache)}
    )
    took = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"pr-fast failed under act:\n{result.log[-4000:]}")
    if os.environ.get("BENCH_STEPS"):
        for step, seconds in step_seconds(result.log):
            print(f"  {seconds:6.2f} s  {step}")
    return took, phases(result.log, took)


def print_phases(name: str, runs: list[dict[str, float]]) -> None:
    keys = list(runs[0])
    top = [k for k in keys if not k.startswith("preflight ")]
    inner = [k for k in keys if k.startswith("preflight ")]
    for group in (top, inner):
        cells = "  ".join(f"{k} {statistics.median(r.get(k, 0.0) for r in runs):5.1f} s" for k in group)
        print(f"{name:5} {cells}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", action="store_true", help="also print every step of each run with its seconds")
    args = parser.parse_args()
    if args.steps:
        os.environ["BENCH_STEPS"] = "1"
    cold: list[float] = []
    warm: list[float] = []
    cold_phases: list[dict[str, float]] = []
    warm_phases: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        act = Act.create(work / "act")
        for i in range(args.rounds):
            repo = consumer_repo(work / f"round{i}", act)
            event = work / f"event{i}.json"
            pr = {
                "number": 7,
                "base": {"ref": "main"},
                "head": {"ref": "feature", "repo": {"full_name": "acme/vision"}},
            }
            event.write_text(json.dumps({"pull_request": {**pr, "labels": []}}))
            cache = work / f"uv-cache{i}"
            cache.mkdir()
            for walls, split in ((cold, cold_phases), (warm, warm_phases)):
                took, parts = one_run(act, repo, event, cache)
                walls.append(took)
                split.append(parts)
            print(f"round {i + 1}: cold {cold[-1]:.1f} s, warm {warm[-1]:.1f} s", flush=True)
    c, w = statistics.median(cold), statistics.median(warm)
    print(f"pr-fast under act ({os.cpu_count()} cores): cold median {c:.1f} s, warm median {w:.1f} s")
    print(f"warm/cold {w / c:.2f}")
    print("seconds per phase (median; act's step timings, jobs run one after another in act):")
    print_phases("cold", cold_phases)
    print_phases("warm", warm_phases)


if __name__ == "__main__":
    main()
