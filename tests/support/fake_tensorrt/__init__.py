"""A stand-in for the TensorRT 10.3 Python API (``import tensorrt``) on machines without a GPU.

Names, parameter names, defaults and failure conventions follow the real bindings, recorded
in tests/support/tensorrt_10_3_api.json (tests/test_fake_tensorrt.py checks every name
defined here against it). ONNX Runtime does the arithmetic; device memory is the fake CUDA
runtime's (tests/support/fake_cudart), which must be loaded as ``cuda.bindings.runtime`` for
inference and INT8 calibration. tests/support/trt_fakes.py installs both for one test.

What a test can steer: :data:`faults` (injected failures, platform capabilities; reset
with :func:`reset`) and :data:`messages` (every message sent to a TensorRT logger).
"""
from __future__ import annotations

from typing import Any, Iterable

from ._builder import (Builder, IBuilderConfig, IInt8Calibrator, IInt8EntropyCalibrator, IInt8EntropyCalibrator2,
                       IInt8MinMaxCalibrator, IOptimizationProfile, ITimingCache)
from ._common import (VERSION, BuilderFlag, CalibrationAlgoType, DataType, Dims, ErrorCode,
                      ExecutionContextAllocationStrategy, ILogger, Logger, MemoryPoolType,
                      NetworkDefinitionCreationFlag, OnnxParserFlag, TensorIOMode, TensorLocation, faults,
                      messages)
from ._engine import ICudaEngine, IExecutionContext, IHostMemory, Runtime
from ._network import INetworkDefinition, ITensor, OnnxParser, ParserError

__version__ = VERSION

__all__ = [  # the real API names this fake provides
    "Builder", "BuilderFlag", "CalibrationAlgoType", "DataType", "Dims", "ErrorCode",
    "ExecutionContextAllocationStrategy", "IBuilderConfig", "ICudaEngine", "IExecutionContext", "IHostMemory",
    "IInt8Calibrator", "IInt8EntropyCalibrator", "IInt8EntropyCalibrator2", "IInt8MinMaxCalibrator", "ILogger",
    "INetworkDefinition", "IOptimizationProfile", "ITensor", "ITimingCache", "Logger", "MemoryPoolType",
    "NetworkDefinitionCreationFlag", "OnnxParser", "OnnxParserFlag", "ParserError", "Runtime", "TensorIOMode",
    "TensorLocation", "bfloat16", "bool", "float16", "float32", "fp8", "get_nv_onnx_parser_version",
    "init_libnvinfer_plugins", "int32", "int4", "int64", "int8", "nptype", "uint8", "volume",
]


def reset() -> None:
    """No faults, no messages: what each test starts from."""
    faults.reset()
    messages.clear()


def volume(iterable: Iterable[int]) -> int:
    """The number of elements of a shape (1 for an empty one), as tensorrt.volume."""
    vol = 1
    for elem in iterable:
        vol *= elem
    return vol


def nptype(trt_type: DataType) -> Any:
    """The numpy type of a TensorRT DataType; TypeError where numpy has none (BF16, FP8, INT4)."""
    import numpy as np

    mapping = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8,
               DataType.INT32: np.int32, DataType.INT64: np.int64, DataType.BOOL: np.bool_,
               DataType.UINT8: np.uint8}
    if trt_type in mapping and trt_type not in faults.nptype_unsupported:
        return mapping[trt_type]
    raise TypeError("Could not resolve TensorRT datatype to an equivalent numpy datatype.")


def init_libnvinfer_plugins(logger: Any, namespace: str) -> bool:
    """Registers the standard plugins (none in the fake)."""
    return True


def get_nv_onnx_parser_version() -> int:
    return 10300


# the DataType aliases of tensorrt/__init__.py; ``bool`` last, as it shadows the builtin here
float32, float16, bfloat16 = DataType.FLOAT, DataType.HALF, DataType.BF16
int8, int32, int64, uint8 = DataType.INT8, DataType.INT32, DataType.INT64, DataType.UINT8
fp8, int4 = DataType.FP8, DataType.INT4
bool = DataType.BOOL  # noqa: A001
