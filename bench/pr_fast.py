"""How long the pr-fast tier takes under act, cold (an empty uv cache) and warm (the cache it left).

Runs the consumer's caller (templates/workflows/pr.yml, with the runner's python: torch comes from the
runner's environment, as on an image that has it or after a cached setup-python) in act's host mode,
as tests/test_workflows.py does, and prints the wall time of each run and the warm/cold ratio. Each
round starts from a fresh, empty uv cache, then runs again on the cache the first run filled.

    .venv/bin/python bench/pr_fast.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from act_harness import Act  # noqa: E402
from test_workflows import consumer_repo  # noqa: E402


def one_run(act: Act, repo: Path, event: Path, cache: Path) -> float:
    start = time.perf_counter()
    result = act.run(
        repo, "pull_request", ".github/workflows/pr.yml", event_file=event, env={"UV_CACHE_DIR": str(cache)}
    )
    took = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"pr-fast failed under act:\n{result.log[-4000:]}")
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    cold: list[float] = []
    warm: list[float] = []
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
            cold.append(one_run(act, repo, event, cache))
            warm.append(one_run(act, repo, event, cache))
            print(f"round {i + 1}: cold {cold[-1]:.1f} s, warm {warm[-1]:.1f} s", flush=True)
    c, w = statistics.median(cold), statistics.median(warm)
    print(f"pr-fast under act ({os.cpu_count()} cores): cold median {c:.1f} s, warm median {w:.1f} s")
    print(f"warm/cold {w / c:.2f}")


if __name__ == "__main__":
    main()
