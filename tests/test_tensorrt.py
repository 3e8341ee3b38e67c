"""TensorRT engine build, cache reuse, parity with ONNX Runtime, and runs.

Needs TensorRT 10, a CUDA GPU and cuda-python (or pycuda); skipped with the reason otherwise.
Uses the tiny models of tests/test_engines.py.
"""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest

pytest.importorskip("tensorrt", reason="TensorRT is not installed (Jetson/GPU machines only)")

from engines.builder import build_engine, tensorrt_unavailable_reason  # noqa: E402

_REASON = tensorrt_unavailable_reason()
if _REASON:
    pytest.skip(f"TensorRT cannot run here: {_REASON}", allow_module_level=True)

from engines.decode import decode_centernet  # noqa: E402
from engines.manifest import load_manifest  # noqa: E402
from engines.store import load_model  # noqa: E402
from test_engines import PEAK_A, PEAK_C, _run, expected_box, make_classifier, make_detector  # noqa: E402


def test_build_then_reuse_from_cache(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="engines")
    manifest = load_manifest(make_classifier(tmp_path / "models"))
    cache = tmp_path / "cache"
    first = build_engine(manifest, cache, precision="fp16")
    assert not first.reused and first.path.is_file()
    assert first.path.name == f"tb_classifier-{first.key.digest()}.engine"
    sidecar = json.loads(first.path.with_suffix(".json").read_text())
    assert sidecar["key_material"]["model_sha256"] == manifest.sha256
    assert sidecar["key_material"]["precision"] == "fp16" and sidecar["key_material"]["gpu_name"]
    mtime = first.path.stat().st_mtime_ns
    second = build_engine(manifest, cache, precision="fp16")
    assert second.reused and second.path == first.path and first.path.stat().st_mtime_ns == mtime
    assert any("reusing" in r.getMessage() for r in caplog.records)
    fp32 = build_engine(manifest, cache, precision="fp32")
    assert not fp32.reused and fp32.path != first.path
    first.path.write_bytes(first.path.read_bytes()[:100])   # damaged engine: rebuilt, not loaded
    assert not build_engine(manifest, cache, precision="fp16").reused


@pytest.mark.parametrize("precision,tolerance", [("fp32", 1e-4), ("fp16", 1e-2)])
def test_tensorrt_matches_onnxruntime(tmp_path, precision, tolerance):
    folder = make_classifier(tmp_path / "models")
    trt_model = load_model(folder, "tensorrt", cache_dir=tmp_path / "cache", precision=precision)
    ort_model = load_model(folder, "onnxruntime")
    assert trt_model.backend == "tensorrt" and trt_model.engine_path is not None
    image = np.random.default_rng(5).normal(size=(1, 1, 16, 16)).astype(np.float32)
    got, want = trt_model.run(image), ort_model.run(image)
    for name in ("tb_score", "tb_heatmap"):
        assert got[name].shape == want[name].shape and got[name].dtype == np.float32
        np.testing.assert_allclose(got[name], want[name], atol=tolerance)
    for _ in range(3):   # buffers are reused across runs
        np.testing.assert_allclose(trt_model.run(image)["tb_score"], want["tb_score"], atol=tolerance)
    trt_model.close()


def test_detector_runs_on_tensorrt_and_decodes(tmp_path):
    model = load_model(make_detector(tmp_path / "models"), "auto", cache_dir=tmp_path / "cache")
    assert model.backend == "tensorrt"
    boxes = decode_centernet(model.run(np.zeros((1, 1, 32, 32), np.float32)), model.manifest)
    assert len(boxes) == 2
    for got, peak in zip(boxes, (PEAK_A, PEAK_C)):
        np.testing.assert_allclose(got, expected_box(peak), atol=2e-2)


def test_build_and_verify_commands(tmp_path):
    models = tmp_path / "models"
    make_classifier(models)
    make_detector(models)
    code, out, err = _run(["build"], models, tmp_path / "cache")
    assert code == 0, err
    assert "tb_classifier: fp16 engine" in out and "built in" in out
    code, out, err = _run(["verify"], models, tmp_path / "cache")
    assert code == 0, err
    assert out.count(" ok") == 5 and "max abs diff" in out
    code, out, _ = _run(["build", "--model", "nodule_detector"], models, tmp_path / "cache")
    assert code == 0 and "cached, reused" in out


def test_int8_build_with_calibration_set(tmp_path):
    folder = make_classifier(tmp_path / "models")
    calib = tmp_path / "calib"
    calib.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        np.save(calib / f"{i}.npy", rng.normal(size=(1, 1, 16, 16)).astype(np.float32))
    result = build_engine(load_manifest(folder), tmp_path / "cache", precision="int8", calibration_dir=calib)
    assert result.path.is_file() and result.key.calibration_sha256
