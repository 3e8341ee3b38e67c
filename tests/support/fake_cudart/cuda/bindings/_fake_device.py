"""State and test hooks of the fake CUDA runtime: memory blocks, streams, faults, violations."""
from __future__ import annotations

import ctypes
import itertools
import threading
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ._fake_types import _ORIN, cudaError_t


@dataclass
class _Block:
    kind: str            # "device" or "pinned"
    nbytes: int
    memory: Any          # the ctypes buffer that backs it
    origin: str          # where it was allocated (file:line), for leak reports

    @property
    def ptr(self) -> int:
        return ctypes.addressof(self.memory)


@dataclass
class _Op:
    what: str
    run: Callable[[], cudaError_t]
    blocks: set = field(default_factory=set)   # ptrs of the blocks it touches


def _caller() -> str:
    for frame in reversed(traceback.extract_stack(limit=16)):
        if not {"fake_cudart", "fake_tensorrt"} & set(Path(frame.filename).parts):
            return f"{frame.filename}:{frame.lineno}"
    return "?"


class _FakeDevice:
    """State and test hooks of the fake runtime (``runtime._fake``)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.reset()

    def reset(self) -> None:
        """One healthy Orin, nothing allocated, no faults."""
        with self._lock:
            self.device_count = 1
            self.device = 0
            self.properties = {name: value for name, (_, value) in _ORIN.items()}
            self.driver_version = 12060    # JetPack 6.1: CUDA 12.6
            self.runtime_version = 12060
            self.free_memory = 32 << 30
            self.blocks: dict[int, _Block] = {}
            self.streams: dict[int, list[_Op]] = {0: []}   # handle -> pending operations
            self.violations: list[str] = []
            self.calls: list[str] = []
            self.last_error = cudaError_t.cudaSuccess
            self._fail_next: dict[str, list[cudaError_t]] = {}
            self._fail_always: dict[str, cudaError_t] = {}
            self._handles = itertools.count(0x7F0000001000, 0x100)

    # fault injection
    def fail_next(self, function: str, error: cudaError_t = cudaError_t.cudaErrorMemoryAllocation,
                  times: int = 1) -> None:
        """The next ``times`` calls of ``function`` return ``error`` (and do nothing)."""
        self._check_name(function)
        self._fail_next.setdefault(function, []).extend([cudaError_t(error)] * times)

    def fail_always(self, function: str, error: cudaError_t) -> None:
        """Every call of ``function`` (``"*"``: of every device call) returns ``error``."""
        if function != "*":
            self._check_name(function)
        self._fail_always[function] = cudaError_t(error)

    def no_driver(self, error: cudaError_t = cudaError_t.cudaErrorInsufficientDriver) -> None:
        """Behave like the real runtime on a machine without a driver (or GPU)."""
        self.fail_always("*", error)
        self.driver_version = 0

    def init_error(self) -> cudaError_t | None:
        """What a library initializing CUDA (TensorRT) would get; one-shot faults are left alone."""
        error = self._fail_always.get("cudaGetDeviceCount") or self._fail_always.get("*")
        if error is None and self.device_count == 0:
            error = cudaError_t.cudaErrorNoDevice
        return error

    @staticmethod
    def _check_name(function: str) -> None:
        from . import runtime

        if function not in runtime.__all__ or not callable(getattr(runtime, function)):
            raise ValueError(f"fake cudart has no function {function!r}")

    def injected(self, function: str) -> cudaError_t | None:
        self.calls.append(function)
        pending = self._fail_next.get(function)
        if pending:
            return self._error(pending.pop(0))
        error = self._fail_always.get(function) or self._fail_always.get("*")
        return self._error(error) if error is not None else None

    def _error(self, error: cudaError_t) -> cudaError_t:
        if error != cudaError_t.cudaSuccess:
            self.last_error = error
        return error

    # memory
    def allocate(self, kind: str, nbytes: int) -> _Block:
        memory = (ctypes.c_ubyte * max(nbytes, 1))()
        ctypes.memset(memory, 0xFF if kind == "device" else 0, max(nbytes, 1))
        block = _Block(kind, nbytes, memory, _caller())
        self.blocks[block.ptr] = block
        return block

    def find(self, ptr: int, nbytes: int = 1) -> _Block | None:
        """The live block holding ``[ptr, ptr + nbytes)``, or None."""
        for block in self.blocks.values():
            if block.ptr <= ptr and ptr + nbytes <= block.ptr + max(block.nbytes, 1):
                return block
        return None

    def pending(self, stream: Any = None) -> list[str]:
        """The work queued since the last synchronize, on ``stream`` (None: on every stream)."""
        handles = list(self.streams) if stream is None else [self.stream_handle(stream)]
        return [op.what for h in handles if h is not None for op in self.streams[h]]

    def live(self, kind: str | None = None) -> list[_Block]:
        return [b for b in self.blocks.values() if kind is None or b.kind == kind]

    def read(self, ptr: int, nbytes: int, who: str) -> bytes | None:
        """Device bytes for the fake TensorRT; None (and a violation) for a bad address."""
        block = self.find(ptr, nbytes)
        if block is None or block.kind != "device":
            self.violations.append(f"{who}: read of {nbytes} bytes at {ptr:#x} outside any device allocation")
            return None
        for handle, ops in self.streams.items():
            if any(block.ptr in op.blocks for op in ops):
                self.violations.append(f"{who}: read device memory at {ptr:#x} while stream {handle:#x} "
                                       "still has unsynchronized work on it")
        return ctypes.string_at(ptr, nbytes)

    def write(self, ptr: int, data: bytes, who: str) -> bool:
        block = self.find(ptr, len(data))
        if block is None or block.kind != "device":
            self.violations.append(f"{who}: write of {len(data)} bytes at {ptr:#x} outside any device allocation")
            return False
        ctypes.memmove(ptr, data, len(data))
        return True

    # streams
    def stream_handle(self, stream: Any) -> int | None:
        handle = 0 if stream is None else int(stream)
        return handle if handle in self.streams else None

    def enqueue(self, stream: Any, what: str, run: Callable[[], cudaError_t], ptrs: list[int]) -> cudaError_t:
        handle = self.stream_handle(stream)
        if handle is None:
            return self._error(cudaError_t.cudaErrorInvalidResourceHandle)
        blocks = {b.ptr for b in (self.find(p) for p in ptrs) if b is not None}
        self.streams[handle].append(_Op(what, run, blocks))
        return cudaError_t.cudaSuccess

    def drain(self, handle: int | None = None) -> cudaError_t:
        """Run the pending work of one stream (all of them for None or the legacy stream 0)."""
        result = cudaError_t.cudaSuccess
        for h in ([handle] if handle not in (None, 0) else list(self.streams)):
            ops, self.streams[h] = self.streams[h], []
            for op in ops:
                error = op.run()
                if error != cudaError_t.cudaSuccess and result == cudaError_t.cudaSuccess:
                    result = self._error(error)
        return result

    def release(self, ptr: int, kind: str, function: str) -> cudaError_t:
        block = self.blocks.get(ptr)
        if block is None or block.kind != kind:
            self.violations.append(f"{function}({ptr:#x}): not the start of a live {kind} allocation "
                                   "(freed twice, or never allocated here)")
            return self._error(cudaError_t.cudaErrorInvalidValue)
        for handle, ops in self.streams.items():
            using = [op.what for op in ops if ptr in op.blocks]
            if using:
                self.violations.append(f"{function}({ptr:#x}) while stream {handle:#x} has work pending on it "
                                       f"since its last synchronize: {', '.join(using)}")
        self.drain()   # cudaFree synchronizes with the device before releasing
        del self.blocks[ptr]
        if kind == "device":
            self.free_memory += block.nbytes
        return cudaError_t.cudaSuccess

    def problems(self) -> list[str]:
        """Everything a clean test leaves behind: live allocations and streams, violations."""
        out = [f"{b.kind} allocation of {b.nbytes} bytes at {b.ptr:#x} from {b.origin} was never freed"
               for b in self.blocks.values()]
        out += [f"stream {h:#x} was never destroyed" for h in self.streams if h != 0]
        return out + self.violations

    def assert_clean(self) -> None:
        problems = self.problems()
        assert not problems, "fake CUDA: " + "; ".join(problems)
