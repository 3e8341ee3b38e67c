"""The outbox: sends queued objects to each destination until they are stored: result
objects, and in router mode the received images themselves (object type "source").

One sender thread per destination, so a PACS that is down does not hold up another.
Failures (no connection, abort, any failure status) are retried with exponential backoff
(1 s doubling, capped at 60 s by default) for as long as the delivery is younger than
``delivery.max_age_hours``; after that it is ``gave_up``, which the status page and the
metrics show. Warning statuses 0xB000/0xB006/0xB007 count as delivered.

Each sender reads only its own destination's due rows, so a backlog for a PACS that is down
never hides another destination's work. When nothing of a batch got through because the
PACS cannot be reached, the sender waits out that backoff (or a wake-up: new results, the
technician's "retry now") before trying its next batch.
The log says when a destination starts failing (WARNING, with the reason) and when it works
again (INFO); the retries in between are DEBUG.

Router mode: a forwarded image goes in the transfer syntax it was received in when the
destination accepts it, else losslessly converted (``dicom_node.scu.send_files``). Its
results are due at a destination only once it is sent there (``source_first``, the
journal's due query); when it is given up, they give up with it.
"""
from __future__ import annotations

import functools
import logging
import threading
import time
from typing import Callable

from dicom_node.scu import Peer, SendOutcome, instance_present, make_client_ssl_context, send_files
from dicom_node.transcode import native_copy

from .config import Config, Destination
from .config_outbound import FhirConfig
from .journal import DeliveryRow, Journal

logger = logging.getLogger(__name__)

BATCH = 24   # objects per association


def _what(row: DeliveryRow) -> str:
    """How logs name a delivery's object: "image" (forwarded) or "SR", "GSPS", "SC"."""
    return "image" if row.is_source else row.object_type.upper()


def backoff_s(attempts: int, initial: float, cap: float) -> float:
    """Delay before the next try after ``attempts`` failed tries (1, 2, 4, ... cap)."""
    return min(cap, initial * (2 ** max(0, attempts - 1)))


class Outbox:
    def __init__(self, config: Config, journal: Journal, *, metrics=None,
                 peer_factory: Callable[[Destination], Peer] | None = None):
        self.config = config
        self.journal = journal
        self.metrics = metrics
        self._peer_factory = peer_factory or self._peer
        self._wake = {d.name: threading.Event() for d in self._targets()}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._failing: dict[str, str] = {}   # destination -> why it fails, while it does
        self._unverifiable: set[str] = set()  # destinations that cannot answer C-FIND
        self._on_progress: list[Callable[[], None]] = []   # told after each batch (commitment)
        # Lossless conversions for a PACS that does not take a forwarded image's syntax:
        # decompressed in a child process with the analysis decoder's limits.
        self._scratch = config.storage_dir / "outbox-tmp"
        self._to_native = functools.partial(
            native_copy, timeout_s=max(60.0, config.analysis.decode_timeout_s),
            memory_mb=config.analysis.decode_memory_mb, work_dir=self._scratch)

    def _peer(self, dest: Destination) -> Peer:
        return destination_peer(self.config, dest)

    def _targets(self) -> list:
        """Every sender's target: the DICOM destinations and the EMR (``[fhir]``)."""
        return [*self.config.destinations, *([self.config.fhir] if self.config.fhir else [])]

    def on_progress(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` after every batch a sender has recorded."""
        self._on_progress.append(callback)

    def start(self) -> "Outbox":
        self._scratch.mkdir(parents=True, exist_ok=True)
        for leftover in self._scratch.glob(".native-*"):   # a conversion cut short by a stop
            leftover.unlink(missing_ok=True)
        for dest in self.config.destinations:
            if dest.tls and not dest.tls_verify:
                logger.warning("destination %s: the certificate of %s:%d is NOT verified "
                               "(tls_verify = false); anyone on the network path can pose as "
                               "the PACS and receive patient data. Set tls_ca to verify it",
                               dest.name, dest.host, dest.port)
        for dest in self._targets():
            t = threading.Thread(target=self._run, args=(dest,), name=f"outbox-{dest.name}", daemon=True)
            t.start()
            self._threads.append(t)
        self._give_up_unknown_destinations()
        return self

    def stop(self) -> None:
        self._stop.set()
        for ev in self._wake.values():
            ev.set()
        for t in self._threads:
            t.join(timeout=30)

    def wake(self) -> None:
        """New results are queued: look now rather than at the next timer."""
        for ev in self._wake.values():
            ev.set()

    def _give_up_unknown_destinations(self) -> None:
        """Deliveries to a destination removed from the config cannot be sent: say so."""
        known = {d.name for d in self._targets()}
        from .pipeline import LOCAL_DESTINATION
        for row in self.journal.due_deliveries(now=float("inf"), limit=10000, source_first=False):
            if row.destination not in known and row.destination != LOCAL_DESTINATION:
                self.journal.mark_delivery_failed(
                    row.id, f"destination {row.destination!r} is no longer configured", retry_at=None)

    # ------------------------------------------------------------------ loop
    def _run(self, dest: Destination) -> None:
        wake = self._wake[dest.name]
        while not self._stop.is_set():
            now = time.time()
            due = self.journal.due_deliveries(now=now, limit=BATCH, destination=dest.name,
                                              source_first=dest.source_first)
            if due:
                pause = self._send_batch(dest, due)
                for callback in self._on_progress:
                    callback()
                if pause:   # unreachable: the next batch after the backoff, or when woken
                    wake.wait(pause)
                    wake.clear()
                continue
            nxt = self.journal.next_delivery_time(dest.name, source_first=dest.source_first)
            timeout = 5.0 if nxt is None else min(5.0, max(0.05, nxt - now))
            wake.wait(timeout)
            wake.clear()

    def dead_workers(self) -> list[str]:
        """Sender threads that have stopped although the outbox was not stopped."""
        if self._stop.is_set():
            return []
        return [t.name for t in self._threads if not t.is_alive()]

    def _send_batch(self, dest: Destination, rows: list[DeliveryRow]) -> float:
        """Send ``rows`` over one association and record the outcomes image by image: the
        answers for one image's objects are journaled together (one disk flush) as soon as
        its last object is answered, before the next image's objects go out. Returns how
        long to wait before the next batch: the backoff when the PACS could not be reached
        at all."""
        if isinstance(dest, FhirConfig):
            return self._send_fhir(dest, rows)
        paths = [self.config.storage_dir / r.path for r in rows]
        missing = [r for r, p in zip(rows, paths) if not p.exists()]
        for r in missing:
            self.journal.mark_delivery_failed(r.id, f"{_what(r)} file is missing from storage", retry_at=None,
                                              path=r.path, hold_results=dest.source_first)
        rows = [r for r in rows if r not in missing]
        rows = self._confirm_unknown(dest, rows)
        if not rows:
            return 0.0
        paths = [self.config.storage_dir / r.path for r in rows]
        # Until their answers are journaled, a crash leaves these "unconfirmed": the PACS is
        # asked (C-FIND) before they are sent again, so it never gets one twice.
        self.journal.mark_in_flight([r.id for r in rows])
        batch = _Batch()

        def record(index: int, outcome: SendOutcome) -> None:
            batch.recorded.add(index)
            if outcome.delivered:
                batch.sent.append((rows[index], outcome))
                nxt = index + 1
                if nxt >= len(rows) or rows[nxt].sop_instance_uid != rows[index].sop_instance_uid:
                    self._record_sent(dest, batch)
                return
            self._record_sent(dest, batch)
            self._record_outcome(dest, rows[index], outcome, batch)

        started = time.perf_counter()
        timings: dict = {}
        try:
            outcomes = send_files(self._peer_factory(dest), paths, on_outcome=record,
                                  to_native=self._to_native, timings=timings)
        except Exception as exc:  # noqa: BLE001 - unreadable file, TLS setup error, ...
            logger.debug("sending to %s raised", dest.name, exc_info=True)
            error = f"{type(exc).__name__}: {exc}"
            outcomes = [SendOutcome(False, None, error) for _ in rows]
        elapsed = time.perf_counter() - started
        self._record_sent(dest, batch)
        for index, outcome in enumerate(outcomes):
            if index not in batch.recorded:
                record(index, outcome)
        self._record_sent(dest, batch)
        self._note_state(dest, batch.failures, delivered=bool(batch.delivered))
        if batch.delivered:
            detail = {}
            if "associate" in timings:   # where the delivery's time went, per image
                stores = list(zip(rows, timings.get("store", [])))
                detail = {uid: {"deliver_associate": timings["associate"],
                                "deliver_stores": sum(ms for r, ms in stores if r.sop_instance_uid == uid),
                                **{f"deliver_{r.object_type}": ms for r, ms in stores if r.sop_instance_uid == uid}}
                          for uid in batch.delivered}
            self._record_delivered(batch.delivered, elapsed * 1000.0 / max(1, len(rows)), detail)
        unreachable = not batch.delivered and all(o.status is None for o in outcomes)
        return batch.pause if unreachable else 0.0

    def _record_sent(self, dest: Destination, batch: "_Batch") -> None:
        """Journal the delivered objects not yet recorded, in one transaction."""
        if not batch.sent:
            return
        sent, batch.sent = batch.sent, []
        self.journal.mark_deliveries_sent(
            [(row.id, None if outcome.status == 0 else outcome.message, row.path) for row, outcome in sent])
        for row, _ in sent:
            batch.delivered.add(row.sop_instance_uid)
            self._count(dest.name, "sent", row.object_type)

    def _record_outcome(self, dest: Destination, row: DeliveryRow, outcome: SendOutcome,
                        batch: "_Batch") -> None:
        """Journal one object's answer at once (sent, retry later, or given up)."""
        now = time.time()
        if outcome.delivered:
            self.journal.mark_delivery_sent(row.id, note=None if outcome.status == 0 else outcome.message,
                                            now=now, path=row.path)
            batch.delivered.add(row.sop_instance_uid)
            self._count(dest.name, "sent", row.object_type)
            return
        batch.failures.append((row, outcome.message))
        age_s = now - row.created_at
        if age_s >= self.config.delivery.max_age_hours * 3600.0:
            logger.error("giving up delivery of the %s to %s after %.1f h: %s",
                         _what(row), dest.name, age_s / 3600.0, outcome.message)
            self.journal.mark_delivery_failed(row.id, outcome.message, retry_at=None, now=now,
                                              path=row.path, hold_results=dest.source_first)
            self._count(dest.name, "gave_up", row.object_type)
            return
        delay = backoff_s(row.attempts + 1, self.config.delivery.initial_backoff_s,
                          self.config.delivery.max_backoff_s)
        logger.debug("delivery of the %s to %s failed (%s); retry in %.0f s",
                     _what(row), dest.name, outcome.message, delay)
        self.journal.mark_delivery_failed(row.id, outcome.message, retry_at=now + delay, now=now,
                                          path=row.path)
        self._count(dest.name, "retry", row.object_type)
        batch.pause = max(batch.pause, delay)

    def _send_fhir(self, emr: FhirConfig, rows: list[DeliveryRow]) -> float:
        """POST each transaction to the EMR, in order. A resend after an interruption is
        safe: every entry is a conditional update on a stable identifier. A refusal of
        the content (4xx other than 408/429) is given up at once with the EMR's message."""
        from .fhir_client import post_transaction

        batch = _Batch()
        for row in rows:
            path = self.config.storage_dir / row.path
            try:
                data = path.read_bytes()
            except OSError as exc:
                self.journal.mark_delivery_failed(row.id, f"FHIR bundle unreadable ({exc.strerror or exc})",
                                                  retry_at=None, path=row.path)
                self._count(emr.name, "gave_up", row.object_type)
                continue
            self.journal.mark_in_flight([row.id])
            started = time.perf_counter()
            outcome = post_transaction(emr, data)
            if outcome.permanent:
                logger.error("the EMR %s refused the FHIR results of an image (not retried): %s",
                             emr.name, outcome.message)
                self.journal.mark_delivery_failed(row.id, outcome.message, retry_at=None, path=row.path)
                self._count(emr.name, "gave_up", row.object_type)
                continue
            status = 0 if outcome.delivered else outcome.status
            self._record_outcome(emr, row, SendOutcome(outcome.delivered, status, outcome.message), batch)
            if outcome.delivered:
                self._record_delivered({row.sop_instance_uid}, (time.perf_counter() - started) * 1000.0)
            elif outcome.status is None:   # unreachable: the rest waits for the backoff
                break
        self._note_state(emr, batch.failures, delivered=bool(batch.delivered))
        return batch.pause if batch.failures and not batch.delivered else 0.0

    def _confirm_unknown(self, dest: Destination, rows: list[DeliveryRow]) -> list[DeliveryRow]:
        """Objects whose earlier send has no recorded answer (the box stopped mid-send, or
        the journal was rebuilt) are looked up at the PACS first (C-FIND), so that it does
        not receive them twice. Returns the rows still to send."""
        to_send = []
        for row in rows:
            if row.unconfirmed_at is None or self._other_versions_sent(row):
                to_send.append(row)
                continue
            present = None
            try:
                from pydicom import dcmread
                ds = dcmread(self.config.storage_dir / row.path, stop_before_pixels=True,
                             specific_tags=["StudyInstanceUID", "SeriesInstanceUID"])
                present = instance_present(self._peer_factory(dest), str(ds.StudyInstanceUID),
                                           str(ds.SeriesInstanceUID), row.result_uid)
            except Exception:  # noqa: BLE001 - cannot tell: send it
                logger.debug("checking %s at %s failed", row.result_uid, dest.name, exc_info=True)
            if present:
                self.journal.mark_delivery_sent(
                    row.id, note="already held by the PACS (checked after an interruption)",
                    count_attempt=False, path=row.path)
                logger.info("the %s of %s was already at %s (sent before an interruption): "
                            "not sent again", _what(row), row.sop_instance_uid, dest.name)
                continue
            if present is None and dest.name not in self._unverifiable:
                self._unverifiable.add(dest.name)
                logger.warning("%s does not answer C-FIND queries: objects whose earlier send was "
                               "interrupted are sent again, and the PACS may receive them twice",
                               dest.name)
            to_send.append(row)
        return to_send

    def _note_state(self, dest: Destination, failures: list[tuple[DeliveryRow, str]], *,
                    delivered: bool) -> None:
        """Log when a destination starts failing (nothing of a batch got through) and when it
        works again, not every retry; an object refused while others get through is
        logged at its first failure."""
        if failures and not delivered:
            if dest.name not in self._failing:
                self._failing[dest.name] = failures[0][1]
                where = (dest.base_url if isinstance(dest, FhirConfig)
                         else f"{dest.ae_title}@{dest.host}:{dest.port}")
                logger.warning("delivery to %s (%s) is failing: %s; retrying with backoff "
                               "(up to %.0f s) until it works again", dest.name, where,
                               failures[0][1], self.config.delivery.max_backoff_s)
            return
        if delivered and dest.name in self._failing:
            reason = self._failing.pop(dest.name)
            logger.info("delivery to %s works again (it failed with: %s)", dest.name, reason)
        for row, message in failures:
            if row.attempts == 0:
                logger.warning("%s to %s not delivered, will retry with backoff: %s",
                               _what(row), dest.name, message)

    def _other_versions_sent(self, row: DeliveryRow) -> bool:
        """A forwarded image received in several versions under one UID: a C-FIND cannot
        tell which one the PACS holds, so the latest is sent whatever it answers."""
        if not row.is_source:
            return False
        inst = self.journal.find_instance(row.sop_instance_uid)
        return inst is not None and inst.conflicts > 0

    def _count(self, destination: str, outcome: str, object_type: str) -> None:
        if self.metrics is not None:
            self.metrics.delivery_outcome(destination, outcome, object_type=object_type)

    def _record_delivered(self, uids: set[str], per_object_ms: float,
                          detail: dict[str, dict[str, float]] | None = None) -> None:
        """Deliver-stage timing, and end-to-end when an instance has nothing left to send."""
        for uid in uids:
            rows = self.journal.deliveries_for(uid)
            if any(r.state in ("pending", "retrying") for r in rows):
                continue
            inst = self.journal.find_instance(uid)
            if inst is None or inst.state in ("received", "analyzing"):
                continue   # a forwarded image whose results are still to come
            if "deliver" not in inst.timings:
                self.journal.add_timings(uid, {"deliver": per_object_ms * len(rows),
                                               **(detail or {}).get(uid, {})})
                if self.metrics is not None:
                    self.metrics.observe_stage("deliver", per_object_ms * len(rows) / 1000.0)
                    last = max((r.sent_at or 0) for r in rows)
                    self.metrics.observe_end_to_end(max(0.0, last - inst.received_at))


class _Batch:
    """What one association's sends came to."""

    def __init__(self) -> None:
        self.recorded: set[int] = set()      # indexes of the batch whose answer is known
        self.sent: list[tuple[DeliveryRow, SendOutcome]] = []   # delivered, not yet journaled
        self.delivered: set[str] = set()     # instances with an object delivered
        self.failures: list[tuple[DeliveryRow, str]] = []
        self.pause = 0.0


def destination_peer(config: Config, dest: Destination, timeout_s: float | None = None) -> Peer:
    """How to reach a destination: AE titles, address, and TLS when the destination asks for
    it: the PACS certificate checked against ``tls_ca`` (else ``node.tls_ca``) and
    ``tls_server_name`` (else the host) unless ``tls_verify`` is false, and the box's own
    certificate (``node.tls_cert``/``tls_key``) presented when configured."""
    ssl_context = None
    if dest.tls:
        node = config.node
        ssl_context = make_client_ssl_context(
            ca=(dest.tls_ca or node.tls_ca) if dest.tls_verify else None,
            cert=node.tls_cert, key=node.tls_key, verify=dest.tls_verify)
    return Peer(ae_title=dest.ae_title, host=dest.host, port=dest.port,
                calling_ae_title=dest.calling_ae_title or config.node.ae_title,
                ssl_context=ssl_context,
                timeout_s=timeout_s if timeout_s is not None else config.delivery.timeout_s,
                tls_server_name=dest.tls_server_name)
