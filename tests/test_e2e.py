"""End to end with real peers: storescu (X-ray machine) -> edge serve -> Orthanc (PACS)."""
from __future__ import annotations

import collections
import sqlite3
import time

import pytest

from conftest import make_dx, require_tool, wait_until

pytestmark = pytest.mark.slow

SR, GSPS, SC = "1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.11.1", "1.2.840.10008.5.1.4.1.1.7"


def _images(tmp_path, n, seed0=0, **kw):
    files, sources = [], {}
    for i in range(n):
        f = tmp_path / f"src{seed0 + i}.dcm"
        ds = make_dx(f, rows=1024, cols=1024, seed=seed0 + i, **kw)
        files.append(f)
        sources[ds.SOPInstanceUID] = ds
    return files, sources


def _results_by_source(pacs, sources) -> dict[str, collections.Counter]:
    """For each source SOP UID: how many SR, GSPS and SC the PACS holds for it."""
    out = {uid: collections.Counter() for uid in sources}
    study_of = {uid: ds.StudyInstanceUID for uid, ds in sources.items()}
    for tags in pacs.instances():
        cls = tags.get("SOPClassUID")
        if cls not in (SR, GSPS, SC):
            continue
        kind = {SR: "sr", GSPS: "gsps", SC: "sc"}[cls]
        for uid, study in study_of.items():
            # each source is in its own study here, so the study links result to source
            if tags.get("StudyInstanceUID") == study:
                out[uid][kind] += 1
    return out


def _complete(pacs, sources):
    got = _results_by_source(pacs, sources)
    return all(c == {"sr": 1, "gsps": 1, "sc": 1} for c in got.values()) and got


def test_results_reach_the_pacs_in_the_source_study(tmp_path, edge_server, orthanc):
    require_tool("storescu")
    pacs = orthanc.start()
    srv = edge_server(destinations=[pacs.destination()]).start()
    files, sources = _images(tmp_path, 2, patient_name="Nguyễn^Văn An", charset="ISO_IR 192")
    assert srv.storescu(*files).returncode == 0
    wait_until(lambda: _complete(pacs, sources), 90, what="SR+GSPS+SC in Orthanc")
    for tags in pacs.instances():
        if tags["SOPClassUID"] in (SR, GSPS, SC):
            assert tags["PatientName"] == "Nguyễn^Văn An"
    jobs = srv.jobs()
    assert {j["state"] for j in jobs} == {"analyzed"}
    assert {j["delivery"] for j in jobs} == {"sent"}
    from edge.report_worker import SRWorker
    if SRWorker.useful():   # the SR is built in a child: the GSPS and SC go out meanwhile
        wait_until(lambda: "SRs are built in a child process" in srv.log.read_text(), 60, what="the SR child")
        more, more_sources = _images(tmp_path, 1, seed0=7)
        assert srv.storescu(*more).returncode == 0
        wait_until(lambda: _complete(pacs, more_sources), 90, what="SR+GSPS+SC in Orthanc")
        db = sqlite3.connect(srv.data_dir / "journal.sqlite3")
        (analyzed_at,), = db.execute("SELECT analyzed_at FROM instances WHERE sop_instance_uid=?", list(more_sources))
        queued = dict(db.execute("SELECT object_type, created_at FROM deliveries WHERE sop_instance_uid=?",
                                 list(more_sources)))
        db.close()
        assert queued["gsps"] < analyzed_at and queued["sc"] < analyzed_at and queued["sr"] == analyzed_at


def test_pacs_down_then_back_delivers_once(tmp_path, edge_server, orthanc):
    require_tool("storescu")
    srv = edge_server(destinations=[orthanc.destination()],
                      extra={"delivery": {"max_backoff_s": 2.0}}).start()
    files, sources = _images(tmp_path, 2, seed0=10)
    assert srv.storescu(*files).returncode == 0
    wait_until(lambda: {j["delivery"] for j in srv.jobs()} == {"retrying"}, 90,
               what="deliveries retrying while the PACS is down")
    orthanc.start()
    wait_until(lambda: _complete(orthanc, sources), 90, what="delivery after the PACS came back")
    time.sleep(3)   # any duplicate sends would land now
    results = [t for t in orthanc.instances() if t["SOPClassUID"] in (SR, GSPS, SC)]
    assert len(results) == 3 * len(sources)
    assert {j["delivery"] for j in srv.jobs()} == {"sent"}


@pytest.mark.parametrize("kill_after", [0.3, 1.5])
def test_sigkill_during_analysis_or_delivery_ends_with_exactly_one_copy(
        tmp_path, edge_server, orthanc, kill_after):
    require_tool("storescu")
    pacs = orthanc.start()
    srv = edge_server(destinations=[pacs.destination()]).start()
    files, sources = _images(tmp_path, 4, seed0=20)
    assert srv.storescu(*files).returncode == 0
    time.sleep(kill_after)
    srv.kill()
    srv.start()
    wait_until(lambda: _complete(pacs, sources), 120, what="all results after restart")
    time.sleep(2)
    results = [t for t in pacs.instances() if t["SOPClassUID"] in (SR, GSPS, SC)]
    assert len(results) == 3 * len(sources)
    assert len({t["SOPInstanceUID"] for t in results}) == len(results)
