"""The TensorRT and CUDA stand-ins of tests/support, checked against the real APIs and ONNX Runtime.

The fakes are only worth something if they are faithful: every name, parameter name and
default they define must exist in the recorded TensorRT 10.3 bindings
(tests/support/tensorrt_10_3_api.json) and cuda-python 12 (tests/support/cuda_runtime_12_api.json
and the installed cuda-python), the failure conventions must match, and an engine built
from a tiny ONNX model must compute what ONNX Runtime computes, to the declared precision.
"""
from __future__ import annotations

import ctypes
import enum
import inspect
import json
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from support import fake_tensorrt, trt_api_snapshot
from support.trt_fakes import break_tensorrt_import, fake_cuda, fake_trt  # noqa: F401 (fixtures)
from test_engines import make_classifier, make_detector

SUPPORT = Path(__file__).parent / "support"
TRT_API = json.loads((SUPPORT / "tensorrt_10_3_api.json").read_text())
CUDA_API = json.loads((SUPPORT / "cuda_runtime_12_api.json").read_text())
DUNDERS = {"__init__", "__len__", "__getitem__", "__setitem__", "__eq__", "__str__", "__repr__", "__bool__",
           "__int__", "__index__", "__iter__", "__contains__", "__call__"}
# not compared: IHostMemory.__bytes__/__buffer__ stand in for the buffer protocol of the real
# one, which a Python class cannot offer before 3.12 (underscore names are skipped below)
EMPTY = inspect.Parameter.empty
HtoD, DtoH = 1, 2


# ------------------------------------------------------------------ API conformance helpers
def _params(func) -> list[tuple[str, object]]:
    return [(p.name, p.default) for p in inspect.signature(func).parameters.values()]


def _signature_problem(where: str, fake: list[tuple[str, object]], overloads: list[dict],
                       method: bool) -> str | None:
    """None when ``fake`` (name, default) pairs match one real overload (the receiver's name aside)."""
    fake = fake[1:] if method else fake
    real = [o["params"][1:] if method else o["params"] for o in overloads]
    names = [n for n, _ in fake]
    for params in real:
        if [p["name"] for p in params] != names:
            continue
        ok = True
        for i, ((name, default), p) in enumerate(zip(fake, params)):
            if "default" in p:
                ok &= default is not EMPTY and repr(default) == p["default"]
            elif default is not EMPTY:   # optional here: another overload must stop before it
                ok &= any([q["name"] for q in other] == names[:i] for other in real)
        if ok:
            return None
    shown = [n if d is EMPTY else f"{n}={d!r}" for n, d in fake]
    options = [[p["name"] + (f"={p['default']}" if "default" in p else "") for p in r] for r in real]
    return f"{where}({', '.join(shown)}) matches no real signature: {options}"


def _type_name(annotation: object) -> str:
    """An annotation as the pybind11 docstrings write it ("ICudaEngine | None" -> "ICudaEngine")."""
    text = annotation.__name__ if isinstance(annotation, type) else str(annotation)
    text = text.replace(" | None", "").replace("list[", "List[").replace("tuple[", "Tuple[")
    text = re.sub(r"(\w+::)+", "", text)   # nvinfer1::ICudaEngine
    return {"IParserError": "ParserError"}.get(text, text)


def _return_problem(where: str, func, real_types: set[str]) -> str | None:
    """None when ``func``'s return annotation is one of ``real_types`` (or Any, or absent)."""
    annotation = inspect.signature(func).return_annotation
    if annotation in (EMPTY, "Any") or not real_types - {""}:
        return None
    got = _type_name(annotation)
    return None if got in {_type_name(t) for t in real_types} else f"{where} returns {got}; TensorRT: {real_types}"


def _fake_members(cls: type) -> dict[str, object]:
    """What the fake class offers a caller: public names and the DUNDERS, inherited ones too."""
    members: dict[str, object] = {}
    for klass in cls.__mro__:
        if klass is object or klass.__name__ == "_Internal":
            continue
        for name, value in vars(klass).items():
            if name not in members and (not name.startswith("_") or name in DUNDERS):
                members[name] = value
    if not getattr(cls, "_constructible", True):
        members.pop("__init__", None)
    return members


def _class_problems(name: str, cls: type, real: dict) -> list[str]:
    if isinstance(cls, enum.EnumMeta):
        return _enum_problems(name, cls, real)
    if real["kind"] != "class":
        return [f"{name} is a class here, a {real['kind']} in TensorRT"]
    problems = []
    if getattr(cls, "_constructible", True) != real["constructible"]:
        problems.append(f"{name}: constructible={not real['constructible']} here, "
                        f"{real['constructible']} in TensorRT")
    mro = {k.__name__ for k in cls.__mro__}
    problems += [f"{name}: missing base {b}" for b in real["bases"] if b.split(".")[-1] not in mro]
    for attr, value in _fake_members(cls).items():
        where = f"{name}.{attr}"
        if isinstance(value, property):
            prop = real["properties"].get(attr)
            if prop is None:
                problems.append(f"{where}: no such property in TensorRT")
            elif (value.fset is not None) != prop["writable"]:
                problems.append(f"{where}: writable={value.fset is not None}, TensorRT says {prop['writable']}")
            else:
                problem = _return_problem(where, value.fget, {prop["type"]})
                problems += [problem] if problem else []
        elif isinstance(value, type):
            nested = real["attributes"].get(attr)
            if nested is None or nested["kind"] not in ("enum", "class_ref"):
                problems.append(f"{where}: no such nested type in TensorRT")
            elif nested["kind"] == "enum":
                problems += _enum_problems(where, value, nested)
        elif callable(value):
            method = real["methods"].get(attr)
            if method is None:
                problems.append(f"{where}: no such method in TensorRT")
            else:
                problem = _signature_problem(where, _params(value), method["signatures"], method=True)
                problem = problem or _return_problem(where, value, {o["returns"] for o in method["signatures"]})
                problems += [problem] if problem else []
        else:
            constant = real["attributes"].get(attr)
            if constant is None or constant.get("repr") != repr(value):
                problems.append(f"{where} = {value!r}; TensorRT: {constant}")
    return problems


def _enum_problems(name: str, cls: type, real: dict) -> list[str]:
    if real["kind"] != "enum":
        return [f"{name} is an enum here, a {real['kind']} in TensorRT"]
    members = {k: int(v.value) for k, v in cls.__members__.items()}
    return [f"{name}.{k} = {v}; TensorRT: {real['members'].get(k)}" for k, v in members.items()
            if real["members"].get(k) != v]


# ------------------------------------------------------------------ TensorRT API conformance
def test_snapshot_is_the_real_tensorrt_10_3():
    assert TRT_API["version"] == "10.3.0" and TRT_API["source"]["package"] == "tensorrt-cu12-bindings"
    sig = TRT_API["names"]["IExecutionContext"]["methods"]["execute_async_v3"]["signatures"]
    assert sig == [{"params": [{"name": "self", "annotation": "IExecutionContext"},
                               {"name": "stream_handle", "annotation": "int"}], "returns": "bool"}]


def test_every_fake_tensorrt_name_exists_with_the_real_signature():
    real = TRT_API["names"]
    problems = []
    for name in fake_tensorrt.__all__:
        obj = getattr(fake_tensorrt, name)
        if name not in real:
            problems.append(f"{name}: not in TensorRT 10.3")
        elif isinstance(obj, type):
            problems += _class_problems(name, obj, real[name])
        elif callable(obj):
            problem = _signature_problem(name, _params(obj), real[name]["signatures"], method=False)
            problem = problem or _return_problem(name, obj, {o["returns"] for o in real[name]["signatures"]})
            problems += [problem] if problem else []
        elif real[name].get("repr") != repr(obj):
            problems.append(f"{name} = {obj!r}; TensorRT: {real[name]}")
    hooks = {"faults", "messages", "reset", "VERSION", "annotations", "Any", "Iterable"}
    stray = [n for n in dir(fake_tensorrt) if not n.startswith("_") and n not in fake_tensorrt.__all__
             and n not in hooks and not inspect.ismodule(getattr(fake_tensorrt, n))]
    assert not problems and not stray, "\n".join(problems + [f"{n}: public but not in __all__" for n in stray])
    assert fake_tensorrt.__version__ == TRT_API["version"]


def test_fake_behaves_like_the_real_bindings_did_without_a_gpu(fake_trt, fake_cuda):
    """The snapshot ran a few expressions against the real module (its CUDA stubs return NULL)."""
    fake_cuda._fake.no_driver()
    env = {"trt": fake_trt}
    exec(trt_api_snapshot.PROBE_SETUP, env)  # noqa: S102
    for probe in TRT_API["probes"]:
        assert trt_api_snapshot.probe(probe["expression"], env) == probe, probe["expression"]


# ------------------------------------------------------------------ CUDA runtime conformance
@pytest.fixture(scope="session")
def real_cudart():
    """The installed cuda-python's runtime module (imported before any fake shadows it)."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError:
            pytest.skip("cuda-python is not installed (pip install 'cuda-python>=12.2,<13')")
    if not hasattr(runtime, "cudaMalloc") or hasattr(runtime, "_fake"):
        pytest.skip("cuda.bindings.runtime here is not the real cuda-python")
    return runtime


def _cuda_problems(fake, names: dict) -> list[str]:
    problems = []
    for name in fake.__all__:
        obj, real = getattr(fake, name), names.get(name)
        if real is None:
            problems.append(f"{name}: not in the cuda-python 12 runtime")
        elif isinstance(obj, enum.EnumMeta):
            problems += [f"{name}.{k} = {int(v)}; real: {real['members'].get(k)}"
                         for k, v in obj.__members__.items() if real["members"].get(k) != int(v)]
        elif isinstance(obj, type):
            instance = obj()
            fields = [f for f in dir(obj) if not f.startswith("_")]
            problems += [f"{name}.{f}: not in the real struct, or another type" for f in fields
                         if real["members"].get(f, {}).get("type", "method") !=
                         ("method" if callable(getattr(instance, f)) else type(getattr(instance, f)).__name__)]
            problems += [f"{name}.{d}: the real one has no {d}" for d in ("__int__", "__index__", "__eq__",
                                                                           "__hash__")
                         if d in vars(obj) and d not in real["dunders"]]
        elif callable(obj):
            fake_params = [(p.name, p.annotation) for p in inspect.signature(obj).parameters.values()]
            if [n for n, _ in fake_params] != [p["name"] for p in real["params"]]:
                problems.append(f"{name}{tuple(n for n, _ in fake_params)}: real takes "
                                f"{tuple(p['name'] for p in real['params'])}")
            problems += [f"{name}({n}: {a})): real annotates {p['annotation']}"
                         for (n, a), p in zip(fake_params, real["params"])
                         if "annotation" in p and a != p["annotation"]]
        elif real.get("value") != obj:
            problems.append(f"{name} = {obj}; real: {real.get('value')}")
    return problems


def _live_api(rt, wanted: list[str]) -> dict:
    """The same description as the snapshot, taken from the installed module."""
    from support import cuda_api_snapshot

    names = {}
    for name in wanted:
        if not hasattr(rt, name):
            continue
        obj = getattr(rt, name)
        if name in ("cudaDeviceProp", "cudaStream_t"):
            names[name] = cuda_api_snapshot.describe_class(obj)
        elif isinstance(obj, type) and hasattr(obj, "__members__"):
            names[name] = {"kind": "enum", "members": {k: int(v) for k, v in obj.__members__.items()}}
        elif isinstance(obj, int):
            names[name] = {"kind": "constant", "value": int(obj)}
        elif callable(obj) and name.startswith("cuda"):
            names[name] = cuda_api_snapshot.describe_function(obj)
    return names


def test_fake_cudart_matches_the_snapshot(fake_cuda):
    assert CUDA_API["module"] in ("cuda.bindings.runtime", "cuda.cudart")
    assert not _cuda_problems(fake_cuda, CUDA_API["names"]), _cuda_problems(fake_cuda, CUDA_API["names"])


def test_fake_cudart_matches_the_installed_cuda_python(real_cudart, fake_cuda):
    problems = _cuda_problems(fake_cuda, _live_api(real_cudart, fake_cuda.__all__))
    assert not problems, problems
    for error in fake_cuda.cudaError_t:   # messages the runtime gives, word for word
        assert fake_cuda.cudaGetErrorString(error) == real_cudart.cudaGetErrorString(int(error))
        assert fake_cuda.cudaGetErrorName(error)[1] == real_cudart.cudaGetErrorName(int(error))[1]


NO_GPU_ERRORS = {"cudaErrorInsufficientDriver", "cudaErrorNoDevice", "cudaErrorStubLibrary"}


def test_real_cuda_python_without_a_gpu_returns_error_codes(real_cudart, fake_cuda):
    """Here (no driver, no GPU) cuda-python's static runtime answers cudaErrorInsufficientDriver;
    a machine with a driver and no GPU answers cudaErrorNoDevice. The fake's no_driver() mode
    returns the same tuples."""
    err, count = real_cudart.cudaGetDeviceCount()
    if err == real_cudart.cudaError_t.cudaSuccess and count:
        pytest.skip(f"{count} CUDA device(s) here: the no-GPU answers cannot be observed")
    assert err.name in NO_GPU_ERRORS and count is None
    assert real_cudart.cudaMalloc(16) == (err, None)
    fake_cuda._fake.no_driver(fake_cuda.cudaError_t(int(err)))
    calls = [("cudaGetDeviceCount", ()), ("cudaMalloc", (16,)), ("cudaMallocHost", (16,)),
             ("cudaHostAlloc", (16, 0)), ("cudaFree", (0,)), ("cudaStreamCreate", ()), ("cudaMemGetInfo", ()),
             ("cudaStreamSynchronize", (0,)), ("cudaGetDeviceProperties", (0,)),
             ("cudaMemcpyAsync", (0, 0, 0, 1, 0)), ("cudaDriverGetVersion", ()),
             ("cudaDeviceGetAttribute", (fake_cuda.cudaDeviceAttr.cudaDevAttrIntegrated, 0))]
    for name, args in calls:
        real, fake = getattr(real_cudart, name)(*args), getattr(fake_cuda, name)(*args)
        assert (fake[0].name, fake[1:]) == (real[0].name, real[1:]), name


# ------------------------------------------------------------------ engines over fake CUDA memory
def _ok(result: tuple):
    assert int(result[0]) == 0, result
    return result[1] if len(result) == 2 else result[1:] or None


def _reference(onnx_bytes: bytes, feed: dict) -> dict:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))


def _build(trt, onnx_bytes: bytes, *, fp16=False, tf32=True, calibrator=None, profile=None):
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(onnx_bytes), [str(parser.get_error(i)) for i in range(parser.num_errors)]
    config = builder.create_builder_config()
    if not tf32:
        config.clear_flag(trt.BuilderFlag.TF32)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if calibrator is not None:
        config.set_flag(trt.BuilderFlag.INT8)
        config.int8_calibrator = calibrator
    if profile:
        shapes = builder.create_optimization_profile()
        for name, (low, opt, high) in profile.items():
            shapes.set_shape(name, low, opt, high)
        assert config.add_optimization_profile(shapes) == 0
    plan = builder.build_serialized_network(network, config)
    return None if plan is None else bytes(plan)


class _Session:
    """An engine of the fake TensorRT with buffers and a stream of the fake CUDA runtime."""

    def __init__(self, trt, rt, plan: bytes) -> None:
        self.rt, self.buffers = rt, {}
        self.engine = trt.Runtime(trt.Logger(trt.Logger.ERROR)).deserialize_cuda_engine(plan)
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.stream = _ok(rt.cudaStreamCreate())

    def bind(self, name: str, nbytes: int) -> int:
        if name not in self.buffers:
            self.buffers[name] = _ok(self.rt.cudaMalloc(nbytes))
            assert self.context.set_tensor_address(name, self.buffers[name])
        return self.buffers[name]

    def run(self, feed: dict) -> dict:
        for name, value in feed.items():
            if -1 in tuple(self.engine.get_tensor_shape(name)):
                assert self.context.set_input_shape(name, value.shape)
            ptr = self.bind(name, value.nbytes)
            _ok(self.rt.cudaMemcpyAsync(ptr, value.ctypes.data, value.nbytes, HtoD, self.stream))
        results = {n: np.empty(tuple(self.context.get_tensor_shape(n)), np.float32) for n in self.outputs}
        for name, host in results.items():
            self.bind(name, host.nbytes)
        assert self.context.execute_async_v3(int(self.stream))
        for name, host in results.items():
            _ok(self.rt.cudaMemcpyAsync(host.ctypes.data, self.buffers[name], host.nbytes, DtoH, self.stream))
        _ok(self.rt.cudaStreamSynchronize(self.stream))
        return results

    def close(self) -> None:
        for ptr in self.buffers.values():
            _ok(self.rt.cudaFree(ptr))
        _ok(self.rt.cudaStreamDestroy(self.stream))


def _image(size: int, seed: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(1, 1, size, size)).astype(np.float32)


@pytest.mark.parametrize("make,size", [(make_classifier, 16), (make_detector, 32)])
def test_fp32_engine_is_exact_without_tf32_and_close_with_it(tmp_path, fake_trt, fake_cuda, make, size):
    onnx_bytes = (make(tmp_path) / "model.onnx").read_bytes()
    feed = {"image": _image(size)}
    want = _reference(onnx_bytes, feed)
    exact = _Session(fake_trt, fake_cuda, _build(fake_trt, onnx_bytes, tf32=False))
    for name, value in exact.run(feed).items():
        np.testing.assert_array_equal(value, want[name])
    tf32 = _Session(fake_trt, fake_cuda, _build(fake_trt, onnx_bytes))   # TF32 is on by default
    got = tf32.run(feed)
    for name, value in got.items():
        np.testing.assert_allclose(value, want[name], atol=1e-3)
    if make is make_classifier:   # the detector's outputs do not depend on the image
        assert not all(np.array_equal(got[n], want[n]) for n in want)
    exact.close()
    tf32.close()
    fake_cuda._fake.assert_clean()


def test_fp16_engine_is_close_but_not_exact(tmp_path, fake_trt, fake_cuda):
    onnx_bytes = (make_classifier(tmp_path) / "model.onnx").read_bytes()
    feed = {"image": _image(16)}
    want = _reference(onnx_bytes, feed)
    session = _Session(fake_trt, fake_cuda, _build(fake_trt, onnx_bytes, fp16=True))
    got = session.run(feed)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-2)
    assert not all(np.array_equal(got[n], want[n]) for n in want)
    session.close()
    fake_cuda._fake.assert_clean()


def _calibrator(trt, rt, batches: list, *, cache: bytes | None = None, synchronize: bool = True):
    class Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.batches, self.calls, self.names, self.written = list(batches), 0, None, None
            self.ptr, self.stream = _ok(rt.cudaMalloc(16 * 16 * 4)), _ok(rt.cudaStreamCreate())

        def get_batch_size(self) -> int:
            return 1

        def get_batch(self, names: list[str]) -> list[int] | None:
            self.calls, self.names = self.calls + 1, names
            if not self.batches:
                return None
            batch = self.batches.pop(0)
            _ok(rt.cudaMemcpyAsync(self.ptr, batch.ctypes.data, batch.nbytes, HtoD, self.stream))
            if synchronize:
                _ok(rt.cudaStreamSynchronize(self.stream))
            return [self.ptr]

        def read_calibration_cache(self):
            return cache

        def write_calibration_cache(self, data) -> None:
            self.written = bytes(data)

        def free(self) -> None:
            _ok(rt.cudaFree(self.ptr))
            _ok(rt.cudaStreamDestroy(self.stream))

    return Calibrator()


def test_int8_build_calibrates_from_device_memory(tmp_path, fake_trt, fake_cuda):
    trt, rt = fake_trt, fake_cuda
    onnx_bytes = (make_classifier(tmp_path) / "model.onnx").read_bytes()
    batches = [_image(16, seed) for seed in range(4)]
    calibrator = _calibrator(trt, rt, batches)
    plan = _build(trt, onnx_bytes, fp16=True, calibrator=calibrator)
    assert calibrator.calls == 5 and calibrator.names == ["image"] and calibrator.written
    session = _Session(trt, rt, plan)
    feed = {"image": _image(16, 9)}
    want, got = _reference(onnx_bytes, feed), session.run(feed)
    amax = {n: max(float(np.abs(_reference(onnx_bytes, {"image": b})[n]).max()) for b in batches) for n in want}
    for name in want:   # one int8 step of the calibrated range, plus fp16 rounding
        np.testing.assert_allclose(got[name], want[name], atol=amax[name] / 127 + 1e-3)
    assert not np.array_equal(got["tb_heatmap"], want["tb_heatmap"])
    cached = _calibrator(trt, rt, [], cache=calibrator.written)   # a calibration cache: no batches read
    assert _build(trt, onnx_bytes, fp16=True, calibrator=cached) is not None and cached.calls == 0
    empty = _calibrator(trt, rt, [])
    assert _build(trt, onnx_bytes, calibrator=empty) is None
    assert "no scaling factors" in trt.messages[-1][1]
    unsynced = _calibrator(trt, rt, batches[:1], synchronize=False)
    _build(trt, onnx_bytes, calibrator=unsynced)
    assert any("unsynchronized" in v for v in rt._fake.violations)
    for c in (calibrator, cached, empty, unsynced):
        c.free()
    session.close()
    assert not rt._fake.live()


def _dynamic_model() -> bytes:
    graph = helper.make_graph(
        [helper.make_node("Sigmoid", ["x"], ["y"])], "dynamic",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def test_dynamic_input_needs_a_profile_and_set_input_shape(fake_trt, fake_cuda):
    trt, data = fake_trt, _dynamic_model()
    assert _build(trt, data) is None
    assert "no optimization profile" in trt.messages[-1][1]
    session = _Session(trt, fake_cuda, _build(trt, data, tf32=False, profile={"x": [(1, 4), (2, 4), (4, 4)]}))
    assert session.engine.get_tensor_shape("x") == (-1, 4)
    assert session.engine.get_tensor_profile_shape("x", 0) == [(1, 4), (2, 4), (4, 4)]
    assert session.context.get_tensor_shape("y") == (-1, 4)
    session.bind("x", 64)
    session.bind("y", 64)
    assert not session.context.execute_async_v3(int(session.stream))   # input shape not set
    assert not session.context.set_input_shape("x", (8, 4))             # outside the profile
    x = np.linspace(-2, 2, 12, dtype=np.float32).reshape(3, 4)
    got = session.run({"x": x})["y"]
    assert session.context.get_tensor_shape("y") == (3, 4)
    np.testing.assert_array_equal(got, _reference(data, {"x": x})["y"])
    session.close()


def test_plan_is_a_header_and_the_onnx_bytes_and_is_refused_elsewhere(tmp_path, fake_trt, fake_cuda):
    from support.fake_tensorrt import _engine

    trt = fake_trt
    onnx_bytes = (make_classifier(tmp_path) / "model.onnx").read_bytes()
    plan = _build(trt, onnx_bytes, fp16=True)
    header, body = _engine.parse_plan(plan)
    assert plan.startswith(_engine.MAGIC) and body == onnx_bytes
    assert header["version"] == "10.3.0" and header["precision"] == "fp16" and header["device"]["gpu"] == "Orin"
    assert [t["name"] for t in header["tensors"]] == ["image", "tb_score", "tb_heatmap"]
    runtime = trt.Runtime(trt.Logger())
    engine = runtime.deserialize_cuda_engine(plan)
    assert bytes(engine.serialize()) == plan and engine.serialize().nbytes == len(plan)
    older = _engine.serialize_plan(dict(header, version="10.0.1"), body)
    for bad, says in [(b"not an engine", "magicTag"), (older, "not compatible with this version"),
                      (plan[:-10], "truncated")]:
        assert runtime.deserialize_cuda_engine(bad) is None
        assert says in trt.messages[-1][1]
    fake_cuda._fake.properties["minor"] = 2   # an Ampere desktop GPU is not an Orin
    assert runtime.deserialize_cuda_engine(plan) is None
    assert "incompatible device" in trt.messages[-1][1]


def test_timing_cache_grows_with_builds_and_round_trips(tmp_path, fake_trt, fake_cuda):
    trt = fake_trt
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    assert trt.OnnxParser(network, logger).parse((make_classifier(tmp_path) / "model.onnx").read_bytes())
    config = builder.create_builder_config()
    assert config.get_timing_cache() is None
    cache = config.create_timing_cache(b"")
    assert config.set_timing_cache(cache, ignore_mismatch=False) and config.get_timing_cache() is cache
    empty = bytes(cache.serialize())
    assert builder.build_serialized_network(network, config) is not None
    grown = bytes(cache.serialize())
    assert len(grown) > len(empty)
    again = config.create_timing_cache(grown)
    assert again.combine(cache, False) and bytes(again.serialize()) == grown
    assert config.create_timing_cache(b"garbage") is None


def test_execute_needs_every_address_and_runs_when_the_stream_does(tmp_path, fake_trt, fake_cuda):
    trt, rt = fake_trt, fake_cuda
    onnx_bytes = (make_classifier(tmp_path) / "model.onnx").read_bytes()
    session = _Session(trt, rt, _build(trt, onnx_bytes, tf32=False))
    image = _image(16)
    session.bind("image", image.nbytes)
    _ok(rt.cudaMemcpyAsync(session.buffers["image"], image.ctypes.data, image.nbytes, HtoD, session.stream))
    session.bind("tb_score", 4)
    assert not session.context.execute_async_v3(int(session.stream))     # tb_heatmap has no address
    assert "Address is not set for output tensor tb_heatmap" in trt.messages[-1][1]
    session.bind("tb_heatmap", 64)
    assert not session.context.execute_async_v3(12345)                  # not a stream
    assert session.context.execute_async_v3(int(session.stream))
    pinned = _ok(rt.cudaMallocHost(4))
    _ok(rt.cudaMemcpyAsync(pinned, session.buffers["tb_score"], 4, DtoH, session.stream))
    assert ctypes.c_float.from_address(pinned).value == 0.0              # not yet: the stream has not run
    _ok(rt.cudaStreamSynchronize(session.stream))
    want = _reference(onnx_bytes, {"image": image})["tb_score"]
    assert ctypes.c_float.from_address(pinned).value == want.item()
    _ok(rt.cudaFreeHost(pinned))
    small = _ok(rt.cudaMalloc(32))                                       # tb_heatmap needs 64 bytes
    assert session.context.set_tensor_address("tb_heatmap", small)
    assert session.context.execute_async_v3(int(session.stream))
    assert rt.cudaStreamSynchronize(session.stream)[0] == rt.cudaError_t.cudaErrorIllegalAddress
    assert any("outside any device allocation" in v for v in rt._fake.violations)
    _ok(rt.cudaFree(small))
    session.close()


def test_fake_cuda_tracks_memory_streams_and_faults(fake_cuda):
    rt = fake_cuda
    import cuda.cudart

    assert cuda.cudart.cudaMalloc is rt.cudaMalloc
    ptr = _ok(rt.cudaMalloc(8))
    assert np.isnan(np.frombuffer(ctypes.string_at(ptr, 8), np.float32)).all()   # never written
    problems = rt._fake.problems()
    assert len(problems) == 1 and "never freed" in problems[0] and "test_fake_tensorrt.py" in problems[0]
    stream = _ok(rt.cudaStreamCreate())
    host = np.ones(2, np.float32)
    _ok(rt.cudaMemcpyAsync(ptr, host.ctypes.data, 8, HtoD, stream))
    _ok(rt.cudaFree(ptr))                                                 # the copy is still pending
    assert "pending" in rt._fake.violations[-1]
    assert rt.cudaFree(ptr) == (rt.cudaError_t.cudaErrorInvalidValue,)   # twice
    _ok(rt.cudaStreamDestroy(stream))
    assert rt.cudaStreamSynchronize(stream) == (rt.cudaError_t.cudaErrorInvalidResourceHandle,)
    rt._fake.fail_next("cudaMalloc", rt.cudaError_t.cudaErrorMemoryAllocation)
    assert rt.cudaMalloc(8) == (rt.cudaError_t.cudaErrorMemoryAllocation, None)
    _ok(rt.cudaFree(_ok(rt.cudaMalloc(8))))
    rt._fake.fail_always("cudaGetDeviceCount", rt.cudaError_t.cudaErrorInsufficientDriver)
    assert rt.cudaGetDeviceCount() == (rt.cudaError_t.cudaErrorInsufficientDriver, None)
    last = rt.cudaGetLastError()[0]
    assert rt.cudaGetErrorName(last) == (rt.cudaError_t.cudaSuccess, b"cudaErrorInsufficientDriver")
    with pytest.raises(OverflowError):
        rt.cudaMalloc(-1)
    assert len(rt._fake.problems()) == 3   # the free while pending, the double free, the bad stream


def test_injected_tensorrt_faults_behave_as_declared(tmp_path, fake_trt, fake_cuda):
    trt, faults = fake_trt, fake_trt.faults
    onnx_bytes = (make_classifier(tmp_path) / "model.onnx").read_bytes()
    plan = _build(trt, onnx_bytes)
    logger = trt.Logger()
    for fault, make in [("builder_nullptr", lambda: trt.Builder(logger)),
                        ("runtime_nullptr", lambda: trt.Runtime(logger))]:
        setattr(faults, fault, True)
        with pytest.raises(TypeError, match="factory function returned nullptr"):
            make()
        faults.reset()
    faults.parse_errors = ["No importer registered for op: FancyOp"]
    parser = trt.OnnxParser(trt.Builder(logger).create_network(0), logger)
    assert not parser.parse(onnx_bytes) and parser.num_errors == 1
    assert parser.get_error(0).code() == trt.ErrorCode.UNSUPPORTED_NODE and "FancyOp" in str(parser.get_error(0))
    faults.reset()
    faults.build_fails = "2: [builder.cpp::buildSerializedNetwork] Error Code 2: Internal Error (out of memory)"
    assert _build(trt, onnx_bytes) is None and trt.messages[-1][1] == faults.build_fails
    faults.reset()
    runtime = trt.Runtime(logger)
    faults.deserialize_fails = True
    assert runtime.deserialize_cuda_engine(plan) is None
    faults.reset()
    engine = runtime.deserialize_cuda_engine(plan)
    faults.context_fails = True
    assert engine.create_execution_context() is None
    faults.reset()
    session = _Session(trt, fake_cuda, plan)
    for name, nbytes in [("image", 1024), ("tb_score", 4), ("tb_heatmap", 64)]:
        session.bind(name, nbytes)
    faults.execute_fails = True
    assert not session.context.execute_async_v3(int(session.stream))
    faults.reset()
    faults.dynamic_output_dims = True
    assert session.context.get_tensor_shape("tb_heatmap") == (1, 1, 4, -1)
    assert not session.context.execute_async_v3(int(session.stream))
    faults.reset()
    faults.nptype_unsupported = {trt.DataType.FLOAT}
    with pytest.raises(TypeError, match="equivalent numpy datatype"):
        trt.nptype(engine.get_tensor_dtype("image"))
    faults.reset()
    session.close()
    fake_cuda._fake.no_driver()
    with pytest.raises(TypeError, match="nullptr"):
        trt.Builder(logger)
    assert "CUDA initialization failure with error: 35" in trt.messages[-1][1]


def test_a_broken_tensorrt_install_fails_at_import(fake_trt):
    import tensorrt

    assert tensorrt is fake_trt
    break_tensorrt_import(AttributeError("module 'tensorrt' has no attribute 'Logger'"))
    with pytest.raises(AttributeError, match="no attribute 'Logger'"):
        import tensorrt  # noqa: F811
    fake_trt.faults.import_error = None
    import tensorrt  # noqa: F811,F401


def test_the_fixtures_put_everything_back():
    """Runs after the tests above: the fakes are gone from sys.modules and sys.path."""
    import sys

    from support.fake_cudart import SYS_PATH_ENTRY

    assert str(SYS_PATH_ENTRY) not in sys.path
    assert sys.modules.get("tensorrt") is not fake_tensorrt
    assert not hasattr(sys.modules.get("cuda.bindings.runtime"), "_fake")
