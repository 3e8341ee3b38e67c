"""One UID, one content: different content never reuses a result UID, an amended SR names
the SR it replaces, and an image re-sent under its UID with other bytes is a conflict that
keeps both versions."""
from __future__ import annotations

from collections import Counter

import pytest
from pydicom import dcmread

from conftest import OrthancPACS, make_dx, require_tool, wait_until

pytestmark = pytest.mark.slow


def _results(srv, uid: str) -> dict[str, dict]:
    """The current result objects of an instance, by type, once all are delivered."""
    from edge.journal import Journal
    journal = Journal(srv.data_dir / "journal.sqlite3")
    try:
        rows = [d for d in journal.deliveries_for(uid) if d.current]
        return {d.object_type: {"uid": d.result_uid, "path": srv.data_dir / d.path, "state": d.state}
                for d in rows}
    finally:
        journal.close()


def _delivered(srv, uid: str, exclude: set[str] = frozenset()):
    res = _results(srv, uid)
    ok = len(res) == 3 and all(r["state"] == "sent" for r in res.values()) \
        and not ({r["uid"] for r in res.values()} & exclude)
    return ok and res


def test_resent_with_other_pixels_and_reanalysed_after_a_threshold_change(tmp_path, edge_server):
    require_tool("storescu")
    pacs = OrthancPACS(tmp_path, count_stores=True).start()
    try:
        srv = edge_server(destinations=[pacs.destination()]).start()
        first = tmp_path / "v1.dcm"
        ds = make_dx(first, rows=1024, cols=1024, seed=301)
        uid = str(ds.SOPInstanceUID)
        assert srv.storescu(first).returncode == 0
        v1 = wait_until(lambda: _delivered(srv, uid), 90, what="first results delivered")

        # the modality sends the same SOP Instance UID again with other pixels
        second = tmp_path / "v2.dcm"
        make_dx(second, rows=1024, cols=1024, seed=302, sop_uid=uid, study_uid=str(ds.StudyInstanceUID))
        assert srv.storescu(second).returncode == 0
        old = {r["uid"] for r in v1.values()}
        v2 = wait_until(lambda: _delivered(srv, uid, exclude=old), 90, what="new results delivered")
        assert all(v2[k]["uid"] != v1[k]["uid"] for k in v1), "other content under the same UIDs"
        job = [j for j in srv.jobs() if j["sop_instance_uid"] == uid][0]
        assert job["conflicts"] == 1
        spool = sorted((srv.data_dir / "spool").rglob(f"{uid}*.dcm"))
        assert len(spool) == 2, "both versions of the image are kept"
        sr = dcmread(v2["sr"]["path"])
        predecessors = [item.ReferencedSOPInstanceUID
                        for study in sr.PredecessorDocumentsSequence
                        for series in study.ReferencedSeriesSequence
                        for item in series.ReferencedSOPSequence]
        assert predecessors == [v1["sr"]["uid"]]

        # the threshold changes and the image is analysed again: the SR says something else
        srv.stop()
        srv2 = edge_server(destinations=[pacs.destination()], extra={"models": {"tb_threshold": 0.001}})
        srv2.start()
        from edge.journal import Journal
        journal = Journal(srv.data_dir / "journal.sqlite3")
        assert journal.requeue_instance(uid)   # the technician's "analyze again"
        journal.close()
        before = {r["uid"] for r in v2.values()}
        v3 = wait_until(lambda: _delivered(srv2, uid, exclude=before), 90, what="re-analysed results")
        assert v3["sr"]["uid"] != v2["sr"]["uid"]
        replaced = [d for d in _all_deliveries(srv2, uid) if not d.current]
        assert {d.result_uid for d in replaced} >= before - {v3["gsps"]["uid"], v3["sc"]["uid"]}
        srv2.stop()
        stores = Counter(pacs.stores())
        assert not [u for u, n in stores.items() if n > 1], "an object was stored twice"
        assert stores[v1["sr"]["uid"]] == stores[v2["sr"]["uid"]] == stores[v3["sr"]["uid"]] == 1
    finally:
        pacs.stop()


def _all_deliveries(srv, uid):
    from edge.journal import Journal
    journal = Journal(srv.data_dir / "journal.sqlite3")
    try:
        return journal.deliveries_for(uid)
    finally:
        journal.close()
