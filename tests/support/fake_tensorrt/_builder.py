"""Builder, builder config, optimization profiles, timing caches and INT8 calibrators (fake)."""
from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

from ._common import (VERSION, BuilderFlag, CalibrationAlgoType, Dims, MemoryPoolType, _Internal, _nullptr,
                      _Severity, cuda_init_error, cuda_runtime, device_identity, dims_tuple, emit, error, faults)
from ._engine import NUMPY, IHostMemory, Model, host_memory, serialize_plan
from ._network import INetworkDefinition, new_network

_TIMING_MAGIC = b"FTRTTIM1"
_CALIB_MAGIC = b"FTRTCAL1"


# ------------------------------------------------------------------ calibrators
class IInt8Calibrator:
    """Base of the INT8 calibrators; subclass one and override the methods below."""

    _constructible = True
    _algorithm = CalibrationAlgoType.LEGACY_CALIBRATION

    def __init__(self) -> None:
        pass

    def get_batch_size(self) -> int:
        emit(None, _Severity.ERROR, "Exception caught in get_batch_size(): Tried to call pure virtual function")
        return -1

    def get_batch(self, names: list[str]) -> list[int]:
        return []

    def get_algorithm(self) -> CalibrationAlgoType:
        return self._algorithm

    def read_calibration_cache(self) -> Any:
        return None

    def write_calibration_cache(self, cache: Any) -> None:
        return None


class IInt8EntropyCalibrator2(IInt8Calibrator):
    _algorithm = CalibrationAlgoType.ENTROPY_CALIBRATION_2


class IInt8EntropyCalibrator(IInt8Calibrator):
    _algorithm = CalibrationAlgoType.ENTROPY_CALIBRATION


class IInt8MinMaxCalibrator(IInt8Calibrator):
    _algorithm = CalibrationAlgoType.MINMAX_CALIBRATION


# ------------------------------------------------------------------ profiles and caches
class IOptimizationProfile(_Internal):
    """min/opt/max shapes per dynamic input."""

    def set_shape(self, input: str, min: Any, opt: Any, max: Any) -> None:
        self._shapes[str(input)] = [dims_tuple(min), dims_tuple(opt), dims_tuple(max)]

    def get_shape(self, input: str) -> list[Dims]:
        return [Dims(s) for s in self._shapes.get(input, [])]

    @property
    def extra_memory_target(self) -> float:
        return self._extra

    @extra_memory_target.setter
    def extra_memory_target(self, value: float) -> None:
        self._extra = float(value)

    def __bool__(self) -> bool:
        for low, opt, high in self._shapes.values():
            if not len(low) == len(opt) == len(high) or not all(a <= b <= c for a, b, c in zip(low, opt, high)):
                return False
        return True


class ITimingCache(_Internal):
    """Timing results by layer; the fake records one entry per network and precision built."""

    def serialize(self) -> IHostMemory:
        return host_memory(_TIMING_MAGIC + json.dumps({"version": VERSION, "device": self._device,
                                                       "entries": self._entries}, sort_keys=True).encode())

    def combine(self, input_cache: ITimingCache, ignore_mismatch: bool) -> bool:
        if input_cache._device != self._device and not ignore_mismatch:
            return False
        self._entries.update(input_cache._entries)
        return True

    def reset(self) -> bool:
        self._entries.clear()
        return True


def _timing_cache(data: bytes, logger: Any) -> ITimingCache | None:
    entries, device = {}, device_identity()
    if data:
        try:
            if not data.startswith(_TIMING_MAGIC):
                raise ValueError("bad magic")
            content = json.loads(data[len(_TIMING_MAGIC):])
            if content["version"] != VERSION:
                raise ValueError(f"built by TensorRT {content['version']}")
            entries, device = content["entries"], content["device"]
        except (ValueError, KeyError) as exc:
            error(logger, f"1: [cache.cpp::deserialize] Error Code 1: Serialization (timing cache: {exc})")
            return None
    return ITimingCache._make(_entries=entries, _device=device)


class IBuilderConfig(_Internal):
    """Build options: precision flags, memory pools, profiles, calibrator, timing cache."""

    @property
    def flags(self) -> int:
        return self._flags

    @flags.setter
    def flags(self, value: int) -> None:
        self._flags = int(value)

    def set_flag(self, flag: BuilderFlag) -> None:
        self._flags |= 1 << _flag(flag)

    def clear_flag(self, flag: BuilderFlag) -> None:
        self._flags &= ~(1 << _flag(flag))

    def get_flag(self, flag: BuilderFlag) -> bool:
        return bool(self._flags & (1 << _flag(flag)))

    def set_memory_pool_limit(self, pool: MemoryPoolType, pool_size: int) -> None:
        if not isinstance(pool, MemoryPoolType):
            raise TypeError("set_memory_pool_limit(): incompatible function arguments (pool: MemoryPoolType)")
        self._pools[pool] = int(pool_size)

    def get_memory_pool_limit(self, pool: MemoryPoolType) -> int:
        return self._pools.get(pool, 0)

    @property
    def int8_calibrator(self) -> IInt8Calibrator | None:
        return self._calibrator

    @int8_calibrator.setter
    def int8_calibrator(self, value: IInt8Calibrator | None) -> None:
        if value is not None and not isinstance(value, IInt8Calibrator):
            raise TypeError("(): incompatible function arguments (int8_calibrator: IInt8Calibrator)")
        self._calibrator = value

    def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
        if not profile:
            error(self._logger, "4: [optimizationProfile.cpp::isValid] Error Code 4: API Usage Error "
                                "(the profile's min <= opt <= max does not hold)")
            return -1
        self._profiles.append(profile)
        return len(self._profiles) - 1

    @property
    def num_optimization_profiles(self) -> int:
        return len(self._profiles)

    def set_calibration_profile(self, profile: IOptimizationProfile) -> bool:
        if not profile:
            return False
        self._calibration_profile = profile
        return True

    def get_calibration_profile(self) -> IOptimizationProfile | None:
        return self._calibration_profile

    def create_timing_cache(self, serialized_timing_cache: Any) -> ITimingCache | None:
        return _timing_cache(bytes(serialized_timing_cache), self._logger)

    def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
        if cache is not None and cache._device != device_identity() and not ignore_mismatch:
            error(self._logger, "1: timing cache was created on another device; not used")
            return False
        self._timing_cache = cache
        return True

    def get_timing_cache(self) -> ITimingCache | None:
        return self._timing_cache

    @property
    def builder_optimization_level(self) -> int:
        return self._optimization_level

    @builder_optimization_level.setter
    def builder_optimization_level(self, value: int) -> None:
        self._optimization_level = int(value)

    def reset(self) -> None:
        self.__dict__.update(_config_state(self._logger))


def _flag(flag: Any) -> int:
    if not isinstance(flag, BuilderFlag):
        raise TypeError("incompatible function arguments: flag must be a tensorrt.BuilderFlag")
    return int(flag)


def _config_state(logger: Any) -> dict[str, Any]:
    rt = cuda_runtime()
    workspace = rt._fake.properties["totalGlobalMem"] if rt is not None else 8 << 30
    return {"_logger": logger, "_flags": 1 << int(BuilderFlag.TF32),   # TF32 is on by default
            "_pools": {MemoryPoolType.WORKSPACE: workspace}, "_calibrator": None, "_profiles": [],
            "_calibration_profile": None, "_timing_cache": None, "_optimization_level": 3}


# ------------------------------------------------------------------ builder
class Builder:
    """Builds plans from parsed networks."""

    _constructible = True

    def __init__(self, logger: Any) -> None:
        if faults.builder_nullptr or cuda_init_error(logger):
            raise _nullptr()
        self._logger, self._max_threads = logger, 1

    @property
    def logger(self) -> Any:
        return self._logger

    @property
    def platform_has_fast_fp16(self) -> bool:
        return faults.platform_has_fast_fp16

    @property
    def platform_has_fast_int8(self) -> bool:
        return faults.platform_has_fast_int8

    @property
    def platform_has_tf32(self) -> bool:
        return faults.platform_has_tf32

    @property
    def num_DLA_cores(self) -> int:
        return 0

    @property
    def max_threads(self) -> int:
        return self._max_threads

    @max_threads.setter
    def max_threads(self, value: int) -> None:
        self._max_threads = int(value)

    def create_network(self, flags: int = 0) -> INetworkDefinition:
        return new_network(self, flags)

    def create_builder_config(self) -> IBuilderConfig:
        return IBuilderConfig._make(**_config_state(self._logger))

    def create_optimization_profile(self) -> IOptimizationProfile:
        return IOptimizationProfile._make(_shapes={}, _extra=1.0)

    def is_network_supported(self, network: INetworkDefinition, config: IBuilderConfig) -> bool:
        return network._onnx is not None

    def reset(self) -> None:
        pass

    def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig) -> IHostMemory | None:
        try:
            return host_memory(self._build(network, config))
        except _BuildError as exc:
            error(self._logger, str(exc))
            return None

    def _build(self, network: INetworkDefinition, config: IBuilderConfig) -> bytes:
        if faults.build_fails:
            raise _BuildError(faults.build_fails)
        if network._onnx is None or not network._outputs:
            raise _BuildError("4: [network.cpp::validate] Error Code 4: Internal Error (Network must have at "
                              "least one output)")
        profiles = [p._shapes for p in config._profiles]
        for tensor in network._inputs:
            if -1 not in tensor._shape:
                continue
            if not profiles:
                raise _BuildError("4: [network.cpp::validate] Error Code 4: Internal Error (Network has dynamic "
                                  "or shape inputs, but no optimization profile has been defined.)")
            for index, shapes in enumerate(profiles):
                bounds = shapes.get(tensor._name)
                ok = bounds is not None and all(
                    len(s) == len(tensor._shape) and all(d in (-1, v) for d, v in zip(tensor._shape, s))
                    for s in bounds)
                if not ok:
                    raise _BuildError(f"4: [network.cpp::validate] Error Code 4: Internal Error ({tensor._name}: "
                                      f"optimization profile {index} is missing or does not match the "
                                      f"dimensions {tensor._shape}.)")
        fp16 = config.get_flag(BuilderFlag.FP16)
        tf32 = config.get_flag(BuilderFlag.TF32) and faults.platform_has_tf32
        int8_amax = None
        if config.get_flag(BuilderFlag.INT8):
            if config._calibrator is None:
                emit(self._logger, _Severity.WARNING, "Calibrator is not being used. Users must provide dynamic "
                     "range for all tensors that are not Int32 or Bool.")
            else:
                int8_amax = self._calibrate(network, config)
        precision = "int8" if int8_amax else "fp16" if fp16 else "fp32"
        tensors = [{"name": t._name, "mode": "INPUT" if t._is_input else "OUTPUT", "dtype": t._dtype.name,
                    "shape": list(t._shape)} for t in network._inputs + network._outputs]
        header = {"version": VERSION, "device": device_identity() or None, "precision": precision,
                  "fp16": fp16, "tf32": tf32, "int8_amax": int8_amax, "tensors": tensors,
                  "profiles": profiles, "name": network._name, "layers": network._num_layers,
                  "onnx_bytes": len(network._onnx)}
        if config._timing_cache is not None:
            key = hashlib.sha256(network._onnx + precision.encode()).hexdigest()[:16]
            config._timing_cache._entries[key] = {"precision": precision, "layers": network._num_layers}
        emit(self._logger, _Severity.INFO, f"Engine generation completed ({precision}, fake TensorRT {VERSION})")
        return serialize_plan(header, network._onnx)

    def _calibrate(self, network: INetworkDefinition, config: IBuilderConfig) -> dict[str, float]:
        """Run the calibrator as TensorRT does: get_batch until it returns nothing; ranges per output."""
        calibrator = config._calibrator
        cache = calibrator.read_calibration_cache()
        if cache:
            data = bytes(cache)
            if data.startswith(_CALIB_MAGIC):
                return json.loads(data[len(_CALIB_MAGIC):])
            raise _BuildError("2: [calibrator.cpp::calibrateEngine] Error Code 2: Internal Error (the "
                              "calibration cache is not one this TensorRT wrote)")
        rt = cuda_runtime()
        if rt is None:
            raise _BuildError("1: calibration needs device memory: load tests/support/fake_cudart")
        batch_size = calibrator.get_batch_size()
        if batch_size < 1:
            raise _BuildError(f"2: [calibrator.cpp::calibrateEngine] Error Code 2: Internal Error (batch "
                              f"size {batch_size} from get_batch_size())")
        profile = config._calibration_profile or (config._profiles[0] if config._profiles else None)
        names = [t._name for t in network._inputs]
        model = Model(network._onnx, {})
        amax: dict[str, float] = {}
        batches = 0
        while True:
            pointers = calibrator.get_batch(names)
            if not pointers:
                break
            if len(pointers) != len(names):
                raise _BuildError(f"2: calibrator returned {len(pointers)} pointers for {len(names)} inputs")
            feed = {}
            for tensor, ptr in zip(network._inputs, pointers):
                shape = tensor._shape
                if -1 in shape:
                    shape = profile._shapes[tensor._name][1] if profile else shape
                dtype = np.dtype(NUMPY[tensor._dtype])
                data = rt._fake.read(int(ptr), int(np.prod(shape)) * dtype.itemsize,
                                     f"calibration batch {batches} input {tensor._name!r}")
                if data is None:
                    raise _BuildError("1: [calibrator.cpp::calibrateEngine] Error Code 1: Cuda Runtime "
                                      "(an illegal memory access was encountered)")
                feed[tensor._name] = np.frombuffer(data, dtype=dtype).reshape(shape).copy()
            for name, value in model.run(feed, exact=True).items():
                if value.dtype == np.float32:
                    amax[name] = max(amax.get(name, 0.0), float(np.max(np.abs(value))))
            batches += 1
        if not batches:
            raise _BuildError("2: [calibrator.cpp::calibrateEngine] Error Code 2: Internal Error (Calibration "
                              "failure occurred with no scaling factors detected. This could be due to no int8 "
                              "calibrator or insufficient custom scales for network layers.)")
        emit(self._logger, _Severity.INFO, f"Calibrated with {batches} batches")
        calibrator.write_calibration_cache(memoryview(_CALIB_MAGIC + json.dumps(amax, sort_keys=True).encode()))
        return amax


class _BuildError(Exception):
    pass
