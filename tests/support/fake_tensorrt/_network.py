"""Network definition and ONNX parser of the fake TensorRT.

The parser does not build layers: it checks the ONNX bytes (onnx decodes them, ONNX
Runtime must accept the graph), records the graph's inputs and outputs as ITensors and
keeps the bytes for the builder.
"""
from __future__ import annotations

from typing import Any

from ._common import DataType, Dims, ErrorCode, OnnxParserFlag, _Internal, _Severity, emit, error, faults

# ONNX TensorProto element type -> TensorRT DataType (what the real parser accepts for I/O)
ONNX_TYPES = {1: DataType.FLOAT, 2: DataType.UINT8, 3: DataType.INT8, 6: DataType.INT32, 7: DataType.INT64,
              9: DataType.BOOL, 10: DataType.HALF, 16: DataType.BF16}


class ITensor(_Internal):
    """A network input or output."""

    @property
    def name(self) -> str:
        return self._name

    @name.setter
    def name(self, value: str) -> None:
        self._name = str(value)

    @property
    def shape(self) -> Dims:
        return Dims(self._shape)

    @shape.setter
    def shape(self, value: Any) -> None:
        self._shape = tuple(int(d) for d in value)

    @property
    def dtype(self) -> DataType:
        return self._dtype

    @dtype.setter
    def dtype(self, value: DataType) -> None:
        if not isinstance(value, DataType):
            raise TypeError("dtype: incompatible function arguments (expected tensorrt.DataType)")
        self._dtype = value

    @property
    def is_network_input(self) -> bool:
        return self._is_input

    @property
    def is_network_output(self) -> bool:
        return not self._is_input


class INetworkDefinition(_Internal):
    """What the parser filled in: inputs, outputs and (privately) the ONNX bytes."""

    @property
    def num_inputs(self) -> int:
        return len(self._inputs)

    @property
    def num_outputs(self) -> int:
        return len(self._outputs)

    @property
    def num_layers(self) -> int:
        return self._num_layers

    @property
    def name(self) -> str:
        return self._name

    @name.setter
    def name(self, value: str) -> None:
        self._name = str(value)

    @property
    def flags(self) -> int:
        return self._flags

    @property
    def has_implicit_batch_dimension(self) -> bool:
        return False

    def get_input(self, index: int) -> ITensor | None:
        return self._inputs[index] if 0 <= index < len(self._inputs) else None

    def get_output(self, index: int) -> ITensor | None:
        return self._outputs[index] if 0 <= index < len(self._outputs) else None

    def __len__(self) -> int:
        return self._num_layers


def new_network(builder: Any, flags: int) -> INetworkDefinition:
    return INetworkDefinition._make(_builder=builder, _flags=int(flags), _inputs=[], _outputs=[],
                                    _num_layers=0, _name="Unnamed Network 0", _onnx=None)


class ParserError(_Internal):
    """One error of :class:`OnnxParser`."""

    def code(self) -> ErrorCode:
        return self._code

    def desc(self) -> str:
        return self._desc

    def file(self) -> str:
        return "ModelImporter.cpp"

    def func(self) -> str:
        return self._func

    def line(self) -> int:
        return 0

    def node(self) -> int:
        return self._node

    def node_name(self) -> str:
        return ""

    def node_operator(self) -> str:
        return ""

    def __str__(self) -> str:
        return (f"In node {self._node} with name:  and operator:  ({self._func}): "
                f"{self._code.name}: {self._desc}")

    __repr__ = __str__


class OnnxParser:
    """Parses ONNX bytes into an :class:`INetworkDefinition`."""

    _constructible = True

    def __init__(self, network: INetworkDefinition, logger: Any) -> None:
        if not isinstance(network, INetworkDefinition):
            raise TypeError("__init__(): incompatible constructor arguments (network must be an "
                            "INetworkDefinition)")
        self._network, self._logger, self._errors, self._flags = network, logger, [], 0

    @property
    def num_errors(self) -> int:
        return len(self._errors)

    @property
    def flags(self) -> int:
        return self._flags

    @flags.setter
    def flags(self, value: int) -> None:
        self._flags = int(value)

    def set_flag(self, flag: OnnxParserFlag) -> None:
        self._flags |= 1 << int(flag)

    def clear_flag(self, flag: OnnxParserFlag) -> None:
        self._flags &= ~(1 << int(flag))

    def get_flag(self, flag: OnnxParserFlag) -> bool:
        return bool(self._flags & (1 << int(flag)))

    def get_error(self, index: int) -> ParserError | None:
        return self._errors[index] if 0 <= index < len(self._errors) else None

    def clear_errors(self) -> None:
        self._errors.clear()

    def _fail(self, code: ErrorCode, desc: str, func: str = "parseGraph", node: int = -1) -> bool:
        self._errors.append(ParserError._make(_code=code, _desc=desc, _func=func, _node=node))
        error(self._logger, f"ModelImporter.cpp:{func}: {code.name}: {desc}")
        return False

    def parse_from_file(self, model: str) -> bool:
        try:
            with open(model, "rb") as handle:
                data = handle.read()
        except OSError as exc:
            return self._fail(ErrorCode.MODEL_DESERIALIZE_FAILED, f"Failed to open file {model}: {exc}",
                              "parseFromFile")
        return self.parse(data, model)

    def parse(self, model: Any, path: str = None) -> bool:
        import onnx
        import onnxruntime as ort

        data = bytes(model)
        for desc in faults.parse_errors:
            self._fail(ErrorCode.UNSUPPORTED_NODE, str(desc), "importNode", 0)
        if faults.parse_errors:
            return False
        if self._network._onnx is not None:
            return self._fail(ErrorCode.INVALID_GRAPH, "the network already holds a parsed model")
        try:
            proto = onnx.load_model_from_string(data)
            if not proto.graph.output:
                raise ValueError("the model has no graph outputs")
        except Exception as exc:
            return self._fail(ErrorCode.MODEL_DESERIALIZE_FAILED, f"Failed to parse ONNX model: {exc}", "parse")
        try:
            options = ort.SessionOptions()
            options.log_severity_level = 3
            ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            return self._fail(ErrorCode.INVALID_GRAPH, f"invalid graph: {str(exc)[:300]}")
        initializers = {init.name for init in proto.graph.initializer}
        tensors = []
        for value, is_input in [(v, True) for v in proto.graph.input if v.name not in initializers] + \
                               [(v, False) for v in proto.graph.output]:
            elem = value.type.tensor_type.elem_type
            if elem not in ONNX_TYPES:
                return self._fail(ErrorCode.UNSUPPORTED_NODE_DATATYPE,
                                  f"{value.name}: ONNX data type {onnx.TensorProto.DataType.Name(elem)} "
                                  "is not supported for network inputs and outputs")
            shape = tuple(d.dim_value if d.HasField("dim_value") else -1
                          for d in value.type.tensor_type.shape.dim)
            tensors.append(ITensor._make(_name=value.name, _shape=shape, _dtype=ONNX_TYPES[elem],
                                         _is_input=is_input))
        network = self._network
        network._inputs = [t for t in tensors if t._is_input]
        network._outputs = [t for t in tensors if not t._is_input]
        network._num_layers = len(proto.graph.node)
        network._name = proto.graph.name or network._name
        network._onnx = data
        emit(self._logger, _Severity.INFO, f"ONNX IR version: {proto.ir_version}, opset "
             f"{proto.opset_import[0].version if proto.opset_import else '?'}")
        return True

