"""What a TB screening programme keeps in the journal: threshold calibrations (an audit trail
of every threshold ``edge calibrate --apply`` wrote to the config) and the time-range
queries the referral list and the daily figures read.

``Journal`` gets these methods from ``ScreeningRecords``; the ``calibrations`` table is
part of its schema (created at open in a journal of an older version: schema version 4).
A calibration row holds counts and figures only, never patient data: the outcomes file is
named by its SHA-256.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Iterable

CALIBRATION_SCHEMA = """
CREATE TABLE IF NOT EXISTS calibrations (
    id                 INTEGER PRIMARY KEY AUTOINCREMENT,
    applied_at         REAL NOT NULL,
    threshold          REAL NOT NULL,
    previous_threshold REAL,
    rule               TEXT NOT NULL,
    rule_value         REAL NOT NULL,
    data_sha256        TEXT NOT NULL,
    data_name          TEXT NOT NULL DEFAULT '',
    people             INTEGER NOT NULL,
    positives          INTEGER NOT NULL,
    negatives          INTEGER NOT NULL,
    config_path        TEXT NOT NULL DEFAULT '',
    summary_json       TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class CalibrationRow:
    """One applied calibration: when, on what data, by which rule, with what result."""
    id: int
    applied_at: float
    threshold: float
    previous_threshold: float | None
    rule: str                 # "target_sensitivity" | "max_referral_rate"
    rule_value: float
    data_sha256: str          # of the outcomes file as read
    data_name: str            # its file name (no folders)
    people: int
    positives: int
    negatives: int
    config_path: str
    summary_json: str         # AUC, operating point and intervals, expected referral band

    @property
    def summary(self) -> dict[str, Any]:
        return json.loads(self.summary_json)

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in (
            "id", "applied_at", "threshold", "previous_threshold", "rule", "rule_value",
            "data_sha256", "data_name", "people", "positives", "negatives", "config_path")}
        out["summary"] = self.summary
        return out


class ScreeningRecords:
    """Calibration audit rows and time-range reads; mixed into ``Journal``."""

    def record_calibration(self, *, threshold: float, previous_threshold: float | None, rule: str,
                           rule_value: float, data_sha256: str, data_name: str, people: int,
                           positives: int, negatives: int, config_path: str,
                           summary: dict[str, Any], now: float | None = None) -> int:
        """Keep an applied calibration (committed, ``synchronous=FULL``); returns its id."""
        now = time.time() if now is None else now
        with self._tx() as db:   # type: ignore[attr-defined]
            cur = db.execute(
                "INSERT INTO calibrations (applied_at, threshold, previous_threshold, rule, rule_value,"
                " data_sha256, data_name, people, positives, negatives, config_path, summary_json)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (now, float(threshold), previous_threshold, rule, float(rule_value), data_sha256,
                 data_name, int(people), int(positives), int(negatives), config_path,
                 json.dumps(summary, sort_keys=True)))
            return int(cur.lastrowid)

    def forget_calibration(self, calibration_id: int) -> None:
        """Remove a calibration row whose config change could not be written after all."""
        with self._tx() as db:   # type: ignore[attr-defined]
            db.execute("DELETE FROM calibrations WHERE id=?", (calibration_id,))

    def calibrations(self, limit: int = 20) -> list[CalibrationRow]:
        """Applied calibrations, newest first."""
        rows = self._query("SELECT * FROM calibrations ORDER BY applied_at DESC, id DESC LIMIT ?",   # type: ignore[attr-defined]
                           (int(limit),))
        return [CalibrationRow(**dict(r)) for r in rows]

    def instances_between(self, start: float, end: float, *, states: Iterable[str] = ()) -> list:
        """Instances received in [start, end) (epoch seconds), oldest first; only those in
        ``states`` when given."""
        from .journal import InstanceRow

        sql = "SELECT * FROM instances WHERE received_at >= ? AND received_at < ?"
        args: list[Any] = [float(start), float(end)]
        states = list(states)
        if states:
            sql += f" AND state IN ({','.join('?' * len(states))})"
            args += states
        rows = self._query(sql + " ORDER BY received_at, rowid", args)   # type: ignore[attr-defined]
        return [InstanceRow(**dict(r)) for r in rows]
