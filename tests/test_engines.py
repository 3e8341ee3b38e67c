"""Model store, manifests, ONNX Runtime runner, CenterNet decoding and `engines` commands.

Tiny ONNX models are built with onnx.helper in temporary folders: a classifier whose
outputs are simple functions of the input (checked against numpy), and a centernet-shaped
detector whose maps are initializers with planted peaks (checked against boxes worked out
from the planted values).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import engines
from engines import commands
from engines.builder import (EngineBuildError, EngineKey, calibration_files, check_precision,
                             tensorrt_unavailable_reason)
from engines.decode import decode_centernet, max_pool3x3, nms
from engines.manifest import ManifestError, load_manifest
from engines.runners.base import BackendUnavailable, RunnerError
from engines.runners.onnxruntime_runner import CUDA_PROVIDER, OnnxRuntimeRunner
from engines.store import LoadedModel, ModelIntegrityError, load_model, load_models

TRT_MISSING = tensorrt_unavailable_reason()
needs_no_tensorrt = pytest.mark.skipif(TRT_MISSING is None, reason="TensorRT and a GPU are present "
                                       "here; tests/test_tensorrt.py covers that case")

# ---------------------------------------------------------------- tiny model builders
CLS_SIZE, DET_SIZE, STRIDE = 16, 32, 4
GRID = DET_SIZE // STRIDE
# planted detector peaks: (row, col, score, (w, h), (offset_x, offset_y))
PEAK_A = (2, 2, 0.9, (16.0, 10.0), (0.25, 0.5))
PEAK_B = (2, 4, 0.6, (16.0, 10.0), (0.25, 0.5))    # overlaps A: IoU 1/3, removed by NMS at 0.3
PEAK_C = (6, 6, 0.7, (8.0, 8.0), (0.5, 0.5))
PEAK_D = (6, 1, 0.25, (8.0, 8.0), (0.5, 0.5))      # below score_threshold 0.3
NOT_PEAK = (2, 3, 0.5)                               # next to A, lower: not a local maximum


def _save(model: onnx.ModelProto, folder: Path) -> str:
    model.opset_import[0].version = 17
    model.ir_version = 8
    onnx.checker.check_model(model)
    data = model.SerializeToString()
    (folder / "model.onnx").write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def make_classifier(root: Path, name: str = "tb_classifier", weight: float = 2.0,
                    threshold: float = 0.5) -> Path:
    """tb_score = sigmoid(weight * mean(image)); tb_heatmap = sigmoid(avgpool4x4(image))."""
    folder = root / name
    folder.mkdir(parents=True)
    nodes = [
        helper.make_node("ReduceMean", ["image"], ["m"], axes=[1, 2, 3], keepdims=1),
        helper.make_node("Mul", ["m", "w"], ["mw"]),
        helper.make_node("Sigmoid", ["mw"], ["s"]),
        helper.make_node("Reshape", ["s", "shape11"], ["tb_score"]),
        helper.make_node("AveragePool", ["image"], ["p"], kernel_shape=[4, 4], strides=[4, 4]),
        helper.make_node("Sigmoid", ["p"], ["tb_heatmap"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny_classifier",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 1, CLS_SIZE, CLS_SIZE])],
        [helper.make_tensor_value_info("tb_score", TensorProto.FLOAT, [1, 1]),
         helper.make_tensor_value_info("tb_heatmap", TensorProto.FLOAT, [1, 1, CLS_SIZE // 4, CLS_SIZE // 4])],
        [numpy_helper.from_array(np.array(weight, dtype=np.float32), "w"),
         numpy_helper.from_array(np.array([1, 1], dtype=np.int64), "shape11")])
    sha = _save(helper.make_model(graph), folder)
    (folder / "manifest.toml").write_text(f"""
[model]
name = "{name}"
version = "0.0.1"
task = "classification"
file = "model.onnx"
sha256 = "{sha}"
clinical_use = false
description = "test classifier"

[input]
name = "image"
height = {CLS_SIZE}
width = {CLS_SIZE}
mean = 0.5
std = 0.25

[output]
score = "tb_score"
heatmap = "tb_heatmap"
threshold = {threshold}
""")
    return folder


def planted_maps() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    heat = np.full((1, 1, GRID, GRID), 0.05, dtype=np.float32)
    size = np.zeros((1, 2, GRID, GRID), dtype=np.float32)
    offset = np.zeros((1, 2, GRID, GRID), dtype=np.float32)
    for row, col, score, (w, h), (ox, oy) in (PEAK_A, PEAK_B, PEAK_C, PEAK_D):
        heat[0, 0, row, col] = score
        size[0, :, row, col] = (w, h)
        offset[0, :, row, col] = (ox, oy)
    heat[0, 0, NOT_PEAK[0], NOT_PEAK[1]] = NOT_PEAK[2]
    size[0, :, NOT_PEAK[0], NOT_PEAK[1]] = (30.0, 30.0)
    return heat, size, offset


def make_detector(root: Path, name: str = "nodule_detector") -> Path:
    """Outputs = planted constant maps + 0 * mean(image) (so they still depend on the input)."""
    folder = root / name
    folder.mkdir(parents=True)
    heat, size, offset = planted_maps()
    nodes = [helper.make_node("ReduceMean", ["image"], ["m"], axes=[1, 2, 3], keepdims=1),
             helper.make_node("Mul", ["m", "zero"], ["z"])]
    nodes += [helper.make_node("Add", [f"{n}_const", "z"], [n])
              for n in ("nodule_heatmap", "nodule_size", "nodule_offset")]
    graph = helper.make_graph(
        nodes, "tiny_detector",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 1, DET_SIZE, DET_SIZE])],
        [helper.make_tensor_value_info("nodule_heatmap", TensorProto.FLOAT, [1, 1, GRID, GRID]),
         helper.make_tensor_value_info("nodule_size", TensorProto.FLOAT, [1, 2, GRID, GRID]),
         helper.make_tensor_value_info("nodule_offset", TensorProto.FLOAT, [1, 2, GRID, GRID])],
        [numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"),
         numpy_helper.from_array(heat, "nodule_heatmap_const"),
         numpy_helper.from_array(size, "nodule_size_const"),
         numpy_helper.from_array(offset, "nodule_offset_const")])
    sha = _save(helper.make_model(graph), folder)
    (folder / "manifest.toml").write_text(f"""
[model]
name = "{name}"
version = "0.0.1"
task = "detection"
file = "model.onnx"
sha256 = "{sha}"

[input]
name = "image"
height = {DET_SIZE}
width = {DET_SIZE}
mean = 0.5
std = 0.25

[output]
decoding = "centernet"
heatmap = "nodule_heatmap"
size = "nodule_size"
offset = "nodule_offset"
stride = {STRIDE}
score_threshold = 0.3
nms_iou = 0.3
max_detections = 20
""")
    return folder


def expected_box(peak: tuple) -> tuple[float, ...]:
    row, col, score, (w, h), (ox, oy) = peak
    cx, cy = (col + ox) * STRIDE, (row + oy) * STRIDE
    return (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2, score)


def rewrite(folder: Path, old: str, new: str) -> None:
    path = folder / "manifest.toml"
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new))


# ---------------------------------------------------------------- loading and running
def test_classifier_runs_through_onnxruntime(tmp_path):
    model = load_model(make_classifier(tmp_path), "onnxruntime", intra_op_threads=1)
    assert isinstance(model, LoadedModel) and model.backend == "onnxruntime"
    image = np.random.default_rng(3).random((1, 1, CLS_SIZE, CLS_SIZE), dtype=np.float32)
    out = model.run(image)
    assert set(out) == {"tb_score", "tb_heatmap"}
    np.testing.assert_allclose(out["tb_score"], [[1 / (1 + np.exp(-2.0 * image.mean()))]], rtol=1e-5)
    pooled = image.reshape(4, 4, 4, 4).mean(axis=(1, 3))
    np.testing.assert_allclose(out["tb_heatmap"][0, 0], 1 / (1 + np.exp(-pooled)), rtol=1e-5)
    assert model.manifest.output.threshold == 0.5 and model.manifest.input.shape == (1, 1, 16, 16)


def test_run_rejects_wrong_input_shape(tmp_path):
    model = load_model(make_classifier(tmp_path), "onnxruntime")
    with pytest.raises(ValueError, match=r"tb_classifier: input tensor must have shape \[1, 1, 16, 16\]"):
        model.run(np.zeros((1, 1, 8, 8), dtype=np.float32))


def test_sha256_mismatch_is_refused_with_a_clear_message(tmp_path):
    folder = make_classifier(tmp_path)
    actual = hashlib.sha256((folder / "model.onnx").read_bytes()).hexdigest()
    rewrite(folder, actual, "0" * 64)
    with pytest.raises(ModelIntegrityError) as info:
        load_model(folder, "onnxruntime")
    message = str(info.value)
    assert str(folder / "model.onnx") in message and "0" * 64 in message and actual in message
    assert "not loaded" in message and "model.sha256" in message


def test_missing_model_file_is_an_integrity_error(tmp_path):
    folder = make_classifier(tmp_path)
    (folder / "model.onnx").unlink()
    with pytest.raises(ModelIntegrityError, match="model file not found"):
        load_model(folder, "onnxruntime")


@pytest.mark.parametrize("old,new,key,hint", [
    ("height = 16\n", "", "input.height", "missing"),
    ('task = "classification"', 'task = "segmentation"', "model.task", "classification, detection"),
    ("height = 16", 'height = "16"', "input.height", "must be a int"),
    ("threshold = 0.5", "threshold = 1.5", "output.threshold", "between 0 and 1"),
    ("std = 0.25", "std = 0", "input.std", "> 0"),
    ("[output]", "[outputs]", "[output]", "missing"),
    ('sha256 = "', 'sha256 = "xyz', "model.sha256", "64 hex digits"),
])
def test_bad_manifest_names_file_and_key(tmp_path, old, new, key, hint):
    folder = make_classifier(tmp_path)
    rewrite(folder, old, new)
    with pytest.raises(ManifestError) as info:
        load_manifest(folder)
    assert str(folder / "manifest.toml") in str(info.value)
    assert key in str(info.value) and hint in str(info.value)


def test_bad_detection_manifest_and_toml_syntax(tmp_path):
    folder = make_detector(tmp_path)
    rewrite(folder, "stride = 4", "stride = 5")
    with pytest.raises(ManifestError, match="output.stride"):
        load_manifest(folder)
    rewrite(folder, "stride = 5", 'stride = 4\ndecoding = "yolo"')
    with pytest.raises(ManifestError, match="not valid TOML"):
        load_manifest(folder)
    rewrite(folder, 'decoding = "centernet"\n', "")
    with pytest.raises(ManifestError, match="output.decoding.*allowed values: centernet"):
        load_manifest(folder)


def test_manifest_names_must_match_the_network(tmp_path):
    folder = make_classifier(tmp_path)
    rewrite(folder, 'name = "image"', 'name = "pixels"')
    with pytest.raises(ManifestError, match=r"input\.name.*'pixels'.*\['image'\]"):
        load_model(folder, "onnxruntime")
    rewrite(folder, 'name = "pixels"', 'name = "image"')
    rewrite(folder, 'heatmap = "tb_heatmap"', 'heatmap = "tb_map"')
    with pytest.raises(ManifestError, match=r"\['tb_map'\] are not outputs"):
        load_model(folder, "onnxruntime")
    rewrite(folder, 'heatmap = "tb_map"', 'heatmap = "tb_heatmap"')
    rewrite(folder, "width = 16", "width = 32")
    with pytest.raises(ManifestError, match="input.width"):
        load_model(folder, "onnxruntime")


def test_load_models_keys_by_name_and_refuses_empty_or_broken(tmp_path):
    make_classifier(tmp_path)
    make_detector(tmp_path)
    models = load_models(tmp_path, "onnxruntime")
    assert sorted(models) == ["nodule_detector", "tb_classifier"]
    assert all(m.backend == "onnxruntime" for m in models.values())
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ManifestError, match="no model folders"):
        load_models(empty)
    rewrite(tmp_path / "tb_classifier", 'task = "classification"', 'task = "regression"')
    with pytest.raises(ManifestError, match="model.task"):
        load_models(tmp_path, "onnxruntime")


def test_default_models_dir_is_the_package_folder():
    assert engines.DEFAULT_MODELS_DIR == Path(engines.__file__).parent / "models"


# ---------------------------------------------------------------- backend choice
@needs_no_tensorrt
def test_auto_backend_falls_back_to_onnxruntime_and_says_why(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="engines")
    model = load_model(make_detector(tmp_path), "auto", cache_dir=tmp_path / "cache")
    assert model.backend == "onnxruntime"
    assert "TensorRT not used" in model.backend_reason
    assert any("backend onnxruntime" in r.getMessage() and "TensorRT not used" in r.getMessage()
               for r in caplog.records)
    assert not (tmp_path / "cache").exists()


@needs_no_tensorrt
def test_tensorrt_backend_unavailable_is_a_clear_error(tmp_path):
    with pytest.raises(BackendUnavailable, match="backend 'tensorrt' configured but"):
        load_model(make_classifier(tmp_path), "tensorrt", cache_dir=tmp_path / "cache")


def test_unknown_backend_is_refused(tmp_path):
    with pytest.raises(ValueError, match="backend must be one of auto, onnxruntime, tensorrt"):
        load_model(make_classifier(tmp_path), "openvino")


def test_onnxruntime_providers_are_explicit_and_checked(tmp_path):
    folder = make_classifier(tmp_path)
    runner = OnnxRuntimeRunner(folder / "model.onnx", device="cpu", intra_op_threads=1)
    assert runner.providers == ["CPUExecutionProvider"] and runner.device == "cpu"
    with pytest.raises(ValueError, match="intra_op_threads"):
        OnnxRuntimeRunner(folder / "model.onnx", intra_op_threads=-1)
    with pytest.raises(RunnerError, match=r"missing \[\].*unexpected \['x'\]"):
        runner.run({"image": np.zeros((1, 1, 16, 16), np.float32), "x": np.zeros(1)})
    import onnxruntime

    if CUDA_PROVIDER not in onnxruntime.get_available_providers():
        with pytest.raises(BackendUnavailable, match="device 'cuda' requested"):
            OnnxRuntimeRunner(folder / "model.onnx", device="cuda")


# ---------------------------------------------------------------- decoding
def test_decode_centernet_finds_planted_peaks_with_exact_boxes(tmp_path):
    model = load_model(make_detector(tmp_path), "onnxruntime")
    outputs = model.run(np.zeros(model.manifest.input.shape, dtype=np.float32))
    boxes = decode_centernet(outputs, model.manifest)
    assert len(boxes) == 2       # B removed by NMS, D below threshold, NOT_PEAK not a maximum
    for got, peak in zip(boxes, (PEAK_A, PEAK_C)):
        np.testing.assert_allclose(got, expected_box(peak), rtol=0, atol=1e-5)


def test_nms_is_what_removes_the_overlapping_peak(tmp_path):
    manifest = load_manifest(make_detector(tmp_path))
    heat, size, offset = planted_maps()
    outputs = {"nodule_heatmap": heat, "nodule_size": size, "nodule_offset": offset}
    no_nms = dataclasses.replace(manifest, output=dataclasses.replace(manifest.output, nms_iou=1.0))
    boxes = decode_centernet(outputs, no_nms)
    assert [b[4] for b in boxes] == pytest.approx([0.9, 0.7, 0.6])
    np.testing.assert_allclose(boxes[2], expected_box(PEAK_B), atol=1e-5)
    one = dataclasses.replace(manifest, output=dataclasses.replace(manifest.output, max_detections=1))
    assert len(decode_centernet(outputs, one)) == 1
    low = dataclasses.replace(manifest, output=dataclasses.replace(manifest.output, score_threshold=0.2))
    assert expected_box(PEAK_D)[4] in [round(b[4], 6) for b in decode_centernet(outputs, low)]


def test_decode_errors_name_the_output(tmp_path):
    manifest = load_manifest(make_detector(tmp_path))
    heat, size, offset = planted_maps()
    with pytest.raises(KeyError, match="nodule_offset"):
        decode_centernet({"nodule_heatmap": heat, "nodule_size": size}, manifest)
    with pytest.raises(ValueError, match="nodule_size.*must be \\[1, 2, H, W\\]"):
        decode_centernet({"nodule_heatmap": heat, "nodule_size": heat, "nodule_offset": offset}, manifest)
    classifier = load_manifest(make_classifier(tmp_path))
    with pytest.raises(ValueError, match="not a centernet detection model"):
        decode_centernet({}, classifier)


def test_nms_and_max_pool_against_brute_force():
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30], [0, 0, 10, 10]], dtype=float)
    scores = np.array([0.5, 0.9, 0.4, 0.5])
    # box 1 overlaps 0 and 3 at IoU 9/11; box 0 and 3 are identical (IoU 1)
    assert nms(boxes, scores, 0.5).tolist() == [1, 2]
    assert nms(boxes, scores, 0.95).tolist() == [1, 0, 2]
    assert nms(boxes, scores, 1.0).tolist() == [1, 0, 3, 2]
    assert nms(np.zeros((0, 4)), np.zeros(0), 0.5).tolist() == []
    heat = np.random.default_rng(1).random((7, 9)).astype(np.float32)
    brute = np.array([[heat[max(r - 1, 0):r + 2, max(c - 1, 0):c + 2].max() for c in range(9)]
                      for r in range(7)])
    np.testing.assert_array_equal(max_pool3x3(heat), brute)


# ---------------------------------------------------------------- builder (no TensorRT needed)
def test_engine_key_depends_on_every_part():
    base = EngineKey("a" * 64, "10.3.0", "Orin", "fp16")
    assert len(base.digest()) == 16 and base.digest() == EngineKey("a" * 64, "10.3.0", "Orin", "fp16").digest()
    for change in ({"model_sha256": "b" * 64}, {"tensorrt_version": "10.4.0"},
                   {"gpu_name": "NVIDIA H100"}, {"precision": "fp32"}, {"calibration_sha256": "c"}):
        assert dataclasses.replace(base, **change).digest() != base.digest(), change


def test_int8_needs_a_valid_calibration_set(tmp_path):
    with pytest.raises(EngineBuildError, match="int8 needs a calibration set"):
        check_precision("int8", None)
    with pytest.raises(EngineBuildError, match="precision must be one of fp16, fp32, int8"):
        check_precision("fp8", None)
    manifest = load_manifest(make_classifier(tmp_path))
    calib = tmp_path / "calib"
    calib.mkdir()
    with pytest.raises(EngineBuildError, match="no .npy files"):
        calibration_files(calib, manifest)
    np.save(calib / "a.npy", np.zeros((1, 1, 16, 16), np.float32))
    np.save(calib / "b.npy", np.zeros((1, 1, 8, 8), np.float32))
    with pytest.raises(EngineBuildError, match=r"b\.npy has shape \[1, 1, 8, 8\]"):
        calibration_files(calib, manifest)
    (calib / "b.npy").unlink()
    assert calibration_files(calib, manifest) == [calib / "a.npy"]


# ---------------------------------------------------------------- commands
def _run(argv: list[str], models_dir: Path, cache_dir: Path) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="edge engines")
    commands.add_arguments(parser)
    out, err = io.StringIO(), io.StringIO()
    code = commands.run(parser.parse_args(argv), models_dir=models_dir, cache_dir=cache_dir,
                        backend="auto", out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_list_prints_a_table_and_flags_a_mismatch(tmp_path):
    make_classifier(tmp_path)
    det = make_detector(tmp_path)
    code, out, err = _run(["list"], tmp_path, tmp_path / "cache")
    lines = out.splitlines()
    assert code == 0 and err == ""
    assert lines[0].split() == ["MODEL", "VERSION", "TASK", "INPUT", "SHA256", "RUNNER"]
    assert lines[1].split()[:5] == ["nodule_detector", "0.0.1", "detection", "32x32", "ok"]
    assert lines[2].split()[:5] == ["tb_classifier", "0.0.1", "classification", "16x16", "ok"]
    expected_runner = "onnxruntime" if TRT_MISSING else "tensorrt"
    assert lines[1].split()[5] == expected_runner
    (det / "model.onnx").write_bytes((det / "model.onnx").read_bytes() + b"\0")
    code, out, err = _run(["list"], tmp_path, tmp_path / "cache")
    assert code == 1 and "MISMATCH" in out.splitlines()[1] and "sha256 mismatch" in err


@needs_no_tensorrt
@pytest.mark.parametrize("argv", [["build"], ["build", "--model", "tb_classifier", "--precision", "fp32"],
                                  ["verify"], ["verify", "--tolerance", "0.1"]])
def test_build_and_verify_exit_2_without_tensorrt(tmp_path, argv):
    make_classifier(tmp_path)
    code, out, err = _run(argv, tmp_path, tmp_path / "cache")
    assert code == 2 and out == ""
    assert "TensorRT is not usable here" in err and TRT_MISSING in err
    assert not (tmp_path / "cache").exists()


def test_build_int8_without_calibration_is_refused(tmp_path):
    make_classifier(tmp_path)
    code, _, err = _run(["build", "--precision", "int8"], tmp_path, tmp_path / "cache")
    assert code == 2 and "int8 needs a calibration set" in err


def test_parity_comparison_passes_equal_and_fails_different_models(tmp_path):
    same = make_classifier(tmp_path / "a")
    other = make_classifier(tmp_path / "b", weight=20.0)
    manifest = load_manifest(same)
    tensor = commands.reference_input(manifest)
    assert tensor.shape == manifest.input.shape and tensor.dtype == np.float32
    np.testing.assert_array_equal(tensor, commands.reference_input(manifest))
    ref = OnnxRuntimeRunner(same / "model.onnx")
    diffs = commands.compare_runners(ref, OnnxRuntimeRunner(same / "model.onnx"), {"image": tensor},
                                     manifest.output_names, 1e-2)
    assert [d.name for d in diffs] == ["tb_score", "tb_heatmap"] and all(d.max_abs_diff == 0 for d in diffs)
    diffs = commands.compare_runners(ref, OnnxRuntimeRunner(other / "model.onnx"), {"image": tensor},
                                     manifest.output_names, 1e-2)
    score, mean = diffs[0], float(tensor.mean())
    expected = abs(1 / (1 + np.exp(-2.0 * mean)) - 1 / (1 + np.exp(-20.0 * mean)))
    assert score.max_abs_diff == pytest.approx(expected, rel=1e-4) and expected > 1e-2
    assert not score.ok and diffs[1].ok   # the heatmap does not use the weight
    np.save(same / "reference_input.npy", np.ones((1, 1, 16, 16), np.float32))
    assert commands.reference_input(manifest).sum() == 256


# ---------------------------------------------------------------- shipped models
SHIPPED = sorted(p for p in engines.DEFAULT_MODELS_DIR.glob("*") if (p / "manifest.toml").is_file()) \
    if engines.DEFAULT_MODELS_DIR.is_dir() else []


@pytest.mark.skipif(not SHIPPED, reason="no trained models in engines/models yet")
@pytest.mark.parametrize("folder", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_models_load_and_run(folder):
    model = load_model(folder, "onnxruntime")
    spec = model.manifest
    assert spec.name == folder.name and spec.clinical_use is False
    out = model.run(commands.reference_input(spec))
    assert set(spec.output_names) <= set(out)
    if spec.task == "classification":
        assert out[spec.output.score].shape == (1, 1) and 0 <= float(out[spec.output.score][0, 0]) <= 1
        assert out[spec.output.heatmap].ndim == 4
    else:
        grid = (spec.input.height // spec.output.stride, spec.input.width // spec.output.stride)
        assert out[spec.output.heatmap].shape == (1, 1, *grid)
        assert out[spec.output.size].shape == out[spec.output.offset].shape == (1, 2, *grid)
        assert len(decode_centernet(out, spec)) <= spec.output.max_detections
