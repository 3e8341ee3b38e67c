"""C-ECHO and C-STORE SCU: how results reach the PACS."""
from __future__ import annotations

import logging
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from .sop import RESULT_STORAGE, VERIFICATION

logger = logging.getLogger(__name__)

#: Warning statuses that still mean the PACS holds the object (coercion, elements discarded).
DELIVERED_WARNINGS = (0xB000, 0xB006, 0xB007)


@dataclass(frozen=True)
class Peer:
    ae_title: str
    host: str
    port: int
    calling_ae_title: str = "EDGE_AI"
    ssl_context: ssl.SSLContext | None = None
    timeout_s: float = 30.0


@dataclass(frozen=True)
class SendOutcome:
    """``delivered`` is True for success and for warnings that keep the object."""
    delivered: bool
    status: int | None
    message: str


def make_client_ssl_context(ca: str | None = None, cert: str | None = None,
                            key: str | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    ctx.check_hostname = False
    if cert and key:
        ctx.load_cert_chain(certfile=cert, keyfile=key)
    return ctx


def _ae(peer: Peer) -> AE:
    ae = AE(ae_title=peer.calling_ae_title)
    ae.acse_timeout = peer.timeout_s
    ae.dimse_timeout = peer.timeout_s
    ae.network_timeout = peer.timeout_s
    ae.connection_timeout = min(peer.timeout_s, 10.0)
    return ae


def _associate(ae: AE, peer: Peer):
    tls = (peer.ssl_context, "") if peer.ssl_context else None
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=tls)
    if assoc.is_established:
        set_nodelay(assoc)
    return assoc


def set_nodelay(assoc) -> None:
    """Disable Nagle's algorithm on an association's socket.

    A C-STORE request is a small command PDU followed by data PDUs; with Nagle's algorithm
    and delayed ACKs on the peer, each small store can wait ~40 ms for nothing.
    """
    try:
        sock = assoc.dul.socket.socket
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError):
        logger.debug("could not set TCP_NODELAY", exc_info=True)


def echo(peer: Peer) -> SendOutcome:
    """C-ECHO the peer; ``delivered`` means it answered success."""
    ae = _ae(peer)
    ae.add_requested_context(VERIFICATION)
    assoc = _associate(ae, peer)
    if not assoc.is_established:
        return SendOutcome(False, None, _why_no_association(assoc, peer))
    try:
        rsp = assoc.send_c_echo()
        status = int(rsp.Status) if "Status" in rsp else None
    finally:
        assoc.release()
    if status == 0:
        return SendOutcome(True, 0, f"C-ECHO to {peer.ae_title}@{peer.host}:{peer.port} succeeded")
    return SendOutcome(False, status, "C-ECHO got no valid response" if status is None
                       else f"C-ECHO answered 0x{status:04X}")


def _why_no_association(assoc, peer: Peer) -> str:
    where = f"{peer.ae_title}@{peer.host}:{peer.port}"
    if assoc.is_rejected:
        return f"association rejected by {where} (check AE titles)"
    # pynetdicom reports a refused or timed-out TCP connection as an abort as well
    return f"cannot connect to {where} (connection refused, timed out or aborted)"


def send_files(peer: Peer, paths: list[str | Path]) -> list[SendOutcome]:
    """C-STORE each file over one association; one outcome per file, in order."""
    datasets = [dcmread(str(p)) for p in paths]
    ae = _ae(peer)
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets} | set(RESULT_STORAGE)):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = _associate(ae, peer)
    if not assoc.is_established:
        why = _why_no_association(assoc, peer)
        return [SendOutcome(False, None, why) for _ in datasets]
    outcomes: list[SendOutcome] = []
    try:
        for ds in datasets:
            outcomes.append(_store_one(assoc, ds))
            if not assoc.is_established:
                break
    finally:
        if assoc.is_established:
            assoc.release()
    while len(outcomes) < len(datasets):
        outcomes.append(SendOutcome(False, None, "association lost before sending"))
    return outcomes


def _store_one(assoc, ds: Dataset) -> SendOutcome:
    try:
        rsp = assoc.send_c_store(ds)
    except Exception as exc:  # noqa: BLE001 - network or encoding error: retry later
        return SendOutcome(False, None, f"C-STORE failed: {type(exc).__name__}: {exc}")
    if "Status" not in rsp:
        return SendOutcome(False, None, "C-STORE got no response (timeout or abort)")
    status = int(rsp.Status)
    comment = str(rsp.get("ErrorComment", "") or "")
    if status == 0:
        return SendOutcome(True, 0, "stored")
    if status in DELIVERED_WARNINGS:
        return SendOutcome(True, status, f"stored with warning 0x{status:04X} {comment}".strip())
    return SendOutcome(False, status, f"C-STORE answered 0x{status:04X} {comment}".strip())
