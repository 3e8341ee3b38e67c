"""Plans, Runtime, ICudaEngine and IExecutionContext of the fake TensorRT.

A plan ("serialized engine") is ``MAGIC``, a 4-byte little-endian header length, a JSON
header (fake TensorRT version, GPU it was built for, precision, tensor table, optimization
profiles, INT8 ranges) and the ONNX bytes. ONNX Runtime does the arithmetic; precision is
imitated by rounding: FP16 rounds inputs and outputs through float16, TF32 (left enabled on
an fp32 build) rounds inputs to a 10-bit mantissa, INT8 quantises outputs to 255 levels of
the calibrated range.
"""
from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np

from ._common import (VERSION, DataType, Dims, ExecutionContextAllocationStrategy, TensorIOMode, _Internal,
                      _nullptr, _Severity, cuda_init_error, cuda_runtime, device_identity, dims_tuple, emit,
                      error, faults)

MAGIC = b"FTRTPLN1"
NUMPY = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8,
         DataType.INT32: np.int32, DataType.INT64: np.int64, DataType.BOOL: np.bool_, DataType.UINT8: np.uint8}


def serialize_plan(header: dict[str, Any], onnx: bytes) -> bytes:
    head = json.dumps(header, sort_keys=True).encode()
    return MAGIC + struct.pack("<I", len(head)) + head + onnx


def parse_plan(data: bytes) -> tuple[dict[str, Any], bytes]:
    """Header and ONNX bytes of a plan; ValueError saying what TensorRT would say."""
    if data[:len(MAGIC)] != MAGIC or len(data) < len(MAGIC) + 4:
        raise ValueError("1: [runtime.cpp::parsePlan::314] Error Code 1: Serialization (Serialization "
                         "assertion plan->header.magicTag == rt::kPLAN_MAGIC_TAG failed.)")
    (length,) = struct.unpack_from("<I", data, len(MAGIC))
    start = len(MAGIC) + 4
    try:
        header = json.loads(data[start:start + length])
    except ValueError:
        raise ValueError("1: [stdArchiveReader.cpp::StdArchiveReaderInitCommon::47] Error Code 1: "
                         "Serialization (Serialization assertion stdVersionRead == kSERIALIZATION_VERSION "
                         "failed.Version tag does not match.)") from None
    onnx = data[start + length:]
    if header.get("version") != VERSION:
        raise ValueError("6: The engine plan file is not compatible with this version of TensorRT, "
                         f"expecting library version {VERSION}.0 got {header.get('version')}.0, please "
                         "rebuild.")
    if len(onnx) != header.get("onnx_bytes"):
        raise ValueError("1: [runtime.cpp::deserializeCudaEngine] Error Code 1: Serialization "
                         "(the plan is truncated)")
    here = device_identity()
    if here and header.get("device") and header["device"]["compute"] != here["compute"]:
        built, now = header["device"]["compute"], here["compute"]
        raise ValueError(f"6: The engine plan file is generated on an incompatible device, expecting "
                         f"compute {now[0]}.{now[1]} got compute {built[0]}.{built[1]}, please rebuild.")
    return header, onnx


def round_mantissa(x: np.ndarray, keep_bits: int) -> np.ndarray:
    """float32 rounded (to nearest even) to ``keep_bits`` mantissa bits; TF32 keeps 10."""
    drop = 23 - keep_bits
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = ((u + (1 << (drop - 1)) - 1 + ((u >> drop) & 1)) >> drop) << drop
    return (u & 0xFFFFFFFF).astype(np.uint32).view(np.float32).reshape(np.shape(x))


class Model:
    """The ONNX model under an engine, with the engine's precision imitated."""

    def __init__(self, onnx: bytes, header: dict[str, Any]) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.log_severity_level = 3
        self.session = ort.InferenceSession(onnx, options, providers=["CPUExecutionProvider"])
        self.fp16, self.tf32 = header.get("fp16", False), header.get("tf32", False)
        self.int8_amax = header.get("int8_amax") or {}

    def run(self, inputs: dict[str, np.ndarray], exact: bool = False) -> dict[str, np.ndarray]:
        feed = {}
        for spec in self.session.get_inputs():
            x = inputs[spec.name]
            if x.dtype == np.float32 and not exact and self.fp16:
                x = x.astype(np.float16).astype(np.float32)
            elif x.dtype == np.float32 and not exact and self.tf32:
                x = round_mantissa(x, 10)
            feed[spec.name] = x
        names = [o.name for o in self.session.get_outputs()]
        outputs = dict(zip(names, self.session.run(names, feed)))
        if exact:
            return outputs
        for name, y in outputs.items():
            if y.dtype != np.float32:
                continue
            if name in self.int8_amax and self.int8_amax[name] > 0:
                scale = self.int8_amax[name] / 127.0
                y = (np.clip(np.round(y / scale), -127, 127) * scale).astype(np.float32)
            if self.fp16:
                y = y.astype(np.float16).astype(np.float32)
            outputs[name] = y
        return outputs


class IHostMemory(_Internal):
    """Bytes TensorRT hands back (a plan, a timing cache). ``bytes(memory)`` copies them."""

    @property
    def nbytes(self) -> int:
        return len(self._data)

    @property
    def dtype(self) -> DataType:
        return DataType.UINT8

    def __bytes__(self) -> bytes:   # the real one has the buffer protocol
        return self._data

    def __buffer__(self, flags: int) -> memoryview:   # Python >= 3.12 buffer protocol
        return memoryview(self._data)


def host_memory(data: bytes) -> IHostMemory:
    return IHostMemory._make(_data=bytes(data))


def _as_bytes(buffer: Any) -> bytes:
    if isinstance(buffer, IHostMemory):
        return bytes(buffer)
    try:
        return bytes(memoryview(buffer))
    except TypeError:
        raise TypeError("deserialize_cuda_engine(): incompatible function arguments. The following argument "
                        "types are supported:\n    1. (self: tensorrt.tensorrt.Runtime, serialized_engine: "
                        f"buffer) -> tensorrt.tensorrt.ICudaEngine\n\nInvoked with: {type(buffer).__name__}") \
            from None


class Runtime:
    """Deserializes plans built by the fake Builder of this same version."""

    _constructible = True

    def __init__(self, logger: Any) -> None:
        if faults.runtime_nullptr or cuda_init_error(logger):
            raise _nullptr()
        self._logger, self._max_threads = logger, 1

    @property
    def logger(self) -> Any:
        return self._logger

    @property
    def max_threads(self) -> int:
        return self._max_threads

    @max_threads.setter
    def max_threads(self, value: int) -> None:
        self._max_threads = int(value)

    def deserialize_cuda_engine(self, serialized_engine: Any) -> ICudaEngine | None:
        data = _as_bytes(serialized_engine)
        if faults.deserialize_fails:
            error(self._logger, "1: [runtime.cpp::deserializeCudaEngine] Error Code 1: Serialization "
                                "(injected failure)")
            return None
        try:
            header, onnx = parse_plan(data)
        except ValueError as exc:
            error(self._logger, str(exc))
            return None
        return ICudaEngine._make(_header=header, _onnx=onnx, _plan=data, _model=Model(onnx, header),
                                 _logger=self._logger,
                                 _tensors={t["name"]: t for t in header["tensors"]})


class ICudaEngine(_Internal):
    """An engine: its I/O tensor table, and execution contexts that run it."""

    @property
    def num_io_tensors(self) -> int:
        return len(self._header["tensors"])

    @property
    def num_layers(self) -> int:
        return self._header["layers"]

    @property
    def num_optimization_profiles(self) -> int:
        return max(1, len(self._header["profiles"]))

    @property
    def name(self) -> str:
        return self._header["name"]

    @property
    def device_memory_size(self) -> int:
        return 0

    @property
    def refittable(self) -> bool:
        return False

    @property
    def has_implicit_batch_dimension(self) -> bool:
        return False

    def get_tensor_name(self, index: int) -> str | None:
        tensors = self._header["tensors"]
        return tensors[index]["name"] if 0 <= index < len(tensors) else None

    def _tensor(self, name: str, what: str) -> dict[str, Any] | None:
        tensor = self._tensors.get(name)
        if tensor is None:
            error(self._logger, f"3: [engine.cpp::{what}] Error Code 3: API Usage Error (Parameter check "
                                f"failed, condition: tensor name \"{name}\" is not an I/O tensor of the engine.)")
        return tensor

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        tensor = self._tensors.get(name)
        return TensorIOMode[tensor["mode"]] if tensor else TensorIOMode.NONE

    def get_tensor_dtype(self, name: str) -> DataType:
        tensor = self._tensor(name, "getTensorDataType")
        return DataType[tensor["dtype"]] if tensor else DataType.FLOAT

    def get_tensor_shape(self, name: str) -> Dims:
        tensor = self._tensor(name, "getTensorShape")
        if tensor and faults.dynamic_output_dims and tensor["mode"] == "OUTPUT":
            # a data-dependent output (NonZero, NMS): the engine declares -1 as the real one does
            return Dims(tuple(tensor["shape"])[:-1] + (-1,))
        return Dims(tensor["shape"] if tensor else [])

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[Dims]:
        profiles = self._header["profiles"]
        if not 0 <= profile_index < len(profiles) or name not in profiles[profile_index]:
            shape = self._tensors.get(name, {}).get("shape")
            return [Dims(shape)] * 3 if shape and -1 not in shape and self.get_tensor_mode(name) == \
                TensorIOMode.INPUT else []
        return [Dims(s) for s in profiles[profile_index][name]]

    def create_execution_context(self, strategy: ExecutionContextAllocationStrategy =
                                 ExecutionContextAllocationStrategy.STATIC) -> IExecutionContext | None:
        if faults.context_fails:
            error(self._logger, "2: [executionContext.cpp::ExecutionContext] Error Code 2: OutOfMemory "
                                "(injected failure)")
            return None
        inputs = {n: tuple(t["shape"]) for n, t in self._tensors.items() if t["mode"] == "INPUT"}
        return IExecutionContext._make(_engine=self, _addresses={}, _shapes=inputs, _name="", _shape_cache={})

    def serialize(self) -> IHostMemory:
        return host_memory(self._plan)


class IExecutionContext(_Internal):
    """Runs the engine on a stream, reading and writing the tensors' device addresses."""

    @property
    def engine(self) -> ICudaEngine:
        return self._engine

    @property
    def name(self) -> str:
        return self._name

    @name.setter
    def name(self, value: str) -> None:
        self._name = str(value)

    @property
    def active_optimization_profile(self) -> int:
        return 0

    def _log_error(self, msg: str) -> None:
        error(self._engine._logger, msg)

    def set_tensor_address(self, name: str, memory: int) -> bool:
        if name not in self._engine._tensors:
            self._log_error(f"3: [executionContext.cpp::setTensorAddress] Error Code 3: API Usage Error "
                            f"(Parameter check failed, condition: tensor \"{name}\" is not an I/O tensor.)")
            return False
        if not int(memory):
            self._log_error(f"3: setTensorAddress: address of \"{name}\" must not be null")
            return False
        self._addresses[name] = int(memory)
        return True

    def get_tensor_address(self, name: str) -> int:
        return self._addresses.get(name, 0)

    def set_input_shape(self, name: str, shape: Any) -> bool:
        tensor = self._engine._tensors.get(name)
        shape = dims_tuple(shape)
        if tensor is None or tensor["mode"] != "INPUT":
            self._log_error(f"3: setInputShape: \"{name}\" is not an input tensor")
            return False
        declared = tuple(tensor["shape"])
        bounds = self._engine._header["profiles"][0].get(name) if self._engine._header["profiles"] else None
        ok = len(shape) == len(declared) and all(d == -1 or d == s for d, s in zip(declared, shape))
        if ok and bounds:
            ok = all(lo <= s <= hi for lo, s, hi in zip(bounds[0], shape, bounds[2]))
        if not ok:
            self._log_error(f"3: [executionContext.cpp::setInputShape] Error Code 3: API Usage Error "
                            f"(Parameter check failed, condition: engineDims.d[i] == dims.d[i]. Static "
                            f"dimension mismatch or outside the profile for \"{name}\": {shape} vs "
                            f"{declared}, profile {bounds}.)")
            return False
        self._shapes[name] = shape
        return True

    def infer_shapes(self) -> list[str]:
        return [n for n, s in self._shapes.items() if -1 in s]

    def get_tensor_shape(self, name: str) -> Dims:
        tensor = self._engine._tensors.get(name)
        if tensor is None:
            return Dims([])
        if tensor["mode"] == "INPUT":
            return Dims(self._shapes[name])
        shape = tuple(tensor["shape"])
        if faults.dynamic_output_dims:
            return Dims(shape[:-1] + (-1,))
        if -1 in shape:
            shape = self._inferred_output_shapes().get(name, shape)
        return Dims(shape)

    def _inferred_output_shapes(self) -> dict[str, tuple[int, ...]]:
        """Output shapes for the input shapes set (ONNX Runtime on zeros); {} until all are set."""
        if self.infer_shapes():
            return {}
        key = tuple(sorted(self._shapes.items()))
        if key not in self._shape_cache:
            tensors = self._engine._tensors
            zeros = {n: np.zeros(s, NUMPY[DataType[tensors[n]["dtype"]]]) for n, s in self._shapes.items()}
            outputs = self._engine._model.run(zeros, exact=True)
            self._shape_cache[key] = {n: tuple(v.shape) for n, v in outputs.items()}
        return self._shape_cache[key]

    def set_optimization_profile_async(self, profile_index: int, stream_handle: int) -> bool:
        return profile_index == 0

    def execute_async_v3(self, stream_handle: int) -> bool:
        engine, logger = self._engine, self._engine._logger
        if faults.execute_fails:
            self._log_error("1: [executionContext.cpp::enqueueV3] Error Code 1: Cuda Runtime (injected failure)")
            return False
        for name, tensor in engine._tensors.items():
            if name not in self._addresses:
                self._log_error(f"3: [executionContext.cpp::enqueueV3] Error Code 3: API Usage Error (Parameter "
                                f"check failed, condition: mContext.profileObliviousBindings.at("
                                f"profileObliviousIndex) || getPtrOrNull(mOutputAllocators, "
                                f"profileObliviousIndex). Address is not set for {tensor['mode'].lower()} "
                                f"tensor {name}. Call setInputTensorAddress, setTensorAddress or "
                                "setOutputAllocator before enqueue/execute.)")
                return False
        if self.infer_shapes():
            self._log_error("3: [executionContext.cpp::enqueueV3] Error Code 3: API Usage Error (Parameter "
                            "check failed, condition: allInputDimensionsSpecified(routine).)")
            return False
        if faults.dynamic_output_dims:
            self._log_error("3: [executionContext.cpp::enqueueV3] Error Code 3: API Usage Error (an output "
                            "has data-dependent shape and no IOutputAllocator is set)")
            return False
        rt = cuda_runtime()
        if rt is None:
            self._log_error("1: [executionContext.cpp::enqueueV3] Error Code 1: Cuda Runtime (the fake "
                            "TensorRT reads device memory through tests/support/fake_cudart, which is not loaded)")
            return False
        if rt._fake.stream_handle(stream_handle) is None:
            self._log_error("1: [executionContext.cpp::enqueueV3] Error Code 1: Cuda Runtime (invalid "
                            "resource handle)")
            return False
        if int(stream_handle) == 0:
            emit(logger, _Severity.WARNING, "Using default stream in enqueueV3() may lead to performance issues "
                 "due to additional calls to cudaStreamSynchronize() by TensorRT to ensure correct "
                 "synchronization. Please use non-default stream instead.")
        plan = {}
        for name, tensor in engine._tensors.items():
            dtype = np.dtype(NUMPY[DataType[tensor["dtype"]]])
            shape = tuple(self.get_tensor_shape(name))
            plan[name] = (self._addresses[name], shape, dtype, int(np.prod(shape)) * dtype.itemsize)
        snapshot = dict(plan)

        def run() -> Any:
            return _execute(rt, engine, snapshot)
        rt._fake.enqueue(stream_handle, f"execute_async_v3({engine.name})", run, [p[0] for p in plan.values()])
        return True


def _execute(rt: Any, engine: ICudaEngine, plan: dict[str, tuple]) -> Any:
    """The queued inference: read inputs from device memory, run, write outputs back."""
    fake, illegal = rt._fake, rt.cudaError_t.cudaErrorIllegalAddress
    inputs = {}
    for name, (ptr, shape, dtype, nbytes) in plan.items():
        if engine._tensors[name]["mode"] == "INPUT":
            data = fake.read(ptr, nbytes, f"execute_async_v3 input {name!r}")
            if data is None:
                return illegal
            inputs[name] = np.frombuffer(data, dtype=dtype).reshape(shape).copy()
    outputs = engine._model.run(inputs)
    for name, (ptr, shape, dtype, nbytes) in plan.items():
        if engine._tensors[name]["mode"] == "OUTPUT":
            value = np.ascontiguousarray(outputs[name], dtype=dtype)
            if value.shape != shape:
                fake.violations.append(f"execute_async_v3: output {name!r} has shape {value.shape}, the context "
                                       f"said {shape}")
                return illegal
            if not fake.write(ptr, value.tobytes(), f"execute_async_v3 output {name!r}"):
                return illegal
    return rt.cudaError_t.cudaSuccess
