"""Time spent in Python's garbage collector, process-wide, for per-image timings.

A collection holds the GIL, so every Python thread (the DICOM handlers, the analysis, the
outbox) stands still while it runs. ``gc_ms()`` is the running total since ``install()``;
the difference across an image's analysis says how much of it was collection.
"""
from __future__ import annotations

import gc
import time

_total_ms = 0.0
_started = 0.0
_installed = False


def _callback(phase: str, info: dict) -> None:
    global _total_ms, _started
    if phase == "start":
        _started = time.perf_counter()
    elif _started:
        _total_ms += (time.perf_counter() - _started) * 1000.0
        _started = 0.0


def install() -> None:
    """Start counting (once per process)."""
    global _installed
    if not _installed:
        gc.callbacks.append(_callback)
        _installed = True


def gc_ms() -> float:
    """Milliseconds spent collecting since ``install()``."""
    return _total_ms
