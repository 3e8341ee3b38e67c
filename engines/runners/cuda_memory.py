"""Small owning wrappers for CUDA device memory and streams, freed explicitly.

Either cuda-python (``cuda.bindings.runtime``, or ``cuda.cudart`` in older releases; what
NVIDIA's current TensorRT samples use) or pycuda (what some Jetson images ship) sits
under them. Only the handful of calls the TensorRT runner and the INT8 calibrator need are
wrapped: allocate, free, copy host<->device on a stream, synchronize, page-locked host
memory, and device queries.

cuda-python must be of the CUDA 12 line on JetPack 6 (its driver is CUDA 12): a newer
cuda-python answers every call with ``cudaErrorInsufficientDriver``. Errors are never
swallowed: ``gpu_problem()`` says why there is no usable GPU, in CUDA's own words.
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import threading
from typing import Any, Iterator

import numpy as np

from engines.runners.base import BackendUnavailable, RunnerError

logger = logging.getLogger(__name__)


class CudaError(RunnerError):
    """A CUDA call returned an error."""


class _CudaPython:
    """cuda-python runtime API: every call returns ``(error, *results)``."""

    library = "cuda-python"

    def __init__(self) -> None:
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            from cuda import cudart  # cuda-python < 12.6
        self.rt = cudart

    def _call(self, what: str, result: tuple) -> Any:
        err, rest = result[0], result[1:]
        if err != self.rt.cudaError_t.cudaSuccess:
            name = self.rt.cudaGetErrorName(err)[1]
            name = name.decode() if isinstance(name, bytes) else str(name)
            raise CudaError(f"CUDA {what} failed: {name}")
        return rest[0] if len(rest) == 1 else (rest or None)

    def device_count(self) -> int:
        return int(self._call("cudaGetDeviceCount", self.rt.cudaGetDeviceCount()))

    def device_identity(self, index: int) -> dict[str, Any]:
        props = self._call("cudaGetDeviceProperties", self.rt.cudaGetDeviceProperties(index))
        name = props.name
        name = (name.decode(errors="replace") if isinstance(name, bytes) else str(name)).rstrip("\x00").strip()
        return {"name": name, "compute_capability": f"{props.major}.{props.minor}",
                "multiprocessors": int(props.multiProcessorCount),
                "memory_mb": int(props.totalGlobalMem) >> 20}

    def host_alloc(self, nbytes: int) -> tuple[Any, int]:
        ptr = self._call("cudaMallocHost", self.rt.cudaMallocHost(nbytes))
        return ptr, int(ptr)

    def host_free(self, handle: Any) -> None:
        self._call("cudaFreeHost", self.rt.cudaFreeHost(handle))

    def device_name(self, index: int) -> str:
        return self.device_identity(index)["name"]

    def malloc(self, nbytes: int) -> tuple[Any, int]:
        ptr = self._call("cudaMalloc", self.rt.cudaMalloc(nbytes))
        return ptr, int(ptr)

    def free(self, handle: Any) -> None:
        self._call("cudaFree", self.rt.cudaFree(handle))

    def htod(self, ptr: int, array: np.ndarray, stream: Any) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._call("cudaMemcpyAsync", self.rt.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes, kind, stream))

    def dtoh(self, array: np.ndarray, ptr: int, stream: Any) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._call("cudaMemcpyAsync", self.rt.cudaMemcpyAsync(array.ctypes.data, ptr, array.nbytes, kind, stream))

    def stream_create(self) -> tuple[Any, int]:
        stream = self._call("cudaStreamCreate", self.rt.cudaStreamCreate())
        return stream, int(stream)

    def stream_synchronize(self, stream: Any) -> None:
        self._call("cudaStreamSynchronize", self.rt.cudaStreamSynchronize(stream))

    def stream_destroy(self, stream: Any) -> None:
        self._call("cudaStreamDestroy", self.rt.cudaStreamDestroy(stream))


class _PyCuda:
    """pycuda driver API on device 0's primary context (the one the CUDA runtime and
    TensorRT use), made current around each call so any thread may call."""

    library = "pycuda"

    def __init__(self) -> None:
        import pycuda.driver as drv

        drv.init()
        self.drv = drv
        self._primary: Any = None

    @contextlib.contextmanager
    def _current(self) -> Iterator[None]:
        if self._primary is None:
            self._primary = self.drv.Device(0).retain_primary_context()
        self._primary.push()
        try:
            yield
        finally:
            self.drv.Context.pop()

    def device_count(self) -> int:
        return int(self.drv.Device.count())

    def device_name(self, index: int) -> str:
        return str(self.drv.Device(index).name()).strip()

    def device_identity(self, index: int) -> dict[str, Any]:
        device = self.drv.Device(index)
        major, minor = device.compute_capability()
        attr = self.drv.device_attribute.MULTIPROCESSOR_COUNT
        return {"name": str(device.name()).strip(), "compute_capability": f"{major}.{minor}",
                "multiprocessors": int(device.get_attribute(attr)),
                "memory_mb": int(device.total_memory()) >> 20}

    def host_alloc(self, nbytes: int) -> tuple[Any, int]:
        with self._current():
            array = self.drv.pagelocked_empty(nbytes, dtype=np.uint8)
        return array, int(array.ctypes.data)

    def host_free(self, handle: Any) -> None:
        allocation = getattr(handle, "base", None)   # pycuda's HostAllocation
        if allocation is not None and hasattr(allocation, "free"):
            allocation.free()

    def malloc(self, nbytes: int) -> tuple[Any, int]:
        with self._current():
            alloc = self.drv.mem_alloc(nbytes)
        return alloc, int(alloc)

    def free(self, handle: Any) -> None:
        with self._current():
            handle.free()

    def htod(self, ptr: int, array: np.ndarray, stream: Any) -> None:
        with self._current():
            self.drv.memcpy_htod_async(ptr, array, stream)

    def dtoh(self, array: np.ndarray, ptr: int, stream: Any) -> None:
        with self._current():
            self.drv.memcpy_dtoh_async(array, ptr, stream)

    def stream_create(self) -> tuple[Any, int]:
        with self._current():
            stream = self.drv.Stream()
        return stream, int(stream.handle)

    def stream_synchronize(self, stream: Any) -> None:
        with self._current():
            stream.synchronize()

    def stream_destroy(self, stream: Any) -> None:
        pass  # pycuda destroys the stream when the object goes away


_api: Any = None
_api_lock = threading.Lock()


def cuda_api() -> Any:
    """The CUDA layer in use (cuda-python preferred, pycuda accepted); cached."""
    global _api
    with _api_lock:
        if _api is not None:
            return _api
        problems = []
        for kind in (_CudaPython, _PyCuda):
            try:
                _api = kind()
                logger.debug("CUDA memory through %s", _api.library)
                return _api
            except Exception as exc:  # ImportError, or a driver error from pycuda's init
                problems.append(f"{kind.library}: {exc}")
        raise BackendUnavailable("no CUDA Python library could be used (" + "; ".join(problems)
                                 + "); install cuda-python (pip install cuda-python) or pycuda")


def cuda_library() -> str:
    """Name of the CUDA layer in use: "cuda-python" or "pycuda"."""
    return cuda_api().library


def gpu_problem() -> str | None:
    """Why no CUDA GPU can be used here, in CUDA's own words; None when one can.

    A cuda-python newer than the driver answers ``cudaErrorInsufficientDriver`` to every
    call: that is said as such (with what to install), not as "no GPU".
    """
    try:
        count = cuda_api().device_count()
    except BackendUnavailable as exc:
        return str(exc)
    except CudaError as exc:
        hint = ""
        if "InsufficientDriver" in str(exc):
            hint = ("; the installed CUDA Python library needs a newer driver than this machine's "
                    "(on JetPack 6 install cuda-python of the CUDA 12 line: pip install "
                    "'cuda-python>=12.2,<13')")
        return f"no usable CUDA GPU: {exc}{hint}"
    except Exception as exc:   # noqa: BLE001 - a broken driver install: say what it said
        return f"no usable CUDA GPU: {type(exc).__name__}: {exc}"
    return None if count > 0 else "no CUDA GPU is visible (CUDA reports 0 devices)"


def gpu_count() -> int:
    """Number of CUDA devices visible, 0 when there is no library, driver or device (see
    ``gpu_problem`` for why)."""
    try:
        return cuda_api().device_count()
    except Exception as exc:   # noqa: BLE001
        logger.debug("no CUDA device: %s", exc)
        return 0


def gpu_name(index: int = 0) -> str:
    """Name of CUDA device ``index`` (e.g. "NVIDIA H100 80GB HBM3", "Orin")."""
    return cuda_api().device_name(index)


def gpu_identity(index: int = 0) -> dict[str, Any]:
    """What tells GPUs apart for an engine: name, compute capability, multiprocessor count
    and memory (an Orin Nano, NX and AGX all call themselves "Orin")."""
    return cuda_api().device_identity(index)


class Stream:
    """An owning CUDA stream. ``handle`` is the integer TensorRT takes."""

    def __init__(self) -> None:
        self._api = cuda_api()
        self._stream, self.handle = self._api.stream_create()

    def synchronize(self) -> None:
        self._api.stream_synchronize(self._stream)

    @property
    def native(self) -> Any:
        """The library's own stream object (for copies)."""
        return self._stream

    def free(self) -> None:
        if self._stream is not None:
            stream, self._stream = self._stream, None
            self._api.stream_destroy(stream)

    def __del__(self) -> None:  # fallback only; owners call free()
        try:
            self.free()
        except Exception:
            pass


class HostBuffer:
    """Page-locked (pinned) host memory holding a numpy array: copies to and from the
    device are truly asynchronous and faster, and on Jetson (shared memory) avoid a bounce
    buffer. ``array`` is valid until ``free()``."""

    def __init__(self, shape: tuple[int, ...], dtype: Any) -> None:
        self._api = cuda_api()
        dtype = np.dtype(dtype)
        nbytes = max(int(np.prod(shape)) * dtype.itemsize, 1)
        self._handle, ptr = self._api.host_alloc(nbytes)
        raw = (ctypes.c_char * nbytes).from_address(ptr)
        self.array = np.frombuffer(raw, dtype=np.uint8, count=nbytes)[:int(np.prod(shape)) * dtype.itemsize] \
            .view(dtype).reshape(shape)
        self.nbytes = nbytes

    def free(self) -> None:
        if self._handle is not None:
            handle, self._handle = self._handle, None
            self.array = None
            self._api.host_free(handle)

    def __del__(self) -> None:  # fallback only; owners call free()
        try:
            self.free()
        except Exception:
            pass


class DeviceBuffer:
    """An owning block of device memory of ``nbytes`` bytes at address ``ptr``."""

    def __init__(self, nbytes: int) -> None:
        if nbytes <= 0:
            raise ValueError(f"DeviceBuffer: nbytes must be > 0, got {nbytes}")
        self._api = cuda_api()
        self.nbytes = int(nbytes)
        self._handle, self.ptr = self._api.malloc(self.nbytes)

    def _check(self, array: np.ndarray, what: str) -> None:
        if self._handle is None:
            raise CudaError(f"DeviceBuffer: {what} after free()")
        if not array.flags.c_contiguous or array.nbytes > self.nbytes:
            raise ValueError(f"DeviceBuffer: {what} needs a C-contiguous array of at most "
                             f"{self.nbytes} bytes, got {array.nbytes} bytes")

    def copy_from_host(self, array: np.ndarray, stream: Stream) -> None:
        """Queue a host-to-device copy of ``array`` on ``stream``."""
        self._check(array, "copy_from_host")
        self._api.htod(self.ptr, array, stream.native)

    def copy_to_host(self, array: np.ndarray, stream: Stream) -> None:
        """Queue a device-to-host copy into ``array``; valid after ``stream.synchronize()``."""
        self._check(array, "copy_to_host")
        self._api.dtoh(array, self.ptr, stream.native)

    def free(self) -> None:
        if self._handle is not None:
            handle, self._handle = self._handle, None
            self._api.free(handle)

    def __del__(self) -> None:  # fallback only; owners call free()
        try:
            self.free()
        except Exception:
            pass
