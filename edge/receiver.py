"""What the appliance does with each instance the DICOM node receives: persist, journal, wake.

Order matters for durability: the file is durable before the journal row is committed,
and the SCP answers success only after both. Anything else answers a failure status so
the modality sends again. In router mode the same journal transaction queues the image for
forwarding to every destination taking "source", analysed or not.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Callable

from dicom_node.scp import OUT_OF_RESOURCES, PROCESSING_FAILURE, SUCCESS, ReceivedInstance, StoreResult

from . import gc_timer
from .journal import Journal, NewInstance
from .storage import Spool

logger = logging.getLogger(__name__)


def _text(ds, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value)


class _KeyedLocks:
    """One lock per key, alive while someone holds or waits for it."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, list] = {}   # key -> [lock, holders and waiters]

    @contextlib.contextmanager
    def holding(self, key: str):
        with self._guard:
            entry = self._locks.setdefault(key, [threading.Lock(), 0])
            entry[1] += 1
        try:
            with entry[0]:
                yield
        finally:
            with self._guard:
                entry[1] -= 1
                if entry[1] == 0:
                    del self._locks[key]


class Receiver:
    """The C-STORE callback: ``Receiver(...)(received) -> StoreResult``."""

    def __init__(self, journal: Journal, spool: Spool, *,
                 on_new: Callable[[str], None] | None = None,
                 on_received: Callable[[str], None] | None = None,
                 observe_stage: Callable[[str, float], None] | None = None,
                 forward_to: tuple[str, ...] = ()):
        """``forward_to``: destinations that take the received images themselves (router
        mode); ``on_new(uid)`` is called for each new or changed instance."""
        self.journal = journal
        self.spool = spool
        self.forward_to = tuple(forward_to)
        self._on_new = on_new or (lambda uid: None)
        self._on_received = on_received or (lambda calling_ae: None)
        self._observe = observe_stage or (lambda stage, seconds: None)
        self._locks = _KeyedLocks()

    def __call__(self, received: ReceivedInstance) -> StoreResult:
        data = received.encoded
        if not self.spool.has_room_for(len(data)):
            logger.error("disk below its reserve of %d MB: refusing new images (0xA700) until "
                         "space is freed", self.spool.min_free_mb)
            return StoreResult(OUT_OF_RESOURCES, "Disk full on AI box: not stored, resend later")
        ds = received.dataset
        t_checked, gc0 = time.perf_counter(), gc_timer.gc_ms()
        digest = Spool.digest(data)
        # Serialise per SOP Instance UID: two associations sending the same UID must not
        # interleave between the duplicate check and the write. Different images are written
        # (and fsynced) side by side: one sender's disk flush does not hold up another's.
        with self._locks.holding(received.sop_instance_uid):
            t_locked = time.perf_counter()
            existing = self.journal.find_instance(received.sop_instance_uid)
            if existing is not None and existing.sha256 == digest:
                logger.info("instance resent with identical bytes: acknowledged, not analyzed again")
                self._on_received(received.calling_ae)
                return StoreResult(SUCCESS)
            try:
                rel, written = self.spool.store(str(ds.StudyInstanceUID), received.sop_instance_uid,
                                                data, digest)
            except OSError as exc:   # disk full, read-only, I/O error: the modality resends
                logger.error("could not write a received image to the spool (%s): answered 0xA700",
                             exc.strerror or type(exc).__name__)
                return StoreResult(OUT_OF_RESOURCES, "AI box cannot write to disk: resend later")
            t_written = time.perf_counter()
            new = NewInstance(
                sop_instance_uid=received.sop_instance_uid,
                sop_class_uid=received.sop_class_uid,
                study_instance_uid=str(ds.StudyInstanceUID),
                series_instance_uid=str(ds.SeriesInstanceUID),
                transfer_syntax=received.transfer_syntax_uid,
                calling_ae=received.calling_ae,
                path=rel,
                sha256=digest,
                size_bytes=len(data),
                patient_name=_text(ds, "PatientName"),
                patient_id=_text(ds, "PatientID"),
                modality=_text(ds, "Modality"),
            )
            timings = {"store": (t_written - (received.receive_started or t_checked)) * 1000.0,
                       "store_checks": (t_checked - (received.receive_started or t_checked)) * 1000.0,
                       "store_digest": (t_locked - t_checked) * 1000.0,   # with the wait for the lock
                       "store_write": (t_written - t_locked) * 1000.0,
                       "store_gc": gc_timer.gc_ms() - gc0}
            if received.transfer_started and received.receive_started:
                timings["transfer"] = (received.receive_started - received.transfer_started) * 1000.0
            try:
                outcome = self.journal.record_received(new, timings_ms=timings, forward_to=self.forward_to)
            except Exception:
                logger.exception("journal write failed; the instance is not acknowledged")
                if written:   # never acknowledged: remove what this call wrote
                    self.spool.absolute(rel).unlink(missing_ok=True)
                return StoreResult(PROCESSING_FAILURE, "Journal error on AI box: resend later")
        store_s = time.perf_counter() - (received.receive_started or t_checked)
        self._observe("store", store_s)
        self._on_received(received.calling_ae)
        if outcome == "conflict":
            logger.warning("instance %s received again with different content: both versions "
                           "are kept, the new one is analyzed (its results get new UIDs)",
                           received.sop_instance_uid)
        self._on_new(received.sop_instance_uid)
        return StoreResult(SUCCESS)
