"""C-ECHO, C-STORE and C-FIND SCU: how results, and in router mode the received images,
reach the PACS."""
from __future__ import annotations

import logging
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom import _config as _pynetdicom_config
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind
from pynetdicom.transport import AssociationSocket

from .sop import NATIVE_TRANSFER_SYNTAXES, RESULT_STORAGE, VERIFICATION
from .transcode import native_copy

logger = logging.getLogger(__name__)

#: Warning statuses that still mean the PACS holds the object (coercion, elements discarded).
DELIVERED_WARNINGS = (0xB000, 0xB006, 0xB007)


class _DropReportedFailures(logging.Filter):
    """pynetdicom logs each failed association attempt at ERROR (a TLS failure with a
    traceback). Each becomes a ``SendOutcome`` message, which the outbox logs once per
    change of a destination's state; these lines would repeat at every retry. The messages
    below are logged only on the requesting side in pynetdicom 3.0 (transport.connect,
    acse._negotiate_as_requestor), so the listener's logs are untouched."""
    _MESSAGES = (
        "Association request failed: unable to connect to remote",
        "TCP Initialisation Error: ",
        "Association Rejected", "Result: ", "Reason: ",
        "ACSE timeout reached while waiting for response to association request",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.ERROR:
            return True
        if isinstance(record.msg, ssl.SSLError):    # LOGGER.exception(exc) after a TLS failure
            return False
        return not str(record.msg).startswith(self._MESSAGES)


for _name in ("pynetdicom.transport", "pynetdicom.acse"):
    logging.getLogger(_name).addFilter(_DropReportedFailures())


@dataclass(frozen=True)
class Peer:
    ae_title: str
    host: str
    port: int
    calling_ae_title: str = "EDGE_AI"
    ssl_context: ssl.SSLContext | None = None
    timeout_s: float = 30.0
    tls_server_name: str | None = None   # name the peer's certificate must carry (None: host)


@dataclass(frozen=True)
class SendOutcome:
    """``delivered`` is True for success and for warnings that keep the object."""
    delivered: bool
    status: int | None
    message: str


class _TLSSocket(ssl.SSLSocket):
    """Keeps the reason of a failed handshake on its context: pynetdicom logs it but reports
    only an aborted association, and the delivery error must say what was wrong."""

    def do_handshake(self, *args, **kwargs):
        try:
            return super().do_handshake(*args, **kwargs)
        except ssl.SSLError as exc:
            self.context.handshake_error = exc
            raise


class ClientTLSContext(ssl.SSLContext):
    """A client SSLContext that remembers why its last handshake failed."""
    handshake_error: ssl.SSLError | None = None
    sslsocket_class = _TLSSocket


def make_client_ssl_context(ca: str | None = None, cert: str | None = None,
                            key: str | None = None, *, verify: bool = True) -> ClientTLSContext:
    """TLS to a PACS: its certificate must chain to ``ca`` and carry the name we connect to
    (``Peer.tls_server_name`` or the host; an IP address must be in an IP SAN). Only ``ca``
    is trusted, not the system's public CAs. ``verify=False`` checks neither (an explicit,
    logged opt-out). ``cert``/``key``: the box's own certificate, presented when set."""
    ctx = ClientTLSContext(ssl.PROTOCOL_TLS_CLIENT)   # CERT_REQUIRED and check_hostname
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if verify:
        if not ca:
            raise ValueError("ca: a CA certificate file is needed to verify the PACS certificate "
                             "(or pass verify=False to skip the check)")
        ctx.load_verify_locations(cafile=ca)
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
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


def _associate(ae: AE, peer: Peer, ext_neg: list | None = None):
    tls = None
    if peer.ssl_context is not None:
        tls = (peer.ssl_context, peer.tls_server_name or peer.host)
        if isinstance(peer.ssl_context, ClientTLSContext):
            peer.ssl_context.handshake_error = None
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=tls, ext_neg=ext_neg)
    if assoc.is_established:
        set_nodelay(assoc)
        # pynetdicom has no parameter for the socket's class; the PACS's answers from now on
        assoc.dul.socket.__class__ = QuickAckSocket
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


_QUICKACK = getattr(socket, "TCP_QUICKACK", None)     # Linux


def quick_ack(sock) -> None:
    """Acknowledge what was just read at once instead of after the delayed-ACK timer.

    A peer that leaves Nagle's algorithm on (DCMTK's default, so many modalities and PACS)
    sends a PDU's header and body as two small segments and holds the second until the
    first is acknowledged; Linux delays that ACK by up to 40 ms while nothing goes back.
    TCP_QUICKACK is not sticky, so it is set again after every read.
    """
    if _QUICKACK is None or sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
    except OSError:
        pass


#: PDUs up to this length are read straight into one buffer of their size; a longer one
#: (no peer of ours announces it) is read as pynetdicom does, growing as its bytes arrive.
DIRECT_READ_BYTES = 4 * 1024 * 1024


class QuickAckSocket(AssociationSocket):
    """pynetdicom's association socket, acknowledging every read at once (``quick_ack``)
    and reading a PDU into one buffer: pynetdicom reads 4 kB per call, about 2000 system
    calls and copies in Python for a 2k x 2k image. Reading 8 MB in 256 kB PDUs over
    loopback took 11.8 ms of the reading thread's CPU that way and 1.7 ms this way."""

    def recv(self, nr_bytes: int) -> bytearray:
        sock = self.socket
        data = _read_exactly(sock, nr_bytes) if 0 < nr_bytes <= DIRECT_READ_BYTES else super().recv(nr_bytes)
        quick_ack(sock)
        return data


def _read_exactly(sock, nr_bytes: int) -> bytearray:
    """``nr_bytes`` from ``sock``, or what came before the peer closed the connection (as
    pynetdicom's ``recv``: the DUL then sees a short PDU); socket errors propagate."""
    buf = bytearray(nr_bytes)
    with memoryview(buf) as view:
        got = 0
        while got < nr_bytes:
            n = sock.recv_into(view[got:], nr_bytes - got)
            if not n:
                break
            got += n
    if got < nr_bytes:
        del buf[got:]
    return buf


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
    tls_error = getattr(peer.ssl_context, "handshake_error", None)
    if tls_error is not None:
        return f"TLS handshake with {where} failed: {_describe_tls_error(tls_error, peer)}"
    # pynetdicom reports a refused or timed-out TCP connection as an abort as well
    return f"cannot connect to {where} (connection refused, timed out or aborted)"


def _describe_tls_error(exc: ssl.SSLError, peer: Peer) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        name = peer.tls_server_name or peer.host
        return (f"the PACS certificate was not accepted ({exc.verify_message}); check the CA "
                f"that signed it and that it is issued for {name!r}")
    return exc.reason or str(exc)


@dataclass(frozen=True)
class _StoredFile:
    path: Path
    sop_class_uid: str
    transfer_syntax: str


def _stored_file(path: str | Path) -> _StoredFile:
    meta = read_file_meta_info(str(path))
    return _StoredFile(Path(path), str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))


def _requested_contexts(files: list[_StoredFile]) -> list[tuple[str, list[str]]]:
    """One context per (SOP class, transfer syntax) of the files, so that the peer says
    whether it takes each file as it is stored; then one per SOP class with the
    uncompressed syntaxes, the lossless fallback."""
    exact = dict.fromkeys((f.sop_class_uid, f.transfer_syntax) for f in files)
    contexts = [(cls, [ts]) for cls, ts in exact]
    for cls in dict.fromkeys([*(f.sop_class_uid for f in files), *RESULT_STORAGE]):
        contexts.append((cls, list(NATIVE_TRANSFER_SYNTAXES)))
    return contexts


def send_files(peer: Peer, paths: list[str | Path], *,
               on_outcome: Callable[[int, SendOutcome], None] | None = None,
               to_native: Callable[[Path], Path] | None = None,
               timings: dict | None = None) -> list[SendOutcome]:
    """C-STORE each file over one association; one outcome per file, in order.

    A file goes in the transfer syntax it is stored in, byte for byte (its data set is not
    decoded), when the peer accepts that syntax for its SOP class. Otherwise it is converted
    without loss to an uncompressed syntax the peer accepts: compressed pixel data is
    decompressed by ``to_native(path) -> path of an uncompressed copy`` (default: pydicom in
    a child process, ``dicom_node.transcode``). Nothing is ever compressed.

    ``on_outcome(index, outcome)`` is called as soon as each file's answer is known, so the
    caller can record it before the next file goes out. ``timings`` (a dict) receives
    milliseconds: "associate", "store" (one per file sent) and "release".
    """
    timings = {} if timings is None else timings
    started = time.perf_counter()
    files = [_stored_file(p) for p in paths]
    ae = _ae(peer)
    for sop_class, syntaxes in _requested_contexts(files):
        ae.add_requested_context(sop_class, syntaxes)
    assoc = _associate(ae, peer)
    timings["associate"] = (time.perf_counter() - started) * 1000.0
    timings["store"] = []
    if not assoc.is_established:
        why = _why_no_association(assoc, peer)
        return [SendOutcome(False, None, why) for _ in files]
    accepted = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts}
    outcomes: list[SendOutcome] = []
    try:
        for index, stored in enumerate(files):
            t = time.perf_counter()
            outcomes.append(_store_file(assoc, stored, accepted, to_native or native_copy))
            timings["store"].append((time.perf_counter() - t) * 1000.0)
            if on_outcome is not None:
                on_outcome(index, outcomes[-1])
            if not assoc.is_established:
                break
    finally:
        t = time.perf_counter()
        if assoc.is_established:
            assoc.release()
        timings["release"] = (time.perf_counter() - t) * 1000.0
    while len(outcomes) < len(files):
        outcomes.append(SendOutcome(False, None, "association lost before sending"))
    return outcomes


def instance_present(peer: Peer, study_uid: str, series_uid: str, sop_instance_uid: str) -> bool | None:
    """Whether the peer holds this instance, by a Study Root C-FIND at IMAGE level.

    True or False when the peer answered; None when it cannot tell (no association, no
    query/retrieve support, a failure status): the caller then has to assume nothing.
    """
    ae = _ae(peer)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = _associate(ae, peer)
    if not assoc.is_established:
        return None
    query = Dataset()
    query.QueryRetrieveLevel = "IMAGE"
    query.StudyInstanceUID = study_uid
    query.SeriesInstanceUID = series_uid
    query.SOPInstanceUID = sop_instance_uid
    found, answered = False, False
    try:
        for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
            if not status or "Status" not in status:
                return None
            code = int(status.Status)
            if code in (0xFF00, 0xFF01):
                found = found or (identifier is not None
                                  and str(identifier.get("SOPInstanceUID", "")) == sop_instance_uid)
            elif code == 0x0000:
                answered = True
            else:
                return None
    except Exception:  # noqa: BLE001 - no answer is "cannot tell"
        logger.debug("C-FIND to %s failed", peer.ae_title, exc_info=True)
        return None
    finally:
        if assoc.is_established:
            assoc.release()
    return found if answered else None


def _store_file(assoc, stored: _StoredFile, accepted: set[tuple[str, str]],
                to_native: Callable[[Path], Path]) -> SendOutcome:
    """Send one file as it is stored when the peer takes its syntax, else converted."""
    cls, ts = stored.sop_class_uid, stored.transfer_syntax
    if (cls, ts) in accepted:
        # A path is sent as the file's encoded data set, unparsed (pynetdicom's chunked
        # mode; it needs an accepted context of exactly the file's syntax, checked above).
        _pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
        return _store_one(assoc, stored.path)
    if not any((cls, native) in accepted for native in NATIVE_TRANSFER_SYNTAXES):
        return SendOutcome(False, None, f"the peer accepts {UID(cls).name} in neither "
                                        f"{UID(ts).name} nor an uncompressed transfer syntax")
    copy = None
    try:
        if UID(ts).is_encapsulated:
            copy = to_native(stored.path)    # decompressed, in a child process
            ds = dcmread(str(copy))
        else:   # another uncompressed encoding (pynetdicom re-encodes it), or deflated
            ds = dcmread(str(stored.path))
            if UID(ts).is_deflated:
                ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    except Exception as exc:  # noqa: BLE001 - damaged file, decoder failed: say so, retry later
        return SendOutcome(False, None, f"cannot convert from {UID(ts).name} for the peer: "
                                        f"{type(exc).__name__}: {exc}")
    finally:
        if copy is not None:
            Path(copy).unlink(missing_ok=True)
    return _store_one(assoc, ds)


def _store_one(assoc, ds: Dataset | Path) -> SendOutcome:
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
