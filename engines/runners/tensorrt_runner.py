"""TensorRT runner (TensorRT 10 API): a serialized engine, tensors addressed by name.

Per run: stage each input in its page-locked host buffer, copy it to its device buffer,
point the execution context at every tensor (``set_tensor_address``), ``execute_async_v3``
on one stream, copy outputs back into page-locked buffers, synchronize. The stream is also
synchronized when a run fails and before anything is freed, so no memory is released while
the GPU may still use it. Memory goes through ``cuda_memory`` (cuda-python or pycuda).
``tensorrt`` is imported lazily: most machines running this project do not have it.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from engines.runners.base import BackendUnavailable, Runner, RunnerError
from engines.runners.cuda_memory import DeviceBuffer, HostBuffer, Stream

logger = logging.getLogger(__name__)

_trt_logger: Any = None


def import_tensorrt() -> Any:
    """Import ``tensorrt`` (10 or newer) or raise :class:`BackendUnavailable` saying why."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailable(
            f"TensorRT is not installed (import tensorrt failed: {exc}); on a Jetson it comes "
            "with JetPack, elsewhere pip install tensorrt") from exc
    except Exception as exc:   # noqa: BLE001 - a broken install raises AttributeError & co.
        raise BackendUnavailable(f"TensorRT is installed but broken (import tensorrt raised "
                                 f"{type(exc).__name__}: {exc}); reinstall it") from exc
    version = str(getattr(trt, "__version__", "unknown"))
    try:
        major = int(version.split(".")[0])
    except ValueError:
        raise BackendUnavailable(f"TensorRT reports an unreadable version {version!r}") from None
    if major < 10:
        raise BackendUnavailable(f"TensorRT {version} found; this runner needs TensorRT 10 or newer "
                                 "(JetPack 6.1 or newer)")
    return trt


def trt_logger(trt: Any) -> Any:
    """One TensorRT logger per process (warnings and errors only)."""
    global _trt_logger
    if _trt_logger is None:
        _trt_logger = trt.Logger(trt.Logger.WARNING)
    return _trt_logger


class EngineUnreadable(RunnerError):
    """A serialized engine that this TensorRT cannot load (other version or GPU, damaged)."""


class TensorRTRunner(Runner):
    """Runs a serialized TensorRT engine (file path or bytes). Thread-safe (one run at a time)."""

    name = "tensorrt"

    def __init__(self, engine: Path | str | bytes, *, label: str = "") -> None:
        trt = import_tensorrt()
        self.label = label or (str(engine) if not isinstance(engine, bytes) else "engine")
        data = engine if isinstance(engine, bytes) else Path(engine).read_bytes()
        self._buffers: dict[str, DeviceBuffer] = {}
        self._host: dict[str, HostBuffer] = {}
        self._stream: Stream | None = None
        self._context = self._engine = self._runtime = None
        self._lock = threading.Lock()
        try:
            self._load(trt, data)
        except (TypeError, ValueError, AttributeError) as exc:
            # TensorRT's bindings raise these for ordinary failures, e.g. TypeError "factory
            # function returned nullptr" when the runtime cannot be created (CUDA start-up)
            self.close()
            raise RunnerError(f"tensorrt: {self.label} could not be loaded: "
                              f"{type(exc).__name__}: {exc}") from exc
        except BaseException:
            self.close()   # whatever was created is released, in order
            raise
        logger.info("tensorrt %s: %s loaded; inputs %s, outputs %s", trt.__version__, self.label,
                    self.input_shapes, self._outputs)

    def _load(self, trt: Any, data: bytes) -> None:
        self._runtime = trt.Runtime(trt_logger(trt))
        self._engine = self._runtime.deserialize_cuda_engine(data)
        if self._engine is None:
            raise EngineUnreadable(f"tensorrt: could not deserialize {self.label} (built by another "
                                   "TensorRT version or for another GPU, or damaged); rebuild it with "
                                   "`edge engines build --force`")
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise RunnerError(f"tensorrt: could not create an execution context for {self.label}")
        self._stream = Stream()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        is_input = {n: self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self._inputs = [n for n in names if is_input[n]]
        self._outputs = [n for n in names if not is_input[n]]
        try:
            self._dtypes = {n: np.dtype(trt.nptype(self._engine.get_tensor_dtype(n))) for n in names}
        except TypeError as exc:   # e.g. BF16 or FP8 tensors, which numpy cannot hold
            raise RunnerError(f"tensorrt: {self.label} has a tensor type numpy cannot hold ({exc}); "
                              "export the model with float32 inputs and outputs") from exc
        self.input_shapes = {n: tuple(self._engine.get_tensor_shape(n)) for n in self._inputs}
        self.output_shapes = {n: list(self._engine.get_tensor_shape(n)) for n in self._outputs}
        dynamic = [n for n in self._outputs if -1 in tuple(self._engine.get_tensor_shape(n))]
        if dynamic and not any(-1 in shape for shape in self.input_shapes.values()):
            raise RunnerError(f"tensorrt: {self.label}: outputs {dynamic} have data-dependent shapes, "
                              "which this runner does not support; export fixed output shapes")

    @property
    def input_names(self) -> list[str]:
        return list(self._inputs)

    @property
    def output_names(self) -> list[str]:
        return list(self._outputs)

    def _bind(self, name: str, shape: tuple[int, ...]) -> tuple[DeviceBuffer, np.ndarray]:
        """Device buffer and page-locked host array for tensor ``name`` of ``shape``, the
        device buffer bound to the context. Both are reused while big enough."""
        dtype = self._dtypes[name]
        nbytes = max(int(np.prod(shape)) * dtype.itemsize, 1)
        buffer, host = self._buffers.get(name), self._host.get(name)
        if buffer is None or buffer.nbytes < nbytes:
            if buffer is not None:
                self._buffers.pop(name).free()
            buffer = self._buffers[name] = DeviceBuffer(nbytes)
        if host is None or host.array.shape != tuple(shape):
            if host is not None:
                self._host.pop(name).free()
            host = self._host[name] = HostBuffer(tuple(shape), dtype)
        if not self._context.set_tensor_address(name, buffer.ptr):
            raise RunnerError(f"tensorrt: {self.label}: set_tensor_address({name!r}) failed")
        return buffer, host.array

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.check_inputs(inputs)
        with self._lock:
            if self._context is None:
                raise RunnerError(f"tensorrt: {self.label} was closed")
            try:
                return self._run(inputs)
            except BaseException:
                self._settle()   # copies may be in flight: wait before anyone frees memory
                raise

    def _run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        assert self._stream is not None
        for name in self._inputs:
            value = np.asarray(inputs[name])
            expected = self.input_shapes[name]
            if -1 in expected:
                if not self._context.set_input_shape(name, value.shape):
                    raise RunnerError(f"tensorrt: {self.label}: input {name!r} shape {value.shape} "
                                      f"is outside the engine's profile for {expected}")
            elif tuple(value.shape) != expected:
                raise RunnerError(f"tensorrt: {self.label}: input {name!r} must have shape "
                                  f"{expected}, got {value.shape}")
            device, host = self._bind(name, tuple(value.shape))
            np.copyto(host, value, casting="same_kind")
            device.copy_from_host(host, self._stream)
        staged = {}
        for name in self._outputs:
            shape = tuple(self._context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise RunnerError(f"tensorrt: {self.label}: output {name!r} has no fixed shape "
                                  f"({list(shape)}) after the inputs were set")
            staged[name] = self._bind(name, shape)
        if not self._context.execute_async_v3(self._stream.handle):
            raise RunnerError(f"tensorrt: {self.label}: execute_async_v3 failed (see TensorRT log)")
        for device, host in staged.values():
            device.copy_to_host(host, self._stream)
        self._stream.synchronize()
        return {name: host.copy() for name, (_, host) in staged.items()}

    def _settle(self) -> None:
        """Wait for the stream; a failure to do so is logged, never raised over the cause."""
        if self._stream is None:
            return
        try:
            self._stream.synchronize()
        except Exception:   # noqa: BLE001
            logger.warning("tensorrt: %s: stream synchronize failed", self.label, exc_info=True)

    def close(self) -> None:
        with self._lock:
            self._settle()   # nothing is freed while the GPU may still read or write it
            for buffer in self._buffers.values():
                buffer.free()
            self._buffers.clear()
            for host in self._host.values():
                host.free()
            self._host.clear()
            if self._stream is not None:
                self._stream.free()
                self._stream = None
            self._context = None   # context before engine before runtime
            self._engine = None
            self._runtime = None
