"""Router mode with real peers: the X-ray machine sends only to the box, the box forwards
every image to the PACS with its results, and takes on storage commitment for the machine.

- Orthanc as the X-ray machine (C-STORE + storage commitment SCU) -> ``edge serve`` ->
  Orthanc as the PACS: the image and its SR/GSPS/SC reach the PACS once each, the image
  first; the machine hears "committed" only once the PACS holds the image; an unknown
  instance is reported as a failure.
- the PACS down while images arrive, and a SIGKILL of ``edge serve`` while it forwards:
  every image and result ends in the PACS exactly once (counted as C-STORE operations).
- skipped and failed images are forwarded too; a PACS that does not take a compressed
  syntax gets a lossless uncompressed copy; one that does gets the bytes as received.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import requests
from pydicom import dcmread

from conftest import make_dx, require_tool, wait_until
from poison import truncated_j2k
from support.router import (
    DX,
    RESULT_KIND,
    RouterEdge,
    RouterOrthanc,
    delivery_rows,
    pacs_objects,
    store_counts,
)

ROUTED = ["source", "sr", "gsps", "sc"]


@pytest.fixture
def peers(tmp_path):
    started: list = []
    yield started
    for peer in reversed(started):
        peer.stop()


def _uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _final(edge: RouterEdge, n: int = 3, timeout: float = 90) -> dict[str, dict]:
    jobs = wait_until(lambda: (lambda j: len(j) >= n and all(r["state"] in ("analyzed", "skipped", "failed")
                                                             for r in j) and j)(edge.jobs()),
                      timeout, interval=0.5, what=f"{n} finished images")
    return {j["sop_instance_uid"]: j for j in jobs}


def _all_sent(edge: RouterEdge, n: int) -> list[dict]:
    """Every delivery of ``n`` finished images sent (and at least the images themselves)."""
    def check():
        jobs = edge.jobs()
        if len(jobs) < n or any(j["state"] not in ("analyzed", "skipped", "failed") for j in jobs):
            return False
        rows = [d for j in jobs for d in j["deliveries"]]
        return (len([d for d in rows if d["object_type"] == "source"]) >= n
                and all(d["state"] == "sent" for d in rows) and rows)
    return wait_until(check, 120, interval=0.5, what="every image and result sent")


@pytest.mark.slow
def test_orthanc_modality_to_edge_to_orthanc_pacs_with_storage_commitment(tmp_path, peers):
    pacs = RouterOrthanc(tmp_path, "pacs", aet="PACS", count_stores=True)
    edge = RouterEdge(tmp_path, node={"commitment": "forwarded", "commitment_timeout_s": 60.0},
                      destinations=[pacs.destination(outputs=ROUTED)])
    modality = RouterOrthanc(tmp_path, "xray", aet="XRAY", modalities={"edge": ("EDGE_AI", edge.port)})
    edge.add_modalities([{"name": "xray", "ae_title": "XRAY", "host": "127.0.0.1", "port": modality.dicom_port}])
    peers += [pacs.start(), modality.start()]
    peers.append(edge.start())
    pa = make_dx(tmp_path / "pa.dcm", rows=1024, cols=1024, seed=1)
    lateral = make_dx(tmp_path / "lat.dcm", rows=1024, cols=1024, seed=2, view="LL",
                      study_uid=pa.StudyInstanceUID)
    ids = [modality.upload(tmp_path / "pa.dcm"), modality.upload(tmp_path / "lat.dcm")]

    transaction = modality.store_with_commitment("edge", ids)
    report = modality.wait_commitment(transaction, 90)
    assert report["Status"] == "Success", report
    assert {s["SOPInstanceUID"] for s in report["Success"]} == {pa.SOPInstanceUID, lateral.SOPInstanceUID}
    # "forwarded": committed only once the PACS holds both images
    assert store_counts(pacs)[pa.SOPInstanceUID] == 1 and store_counts(pacs)[lateral.SOPInstanceUID] == 1

    jobs = _final(edge, 2)
    assert jobs[pa.SOPInstanceUID]["state"] == "analyzed" and jobs[lateral.SOPInstanceUID]["state"] == "skipped"
    rows = _all_sent(edge, 2)
    results = {d["result_uid"]: d["object_type"] for d in rows if d["object_type"] != "source"}
    assert sorted(results.values()) == ["gsps", "sc", "sr"]
    time.sleep(2)   # any duplicate would land now
    counts = store_counts(pacs)
    expected = {pa.SOPInstanceUID, lateral.SOPInstanceUID, *results}
    assert set(counts) == expected and set(counts.values()) == {1}, counts
    order = pacs.stores()
    assert all(order.index(pa.SOPInstanceUID) < order.index(uid) for uid in results)   # image first
    held = pacs_objects(pacs)
    assert {t["StudyInstanceUID"] for t in held.values()} == {pa.StudyInstanceUID}      # one study
    assert {RESULT_KIND.get(t["SOPClassUID"]) for uid, t in held.items() if uid in results} == {"sr", "gsps", "sc"}
    assert held[pa.SOPInstanceUID]["SOPClassUID"] == DX

    # an instance the box never received is reported as a failure (0x0112)
    unknown = "1.2.826.0.1.3680043.8.498.999"
    transaction = modality.request_commitment("edge", [(DX, unknown), (DX, pa.SOPInstanceUID)])
    report = modality.wait_commitment(transaction, 30)
    assert report["Status"] == "Failure", report
    assert [(f["SOPInstanceUID"], f["FailureReason"]) for f in report["Failures"]] == [(unknown, 0x0112)]
    assert [s["SOPInstanceUID"] for s in report["Success"]] == [pa.SOPInstanceUID]

    # shown like any other delivery: `edge jobs`, the metrics
    text = edge.edge("jobs").stdout
    assert "image" in text.splitlines()[0] and text.count("sent") >= 4
    metrics = requests.get(f"http://127.0.0.1:{edge.web_port}/metrics", timeout=10).text
    assert 'edge_deliveries_by_type_in_state{destination="pacs",object_type="source",state="sent"} 2.0' in metrics
    assert 'edge_deliveries_total{destination="pacs",object_type="source",outcome="sent"} 2.0' in metrics
    assert 'edge_storage_commitments_total{outcome="committed"} 1.0' in metrics
    assert 'edge_storage_commitments_total{outcome="failures"} 1.0' in metrics



@pytest.mark.slow
def test_commitment_result_on_the_same_association_while_the_modality_waits(tmp_path, edge_server):
    """A modality that keeps its association open gets the result on it (no callback
    address needed); an instance the box does not hold is a failure, 0x0112."""
    import threading

    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import (
        DigitalXRayImageStorageForPresentation,
        StorageCommitmentPushModel,
        StorageCommitmentPushModelInstance,
    )

    srv = edge_server(node={"commitment": "stored"}).start()
    image = make_dx(rows=64, cols=64, seed=5)
    reports: list[tuple[int, Dataset]] = []
    got = threading.Event()

    def on_report(event):
        reports.append((event.event_type, event.event_information))
        got.set()
        return 0x0000, None

    ae = AE(ae_title="WAITING_DX")
    ae.add_requested_context(DigitalXRayImageStorageForPresentation)
    ae.add_requested_context(StorageCommitmentPushModel)
    assoc = ae.associate("127.0.0.1", srv.port, ae_title="EDGE_AI",
                         evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)])
    assert assoc.is_established
    try:
        assert assoc.send_c_store(image).Status == 0
        request = Dataset()
        request.TransactionUID = "1.2.826.0.1.3680043.8.498.4711"
        request.ReferencedSOPSequence = Sequence()
        for sop_instance in (image.SOPInstanceUID, "1.2.826.0.1.3680043.8.498.4712"):
            item = Dataset()
            item.ReferencedSOPClassUID = image.SOPClassUID
            item.ReferencedSOPInstanceUID = sop_instance
            request.ReferencedSOPSequence.append(item)
        status, _ = assoc.send_n_action(request, 1, StorageCommitmentPushModel,
                                        StorageCommitmentPushModelInstance)
        assert status.Status == 0
        assert got.wait(15), "no N-EVENT-REPORT on the open association"
    finally:
        assoc.release()
    event_type, info = reports[0]
    assert event_type == 2 and info.TransactionUID == request.TransactionUID
    assert [i.ReferencedSOPInstanceUID for i in info.ReferencedSOPSequence] == [image.SOPInstanceUID]
    assert [(i.ReferencedSOPInstanceUID, i.FailureReason) for i in info.FailedSOPSequence] == [
        ("1.2.826.0.1.3680043.8.498.4712", 0x0112)]


@pytest.mark.slow
def test_pacs_down_then_sigkill_while_forwarding_ends_with_exactly_one_copy(tmp_path, peers):
    """Images arrive while the PACS is down; the storage commitment waits (and survives the
    restart); the box is killed while it forwards; afterwards every image and result is in
    the PACS exactly once, and the modality hears "committed"."""
    pacs = RouterOrthanc(tmp_path, "pacs", aet="PACS", count_stores=True)
    edge = RouterEdge(tmp_path, node={"commitment": "forwarded", "commitment_timeout_s": 300.0},
                      destinations=[pacs.destination(outputs=ROUTED)],
                      extra={"delivery": {"max_backoff_s": 1.0}})
    modality = RouterOrthanc(tmp_path, "xray", aet="XRAY", modalities={"edge": ("EDGE_AI", edge.port)})
    edge.add_modalities([{"name": "xray", "ae_title": "XRAY", "host": "127.0.0.1", "port": modality.dicom_port}])
    peers += [modality.start(), edge.start(), pacs]
    files = []
    for i in range(3):
        files.append(tmp_path / f"img{i}.dcm")
        make_dx(files[-1], rows=1024, cols=1024, seed=30 + i, view="LL" if i == 2 else "PA")
    transaction = modality.store_with_commitment("edge", [modality.upload(f) for f in files])
    uids = [_uid(f) for f in files]
    _final(edge, 3)
    def waiting() -> bool:
        rows = delivery_rows(edge)
        images = {d["state"] for d in rows if d["object_type"] == "source"}
        results = {d["state"] for d in rows if d["object_type"] != "source"}
        return len(rows) == 3 + 6 and images == {"retrying"} and results == {"pending"}
    # the images are retried; their results wait for them (never tried before the image)
    wait_until(waiting, 60, what="images retrying, results waiting, while the PACS is down")
    assert modality.commitment(transaction)["Status"] == "Pending"   # not committed before the PACS has them

    pacs.start()
    wait_until(lambda: pacs.stores(), 30, interval=0.02, what="the first C-STORE at the PACS")
    edge.kill()                                   # while it forwards
    edge.start()
    report = modality.wait_commitment(transaction, 90)
    assert report["Status"] == "Success", report
    assert {s["SOPInstanceUID"] for s in report["Success"]} == set(uids)
    rows = _all_sent(edge, 3)
    time.sleep(2)   # any duplicate would land now
    counts = store_counts(pacs)
    results = {d["result_uid"] for d in rows if d["object_type"] != "source"}
    assert len(results) == 3 * 2                  # two PA images analysed, the lateral skipped
    assert set(counts) == set(uids) | results, counts
    assert set(counts.values()) == {1}, counts    # C-STORE operations, not unique UIDs


@pytest.mark.slow
def test_skipped_and_failed_images_are_forwarded_as_received_or_losslessly(tmp_path, peers):
    """Every image is forwarded, analysed or not: a lateral view (skipped), a JPEG 2000
    image the decoder cannot read (failed), a good JPEG 2000 image (analysed). The PACS that
    takes JPEG 2000 gets the bytes as received; the archive that takes only uncompressed
    syntaxes gets a decompressed copy under the same UID, pixel for pixel, and the
    undecodable image waits there with the reason."""
    from pydicom.uid import JPEG2000Lossless
    from support.router import ArchiveSCP, dataset_bytes

    require_tool("storescu")
    pacs = RouterOrthanc(tmp_path, "pacs", aet="PACS", count_stores=True)
    archive = ArchiveSCP(tmp_path)
    edge = RouterEdge(tmp_path, node={"commitment": "off"},
                      destinations=[pacs.destination(outputs=ROUTED),
                                    archive.destination(outputs=["source"])])
    peers += [pacs.start(), archive.start(), edge.start()]
    lateral = make_dx(tmp_path / "lat.dcm", rows=1024, cols=1024, seed=40, view="LL")
    broken = truncated_j2k(tmp_path / "broken.dcm", seed=41)
    good = make_dx(rows=1024, cols=1024, seed=42)
    pixels = good.pixel_array.copy()
    good.compress(JPEG2000Lossless)
    good.save_as(tmp_path / "good.dcm", enforce_file_format=True)
    for name, propose in (("lat", []), ("broken", ["-xv"]), ("good", ["-xv"])):
        out = edge.storescu(tmp_path / f"{name}.dcm", extra=propose)
        assert out.returncode == 0 and "Failed" not in out.stderr, out.stderr
    jobs = _final(edge)
    assert [jobs[u.SOPInstanceUID]["state"] for u in (lateral, broken, good)] == ["skipped", "failed", "analyzed"]

    def at_pacs():
        counts = store_counts(pacs)
        return len(counts) == 3 + 3 and counts
    counts = wait_until(at_pacs, 90, what="three images and three results at the PACS")
    time.sleep(1)
    assert set(store_counts(pacs).values()) == {1}
    for ds in (lateral, broken, good):
        assert counts[ds.SOPInstanceUID] == 1
    order = pacs.stores()
    assert order.index(good.SOPInstanceUID) == min(order.index(u) for u in counts if u not in (
        lateral.SOPInstanceUID, broken.SOPInstanceUID))   # the image before its results
    held = {t["SOPInstanceUID"]: oid for oid in pacs.get("/instances")
            for t in [pacs.get(f"/instances/{oid}/simplified-tags")]}
    syntax = pacs.get(f"/instances/{held[good.SOPInstanceUID]}/metadata?expand")["TransferSyntax"]
    assert syntax == JPEG2000Lossless                       # as received: not transcoded

    archived = wait_until(lambda: (lambda r: len(r) == 2 and r)(archive.received()), 60,
                          what="the lateral and the decompressed image at the archive")
    spool = edge.data_dir / "spool" / lateral.StudyInstanceUID / f"{lateral.SOPInstanceUID}.dcm"
    assert dataset_bytes(archived[lateral.SOPInstanceUID]) == dataset_bytes(spool)   # byte for byte
    copy = dcmread(archived[good.SOPInstanceUID])
    assert not copy.file_meta.TransferSyntaxUID.is_compressed
    assert copy.SOPInstanceUID == good.SOPInstanceUID and (copy.pixel_array == pixels).all()
    stuck = [d for j in edge.jobs() if j["sop_instance_uid"] == broken.SOPInstanceUID
             for d in j["deliveries"] if d["destination"] == "archive"]
    assert stuck[0]["state"] == "retrying" and "decompression failed" in stuck[0]["last_error"], stuck


# ---------------------------------------------------------------------------- no peers

def test_what_the_box_commits_to_and_why_not(tmp_path):
    """The decision behind each result: durable on the box, same SOP Class, and with
    "forwarded" acknowledged by every destination taking "source" within the time allowed."""
    from dicom_node.commitment import FailureReason
    from edge.commitment import CommitmentService
    from edge.config import config_from_dict
    from edge.journal import Journal, NewInstance

    config = config_from_dict({
        "storage": {"dir": str(tmp_path), "min_free_mb": 0},
        "node": {"commitment": "forwarded", "commitment_timeout_s": 30},
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 1,
                          "outputs": ROUTED}]})
    journal = Journal(config.journal_path)
    service = CommitmentService(config, journal)

    def receive(uid: str) -> None:
        (tmp_path / "spool").mkdir(exist_ok=True)
        (tmp_path / "spool" / f"{uid}.dcm").write_bytes(b"x")
        journal.record_received(NewInstance(uid, DX, "1.2", "1.2.4", "1.2.840.10008.1.2.1", "XRAY",
                                            f"spool/{uid}.dcm", "0" * 64, 1), forward_to=("pacs",))

    for uid in ("1.1", "1.2", "1.3"):
        receive(uid)
    (tmp_path / "spool" / "1.3.dcm").unlink()            # journaled, but the file is gone
    items = [(DX, "1.1"), (DX, "1.2"), (DX, "1.3"), (DX, "1.4"), ("1.2.840.10008.5.1.4.1.1.1", "1.1")]
    cid = journal.record_commitment("2.25.7", "XRAY", "127.0.0.1", items, decide_by=1000.0, now=900.0)
    row = journal.get_commitment(cid)
    assert service.evaluate(row, now=950.0) == (None, {})   # waits for the PACS
    first = journal.source_deliveries("1.1")[0]
    journal.mark_delivery_sent(first.id)
    second = journal.source_deliveries("1.2")[0]
    journal.mark_delivery_failed(second.id, "refused", retry_at=2000.0)
    report, reasons = service.evaluate(row, now=1001.0)     # time is up
    assert report.event_type == 2
    assert [i.sop_instance_uid for i in report.committed] == ["1.1"]
    assert [(i.sop_instance_uid, r) for i, r in report.failed] == [
        ("1.2", FailureReason.PROCESSING_FAILURE), ("1.3", FailureReason.NO_SUCH_OBJECT_INSTANCE),
        ("1.4", FailureReason.NO_SUCH_OBJECT_INSTANCE), ("1.1", FailureReason.CLASS_INSTANCE_CONFLICT)]
    assert "not confirmed by pacs within 30 s" in reasons["1.2"]
    ds = report.dataset()
    assert ds.TransactionUID == "2.25.7" and len(ds.FailedSOPSequence) == 4
    assert ds.FailedSOPSequence[0].FailureReason == 0x0110 and "RetrieveAETitle" not in ds
    journal.mark_delivery_failed(second.id, "refused", retry_at=None)
    report, reasons = service.evaluate(row, now=950.0)      # given up: no need to wait
    assert report is not None and reasons["1.2"] == "forwarding to pacs was given up"
    journal.close()


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
@pytest.mark.parametrize("change, comment", [
    (lambda ds: delattr(ds, "TransactionUID"), "TransactionUID"),
    (lambda ds: setattr(ds, "TransactionUID", "1.02.3"), "TransactionUID"),
    (lambda ds: setattr(ds, "ReferencedSOPSequence", []), "Empty ReferencedSOPSequence"),
    (lambda ds: delattr(ds.ReferencedSOPSequence[0], "ReferencedSOPInstanceUID"), "ReferencedSOPSequence"),
])
def test_a_malformed_request_is_refused_naming_what_is_wrong(change, comment):
    from pydicom.dataset import Dataset

    from dicom_node.commitment import CommitmentRequestError, parse_action_information

    ds = Dataset()
    ds.TransactionUID = "2.25.9"
    item = Dataset()
    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = DX, "1.2.3"
    ds.ReferencedSOPSequence = [item]
    assert parse_action_information(ds)[0] == "2.25.9"
    change(ds)
    with pytest.raises(CommitmentRequestError) as err:
        parse_action_information(ds)
    assert err.value.status == 0x0115 and comment in err.value.comment
