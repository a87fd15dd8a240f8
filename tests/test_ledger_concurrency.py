"""50 processes race for a budget that fits exactly 20 runs, on each ledger backend.

Separate processes (not threads), each with its own connection or client, released together by a
barrier; each records whether it was admitted and the usage it saw right after. Exactly 20 must be
admitted, and no process may ever observe more reserved than the cap.
"""

from __future__ import annotations

import multiprocessing
import os
import secrets
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from fixtures_aws import serial_aws, serial_moto  # noqa: F401
from gpuline.ledger import open_ledger
from gpuline.runs import Cap, Reservation, utcnow

PROCESSES = 50
FITS = 20
HOURS_EACH = 0.05
USD_EACH = 1.25
CAP = Cap(gpu_hours=FITS * HOURS_EACH, usd=FITS * USD_EACH)
TEAM, PERIOD = "vision", "2026-W48"
AWS_VARS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION")


def contend(uri: str, env: dict[str, str], run_id: str, barrier: Any, results: Any) -> None:
    """One racer: open its own ledger, wait for the others, reserve once, report what it saw."""
    os.environ.update(env)
    try:
        ledger = open_ledger(uri, Path("."))
        barrier.wait(timeout=120)
        reservation = Reservation(
            run_id=run_id,
            team=TEAM,
            period=PERIOD,
            gpu_hours=HOURS_EACH,
            usd=USD_EACH,
            expires_at=utcnow() + timedelta(hours=1),
        )
        admitted = ledger.reserve(reservation, CAP)
        seen = ledger.usage(TEAM, PERIOD)
        results.put((run_id, admitted, seen.gpu_hours, seen.usd, ""))
        ledger.close()
    except Exception as exc:
        results.put((run_id, False, 0.0, 0.0, f"{type(exc).__name__}: {exc}"))


def race(uri: str) -> list[tuple[str, bool, float, float, str]]:
    # forkserver: children fork from a clean process that imported this module and the SDKs once,
    # not from pytest (whose server threads and locks must not be forked). The forkserver reads
    # PYTHONPATH, not pytest's sys.path, when it preloads.
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).parent), before) if p)
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(
        ["test_ledger_concurrency", "gpuline.ledger.sqlite", "gpuline.ledger.dynamodb", "gpuline.ledger.s3", "boto3"]
    )
    env = {name: os.environ[name] for name in AWS_VARS if name in os.environ}
    barrier = ctx.Barrier(PROCESSES)
    results = ctx.Queue()
    racers = [ctx.Process(target=contend, args=(uri, env, f"run-{i:02d}", barrier, results)) for i in range(PROCESSES)]
    try:
        for p in racers:
            p.start()  # the first start launches the forkserver, which reads PYTHONPATH now
    finally:
        if before is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = before
    seen = [results.get(timeout=240) for _ in racers]
    for p in racers:
        p.join(timeout=60)
    return seen


def check(uri: str) -> None:
    outcomes = race(uri)
    errors = [error for *_, error in outcomes if error]
    assert errors == []
    admitted = sorted(run_id for run_id, ok, *_ in outcomes if ok)
    assert len(admitted) == FITS
    # Never above the budget, as any racer saw it right after its own attempt.
    assert max(hours for _, _, hours, _, _ in outcomes) <= CAP.gpu_hours + 1e-9  # type: ignore[operator]
    assert max(usd for _, _, _, usd, _ in outcomes) <= CAP.usd + 1e-9  # type: ignore[operator]
    ledger = open_ledger(uri, Path("."))
    usage = ledger.usage(TEAM, PERIOD)
    assert usage.gpu_hours == pytest.approx(CAP.gpu_hours) and usage.usd == pytest.approx(CAP.usd)
    assert sorted(r.run_id for r in ledger.reservations(state="held")) == admitted
    ledger.close()


@pytest.mark.slow
def test_sqlite_admits_exactly_what_fits(tmp_path: Path) -> None:
    check(f"sqlite:///{tmp_path}/ledger.db")


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.usefixtures("serial_aws")
def test_dynamodb_admits_exactly_what_fits() -> None:
    uri = f"dynamodb://race-{secrets.token_hex(3)}?region=us-east-1"
    open_ledger(uri, Path(".")).close()  # create the tables once, before the race
    check(uri)


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.usefixtures("serial_aws")
def test_s3_admits_exactly_what_fits() -> None:
    uri = f"s3://race-{secrets.token_hex(3)}/ledger?region=us-east-1"
    open_ledger(uri, Path(".")).close()
    check(uri)
