"""The no-history column of bench/estimate.py: first-run estimates against whole runs really made.

Each run is a fresh copy of a project with an empty ledger, run with ``gpuline run --tier nightly``
(in this process, as the CLI would) on the local provider; its paid seconds are the record's
provisioned to released. The estimate is what cost-estimate computes from the smoke test's timings
and the catalog. The timings are those of the smoke test the run's own preflight made: when preflight
does not keep them in the run record yet, the bench takes them from its ``smoke_test`` call (and
passes it ``eval.command``, so eval is timed on the smoke model as preflight is meant to).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gpuline.cli import main as gpuline_main
from gpuline.decisions.cost import estimate_duration
from gpuline.decisions.phases import recorded_phases
from gpuline.decisions.pricing import load_catalog
from gpuline.ledger.sqlite import SqliteLedger
from gpuline.spec import load_spec
from gpuline.steps import preflight
from gpuline.steps.cost_estimate import dataset_bytes, smoke_timings
from gpuline.training import entry_command
from gpuline.training.smoke import TimedSmokeResult, smoke_test

ROOT = Path(__file__).resolve().parent.parent
PROJECTS = {"example": ROOT / "templates" / "example", "wide-mlp": ROOT / "bench" / "projects" / "wide-mlp"}
STEPS = {"example": (150, 300, 900), "wide-mlp": (60, 150, 300)}


@dataclass
class Run:
    project: str
    steps: int
    actual_s: float
    p50_s: float
    p90_s: float
    phases: dict[str, float]
    actual_phases: dict[str, float]

    @property
    def error(self) -> float:
        return (self.p50_s - self.actual_s) / self.actual_s

    @property
    def covered(self) -> bool:
        return self.actual_s <= self.p90_s


def copy_project(name: str, steps: int, into: Path) -> Path:
    """A fresh copy of the project training ``steps`` on the nightly tier; returns its gpuline.yml."""
    shutil.copytree(PROJECTS[name], into, ignore=shutil.ignore_patterns(".gpuline", "__pycache__"))
    config = into / "gpuline.yml"
    data: dict[str, Any] = yaml.safe_load(config.read_text())
    if name == "wide-mlp":
        sys.path.insert(0, str(into))
        try:
            import make_dataset  # the copy's own builder

            data["dataset"]["sha256"] = make_dataset.write_npz(into / "data" / "features.npz", make_dataset.build())
        finally:
            sys.path.remove(str(into))
            sys.modules.pop("make_dataset", None)
    data["hyperparameters"]["steps"] = steps
    data.setdefault("tiers", {}).setdefault("nightly", {}).setdefault("hyperparameters", {})["steps"] = steps
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    return config


def run_once(name: str, steps: int, work: Path) -> Run:
    config = copy_project(name, steps, work)
    spec = load_spec(config).for_tier("nightly")
    measured: list[TimedSmokeResult] = []

    def timed_smoke(*args: Any, **kwargs: Any) -> TimedSmokeResult:
        if spec.eval.command:
            kwargs.setdefault("eval_command", entry_command(spec.eval.command, None))
        result = smoke_test(*args, **kwargs)
        measured.append(result)
        return result

    code, output = run_pipeline(config, timed_smoke)
    if code != 0:
        raise SystemExit(f"gpuline run failed on {name} ({steps} steps):\n{output[-3000:]}")
    ledger = SqliteLedger(work / ".gpuline" / "ledger.db")
    (record,) = ledger.list_runs()
    t = record.times
    assert t.released is not None and t.provisioned is not None
    actual = (t.released - t.provisioned).total_seconds()
    timings = smoke_timings(ledger, record.run_id) or (measured[-1].timings if measured else None)
    ledger.close()
    assert timings is not None, "the smoke run wrote no step times"
    d = estimate_duration(
        spec,
        None,
        timings.step_s,
        load_catalog(config.parent),
        smoke=timings,
        dataset_bytes=dataset_bytes(spec, config.parent, work),
    )
    estimated = {p.name: p.p50_s for p in d.phases if p.paid}
    return Run(name, steps, actual, d.paid_p50_s, d.paid_p90_s, estimated, dict(recorded_phases(record)))


def run_pipeline(config: Path, timed_smoke: Any) -> tuple[int, str]:
    """``gpuline run --tier nightly`` in this process, output captured, with preflight's smoke test wrapped."""
    saved_env, saved_cwd, original = dict(os.environ), Path.cwd(), preflight.smoke_test
    for key in ("GITHUB_OUTPUT", "GITHUB_STEP_SUMMARY", "GITHUB_ACTIONS", "GPULINE_CONFIG"):
        os.environ.pop(key, None)
    log = config.parent / "run.log"  # a real file: eval.command's process is handed its descriptor
    try:
        os.chdir(config.parent)
        preflight.smoke_test = timed_smoke
        with log.open("w") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            code = gpuline_main(["run", "--tier", "nightly", "--config", str(config)])
    finally:
        preflight.smoke_test = original
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    return code, log.read_text()


def plan(args: argparse.Namespace) -> list[tuple[str, int]]:
    """Every project at every step count ``repeats`` times, and the middle count up to ``coverage_repeats``."""
    out = []
    for name in args.projects:
        counts = STEPS[name]
        for steps in counts:
            want = max(args.repeats, args.coverage_repeats) if steps == counts[len(counts) // 2] else args.repeats
            out += [(name, steps)] * want
    return out


def report(runs: list[Run]) -> None:
    print(f"{'project':9} {'steps':>5} {'runs':>4} {'actual':>8} {'p50':>8} {'p90':>8} {'p50 err':>8} {'in p90':>7}")
    for key in dict.fromkeys((r.project, r.steps) for r in runs):
        group = [r for r in runs if (r.project, r.steps) == key]
        actual = statistics.median(r.actual_s for r in group)
        print(
            f"{key[0]:9} {key[1]:5d} {len(group):4d} {actual:7.1f}s {statistics.median(r.p50_s for r in group):7.1f}s "
            f"{statistics.median(r.p90_s for r in group):7.1f}s {statistics.median(r.error for r in group):+7.0%} "
            f"{sum(r.covered for r in group):3d}/{len(group):<3d}"
        )
    print()
    for name in dict.fromkeys(r.project for r in runs):
        group = [r for r in runs if r.project == name]
        worst = max(abs(r.error) for r in group)
        mdape = statistics.median(abs(r.error) for r in group)
        covered = sum(r.covered for r in group)
        print(f"{name}: p50 MdAPE {mdape:.0%} (worst {worst:.0%}), p90 covered {covered}/{len(group)}")
        phases = {k: statistics.median(r.phases.get(k, 0.0) for r in group) for k in group[0].phases}
        print("  p50 by phase: " + ", ".join(f"{k} {v:.1f}s" for k, v in phases.items()))
        recorded = [r.actual_phases for r in group if r.actual_phases]
        if recorded:
            actual = {k: statistics.median(a.get(k, 0.0) for a in recorded) for k in phases}
            print("  actual (run record): " + ", ".join(f"{k} {v:.1f}s" for k, v in actual.items()))
    overall = statistics.median(abs(r.error) for r in runs)
    print(f"\nno history: ±{overall:.0%} expected (median error of the whole run's p50 over {len(runs)} runs)")


def main(args: argparse.Namespace) -> int:
    runs = []
    jobs = plan(args)
    for i, (name, steps) in enumerate(jobs, 1):
        with tempfile.TemporaryDirectory(prefix="gpuline-bench-") as tmp:
            run = run_once(name, steps, Path(tmp) / name)
        print(
            f"[{i}/{len(jobs)}] {name} {steps} steps: actual {run.actual_s:.1f}s, p50 {run.p50_s:.1f}s, "
            f"p90 {run.p90_s:.1f}s ({run.error:+.0%})",
            file=sys.stderr,
            flush=True,
        )
        runs.append(run)
    report(runs)
    return 0
