"""Storage commitment for the modality: what the box commits to, and when the result goes back.

The box is a Storage Commitment Push Model SCP (``dicom_node.commitment``). A request is
journaled before the N-ACTION is answered, so it survives a restart, and a thread of its
own decides and reports each one:

- an instance is committed when it is durable on the box: in the journal, its file
  present, of the SOP Class the modality names;
- with ``node.commitment = "forwarded"`` it must also have been acknowledged by every
  destination taking "source" (router mode). The result waits for that at most
  ``node.commitment_timeout_s`` after the request; instances still unconfirmed then are
  reported as failures;
- failure reasons: not on the box, No such object instance (0x0112); another SOP Class,
  Class/Instance conflict (0x0119); forwarding given up or not confirmed in time,
  Processing failure (0x0110).

The result goes back on the request's association while the modality keeps it open (once
``SAME_ASSOCIATION_GRACE_S`` has passed, so a modality that releases right after the
N-ACTION response is not raced), otherwise on a new association to the modality: the
``[[modalities]]`` entry with its calling AE title, else ``node.commitment_report_port`` at
the address the request came from. A result that cannot be delivered is retried with the
outbox's backoff until ``delivery.max_age_hours``.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from dicom_node.commitment import (
    ACTION_SUCCESS,
    CommitmentItem,
    CommitmentReport,
    CommitmentRequest,
    FailureReason,
    ReportChannel,
    send_report,
)
from dicom_node.scu import Peer, SendOutcome

from .config import Config
from .journal import CommitmentRow, Journal

logger = logging.getLogger(__name__)

#: A modality that wants the result on its own association keeps it open at least this long.
SAME_ASSOCIATION_GRACE_S = 1.0
_IDLE_WAIT_S = 5.0
_WAITING_POLL_S = 0.5


def _backoff_s(attempts: int, initial: float, cap: float) -> float:
    return min(cap, initial * (2 ** max(0, attempts - 1)))


class CommitmentService:
    """Journals storage commitment requests and reports their results."""

    def __init__(self, config: Config, journal: Journal, *, metrics=None,
                 report_sender: Callable[[Peer, CommitmentReport], SendOutcome] = send_report):
        self.config = config
        self.journal = journal
        self.metrics = metrics
        self._send_report = report_sender
        self._channels: dict[int, ReportChannel] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._warned_no_address: set[str] = set()

    @property
    def waits_for_forwarding(self) -> bool:
        return self.config.node.commitment == "forwarded" and bool(self.config.source_destinations)

    # ------------------------------------------------------------------ life cycle
    def start(self) -> "CommitmentService":
        waiting = self.journal.count_commitments_by_state().get("waiting", 0)
        if waiting:
            logger.info("%d storage commitment result(s) from before the restart still to report",
                        waiting)
        self._thread = threading.Thread(target=self._run, name="commitment", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def wake(self) -> None:
        """Something changed (an image stored, a forwarded copy acknowledged): look now."""
        self._wake.set()

    def dead_workers(self) -> list[str]:
        if self._stop.is_set() or self._thread is None:
            return []
        return [] if self._thread.is_alive() else [self._thread.name]

    # ------------------------------------------------------------------ the SCP's callback
    def on_request(self, request: CommitmentRequest) -> int:
        """Journal a request (in the N-ACTION handler); the N-ACTION status to answer."""
        now = time.time()
        wait = self.config.node.commitment_timeout_s if self.waits_for_forwarding else 0.0
        commitment_id = self.journal.record_commitment(
            request.transaction_uid, request.calling_ae, request.peer_host,
            [(i.sop_class_uid, i.sop_instance_uid) for i in request.items],
            decide_by=now + wait, now=now)
        if request.channel is not None:
            with self._lock:
                self._channels[commitment_id] = request.channel
        if self.metrics is not None:
            self.metrics.commitment_outcome("requested")
        logger.info("storage commitment requested by %s for %d instance(s) (transaction %s)",
                    request.calling_ae, len(request.items), request.transaction_uid)
        self._wake.set()
        return ACTION_SUCCESS

    # ------------------------------------------------------------------ loop
    def _run(self) -> None:
        while not self._stop.is_set():
            waiting = False
            try:
                for row in self.journal.waiting_commitments():
                    waiting = self._handle(row) or waiting
                nxt = self.journal.next_commitment_time()
            except Exception:  # noqa: BLE001 - the journal is busy or a peer misbehaved: go on
                logger.exception("storage commitment: a round of reports failed")
                nxt = None
            timeout = _IDLE_WAIT_S if nxt is None else max(0.05, min(_IDLE_WAIT_S, nxt - time.time()))
            if waiting:
                timeout = min(timeout, _WAITING_POLL_S)
            self._wake.wait(timeout)
            self._wake.clear()

    def _handle(self, row: CommitmentRow) -> bool:
        """Decide and report one request; True while it waits for something here."""
        now = time.time()
        report, reasons = self.evaluate(row, now=now)
        if report is None:
            return True
        with self._lock:
            channel = self._channels.get(row.id)
        if channel is not None and channel.is_open and time.monotonic() - channel.opened < SAME_ASSOCIATION_GRACE_S:
            return True   # does the modality keep its association open for the result?
        outcome = None
        if channel is not None and channel.is_open:
            outcome = channel.send(report)
            if not outcome.delivered:
                logger.info("storage commitment result for %s not accepted on the request's "
                            "association (%s); trying a new association", row.calling_ae, outcome.message)
        if outcome is None or not outcome.delivered:
            peer = self._peer_for(row)
            if peer is None:
                outcome = SendOutcome(False, None, self._no_address(row))
            else:
                outcome = self._send_report(peer, report)
        if outcome.delivered:
            self._reported(row, report, reasons)
        else:
            self._failed(row, outcome.message, now)
        return False

    def evaluate(self, row: CommitmentRow, *, now: float | None = None
                 ) -> tuple[CommitmentReport | None, dict[str, str]]:
        """The result of a request, or None while it waits for forwarding (and may still);
        with the reason of each failure, for the log."""
        now = time.time() if now is None else now
        verdicts = []
        for sop_class, sop_instance in row.items:
            item = CommitmentItem(sop_class, sop_instance)
            verdicts.append((item, *self._check(item)))
        if now < row.decide_by and any(verdict == "waiting" for _, verdict, _ in verdicts):
            return None, {}
        committed: list[CommitmentItem] = []
        failed: list[tuple[CommitmentItem, FailureReason]] = []
        reasons: dict[str, str] = {}
        for item, verdict, why in verdicts:   # in the order the modality asked
            if verdict is None:
                committed.append(item)
                continue
            if verdict == "waiting":
                verdict = FailureReason.PROCESSING_FAILURE
                why = f"{why} within {self.config.node.commitment_timeout_s:.0f} s (node.commitment_timeout_s)"
            failed.append((item, verdict))
            reasons[item.sop_instance_uid] = why
        return CommitmentReport(row.transaction_uid, tuple(committed), tuple(failed)), reasons

    def _check(self, item: CommitmentItem) -> tuple[FailureReason | str | None, str]:
        """None when committed, "waiting" while forwarding is under way, else a failure."""
        inst = self.journal.find_instance(item.sop_instance_uid)
        if inst is None or not (self.config.storage_dir / inst.path).is_file():
            return FailureReason.NO_SUCH_OBJECT_INSTANCE, "not stored on the box"
        if inst.sop_class_uid != item.sop_class_uid:
            return (FailureReason.CLASS_INSTANCE_CONFLICT,
                    f"stored with SOP Class {inst.sop_class_uid}, not {item.sop_class_uid}")
        if not self.waits_for_forwarding:
            return None, ""
        rows = {r.destination: r for r in self.journal.source_deliveries(item.sop_instance_uid)}
        for dest in self.config.source_destinations:
            row = rows.get(dest.name)
            if row is None:
                return FailureReason.PROCESSING_FAILURE, f"never queued for forwarding to {dest.name}"
            if row.state == "gave_up":
                return FailureReason.PROCESSING_FAILURE, f"forwarding to {dest.name} was given up"
            if row.state != "sent":
                return "waiting", f"not confirmed by {dest.name}"
        return None, ""

    # ------------------------------------------------------------------ delivery of results
    def _peer_for(self, row: CommitmentRow) -> Peer | None:
        node = self.config.node
        modality = self.config.modality(row.calling_ae)
        timeout = min(self.config.delivery.timeout_s, 30.0)
        if modality is not None:
            return Peer(ae_title=modality.ae_title, host=modality.host, port=modality.port,
                        calling_ae_title=node.ae_title, timeout_s=timeout)
        if node.commitment_report_port and row.peer_host:
            return Peer(ae_title=row.calling_ae, host=row.peer_host, port=node.commitment_report_port,
                        calling_ae_title=node.ae_title, timeout_s=timeout)
        return None

    def _no_address(self, row: CommitmentRow) -> str:
        message = (f"the modality {row.calling_ae} closed its association and the box has no address "
                   f"to send the storage commitment result to: add it under [[modalities]] "
                   f"(name, ae_title, host, port) or set node.commitment_report_port")
        if row.calling_ae not in self._warned_no_address:
            self._warned_no_address.add(row.calling_ae)
            logger.warning("%s; the result is kept and sent once the address is known", message)
        return message

    def _reported(self, row: CommitmentRow, report: CommitmentReport, reasons: dict[str, str]) -> None:
        self.journal.commitment_reported(
            row.id, event_type=report.event_type,
            failed=[(item.sop_instance_uid, int(reason)) for item, reason in report.failed])
        with self._lock:
            self._channels.pop(row.id, None)
        if report.failed:
            logger.warning("storage commitment for %s: %d of %d instance(s) NOT committed "
                           "(transaction %s)", row.calling_ae, len(report.failed), len(row.items),
                           row.transaction_uid)
            for item, reason in report.failed:
                logger.warning("  %s: 0x%04X %s", item.sop_instance_uid, int(reason),
                               reasons.get(item.sop_instance_uid, reason.name.lower()))
        else:
            logger.info("storage commitment for %s: all %d instance(s) committed (transaction %s)",
                        row.calling_ae, len(row.items), row.transaction_uid)
        if self.metrics is not None:
            self.metrics.commitment_outcome("failures" if report.failed else "committed")

    def _failed(self, row: CommitmentRow, message: str, now: float) -> None:
        delivery = self.config.delivery
        if now - row.received_at >= delivery.max_age_hours * 3600.0:
            logger.error("giving up the storage commitment result for %s (transaction %s) after "
                         "%.1f h: %s", row.calling_ae, row.transaction_uid,
                         (now - row.received_at) / 3600.0, message)
            self.journal.commitment_report_failed(row.id, message, retry_at=None, now=now)
            with self._lock:
                self._channels.pop(row.id, None)
            if self.metrics is not None:
                self.metrics.commitment_outcome("undeliverable")
            return
        delay = _backoff_s(row.attempts + 1, delivery.initial_backoff_s, delivery.max_backoff_s)
        level = logging.WARNING if row.attempts == 0 else logging.DEBUG
        logger.log(level, "storage commitment result for %s not delivered (%s); retry in %.0f s",
                   row.calling_ae, message, delay)
        self.journal.commitment_report_failed(row.id, message, retry_at=now + delay, now=now)
