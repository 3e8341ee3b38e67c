"""C-ECHO and C-STORE SCP, and Storage Commitment Push Model SCP: the appliance's front door.

The node checks what is DICOM-level (association policy, that the dataset parses, that its
UIDs match the request, that the pixel data is complete) and hands every good instance to a
callback, which must persist it durably before returning a status. No AI work happens here.
Storage commitment requests are checked the same way and handed to a second callback,
which journals them; the result follows later (``dicom_node.commitment``).
"""
from __future__ import annotations

import logging
import socket
import socketserver
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragments
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.pdu import A_ASSOCIATE_RQ, P_DATA_TF
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from .commitment import (
    ACTION_INVALID_OBJECT_INSTANCE,
    ACTION_NO_SUCH_ACTION,
    ACTION_NO_SUCH_SOP_CLASS,
    ACTION_PROCESSING_FAILURE,
    REQUEST_STORAGE_COMMITMENT,
    CommitmentRequest,
    CommitmentRequestError,
    ReportChannel,
    parse_action_information,
    uid_ok,
)
from .scu import QuickAckSocket, set_nodelay
from .sop import (
    ACCEPTED_STORAGE,
    ACCEPTED_TRANSFER_SYNTAXES,
    NATIVE_TRANSFER_SYNTAXES,
    STORAGE_COMMITMENT,
    STORAGE_COMMITMENT_INSTANCE,
    VERIFICATION,
)

logger = logging.getLogger(__name__)

# C-STORE statuses (PS3.4 Annex B.2.3; "C000-CFFF cannot understand").
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
PIXEL_DATA_INCOMPLETE = 0xC001
PROCESSING_FAILURE = 0xC002
UID_INVALID = 0xC003


@dataclass(frozen=True)
class ReceivedInstance:
    """A parsed, checked instance as it arrived (bytes not re-encoded)."""
    encoded: bytes              # file meta information + dataset, as received
    dataset: Dataset
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    calling_ae: str
    called_ae: str
    receive_started: float = 0.0   # perf_counter when the handler started
    transfer_started: float = 0.0  # perf_counter when the first data set byte arrived (0: unknown)


@dataclass(frozen=True)
class StoreResult:
    status: int
    comment: str | None = None


@dataclass
class SCPSettings:
    ae_title: str = "EDGE_AI"
    host: str = "0.0.0.0"
    port: int = 11112
    allowed_calling_aets: tuple[str, ...] = ()
    require_called_aet: bool = True
    max_associations: int = 8             # associations at once (half-open connections not counted)
    max_associations_per_peer: int = 4    # connections at once from one remote address
    association_request_timeout_s: float = 10.0   # TCP connect -> complete A-ASSOCIATE-RQ
    pdu_timeout_s: float = 60.0           # most time between two complete PDUs from a peer
    max_instance_bytes: int = 512 * 1024 * 1024   # larger data sets are refused at the door
    ssl_context: ssl.SSLContext | None = None
    dimse_timeout: float = 60.0
    storage_sop_classes: tuple[str, ...] = field(default=ACCEPTED_STORAGE)


def make_server_ssl_context(cert: str, key: str, ca: str | None = None) -> ssl.SSLContext:
    """TLS for DICOM (PS3.15 B.1 style): server cert/key; with a CA, clients must present a cert."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(certfile=cert, keyfile=key)
    if ca:
        ctx.load_verify_locations(cafile=ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _status(code: int, comment: str | None = None) -> Dataset | int:
    if comment is None:
        return code
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]   # LO: 64 characters at most
    return ds


def check_dataset(ds: Dataset, affected_sop_class: str, affected_sop_instance: str) -> StoreResult | None:
    """DICOM-level checks of a received dataset; None when it is acceptable.

    Forces every element to be parsed, so a fuzzed or truncated stream is refused here
    rather than discovered later by the analysis.
    """
    try:
        for elem in ds.iterall():
            _ = elem.value
    except Exception as exc:  # noqa: BLE001 - any parse error means "cannot understand"
        return StoreResult(CANNOT_UNDERSTAND, f"Dataset cannot be parsed: {type(exc).__name__}")
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        value = getattr(ds, keyword, None)
        if not value:
            return StoreResult(CANNOT_UNDERSTAND, f"Missing required attribute {keyword}")
        if not uid_ok(str(value)):
            return StoreResult(UID_INVALID, f"Invalid UID in {keyword}")
    if ds.SOPInstanceUID != affected_sop_instance:
        return StoreResult(DATASET_DOES_NOT_MATCH_SOP_CLASS, "SOPInstanceUID differs from request")
    if ds.SOPClassUID != affected_sop_class:
        return StoreResult(DATASET_DOES_NOT_MATCH_SOP_CLASS, "SOPClassUID differs from request")
    return _check_pixel_data(ds)


def _check_pixel_data(ds: Dataset) -> StoreResult | None:
    if Tag("PixelData") not in ds:
        return StoreResult(CANNOT_UNDERSTAND, "Image has no Pixel Data")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        bits = int(ds.BitsAllocated)
        spp = int(getattr(ds, "SamplesPerPixel", 1))
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        return StoreResult(CANNOT_UNDERSTAND, "Missing or invalid image size attributes")
    if rows <= 0 or cols <= 0 or bits not in (1, 8, 16, 32):
        return StoreResult(CANNOT_UNDERSTAND, "Invalid Rows, Columns or Bits Allocated")
    data = ds.PixelData
    if ds.file_meta.TransferSyntaxUID.is_encapsulated:
        try:
            fragments = list(generate_fragments(data))
        except Exception:  # noqa: BLE001
            return StoreResult(PIXEL_DATA_INCOMPLETE, "Compressed pixel data is truncated")
        if not fragments or sum(len(f) for f in fragments) == 0:
            return StoreResult(PIXEL_DATA_INCOMPLETE, "Compressed pixel data is empty")
        return None
    expected = rows * cols * spp * frames * bits // 8
    if len(data) < expected:
        return StoreResult(PIXEL_DATA_INCOMPLETE,
                           f"Pixel data truncated: {len(data)} of {expected} bytes")
    return None


OnInstance = Callable[[ReceivedInstance], StoreResult]
#: Takes on a storage commitment request (journals it) and returns the N-ACTION status.
OnCommitment = Callable[[CommitmentRequest], int]


# ------------------------------------------------------------------ connection limits
#
# pynetdicom alone lets a few slow peers take the port: its DUL thread reads a PDU with
# blocking recv() calls, so a peer that dribbles a PDU one byte at a time is never timed
# out (the ARTIM and idle timers are only checked between PDUs), every such connection
# counts against ``maximum_associations`` before it has even asked for an association,
# and with TLS the handshake runs in the accept loop itself. ``_GuardedServer`` (passed
# to ``AE.make_server(server_class=...)``) adds, with pynetdicom's own hooks:
#   * ``verify_request`` (socketserver, accept loop, before any thread): per-address limit,
#     and the oldest half-open connection makes room when half-open ones fill their share;
#   * a deadline per connection, moved by ``EVT_PDU_RECV``/``EVT_PDU_SENT`` and enforced in
#     ``service_actions`` (run by ``serve_forever`` between polls) by shutting the socket
#     down, which ends the blocked recv() and lets pynetdicom close the association;
#   * ``EVT_REQUESTED``: at most ``max_associations`` connections past their request;
#   * ``EVT_PDU_RECV``: data set bytes of the C-STORE being received are counted; beyond
#     ``max_instance_bytes`` the rest is dropped unread into memory, and the C-STORE handler
#     answers a refusal with an Error Comment once the peer has finished sending.

#: Longest PDU read into memory. We announce ``RECEIVE_PDU_BYTES`` and association requests
#: are a few kB, but the 32-bit length field lets a peer announce 4 GiB, which pynetdicom
#: would buffer whole.
MAX_PDU_BYTES = 1024 * 1024
#: The maximum PDU length we announce. pynetdicom's default (16 kB) makes a 2k x 2k image
#: about 500 PDUs, each decoded by Python; a peer that can sends 256 kB ones (DCMTK does,
#: up to its own limit), so the data set arrives in a few dozen.
RECEIVE_PDU_BYTES = 256 * 1024

_POLL_S = 0.2        # how often deadlines are checked (the accept loop's poll interval)
_LOG_EVERY_S = 60.0  # one WARNING per kind and peer per minute; the rest at DEBUG


@dataclass(eq=False)
class _Connection:
    """One TCP connection to the listener, from accept to close."""
    address: tuple
    sock: socket.socket
    opened: float                  # time.monotonic()
    deadline: float                # the peer must complete its next PDU by then
    requested: bool = False        # a complete A-ASSOCIATE-RQ has arrived
    closing: bool = False          # shut down by us or rejected: no longer counted
    assoc: object | None = None
    dataset_bytes: int = 0         # data set bytes of the message being received
    dataset_started: float = 0.0   # perf_counter at its first data set fragment
    refused_bytes: int | None = None   # size of a data set dropped for being too large

    @property
    def host(self) -> str:
        return str(self.address[0])


class _RateLimitedLog:
    """WARNING at most once per minute per key, DEBUG otherwise: a flood of hostile
    connections must not flood the log."""

    def __init__(self) -> None:
        self._last: dict[tuple, float] = {}

    def warning(self, key: tuple, msg: str, *args) -> None:
        now = time.monotonic()
        if len(self._last) > 1000:   # many peer addresses: forget, rather than grow
            self._last.clear()
        if now - self._last.get(key, -_LOG_EVERY_S) >= _LOG_EVERY_S:
            self._last[key] = now
            logger.warning(msg, *args)
        else:
            logger.debug(msg, *args)


_noisy = _RateLimitedLog()


class _BoundedAssociationSocket(QuickAckSocket):
    """Refuses to read a PDU longer than ``MAX_PDU_BYTES``: the short read makes the DUL
    close the connection (Evt17) instead of buffering what the peer announced. Every read
    is acknowledged at once (``QuickAckSocket``)."""

    def recv(self, nr_bytes: int) -> bytearray:
        if nr_bytes > MAX_PDU_BYTES:
            host = self.assoc.requestor.address
            _noisy.warning(("pdu-size", host), "connection from %s closed: it announced a "
                           "%d-byte PDU (limit %d)", host, nr_bytes, MAX_PDU_BYTES)
            return bytearray()
        return super().recv(nr_bytes)


class _RequestHandler(RequestHandler):
    def _create_association(self):
        assoc = super()._create_association()
        # pynetdicom builds the AssociationSocket here and has no parameter for its class;
        # the subclass only adds the PDU length check and the quick ACKs above.
        assoc.dul.socket.__class__ = _BoundedAssociationSocket
        return assoc


class _GuardedServer(ThreadedAssociationServer):
    """``ThreadedAssociationServer`` with the limits above (see the section comment)."""

    daemon_threads = True      # request threads only hand over to the association thread
    request_queue_size = 64    # listen() backlog: a burst of connections is accepted at once

    def __init__(self, *args, limits: SCPSettings, **kwargs):
        self.limits = limits
        self._conns: set[_Connection] = set()            # every connection not yet closed
        self._by_assoc: dict[object, _Connection] = {}
        self._lock = threading.Lock()
        self._log = _noisy
        super().__init__(*args, request_handler=_RequestHandler, **kwargs)
        self.bind(evt.EVT_CONN_OPEN, self._on_conn_open)
        self.bind(evt.EVT_CONN_CLOSE, self._on_conn_close)
        self.bind(evt.EVT_PDU_RECV, self._on_pdu_recv)
        self.bind(evt.EVT_PDU_SENT, self._on_pdu_sent)
        self.bind(evt.EVT_REQUESTED, self._on_requested)

    # ------------------------------------------------------------ accept loop
    def get_request(self):
        # Accept only. pynetdicom wraps TLS here, in the accept loop, where one client that
        # never completes its handshake stops the listener; it moves to the connection's
        # own thread (process_request_thread), under the connection's deadline.
        return self.socket.accept()

    def verify_request(self, request, client_address) -> bool:
        """Admit or refuse a new connection before a thread is spent on it."""
        lim = self.limits
        now = time.monotonic()
        host = str(client_address[0])
        evicted = None
        with self._lock:
            live = [c for c in self._conns if not c.closing]
            if sum(1 for c in live if c.host == host) >= lim.max_associations_per_peer:
                self._log.warning(("per-peer", host),
                                  "connection from %s refused: it already has %d open "
                                  "(node.max_associations_per_peer)", host, lim.max_associations_per_peer)
                return False
            half_open = sorted((c for c in live if not c.requested), key=lambda c: c.opened)
            if len(half_open) >= lim.max_associations:
                evicted = half_open[0]
                self._shutdown(evicted)
            self._conns.add(_Connection(
                client_address, request, now, now + lim.association_request_timeout_s))
        if evicted is not None:
            self._log.warning(("evicted",), "connection from %s closed after %.1f s without an "
                              "association request, to make room for a new one",
                              evicted.host, now - evicted.opened)
        return True

    def process_request_thread(self, request, client_address) -> None:
        """The connection's own thread: TLS handshake (if any), then pynetdicom's handling."""
        if self.ssl_context is not None:
            try:
                with self._lock:   # the deadline check must always see the socket in use
                    request = self.ssl_context.wrap_socket(
                        request, server_side=True, do_handshake_on_connect=False)
                    conn = self._unopened(client_address)
                    if conn is not None:
                        conn.sock = request
                request.do_handshake()
            except (OSError, ValueError) as exc:   # ssl.SSLError is an OSError
                self._log.warning(("tls", str(client_address[0])), "TLS handshake with %s failed: %s",
                                  client_address[0], exc)
                self._forget(client_address)
                self.shutdown_request(request)
                return
        super().process_request_thread(request, client_address)

    def service_actions(self) -> None:
        """Called by ``serve_forever`` between polls: close connections past their deadline."""
        super().service_actions()
        now = time.monotonic()
        late: list[_Connection] = []
        with self._lock:
            for conn in list(self._conns):
                if self._finished(conn):
                    self._drop(conn)
                elif not conn.closing and conn.deadline <= now:
                    self._shutdown(conn)
                    late.append(conn)
        for conn in late:
            if conn.requested:
                self._log.warning(("pdu-timeout", conn.host),
                                  "connection from %s closed: no complete PDU for %g s "
                                  "(node.pdu_timeout_s)", conn.host, self.limits.pdu_timeout_s)
            else:
                self._log.warning(("request-timeout", conn.host),
                                  "connection from %s closed: no complete association request "
                                  "within %g s (node.association_request_timeout_s)",
                                  conn.host, self.limits.association_request_timeout_s)

    def shutdown(self) -> None:
        """Stop accepting and close the listening socket; associations in progress finish."""
        socketserver.BaseServer.shutdown(self)   # stop serve_forever; not pynetdicom's, which
        self.server_close()                      # expects a server made by AE.start_server
        with self._lock:
            for conn in self._conns:
                if not conn.requested:
                    self._shutdown(conn)

    # ------------------------------------------------------------ bookkeeping
    @staticmethod
    def _shutdown(conn: _Connection) -> None:
        conn.closing = True
        try:
            # socket.socket's shutdown, also for an SSLSocket: no TLS alert, which another
            # thread may be in the middle of reading; a blocked recv() returns at once.
            socket.socket.shutdown(conn.sock, socket.SHUT_RDWR)
        except OSError:
            pass

    @staticmethod
    def _finished(conn: _Connection) -> bool:
        if conn.sock.fileno() == -1:
            return True
        assoc = conn.assoc
        return assoc is not None and assoc.ident is not None and not assoc.is_alive()

    def _drop(self, conn: _Connection) -> None:
        self._conns.discard(conn)
        if conn.assoc is not None:
            self._by_assoc.pop(conn.assoc, None)

    def _unopened(self, client_address) -> _Connection | None:
        """The newest connection from ``client_address`` that has no association yet."""
        found = [c for c in self._conns if c.address == client_address and c.assoc is None]
        return max(found, key=lambda c: c.opened) if found else None

    def _forget(self, client_address) -> None:
        with self._lock:
            conn = self._unopened(client_address)
            if conn is not None:
                self._drop(conn)

    def _conn(self, assoc) -> _Connection | None:
        return self._by_assoc.get(assoc)

    def dataset_started(self, assoc) -> float:
        """perf_counter when the data set being handled on ``assoc`` began to arrive (0: unknown)."""
        with self._lock:
            conn = self._conn(assoc)
            return conn.dataset_started if conn is not None else 0.0

    def take_refused_size(self, assoc) -> int | None:
        """Size of the data set just dropped for being too large on ``assoc``, if any."""
        with self._lock:
            conn = self._conn(assoc)
            if conn is None or conn.refused_bytes is None:
                return None
            size, conn.refused_bytes = conn.refused_bytes, None
            return size

    # ------------------------------------------------------------ event handlers
    def _on_conn_open(self, event) -> None:
        with self._lock:
            conn = self._unopened(event.address)
            if conn is not None:
                conn.assoc = event.assoc
                self._by_assoc[event.assoc] = conn

    def _on_conn_close(self, event) -> None:
        with self._lock:
            conn = self._conn(event.assoc)
            if conn is not None:
                self._drop(conn)

    def _on_pdu_sent(self, event) -> None:
        # Our response gives the peer a fresh pdu_timeout to send its next request.
        with self._lock:
            conn = self._conn(event.assoc)
            if conn is not None and conn.requested:
                conn.deadline = time.monotonic() + self.limits.pdu_timeout_s

    def _on_pdu_recv(self, event) -> None:
        pdu = event.pdu
        with self._lock:
            conn = self._conn(event.assoc)
            if conn is None:
                return
            conn.deadline = time.monotonic() + self.limits.pdu_timeout_s
            if isinstance(pdu, A_ASSOCIATE_RQ):
                conn.requested = True
            elif isinstance(pdu, P_DATA_TF):
                self._count_dataset_bytes(conn, pdu)

    def _count_dataset_bytes(self, conn: _Connection, pdu: P_DATA_TF) -> None:
        """Drop data set fragments beyond the size limit before pynetdicom buffers them.

        The message header byte of each fragment is kept, so pynetdicom still sees the
        message complete, and the C-STORE handler answers a refusal with an Error Comment
        (a response can only be sent once the peer has sent the whole request).
        """
        limit = self.limits.max_instance_bytes
        for item in pdu.presentation_data_value_items:
            data = item.presentation_data_value or b""
            if not data:
                continue
            header = data[0]
            if header & 0x01:              # command fragment: a new message starts
                conn.dataset_bytes = 0
                conn.dataset_started = 0.0
                continue
            if not conn.dataset_started:
                conn.dataset_started = time.perf_counter()
            conn.dataset_bytes += len(data) - 1
            if conn.dataset_bytes > limit:
                if conn.refused_bytes is None:
                    logger.warning("C-STORE from %s is larger than %d MB: dropping its data "
                                   "as it arrives", conn.host, limit // (1024 * 1024))
                conn.refused_bytes = conn.dataset_bytes
                item.presentation_data_value = data[:1]

    def _on_requested(self, event) -> None:
        """At most ``max_associations`` connections past their association request."""
        assoc = event.assoc
        with self._lock:
            conn = self._conn(assoc)
            busy = sum(1 for c in self._conns if c.requested and not c.closing and c is not conn)
            if conn is None or busy < self.limits.max_associations:
                return
            conn.closing = True
        self._log.warning(("busy",), "association from %s rejected: %d associations already "
                          "active (node.max_associations)", conn.host, busy)
        # What pynetdicom does for its own limit: A-ASSOCIATE-RJ, transient, local limit exceeded.
        assoc.requestor.ae_title = assoc.requestor.primitive.calling_ae_title   # for EVT_REJECTED
        assoc.acse.send_reject(0x02, 0x03, 0x02)
        evt.trigger(assoc, evt.EVT_REJECTED, {})
        assoc.kill()


class StoreSCP:
    """A running C-ECHO/C-STORE SCP; stop it with ``shutdown()``."""

    def __init__(self, settings: SCPSettings, on_instance: OnInstance,
                 on_event: Callable[[str, dict], None] | None = None,
                 on_commitment: OnCommitment | None = None):
        """``on_commitment``: with it, the node is a Storage Commitment Push Model SCP and
        hands every checked request to it (see ``dicom_node.commitment``)."""
        self.settings = settings
        self._on_instance = on_instance
        self._on_commitment = on_commitment
        self._on_event = on_event or (lambda name, info: None)
        self._server: _GuardedServer | None = None
        self._thread: threading.Thread | None = None
        self.ae = self._make_ae()

    def _make_ae(self) -> AE:
        s = self.settings
        ae = AE(ae_title=s.ae_title)
        ae.maximum_pdu_size = RECEIVE_PDU_BYTES
        # Our own limit (EVT_REQUESTED above) counts associations; pynetdicom's counts every
        # connection thread, half-open and just-closed ones too, so it stays as a backstop.
        ae.maximum_associations = 4 * s.max_associations
        ae.require_called_aet = s.require_called_aet
        ae.require_calling_aet = list(s.allowed_calling_aets)
        # pynetdicom's own timers for silent peers: ARTIM / the wait for the association
        # request, and the idle timer between PDUs; _GuardedServer covers dribbling ones.
        ae.acse_timeout = s.association_request_timeout_s
        ae.network_timeout = s.pdu_timeout_s
        ae.dimse_timeout = s.dimse_timeout
        ae.add_supported_context(VERIFICATION, [ImplicitVRLittleEndian, ExplicitVRLittleEndian])
        for sop_class in s.storage_sop_classes:
            ae.add_supported_context(sop_class, list(ACCEPTED_TRANSFER_SYNTAXES))
        if self._on_commitment is not None:
            ae.add_supported_context(STORAGE_COMMITMENT, list(NATIVE_TRANSFER_SYNTAXES))
        return ae

    @property
    def port(self) -> int:
        if self._server is None:
            return self.settings.port
        return self._server.server_address[1]

    @property
    def running(self) -> bool:
        """A server object exists (kept for compatibility; health checks want ``accepting``)."""
        return self._server is not None

    @property
    def accepting(self) -> bool:
        """True only while the accept loop runs and its socket is open and listening."""
        server, thread = self._server, self._thread
        if server is None or thread is None or not thread.is_alive():
            return False
        try:
            sock = server.socket
            return sock.fileno() != -1 and bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
        except (AttributeError, OSError):
            return False

    def start(self) -> "StoreSCP":
        handlers = [
            (evt.EVT_C_ECHO, self._handle_echo),
            (evt.EVT_C_STORE, self._handle_store),
            (evt.EVT_N_ACTION, self._handle_n_action),
            (evt.EVT_REJECTED, self._handle_rejected),
            (evt.EVT_ACCEPTED, self._handle_accepted),
            (evt.EVT_CONN_OPEN, self._handle_conn_open),
        ]
        self._server = self.ae.make_server(
            (self.settings.host, self.settings.port), evt_handlers=handlers,
            ssl_context=self.settings.ssl_context, server_class=_GuardedServer,
            limits=self.settings)
        self._thread = threading.Thread(target=self._serve, args=(self._server,),
                                        name="dicom-listener", daemon=True)
        self._thread.start()
        logger.info("DICOM listener %s on %s:%d%s", self.settings.ae_title, self.settings.host,
                    self.port, " (TLS)" if self.settings.ssl_context else "")
        return self

    @staticmethod
    def _serve(server: _GuardedServer) -> None:
        try:
            server.serve_forever(poll_interval=_POLL_S)
        except Exception:  # noqa: BLE001 - say so loudly; ``accepting`` turns False
            logger.exception("the DICOM listener stopped: no more images are accepted")

    def shutdown(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    # --------------------------------------------------------------- handlers
    def _handle_echo(self, event) -> int:
        return SUCCESS

    def _handle_conn_open(self, event) -> None:
        set_nodelay(event.assoc)   # responses go out at once, not after the peer's delayed ACK

    def _handle_accepted(self, event) -> None:
        self._on_event("association_accepted", {"calling_ae": event.assoc.requestor.ae_title})

    def _handle_rejected(self, event) -> None:
        logger.warning("association from %s rejected (calling AE %r)",
                       event.assoc.requestor.address, event.assoc.requestor.ae_title)
        self._on_event("association_rejected", {"calling_ae": event.assoc.requestor.ae_title})

    def _handle_store(self, event) -> Dataset | int:
        """Persist and return: checks, then the callback, which makes the instance durable."""
        started = time.perf_counter()
        request = event.request
        sop_class = str(request.AffectedSOPClassUID)
        sop_instance = str(request.AffectedSOPInstanceUID)
        server = self._server
        too_large = server.take_refused_size(event.assoc) if server is not None else None
        if too_large is not None:
            limit_mb = self.settings.max_instance_bytes / (1024 * 1024)
            logger.warning("C-STORE refused with 0x%04X: %.1f MB data set, limit %.0f MB "
                           "(node.max_instance_mb)", OUT_OF_RESOURCES, too_large / 1048576, limit_mb)
            return _status(OUT_OF_RESOURCES, f"Image too large for AI box: {too_large / 1048576:.0f} MB, "
                                             f"limit {limit_mb:.0f} MB; not stored")
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
        except Exception as exc:  # noqa: BLE001
            logger.warning("C-STORE refused: dataset cannot be decoded (%s)", type(exc).__name__)
            return _status(CANNOT_UNDERSTAND, "Dataset cannot be decoded")
        problem = check_dataset(ds, sop_class, sop_instance)
        if problem is not None:
            logger.warning("C-STORE refused with 0x%04X: %s", problem.status, problem.comment)
            return _status(problem.status, problem.comment)
        received = ReceivedInstance(
            encoded=event.encoded_dataset(include_meta=True),
            dataset=ds,
            sop_class_uid=sop_class,
            sop_instance_uid=sop_instance,
            transfer_syntax_uid=str(event.context.transfer_syntax),
            calling_ae=str(event.assoc.requestor.ae_title).strip(),
            called_ae=str(event.assoc.acceptor.ae_title).strip(),
            receive_started=started,
            transfer_started=server.dataset_started(event.assoc) if server is not None else 0.0,
        )
        try:
            result = self._on_instance(received)
        except Exception:  # noqa: BLE001 - never acknowledge what was not stored
            logger.exception("C-STORE processing failed; answered 0x%04X, nothing acknowledged",
                             PROCESSING_FAILURE)
            return _status(PROCESSING_FAILURE, "Internal error: not stored, please resend")
        if result.status != SUCCESS:
            logger.warning("C-STORE answered 0x%04X: %s", result.status, result.comment)
        return _status(result.status, result.comment)

    def _handle_n_action(self, event) -> tuple[Dataset | int, None]:
        """Storage commitment request: checked, handed over (journaled), answered at once;
        the result follows as an N-EVENT-REPORT (``dicom_node.commitment``)."""
        request = event.request
        if str(request.RequestedSOPClassUID) != STORAGE_COMMITMENT or self._on_commitment is None:
            return _status(ACTION_NO_SUCH_SOP_CLASS, "Only Storage Commitment Push Model"), None
        if str(request.RequestedSOPInstanceUID) != STORAGE_COMMITMENT_INSTANCE:
            return _status(ACTION_INVALID_OBJECT_INSTANCE, "Use the well-known instance 1.2.840.10008.1.20.1.1"), None
        if request.ActionTypeID != REQUEST_STORAGE_COMMITMENT:
            return _status(ACTION_NO_SUCH_ACTION, "Only Request Storage Commitment (1)"), None
        try:
            info = event.action_information
        except Exception:  # noqa: BLE001 - undecodable: parse_action_information says so
            info = None
        try:
            transaction_uid, items = parse_action_information(info)
        except CommitmentRequestError as exc:
            logger.warning("storage commitment request refused with 0x%04X: %s", exc.status, exc.comment)
            return _status(exc.status, exc.comment), None
        assoc = event.assoc
        commitment = CommitmentRequest(
            transaction_uid=transaction_uid, items=items,
            calling_ae=str(assoc.requestor.ae_title).strip(),
            called_ae=str(assoc.acceptor.ae_title).strip(),
            peer_host=str(assoc.requestor.address), channel=ReportChannel(assoc))
        try:
            status = self._on_commitment(commitment)
        except Exception:  # noqa: BLE001 - never promise what was not recorded
            logger.exception("storage commitment request could not be recorded; answered 0x%04X",
                             ACTION_PROCESSING_FAILURE)
            return _status(ACTION_PROCESSING_FAILURE, "Internal error: please request again"), None
        return status, None
