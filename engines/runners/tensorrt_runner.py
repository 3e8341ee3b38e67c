"""TensorRT runner (TensorRT 10 API): a serialized engine, tensors addressed by name.

Per run: copy each input to its device buffer, point the execution context at every
tensor (``set_tensor_address``), ``execute_async_v3`` on one stream, copy outputs back,
synchronize. Device memory goes through ``cuda_memory`` (cuda-python or pycuda).
``tensorrt`` is imported lazily: most machines running this project do not have it.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from engines.runners.base import BackendUnavailable, Runner, RunnerError
from engines.runners.cuda_memory import DeviceBuffer, Stream

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
    major = int(str(trt.__version__).split(".")[0])
    if major < 10:
        raise BackendUnavailable(f"TensorRT {trt.__version__} found; this runner needs TensorRT 10 or newer")
    return trt


def trt_logger(trt: Any) -> Any:
    """One TensorRT logger per process (warnings and errors only)."""
    global _trt_logger
    if _trt_logger is None:
        _trt_logger = trt.Logger(trt.Logger.WARNING)
    return _trt_logger


class TensorRTRunner(Runner):
    """Runs a serialized TensorRT engine (file path or bytes). Thread-safe (one run at a time)."""

    name = "tensorrt"

    def __init__(self, engine: Path | str | bytes, *, label: str = "") -> None:
        trt = import_tensorrt()
        self.label = label or (str(engine) if not isinstance(engine, bytes) else "engine")
        data = engine if isinstance(engine, bytes) else Path(engine).read_bytes()
        self._buffers: dict[str, DeviceBuffer] = {}
        self._runtime = trt.Runtime(trt_logger(trt))
        self._engine = self._runtime.deserialize_cuda_engine(data)
        if self._engine is None:
            raise RunnerError(f"tensorrt: could not deserialize {self.label} (built by another TensorRT "
                              "version or for another GPU?); rebuild it with `edge engines build`")
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise RunnerError(f"tensorrt: could not create an execution context for {self.label}")
        self._stream = Stream()
        self._lock = threading.Lock()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        is_input = {n: self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self._inputs = [n for n in names if is_input[n]]
        self._outputs = [n for n in names if not is_input[n]]
        self._dtypes = {n: np.dtype(trt.nptype(self._engine.get_tensor_dtype(n))) for n in names}
        self.input_shapes = {n: tuple(self._engine.get_tensor_shape(n)) for n in self._inputs}
        logger.info("tensorrt %s: %s loaded; inputs %s, outputs %s", trt.__version__, self.label,
                    self.input_shapes, self._outputs)

    @property
    def input_names(self) -> list[str]:
        return list(self._inputs)

    @property
    def output_names(self) -> list[str]:
        return list(self._outputs)

    def _bind(self, name: str, nbytes: int) -> DeviceBuffer:
        """Device buffer for tensor ``name`` of at least ``nbytes``, bound to the context."""
        buffer = self._buffers.get(name)
        if buffer is None or buffer.nbytes < nbytes:
            if buffer is not None:
                buffer.free()
            buffer = self._buffers[name] = DeviceBuffer(max(nbytes, 1))
        if not self._context.set_tensor_address(name, buffer.ptr):
            raise RunnerError(f"tensorrt: {self.label}: set_tensor_address({name!r}) failed")
        return buffer

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.check_inputs(inputs)
        with self._lock:
            if self._context is None:
                raise RunnerError(f"tensorrt: {self.label} was closed")
            staged = []   # keep host inputs alive until the stream is synchronized
            for name in self._inputs:
                host = np.ascontiguousarray(inputs[name], dtype=self._dtypes[name])
                expected = self.input_shapes[name]
                if -1 in expected:
                    if not self._context.set_input_shape(name, host.shape):
                        raise RunnerError(f"tensorrt: {self.label}: input {name!r} shape {host.shape} "
                                          f"is outside the engine's profile for {expected}")
                elif tuple(host.shape) != expected:
                    raise RunnerError(f"tensorrt: {self.label}: input {name!r} must have shape "
                                      f"{expected}, got {host.shape}")
                self._bind(name, host.nbytes).copy_from_host(host, self._stream)
                staged.append(host)
            results = {}
            for name in self._outputs:
                shape = tuple(self._context.get_tensor_shape(name))
                results[name] = np.empty(shape, dtype=self._dtypes[name])
                self._bind(name, results[name].nbytes)
            if not self._context.execute_async_v3(self._stream.handle):
                raise RunnerError(f"tensorrt: {self.label}: execute_async_v3 failed (see TensorRT log)")
            for name, host in results.items():
                self._buffers[name].copy_to_host(host, self._stream)
            self._stream.synchronize()
        return results

    def close(self) -> None:
        with self._lock:
            for buffer in self._buffers.values():
                buffer.free()
            self._buffers.clear()
            if getattr(self, "_stream", None) is not None:
                self._stream.free()
            self._context = None   # context before engine before runtime
            self._engine = None
            self._runtime = None
