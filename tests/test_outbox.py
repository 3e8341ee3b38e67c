"""The outbox against real DICOM peers (DCMTK storescp): scheduling and what it logs."""
from __future__ import annotations

import logging
import socket
import subprocess
import time
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from conftest import free_port, make_dx, require_tool, wait_for_port, wait_until
from edge.config import config_from_dict
from edge.journal import Journal, NewInstance
from edge.outbox import Outbox


class StoreSCPPeer:
    """DCMTK ``storescp`` as a PACS on a loopback port, optionally with TLS arguments."""

    def __init__(self, tmp: Path, *, port: int | None = None, aet: str = "PACS",
                 tls_args: list[str] | None = None):
        self.port = port or free_port()
        self.aet = aet
        self.out = Path(tmp) / f"storescp-{self.port}"
        self.out.mkdir(parents=True, exist_ok=True)
        self.tls_args = tls_args or []
        self.proc: subprocess.Popen | None = None

    def start(self) -> "StoreSCPPeer":
        require_tool("storescp")
        self._log = open(self.out.with_suffix(".log"), "ab")
        self.proc = subprocess.Popen(["storescp", "-aet", self.aet, "-od", str(self.out),
                                      *self.tls_args, str(self.port)],
                                     stdout=self._log, stderr=subprocess.STDOUT)
        wait_for_port(self.port, 20, self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def stored(self) -> list[Path]:
        return [p for p in self.out.iterdir() if p.is_file()]

    def destination(self, name: str, **extra) -> dict:
        return {"name": name, "ae_title": self.aet, "host": "127.0.0.1", "port": self.port, **extra}


@pytest.fixture
def storescp(tmp_path):
    peers: list[StoreSCPPeer] = []

    def factory(**kw) -> StoreSCPPeer:
        peer = StoreSCPPeer(tmp_path, **kw)
        peers.append(peer)
        return peer.start()

    yield factory
    for peer in peers:
        peer.stop()


def make_outbox(tmp_path: Path, destinations: list[dict], **sections) -> tuple[Outbox, Journal]:
    """An outbox over a fresh journal in ``tmp_path`` (not started)."""
    cfg = config_from_dict({"storage": {"dir": str(tmp_path / "data"), "min_free_mb": 0},
                            "destinations": destinations, **sections})
    cfg.storage_dir.mkdir(parents=True, exist_ok=True)
    journal = Journal(cfg.journal_path)
    return Outbox(cfg, journal), journal


def queue_results(outbox: Outbox, destination: str, n: int, *, seed: int = 0,
                  age_s: float = 0.0) -> str:
    """Queue ``n`` result objects (small DX images) of one instance for ``destination``;
    returns that instance's UID (``journal.deliveries_for`` lists the rows)."""
    storage = outbox.config.storage_dir
    journal = outbox.journal
    rel = f"results/obj{seed}.dcm"
    (storage / "results").mkdir(parents=True, exist_ok=True)
    ds = make_dx(storage / rel, rows=64, cols=64, seed=seed)
    uid = ds.SOPInstanceUID
    journal.record_received(NewInstance(
        sop_instance_uid=uid, sop_class_uid=ds.SOPClassUID, study_instance_uid=ds.StudyInstanceUID,
        series_instance_uid=ds.SeriesInstanceUID, transfer_syntax=ds.file_meta.TransferSyntaxUID,
        calling_ae="MODALITY", path=rel, sha256="0" * 64, size_bytes=(storage / rel).stat().st_size))
    # every row sends the same file: the PACS stores it once, the journal counts each row
    journal.add_deliveries(uid, [("sc", generate_uid(), rel) for _ in range(n)], [destination],
                           now=time.time() - age_s)
    return uid


def states(journal: Journal, destination: str) -> dict[str, int]:
    return {k: v for k, v in journal.count_deliveries_by_state(destination).items() if v}


def test_a_pacs_that_is_down_does_not_starve_another(tmp_path, storescp):
    """600 older due rows for A used to fill the whole scheduling window, so B got nothing
    until A had failed all of them, one association timeout per batch."""
    pacs_b = storescp()
    # A accepts TCP connections and never answers: each try waits for the timeout, like a
    # PACS host that is down behind a firewall that drops packets
    with socket.create_server(("127.0.0.1", 0), backlog=128) as black_hole:
        outbox, journal = make_outbox(
            tmp_path, [{"name": "a", "ae_title": "PACS_A", "host": "127.0.0.1",
                        "port": black_hole.getsockname()[1]},
                       pacs_b.destination("b")],
            delivery={"timeout_s": 3.0})
        queue_results(outbox, "a", 600, seed=1, age_s=120.0)
        queue_results(outbox, "b", 3, seed=2)
        started = time.monotonic()
        outbox.start()
        try:
            wait_until(lambda: states(journal, "b") == {"sent": 3}, 6, what="B's rows sent")
            assert time.monotonic() - started < 6   # before: 5 A timeouts first (>= 15 s)
            assert pacs_b.stored()
            wait_until(lambda: states(journal, "a").get("retrying"), 10, what="A tried")
        finally:
            outbox.stop()
            journal.close()


def test_failures_are_logged_once_per_state_change(tmp_path, storescp, caplog):
    require_tool("storescp")
    port = free_port()
    outbox, journal = make_outbox(
        tmp_path, [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": port}],
        delivery={"initial_backoff_s": 0.1, "max_backoff_s": 0.2})
    uid = queue_results(outbox, "pacs", 3, seed=3)
    caplog.set_level(logging.DEBUG, logger="edge.outbox")
    outbox.start()
    try:
        wait_until(lambda: all(r.attempts >= 4 for r in journal.deliveries_for(uid)), 20,
                   what="several retries while the PACS is down")
        storescp(port=port)
        wait_until(lambda: states(journal, "pacs") == {"sent": 3}, 20, what="delivery after the PACS came up")
    finally:
        outbox.stop()
        journal.close()
    records = [r for r in caplog.records if r.name == "edge.outbox"]
    warnings = [r for r in records if r.levelno == logging.WARNING]
    infos = [r for r in records if r.levelno == logging.INFO]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "failing" in warnings[0].getMessage() and str(port) in warnings[0].getMessage()
    assert "cannot connect" in warnings[0].getMessage()          # the reason is in it
    assert len(infos) == 1 and "works again" in infos[0].getMessage()
    # nor does pynetdicom repeat each failed connection at ERROR
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    retries = [r for r in records if r.levelno == logging.DEBUG and "retry in" in r.getMessage()]
    assert len(retries) >= 3 * 3   # every retry is still traceable, at DEBUG


def test_an_images_answers_are_journaled_together_before_the_next_image_goes(tmp_path, storescp, monkeypatch):
    """One association, two images of three objects each: each image's answers are written
    in one journal transaction, after its last object and before the next image's first."""
    peer = storescp()
    outbox, journal = make_outbox(tmp_path, [peer.destination("pacs")])
    first = queue_results(outbox, "pacs", 3, seed=1)
    second = queue_results(outbox, "pacs", 3, seed=2)
    events: list[tuple] = []
    real = journal.mark_deliveries_sent

    def spy(sent, **kw):
        uids = {journal.get_delivery(i).sop_instance_uid for i, _, _ in sent}
        events.append(("journal", tuple(sorted(uids)), len(sent)))
        return real(sent, **kw)

    monkeypatch.setattr(journal, "mark_deliveries_sent", spy)
    import edge.outbox as outbox_module
    real_send = outbox_module.send_files

    def send(peer_, paths, *, on_outcome=None, **kw):
        def seen(index, outcome):
            events.append(("answer", index))
            on_outcome(index, outcome)
        return real_send(peer_, paths, on_outcome=seen, **kw)

    monkeypatch.setattr(outbox_module, "send_files", send)
    dest = outbox.config.destinations[0]
    assert outbox._send_batch(dest, journal.due_deliveries(destination="pacs")) == 0.0
    assert events == [("answer", 0), ("answer", 1), ("answer", 2), ("journal", (first,), 3),
                      ("answer", 3), ("answer", 4), ("answer", 5), ("journal", (second,), 3)]
    assert states(journal, "pacs") == {"sent": 6}
    assert all(d.attempts == 1 and d.unconfirmed_at is None and d.sent_at
               for d in journal.deliveries_for(first) + journal.deliveries_for(second))
