"""Quota in the S3 ledger: one object per team and period, one per period for the whole org.

A reservation is checked against the team's cap in the team object, then against the org's cap in
the org object; if the org says no, the team hold is taken back. In between the team's total is
briefly overstated, never understated, so no cap can be passed; a crash in between leaves a hold
that expires with its TTL (``gpuline reap`` releases it). ``quota-index/RUN.json`` says where a
run's reservation lives.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any
from urllib.parse import quote

from gpuline.errors import NotFoundError
from gpuline.ledger.s3_objects import Doc, S3Objects, Unchanged
from gpuline.runs import Cap, Reservation, Usage, utcnow

_EPSILON = 1e-9


class S3Quota(S3Objects):
    """The quota half of the ledger protocol: reserve, settle, release, usage, reservations."""

    def _team_doc(self, team: str, period: str) -> str:
        return self._key("quota", period, "team", f"{quote(team, safe='')}.json")

    def _org_doc(self, period: str) -> str:
        return self._key("quota", period, "org.json")

    def _index(self, run_id: str) -> str:
        return self._key("quota-index", f"{run_id}.json")

    def reserve(self, reservation: Reservation, team_cap: Cap, org_cap: Cap | None = None) -> bool:
        r = reservation
        where, _ = self._read(self._index(r.run_id))
        if where is not None and (where["team"], where["period"]) != (r.team, r.period):
            # The run moved to another team or period: its old hold must not count twice.
            self.release(r.run_id)
        # Say where the hold lives before taking it, so settle/release/reap can always find it.
        self._write(self._index(r.run_id), {"team": r.team, "period": r.period}, None)
        previous: dict[str, Any] = {}
        team_key, org_key = self._team_doc(r.team, r.period), self._org_doc(r.period)
        if self._update(team_key, _take(r, team_cap, previous), "reserve") is False:
            return False
        if self._update(org_key, _take(r, org_cap, None), "reserve") is False:
            self._update(team_key, _restore(r.run_id, previous.get("entry")), "reserve (undo)")
            return False
        return True

    def _change_both(self, run_id: str, change: Callable[[dict[str, Any]], bool], what: str) -> bool | None:
        """Apply ``change`` to the run's entry in its team and org objects; None when the run has no hold."""
        where, _ = self._read(self._index(run_id))
        if where is None:
            return None
        changed = False
        for key in (self._team_doc(where["team"], where["period"]), self._org_doc(where["period"])):

            def apply(doc: Doc | None) -> Doc:
                doc = doc or {"holds": {}}
                entry = doc["holds"].setdefault(
                    run_id,
                    {"team": where["team"], "period": where["period"], "gpu_hours": 0.0, "usd": 0.0},
                )
                entry.setdefault("expires_at", utcnow().isoformat())
                entry.setdefault("state", "released")
                if not change(entry):
                    raise Unchanged(False)
                return doc

            changed = self._update(key, apply, what) is None or changed
        return changed

    def settle(self, run_id: str, gpu_hours: float, usd: float) -> None:
        def to_settled(entry: dict[str, Any]) -> bool:
            entry.update(state="settled", gpu_hours=gpu_hours, usd=usd)
            return True

        if self._change_both(run_id, to_settled, "settle") is None:
            raise NotFoundError(f"run {run_id} holds no reservation to settle")

    def release(self, run_id: str) -> bool:
        def to_released(entry: dict[str, Any]) -> bool:
            if entry.get("state") != "held":
                return False
            entry["state"] = "released"
            return True

        return bool(self._change_both(run_id, to_released, "release"))

    def usage(self, team: str, period: str) -> Usage:
        doc, _ = self._read(self._team_doc(team, period))
        usage = Usage(team=team, period=period)
        for entry in (doc or {"holds": {}})["holds"].values():
            if entry["state"] == "held":
                usage.held_gpu_hours += entry["gpu_hours"]
                usage.held_usd += entry["usd"]
            elif entry["state"] == "settled":
                usage.settled_gpu_hours += entry["gpu_hours"]
                usage.settled_usd += entry["usd"]
        return usage

    def reservations(self, *, state: str | None = None) -> list[Reservation]:
        out = []
        for key in self._list(self._key("quota", "")):
            if "/team/" not in key:
                continue  # the org objects repeat the team objects' entries
            doc, _ = self._read(key)
            for run_id, e in (doc or {"holds": {}})["holds"].items():
                if state and e["state"] != state:
                    continue
                out.append(
                    Reservation(
                        run_id=run_id,
                        team=e["team"],
                        period=e["period"],
                        gpu_hours=e["gpu_hours"],
                        usd=e["usd"],
                        expires_at=datetime.fromisoformat(e["expires_at"]),
                        state=e["state"],
                    )
                )
        return out


def _take(r: Reservation, cap: Cap | None, previous: dict[str, Any] | None) -> Callable[[Doc | None], Doc]:
    """A change that puts ``r``'s hold into a quota object if it fits ``cap`` (Unchanged(False) if not).

    With ``previous``, the run's earlier entry in that object is remembered there, so it can be put back.
    """
    entry = {
        "team": r.team,
        "period": r.period,
        "gpu_hours": r.gpu_hours,
        "usd": r.usd,
        "expires_at": r.expires_at.isoformat(),
        "state": "held",
    }

    def change(doc: Doc | None) -> Doc:
        doc = doc or {"holds": {}}
        holds: dict[str, Any] = doc["holds"]
        if previous is not None:
            previous["entry"] = holds.get(r.run_id)
        if cap is not None and not _fits(holds, r, cap):
            raise Unchanged(False)
        holds[r.run_id] = entry
        return doc

    return change


def _fits(holds: dict[str, Any], r: Reservation, cap: Cap) -> bool:
    """Would ``r`` (replacing this run's own earlier entry) keep the held+settled total within ``cap``?"""
    hours = sum(e["gpu_hours"] for k, e in holds.items() if k != r.run_id and e["state"] != "released")
    usd = sum(e["usd"] for k, e in holds.items() if k != r.run_id and e["state"] != "released")
    if cap.gpu_hours is not None and hours + r.gpu_hours > cap.gpu_hours + _EPSILON:
        return False
    return not (cap.usd is not None and usd + r.usd > cap.usd + _EPSILON)


def _restore(run_id: str, entry: dict[str, Any] | None) -> Callable[[Doc | None], Doc]:
    def change(doc: Doc | None) -> Doc:
        doc = doc or {"holds": {}}
        if entry is None:
            doc["holds"].pop(run_id, None)
        else:
            doc["holds"][run_id] = entry
        return doc

    return change
