"""Storage commitment requests in the journal: kept from the N-ACTION until the result is
reported, so they survive a restart (``edge.commitment`` decides and reports them).

States: ``waiting`` (result not reported yet; retried at ``next_attempt_at``) ->
``reported`` | ``gave_up`` (the result could not be delivered before the delivery age limit).
``Journal`` gets these methods from ``CommitmentRecords``; the table is part of its schema.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Iterable

COMMITMENT_STATES = ("waiting", "reported", "gave_up")

COMMITMENT_SCHEMA = """
CREATE TABLE IF NOT EXISTS commitments (
    id                 INTEGER PRIMARY KEY AUTOINCREMENT,
    transaction_uid    TEXT NOT NULL,
    calling_ae         TEXT NOT NULL,
    peer_host          TEXT NOT NULL DEFAULT '',
    items_json         TEXT NOT NULL,
    state              TEXT NOT NULL DEFAULT 'waiting',
    received_at        REAL NOT NULL,
    decide_by          REAL NOT NULL,
    attempts           INTEGER NOT NULL DEFAULT 0,
    next_attempt_at    REAL NOT NULL,
    last_error         TEXT,
    reported_at        REAL,
    event_type         INTEGER,
    failed_json        TEXT,
    UNIQUE (calling_ae, transaction_uid)
);
CREATE INDEX IF NOT EXISTS commitments_due ON commitments(state, next_attempt_at);
"""


@dataclass(frozen=True)
class CommitmentRow:
    """A storage commitment request waiting for (or done with) its result."""
    id: int
    transaction_uid: str
    calling_ae: str
    peer_host: str
    items_json: str
    state: str
    received_at: float
    decide_by: float          # instances not committed by then are reported as failures
    attempts: int
    next_attempt_at: float
    last_error: str | None
    reported_at: float | None
    event_type: int | None
    failed_json: str | None

    @property
    def items(self) -> list[tuple[str, str]]:
        """(SOP Class UID, SOP Instance UID) of each instance asked about."""
        return [tuple(i) for i in json.loads(self.items_json)]

    def to_dict(self) -> dict[str, Any]:
        return {"transaction_uid": self.transaction_uid, "calling_ae": self.calling_ae,
                "state": self.state, "instances": len(self.items), "received_at": self.received_at,
                "reported_at": self.reported_at, "event_type": self.event_type,
                "failed": json.loads(self.failed_json) if self.failed_json else [],
                "attempts": self.attempts, "last_error": self.last_error}



class CommitmentRecords:
    """The journal's storage commitment methods (mixed into ``edge.journal.Journal``)."""

    def record_commitment(self, transaction_uid: str, calling_ae: str, peer_host: str,
                          items: Iterable[tuple[str, str]], *, decide_by: float,
                          now: float | None = None) -> int:
        """Journal a storage commitment request (before it is answered); returns its id.
        The same transaction asked again by the same modality is answered again."""
        now = time.time() if now is None else now
        items_json = json.dumps([list(i) for i in items])
        with self._tx() as db:
            db.execute(
                "INSERT INTO commitments (transaction_uid, calling_ae, peer_host, items_json, state,"
                " received_at, decide_by, next_attempt_at) VALUES (?,?,?,?,'waiting',?,?,?)"
                " ON CONFLICT (calling_ae, transaction_uid) DO UPDATE SET peer_host=excluded.peer_host,"
                " items_json=excluded.items_json, state='waiting', received_at=excluded.received_at,"
                " decide_by=excluded.decide_by, attempts=0, next_attempt_at=excluded.next_attempt_at,"
                " last_error=NULL, reported_at=NULL, event_type=NULL, failed_json=NULL",
                (transaction_uid, calling_ae, peer_host, items_json, now, decide_by, now))
            row = db.execute("SELECT id FROM commitments WHERE calling_ae=? AND transaction_uid=?",
                             (calling_ae, transaction_uid)).fetchone()
            return int(row["id"])

    def waiting_commitments(self, *, now: float | None = None) -> list[CommitmentRow]:
        """Requests whose result is not reported yet and that are due for a look, oldest first."""
        now = time.time() if now is None else now
        rows = self._query("SELECT * FROM commitments WHERE state='waiting' AND next_attempt_at <= ?"
                           " ORDER BY received_at, id", (now,))
        return [CommitmentRow(**dict(r)) for r in rows]

    def get_commitment(self, commitment_id: int) -> CommitmentRow | None:
        rows = self._query("SELECT * FROM commitments WHERE id=?", (commitment_id,))
        return CommitmentRow(**dict(rows[0])) if rows else None

    def next_commitment_time(self) -> float | None:
        rows = self._query("SELECT MIN(next_attempt_at) FROM commitments WHERE state='waiting'")
        return rows[0][0] if rows else None

    def commitment_report_failed(self, commitment_id: int, error: str, *, retry_at: float | None,
                                 now: float | None = None) -> None:
        """The result could not be delivered: try again at ``retry_at`` (None: give up)."""
        now = time.time() if now is None else now
        with self._tx() as db:
            db.execute("UPDATE commitments SET attempts=attempts+1, last_error=?, next_attempt_at=?,"
                       " state=? WHERE id=? AND state='waiting'",
                       (error[:500], retry_at if retry_at is not None else now,
                        "waiting" if retry_at is not None else "gave_up", commitment_id))

    def commitment_reported(self, commitment_id: int, *, event_type: int,
                            failed: Iterable[tuple[str, int]], now: float | None = None) -> None:
        """The modality accepted the result: (SOP Instance UID, failure reason) of each failure."""
        now = time.time() if now is None else now
        with self._tx() as db:
            db.execute("UPDATE commitments SET state='reported', attempts=attempts+1, reported_at=?,"
                       " event_type=?, failed_json=?, last_error=NULL WHERE id=?",
                       (now, event_type, json.dumps([list(f) for f in failed]), commitment_id))

    def list_commitments(self, limit: int = 50) -> list[CommitmentRow]:
        """Newest first."""
        rows = self._query("SELECT * FROM commitments ORDER BY received_at DESC, id DESC LIMIT ?",
                           (int(limit),))
        return [CommitmentRow(**dict(r)) for r in rows]

    def count_commitments_by_state(self) -> dict[str, int]:
        counts = {s: 0 for s in COMMITMENT_STATES}
        for r in self._query("SELECT state, COUNT(*) AS n FROM commitments GROUP BY state"):
            counts[r["state"]] = r["n"]
        return counts
