"""The ledger contract, run against the SQLite backend on a real file.

``LedgerContract`` is the behaviour every backend promises (the ``Ledger`` protocol in runs.py);
test_ledger_dynamodb.py and test_ledger_s3.py run the same class against their backends.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from gpuline.cli import main
from gpuline.errors import InfraError, InputError, NotFoundError
from gpuline.ledger import open_ledger
from gpuline.ledger.sqlite import SqliteLedger
from gpuline.runs import Cap, LeaseRecord, Ledger, Reservation, RunRecord, utcnow

PERIOD = "2026-W48"


def run_record(run_id: str, *, model: str = "tiny", team: str = "vision", minutes_ago: int = 0) -> RunRecord:
    record = RunRecord(run_id=run_id, model=model, team=team, tier="nightly")
    record.created_at = utcnow() - timedelta(minutes=minutes_ago)
    return record


def hold(run_id: str, hours: float, usd: float, *, team: str = "vision", ttl_s: int = 3600) -> Reservation:
    return Reservation(
        run_id=run_id,
        team=team,
        period=PERIOD,
        gpu_hours=hours,
        usd=usd,
        expires_at=utcnow() + timedelta(seconds=ttl_s),
    )


class LedgerContract:
    """Every backend: subclass with a ``uri`` fixture naming an empty ledger."""

    @pytest.fixture
    def ledger(self, uri: str) -> Iterator[Ledger]:
        ledger = open_ledger(uri, Path("."))
        yield ledger
        ledger.close()

    # ------------------------------------------------------------ runs

    def test_a_run_round_trips_and_updates_keep_other_fields(self, ledger: Ledger) -> None:
        ledger.create_run(run_record("r1"))
        ledger.update_run("r1", lambda r: setattr(r, "gpu_seconds", 12.5))
        updated = ledger.update_run("r1", lambda r: setattr(r, "stage", "train"))
        assert updated.gpu_seconds == 12.5 and updated.stage == "train"
        assert ledger.get_run("r1").gpu_seconds == 12.5

    def test_creating_a_run_twice_is_an_input_error(self, ledger: Ledger) -> None:
        ledger.create_run(run_record("r1"))
        with pytest.raises(InputError, match="already exists"):
            ledger.create_run(run_record("r1"))

    def test_a_missing_run_is_not_found(self, ledger: Ledger) -> None:
        with pytest.raises(NotFoundError):
            ledger.get_run("nope")
        with pytest.raises(NotFoundError):
            ledger.update_run("nope", lambda r: None)

    def test_list_runs_filters_and_puts_the_newest_first(self, ledger: Ledger) -> None:
        ledger.create_run(run_record("old", minutes_ago=30))
        ledger.create_run(run_record("new", minutes_ago=1))
        ledger.create_run(run_record("other-model", model="big", minutes_ago=5))
        ledger.create_run(run_record("other-team", team="nlp", minutes_ago=10))
        assert [r.run_id for r in ledger.list_runs(model="tiny")] == ["new", "other-team", "old"]
        assert [r.run_id for r in ledger.list_runs(model="tiny", team="vision")] == ["new", "old"]
        assert [r.run_id for r in ledger.list_runs(limit=2)] == ["new", "other-model"]
        assert [r.run_id for r in ledger.list_runs(team="nlp")] == ["other-team"]

    def test_events_are_numbered_in_order(self, ledger: Ledger) -> None:
        ledger.create_run(run_record("r1"))
        ledger.append_event("r1", "a", {"x": 1})
        ledger.append_event("r1", "b")
        events = ledger.events("r1")
        assert [(e.seq, e.kind) for e in events] == [(1, "a"), (2, "b")]
        assert events[0].data == {"x": 1}
        assert ledger.events("nobody") == []

    # ------------------------------------------------------------ quota

    def test_reserve_holds_budget_until_the_cap(self, ledger: Ledger) -> None:
        cap = Cap(gpu_hours=1.0, usd=10.0)
        assert ledger.reserve(hold("a", 0.6, 6.0), cap)
        assert not ledger.reserve(hold("b", 0.5, 1.0), cap)  # GPU-hours would pass the cap
        assert not ledger.reserve(hold("c", 0.1, 4.5), cap)  # dollars would
        assert ledger.reserve(hold("d", 0.4, 4.0), cap)  # exactly to the cap is allowed
        usage = ledger.usage("vision", PERIOD)
        assert usage.gpu_hours == pytest.approx(1.0) and usage.usd == pytest.approx(10.0)
        assert {r.run_id for r in ledger.reservations(state="held")} == {"a", "d"}

    def test_a_refused_reservation_holds_nothing(self, ledger: Ledger) -> None:
        assert not ledger.reserve(hold("big", 2.0, 1.0), Cap(gpu_hours=1.0))
        assert ledger.usage("vision", PERIOD).gpu_hours == 0
        assert ledger.reservations() == []

    def test_reserving_again_replaces_the_amounts(self, ledger: Ledger) -> None:
        cap = Cap(usd=10.0)
        assert ledger.reserve(hold("a", 1.0, 8.0), cap)
        assert ledger.reserve(hold("a", 1.0, 9.0), cap)  # not 17: the first hold is replaced
        assert ledger.usage("vision", PERIOD).usd == pytest.approx(9.0)
        assert not ledger.reserve(hold("a", 1.0, 11.0), cap)
        assert ledger.usage("vision", PERIOD).usd == pytest.approx(9.0)

    def test_teams_have_separate_budgets_under_one_org_cap(self, ledger: Ledger) -> None:
        team = Cap(usd=10.0)
        org = Cap(usd=15.0)
        assert ledger.reserve(hold("a", 1.0, 9.0, team="vision"), team, org)
        assert ledger.reserve(hold("b", 1.0, 6.0, team="nlp"), team, org)
        assert not ledger.reserve(hold("c", 1.0, 1.0, team="speech"), team, org)  # the org is full
        assert ledger.usage("speech", PERIOD).usd == 0  # and the refused team holds nothing
        assert ledger.usage("nlp", PERIOD).usd == pytest.approx(6.0)

    def test_settle_replaces_the_hold_with_the_actual_cost(self, ledger: Ledger) -> None:
        assert ledger.reserve(hold("a", 2.0, 20.0), Cap(usd=25.0))
        ledger.settle("a", 0.5, 4.25)
        usage = ledger.usage("vision", PERIOD)
        assert usage.held_usd == 0 and usage.settled_usd == pytest.approx(4.25)
        assert usage.settled_gpu_hours == pytest.approx(0.5)
        assert ledger.reserve(hold("b", 1.0, 20.0), Cap(usd=25.0))  # the room came back
        ledger.settle("a", 0.5, 4.25)  # teardown twice: same result
        assert ledger.usage("vision", PERIOD).settled_usd == pytest.approx(4.25)
        assert not ledger.release("a")  # settled is final

    def test_settling_without_a_reservation_is_not_found(self, ledger: Ledger) -> None:
        with pytest.raises(NotFoundError):
            ledger.settle("ghost", 1.0, 1.0)

    def test_release_gives_the_hold_back_once(self, ledger: Ledger) -> None:
        assert ledger.reserve(hold("a", 1.0, 5.0), Cap(usd=5.0))
        assert ledger.release("a")
        assert not ledger.release("a")
        assert not ledger.release("never-reserved")
        assert ledger.usage("vision", PERIOD).usd == 0
        assert [r.state for r in ledger.reservations()] == ["released"]
        assert ledger.reserve(hold("b", 1.0, 5.0), Cap(usd=5.0))

    # ------------------------------------------------------------ leases

    def test_leases_record_update_and_release_once(self, ledger: Ledger) -> None:
        now = utcnow()
        lease = LeaseRecord(lease_id="l1", run_id="r1", provider="local", lane="spot", expires_at=now)
        ledger.record_lease(lease)
        ledger.record_lease(LeaseRecord(lease_id="l2", run_id="r2", provider="local", expires_at=now))
        ledger.update_lease("l1", instance_id="i-123")
        assert ledger.release_lease("l1", now)
        assert not ledger.release_lease("l1", now)
        active = ledger.leases(active_only=True)
        assert [x.lease_id for x in active] == ["l2"]
        everything = {x.lease_id: x for x in ledger.leases()}
        assert everything["l1"].instance_id == "i-123" and everything["l1"].released_at is not None
        assert everything["l1"].lane == "spot"

    # ------------------------------------------------------------ through the CLI

    def test_gpuline_reap_releases_holds_whose_ttl_passed(
        self,
        uri: str,
        ledger: Ledger,
        project: Path,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        assert ledger.reserve(hold("crashed", 1.0, 5.0, ttl_s=-60), Cap(usd=10.0))
        assert ledger.reserve(hold("running", 1.0, 5.0), Cap(usd=10.0))
        assert not ledger.reserve(hold("waiting", 1.0, 1.0), Cap(usd=10.0))  # full until the crashed one goes
        monkeypatch.setenv("GPULINE_LEDGER", uri)
        assert main(["reap", "--config", str(project), "--json"]) == 0
        actions = json.loads(capsys.readouterr().out)["actions"]
        assert [(a["kind"], a["target"], a["done"]) for a in actions] == [("release-reservation", "crashed", True)]
        assert [r.run_id for r in ledger.reservations(state="held")] == ["running"]
        assert ledger.reserve(hold("waiting", 1.0, 1.0), Cap(usd=10.0))

    def test_a_missing_lease_is_not_found(self, ledger: Ledger) -> None:
        with pytest.raises(NotFoundError):
            ledger.update_lease("nope", instance_id="i-1")
        with pytest.raises(NotFoundError):
            ledger.release_lease("nope", utcnow())


class TestSqliteLedger(LedgerContract):
    @pytest.fixture
    def uri(self, tmp_path: Path) -> str:
        return f"sqlite:///{tmp_path}/ledger.db"


def test_sqlite_uri_relative_to_the_project_or_absolute(tmp_path: Path) -> None:
    relative = open_ledger("sqlite:///.gpuline/ledger.db", tmp_path)
    absolute = open_ledger(f"sqlite:///{tmp_path}/abs.db", Path("/nonexistent"))
    assert isinstance(relative, SqliteLedger) and relative.path == tmp_path / ".gpuline" / "ledger.db"
    assert isinstance(absolute, SqliteLedger) and absolute.path == tmp_path / "abs.db"


@pytest.mark.parametrize("uri", ["sqlite://", "sqlite:///", "sqlite:ledger.db"])
def test_malformed_sqlite_uris_are_input_errors(uri: str, tmp_path: Path) -> None:
    with pytest.raises(InputError):
        open_ledger(uri, tmp_path)


def test_unknown_scheme_lists_the_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not a valid ledger backend") as caught:
        open_ledger("postgres://db", tmp_path)
    assert caught.value.hint == "valid choices are dynamodb, s3, sqlite"


def test_an_unwritable_ledger_path_is_an_infra_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(InfraError, match="cannot open the ledger"):
        SqliteLedger(blocker / "ledger.db")


def test_a_second_connection_sees_committed_holds(tmp_path: Path) -> None:
    first, second = SqliteLedger(tmp_path / "l.db"), SqliteLedger(tmp_path / "l.db")
    assert first.reserve(hold("a", 1.0, 1.0), Cap(gpu_hours=1.0))
    assert not second.reserve(hold("b", 0.5, 0.5), Cap(gpu_hours=1.0))
    rows = sqlite3.connect(tmp_path / "l.db").execute("SELECT run_id, state FROM reservations").fetchall()
    assert rows == [("a", "held")]
