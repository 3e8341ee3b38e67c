"""C-ECHO and C-STORE SCP: the appliance's front door.

The node checks what is DICOM-level (association policy, that the dataset parses, that its
UIDs match the request, that the pixel data is complete) and hands every good instance to a
callback, which must persist it durably before returning a status. No AI work happens here.
"""
from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass, field
from typing import Callable

from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragments
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.transport import ThreadedAssociationServer

from .scu import set_nodelay
from .sop import ACCEPTED_STORAGE, ACCEPTED_TRANSFER_SYNTAXES, VERIFICATION

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
    max_associations: int = 8
    ssl_context: ssl.SSLContext | None = None
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
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
        if not _uid_ok(str(value)):
            return StoreResult(UID_INVALID, f"Invalid UID in {keyword}")
    if ds.SOPInstanceUID != affected_sop_instance:
        return StoreResult(DATASET_DOES_NOT_MATCH_SOP_CLASS, "SOPInstanceUID differs from request")
    if ds.SOPClassUID != affected_sop_class:
        return StoreResult(DATASET_DOES_NOT_MATCH_SOP_CLASS, "SOPClassUID differs from request")
    return _check_pixel_data(ds)


def _uid_ok(uid: str) -> bool:
    if not 0 < len(uid) <= 64:
        return False
    parts = uid.split(".")
    return all(p.isdigit() and (p == "0" or not p.startswith("0")) for p in parts)


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


class StoreSCP:
    """A running C-ECHO/C-STORE SCP; stop it with ``shutdown()``."""

    def __init__(self, settings: SCPSettings, on_instance: OnInstance,
                 on_event: Callable[[str, dict], None] | None = None):
        self.settings = settings
        self._on_instance = on_instance
        self._on_event = on_event or (lambda name, info: None)
        self._server: ThreadedAssociationServer | None = None
        self.ae = self._make_ae()

    def _make_ae(self) -> AE:
        s = self.settings
        ae = AE(ae_title=s.ae_title)
        ae.maximum_associations = s.max_associations
        ae.require_called_aet = s.require_called_aet
        ae.require_calling_aet = list(s.allowed_calling_aets)
        ae.acse_timeout = s.acse_timeout
        ae.dimse_timeout = s.dimse_timeout
        ae.network_timeout = s.network_timeout
        ae.add_supported_context(VERIFICATION, [ImplicitVRLittleEndian, ExplicitVRLittleEndian])
        for sop_class in s.storage_sop_classes:
            ae.add_supported_context(sop_class, list(ACCEPTED_TRANSFER_SYNTAXES))
        return ae

    @property
    def port(self) -> int:
        if self._server is None:
            return self.settings.port
        return self._server.server_address[1]

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> "StoreSCP":
        handlers = [
            (evt.EVT_C_ECHO, self._handle_echo),
            (evt.EVT_C_STORE, self._handle_store),
            (evt.EVT_REJECTED, self._handle_rejected),
            (evt.EVT_ACCEPTED, self._handle_accepted),
            (evt.EVT_CONN_OPEN, self._handle_conn_open),
        ]
        self._server = self.ae.start_server(
            (self.settings.host, self.settings.port), block=False,
            evt_handlers=handlers, ssl_context=self.settings.ssl_context)
        logger.info("DICOM listener %s on %s:%d%s", self.settings.ae_title, self.settings.host,
                    self.port, " (TLS)" if self.settings.ssl_context else "")
        return self

    def shutdown(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

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
        import time
        started = time.perf_counter()
        request = event.request
        sop_class = str(request.AffectedSOPClassUID)
        sop_instance = str(request.AffectedSOPInstanceUID)
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
