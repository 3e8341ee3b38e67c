"""Pixel decoding of untrusted images in a separate process, with a time and memory limit.

Codecs are native code fed by whoever can reach the DICOM port: a corrupt stream can make
one raise a Rust panic (``pyo3_runtime.PanicException``, which is not an ``Exception``),
crash the process (segfault), hang, or ask for gigabytes. ``IsolatedDecoder`` runs
``edge.imaging.load_for_models`` in a child process (a fresh interpreter running
``python -m edge.decoder``: the service has threads, so no fork), limits its address space (``RLIMIT_AS``) and its time per image, and
restarts it when it dies or hangs. Whatever the codec does, the caller gets either the
decoded image or an ``ImagingError`` whose message a technician can read, and the next
image is decoded by a fresh child.

The child is started once and kept warm; an image costs one pipe round trip (the decoded
model-size image, about 1-2 MB) on top of the decode itself.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from .imaging import ImageForModels, ImagingError

logger = logging.getLogger(__name__)

_START_TIMEOUT_S = 60.0


class DecoderCrashed(ImagingError):
    """The decoder process died, hung or ran out of memory on this image."""


def _signal_name(exitcode: int | None) -> str:
    if exitcode is None:
        return "no exit status"
    if exitcode < 0:
        try:
            return signal.Signals(-exitcode).name
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit status {exitcode}"


def _child_main(conn, memory_mb: int) -> None:
    """The decoder process: limit memory, warm the codecs, then decode requests until EOF.

    Replies are ``("ok", ImageForModels)``, ``("imaging", message)`` for images that are
    not decodable, or ``("fatal", message)`` for a panic or an exhausted heap. After any
    failure the child exits, because a codec that failed may be left in an unknown state.
    """
    try:
        import resource
        limit = int(memory_mb) * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ImportError, ValueError, OSError) as exc:   # pragma: no cover - non-Linux
        logger.warning("decoder: memory limit not applied (%s)", exc)
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the parent's to handle
    from .imaging import load_for_models, warm_codecs
    warm_codecs()
    conn.send(("ready", os.getpid()))
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return   # the parent has gone
        if request is None:
            return
        path, min_side = request
        try:
            reply = ("ok", load_for_models(path, min_side=min_side))
        except ImagingError as exc:
            # A codec that failed may hold broken state (seen: OpenJPEG failing on every
            # image after CharLS ran out of memory): the parent starts a fresh child.
            reply = ("imaging", str(exc))
        except MemoryError:
            reply = ("fatal", "the image needs more memory than the decoder may use")
        except BaseException as exc:   # noqa: BLE001 - PanicException and friends
            reply = ("fatal", f"the pixel decoder failed on this image ({type(exc).__name__})")
        try:
            conn.send(reply)
        except OSError:
            return   # the parent has gone
        if reply[0] != "ok":
            return


class IsolatedDecoder:
    """``load(path, min_side)`` like ``edge.imaging.load_for_models``, in a child process.

    Thread-safe (one image at a time per instance). ``restarts`` counts replaced children;
    ``alive`` says whether a child is running now (one is started on first use, and again
    after every crash).
    """

    def __init__(self, *, timeout_s: float = 30.0, memory_mb: int = 4096, name: str = "decoder",
                 command: list[str] | None = None) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s: must be > 0, got {timeout_s!r}")
        if memory_mb < 256:
            raise ValueError(f"memory_mb: must be at least 256, got {memory_mb!r}")
        self.timeout_s = float(timeout_s)
        self.memory_mb = int(memory_mb)
        self.name = name
        # the child's command line, before its two arguments (FD MEMORY_MB)
        self.command = list(command) if command else [sys.executable, "-m", "edge.decoder"]
        self.restarts = 0
        self._lock = threading.Lock()
        self._proc: Any = None
        self._conn: Any = None
        self._closed = False

    # ------------------------------------------------------------------ life cycle
    def start(self) -> "IsolatedDecoder":
        """Start the child now (otherwise it starts on the first image)."""
        with self._lock:
            self._ensure_child()
        return self

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._stop_child(graceful=True)

    @property
    def alive(self) -> bool:
        proc = self._proc
        return proc is not None and proc.poll() is None

    def _ensure_child(self) -> None:
        if self._closed:
            raise RuntimeError("decoder: closed")
        if self._proc is not None and self._proc.poll() is None:
            return
        if self._proc is not None:
            self._stop_child(graceful=False)
            self.restarts += 1
        # A socket pair carries multiprocessing's pickled messages; the child gets its end
        # as an inherited file descriptor (python -m edge.decoder FD MEMORY_MB).
        ours, theirs = socket.socketpair()
        try:
            proc = subprocess.Popen(
                [*self.command, str(theirs.fileno()), str(self.memory_mb)],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                env=dict(os.environ, RUST_BACKTRACE="0"))   # a codec panic: one line, not 40
        finally:
            theirs.close()
        parent = Connection(ours.detach())
        if not parent.poll(_START_TIMEOUT_S):
            proc.kill()
            proc.wait(5)
            parent.close()
            raise RuntimeError(f"decoder process did not start within {_START_TIMEOUT_S:.0f} s")
        try:
            kind, pid = parent.recv()
        except (EOFError, OSError):
            parent.close()
            raise RuntimeError(f"decoder process died at start ({_signal_name(proc.wait(5))})") from None
        self._proc, self._conn = proc, parent
        logger.debug("decoder process %s started (pid %s)", self.name, pid)

    def _stop_child(self, *, graceful: bool) -> None:
        proc, conn = self._proc, self._conn
        self._proc = self._conn = None
        if conn is not None:
            if graceful:
                try:
                    conn.send(None)
                except (OSError, ValueError):
                    pass
            conn.close()
        if proc is not None:
            try:
                proc.wait(2 if graceful else 0.1)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    # ------------------------------------------------------------------ decoding
    def load(self, path: str | os.PathLike[str], *, min_side: int = 512) -> ImageForModels:
        """Decode the image at ``path``; ImagingError (DecoderCrashed for crashes) on failure."""
        path = str(Path(path))
        with self._lock:
            self._ensure_child()
            started = time.monotonic()
            try:
                self._conn.send((path, int(min_side)))
                ready = self._conn.poll(self.timeout_s)
                reply = self._conn.recv() if ready else None
            except (EOFError, OSError, BrokenPipeError):
                reply = ("died", None)
            if reply is None:
                self._stop_child(graceful=False)
                self.restarts += 1
                logger.error("decoder %s: an image took longer than %.0f s to decode; decoder "
                             "restarted", self.name, self.timeout_s)
                raise DecoderCrashed(f"decoding the image took longer than {self.timeout_s:.0f} s "
                                     "(damaged or unusual image data); stored, not analyzed")
            kind, value = reply
            if kind == "ok":
                return value
            if kind == "imaging":   # the child exits after an error: replace it now
                self._replace_child()
                raise ImagingError(value)
            status = _signal_name(self._exit_status())
            self._stop_child(graceful=False)
            self.restarts += 1
            if kind == "fatal":
                logger.error("decoder %s: %s; decoder restarted", self.name, value)
                raise DecoderCrashed(f"{value}; stored, not analyzed")
            logger.error("decoder %s: the decoder process died (%s) after %.1f s; restarted",
                         self.name, status, time.monotonic() - started)
            raise DecoderCrashed(f"the pixel decoder crashed on this image ({status}); "
                                 "stored, not analyzed")

    __call__ = load

    def _replace_child(self) -> None:
        self._stop_child(graceful=True)
        try:
            self._ensure_child()
        except RuntimeError:   # started again on the next image; the health check shows it
            logger.exception("decoder %s could not be restarted", self.name)

    def _exit_status(self) -> int | None:
        proc = self._proc
        if proc is None:
            return None
        try:
            return proc.wait(2)
        except subprocess.TimeoutExpired:
            return None


def main(argv: list[str] | None = None) -> int:
    """Entry of the decoder process: ``python -m edge.decoder FD MEMORY_MB``."""
    args = sys.argv[1:] if argv is None else argv
    conn = Connection(int(args[0]))
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .logs import quiet_libraries
    quiet_libraries()
    _child_main(conn, int(args[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
