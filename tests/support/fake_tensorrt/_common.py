"""Enums, Dims, loggers, the fault switchboard and device-memory access of the fake TensorRT."""
from __future__ import annotations

import enum
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

VERSION = "10.3.0"


class _Enum(enum.Enum):
    """A pybind11 enum: ``int()`` works, ``==`` with a plain int does not, str is ``Type.NAME``."""

    def __int__(self) -> int:
        return self.value

    __index__ = __int__

    def __str__(self) -> str:
        return f"{type(self).__name__}.{self.name}"


DataType = _Enum("DataType", [("FLOAT", 0), ("HALF", 1), ("INT8", 2), ("INT32", 3), ("BOOL", 4), ("UINT8", 5),
                              ("FP8", 6), ("BF16", 7), ("INT64", 8), ("INT4", 9)])
_ITEMSIZE = {0: 4, 1: 2, 2: 1, 3: 4, 4: 1, 5: 1, 6: 1, 7: 2, 8: 8, 9: 0.5}
DataType.itemsize = property(lambda self: _ITEMSIZE[self.value])   # as tensorrt/__init__.py adds it
TensorIOMode = _Enum("TensorIOMode", [("NONE", 0), ("INPUT", 1), ("OUTPUT", 2)])
TensorLocation = _Enum("TensorLocation", [("DEVICE", 0), ("HOST", 1)])
MemoryPoolType = _Enum("MemoryPoolType", [("WORKSPACE", 0), ("DLA_MANAGED_SRAM", 1), ("DLA_LOCAL_DRAM", 2),
                                          ("DLA_GLOBAL_DRAM", 3), ("TACTIC_DRAM", 4), ("TACTIC_SHARED_MEMORY", 5)])
BuilderFlag = _Enum("BuilderFlag", [
    ("FP16", 0), ("INT8", 1), ("DEBUG", 2), ("GPU_FALLBACK", 3), ("REFIT", 4), ("DISABLE_TIMING_CACHE", 5),
    ("TF32", 6), ("SPARSE_WEIGHTS", 7), ("SAFETY_SCOPE", 8), ("OBEY_PRECISION_CONSTRAINTS", 9),
    ("PREFER_PRECISION_CONSTRAINTS", 10), ("DIRECT_IO", 11), ("REJECT_EMPTY_ALGORITHMS", 12),
    ("VERSION_COMPATIBLE", 13), ("EXCLUDE_LEAN_RUNTIME", 14), ("FP8", 15), ("ERROR_ON_TIMING_CACHE_MISS", 16),
    ("BF16", 17), ("DISABLE_COMPILATION_CACHE", 18), ("STRIP_PLAN", 19), ("WEIGHTLESS", 19),
    ("REFIT_IDENTICAL", 20), ("WEIGHT_STREAMING", 21), ("INT4", 22), ("REFIT_INDIVIDUAL", 23)])
NetworkDefinitionCreationFlag = _Enum("NetworkDefinitionCreationFlag",
                                      [("EXPLICIT_BATCH", 0), ("STRONGLY_TYPED", 1)])
ExecutionContextAllocationStrategy = _Enum("ExecutionContextAllocationStrategy",
                                           [("STATIC", 0), ("ON_PROFILE_CHANGE", 1), ("USER_MANAGED", 2)])
CalibrationAlgoType = _Enum("CalibrationAlgoType", [("LEGACY_CALIBRATION", 0), ("ENTROPY_CALIBRATION", 1),
                                                    ("ENTROPY_CALIBRATION_2", 2), ("MINMAX_CALIBRATION", 3)])
ErrorCode = _Enum("ErrorCode", [
    ("SUCCESS", 0), ("INTERNAL_ERROR", 1), ("MEM_ALLOC_FAILED", 2), ("MODEL_DESERIALIZE_FAILED", 3),
    ("INVALID_VALUE", 4), ("INVALID_GRAPH", 5), ("INVALID_NODE", 6), ("UNSUPPORTED_GRAPH", 7),
    ("UNSUPPORTED_NODE", 8), ("UNSUPPORTED_NODE_ATTR", 9), ("UNSUPPORTED_NODE_INPUT", 10),
    ("UNSUPPORTED_NODE_DATATYPE", 11), ("UNSUPPORTED_NODE_DYNAMIC", 12), ("UNSUPPORTED_NODE_SHAPE", 13),
    ("REFIT_FAILED", 14)])
OnnxParserFlag = _Enum("OnnxParserFlag", [("NATIVE_INSTANCENORM", 0)])


class _Internal:
    """Base of the classes TensorRT only hands out (pybind11 says "No constructor defined!")."""

    _constructible = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(f"tensorrt.tensorrt.{type(self).__name__}: No constructor defined!")

    @classmethod
    def _make(cls, **attrs: Any) -> Any:
        obj = cls.__new__(cls)
        obj.__dict__.update(attrs)
        return obj


def _nullptr() -> TypeError:
    return TypeError("pybind11::init(): factory function returned nullptr")


class Dims:
    """A tensor shape; compares equal to a tuple or list of the same numbers."""

    __hash__ = None  # type: ignore[assignment]

    def __init__(self, shape: Iterable[int] | None = None) -> None:
        self._dims = [int(d) for d in shape] if shape is not None else []

    def __len__(self) -> int:
        return len(self._dims)

    def __getitem__(self, arg0: int | slice) -> Any:
        if isinstance(arg0, slice):
            return tuple(self._dims[arg0])
        if not -len(self._dims) <= arg0 < len(self._dims):
            raise IndexError("Out of bounds")
        return self._dims[arg0]

    def __setitem__(self, arg0: int | slice, arg1: Any) -> None:
        if isinstance(arg0, slice):
            self._dims[arg0] = [int(d) for d in arg1]
        else:
            self[arg0]   # bounds check
            self._dims[arg0] = int(arg1)

    def __eq__(self, arg0: object) -> bool:
        if isinstance(arg0, (list, tuple)):
            return list(arg0) == self._dims
        return NotImplemented

    def __str__(self) -> str:
        return str(tuple(self._dims))

    __repr__ = __str__


def dims_tuple(shape: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in shape)


# ------------------------------------------------------------------ logging
_Severity = _Enum("Severity", [("INTERNAL_ERROR", 0), ("ERROR", 1), ("WARNING", 2), ("INFO", 3), ("VERBOSE", 4)])


class ILogger:
    """Subclass and override ``log`` to receive TensorRT's messages."""

    _constructible = True
    Severity = _Severity

    def __init__(self) -> None:
        pass

    def log(self, severity: Any, msg: str) -> None:
        pass


class Logger(ILogger):
    """TensorRT's default logger: messages at ``min_severity`` or worse go to stderr."""

    def __init__(self, min_severity: Any = _Severity.WARNING) -> None:
        super().__init__()
        self._min_severity = min_severity

    @property
    def min_severity(self) -> Any:
        return self._min_severity

    @min_severity.setter
    def min_severity(self, value: Any) -> None:
        self._min_severity = value

    def log(self, severity: Any, msg: str) -> None:
        if int(severity) <= int(self.min_severity):
            letter = "FEWIV"[int(severity)]
            print(f"[{time.strftime('%m/%d/%Y-%H:%M:%S')}] [TRT] [{letter}] {msg}", file=sys.stderr)


for _member in _Severity:
    setattr(ILogger, _member.name, _member)
    setattr(Logger, _member.name, _member)

messages: list[tuple[Any, str]] = []   # every message the fake sent to a logger


def emit(logger: Any, severity: Any, msg: str) -> None:
    """Send ``msg`` to the logger the user gave TensorRT (and keep it for tests)."""
    messages.append((severity, msg))
    if logger is not None:
        logger.log(severity, msg)


def error(logger: Any, msg: str) -> None:
    emit(logger, _Severity.ERROR, msg)


# ------------------------------------------------------------------ faults
@dataclass
class Faults:
    """What the fake should get wrong; ``reset()`` before each test (the fixtures do)."""

    builder_nullptr: bool = False         # trt.Builder(logger) raises TypeError (creation returned nullptr)
    runtime_nullptr: bool = False         # trt.Runtime(logger) likewise
    parse_errors: list = field(default_factory=list)   # OnnxParser.parse fails with these descriptions
    build_fails: str = ""                 # build_serialized_network logs this error and returns None
    deserialize_fails: bool = False       # Runtime.deserialize_cuda_engine returns None
    context_fails: bool = False           # ICudaEngine.create_execution_context returns None
    execute_fails: bool = False           # IExecutionContext.execute_async_v3 returns False
    nptype_unsupported: set = field(default_factory=set)   # DataTypes nptype() raises TypeError for
    dynamic_output_dims: bool = False     # outputs have data-dependent shapes: -1 in the last dimension
    import_error: BaseException | None = None   # `import tensorrt` raises this (a broken install)
    platform_has_fast_fp16: bool = True
    platform_has_fast_int8: bool = True
    platform_has_tf32: bool = True

    def reset(self) -> None:
        for name, value in Faults().__dict__.items():
            setattr(self, name, value)


faults = Faults()


# ------------------------------------------------------------------ device memory
def cuda_runtime() -> Any:
    """The fake CUDA runtime in use (tests/support/fake_cudart), or None."""
    module = sys.modules.get("cuda.bindings.runtime")
    return module if module is not None and hasattr(module, "_fake") else None


def cuda_init_error(logger: Any) -> bool:
    """Log and return True when the fake CUDA runtime reports no usable GPU (as TensorRT does)."""
    rt = cuda_runtime()
    err = rt._fake.init_error() if rt is not None else None
    if err is None:
        return False
    error(logger, f"6: CUDA initialization failure with error: {int(err)}. Please check your CUDA "
                  "installation: http://docs.nvidia.com/cuda/cuda-installation-guide-linux/index.html")
    return True


def device_identity() -> dict[str, Any]:
    """Name and compute capability of the fake GPU (what an engine is tied to)."""
    rt = cuda_runtime()
    if rt is None:
        return {}
    props = rt._fake.properties
    return {"gpu": props["name"].decode(), "compute": [props["major"], props["minor"]]}
