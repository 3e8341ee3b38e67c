"""The project's TensorRT code (runner, builder, calibrator, engine cache, precision, every
fallback to ONNX Runtime, background builds, `edge engines verify`) run for real in
`make test`, on machines without a GPU.

It runs against faithful stand-ins (tests/support/fake_tensorrt and fake_cudart): their
classes, methods and parameters are checked against the TensorRT 10.3 Python bindings and
cuda-python 12 (tests/test_fake_tensorrt.py), and ONNX Runtime does their arithmetic. This
proves the project's logic (what it calls, in which order, what it does with failures and
memory); it does not prove TensorRT's numerics or speed, which only a Jetson or GPU shows
(tests/test_tensorrt.py runs there).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from engines import builder, commands, store
from engines.builder import build_engine, find_cached_engine, tensorrt_unavailable_reason, timing_cache_path
from engines.manifest import load_manifest, read_verified_model
from engines.runners.base import BackendUnavailable, RunnerError
from engines.runners.cuda_memory import CudaError, DeviceBuffer, gpu_problem
from engines.runners.onnxruntime_runner import OnnxRuntimeRunner
from engines.runners.tensorrt_runner import TensorRTRunner
from engines.store import load_model
from support.trt_fakes import break_tensorrt_import, fake_cuda, fake_trt  # noqa: F401 (fixtures)
from test_engines import _run, make_classifier, make_detector

IMAGE = np.random.default_rng(5).normal(0.5, 0.2, size=(1, 1, 16, 16)).astype(np.float32)


@pytest.fixture
def classifier(tmp_path):
    return load_manifest(make_classifier(tmp_path / "models"))


def _reference(manifest, image=IMAGE):
    with OnnxRuntimeRunner(read_verified_model(manifest), device="cpu") as ort:
        return ort.run({manifest.input.name: image})


# ------------------------------------------------------------------ runner and memory
def test_fp32_engine_equals_onnxruntime_and_frees_everything(fake_trt, fake_cuda, classifier, tmp_path):
    """fp32 really is fp32: TF32 (on by default in TensorRT) is cleared, so the fake's
    engine, which rounds inputs to TF32 when it is left on, computes exactly what ONNX
    Runtime computes."""
    result = build_engine(classifier, tmp_path / "cache", precision="fp32")
    want = _reference(classifier)
    runner = TensorRTRunner(result.path)
    got = runner.run({"image": IMAGE})
    for name in ("tb_score", "tb_heatmap"):
        np.testing.assert_array_equal(got[name], want[name])
    mallocs = fake_cuda._fake.calls.count("cudaMalloc")
    for _ in range(3):   # buffers (device and page-locked host) are reused across runs
        np.testing.assert_array_equal(runner.run({"image": IMAGE})["tb_score"], want["tb_score"])
    assert fake_cuda._fake.calls.count("cudaMalloc") == mallocs
    assert "cudaMallocHost" in fake_cuda._fake.calls
    runner.close()
    runner.close()   # twice is fine
    fake_cuda._fake.assert_clean()


def test_fp16_engine_is_close_not_equal(fake_trt, fake_cuda, classifier, tmp_path):
    result = build_engine(classifier, tmp_path / "cache", precision="fp16")
    with TensorRTRunner(result.path) as runner:
        got = runner.run({"image": IMAGE})
    want = _reference(classifier)
    np.testing.assert_allclose(got["tb_heatmap"], want["tb_heatmap"], atol=1e-2)
    assert not np.array_equal(got["tb_heatmap"], want["tb_heatmap"])
    fake_cuda._fake.assert_clean()


def test_a_failed_run_waits_for_the_stream_before_anything_is_freed(fake_trt, fake_cuda, classifier, tmp_path):
    result = build_engine(classifier, tmp_path / "cache", precision="fp16")
    runner = TensorRTRunner(result.path)
    fake_trt.faults.execute_fails = True
    with pytest.raises(RunnerError, match="execute_async_v3 failed"):
        runner.run({"image": IMAGE})
    runner.close()
    fake_cuda._fake.assert_clean()   # no memory freed under a pending copy, nothing leaked


@pytest.mark.parametrize("fault, message", [
    ("runtime_nullptr", "could not be loaded: TypeError"),
    ("deserialize_fails", "could not deserialize"),
    ("context_fails", "execution context"),
    ("nptype_unsupported", "numpy cannot hold"),
    ("dynamic_output_dims", "data-dependent shapes"),
])
def test_runner_load_failures_are_runner_errors_and_release_what_was_made(
        fake_trt, fake_cuda, classifier, tmp_path, fault, message):
    result = build_engine(classifier, tmp_path / "cache", precision="fp16")
    if fault == "nptype_unsupported":
        fake_trt.faults.nptype_unsupported = {fake_trt.DataType.FLOAT}
    else:
        setattr(fake_trt.faults, fault, True)
    with pytest.raises(RunnerError, match=message):
        TensorRTRunner(result.path)
    fake_cuda._fake.assert_clean()


# ------------------------------------------------------------------ builder and cache
def test_engine_cache_reuse_damage_and_key_changes(fake_trt, fake_cuda, classifier, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = build_engine(classifier, cache, precision="fp16")
    assert not first.reused and first.path.name == f"tb_classifier-{first.key.digest()}.engine"
    material = json.loads(first.path.with_suffix(".json").read_text())["key_material"]
    assert material["gpu_name"] == "Orin" and material["gpu"].startswith("sm_8.7")
    assert timing_cache_path(cache, first.key).is_file(), "the timing cache is kept for rebuilds"
    again = build_engine(classifier, cache, precision="fp16")
    assert again.reused and again.path == first.path
    assert build_engine(classifier, cache, precision="fp32").path != first.path
    # an Orin NX and an AGX both say "Orin": the multiprocessor count tells them apart
    fake_cuda._fake.properties["multiProcessorCount"] = 8
    other_module = build_engine(classifier, cache, precision="fp16")
    assert not other_module.reused and other_module.path != first.path
    fake_cuda._fake.properties["multiProcessorCount"] = 16
    monkeypatch.setattr(builder, "platform_identity", lambda: "NVIDIA Jetson AGX Orin; L4T R36.4.3")
    reflashed = build_engine(classifier, cache, precision="fp16")
    assert not reflashed.reused and reflashed.key.platform.endswith("R36.4.3")
    damaged = reflashed.path
    damaged.write_bytes(damaged.read_bytes()[:100])
    assert not build_engine(classifier, cache, precision="fp16").reused   # rebuilt, not loaded
    fake_cuda._fake.assert_clean()


def test_an_engine_this_tensorrt_cannot_load_is_rebuilt_once(fake_trt, fake_cuda, classifier, tmp_path):
    cache = tmp_path / "cache"
    built = build_engine(classifier, cache, precision="fp16")
    garbage = b"not an engine" * 10   # e.g. built by another TensorRT: deserialize gives None
    built.path.write_bytes(garbage)
    sidecar = json.loads(built.path.with_suffix(".json").read_text())
    from engines.manifest import sha256_hex
    sidecar["engine_sha256"] = sha256_hex(garbage)   # the cache believes it is intact
    built.path.with_suffix(".json").write_text(json.dumps(sidecar))
    model = load_model(classifier.folder, "tensorrt", cache_dir=cache)
    assert model.backend == "tensorrt" and "newly built" in model.backend_reason
    np.testing.assert_allclose(model.run(IMAGE)["tb_score"], _reference(classifier)["tb_score"], atol=1e-2)
    model.close()
    fake_cuda._fake.assert_clean()


def test_int8_calibration_and_the_engine_found_again_at_load(fake_trt, fake_cuda, classifier, tmp_path):
    calib = tmp_path / "calib"
    calib.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        np.save(calib / f"{i}.npy", rng.normal(size=(1, 1, 16, 16)).astype(np.float32))
    cache = tmp_path / "cache"
    result = build_engine(classifier, cache, precision="int8", calibration_dir=calib)
    assert result.key.calibration_sha256 and fake_cuda._fake.calls.count("cudaMalloc") >= 1
    assert find_cached_engine(classifier, cache, "int8", calib) == result.path
    model = load_model(classifier.folder, "auto", cache_dir=cache, precision="int8", calibration_dir=calib)
    assert model.backend == "tensorrt" and "cached int8 engine" in model.backend_reason
    model.close()
    other = tmp_path / "calib2"
    other.mkdir()
    np.save(other / "0.npy", rng.normal(size=(1, 1, 16, 16)).astype(np.float32))
    assert find_cached_engine(classifier, cache, "int8", other) is None   # another set, another engine
    with pytest.raises(builder.EngineBuildError, match="calibration set"):
        build_engine(classifier, cache, precision="int8")
    fake_cuda._fake.assert_clean()


# ------------------------------------------------------------------ every fallback
FAILURES = {
    "broken_import": lambda trt: break_tensorrt_import(AttributeError("module 'tensorrt' has no attribute 'Logger'")),
    "builder_nullptr": lambda trt: setattr(trt.faults, "builder_nullptr", True),
    "parse_errors": lambda trt: setattr(trt.faults, "parse_errors", ["Unsupported ONNX op: Foo"]),
    "build_fails": lambda trt: setattr(trt.faults, "build_fails", "no implementation for node"),
    "deserialize_fails": lambda trt: setattr(trt.faults, "deserialize_fails", True),
    "runtime_nullptr": lambda trt: setattr(trt.faults, "runtime_nullptr", True),
    "nptype_unsupported": lambda trt: setattr(trt.faults, "nptype_unsupported", {trt.DataType.FLOAT}),
    "dynamic_output_dims": lambda trt: setattr(trt.faults, "dynamic_output_dims", True),
}


@pytest.mark.parametrize("failure", sorted(FAILURES))
def test_auto_falls_back_to_onnxruntime_whatever_tensorrt_raises(fake_trt, fake_cuda, classifier, tmp_path,
                                                                failure, monkeypatch, caplog):
    FAILURES[failure](fake_trt)
    monkeypatch.setattr(store, "on_jetson", lambda: True)
    with caplog.at_level(logging.WARNING, logger="engines.store"):
        model = load_model(classifier.folder, "auto", cache_dir=tmp_path / "cache")
    assert model.backend == "onnxruntime" and model.tensorrt_missing
    assert "TensorRT" in model.backend_reason
    assert any("10-50x slower" in r.getMessage() for r in caplog.records), "a Jetson fallback must be loud"
    np.testing.assert_allclose(model.run(IMAGE)["tb_score"], _reference(classifier)["tb_score"], atol=1e-6)
    model.close()
    with pytest.raises((BackendUnavailable, RunnerError, builder.EngineBuildError)):
        load_model(classifier.folder, "tensorrt", cache_dir=tmp_path / "cache2")   # configured: no fallback
    fake_cuda._fake.assert_clean()


def test_cuda_errors_are_said_in_cudas_words(fake_trt, fake_cuda, classifier, tmp_path):
    fake_cuda._fake.no_driver()   # what cuda-python 13 says on a JetPack 6 (CUDA 12) driver
    reason = tensorrt_unavailable_reason()
    assert "cudaErrorInsufficientDriver" in reason and "CUDA 12 line" in reason, reason
    model = load_model(classifier.folder, "auto", cache_dir=tmp_path / "cache")
    assert model.backend == "onnxruntime" and "cudaErrorInsufficientDriver" in model.backend_reason
    model.close()


def test_real_cuda_python_without_a_gpu_reports_the_real_error(monkeypatch):
    """cuda-python of the CUDA 12 line (in the test extra) runs here without a GPU: the memory
    layer's error paths run against the real library."""
    pytest.importorskip("cuda.bindings.runtime", reason="cuda-python is not installed (make test installs it)")
    from engines.runners import cuda_memory
    monkeypatch.setattr(cuda_memory, "_api", None)
    problem = gpu_problem()
    if problem is None:
        pytest.skip("a CUDA GPU is usable here: the no-GPU error paths cannot be seen")
    assert "cudaError" in problem, problem
    with pytest.raises(CudaError, match=r"CUDA cudaMalloc failed: cudaError\w+"):
        DeviceBuffer(16)


# ------------------------------------------------------------------ background build
def test_service_starts_on_onnxruntime_and_switches_when_the_engine_is_built(fake_trt, fake_cuda, classifier,
                                                                           tmp_path):
    switched = []
    model = load_model(classifier.folder, "auto", cache_dir=tmp_path / "cache", build_in_background=True,
                       on_switch=switched.append)
    assert model.backend in ("onnxruntime", "tensorrt")   # the build may already be done
    model._builder.join(30)
    assert model.backend == "tensorrt" and switched == [model] and not model.building
    assert "newly built fp16 engine" in model.backend_reason
    np.testing.assert_allclose(model.run(IMAGE)["tb_score"], _reference(classifier)["tb_score"], atol=1e-2)
    model.close()
    again = load_model(classifier.folder, "auto", cache_dir=tmp_path / "cache", build_in_background=True)
    assert again.backend == "tensorrt" and again._builder is None   # cached: no background build
    again.close()
    fake_cuda._fake.assert_clean()


def test_a_background_build_that_fails_stays_on_onnxruntime(fake_trt, fake_cuda, classifier, tmp_path,
                                                          monkeypatch):
    monkeypatch.setattr(store, "on_jetson", lambda: True)
    fake_trt.faults.build_fails = "out of memory"
    model = load_model(classifier.folder, "auto", cache_dir=tmp_path / "cache", build_in_background=True)
    model._builder.join(30)
    assert model.backend == "onnxruntime" and not model.building and model.tensorrt_missing
    assert "engine unusable" in model.backend_reason
    model.close()


# ------------------------------------------------------------------ edge engines verify
def test_verify_never_builds_and_compares_decisions(fake_trt, fake_cuda, tmp_path):
    models, cache = tmp_path / "models", tmp_path / "cache"
    make_classifier(models)
    make_detector(models)
    code, out, err = _run(["verify"], models, cache)
    assert code == commands.EXIT_NOT_BUILT, out + err
    assert "no fp16 engine built yet" in err and "edge engines build --precision fp16" in err
    assert not list(cache.glob("*.engine")), "verify built an engine"
    code, out, err = _run(["build"], models, cache)
    assert code == 0, err
    code, out, err = _run(["verify"], models, cache)
    assert code == 0, out + err
    assert "tb_classifier: decision same" in out and "at threshold 0.5" in out
    assert "nodule_detector: decision same: 2 box(es) vs onnxruntime 2, 2 matched" in out
    code, _, err = _run(["verify", "--precision", "fp32"], models, cache)
    assert code == commands.EXIT_NOT_BUILT and "fp32" in err
    fake_cuda._fake.assert_clean()


def test_decisions_that_differ_fail_verify(classifier):
    spec = classifier.output
    same = commands.compare_findings(classifier, {spec.score: np.array([0.61])}, {spec.score: np.array([0.58])})
    assert same.agree
    flipped = commands.compare_findings(classifier, {spec.score: np.array([0.51])}, {spec.score: np.array([0.49])})
    assert not flipped.agree and "DIFFERENT" in flipped.text


def test_verify_fails_on_a_detector_whose_boxes_moved(tmp_path):
    from test_engines import planted_maps
    manifest = load_manifest(make_detector(tmp_path / "models"))
    heat, size, offset = planted_maps()
    spec = manifest.output
    want = {spec.heatmap: heat, spec.size: size, spec.offset: offset}
    moved = {spec.heatmap: np.roll(heat, 3, axis=-1), spec.size: size, spec.offset: offset}
    assert commands.compare_findings(manifest, want, want).agree
    check = commands.compare_findings(manifest, want, moved)
    assert not check.agree and "DIFFERENT" in check.text


def test_engine_files_stay_in_the_cache_folder(fake_trt, fake_cuda, classifier, tmp_path):
    cache = tmp_path / "cache"
    build_engine(classifier, cache, precision="fp16")
    assert {p.suffix for p in cache.iterdir() if not p.name.startswith(".")} <= {".engine", ".json", ".cache"}
    assert not list(Path(classifier.folder).glob("*.engine"))
