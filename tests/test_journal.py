"""The journal of an earlier release opens, keeps its rows and gains the new columns."""
from __future__ import annotations

import sqlite3

from edge.journal import SCHEMA_VERSION, Journal

# The journal schema of the first release (0.1.0), as boxes in the field have it.
FIRST_RELEASE_SCHEMA = """
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
"""



def test_a_journal_from_the_first_release_is_upgraded_in_place(tmp_path):
    path = tmp_path / "journal.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(FIRST_RELEASE_SCHEMA)
    db.execute("INSERT INTO instances (sop_instance_uid, sop_class_uid, study_instance_uid,"
               " series_instance_uid, calling_ae, path, sha256, size_bytes, received_at, updated_at)"
               " VALUES ('1.2.3', '1.2.840.10008.5.1.4.1.1.1.1', '1.2', '1.2.4', 'XRAY',"
               " 'spool/1.2/1.2.3.dcm', ?, 100, 1.0, 1.0)", ("a" * 64,))
    db.execute("INSERT INTO deliveries (sop_instance_uid, object_type, result_uid, path, destination,"
               " created_at, updated_at, next_attempt_at) VALUES ('1.2.3', 'sr', '2.25.9',"
               " 'results/sr.dcm', 'pacs', 1.0, 1.0, 1.0)")
    db.commit()
    db.close()
    journal = Journal(path)
    row = journal.find_instance("1.2.3")
    assert row.calling_ae == "XRAY" and row.conflicts == 0 and row.not_before is None
    assert [d.result_uid for d in journal.deliveries_for("1.2.3")] == ["2.25.9"]
    assert journal.deliveries_for("1.2.3")[0].current
    journal.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    db.close()
