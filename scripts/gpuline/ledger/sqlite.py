"""The default ledger: one SQLite file, safe for several processes at once.

Every write runs in a ``BEGIN IMMEDIATE`` transaction, which takes SQLite's write lock up front, so a
read-check-write (a budget check, a read-modify-write of a run record) can never interleave with
another process doing the same. WAL mode lets readers proceed while a writer holds the lock.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import datetime
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from gpuline.errors import InfraError, InputError, NotFoundError
from gpuline.runs import Cap, Event, LeaseRecord, Reservation, RunRecord, Usage, utcnow

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
  run_id TEXT PRIMARY KEY, model TEXT NOT NULL, team TEXT NOT NULL, created_at TEXT NOT NULL, body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
  run_id TEXT NOT NULL, seq INTEGER NOT NULL, at TEXT NOT NULL, kind TEXT NOT NULL, data TEXT NOT NULL,
  PRIMARY KEY (run_id, seq)
);
CREATE TABLE IF NOT EXISTS reservations (
  run_id TEXT PRIMARY KEY, team TEXT NOT NULL, period TEXT NOT NULL, gpu_hours REAL NOT NULL,
  usd REAL NOT NULL, expires_at TEXT NOT NULL, state TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS reservations_by_team ON reservations (team, period, state);
CREATE TABLE IF NOT EXISTS leases (
  lease_id TEXT PRIMARY KEY, run_id TEXT NOT NULL, released_at TEXT, body TEXT NOT NULL
);
"""


def open_sqlite(uri: str, base_dir: Path) -> SqliteLedger:
    # sqlite:///relative/path (relative to the project) or sqlite:////absolute/path, as SQLAlchemy spells it.
    rest = uri.removeprefix("sqlite://")
    if not rest.startswith("/") or rest == "/":
        raise InputError(f"ledger URI {uri!r} is malformed", hint="write sqlite:///.gpuline/ledger.db")
    rest = rest[1:]
    path = Path(rest) if rest.startswith("/") else base_dir / rest
    return SqliteLedger(path)


P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")
LOCK_TIMEOUT_S = 60


def _guard(method: Callable[P, R]) -> Callable[P, R]:
    @functools.wraps(method)
    def guarded(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(*args, **kwargs)
        except sqlite3.Error as exc:
            raise sqlite_error(getattr(args[0], "path", "the ledger"), exc) from None

    return guarded


def _guarded(cls: type[T]) -> type[T]:
    """Every public method with SQLite's own errors turned into InfraErrors naming the ledger: a
    corrupt page, a full disk or a lock held too long is the ledger's fault, not a bug in gpuline."""
    for name, member in list(vars(cls).items()):
        if callable(member) and not name.startswith("_"):
            setattr(cls, name, _guard(member))
    return cls


def sqlite_error(path: object, exc: sqlite3.Error) -> InfraError:
    text = str(exc)
    if "full" in text:
        return InfraError(f"the ledger {path}: {text}", hint="free disk space on the ledger's volume and rerun")
    if "locked" in text or "busy" in text:
        return InfraError(
            f"the ledger {path} stayed locked by another process for {LOCK_TIMEOUT_S}s ({text})",
            hint=f"find the process holding it (`fuser {path}`: a stuck gpuline) and end it, or retry",
        )
    if "malformed" in text or "not a database" in text or "corrupt" in text:
        return InfraError(
            f"the ledger {path} is corrupt ({text})",
            hint="restore it from a backup, or move it aside to start an empty one; it is never replaced silently",
        )
    return InfraError(f"the ledger {path} failed: {text}", hint="retry; if it persists, check the file and its disk")


@contextmanager
def _decoding(path: Path, what: str) -> Iterator[None]:
    """A stored row that no longer parses (edited by hand, a torn write): an error naming it, not a crash."""
    try:
        yield
    except (ValueError, TypeError) as exc:  # pydantic's ValidationError and json's errors are ValueErrors
        raise InfraError(
            f"the ledger {path} holds a malformed {what} ({type(exc).__name__})",
            hint="restore the ledger from a backup; gpuline wrote it whole, so something else changed it",
        ) from None


def _initialise(path: Path) -> None:
    """Create a missing ledger whole: built under a temporary name and linked into place, so no reader
    ever meets the zero-byte file sqlite3.connect leaves until its first write. A zero-byte ledger
    can then only be a truncated one (a full disk, a stray ``>``), and is refused."""
    if path.exists():
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        db = sqlite3.connect(tmp, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(_SCHEMA)
        db.close()
        os.link(tmp, path)
    except FileExistsError:
        pass  # another process created it first: use theirs
    finally:
        for leftover in (tmp, tmp.with_name(tmp.name + "-wal"), tmp.with_name(tmp.name + "-shm")):
            leftover.unlink(missing_ok=True)


@_guarded
class SqliteLedger:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _initialise(path)
            if path.stat().st_size == 0:
                raise InfraError(
                    f"the ledger {path} is empty (0 bytes), so every run it recorded is gone",
                    hint="restore it from a backup, or delete it to start an empty ledger on purpose",
                )
            self._db = sqlite3.connect(path, timeout=LOCK_TIMEOUT_S, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA busy_timeout={LOCK_TIMEOUT_S * 1000}")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise sqlite_error(path, exc) from None
        except OSError as exc:
            raise InfraError(
                f"cannot open the ledger {path}: {exc.strerror or exc}", hint="check the path is writable"
            ) from None

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            # SQLite may have rolled back already (a full disk does): the original error is the one to report.
            with suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def close(self) -> None:
        self._db.close()

    # ------------------------------------------------------------ runs and events

    def create_run(self, record: RunRecord) -> None:
        with self._tx() as db:
            try:
                db.execute(
                    "INSERT INTO runs VALUES (?, ?, ?, ?, ?)",
                    (
                        record.run_id,
                        record.model,
                        record.team,
                        record.created_at.isoformat(),
                        record.model_dump_json(),
                    ),
                )
            except sqlite3.IntegrityError:
                raise InputError(f"run {record.run_id} already exists", hint="pick a new --run-id") from None

    def get_run(self, run_id: str) -> RunRecord:
        row = self._db.execute("SELECT body FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"no run {run_id!r} in the ledger {self.path}", hint="list runs with `gpuline status`")
        with _decoding(self.path, f"record of run {run_id}"):
            return RunRecord.model_validate_json(row[0])

    def update_run(self, run_id: str, change: Callable[[RunRecord], None]) -> RunRecord:
        with self._tx() as db:
            record = self.get_run(run_id)
            change(record)
            record.updated_at = utcnow()
            db.execute("UPDATE runs SET body = ? WHERE run_id = ?", (record.model_dump_json(), run_id))
        return record

    def list_runs(self, *, model: str | None = None, team: str | None = None, limit: int = 100) -> list[RunRecord]:
        sql, args = "SELECT body FROM runs WHERE 1=1", list[str]()
        if model:
            sql, args = sql + " AND model = ?", [*args, model]
        if team:
            sql, args = sql + " AND team = ?", [*args, team]
        rows = self._db.execute(sql + " ORDER BY created_at DESC LIMIT ?", (*args, limit)).fetchall()
        with _decoding(self.path, "run record"):
            return [RunRecord.model_validate_json(r[0]) for r in rows]

    def append_event(self, run_id: str, kind: str, data: dict[str, Any] | None = None) -> Event:
        with self._tx() as db:
            (seq,) = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM events WHERE run_id = ?", (run_id,)).fetchone()
            event = Event(run_id=run_id, seq=seq, at=utcnow(), kind=kind, data=data or {})
            db.execute(
                "INSERT INTO events VALUES (?, ?, ?, ?, ?)",
                (run_id, seq, event.at.isoformat(), kind, json.dumps(event.data, default=str)),
            )
        return event

    def events(self, run_id: str) -> list[Event]:
        rows = self._db.execute(
            "SELECT seq, at, kind, data FROM events WHERE run_id = ? ORDER BY seq", (run_id,)
        ).fetchall()
        with _decoding(self.path, f"event of run {run_id}"):
            return [
                Event(run_id=run_id, seq=s, at=datetime.fromisoformat(a), kind=k, data=json.loads(d))
                for s, a, k, d in rows
            ]

    # ------------------------------------------------------------ quota

    def reserve(self, reservation: Reservation, team_cap: Cap, org_cap: Cap | None = None) -> bool:
        r = reservation
        with self._tx() as db:
            # Re-reserving for the same run replaces its amounts, so leave its old hold out of the sums.
            team_used = self._used(db, "team = ? AND period = ?", (r.team, r.period), r.run_id)
            if not _fits(team_used, r, team_cap):
                return False
            if org_cap is not None:
                org_used = self._used(db, "period = ?", (r.period,), r.run_id)
                if not _fits(org_used, r, org_cap):
                    return False
            db.execute(
                "INSERT OR REPLACE INTO reservations VALUES (?, ?, ?, ?, ?, ?, 'held')",
                (r.run_id, r.team, r.period, r.gpu_hours, r.usd, r.expires_at.isoformat()),
            )
        return True

    @staticmethod
    def _used(db: sqlite3.Connection, where: str, args: tuple[Any, ...], exclude: str) -> tuple[float, float]:
        row = db.execute(
            f"SELECT COALESCE(SUM(gpu_hours), 0), COALESCE(SUM(usd), 0) FROM reservations "
            f"WHERE {where} AND state != 'released' AND run_id != ?",
            (*args, exclude),
        ).fetchone()
        return float(row[0]), float(row[1])

    def settle(self, run_id: str, gpu_hours: float, usd: float) -> None:
        with self._tx() as db:
            cur = db.execute(
                "UPDATE reservations SET gpu_hours = ?, usd = ?, state = 'settled' WHERE run_id = ?",
                (gpu_hours, usd, run_id),
            )
            if cur.rowcount == 0:
                raise NotFoundError(f"run {run_id} holds no reservation to settle")

    def release(self, run_id: str) -> bool:
        with self._tx() as db:
            cur = db.execute(
                "UPDATE reservations SET state = 'released' WHERE run_id = ? AND state = 'held'", (run_id,)
            )
            return cur.rowcount > 0

    def usage(self, team: str, period: str) -> Usage:
        usage = Usage(team=team, period=period)
        rows = self._db.execute(
            "SELECT state, SUM(gpu_hours), SUM(usd) FROM reservations WHERE team = ? AND period = ? GROUP BY state",
            (team, period),
        ).fetchall()
        for state, hours, usd in rows:
            if state == "held":
                usage.held_gpu_hours, usage.held_usd = hours, usd
            elif state == "settled":
                usage.settled_gpu_hours, usage.settled_usd = hours, usd
        return usage

    def reservations(self, *, state: str | None = None) -> list[Reservation]:
        sql = "SELECT run_id, team, period, gpu_hours, usd, expires_at, state FROM reservations"
        rows = self._db.execute(sql + " WHERE state = ?", (state,)) if state else self._db.execute(sql)
        with _decoding(self.path, "reservation"):
            return [
                Reservation(
                    run_id=a, team=b, period=c, gpu_hours=d, usd=e, expires_at=datetime.fromisoformat(f), state=g
                )
                for a, b, c, d, e, f, g in rows.fetchall()
            ]

    # ------------------------------------------------------------ leases

    def record_lease(self, lease: LeaseRecord) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO leases VALUES (?, ?, ?, ?)",
                (lease.lease_id, lease.run_id, None, lease.model_dump_json()),
            )

    def _get_lease(self, db: sqlite3.Connection, lease_id: str) -> LeaseRecord:
        row = db.execute("SELECT body FROM leases WHERE lease_id = ?", (lease_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"no lease {lease_id!r} in the ledger")
        with _decoding(self.path, f"lease {lease_id}"):
            return LeaseRecord.model_validate_json(row[0])

    def update_lease(self, lease_id: str, *, instance_id: str | None = None) -> None:
        with self._tx() as db:
            lease = self._get_lease(db, lease_id)
            if instance_id is not None:
                lease.instance_id = instance_id
            db.execute("UPDATE leases SET body = ? WHERE lease_id = ?", (lease.model_dump_json(), lease_id))

    def release_lease(self, lease_id: str, at: datetime) -> bool:
        with self._tx() as db:
            lease = self._get_lease(db, lease_id)
            if lease.released_at is not None:
                return False
            lease.released_at = at
            db.execute(
                "UPDATE leases SET released_at = ?, body = ? WHERE lease_id = ?",
                (at.isoformat(), lease.model_dump_json(), lease_id),
            )
            return True

    def leases(self, *, active_only: bool = False) -> list[LeaseRecord]:
        sql = "SELECT body FROM leases" + (" WHERE released_at IS NULL" if active_only else "")
        rows = self._db.execute(sql).fetchall()
        with _decoding(self.path, "lease"):
            return [LeaseRecord.model_validate_json(r[0]) for r in rows]


def _fits(used: tuple[float, float], r: Reservation, cap: Cap) -> bool:
    hours, usd = used
    # A small epsilon so that reservations that sum exactly to the cap are admitted despite float error.
    if cap.gpu_hours is not None and hours + r.gpu_hours > cap.gpu_hours + 1e-9:
        return False
    return not (cap.usd is not None and usd + r.usd > cap.usd + 1e-9)
