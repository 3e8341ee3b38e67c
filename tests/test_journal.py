"""The journal of an earlier release opens, keeps its rows and gains the new columns."""
from __future__ import annotations

import sqlite3

import pytest

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


# ------------------------------------------------------------------ router mode

def _new(uid: str = "1.2.3", sha: str = "a", path: str = "spool/1.2/1.2.3.dcm"):
    from edge.journal import NewInstance
    return NewInstance(sop_instance_uid=uid, sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
                       study_instance_uid="1.2", series_instance_uid="1.2.4",
                       transfer_syntax="1.2.840.10008.1.2.1", calling_ae="XRAY", path=path,
                       sha256=sha * 64, size_bytes=100)


def _due(journal, dest="pacs", **kw):
    return [(d.object_type, d.state) for d in journal.due_deliveries(now=1e12, destination=dest, **kw)]


def test_the_image_is_queued_with_its_row_and_its_results_wait_for_it(tmp_path):
    journal = Journal(tmp_path / "j.sqlite3")
    assert journal.record_received(_new(), forward_to=("pacs", "archive"), now=10.0) == "new"
    rows = journal.source_deliveries("1.2.3")
    assert [(r.destination, r.state, r.result_uid) for r in rows] == [
        ("pacs", "pending", "1.2.3"), ("archive", "pending", "1.2.3")]
    journal.complete_analysis("1.2.3", findings={}, timings_ms={}, now=20.0,
                              plan=[("sr", "2.25.1", "results/sr.dcm", "pacs")])
    assert journal.source_deliveries("1.2.3")[0].state == "pending"   # not superseded by results
    assert _due(journal) == [("source", "pending")]                    # the SR waits for the image
    assert journal.next_delivery_time("pacs") == 10.0
    assert sorted(_due(journal, source_first=False)) == [("source", "pending"), ("sr", "pending")]
    source = journal.source_deliveries("1.2.3")[0]
    journal.mark_delivery_failed(source.id, "down", retry_at=30.0)
    assert _due(journal) == [("source", "retrying")]                  # across retries too
    assert journal.forwarding_summary("1.2.3") == "retrying"
    assert journal.mark_delivery_sent(source.id, path=source.path)
    assert _due(journal) == [("sr", "pending")]
    # the same bytes again: not forwarded twice
    assert journal.record_received(_new(), forward_to=("pacs", "archive")) == "duplicate"
    assert journal.source_deliveries("1.2.3")[0].state == "sent"
    journal.close()


def test_other_bytes_under_the_same_uid_are_forwarded_again_and_a_stale_answer_is_ignored(tmp_path):
    journal = Journal(tmp_path / "j.sqlite3")
    journal.record_received(_new(), forward_to=("pacs",))
    old = journal.source_deliveries("1.2.3")[0]
    journal.mark_in_flight([old.id])
    assert journal.record_received(_new(sha="b", path="spool/1.2/1.2.3.bbbb.dcm"),
                                   forward_to=("pacs",)) == "conflict"
    new = journal.source_deliveries("1.2.3")[0]
    assert (new.id, new.state, new.path, new.unconfirmed_at) == (old.id, "pending", "spool/1.2/1.2.3.bbbb.dcm", None)
    # the answer to the earlier version's send arrives now: it does not mark the new one sent
    assert not journal.mark_delivery_sent(old.id, path=old.path)
    assert journal.get_delivery(old.id).state == "pending"
    journal.mark_delivery_sent(new.id, path=new.path)
    journal.record_received(_new(sha="c", path="spool/1.2/1.2.3.cccc.dcm"), forward_to=("pacs",))
    assert journal.source_deliveries("1.2.3")[0].state == "pending"   # the PACS gets the latest
    journal.close()


def test_results_give_up_with_their_image_and_come_back_with_it(tmp_path):
    journal = Journal(tmp_path / "j.sqlite3")
    journal.record_received(_new(), forward_to=("pacs",))
    journal.complete_analysis("1.2.3", findings={}, timings_ms={},
                              plan=[("sr", "2.25.1", "results/sr.dcm", "pacs"),
                                    ("sc", "2.25.2", "results/sc.dcm", "pacs")])
    source = journal.source_deliveries("1.2.3")[0]
    journal.mark_delivery_failed(source.id, "too old", retry_at=None, hold_results=True)
    assert {d.object_type: d.state for d in journal.deliveries_for("1.2.3")} == {
        "source": "gave_up", "sr": "gave_up", "sc": "gave_up"}
    assert journal.retry_delivery(source.id)
    assert {d.object_type: d.state for d in journal.deliveries_for("1.2.3")} == {
        "source": "retrying", "sr": "retrying", "sc": "retrying"}
    assert _due(journal) == [("source", "retrying")]
    journal.mark_delivery_sent(source.id)
    assert journal.resend_instance_results("1.2.3") == 2      # results again, not the image
    assert journal.source_deliveries("1.2.3")[0].state == "sent"
    journal.close()


def test_storage_commitment_requests_survive_a_reopen(tmp_path):
    path = tmp_path / "j.sqlite3"
    journal = Journal(path)
    cid = journal.record_commitment("1.2.9", "XRAY", "10.0.0.7", [("1.2.840.10008.5.1.4.1.1.1.1", "1.2.3")],
                                    decide_by=50.0, now=10.0)
    journal.commitment_report_failed(cid, "modality unreachable", retry_at=12.0, now=11.0)
    journal.close()
    journal = Journal(path)
    [row] = journal.waiting_commitments(now=13.0)
    assert (row.id, row.transaction_uid, row.items, row.attempts) == (cid, "1.2.9", [("1.2.840.10008.5.1.4.1.1.1.1", "1.2.3")], 1)
    assert journal.waiting_commitments(now=11.5) == []         # not before its retry time
    journal.commitment_reported(cid, event_type=2, failed=[("1.2.3", 0x0112)])
    assert journal.count_commitments_by_state() == {"waiting": 0, "reported": 1, "gave_up": 0}
    assert journal.list_commitments()[0].to_dict()["failed"] == [["1.2.3", 0x0112]]
    journal.close()


def test_claiming_and_counting_an_attempt_do_not_wait_for_the_disk_and_the_rest_still_does(tmp_path):
    """Claiming an image and counting its analysis attempt are safe to lose in a power cut
    (the image is simply claimed again): they commit without waiting for the disk. Every
    other commit still flushes (synchronous=FULL, 2), also after those two."""
    journal = Journal(tmp_path / "j.sqlite3")
    full = lambda: journal._db.execute("PRAGMA synchronous").fetchone()[0]   # noqa: E731
    assert journal.record_received(_new()) == "new" and full() == 2
    row = journal.claim_next_instance()
    assert row is not None and row.state == "analyzing" and full() == 2
    assert journal.begin_inference(row.sop_instance_uid) == 1 and full() == 2
    journal.close()
    reopened = Journal(tmp_path / "j.sqlite3")   # what was committed is there
    assert reopened.find_instance("1.2.3").attempts == 1
    assert reopened.find_instance("1.2.3").state == "analyzing"


def test_results_queued_during_the_analysis_are_sent_once_across_a_restart(tmp_path):
    """The GSPS and SC are queued while the SR is built: a restart before the analysis
    completes does not send them again, a completed analysis of the image later does."""
    journal = Journal(tmp_path / "j.sqlite3")
    journal.record_received(_new())
    gsps, sc, sr = (("gsps", "2.25.1", "results/g.dcm", "pacs"), ("sc", "2.25.2", "results/c.dcm", "pacs"),
                    ("sr", "2.25.3", "results/s.dcm", "pacs"))
    journal.queue_early_results("1.2.3", [gsps, sc], now=20.0)
    with pytest.raises(ValueError):
        journal.queue_early_results("1.2.3", [("source", "1.2.3", "spool/x.dcm", "pacs")])
    assert sorted(_due(journal)) == [("gsps", "pending"), ("sc", "pending")]   # before the SR exists
    rows = {d.object_type: d for d in journal.deliveries_for("1.2.3")}
    journal.mark_delivery_sent(rows["gsps"].id)
    # killed while the SR was built; analysed again: the GSPS stays sent, the SC still due,
    # also when that analysis builds everything before queueing (its SR child still warming)
    journal.queue_early_results("1.2.3", [gsps, sc], now=30.0)
    assert {d.object_type: d.state for d in journal.deliveries_for("1.2.3")} == {"gsps": "sent", "sc": "pending"}
    journal.complete_analysis("1.2.3", findings={}, timings_ms={}, plan=[gsps, sc, sr], now=40.0)
    after = {d.object_type: d for d in journal.deliveries_for("1.2.3")}
    assert {k: (d.state, d.early, d.created_at) for k, d in after.items()} == {
        "gsps": ("sent", 0, 20.0), "sc": ("pending", 0, 20.0), "sr": ("pending", 0, 40.0)}
    # a later analysis (the technician's "analyse again") queues the same objects again
    journal.queue_early_results("1.2.3", [gsps], now=50.0)
    assert journal.deliveries_for("1.2.3")[0].state == "pending"
    # ... and one that ends failed withdraws what it queued and did not send
    journal.finish_instance("1.2.3", "failed", reason="internal error", now=60.0)
    ended = {d.object_type: d for d in journal.deliveries_for("1.2.3")}
    assert (ended["gsps"].state, ended["gsps"].replaced_at, ended["gsps"].early) == ("superseded", 60.0, 0)
    assert ended["sr"].state == "pending"     # of the completed analysis: untouched
    journal.close()
