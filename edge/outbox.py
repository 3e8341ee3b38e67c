"""The outbox: sends queued result objects to each destination until they are stored.

One sender thread per destination, so a PACS that is down does not hold up another.
Failures (no connection, abort, any failure status) are retried with exponential backoff
(1 s doubling, capped at 60 s by default) for as long as the delivery is younger than
``delivery.max_age_hours``; after that it is ``gave_up``, which the status page and the
metrics show. Warning statuses 0xB000/0xB006/0xB007 count as delivered.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from dicom_node.scu import Peer, make_client_ssl_context, send_files

from .config import Config, Destination
from .journal import DeliveryRow, Journal

logger = logging.getLogger(__name__)

BATCH = 24   # objects per association


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
        self._wake = {d.name: threading.Event() for d in config.destinations}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _peer(self, dest: Destination) -> Peer:
        return destination_peer(self.config, dest)

    def start(self) -> "Outbox":
        for dest in self.config.destinations:
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
        known = {d.name for d in self.config.destinations}
        from .pipeline import LOCAL_DESTINATION
        for row in self.journal.due_deliveries(now=float("inf"), limit=10000):
            if row.destination not in known and row.destination != LOCAL_DESTINATION:
                self.journal.mark_delivery_failed(
                    row.id, f"destination {row.destination!r} is no longer configured", retry_at=None)

    # ------------------------------------------------------------------ loop
    def _run(self, dest: Destination) -> None:
        wake = self._wake[dest.name]
        while not self._stop.is_set():
            now = time.time()
            due = [d for d in self.journal.due_deliveries(now=now, limit=500)
                   if d.destination == dest.name]
            if due:
                self._send_batch(dest, due[:BATCH])
                continue
            nxt = self.journal.next_delivery_time(dest.name)
            timeout = 5.0 if nxt is None else min(5.0, max(0.05, nxt - now))
            wake.wait(timeout)
            wake.clear()

    def _send_batch(self, dest: Destination, rows: list[DeliveryRow]) -> None:
        peer = self._peer_factory(dest)
        paths = [self.config.storage_dir / r.path for r in rows]
        missing = [r for r, p in zip(rows, paths) if not p.exists()]
        for r in missing:
            self.journal.mark_delivery_failed(r.id, "result file is missing from storage", retry_at=None)
        rows = [r for r in rows if r not in missing]
        paths = [self.config.storage_dir / r.path for r in rows]
        if not rows:
            return
        started = time.perf_counter()
        try:
            outcomes = send_files(peer, paths)
        except Exception as exc:  # noqa: BLE001 - unreadable file, TLS error, ...
            logger.exception("sending to %s failed", dest.name)
            outcomes = [None] * len(rows)
            error = f"{type(exc).__name__}: {exc}"
        else:
            error = ""
        elapsed = time.perf_counter() - started
        now = time.time()
        finished_instances: set[str] = set()
        for row, outcome in zip(rows, outcomes):
            if outcome is not None and outcome.delivered:
                self.journal.mark_delivery_sent(row.id, note=None if outcome.status == 0 else outcome.message, now=now)
                finished_instances.add(row.sop_instance_uid)
                self._count(dest.name, "sent")
                continue
            message = outcome.message if outcome is not None else error
            age_s = now - row.created_at
            if age_s >= self.config.delivery.max_age_hours * 3600.0:
                logger.error("giving up delivery of a %s to %s after %.1f h: %s",
                             row.object_type.upper(), dest.name, age_s / 3600.0, message)
                self.journal.mark_delivery_failed(row.id, message, retry_at=None, now=now)
                self._count(dest.name, "gave_up")
            else:
                delay = backoff_s(row.attempts + 1, self.config.delivery.initial_backoff_s,
                                  self.config.delivery.max_backoff_s)
                logger.warning("delivery to %s failed (%s); retry in %.0f s", dest.name, message, delay)
                self.journal.mark_delivery_failed(row.id, message, retry_at=now + delay, now=now)
                self._count(dest.name, "retry")
        if finished_instances:
            self._record_delivered(finished_instances, elapsed * 1000.0 / max(1, len(rows)))

    def _count(self, destination: str, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.delivery_outcome(destination, outcome)

    def _record_delivered(self, uids: set[str], per_object_ms: float) -> None:
        """Deliver-stage timing, and end-to-end when an instance has nothing left to send."""
        for uid in uids:
            rows = self.journal.deliveries_for(uid)
            if any(r.state in ("pending", "retrying") for r in rows):
                continue
            inst = self.journal.find_instance(uid)
            if inst is None:
                continue
            if "deliver" not in inst.timings:
                self.journal.add_timings(uid, {"deliver": per_object_ms * len(rows)})
                if self.metrics is not None:
                    self.metrics.observe_stage("deliver", per_object_ms * len(rows) / 1000.0)
                    last = max((r.sent_at or 0) for r in rows)
                    self.metrics.observe_end_to_end(max(0.0, last - inst.received_at))



def destination_peer(config: Config, dest: Destination, timeout_s: float | None = None) -> Peer:
    """How to reach a destination: AE titles, address, and TLS with the box's own
    certificate (``node.tls_*``) when the destination asks for it."""
    ssl_context = None
    if dest.tls:
        node = config.node
        ssl_context = make_client_ssl_context(ca=node.tls_ca, cert=node.tls_cert, key=node.tls_key)
    return Peer(ae_title=dest.ae_title, host=dest.host, port=dest.port,
                calling_ae_title=dest.calling_ae_title or config.node.ae_title,
                ssl_context=ssl_context,
                timeout_s=timeout_s if timeout_s is not None else config.delivery.timeout_s)
