"""Duration-estimate benchmark: how close the estimator gets to the next run's real training time.

Replays a synthetic history of nightly runs of one config (a trend, such as a dataset that grows a
little every night, plus noise and the odd slow runner) through gpuline's real estimator and a real
SQLite ledger: before each run it asks ``estimate_duration`` for p50/p90, then records the run as
finished. Prints the median absolute percentage error (MdAPE) of the p50 next to the guesses a
pipeline without an estimator makes (a fixed hour, the max duration) and the plain median of all
history, and how often the run finished within p90.

    python bench/estimate.py                       # 120 runs, +0.4% per run, 6% noise, 5% slow runs
    python bench/estimate.py --trend 0 --noise 0.15

``--no-history`` scores the estimate a first run gets instead (no ledger history: the smoke test's
timings and the catalog), against whole runs really made: for the reference example and a second,
differently shaped project (``bench/projects/wide-mlp``: a heavier data load, costlier steps,
checkpoints every 20 steps, eval.command), at several step counts, each in a fresh copy with an
empty ledger, ``gpuline run --tier nightly`` on the local provider. Prints the p50's error against
the paid seconds the run held its machine (provisioned to released) and how often p90 covered it.

    python bench/estimate.py --no-history                  # 3 step counts x 3 runs, 10 at the middle
    python bench/estimate.py --no-history --repeats 1 --coverage-repeats 1
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from gpuline.decisions.cost import MIN_HISTORY, estimate_duration
from gpuline.decisions.pricing import load_catalog
from gpuline.ledger.sqlite import SqliteLedger
from gpuline.runs import RunRecord
from gpuline.spec import Spec

START = datetime(2026, 6, 1, 2, 0, tzinfo=UTC)


@dataclass
class Prediction:
    actual: float
    p50: float
    p90: float
    basis: str
    median_so_far: float | None


def make_spec(max_duration_s: int, steps: int) -> Spec:
    return Spec.model_validate(
        {
            "model": {"name": "bench", "owner": "o", "team": "t", "intended_use": "benchmark"},
            "dataset": {"uri": "d", "sha256": "0" * 64},
            "entrypoint": {"command": ["python", "train.py"]},
            "hyperparameters": {"steps": steps},
            "resources": {"provider": "ec2", "gpu_type": "t4", "gpu_count": 1, "max_duration": max_duration_s},
        }
    )


def synthetic(args: argparse.Namespace) -> list[float]:
    rng = random.Random(args.seed)
    out = []
    for i in range(args.runs):
        seconds = args.base * (1 + args.trend * i) * rng.lognormvariate(0, args.noise)
        if rng.random() < args.slow_share:
            seconds *= args.slow_factor  # a slow runner, a noisy neighbour, a retry after preemption
        out.append(min(seconds, args.max_duration))
    return out


def replay(args: argparse.Namespace, durations: list[float], ledger_dir: Path) -> list[Prediction]:
    spec = make_spec(args.max_duration, args.steps)
    catalog = load_catalog(None)
    ledger = SqliteLedger(ledger_dir / "ledger.db")
    # What the CPU smoke test would have measured: the GPU pace x the catalog's CPU/GPU ratio, off by
    # --smoke-error, as a real smoke test is (other batch shapes, warm-up, a different machine).
    speed = (catalog.speed("t4") or 1.0) / (catalog.speed("cpu") or 1.0)
    smoke_step_s = args.base / args.steps * speed * args.smoke_error
    out: list[Prediction] = []
    for i, actual in enumerate(durations):
        d = estimate_duration(spec, ledger, smoke_step_s, catalog)
        past = durations[:i]
        out.append(Prediction(actual, d.p50_s, d.p90_s, d.basis, statistics.median(past) if past else None))
        record = RunRecord(run_id=f"run-{i:04d}", model="bench", team="t", tier="nightly", status="succeeded")
        start = START + timedelta(days=i)
        record.created_at = start
        record.lineage.config_hash = spec.config_hash()
        record.times.provisioned = start
        record.times.first_step = start + timedelta(seconds=200)
        record.times.last_step = record.times.first_step + timedelta(seconds=actual)
        record.times.released = record.times.last_step + timedelta(seconds=30)
        ledger.create_run(record)
    ledger.close()
    return out


def mdape(pairs: list[tuple[float, float]]) -> float:
    return statistics.median(abs(guess - actual) / actual for guess, actual in pairs) * 100


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--runs", type=int, default=120)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--base", type=float, default=1800.0, help="training seconds of the first run")
    p.add_argument("--trend", type=float, default=0.004, help="relative growth per run")
    p.add_argument("--noise", type=float, default=0.06, help="sigma of the lognormal noise")
    p.add_argument("--slow-share", type=float, default=0.05, help="share of runs on a slow machine")
    p.add_argument("--slow-factor", type=float, default=1.6)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--smoke-error", type=float, default=0.7, help="smoke estimate / true pace")
    p.add_argument("--max-duration", type=int, default=4 * 3600)
    p.add_argument("--no-history", action="store_true", help="score first-run estimates against real runs")
    p.add_argument("--repeats", type=int, default=3, help="--no-history: runs per project and step count")
    p.add_argument("--coverage-repeats", type=int, default=10, help="--no-history: runs at the middle step count")
    p.add_argument("--projects", nargs="+", default=["example", "wide-mlp"], choices=["example", "wide-mlp"])
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.no_history:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import no_history

        return no_history.main(args)
    durations = synthetic(args)
    with tempfile.TemporaryDirectory() as tmp:
        predictions = replay(args, durations, Path(tmp))
    scored = [x for x in predictions if x.basis == "history"]
    if not scored:
        print("no run had enough history to score", file=sys.stderr)
        return 1

    rows = [
        ("gpuline estimator (p50)", mdape([(x.p50, x.actual) for x in scored])),
        ("median of all past runs", mdape([(x.median_so_far or 0.0, x.actual) for x in scored])),
        ("fixed 1-hour guess", mdape([(3600.0, x.actual) for x in scored])),
        (f"max_duration ({args.max_duration // 60} min)", mdape([(args.max_duration * 1.0, x.actual) for x in scored])),
    ]
    early = [x for x in predictions if x.basis == "smoke"]
    print(
        f"{args.runs} runs: {args.base / 60:.0f} min at first, {args.trend * 100:+.1f}%/run, "
        f"noise {args.noise:.0%}, {args.slow_share:.0%} slow runs x{args.slow_factor:g}; seed {args.seed}"
    )
    print(f"scored on the {len(scored)} runs estimated from history (from run {MIN_HISTORY + 1} on)\n")
    width = max(len(name) for name, _ in rows)
    best = rows[0][1]
    print(f"{'estimate':{width}}  {'MdAPE':>7}  {'vs gpuline':>10}")
    for name, value in rows:
        print(f"{name:{width}}  {value:6.1f}%  {value / best:9.1f}x")
    coverage = sum(x.actual <= x.p90 for x in scored) / len(scored)
    print(f"\nruns that finished within the p90 estimate: {coverage:.0%}")
    if early:
        print(
            f"first {len(early)} runs (smoke-test basis, no history yet): "
            f"MdAPE {mdape([(x.p50, x.actual) for x in early]):.1f}%"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
