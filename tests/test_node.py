"""The DICOM front door against real DCMTK peers: nothing acknowledged is ever lost."""
from __future__ import annotations

import os
import random
import socket
import struct
import subprocess
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, JPEGLosslessSV1
from pynetdicom import AE

from conftest import make_dx, require_tool, wait_until
from dicom_node.scp import SUCCESS, SCPSettings, StoreResult, StoreSCP
from dicom_node.sop import DX_FOR_PRESENTATION


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
    res = subprocess.run(["echoscu", "-aet", "MODALITY", "-aec", "EDGE_AI", "127.0.0.1", str(srv.port)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    files = [tmp_path / f"img{i}.dcm" for i in range(5)]
    sent = {make_dx(f, seed=i).SOPInstanceUID for i, f in enumerate(files)}
    out = srv.storescu(*files)
    assert out.returncode == 0, out.stderr
    jobs = srv.jobs()
    assert {j["sop_instance_uid"] for j in jobs} == sent
    # valid images never fail (these small ones may be skipped by triage for their size)
    assert {j["state"] for j in jobs} <= {"received", "analyzing", "analyzed", "skipped"}, jobs
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
    source = make_dx(f, seed=9)
    for _ in range(3):
        assert srv.storescu(f).returncode == 0
    jobs = srv.jobs()
    assert len(jobs) == 1
    spooled = list((srv.data_dir / "spool").rglob("*.dcm"))
    assert len(spooled) == 1
    kept = dcmread(spooled[0])
    assert kept.SOPInstanceUID == jobs[0]["sop_instance_uid"] == source.SOPInstanceUID
    assert kept.PixelData == source.PixelData


def test_serve_refuses_to_start_with_invalid_config(tmp_path):
    import subprocess
    import sys
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[node]\nport = "eleven"\n')
    out = subprocess.run([sys.executable, "-m", "edge.cli", "serve", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "node.port" in out.stderr


# ------------------------------------------------------------------ hostile and broken peers

@pytest.fixture(scope="module")
def association_request() -> bytes:
    """The bytes of a real A-ASSOCIATE-RQ (MODALITY -> EDGE_AI, DX), captured with a socket."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)
        ae = AE(ae_title="MODALITY")
        ae.acse_timeout = 2
        ae.add_requested_context(DX_FOR_PRESENTATION, ExplicitVRLittleEndian)
        requester = threading.Thread(target=ae.associate, daemon=True,
                                     args=("127.0.0.1", listener.getsockname()[1]),
                                     kwargs={"ae_title": "EDGE_AI"})
        requester.start()
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(10)
            data = b""
            while len(data) < 6 or len(data) < 6 + struct.unpack(">L", data[2:6])[0]:
                data += conn.recv(65536)
        requester.join(10)
    assert data[0] == 0x01 and len(data) > 100
    return data


class Dribbler(threading.Thread):
    """A client that connects from ``source``, sends ``prefix`` at once, then ``data`` one
    byte every ``interval`` s, reading what comes back, until the server closes it."""

    def __init__(self, port: int, data: bytes, *, prefix: bytes = b"", source: str = "127.0.0.1",
                 interval: float = 0.25, give_up_s: float = 15.0):
        super().__init__(daemon=True)
        self.data, self.prefix, self.interval, self.give_up_s = data, prefix, interval, give_up_s
        self.sock = socket.socket()
        self.sock.bind((source, 0))
        self.sock.connect(("127.0.0.1", port))
        self.opened = time.monotonic()
        self.closed_after: float | None = None   # None: still open when it gave up
        self.start()

    def run(self) -> None:
        s = self.sock
        s.settimeout(self.interval)
        try:
            s.sendall(self.prefix)
            sent = 0
            while time.monotonic() - self.opened < self.give_up_s:
                if sent < len(self.data):
                    s.send(self.data[sent:sent + 1])
                    sent += 1
                try:
                    if s.recv(65536) == b"":
                        break
                except socket.timeout:
                    continue
            else:
                return
        except OSError:    # reset by the server
            pass
        finally:
            s.close()
        self.closed_after = time.monotonic() - self.opened


@pytest.fixture
def node():
    """An in-process StoreSCP on a free port that accepts everything it is handed."""
    started: list[StoreSCP] = []

    def start(**settings) -> tuple[StoreSCP, list]:
        received: list = []

        def on_instance(instance):
            received.append(instance)
            return StoreResult(SUCCESS)

        scp = StoreSCP(SCPSettings(host="127.0.0.1", port=0, **settings), on_instance).start()
        started.append(scp)
        return scp, received

    yield start
    for scp in started:
        scp.shutdown()


@pytest.mark.parametrize("sources", ["eight-addresses", "one-address"])
def test_slow_clients_cannot_keep_a_modality_out(tmp_path, edge_server, association_request, sources):
    """Eight connections (= max_associations) dribbling an association request used to hold
    the port for as long as they liked; from one address, those beyond
    max_associations_per_peer are refused at once."""
    require_tool("storescu")
    request_timeout = 1.5
    srv = edge_server(node={"max_associations": 8, "max_associations_per_peer": 4,
                            "association_request_timeout_s": request_timeout,
                            "pdu_timeout_s": 2.0}).start()
    sources_ = ([f"127.0.0.{2 + i}" for i in range(8)] if sources == "eight-addresses"
                else ["127.0.0.2"] * 8)
    dribblers = [Dribbler(srv.port, association_request, source=a) for a in sources_]
    time.sleep(0.5)   # all connected, none has completed its request (that would take ~60 s)
    f = tmp_path / "a.dcm"
    ds = make_dx(f, seed=21)
    started = time.monotonic()
    out = srv.storescu(f)
    assert out.returncode == 0, out.stderr + out.stdout
    assert time.monotonic() - started < 10
    for d in dribblers:
        d.join(20)
    closed = sorted(d.closed_after if d.closed_after is not None else float("inf") for d in dribblers)
    assert closed[-1] < request_timeout + 1.5, closed
    if sources == "one-address":
        assert closed[3] < 0.5, closed        # four refused on accept
    assert [j["sop_instance_uid"] for j in srv.jobs()] == [ds.SOPInstanceUID]


def test_peers_that_stall_after_associating_are_closed(node, association_request):
    """After the association: a PDU dribbled one byte at a time, silence, and a PDU that
    announces 200 MB are all ended within pdu_timeout_s; a real C-STORE still works."""
    pdu_timeout = 1.5
    scp, received = node(pdu_timeout_s=pdu_timeout, association_request_timeout_s=5.0)
    p_data = struct.pack(">BBL", 0x04, 0, 100) + bytes(100)
    dribbling = Dribbler(scp.port, p_data, prefix=association_request)
    idle = Dribbler(scp.port, b"", prefix=association_request)

    announced = 200 * 1024 * 1024
    with socket.create_connection(("127.0.0.1", scp.port)) as flood:
        flood.settimeout(5)
        flood.sendall(association_request + struct.pack(">BBL", 0x04, 0, announced))
        sent, chunk = 0, bytes(1024 * 1024)
        with pytest.raises(OSError):   # reset (or timed out: never drained) long before 200 MB
            while sent < announced:
                sent += flood.send(chunk)
        assert sent < announced // 4

    for d in (dribbling, idle):
        d.join(20)
        assert d.closed_after is not None and d.closed_after < pdu_timeout + 1.5, d.closed_after
    good = make_dx(seed=22)
    assert _send_dataset(scp.port, good).Status == 0
    assert [r.sop_instance_uid for r in received] == [good.SOPInstanceUID]


def test_max_associations_counts_associations_not_half_open_connections(node, association_request):
    scp, _ = node(max_associations=2, association_request_timeout_s=5.0)
    half_open = Dribbler(scp.port, association_request)

    def associate():
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(DX_FOR_PRESENTATION, ExplicitVRLittleEndian)
        return ae.associate("127.0.0.1", scp.port, ae_title="EDGE_AI")

    first, second = associate(), associate()
    assert first.is_established and second.is_established   # the half-open one holds no slot
    third = associate()
    assert third.is_rejected                  # A-ASSOCIATE-RJ: local limit exceeded (transient)
    assert half_open.is_alive()               # still within its request timeout, not evicted
    first.release()
    wait_until(lambda: associate_and_release(associate), 5, what="a slot again after the release")
    second.release()


def associate_and_release(associate) -> bool:
    assoc = associate()
    ok = assoc.is_established
    if ok:
        assoc.release()
    return ok


def test_an_image_over_the_size_limit_is_refused_and_the_node_keeps_serving(tmp_path, edge_server):
    require_tool("storescu")
    srv = edge_server(node={"max_instance_mb": 1}).start()
    big = tmp_path / "big.dcm"
    make_dx(big, rows=1024, cols=1024, seed=31)       # 2 MB of pixels
    out = srv.storescu(big, extra=["-v"])
    assert out.returncode != 0
    assert "OutOfResources" in out.stdout + out.stderr
    # what the modality reads, on one association: a refusal that says why, then a success
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(DX_FOR_PRESENTATION, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", srv.port, ae_title="EDGE_AI")
    assert assoc.is_established
    try:
        rsp = assoc.send_c_store(make_dx(rows=1024, cols=1024, seed=32))
        assert rsp.Status == 0xA700
        comment = str(rsp.ErrorComment)
        assert "too large" in comment and "limit 1 MB" in comment, comment
        good = make_dx(seed=33)
        assert assoc.send_c_store(good).Status == 0
    finally:
        assoc.release()
    assert [j["sop_instance_uid"] for j in srv.jobs()] == [good.SOPInstanceUID]
    assert len(list((srv.data_dir / "spool").rglob("*.dcm"))) == 1


def test_data_beyond_the_size_limit_is_not_buffered(tmp_path, node):
    """A 32 MB image against a 1 MB limit: the node's memory grows by about the limit, not
    by the image (pynetdicom alone would buffer all of it before the handler runs)."""
    require_tool("storescu")
    scp, received = node(max_instance_bytes=1024 * 1024)
    f = tmp_path / "huge.dcm"
    ds = make_dx(rows=64, cols=64, seed=34)
    ds.Rows = ds.Columns = 4096
    ds.PixelData = bytes(4096 * 4096 * 2)
    ds.save_as(f, enforce_file_format=True)
    del ds
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        out = subprocess.run(["storescu", "-aet", "MODALITY", "-aec", "EDGE_AI", "127.0.0.1",
                              str(scp.port), str(f)], capture_output=True, text=True, timeout=60)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out.returncode != 0
    assert received == []
    assert peak - before < 8 * 1024 * 1024, f"{(peak - before) / 2**20:.1f} MB buffered"


def test_accepting_tells_a_listening_node_from_a_dead_one(node):
    """``running`` only says a server object exists; ``accepting`` says the port accepts."""
    scp, _ = node()
    assert scp.running and scp.accepting
    assert _send_dataset(scp.port, make_dx(seed=35)).Status == 0

    def crash():
        raise RuntimeError("accept loop crashed")
    scp._server.service_actions = crash        # the accept loop dies; the object lives on
    wait_until(lambda: not scp.accepting, 5, what="accepting turns False")
    assert scp.running

    other, _ = node()
    assert other.accepting
    other._server.socket.close()               # the listening socket closed under the loop
    assert not other.accepting
    other.shutdown()
    assert not other.accepting and not other.running

    third, _ = node()
    third.shutdown()
    assert not third.accepting


def test_jpeg_lossless_sv1_is_received_intact(tmp_path, edge_server):
    """JPEG Lossless SV1, the common lossless syntax of X-ray machines, made by DCMTK."""
    require_tool("storescu")
    require_tool("dcmcjpeg")
    srv = edge_server().start()
    src = tmp_path / "raw.dcm"
    ds = make_dx(src, seed=36)
    sv1 = tmp_path / "sv1.dcm"
    subprocess.run(["dcmcjpeg", "+e1", str(src), str(sv1)], check=True, capture_output=True, timeout=60)
    assert dcmread(sv1).file_meta.TransferSyntaxUID == JPEGLosslessSV1
    out = srv.storescu(sv1, extra=["-xs"])      # propose JPEG Lossless SV1, as the modality would
    assert out.returncode == 0, out.stderr
    assert [j["sop_instance_uid"] for j in srv.jobs()] == [ds.SOPInstanceUID]
    spooled = list((srv.data_dir / "spool").rglob("*.dcm"))
    assert len(spooled) == 1
    kept = dcmread(spooled[0])
    assert kept.file_meta.TransferSyntaxUID == JPEGLosslessSV1
    assert np.array_equal(kept.pixel_array, ds.pixel_array)


def test_dcmtk_programs_are_found_behind_pynetdicoms_apps_of_the_same_name(tmp_path, monkeypatch):
    """An activated virtual environment puts pynetdicom's storescu app first on PATH; the
    lookup used by the tests, the benchmarks and the health check still finds DCMTK's."""
    from dicom_node import dcmtk

    real = require_tool("storescu")
    shadow = tmp_path / "venv-bin"
    shadow.mkdir()
    app = shadow / "storescu"
    app.write_text("#!/bin/sh\necho 'pynetdicom storescu v3'\n")
    app.chmod(0o755)
    monkeypatch.setenv("PATH", f"{shadow}:{os.environ['PATH']}")
    dcmtk.find.cache_clear()
    try:
        assert dcmtk.find("storescu") == real
        assert dcmtk.find("no-such-dcmtk-program") is None
        links = tmp_path / "links"
        assert "storescu" in dcmtk.link_shadowed(links)
        assert (links / "storescu").resolve() == Path(real).resolve()
        out = subprocess.run([str(links / "storescu"), "--version"], capture_output=True, text=True)
        assert "dcmtk" in out.stdout.lower()
    finally:
        dcmtk.find.cache_clear()


def test_every_read_is_acknowledged_at_once_on_both_sides(tmp_path, node, monkeypatch):
    """A peer with Nagle's algorithm on (DCMTK's default) holds the second small segment of
    a PDU until the first is acknowledged; Linux delays that ACK up to 40 ms. Both the
    listener and the delivery side ask the kernel for the ACK at once after every read
    (TCP_QUICKACK)."""
    import socket as socket_module

    from dicom_node import scu

    if scu._QUICKACK is None:
        pytest.skip("TCP_QUICKACK is Linux-only")
    sides: list[str] = []
    real_quick_ack = scu.quick_ack

    def spy(sock):
        sides.append("listener" if sock.getsockname()[1] == scp.port else "sender")
        assert sock.getsockopt(socket_module.IPPROTO_TCP, socket_module.TCP_NODELAY)
        real_quick_ack(sock)

    monkeypatch.setattr(scu, "quick_ack", spy)
    scp, received = node()
    path = tmp_path / "img.dcm"
    make_dx(path, seed=3)
    peer = scu.Peer(ae_title="EDGE_AI", host="127.0.0.1", port=scp.port, calling_ae_title="MODALITY")
    outcomes = scu.send_files(peer, [path])
    assert outcomes[0].delivered and len(received) == 1
    assert "sender" in sides, "the sending side never acknowledged a read at once"
    assert "listener" in sides, "the listener never acknowledged a read at once"


def test_a_pdu_read_into_one_buffer_is_complete_and_a_closed_connection_gives_what_came():
    """The association socket reads a PDU with few system calls (not pynetdicom's 4 kB
    ones): every byte in order however it is segmented; a peer that closes mid-PDU gives
    the bytes that came, as pynetdicom's own read does."""
    import socket as socket_module
    import threading

    from dicom_node.scu import _read_exactly

    payload = bytes(range(256)) * 4099     # ~1 MB, not a multiple of any segment size
    a, b = socket_module.socketpair()
    try:
        def send_in_pieces():
            for i in range(0, len(payload), 7001):
                a.sendall(payload[i:i + 7001])
            a.sendall(b"tail")
            a.close()
        sender = threading.Thread(target=send_in_pieces)
        sender.start()
        assert bytes(_read_exactly(b, len(payload))) == payload
        assert bytes(_read_exactly(b, 100)) == b"tail"      # then the peer closed
        sender.join()
    finally:
        b.close()
