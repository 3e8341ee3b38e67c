"""Enums, structs and handles of the fake ``cuda.bindings.runtime`` (values as in cuda-python 12)."""
from __future__ import annotations

import enum


class cudaError_t(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorInitializationError = 3
    cudaErrorCudartUnloading = 4
    cudaErrorInvalidDevicePointer = 17
    cudaErrorInvalidMemcpyDirection = 21
    cudaErrorStubLibrary = 34
    cudaErrorInsufficientDriver = 35
    cudaErrorDevicesUnavailable = 46
    cudaErrorNoDevice = 100
    cudaErrorInvalidDevice = 101
    cudaErrorInvalidResourceHandle = 400
    cudaErrorNotReady = 600
    cudaErrorIllegalAddress = 700
    cudaErrorLaunchFailure = 719
    cudaErrorSystemNotReady = 802
    cudaErrorSystemDriverMismatch = 803
    cudaErrorUnknown = 999


_ERROR_STRINGS = {   # cudaGetErrorString of the real runtime
    0: b"no error", 1: b"invalid argument", 2: b"out of memory", 3: b"initialization error",
    4: b"driver shutting down", 17: b"invalid device pointer", 21: b"invalid copy direction for memcpy",
    34: b"CUDA driver is a stub library",
    35: b"CUDA driver version is insufficient for CUDA runtime version",
    46: b"CUDA-capable device(s) is/are busy or unavailable", 100: b"no CUDA-capable device is detected",
    101: b"invalid device ordinal", 400: b"invalid resource handle", 600: b"device not ready",
    700: b"an illegal memory access was encountered", 719: b"unspecified launch failure",
    802: b"system not yet initialized", 803: b"system has unsupported display driver / cuda driver combination",
    999: b"unknown error",
}


class cudaMemcpyKind(enum.IntEnum):
    cudaMemcpyHostToHost = 0
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2
    cudaMemcpyDeviceToDevice = 3
    cudaMemcpyDefault = 4


class cudaDeviceAttr(enum.IntEnum):
    cudaDevAttrMaxThreadsPerBlock = 1
    cudaDevAttrWarpSize = 10
    cudaDevAttrClockRate = 13
    cudaDevAttrMultiProcessorCount = 16
    cudaDevAttrIntegrated = 18
    cudaDevAttrCanMapHostMemory = 19
    cudaDevAttrMemoryClockRate = 36
    cudaDevAttrGlobalMemoryBusWidth = 37
    cudaDevAttrL2CacheSize = 38
    cudaDevAttrUnifiedAddressing = 41
    cudaDevAttrComputeCapabilityMajor = 75
    cudaDevAttrComputeCapabilityMinor = 76
    cudaDevAttrManagedMemory = 83
    cudaDevAttrPageableMemoryAccess = 88
    cudaDevAttrConcurrentManagedAccess = 89


cudaHostAllocDefault = 0
cudaHostAllocPortable = 1
cudaHostAllocMapped = 2
cudaHostAllocWriteCombined = 4
cudaStreamDefault = 0
cudaStreamNonBlocking = 1

# field -> (device attribute, value of the fake device: a Jetson AGX Orin 64 GB)
_ORIN = {
    "name": (None, b"Orin"), "major": (cudaDeviceAttr.cudaDevAttrComputeCapabilityMajor, 8),
    "minor": (cudaDeviceAttr.cudaDevAttrComputeCapabilityMinor, 7),
    "totalGlobalMem": (None, 64_336_318_464),
    "multiProcessorCount": (cudaDeviceAttr.cudaDevAttrMultiProcessorCount, 16),
    "integrated": (cudaDeviceAttr.cudaDevAttrIntegrated, 1), "warpSize": (cudaDeviceAttr.cudaDevAttrWarpSize, 32),
    "maxThreadsPerBlock": (cudaDeviceAttr.cudaDevAttrMaxThreadsPerBlock, 1024),
    "canMapHostMemory": (cudaDeviceAttr.cudaDevAttrCanMapHostMemory, 1),
    "unifiedAddressing": (cudaDeviceAttr.cudaDevAttrUnifiedAddressing, 1),
    "managedMemory": (cudaDeviceAttr.cudaDevAttrManagedMemory, 1),
    "concurrentManagedAccess": (cudaDeviceAttr.cudaDevAttrConcurrentManagedAccess, 0),
    "pageableMemoryAccess": (cudaDeviceAttr.cudaDevAttrPageableMemoryAccess, 0),
    "clockRate": (cudaDeviceAttr.cudaDevAttrClockRate, 1_300_000),
    "memoryClockRate": (cudaDeviceAttr.cudaDevAttrMemoryClockRate, 3_199_000),
    "memoryBusWidth": (cudaDeviceAttr.cudaDevAttrGlobalMemoryBusWidth, 256),
    "l2CacheSize": (cudaDeviceAttr.cudaDevAttrL2CacheSize, 4_194_304),
}


class cudaDeviceProp:
    """Device properties (the fields the fake fills; the real struct has ~90)."""

    __slots__ = tuple(_ORIN)

    def __init__(self) -> None:
        for name, (_, value) in _ORIN.items():
            setattr(self, name, type(value)())

    def __repr__(self) -> str:
        return "\n".join(f"{name} : {getattr(self, name)!r}" for name in self.__slots__)


class cudaStream_t:
    """CUDA stream handle; ``int()`` gives the value TensorRT takes."""

    def __init__(self, init_value: int = 0, _ptr: int = 0) -> None:
        self._handle = int(init_value)

    def getPtr(self) -> int:
        return id(self)

    def __int__(self) -> int:
        return self._handle

    __index__ = __int__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, cudaStream_t) and int(other) == self._handle

    def __hash__(self) -> int:
        return self._handle

    def __repr__(self) -> str:
        return f"<CUstream {self._handle:#x}>"
