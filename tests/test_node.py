"""The DICOM front door against real DCMTK peers: nothing acknowledged is ever lost."""
from __future__ import annotations

import hashlib
import os
import random

import pytest
from pydicom import dcmread
from pynetdicom import AE

from conftest import make_dx, require_tool


def _send_dataset(port: int, ds, calling: str = "FUZZER", mangle=None, monkeypatch=None):
    """C-STORE ``ds``; ``mangle(bytes) -> bytes`` corrupts the encoded stream on the wire."""
    if mangle is not None:
        import pynetdicom.association as association
        original = association.encode
        monkeypatch.setattr(association, "encode", lambda *a, **k: mangle(original(*a, **k)))
    ae = AE(ae_title=calling)
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="EDGE_AI")
    assert assoc.is_established
    try:
        return assoc.send_c_store(ds)
    finally:
        assoc.release()
        if monkeypatch is not None:
            monkeypatch.undo()


def test_echoscu_and_storescu_images_are_journaled(tmp_path, edge_server):
    require_tool("storescu")
    srv = edge_server().start()
    echo = srv.storescu  # same binary family; echoscu below
    res = __import__("subprocess").run(["echoscu", "-aet", "MODALITY", "-aec", "EDGE_AI",
                                        "127.0.0.1", str(srv.port)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    files = [tmp_path / f"img{i}.dcm" for i in range(5)]
    sent = {make_dx(f, seed=i).SOPInstanceUID for i, f in enumerate(files)}
    out = echo(*files)
    assert out.returncode == 0, out.stderr
    jobs = srv.jobs()
    assert {j["sop_instance_uid"] for j in jobs} == sent
    assert all(j["state"] in ("received", "analyzing", "analyzed", "skipped", "failed") for j in jobs)
    assert all(j["calling_ae"] == "MODALITY" for j in jobs)
    for key in ("sop_instance_uid", "study_instance_uid", "state", "reason", "received_at"):
        assert all(key in j for j in jobs)


def test_sigkill_after_ack_loses_nothing(tmp_path, edge_server):
    require_tool("storescu")
    srv = edge_server().start()
    files = [tmp_path / f"k{i}.dcm" for i in range(8)]
    digests = {}
    for i, f in enumerate(files):
        ds = make_dx(f, seed=100 + i, rows=512, cols=512)
        digests[ds.SOPInstanceUID] = ds
    out = srv.storescu(*files)
    assert out.returncode == 0, out.stderr
    srv.kill()                      # SIGKILL right after storescu returned success
    srv.start()
    jobs = {j["sop_instance_uid"]: j for j in srv.jobs()}
    assert set(jobs) == set(digests)
    spooled = list((srv.data_dir / "spool").rglob("*.dcm"))
    assert len(spooled) == len(files)
    for path in spooled:
        ds = dcmread(path)
        assert ds.SOPInstanceUID in digests
        assert ds.PixelData == digests[ds.SOPInstanceUID].PixelData


def test_calling_ae_outside_allowlist_is_rejected(tmp_path, edge_server):
    require_tool("storescu")
    srv = edge_server(node={"allowed_calling_aets": ["XRAY_ROOM1"]}).start()
    f = tmp_path / "a.dcm"
    make_dx(f)
    bad = srv.storescu(f, calling="INTRUDER")
    assert bad.returncode != 0
    assert "reject" in (bad.stderr + bad.stdout).lower()
    assert srv.jobs() == []
    good = srv.storescu(f, calling="XRAY_ROOM1")
    assert good.returncode == 0, good.stderr
    assert len(srv.jobs()) == 1


def test_wrong_called_ae_is_rejected(tmp_path, edge_server):
    require_tool("storescu")
    srv = edge_server().start()
    f = tmp_path / "a.dcm"
    make_dx(f)
    out = srv.storescu(f, called="SOMEONE_ELSE")
    assert out.returncode != 0
    assert srv.jobs() == []


@pytest.mark.parametrize("fuzz", ["pixels-short", "stream-cut-header", "stream-cut-pixels",
                                  "random-bytes", "random-tail", "missing-study-uid"])
def test_fuzzed_and_truncated_datasets_get_failure_and_server_keeps_serving(
        tmp_path, edge_server, monkeypatch, fuzz):
    srv = edge_server().start()
    ds = make_dx(seed=1)
    rnd = random.Random(hash(fuzz) & 0xFFFF)
    mangle = {
        "stream-cut-header": lambda b: b[:300],
        "stream-cut-pixels": lambda b: b[: len(b) - 40000],
        "random-bytes": lambda b: bytes(rnd.randrange(256) for _ in range(5000)),
        "random-tail": lambda b: b[:600] + bytes(rnd.randrange(256) for _ in range(3000)),
    }.get(fuzz)
    if fuzz == "pixels-short":
        ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]
    if fuzz == "missing-study-uid":
        del ds.StudyInstanceUID
    rsp = _send_dataset(srv.port, ds, mangle=mangle, monkeypatch=monkeypatch)
    assert "Status" in rsp, "no C-STORE response: the server dropped the association"
    assert 0xA900 <= rsp.Status <= 0xCFFF, hex(rsp.Status)
    assert rsp.get("ErrorComment"), "a failure must say why"
    assert srv.jobs() == []
    assert not list((srv.data_dir / "spool").rglob("*.dcm"))
    assert not list((srv.data_dir / "spool").rglob("*.tmp"))
    # and a good image still goes through
    good = make_dx(seed=4)
    assert _send_dataset(srv.port, good).Status == 0
    assert [j["sop_instance_uid"] for j in srv.jobs()] == [good.SOPInstanceUID]


def test_disk_reserve_refusal_answers_a700_and_stores_nothing(tmp_path, edge_server):
    srv = edge_server(storage={"min_free_mb": 1024 * 1024 * 1024}).start()
    rsp = _send_dataset(srv.port, make_dx(seed=5))
    assert rsp.Status == 0xA700
    assert "disk" in str(rsp.get("ErrorComment", "")).lower()
    assert srv.jobs() == []
    assert not list((srv.data_dir / "spool").rglob("*"))


def test_resent_instance_is_recorded_once(tmp_path, edge_server):
    require_tool("storescu")
    srv = edge_server().start()
    f = tmp_path / "a.dcm"
    make_dx(f, seed=9)
    for _ in range(3):
        assert srv.storescu(f).returncode == 0
    jobs = srv.jobs()
    assert len(jobs) == 1
    spooled = list((srv.data_dir / "spool").rglob("*.dcm"))
    assert len(spooled) == 1
    assert hashlib.sha256(spooled[0].read_bytes()).hexdigest()


def test_serve_refuses_to_start_with_invalid_config(tmp_path):
    import subprocess
    import sys
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[node]\nport = "eleven"\n')
    out = subprocess.run([sys.executable, "-m", "edge.cli", "serve", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "node.port" in out.stderr
