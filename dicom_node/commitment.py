"""Storage Commitment Push Model (PS3.4 Annex J), SCP side: the request a modality sends
(N-ACTION "Request Storage Commitment"), the result the node sends back (N-EVENT-REPORT),
and the two ways that result can travel.

The node only speaks DICOM: whether an instance is committed is the callback's decision
(``edge.commitment``). The result goes out on the association that carried the request
while the modality keeps it open (``ReportChannel``); otherwise the node opens an
association to the modality and proposes the SCP role for the SOP class, which the
modality must accept (PS3.4 J.3.3.1.3).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from enum import IntEnum

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pynetdicom import build_role

from .scu import Peer, SendOutcome, _ae, _associate, _why_no_association
from .sop import NATIVE_TRANSFER_SYNTAXES, STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE

logger = logging.getLogger(__name__)

#: Action Type ID of "Request Storage Commitment" (PS3.4 J.3.2).
REQUEST_STORAGE_COMMITMENT = 1
#: Event Type IDs of the result (PS3.4 J.3.3).
EVENT_ALL_COMMITTED = 1
EVENT_FAILURES_EXIST = 2
#: Most instances one request may name (a chest X-ray study has a handful).
MAX_ITEMS = 10000

# N-ACTION response statuses (PS3.7 10.1.4.1.10) the node answers with.
ACTION_SUCCESS = 0x0000
ACTION_PROCESSING_FAILURE = 0x0110
ACTION_INVALID_ARGUMENT = 0x0115
ACTION_INVALID_OBJECT_INSTANCE = 0x0117
ACTION_NO_SUCH_SOP_CLASS = 0x0118
ACTION_NO_SUCH_ACTION = 0x0123
ACTION_RESOURCE_LIMITATION = 0x0213


class FailureReason(IntEnum):
    """Failure Reason (0008,1197) of an instance in the Failed SOP Sequence (PS3.3 C.14.1.1)."""
    PROCESSING_FAILURE = 0x0110
    NO_SUCH_OBJECT_INSTANCE = 0x0112
    CLASS_INSTANCE_CONFLICT = 0x0119
    REFERENCED_SOP_CLASS_NOT_SUPPORTED = 0x0122
    DUPLICATE_TRANSACTION_UID = 0x0131
    RESOURCE_LIMITATION = 0x0213


@dataclass(frozen=True)
class CommitmentItem:
    """One instance a modality asks about."""
    sop_class_uid: str
    sop_instance_uid: str


class CommitmentRequestError(ValueError):
    """An N-ACTION the node cannot take on; ``status`` is the N-ACTION status to answer."""

    def __init__(self, status: int, comment: str):
        super().__init__(comment)
        self.status = status
        self.comment = comment


@dataclass(frozen=True)
class CommitmentRequest:
    """A checked storage commitment request, as the modality sent it."""
    transaction_uid: str
    items: tuple[CommitmentItem, ...]
    calling_ae: str
    called_ae: str
    peer_host: str
    channel: "ReportChannel | None" = None   # the request's association, while it is open


def uid_ok(uid: str) -> bool:
    """A syntactically valid UID (PS3.5 9.1): digits and dots, no leading zeros, <= 64."""
    if not 0 < len(uid) <= 64:
        return False
    return all(p.isdigit() and (p == "0" or not p.startswith("0")) for p in uid.split("."))


def parse_action_information(ds: Dataset | None) -> tuple[str, tuple[CommitmentItem, ...]]:
    """Transaction UID and referenced instances of a request (PS3.4 Table J.3-1); raises
    ``CommitmentRequestError`` (0x0115, Invalid Argument Value) naming what is wrong."""
    if ds is None:
        raise CommitmentRequestError(ACTION_INVALID_ARGUMENT, "No Action Information")
    try:
        transaction_uid = str(ds.get("TransactionUID", "") or "").strip()
        sequence = ds.get("ReferencedSOPSequence")
        if not transaction_uid or not uid_ok(transaction_uid):
            raise CommitmentRequestError(ACTION_INVALID_ARGUMENT, "Missing or invalid TransactionUID")
        if not sequence:
            raise CommitmentRequestError(ACTION_INVALID_ARGUMENT, "Empty ReferencedSOPSequence")
        if len(sequence) > MAX_ITEMS:
            raise CommitmentRequestError(ACTION_INVALID_ARGUMENT,
                                         f"More than {MAX_ITEMS} instances in one request")
        items = []
        for item in sequence:
            cls = str(item.get("ReferencedSOPClassUID", "") or "").strip()
            inst = str(item.get("ReferencedSOPInstanceUID", "") or "").strip()
            if not (uid_ok(cls) and uid_ok(inst)):
                raise CommitmentRequestError(ACTION_INVALID_ARGUMENT,
                                             "Missing or invalid UID in ReferencedSOPSequence")
            items.append(CommitmentItem(cls, inst))
    except CommitmentRequestError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoding problem is an invalid argument
        raise CommitmentRequestError(ACTION_INVALID_ARGUMENT,
                                     f"Action Information cannot be read: {type(exc).__name__}") from None
    return transaction_uid, tuple(dict.fromkeys(items))


@dataclass(frozen=True)
class CommitmentReport:
    """The result of one request: which instances the node commits to, which it does not."""
    transaction_uid: str
    committed: tuple[CommitmentItem, ...]
    failed: tuple[tuple[CommitmentItem, FailureReason], ...] = ()

    @property
    def event_type(self) -> int:
        return EVENT_FAILURES_EXIST if self.failed else EVENT_ALL_COMMITTED

    def dataset(self, retrieve_ae: str | None = None) -> Dataset:
        """Event Information (PS3.4 Table J.3-2)."""
        ds = Dataset()
        ds.TransactionUID = self.transaction_uid
        if retrieve_ae:
            ds.RetrieveAETitle = retrieve_ae
        if self.committed:
            ds.ReferencedSOPSequence = Sequence([_item(i) for i in self.committed])
        if self.failed:
            failed = []
            for item, reason in self.failed:
                entry = _item(item)
                entry.FailureReason = int(reason)
                failed.append(entry)
            ds.FailedSOPSequence = Sequence(failed)
        return ds


def _item(item: CommitmentItem) -> Dataset:
    ds = Dataset()
    ds.ReferencedSOPClassUID = item.sop_class_uid
    ds.ReferencedSOPInstanceUID = item.sop_instance_uid
    return ds


def _outcome(status_ds: Dataset, where: str) -> SendOutcome:
    if "Status" not in status_ds:
        return SendOutcome(False, None, f"N-EVENT-REPORT to {where} got no response (timeout or abort)")
    status = int(status_ds.Status)
    if status == 0:
        return SendOutcome(True, 0, f"N-EVENT-REPORT accepted by {where}")
    return SendOutcome(False, status, f"N-EVENT-REPORT to {where} answered 0x{status:04X}")


class ReportChannel:
    """The association a request arrived on. ``send`` must be called from a thread other
    than the association's own (pynetdicom pauses its reactor for the exchange)."""

    def __init__(self, assoc) -> None:
        self._assoc = assoc
        self.opened = time.monotonic()

    @property
    def is_open(self) -> bool:
        return bool(self._assoc.is_established)

    def send(self, report: CommitmentReport, retrieve_ae: str | None = None) -> SendOutcome:
        where = "the requesting association"
        if not self.is_open:
            return SendOutcome(False, None, f"{where} is closed")
        try:
            status, _ = self._assoc.send_n_event_report(
                report.dataset(retrieve_ae), report.event_type, STORAGE_COMMITMENT,
                STORAGE_COMMITMENT_INSTANCE)
        except Exception as exc:  # noqa: BLE001 - closed meanwhile, encoding error
            return SendOutcome(False, None, f"N-EVENT-REPORT on {where} failed: {type(exc).__name__}: {exc}")
        return _outcome(status, where)


def send_report(peer: Peer, report: CommitmentReport, retrieve_ae: str | None = None) -> SendOutcome:
    """Send a result to the modality over a new association, on which the node proposes
    the SCP role for Storage Commitment (the modality, as SCU, accepts the report)."""
    ae = _ae(peer)
    ae.add_requested_context(STORAGE_COMMITMENT, list(NATIVE_TRANSFER_SYNTAXES))
    role = build_role(STORAGE_COMMITMENT, scp_role=True)
    assoc = _associate(ae, peer, ext_neg=[role])
    if not assoc.is_established:
        return SendOutcome(False, None, _why_no_association(assoc, peer))
    where = f"{peer.ae_title}@{peer.host}:{peer.port}"
    try:
        status, _ = assoc.send_n_event_report(report.dataset(retrieve_ae), report.event_type,
                                              STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE)
        outcome = _outcome(status, where)
    except Exception as exc:  # noqa: BLE001 - the context was refused, the peer went away
        outcome = SendOutcome(False, None, f"N-EVENT-REPORT to {where} failed: {type(exc).__name__}: {exc}")
    finally:
        if assoc.is_established:
            assoc.release()
    return outcome
