"""The SR of an image built in a second process while this one builds its GSPS and SC.

Reporting is the largest part of an image's analysis, and the TID 1500 SR (highdicom's
content tree, then its encoding) is about three quarters of it. On a box with cores to
spare the SR goes to one long-lived child process while the analysis thread builds the
other objects, so the image's results are ready in about the SR's time instead of the sum.
On the 2-core benchmark machine, since the SR's construction stopped re-reading its own
content tree, it pays there too: three interleaved A/B runs of ``python -m benchmarks.e2e
--sizes 2048 --inputs raw --images 12 --throughput-images 16 --senders 4`` gave a
first-byte p50 of 412/408/443 ms against 451/447/465 ms in this process, and 4 senders'
p95 2786/2836/3202 ms against 3159/3234/3492 ms (throughput +12%). It is used from
``MIN_CORES`` cores up: with one core the child could only take turns with the analysis.

The child runs the same functions on the same inputs (the source's metadata, the findings,
the same keyword arguments), so its bytes are identical to an in-process build. Anything
unusual (the child still warming up, a crash, a source with its pixels loaded, any error)
falls back to building the SR in this process, which then raises whatever it raises: the
child never decides an image's fate.
"""
from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
import os
import time
from typing import Any

logger = logging.getLogger(__name__)

#: A child taking longer than this for one SR is given up for that image (built here).
RESULT_TIMEOUT_S = 30.0
#: The child is started on machines with at least this many cores.
MIN_CORES = 2


def encoded_sr(source, findings, kwargs: dict[str, Any], sent_srs: list) -> tuple[str, str, bytes]:
    """(SOP Instance UID, Study Instance UID, bytes) of the image's SR. When an earlier SR of
    the image was sent and this one says something else, it names those as predecessors;
    an SR identical to one already sent keeps its UID."""
    from .pipeline import _encode
    from .reporting import build_results

    sr = build_results(source, findings, None, ("sr",), **kwargs)["sr"]
    sent_uids = {p.sop_instance_uid for p in sent_srs}
    if sent_srs and str(sr.SOPInstanceUID) not in sent_uids:
        sr = build_results(source, findings, None, ("sr",), predecessors=list(sent_srs), **kwargs)["sr"]
    return str(sr.SOPInstanceUID), str(sr.StudyInstanceUID), _encode(sr)


def _child_init(parent_pid: int) -> None:
    import signal
    import threading
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the service stops it; Ctrl-C is for the parent

    def watch_parent() -> None:
        """A service killed outright (SIGKILL, OOM) never shuts the pool down: leave with it."""
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch_parent, name="parent-watch", daemon=True).start()


class SRWorker:
    """One child process building SRs; ``submit`` then ``result``, or None to build here."""

    def __init__(self, timeout_s: float = RESULT_TIMEOUT_S) -> None:
        self.timeout_s = timeout_s
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._ready: concurrent.futures.Future | None = None
        self._failures = 0
        #: how long the last image waited for its SR from the child (None: built here)
        self.last_wait_ms: float | None = None

    @staticmethod
    def useful() -> bool:
        """Only with cores to spare (``MIN_CORES``)."""
        return (os.cpu_count() or 1) >= MIN_CORES

    def start(self, warm_source, warm_findings, warm_kwargs: dict[str, Any]) -> "SRWorker":
        """Start the child and warm it up on a synthetic image (not waited for: until it
        is warm, SRs are built in this process)."""
        self._pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=1, mp_context=multiprocessing.get_context("spawn"), initializer=_child_init,
            initargs=(os.getpid(),))
        self._ready = self._pool.submit(encoded_sr, warm_source, warm_findings, warm_kwargs, [])
        self._ready.add_done_callback(self._warmed_up)
        return self

    @staticmethod
    def _warmed_up(future: concurrent.futures.Future) -> None:
        if not future.cancelled() and future.exception() is None:
            logger.info("SRs are built in a child process from now on")
        else:
            logger.warning("the SR child process did not warm up; SRs are built in the analysis thread")

    @property
    def ready(self) -> bool:
        r = self._ready
        return (self._pool is not None and r is not None and r.done() and not r.cancelled()
                and r.exception() is None)

    def submit(self, source, findings, kwargs: dict[str, Any], sent_srs: list,
               ) -> concurrent.futures.Future | None:
        """The SR's build handed to the child, or None (build it here)."""
        self.last_wait_ms = None
        if not self.ready or "PixelData" in source:
            return None
        try:
            return self._pool.submit(encoded_sr, source, findings, kwargs, list(sent_srs))
        except Exception:  # noqa: BLE001 - broken pool, unpicklable input: build it here
            self._failed("could not be handed the SR")
            return None

    def result(self, future: concurrent.futures.Future) -> tuple[str, str, bytes] | None:
        """The child's SR, or None when it failed (the caller builds it)."""
        started = time.perf_counter()
        try:
            out = future.result(timeout=self.timeout_s)
            self.last_wait_ms = (time.perf_counter() - started) * 1000.0
            return out
        except (concurrent.futures.BrokenExecutor, concurrent.futures.TimeoutError) as exc:
            future.cancel()
            self._failed(f"failed ({type(exc).__name__})")
            return None
        except Exception:  # noqa: BLE001 - the build itself failed: here it raises again
            logger.debug("the SR child process raised; building the SR here", exc_info=True)
            return None

    def _failed(self, what: str) -> None:
        self._failures += 1
        level = logging.WARNING if self._failures == 1 else logging.DEBUG
        logger.log(level, "the SR child process %s; SRs are built in the analysis thread", what)
        pool = self._pool
        if pool is not None and getattr(pool, "_broken", False):
            self._pool = None          # a dead child: stay in-process from now on
            pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
