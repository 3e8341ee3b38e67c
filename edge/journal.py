"""The journal: the single source of truth for instance and delivery state (SQLite).

WAL mode with ``synchronous=FULL``: a committed row survives a power cut. Every method is
one short transaction under a lock, so the DICOM handler threads, the analysis workers,
the delivery sender and the web pages can share one ``Journal``.

Instance states: ``received -> analyzing -> analyzed | skipped | failed``. An instance
whose results could not be written (disk full or read-only) goes back to ``received`` with
a ``not_before`` time and a reason, and is analysed again then.
Delivery states: ``pending -> sent | retrying -> gave_up`` (one row per result object and
destination); ``superseded`` when a new analysis of the same image replaced the object
before it was sent. In router mode the received image itself is a delivery too
(``object_type`` "source", ``result_uid`` its SOP Instance UID), queued in the transaction
that records the image; its results are not due at a destination before it is sent there.
Storage commitment requests (``commitments``) wait here until their result is reported.

The schema is created and upgraded in place (``PRAGMA user_version``); a journal written by
an older version gains the new columns at open.
"""
from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from .journal_commitments import COMMITMENT_SCHEMA, COMMITMENT_STATES, CommitmentRecords, CommitmentRow
from .journal_screening import CALIBRATION_SCHEMA, CalibrationRow, ScreeningRecords

logger = logging.getLogger(__name__)

__all__ = ["Journal", "InstanceRow", "DeliveryRow", "NewInstance", "CommitmentRow", "COMMITMENT_STATES",
           "INSTANCE_STATES", "FINAL_INSTANCE_STATES", "DELIVERY_STATES", "SOURCE", "SCHEMA_VERSION",
           "check_integrity", "CalibrationRow"]

INSTANCE_STATES = ("received", "analyzing", "analyzed", "skipped", "failed")
FINAL_INSTANCE_STATES = ("analyzed", "skipped", "failed")
DELIVERY_STATES = ("pending", "retrying", "sent", "gave_up", "superseded")
SOURCE = "source"    # object_type of a forwarded received image
SCHEMA_VERSION = 5   # 4: calibrations (edge.journal_screening); 5: deliveries.early

_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid   TEXT PRIMARY KEY,
    sop_class_uid      TEXT NOT NULL,
    study_instance_uid TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    transfer_syntax    TEXT NOT NULL DEFAULT '',
    calling_ae         TEXT NOT NULL DEFAULT '',
    path               TEXT NOT NULL,
    sha256             TEXT NOT NULL,
    size_bytes         INTEGER NOT NULL,
    patient_name       TEXT NOT NULL DEFAULT '',
    patient_id         TEXT NOT NULL DEFAULT '',
    modality           TEXT NOT NULL DEFAULT '',
    state              TEXT NOT NULL DEFAULT 'received',
    reason             TEXT,
    received_at        REAL NOT NULL,
    updated_at         REAL NOT NULL,
    analyzed_at        REAL,
    attempts           INTEGER NOT NULL DEFAULT 0,
    findings_json      TEXT,
    timings_json       TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS instances_state ON instances(state, received_at);
CREATE INDEX IF NOT EXISTS instances_received ON instances(received_at);
CREATE TABLE IF NOT EXISTS deliveries (
    id                 INTEGER PRIMARY KEY AUTOINCREMENT,
    sop_instance_uid   TEXT NOT NULL REFERENCES instances(sop_instance_uid),
    object_type        TEXT NOT NULL,
    result_uid         TEXT NOT NULL,
    path               TEXT NOT NULL,
    destination        TEXT NOT NULL,
    state              TEXT NOT NULL DEFAULT 'pending',
    attempts           INTEGER NOT NULL DEFAULT 0,
    last_error         TEXT,
    created_at         REAL NOT NULL,
    updated_at         REAL NOT NULL,
    next_attempt_at    REAL NOT NULL,
    sent_at            REAL,
    UNIQUE (result_uid, destination)
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries(state, next_attempt_at);
CREATE INDEX IF NOT EXISTS deliveries_instance ON deliveries(sop_instance_uid);
CREATE TABLE IF NOT EXISTS instance_versions (
    id                 INTEGER PRIMARY KEY AUTOINCREMENT,
    sop_instance_uid   TEXT NOT NULL,
    sha256             TEXT NOT NULL,
    path               TEXT NOT NULL,
    size_bytes         INTEGER NOT NULL,
    calling_ae         TEXT NOT NULL DEFAULT '',
    received_at        REAL NOT NULL,
    replaced_at        REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS instance_versions_uid ON instance_versions(sop_instance_uid);
""" + COMMITMENT_SCHEMA + CALIBRATION_SCHEMA

# A result row waits while the source row of its image to the same destination is not yet
# sent (router mode, ``source_first``): part of every "what is due" query, so the order
# holds across retries and restarts.
_WAITS_FOR_SOURCE = (
    " AND NOT (d.object_type != 'source' AND EXISTS (SELECT 1 FROM deliveries s"
    " WHERE s.sop_instance_uid = d.sop_instance_uid AND s.destination = d.destination"
    " AND s.object_type = 'source' AND s.replaced_at IS NULL AND s.state IN ('pending','retrying')))")

# Columns added after the first release: (table, column, declaration).
_ADDED_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("instances", "not_before", "REAL"),
    ("instances", "conflicts", "INTEGER NOT NULL DEFAULT 0"),
    ("deliveries", "replaced_at", "REAL"),
    ("deliveries", "unconfirmed_at", "REAL"),
    ("instances", "recovered", "INTEGER NOT NULL DEFAULT 0"),
    ("deliveries", "rule", "TEXT"),
    ("deliveries", "early", "INTEGER NOT NULL DEFAULT 0"),
)


@dataclass(frozen=True)
class InstanceRow:
    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax: str
    calling_ae: str
    path: str
    sha256: str
    size_bytes: int
    patient_name: str
    patient_id: str
    modality: str
    state: str
    reason: str | None
    received_at: float
    updated_at: float
    analyzed_at: float | None
    attempts: int
    findings_json: str | None
    timings_json: str
    not_before: float | None = None
    conflicts: int = 0
    recovered: int = 0     # put back from the spool after the journal lost it

    @property
    def findings(self) -> dict[str, Any] | None:
        return json.loads(self.findings_json) if self.findings_json else None

    @property
    def timings(self) -> dict[str, float]:
        return json.loads(self.timings_json or "{}")

    def to_dict(self) -> dict[str, Any]:
        """Public view for the CLI and the JSON API (no file paths or hashes)."""
        return {
            "sop_instance_uid": self.sop_instance_uid,
            "sop_class_uid": self.sop_class_uid,
            "study_instance_uid": self.study_instance_uid,
            "series_instance_uid": self.series_instance_uid,
            "calling_ae": self.calling_ae,
            "modality": self.modality,
            "patient_name": self.patient_name,
            "patient_id": self.patient_id,
            "state": self.state,
            "reason": self.reason,
            "received_at": self.received_at,
            "analyzed_at": self.analyzed_at,
            "timings_ms": self.timings,
            "findings": self.findings,
            "conflicts": self.conflicts,
        }


@dataclass(frozen=True)
class DeliveryRow:
    id: int
    sop_instance_uid: str
    object_type: str
    result_uid: str
    path: str
    destination: str
    state: str
    attempts: int
    last_error: str | None
    created_at: float
    updated_at: float
    next_attempt_at: float
    sent_at: float | None
    replaced_at: float | None = None   # a newer analysis of the image replaced this object
    unconfirmed_at: float | None = None   # sent (or maybe sent) without a recorded answer
    rule: str | None = None   # the [[forward]] rule that sent it there (None: every image)
    early: int = 0   # 1: queued while its analysis was under way, not yet completed

    @property
    def current(self) -> bool:
        return self.replaced_at is None

    @property
    def is_source(self) -> bool:
        """The received image itself, forwarded (router mode)."""
        return self.object_type == SOURCE

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in (
            "id", "object_type", "result_uid", "destination", "state", "attempts",
            "last_error", "created_at", "next_attempt_at", "sent_at", "replaced_at", "rule")}


@dataclass(frozen=True)
class NewInstance:
    """What the receiving side knows about a stored instance."""
    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax: str
    calling_ae: str
    path: str
    sha256: str
    size_bytes: int
    patient_name: str = ""
    patient_id: str = ""
    modality: str = ""


class Journal(CommitmentRecords, ScreeningRecords):
    """SQLite journal shared by all threads of the appliance."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False,
                                   isolation_level=None, timeout=30.0)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA busy_timeout=30000")
        with self._lock:
            self._db.executescript(_SCHEMA)
            self._upgrade()

    def _upgrade(self) -> None:
        """Add the columns a journal from an older version lacks (no data is rewritten)."""
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version >= SCHEMA_VERSION:
            return
        for table, column, declaration in _ADDED_COLUMNS:
            have = {r[1] for r in self._db.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
        self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------ helpers
    def _tx(self, *, flush: bool = True):
        """A transaction; ``flush=False`` for the few whose loss in a power cut is harmless
        (they are still durable against a crash of the service: the OS has them)."""
        return _Transaction(self._db, self._lock, flush=flush)

    def _query(self, sql: str, args: Iterable[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, tuple(args)).fetchall()

    def check_integrity(self) -> bool:
        """True when SQLite's quick_check finds nothing wrong (used by /healthz and the
        systemd watchdog). Runs on a read-only connection of its own, so it never holds
        the lock that C-STORE commits need."""
        return check_integrity(self.path)

    # ------------------------------------------------------------------ instances
    def find_instance(self, sop_instance_uid: str) -> InstanceRow | None:
        rows = self._query("SELECT * FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,))
        return InstanceRow(**dict(rows[0])) if rows else None

    def record_received(self, new: NewInstance, *, now: float | None = None,
                        timings_ms: dict[str, float] | None = None,
                        forward_to: Iterable[str] = (), unconfirmed: bool = False) -> str:
        """Insert a stored instance; returns "new", "duplicate" (same bytes) or "conflict".

        A re-sent instance with the same bytes keeps its row and state (not analyzed
        twice, not forwarded twice). Different bytes under the same SOP Instance UID are a
        conflict: the earlier version's file and facts are kept in ``instance_versions``,
        the instance counts the conflict, and the new version is analyzed (its results get
        new UIDs).

        ``forward_to``: destinations that take the image itself (router mode). Its delivery
        rows are written in this same transaction, so an acknowledged image is always
        queued for forwarding; a conflict queues the new version again (the PACS gets the
        latest). ``unconfirmed``: the image may already be there (recovered from the spool),
        so the outbox asks before sending it.
        """
        now = time.time() if now is None else now
        timings = json.dumps({k: round(float(v), 3) for k, v in (timings_ms or {}).items()}, sort_keys=True)
        with self._tx() as db:
            row = db.execute("SELECT * FROM instances WHERE sop_instance_uid = ?",
                             (new.sop_instance_uid,)).fetchone()
            if row is not None and row["sha256"] == new.sha256:
                return "duplicate"
            if row is not None:
                db.execute(
                    "INSERT INTO instance_versions (sop_instance_uid, sha256, path, size_bytes,"
                    " calling_ae, received_at, replaced_at) VALUES (?,?,?,?,?,?,?)",
                    (row["sop_instance_uid"], row["sha256"], row["path"], row["size_bytes"],
                     row["calling_ae"], row["received_at"], now))
                db.execute(
                    "UPDATE instances SET sop_class_uid=?, study_instance_uid=?, series_instance_uid=?,"
                    " transfer_syntax=?, calling_ae=?, path=?, sha256=?, size_bytes=?, patient_name=?,"
                    " patient_id=?, modality=?, state='received', reason=NULL, received_at=?,"
                    " updated_at=?, analyzed_at=NULL, attempts=0, findings_json=NULL, timings_json=?,"
                    " not_before=NULL, conflicts=conflicts+1 WHERE sop_instance_uid=?",
                    (new.sop_class_uid, new.study_instance_uid, new.series_instance_uid,
                     new.transfer_syntax, new.calling_ae, new.path, new.sha256, new.size_bytes,
                     new.patient_name, new.patient_id, new.modality, now, now, timings,
                     new.sop_instance_uid))
                self._queue_source(db, new, forward_to, now, unconfirmed)
                return "conflict"
            db.execute(
                "INSERT INTO instances (sop_instance_uid, sop_class_uid, study_instance_uid,"
                " series_instance_uid, transfer_syntax, calling_ae, path, sha256, size_bytes,"
                " patient_name, patient_id, modality, state, received_at, updated_at, timings_json)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,'received',?,?,?)",
                (new.sop_instance_uid, new.sop_class_uid, new.study_instance_uid,
                 new.series_instance_uid, new.transfer_syntax, new.calling_ae, new.path, new.sha256,
                 new.size_bytes, new.patient_name, new.patient_id, new.modality, now, now, timings))
            self._queue_source(db, new, forward_to, now, unconfirmed)
            return "new"

    @staticmethod
    def _queue_source(db: sqlite3.Connection, new: NewInstance, destinations: Iterable[str],
                      now: float, unconfirmed: bool) -> None:
        """Queue the image itself for each destination (one row per destination; a newer
        version under the same UID takes the row over, whatever its state)."""
        for dest in destinations:
            db.execute(
                "INSERT INTO deliveries (sop_instance_uid, object_type, result_uid, path, destination,"
                " state, created_at, updated_at, next_attempt_at, unconfirmed_at)"
                " VALUES (?,?,?,?,?,'pending',?,?,?,?)"
                " ON CONFLICT (result_uid, destination) DO UPDATE SET path=excluded.path,"
                " state='pending', attempts=0, last_error=NULL, created_at=excluded.created_at,"
                " updated_at=excluded.updated_at, next_attempt_at=excluded.next_attempt_at,"
                " sent_at=NULL, replaced_at=NULL, unconfirmed_at=excluded.unconfirmed_at",
                (new.sop_instance_uid, SOURCE, new.sop_instance_uid, new.path, dest, now, now, now,
                 now if unconfirmed else None))

    def known_paths(self) -> set[str]:
        """Spool paths of every instance and earlier version the journal knows."""
        rows = self._query("SELECT path FROM instances UNION SELECT path FROM instance_versions")
        return {r[0] for r in rows}

    def mark_recovered(self, sop_instance_uid: str) -> None:
        """The instance was put back from the spool: its results may already be at the PACS."""
        with self._tx() as db:
            db.execute("UPDATE instances SET recovered=1 WHERE sop_instance_uid=?", (sop_instance_uid,))

    def record_earlier_version(self, new: NewInstance, received_at: float) -> None:
        """Keep ``new`` as an earlier version of an instance the journal already holds."""
        with self._tx() as db:
            db.execute("INSERT INTO instance_versions (sop_instance_uid, sha256, path, size_bytes,"
                       " calling_ae, received_at, replaced_at) VALUES (?,?,?,?,?,?,?)",
                       (new.sop_instance_uid, new.sha256, new.path, new.size_bytes, new.calling_ae,
                        received_at, received_at))
            db.execute("UPDATE instances SET conflicts=conflicts+1 WHERE sop_instance_uid=?",
                       (new.sop_instance_uid,))

    def instance_versions(self, sop_instance_uid: str) -> list[dict[str, Any]]:
        """Earlier versions of an instance (same UID, other bytes), oldest first."""
        rows = self._query("SELECT sha256, path, size_bytes, calling_ae, received_at, replaced_at"
                           " FROM instance_versions WHERE sop_instance_uid=? ORDER BY id",
                           (sop_instance_uid,))
        return [dict(r) for r in rows]

    def add_timings(self, sop_instance_uid: str, timings_ms: dict[str, float]) -> None:
        """Merge per-stage timings (milliseconds) into the instance's record."""
        with self._tx(flush=False) as db:   # timings: harmless to lose in a power cut
            try:
                row = _instance(db, sop_instance_uid, "timings_json")
            except KeyError:
                return
            db.execute("UPDATE instances SET timings_json=? WHERE sop_instance_uid=?",
                       (_merged_timings(row, timings_ms), sop_instance_uid))

    def claim_next_instance(self, *, now: float | None = None) -> InstanceRow | None:
        """Move the oldest due ``received`` instance to ``analyzing`` and return it.

        Claiming does not count as an attempt: only ``begin_inference`` does, so that a
        crash counts against the image that was being analysed, not those queued behind it.
        """
        now = time.time() if now is None else now
        with self._tx(flush=False) as db:   # lost in a power cut: 'received', claimed again
            row = db.execute("SELECT sop_instance_uid FROM instances WHERE state='received'"
                             " AND (not_before IS NULL OR not_before <= ?)"
                             " ORDER BY received_at, rowid LIMIT 1", (now,)).fetchone()
            if row is None:
                return None
            uid = row["sop_instance_uid"]
            db.execute("UPDATE instances SET state='analyzing', updated_at=? WHERE sop_instance_uid=?",
                       (now, uid))
            return InstanceRow(**dict(db.execute("SELECT * FROM instances WHERE sop_instance_uid=?",
                                                 (uid,)).fetchone()))

    def begin_inference(self, sop_instance_uid: str) -> int:
        """Count an analysis attempt of this image (the models start on it now); returns the
        number of attempts so far. After a restart, an image with an attempt counted was
        being analysed when the service died (see edge.rehearsal)."""
        with self._tx(flush=False) as db:   # lost in a power cut: not the image's fault
            db.execute("UPDATE instances SET attempts=attempts+1 WHERE sop_instance_uid=?",
                       (sop_instance_uid,))
            row = db.execute("SELECT attempts FROM instances WHERE sop_instance_uid=?",
                             (sop_instance_uid,)).fetchone()
            return int(row["attempts"]) if row else 0

    def clear_attempts(self, sop_instance_uid: str) -> None:
        """The interrupted analysis was not the image's fault: start counting again."""
        with self._tx() as db:
            db.execute("UPDATE instances SET attempts=0 WHERE sop_instance_uid=?", (sop_instance_uid,))

    def defer_instance(self, sop_instance_uid: str, reason: str, *, retry_at: float,
                       now: float | None = None) -> None:
        """Back to ``received`` until ``retry_at``: the analysis worked but its results could
        not be kept (disk full or read-only); it is analysed again then."""
        now = time.time() if now is None else now
        with self._tx() as db:
            db.execute("UPDATE instances SET state='received', reason=?, not_before=?, updated_at=?,"
                       " attempts=MAX(attempts-1, 0) WHERE sop_instance_uid=?",
                       (reason, retry_at, now, sop_instance_uid))

    def next_deferred_time(self) -> float | None:
        """When the next deferred instance is due again (epoch seconds), or None."""
        rows = self._query("SELECT MIN(not_before) FROM instances WHERE state='received'"
                           " AND not_before IS NOT NULL")
        return rows[0][0] if rows else None

    def oldest_waiting_age(self, *, now: float | None = None) -> float | None:
        """Seconds the oldest due ``received`` instance has waited for analysis, or None."""
        now = time.time() if now is None else now
        rows = self._query("SELECT MIN(COALESCE(not_before, received_at)) FROM instances"
                           " WHERE state='received'")
        oldest = rows[0][0] if rows else None
        return None if oldest is None else max(0.0, now - oldest)

    def finish_instance(self, sop_instance_uid: str, state: str, *, reason: str | None = None,
                        findings: dict[str, Any] | None = None,
                        timings_ms: dict[str, float] | None = None,
                        now: float | None = None) -> None:
        """Record the final state of an analysis (analyzed, skipped or failed)."""
        if state not in FINAL_INSTANCE_STATES:
            raise ValueError(f"state: {state!r} is not a final state {FINAL_INSTANCE_STATES}")
        now = time.time() if now is None else now
        with self._tx() as db:
            row = _instance(db, sop_instance_uid, "timings_json")
            db.execute("UPDATE instances SET state=?, reason=?, findings_json=?, timings_json=?,"
                       " analyzed_at=?, updated_at=?, not_before=NULL WHERE sop_instance_uid=?",
                       (state, reason, json.dumps(findings) if findings is not None else None,
                        _merged_timings(row, timings_ms or {}), now, now, sop_instance_uid))
            # Results queued early by an analysis that ended otherwise are not sent (any
            # already sent stay so); a later analysis queues its own again.
            db.execute("UPDATE deliveries SET"
                       " replaced_at=CASE WHEN state IN ('pending','retrying') THEN ? ELSE replaced_at END,"
                       " state=CASE WHEN state IN ('pending','retrying') THEN 'superseded' ELSE state END,"
                       " early=0, updated_at=? WHERE sop_instance_uid=? AND early=1",
                       (now, now, sop_instance_uid))

    def queue_early_results(self, sop_instance_uid: str, plan: Iterable[tuple], *,
                            now: float | None = None) -> None:
        """Queue some result objects of an analysis still under way (the GSPS and SC while
        the SR is being built), so the outbox sends them meanwhile; ``plan`` as in
        ``complete_analysis``, without "source" entries, for files already written durably.

        A row of the same object and destination left by a completed earlier analysis is
        queued again, as ``complete_analysis`` does; one left by an analysis of this image
        that never completed (a crash interrupted it while the SR was built) is kept as it
        is, so a restart does not send an object twice.
        """
        now = time.time() if now is None else now
        with self._tx() as db:
            row = _instance(db, sop_instance_uid, "recovered")
            unconfirmed = now if row["recovered"] else None
            for object_type, result_uid, path, dest, *more in plan:
                if object_type == SOURCE:
                    raise ValueError("the image itself is queued with complete_analysis")
                _queue_result(db, sop_instance_uid, object_type, result_uid, path, dest,
                              more[0] if more else None, now=now, unconfirmed=unconfirmed, early=True)

    def complete_analysis(self, sop_instance_uid: str, *, findings: dict[str, Any],
                          timings_ms: dict[str, float],
                          plan: Iterable[tuple],
                          local_destination: str | None = None,
                          now: float | None = None) -> None:
        """Mark an instance analyzed AND queue its result objects, in one transaction.

        ``plan`` holds (object_type, result_uid, path, destination[, rule]) for files
        already written durably; ``rule`` names the [[forward]] rule that sends it there.
        A "source" entry (the image itself, forwarded by a rule) is queued only if that
        destination never had it: an image is forwarded once, whatever reanalyses follow.
        Rows for ``local_destination`` (the results folder, used when no destination is
        configured) are recorded as sent. Rows that ``queue_early_results`` queued while
        this analysis (or one a crash interrupted) was under way are left as they are,
        perhaps sent already: same UID, same content.
        """
        now = time.time() if now is None else now
        rows = list(plan)
        with self._tx() as db:
            row = _instance(db, sop_instance_uid, "timings_json, recovered")
            # Results of an image recovered from the spool may have reached the PACS before
            # the journal was lost: the outbox checks before sending them.
            unconfirmed = now if row["recovered"] else None
            db.execute("UPDATE instances SET state='analyzed', reason=NULL, findings_json=?,"
                       " timings_json=?, analyzed_at=?, updated_at=?, not_before=NULL"
                       " WHERE sop_instance_uid=?",
                       (json.dumps(findings), _merged_timings(row, timings_ms), now, now,
                        sop_instance_uid))
            # Objects of an earlier analysis that this one does not produce again are replaced:
            # those not yet sent are never sent (the PACS would get stale results).
            new_uids = sorted({r[1] for r in rows})
            marks = ",".join("?" * len(new_uids)) or "''"
            db.execute(f"UPDATE deliveries SET replaced_at=?, updated_at=?,"
                       f" state=CASE WHEN state IN ('pending','retrying') THEN 'superseded' ELSE state END"
                       f" WHERE sop_instance_uid=? AND replaced_at IS NULL AND object_type != 'source'"
                       f" AND result_uid NOT IN ({marks})",
                       (now, now, sop_instance_uid, *new_uids))
            for object_type, result_uid, path, dest, *more in rows:
                rule = more[0] if more else None
                if object_type == SOURCE:   # an image forwarded by a rule: once, ever
                    db.execute(
                        "INSERT OR IGNORE INTO deliveries (sop_instance_uid, object_type, result_uid,"
                        " path, destination, state, created_at, updated_at, next_attempt_at, rule)"
                        " VALUES (?,?,?,?,?,'pending',?,?,?,?)",
                        (sop_instance_uid, SOURCE, result_uid, path, dest, now, now, now, rule))
                else:
                    _queue_result(db, sop_instance_uid, object_type, result_uid, path, dest, rule,
                                  now=now, unconfirmed=unconfirmed, local=dest == local_destination)
            db.execute("UPDATE deliveries SET early=0 WHERE sop_instance_uid=? AND early=1",
                       (sop_instance_uid,))

    def resume_interrupted(self) -> int:
        """On start: instances left in ``analyzing`` go back to ``received``."""
        with self._tx() as db:
            cur = db.execute("UPDATE instances SET state='received' WHERE state='analyzing'")
            return cur.rowcount

    def requeue_instance(self, sop_instance_uid: str) -> bool:
        """Analyze an instance again (technician's "resend results")."""
        with self._tx() as db:
            cur = db.execute("UPDATE instances SET state='received', reason=NULL, updated_at=?,"
                             " attempts=0, not_before=NULL"
                             " WHERE sop_instance_uid=? AND state IN ('analyzed','skipped','failed')",
                             (time.time(), sop_instance_uid))
            return cur.rowcount == 1

    def list_instances(self, limit: int = 50, offset: int = 0, state: str | None = None) -> list[InstanceRow]:
        """Newest first."""
        sql = "SELECT * FROM instances"
        args: list[Any] = []
        if state:
            sql += " WHERE state=?"
            args.append(state)
        sql += " ORDER BY received_at DESC, rowid DESC LIMIT ? OFFSET ?"
        args += [int(limit), int(offset)]
        return [InstanceRow(**dict(r)) for r in self._query(sql, args)]

    def count_instances_by_state(self) -> dict[str, int]:
        counts = {s: 0 for s in INSTANCE_STATES}
        for r in self._query("SELECT state, COUNT(*) AS n FROM instances GROUP BY state"):
            counts[r["state"]] = r["n"]
        return counts

    # ------------------------------------------------------------------ deliveries
    def add_deliveries(self, sop_instance_uid: str, objects: Iterable[tuple[str, str, str]],
                       destinations: Iterable[str], *, now: float | None = None) -> int:
        """Queue (object_type, result_uid, path) for each destination; existing rows are kept."""
        now = time.time() if now is None else now
        dests = list(destinations)
        added = 0
        with self._tx() as db:
            for object_type, result_uid, path in objects:
                for dest in dests:
                    cur = db.execute(
                        "INSERT OR IGNORE INTO deliveries (sop_instance_uid, object_type, result_uid,"
                        " path, destination, state, created_at, updated_at, next_attempt_at)"
                        " VALUES (?,?,?,?,?,'pending',?,?,?)",
                        (sop_instance_uid, object_type, result_uid, path, dest, now, now, now))
                    added += cur.rowcount
        return added

    def due_deliveries(self, *, now: float | None = None, limit: int = 50,
                       destination: str | None = None, source_first: bool = True) -> list[DeliveryRow]:
        """Undelivered objects due by ``now``, oldest due first; only ``destination``'s when
        given, so that a backlog for one destination cannot hide another's rows.

        ``source_first``: a result is not due at a destination while its image (router
        mode) still waits to be sent there."""
        now = time.time() if now is None else now
        sql = "SELECT d.* FROM deliveries d WHERE d.state IN ('pending','retrying') AND d.next_attempt_at <= ?"
        args: tuple = (now,)
        if destination is not None:
            sql += " AND d.destination=?"
            args += (destination,)
        if source_first:
            sql += _WAITS_FOR_SOURCE
        rows = self._query(sql + " ORDER BY d.next_attempt_at, d.id LIMIT ?", args + (limit,))
        return [DeliveryRow(**dict(r)) for r in rows]

    def next_delivery_time(self, destination: str | None = None, *,
                           source_first: bool = True) -> float | None:
        """When the next undelivered object is due (epoch seconds), or None; results waiting
        for their image count only once it is sent (``source_first``)."""
        sql = "SELECT MIN(d.next_attempt_at) FROM deliveries d WHERE d.state IN ('pending','retrying')"
        args: tuple = ()
        if destination is not None:
            sql += " AND d.destination=?"
            args = (destination,)
        if source_first:
            sql += _WAITS_FOR_SOURCE
        rows = self._query(sql, args)
        return rows[0][0] if rows else None

    def mark_in_flight(self, delivery_ids: Iterable[int], *, now: float | None = None) -> None:
        """These objects are about to be sent: until their answer is recorded, a crash
        leaves them ``unconfirmed`` (the PACS may or may not hold them)."""
        now = time.time() if now is None else now
        ids = list(delivery_ids)
        with self._tx() as db:
            db.executemany("UPDATE deliveries SET unconfirmed_at=? WHERE id=?", [(now, i) for i in ids])

    def mark_delivery_sent(self, delivery_id: int, *, note: str | None = None, now: float | None = None,
                           count_attempt: bool = True, path: str | None = None) -> bool:
        """Record an object as delivered. ``path``: only if the row still sends that file (a
        newer version of a forwarded image may have taken the row over meanwhile)."""
        now = time.time() if now is None else now
        sql = ("UPDATE deliveries SET state='sent', attempts=attempts+?, sent_at=?, updated_at=?,"
               " last_error=?, unconfirmed_at=NULL WHERE id=?")
        args: tuple = (1 if count_attempt else 0, now, now, note, delivery_id)
        if path is not None:
            sql, args = sql + " AND path=?", args + (path,)
        with self._tx() as db:
            return db.execute(sql, args).rowcount == 1

    def mark_deliveries_sent(self, sent: Iterable[tuple[int, str | None, str | None]], *,
                             now: float | None = None) -> list[bool]:
        """``mark_delivery_sent`` for several objects, (id, note, path) each, in one
        transaction (one disk flush for an association's objects)."""
        now = time.time() if now is None else now
        out = []
        with self._tx() as db:
            for delivery_id, note, path in sent:
                sql = ("UPDATE deliveries SET state='sent', attempts=attempts+1, sent_at=?, updated_at=?,"
                       " last_error=?, unconfirmed_at=NULL WHERE id=?")
                args: tuple = (now, now, note, delivery_id)
                if path is not None:
                    sql, args = sql + " AND path=?", args + (path,)
                out.append(db.execute(sql, args).rowcount == 1)
        return out

    def mark_delivery_failed(self, delivery_id: int, error: str, *, retry_at: float | None,
                             now: float | None = None, path: str | None = None,
                             hold_results: bool = False) -> bool:
        """A failed attempt: ``retry_at`` None means give up (maximum age reached).

        ``path`` as for ``mark_delivery_sent``. ``hold_results``: when a forwarded image is
        given up, its results still waiting for it at that destination give up with it
        (they are never sent before the image)."""
        now = time.time() if now is None else now
        state = "retrying" if retry_at is not None else "gave_up"
        sql = ("UPDATE deliveries SET state=?, attempts=attempts+1, last_error=?, updated_at=?,"
               " next_attempt_at=?, unconfirmed_at=NULL WHERE id=?")
        args: tuple = (state, error[:500], now, retry_at if retry_at is not None else now, delivery_id)
        if path is not None:
            sql, args = sql + " AND path=?", args + (path,)
        with self._tx() as db:
            changed = db.execute(sql, args).rowcount == 1
            if changed and state == "gave_up" and hold_results:
                row = db.execute("SELECT sop_instance_uid, destination, object_type FROM deliveries"
                                 " WHERE id=?", (delivery_id,)).fetchone()
                if row is not None and row["object_type"] == SOURCE:
                    db.execute("UPDATE deliveries SET state='gave_up', updated_at=?, last_error=?"
                               " WHERE sop_instance_uid=? AND destination=? AND object_type != 'source'"
                               " AND replaced_at IS NULL AND state IN ('pending','retrying')",
                               (now, "not sent: the image itself could not be forwarded to this destination",
                                row["sop_instance_uid"], row["destination"]))
            return changed

    def retry_delivery(self, delivery_id: int, *, now: float | None = None) -> bool:
        """Technician's "retry now": a retrying or given-up delivery is due immediately. For
        a forwarded image, its given-up results at that destination are retried too (after it)."""
        now = time.time() if now is None else now
        with self._tx() as db:
            cur = db.execute("UPDATE deliveries SET state='retrying', next_attempt_at=?, created_at=?,"
                             " updated_at=? WHERE id=? AND state IN ('retrying','gave_up','pending')",
                             (now, now, now, delivery_id))
            if cur.rowcount != 1:
                return False
            row = db.execute("SELECT sop_instance_uid, destination, object_type FROM deliveries"
                             " WHERE id=?", (delivery_id,)).fetchone()
            if row["object_type"] == SOURCE:
                db.execute("UPDATE deliveries SET state='retrying', next_attempt_at=?, created_at=?,"
                           " updated_at=? WHERE sop_instance_uid=? AND destination=?"
                           " AND object_type != 'source' AND replaced_at IS NULL AND state='gave_up'",
                           (now, now, now, row["sop_instance_uid"], row["destination"]))
            return True

    def resend_instance_results(self, sop_instance_uid: str, *, now: float | None = None) -> int:
        """Send every current result object of an instance again to every destination
        (objects replaced by a later analysis are not sent again). The image itself
        (router mode) is sent again only where it has not been delivered."""
        now = time.time() if now is None else now
        with self._tx() as db:
            cur = db.execute("UPDATE deliveries SET state='pending', next_attempt_at=?, created_at=?,"
                             " updated_at=?, last_error=NULL WHERE sop_instance_uid=?"
                             " AND replaced_at IS NULL AND (object_type != 'source' OR state != 'sent')",
                             (now, now, now, sop_instance_uid))
            return cur.rowcount

    def sent_results(self, sop_instance_uid: str, object_type: str) -> list[DeliveryRow]:
        """Result objects of this type sent for the image by earlier analyses (one row per
        object, oldest first): what an amended SR names as its predecessors."""
        rows = self._query("SELECT * FROM deliveries WHERE id IN (SELECT MIN(id) FROM deliveries"
                           " WHERE sop_instance_uid=? AND object_type=? AND state='sent'"
                           " GROUP BY result_uid) ORDER BY id", (sop_instance_uid, object_type))
        return [DeliveryRow(**dict(r)) for r in rows]

    def deliveries_for(self, sop_instance_uid: str) -> list[DeliveryRow]:
        rows = self._query("SELECT * FROM deliveries WHERE sop_instance_uid=? ORDER BY id", (sop_instance_uid,))
        return [DeliveryRow(**dict(r)) for r in rows]

    def get_delivery(self, delivery_id: int) -> DeliveryRow | None:
        rows = self._query("SELECT * FROM deliveries WHERE id=?", (delivery_id,))
        return DeliveryRow(**dict(rows[0])) if rows else None

    def count_deliveries_by_state(self, destination: str | None = None) -> dict[str, int]:
        counts = {s: 0 for s in DELIVERY_STATES}
        sql = "SELECT state, COUNT(*) AS n FROM deliveries"
        args: tuple = ()
        if destination:
            sql += " WHERE destination=?"
            args = (destination,)
        for r in self._query(sql + " GROUP BY state", args):
            counts[r["state"]] = r["n"]
        return counts

    def oldest_pending_delivery_age(self, *, now: float | None = None) -> float | None:
        """Seconds since the oldest undelivered result was queued, or None."""
        now = time.time() if now is None else now
        rows = self._query("SELECT MIN(created_at) FROM deliveries WHERE state IN ('pending','retrying')")
        oldest = rows[0][0] if rows else None
        return None if oldest is None else max(0.0, now - oldest)

    def delivery_summary(self, sop_instance_uid: str) -> str:
        """One word for the instance's current results: none, pending, retrying, sent, gave_up."""
        states = {d.state for d in self.deliveries_for(sop_instance_uid) if d.current}
        for s in ("gave_up", "retrying", "pending", "sent"):
            if s in states:
                return s
        return "none"

    def source_deliveries(self, sop_instance_uid: str) -> list[DeliveryRow]:
        """The forwarding rows of the image itself, one per destination (router mode)."""
        rows = self._query("SELECT * FROM deliveries WHERE sop_instance_uid=? AND object_type=?"
                           " AND replaced_at IS NULL ORDER BY id", (sop_instance_uid, SOURCE))
        return [DeliveryRow(**dict(r)) for r in rows]

    def forwarding_summary(self, sop_instance_uid: str) -> str:
        """One word for the image's own forwarding: none (not routed), pending, retrying,
        sent or gave_up."""
        states = {d.state for d in self.source_deliveries(sop_instance_uid)}
        for s in ("gave_up", "retrying", "pending", "sent"):
            if s in states:
                return s
        return "none"

    def count_deliveries_by_type(self) -> dict[tuple[str, str, str], int]:
        """Delivery rows by (destination, object_type, state)."""
        return {(r[0], r[1], r[2]): r[3] for r in self._query(
            "SELECT destination, object_type, state, COUNT(*) FROM deliveries"
            " GROUP BY destination, object_type, state")}


def _instance(db: sqlite3.Connection, sop_instance_uid: str, columns: str) -> sqlite3.Row:
    """``columns`` of the instance's row; KeyError when the journal does not know it."""
    row = db.execute(f"SELECT {columns} FROM instances WHERE sop_instance_uid=?",
                     (sop_instance_uid,)).fetchone()
    if row is None:
        raise KeyError(sop_instance_uid)
    return row


def _merged_timings(row: sqlite3.Row, timings_ms: dict[str, float]) -> str:
    """The row's ``timings_json`` with ``timings_ms`` (milliseconds, 3 decimals) merged in."""
    merged = json.loads(row["timings_json"] or "{}")
    merged.update({k: round(float(v), 3) for k, v in timings_ms.items()})
    return json.dumps(merged, sort_keys=True)


def _queue_result(db: sqlite3.Connection, sop_instance_uid: str, object_type: str, result_uid: str,
                  path: str, dest: str, rule: str | None, *, now: float, unconfirmed: float | None,
                  local: bool = False, early: bool = False) -> None:
    """Insert a result's delivery row, or queue an existing one of the same object and
    destination again, unless that one was queued early (by an analysis not yet completed:
    kept as it is). ``early``: the analysis is still under way; the new row is marked so."""
    db.execute(
        "INSERT INTO deliveries (sop_instance_uid, object_type, result_uid, path,"
        " destination, state, created_at, updated_at, next_attempt_at, sent_at,"
        " unconfirmed_at, rule, early) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)"
        " ON CONFLICT (result_uid, destination) DO UPDATE SET path=excluded.path,"
        " state=excluded.state, attempts=0, last_error=NULL, created_at=excluded.created_at,"
        " next_attempt_at=excluded.next_attempt_at, updated_at=excluded.updated_at,"
        " replaced_at=NULL, unconfirmed_at=excluded.unconfirmed_at, rule=excluded.rule,"
        " early=excluded.early WHERE deliveries.early = 0",
        (sop_instance_uid, object_type, result_uid, path, dest,
         "sent" if local else "pending", now, now, now, now if local else None,
         None if local else unconfirmed, rule, int(early)))


def check_integrity(path: str | Path) -> bool:
    """SQLite's quick_check of the journal file, on a read-only connection of its own."""
    uri = f"file:{Path(path).resolve()}?mode=ro"
    try:
        db = sqlite3.connect(uri, uri=True, timeout=5.0)
    except sqlite3.Error:
        return False
    try:
        rows = db.execute("PRAGMA quick_check").fetchall()
    except sqlite3.Error:
        return False
    finally:
        db.close()
    return bool(rows) and rows[0][0] == "ok"


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT under the journal lock; ROLLBACK on error."""

    def __init__(self, db: sqlite3.Connection, lock: threading.RLock, *, flush: bool = True):
        self._db = db
        self._lock = lock
        self._flush = flush

    def __enter__(self) -> sqlite3.Connection:
        self._lock.acquire()
        try:
            if not self._flush:   # WAL: the next synchronous=FULL commit flushes this one too
                self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._restore()
            self._lock.release()
            raise
        return self._db

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._db.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            try:
                self._restore()
            finally:
                self._lock.release()

    def _restore(self) -> None:
        if not self._flush:
            self._db.execute("PRAGMA synchronous=FULL")
