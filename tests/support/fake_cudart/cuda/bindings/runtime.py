"""Stand-in for cuda-python 12's ``cuda.bindings.runtime``, with host memory as device memory.

Same names, parameter names and return convention as the real module (every call returns a
tuple ``(cudaError_t, *results)``, results ``None`` on error); checked against
tests/support/cuda_runtime_12_api.json and the installed cuda-python by
tests/test_fake_tensorrt.py. Only what a TensorRT runner needs is here.

``cudaMalloc`` returns the address of a host block filled with 0xFF (NaN as float32), so
reading memory nothing wrote shows. Copies follow CUDA's documented synchronization rules:
a copy from pageable host memory reads its source at once and lands on the device when the
stream runs; a copy to pageable host memory first runs the stream, then copies; copies to
or from pinned memory (``cudaMallocHost``/``cudaHostAlloc``) happen when the stream runs,
which is at ``cudaStreamSynchronize`` (or ``cudaDeviceSynchronize``, ``cudaStreamDestroy``,
``cudaFree``). The fake TensorRT queues its inference on the stream the same way.

Test hooks live on ``_fake`` (see :class:`_FakeDevice`): fault injection (``fail_next``,
``fail_always``, ``no_driver``), live allocations (``live``, ``problems``, ``assert_clean``),
the work queued per stream since its last synchronize (``pending``), and ``violations``
(memory freed while a stream had work pending on it, double frees, unknown pointers or
streams, device reads racing a copy). Misuse answers (``cudaErrorInvalidValue`` for a double
free, ``cudaErrorInvalidResourceHandle`` for a destroyed stream) follow CUDA's documentation;
without a GPU they could not be observed from the real runtime.
"""
from __future__ import annotations

import ctypes
from typing import Any

from ._fake_device import _Block, _FakeDevice
from ._fake_types import (_ERROR_STRINGS, _ORIN, cudaDeviceAttr, cudaDeviceProp, cudaError_t, cudaHostAllocDefault,
                          cudaHostAllocMapped, cudaHostAllocPortable, cudaHostAllocWriteCombined, cudaMemcpyKind,
                          cudaStream_t, cudaStreamDefault, cudaStreamNonBlocking)

__all__ = [  # the real API names this fake provides
    "cudaDeviceAttr", "cudaDeviceGetAttribute", "cudaDeviceProp", "cudaDeviceSynchronize",
    "cudaDriverGetVersion", "cudaError_t", "cudaFree", "cudaFreeHost", "cudaGetDevice", "cudaGetDeviceCount",
    "cudaGetDeviceProperties", "cudaGetErrorName", "cudaGetErrorString", "cudaGetLastError", "cudaHostAlloc",
    "cudaHostAllocDefault", "cudaHostAllocMapped", "cudaHostAllocPortable", "cudaHostAllocWriteCombined",
    "cudaMalloc", "cudaMallocHost", "cudaMemGetInfo", "cudaMemcpy", "cudaMemcpyAsync", "cudaMemcpyKind",
    "cudaMemset", "cudaMemsetAsync", "cudaPeekAtLastError", "cudaRuntimeGetVersion", "cudaSetDevice",
    "cudaStreamCreate", "cudaStreamCreateWithFlags", "cudaStreamDefault", "cudaStreamDestroy",
    "cudaStreamNonBlocking", "cudaStreamQuery", "cudaStreamSynchronize", "cudaStream_t",
]

_fake = _FakeDevice()


def _size(value: Any) -> int:
    if not isinstance(value, int):
        raise TypeError(f"an integer is required, got {type(value).__name__}")
    if value < 0:
        raise OverflowError("can't convert negative value to size_t")
    return value


def _ptr(value: Any) -> int:
    return 0 if value is None else int(value)


def _fail(error: cudaError_t, results: int) -> tuple:
    return (error,) + (None,) * results


# ------------------------------------------------------------------ the API
def cudaGetErrorName(error: cudaError_t) -> tuple:
    try:
        return cudaError_t.cudaSuccess, cudaError_t(int(error)).name.encode()
    except ValueError:
        return cudaError_t.cudaSuccess, b"unrecognized error code"


def cudaGetErrorString(error: cudaError_t) -> tuple:
    return cudaError_t.cudaSuccess, _ERROR_STRINGS.get(int(error), b"unrecognized error code")


def cudaGetLastError() -> tuple:
    error, _fake.last_error = _fake.last_error, cudaError_t.cudaSuccess
    return (error,)


def cudaPeekAtLastError() -> tuple:
    return (_fake.last_error,)


def cudaDriverGetVersion() -> tuple:
    return cudaError_t.cudaSuccess, _fake.driver_version


def cudaRuntimeGetVersion() -> tuple:
    return cudaError_t.cudaSuccess, _fake.runtime_version


def cudaGetDeviceCount() -> tuple:
    with _fake._lock:
        error = _fake.injected("cudaGetDeviceCount")
        if error is None and _fake.device_count == 0:
            error = _fake._error(cudaError_t.cudaErrorNoDevice)
        return _fail(error, 1) if error else (cudaError_t.cudaSuccess, _fake.device_count)


def _device_error(function: str, device: int | None = None) -> cudaError_t | None:
    error = _fake.injected(function)
    if error is None and _fake.device_count == 0:
        error = _fake._error(cudaError_t.cudaErrorNoDevice)
    if error is None and device is not None and not 0 <= int(device) < _fake.device_count:
        error = _fake._error(cudaError_t.cudaErrorInvalidDevice)
    return error


def cudaGetDevice() -> tuple:
    with _fake._lock:
        error = _device_error("cudaGetDevice")
        return _fail(error, 1) if error else (cudaError_t.cudaSuccess, _fake.device)


def cudaSetDevice(device: int) -> tuple:
    with _fake._lock:
        error = _device_error("cudaSetDevice", device)
        if not error:
            _fake.device = int(device)
        return (error or cudaError_t.cudaSuccess,)


def cudaGetDeviceProperties(device: int) -> tuple:
    with _fake._lock:
        error = _device_error("cudaGetDeviceProperties", device)
        if error:
            return _fail(error, 1)
        prop = cudaDeviceProp()
        for name, value in _fake.properties.items():
            setattr(prop, name, value)
        return cudaError_t.cudaSuccess, prop


def cudaDeviceGetAttribute(attr: cudaDeviceAttr, device: int) -> tuple:
    with _fake._lock:
        error = _device_error("cudaDeviceGetAttribute", device)
        if error:
            return _fail(error, 1)
        attr = cudaDeviceAttr(int(attr))
        for name, (attribute, _) in _ORIN.items():
            if attribute == attr:
                return cudaError_t.cudaSuccess, int(_fake.properties[name])
        return _fail(_fake._error(cudaError_t.cudaErrorInvalidValue), 1)


def cudaMemGetInfo() -> tuple:
    with _fake._lock:
        error = _device_error("cudaMemGetInfo")
        return _fail(error, 2) if error else (cudaError_t.cudaSuccess, _fake.free_memory,
                                              _fake.properties["totalGlobalMem"])


def cudaDeviceSynchronize() -> tuple:
    with _fake._lock:
        return (_device_error("cudaDeviceSynchronize") or _fake.drain(),)


def _alloc(function: str, kind: str, size: Any) -> tuple:
    size = _size(size)
    with _fake._lock:
        error = _device_error(function)
        if error is None and kind == "device" and size > _fake.free_memory:
            error = _fake._error(cudaError_t.cudaErrorMemoryAllocation)
        if error:
            return _fail(error, 1)
        if size == 0:
            return cudaError_t.cudaSuccess, 0
        if kind == "device":
            _fake.free_memory -= size
        return cudaError_t.cudaSuccess, _fake.allocate(kind, size).ptr


def cudaMalloc(size: int) -> tuple:
    return _alloc("cudaMalloc", "device", size)


def cudaMallocHost(size: int) -> tuple:
    return _alloc("cudaMallocHost", "pinned", size)


def cudaHostAlloc(size: int, flags: int) -> tuple:
    if int(flags) & ~0x7:
        return _fail(_fake._error(cudaError_t.cudaErrorInvalidValue), 1)
    return _alloc("cudaHostAlloc", "pinned", size)


def cudaFree(devPtr: Any) -> tuple:
    with _fake._lock:
        error = _device_error("cudaFree")
        if error:
            return (error,)
        ptr = _ptr(devPtr)
        return (cudaError_t.cudaSuccess if ptr == 0 else _fake.release(ptr, "device", "cudaFree"),)


def cudaFreeHost(ptr: Any) -> tuple:
    with _fake._lock:
        error = _device_error("cudaFreeHost")
        if error:
            return (error,)
        address = _ptr(ptr)
        return (cudaError_t.cudaSuccess if address == 0 else _fake.release(address, "pinned", "cudaFreeHost"),)


def _copy_plan(dst: int, src: int, count: int, kind: Any) -> tuple[cudaError_t, _Block | None, _Block | None]:
    """Check a copy's direction against the pointers; the blocks of ``dst`` and ``src``."""
    try:
        kind = cudaMemcpyKind(int(kind))
    except ValueError:
        return _fake._error(cudaError_t.cudaErrorInvalidMemcpyDirection), None, None
    dst_block, src_block = _fake.find(dst, count), _fake.find(src, count)
    on_device = (dst_block is not None and dst_block.kind == "device",
                 src_block is not None and src_block.kind == "device")
    expected = {cudaMemcpyKind.cudaMemcpyHostToHost: (False, False),
                cudaMemcpyKind.cudaMemcpyHostToDevice: (True, False),
                cudaMemcpyKind.cudaMemcpyDeviceToHost: (False, True),
                cudaMemcpyKind.cudaMemcpyDeviceToDevice: (True, True)}.get(kind, on_device)
    if on_device != expected or 0 in (dst, src):
        _fake.violations.append(f"cudaMemcpy {kind.name} of {count} bytes {src:#x} -> {dst:#x}: the "
                                "pointers are not what the direction says (or a device range overruns "
                                "its allocation)")
        return _fake._error(cudaError_t.cudaErrorInvalidValue), None, None
    return cudaError_t.cudaSuccess, dst_block, src_block


def cudaMemcpy(dst: Any, src: Any, count: int, kind: cudaMemcpyKind) -> tuple:
    dst, src, count = _ptr(dst), _ptr(src), _size(count)
    with _fake._lock:
        error = _device_error("cudaMemcpy")
        if error:
            return (error,)
        error, _, _ = _copy_plan(dst, src, count, kind)
        if error:
            return (error,)
        _fake.drain()   # synchronous, on the legacy default stream
        ctypes.memmove(dst, src, count)
        return (cudaError_t.cudaSuccess,)


def cudaMemcpyAsync(dst: Any, src: Any, count: int, kind: cudaMemcpyKind, stream: Any) -> tuple:
    dst, src, count = _ptr(dst), _ptr(src), _size(count)
    with _fake._lock:
        error = _device_error("cudaMemcpyAsync")
        if error:
            return (error,)
        handle = _fake.stream_handle(stream)
        if handle is None:
            return (_fake._error(cudaError_t.cudaErrorInvalidResourceHandle),)
        error, dst_block, src_block = _copy_plan(dst, src, count, kind)
        if error:
            return (error,)
        what = f"cudaMemcpyAsync({count} bytes {src:#x} -> {dst:#x})"
        if dst_block is None:              # to pageable host memory: returns once copied
            _fake.drain(handle)
            ctypes.memmove(dst, src, count)
            return (cudaError_t.cudaSuccess,)
        if src_block is None:              # from pageable host memory: staged at once
            staged = ctypes.string_at(src, count)

            def run() -> cudaError_t:
                ctypes.memmove(dst, staged, count)
                return cudaError_t.cudaSuccess
        else:
            def run() -> cudaError_t:
                ctypes.memmove(dst, src, count)
                return cudaError_t.cudaSuccess
        return (_fake.enqueue(handle, what, run, [dst, src]),)


def cudaMemset(devPtr: Any, value: int, count: int) -> tuple:
    ptr, count = _ptr(devPtr), _size(count)
    with _fake._lock:
        error = _device_error("cudaMemset")
        if error:
            return (error,)
        block = _fake.find(ptr, count)
        if block is None or block.kind != "device":
            return (_fake._error(cudaError_t.cudaErrorInvalidValue),)
        _fake.drain()
        ctypes.memset(ptr, int(value) & 0xFF, count)
        return (cudaError_t.cudaSuccess,)


def cudaMemsetAsync(devPtr: Any, value: int, count: int, stream: Any) -> tuple:
    ptr, count = _ptr(devPtr), _size(count)
    with _fake._lock:
        error = _device_error("cudaMemsetAsync")
        if error:
            return (error,)
        block = _fake.find(ptr, count)
        if block is None or block.kind != "device":
            return (_fake._error(cudaError_t.cudaErrorInvalidValue),)

        def run() -> cudaError_t:
            ctypes.memset(ptr, int(value) & 0xFF, count)
            return cudaError_t.cudaSuccess
        return (_fake.enqueue(stream, f"cudaMemsetAsync({count} bytes at {ptr:#x})", run, [ptr]),)


def cudaStreamCreate() -> tuple:
    with _fake._lock:
        error = _device_error("cudaStreamCreate")
        if error:
            return _fail(error, 1)
        handle = next(_fake._handles)
        _fake.streams[handle] = []
        return cudaError_t.cudaSuccess, cudaStream_t(handle)


def cudaStreamCreateWithFlags(flags: int) -> tuple:
    if int(flags) not in (cudaStreamDefault, cudaStreamNonBlocking):
        return _fail(_fake._error(cudaError_t.cudaErrorInvalidValue), 1)
    return cudaStreamCreate()


def _stream_call(function: str, stream: Any) -> tuple[cudaError_t | None, int | None]:
    error = _device_error(function)
    if error:
        return error, None
    handle = _fake.stream_handle(stream)
    if handle is None:
        _fake.violations.append(f"{function}({stream!r}): not a live stream (destroyed, or never created)")
        return _fake._error(cudaError_t.cudaErrorInvalidResourceHandle), None
    return None, handle


def cudaStreamSynchronize(stream: Any) -> tuple:
    with _fake._lock:
        error, handle = _stream_call("cudaStreamSynchronize", stream)
        return (error or _fake.drain(handle),)


def cudaStreamQuery(stream: Any) -> tuple:
    with _fake._lock:
        error, handle = _stream_call("cudaStreamQuery", stream)
        if error:
            return (error,)
        busy = bool(_fake.streams[handle])
        _fake.drain(handle)   # the work "finishes" once somebody looks
        return (cudaError_t.cudaErrorNotReady if busy else cudaError_t.cudaSuccess,)


def cudaStreamDestroy(stream: Any) -> tuple:
    with _fake._lock:
        error, handle = _stream_call("cudaStreamDestroy", stream)
        if error:
            return (error,)
        if handle == 0:
            return (_fake._error(cudaError_t.cudaErrorInvalidResourceHandle),)
        result = _fake.drain(handle)   # pending work still completes
        del _fake.streams[handle]
        return (result,)
