"""The general model contract: manifests, preprocessing geometry, decoders, findings, check.

- Geometry: every resize mode maps boxes back to full-resolution pixels exactly.
- Decoders: YOLO v8/v5, boxes_scores_labels, sigmoid/softmax/none classifiers, per-label
  thresholds, refer roles, class-activation regions; the CenterNet path is today's.
- Manifests: new keys and ``[[findings]]``, errors that name the key; the two shipped
  manifests load unchanged and give the same findings as the appliance always did.
- ``check_model_folder`` on good and broken folders.
- Parity with the frameworks that made three models (Ultralytics YOLOv8, torchvision Faster
  R-CNN, torchxrayvision DenseNet): fixtures made by ``tests/support/make_parity_fixtures.py``;
  these tests need only ONNX Runtime.
"""
from __future__ import annotations

import dataclasses
import io
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from engines import DEFAULT_MODELS_DIR
from engines.checks import (TENSORRT_SUPPORTED, check_model_folder, inspect_model_folder,
                            tensorrt_operator_report)
from engines.decode import (OutputShapeError, box_iou, class_probabilities, decode_boxes_scores_labels,
                            decode_centernet, decode_yolo, nms_by_class, yolo_classes)
from engines.findings import check_output_shapes, decode_findings, refer_flag, to_full_image
from engines.geometry import InputGeometry, placement
from engines.labels import KNOWN_CODES
from engines.manifest import (BoxesOutput, ManifestError, YoloOutput, load_manifest, parse_manifest,
                              read_verified_model)
from engines.preprocess import (prepare_input, resize_area_exact, resize_bilinear, to_model_input)
from engines.runners.onnxruntime_runner import OnnxRuntimeRunner
from engines.store import load_model

onnx = pytest.importorskip("onnx")
from onnx import helper, numpy_helper  # noqa: E402
from support.planted_models import (YOLO_FINDINGS, classifier_manifest,  # noqa: E402
                                    constant_model, yolo_folder, yolo_v8_predictions)

PARITY = Path(__file__).parent / "fixtures" / "model_parity"
# Measured when the fixtures were made (see the report in each reference.json's
# "appliance_when_generated"): boxes within 0.0012 px, scores within 1.6e-5, DenseNet
# probabilities within 2e-7. The tolerances below leave room for other CPUs' rounding.
BOX_TOL_PX, SCORE_TOL, PROB_TOL = 0.01, 1e-4, 1e-5


# ---------------------------------------------------------------- helpers
def spec(**kw) -> SimpleNamespace:
    base = dict(name="x", height=64, width=64, channels=1, batch=True, resize="stretch",
                interpolation="area", pad_value=0.0, pad_position="center", crop_fraction=1.0,
                value_range=(0.0, 1.0), mean=0.0, std=1.0)
    base.update(kw)
    ns = SimpleNamespace(**base)
    ns.means = tuple(base["mean"]) if isinstance(base["mean"], tuple) else (base["mean"],) * base["channels"]
    ns.stds = tuple(base["std"]) if isinstance(base["std"], tuple) else (base["std"],) * base["channels"]
    return ns


def rectangle_image(rows: int, cols: int, box: tuple[int, int, int, int]) -> np.ndarray:
    img = np.zeros((rows, cols), np.float32)
    x1, y1, x2, y2 = box
    img[y1:y2, x1:x2] = 1.0
    return img


def bright_box(plane: np.ndarray) -> tuple[float, float, float, float]:
    """Sub-pixel extent of a bright rectangle in an area-resized image (edge pixels count by
    their coverage, so the extent is exact for area averaging)."""
    cols = plane.max(axis=0)
    rows = plane.max(axis=1)
    xs, ys = np.nonzero(cols > 1e-6)[0], np.nonzero(rows > 1e-6)[0]
    x1 = xs[0] + (1 - cols[xs[0]]) if cols[xs[0]] < 1 else xs[0]
    x2 = xs[-1] + cols[xs[-1]]
    y1 = ys[0] + (1 - rows[ys[0]]) if rows[ys[0]] < 1 else ys[0]
    y2 = ys[-1] + rows[ys[-1]]
    return float(x1), float(y1), float(x2), float(y2)


# ---------------------------------------------------------------- geometry and resize modes
@pytest.mark.parametrize("mode,source,target,box", [
    # integer factors: model-input edges fall on pixel boundaries, so the check is exact
    ("stretch", (600, 800), (300, 200), (100, 60, 300, 240)),
    ("letterbox", (600, 800), (400, 400), (100, 60, 300, 240)),     # r = 0.5, pad top 50
    ("letterbox", (800, 600), (400, 400), (100, 60, 300, 240)),     # pad left 50
    ("crop", (600, 900), (300, 300), (200, 60, 400, 240)),          # crop x 150..750, factor 2
    ("crop", (900, 600), (200, 100), (100, 400, 300, 600)),         # wide input: crop rows
])
def test_resize_modes_invert_exactly_to_full_resolution(mode, source, target, box):
    s = spec(height=target[0], width=target[1], resize=mode, interpolation="area_exact")
    unit = rectangle_image(*source, box)
    prepared = prepare_input(unit, s)
    found = bright_box(prepared.tensor[0, 0])
    back = prepared.geometry.box_to_full(found)
    assert np.allclose(back, box, atol=0.01), (found, back)


@pytest.mark.parametrize("mode", ["stretch", "letterbox", "crop"])
def test_non_integer_factors_are_inverted_exactly(mode):
    """A 1000 x 700 image into 416 x 416: the rectangle's sub-pixel extent in the model input
    maps back to the drawn rectangle to < 0.01 px (area averaging keeps partial coverage)."""
    box = (233, 151, 611, 497)
    s = spec(height=416, width=416, resize=mode, interpolation="area_exact")
    prepared = prepare_input(rectangle_image(700, 1000, box), s)
    back = prepared.geometry.box_to_full(bright_box(prepared.tensor[0, 0]))
    assert np.allclose(back, box, atol=0.01), back


def test_letterbox_placement_follows_ultralytics_and_geometry_round_trips():
    place = placement("letterbox", (700, 1000), (416, 416))
    # r = 0.416: 416 x round(291.2) = 291, top pad (416 - 291) // 2 = 62
    assert place.target == (0, 62, 416, 291) and place.region == (0, 0, 1000, 700)
    top_left = placement("letterbox", (700, 1000), (416, 416), pad_position="top_left")
    assert top_left.target == (0, 0, 416, 291)
    g = InputGeometry.for_image(spec(height=416, width=416, resize="letterbox"), (700, 1000))
    assert g.to_model(0, 0) == (0.0, 62.0)
    assert np.allclose(g.to_model(1000, 700), (416.0, 353.0))
    for x, y in [(0.0, 0.0), (123.4, 567.8), (1000.0, 700.0), (999.99, 0.01)]:
        assert np.allclose(g.to_full(*g.to_model(x, y)), (x, y), atol=1e-9)
    # a box in the padding is clipped to the image
    assert g.box_to_full((10, 0, 20, 30))[1] == 0.0


def test_crop_placement_follows_torchxrayvision():
    # XRayCenterCrop: crop = min side, start = x // 2 - crop // 2
    assert placement("crop", (650, 701), (224, 224)).region == (701 // 2 - 650 // 2, 0, 650, 650)
    assert placement("crop", (1000, 1000), (224, 224), crop_fraction=0.875).region == (63, 63, 875, 875)
    g = InputGeometry.for_image(spec(height=224, width=224, resize="crop"), (650, 701))
    assert np.allclose(g.to_full(0, 0), (25.0, 0.0)) and np.allclose(g.to_full(224, 224), (675.0, 650.0))


def test_reduced_decode_geometry_reports_full_resolution():
    """Preprocessing a half-resolution decode, coordinates still come out at full resolution."""
    s = spec(height=100, width=100, resize="letterbox")
    g = prepare_input(np.zeros((300, 400), np.float32), s, full_hw=(600, 800)).geometry
    # 400 x 300 -> 100 x 75, top pad (100 - 75) // 2 = 12
    assert np.allclose(g.to_full(100, 87), (800.0, 600.0)) and np.allclose(g.to_full(0, 12), (0.0, 0.0))


def test_channels_value_range_and_per_channel_normalisation():
    unit = np.linspace(0, 1, 16 * 16, dtype=np.float32).reshape(16, 16)
    imagenet = spec(height=16, width=16, channels=3, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    t = prepare_input(unit, imagenet).tensor
    assert t.shape == (1, 3, 16, 16) and t.dtype == np.float32
    for c, (m, s) in enumerate(zip(imagenet.means, imagenet.stds)):
        assert np.allclose(t[0, c], (unit - m) / s, atol=1e-6)
    xrv = spec(height=16, width=16, value_range=(-1024.0, 1024.0), batch=False)
    t = prepare_input(unit, xrv).tensor
    assert t.shape == (1, 16, 16) and np.allclose(t[0], unit * 2048 - 1024, atol=1e-3)
    # letterbox padding is the pad gray, scaled like the image
    t = prepare_input(np.ones((8, 16), np.float32), spec(height=16, width=16, resize="letterbox",
                                                       pad_value=0.25, value_range=(0.0, 255.0))).tensor
    assert np.allclose(t[0, 0, :4], 63.75) and np.allclose(t[0, 0, 4:12], 255.0)


def test_default_input_gives_the_same_tensor_as_before():
    unit = np.random.default_rng(3).random((777, 645), dtype=np.float32)
    for name in ("tb_classifier", "nodule_detector"):
        m = load_manifest(DEFAULT_MODELS_DIR / name)
        old = to_model_input(unit, m.input.height, m.input.width, m.input.mean, m.input.std)
        assert np.array_equal(prepare_input(unit, m.input).tensor, old)


def test_bilinear_and_exact_area_follow_their_definitions():
    rng = np.random.default_rng(0)
    a = rng.random((9, 7), dtype=np.float32)
    # exact area, factor 7 -> 3: output pixel 0 covers source columns 0 .. 7/3
    out = resize_area_exact(a, 9, 3)
    s = 7 / 3
    want = (a[:, 0] + a[:, 1] + (s - 2) * a[:, 2]) / s
    assert np.allclose(out[:, 0], want, atol=1e-6)
    # bilinear, half-pixel centres: output column j samples source x = (j + 0.5) * 7/3 - 0.5
    out = resize_bilinear(a, 9, 3)
    x = 1.5 * 7 / 3 - 0.5
    i = int(np.floor(x))
    assert np.allclose(out[:, 1], a[:, i] + (a[:, i + 1] - a[:, i]) * (x - i), atol=1e-6)
    assert np.array_equal(resize_bilinear(a, 9, 7), a)


# ---------------------------------------------------------------- decoders
def test_yolo_v8_class_wise_nms_and_per_label_thresholds():
    out = YoloOutput("yolo", "output0", "v8", 0.5, 0.45, 10)
    dets = decode_yolo({"output0": yolo_v8_predictions()}, out, {0: 0.5, 1: 0.25, 2: 0.4}, 3)
    assert [(d.label, round(d.score, 2)) for d in dets] == [(0, 0.9), (1, 0.7), (1, 0.3)]
    assert np.allclose(dets[0][:4], (15, 15, 25, 25)) and np.allclose(dets[2][:4], (37, 46, 43, 54))
    # a transposed [1, N, 4 + C] export decodes the same
    transposed = decode_yolo({"output0": yolo_v8_predictions().transpose(0, 2, 1)}, out,
                             {0: 0.5, 1: 0.25, 2: 0.4}, 3)
    assert transposed == dets
    # max_detections and classes the manifest does not list
    assert len(decode_yolo({"output0": yolo_v8_predictions()}, dataclasses.replace(out, max_detections=1),
                           {0: 0.5, 1: 0.25}, 3)) == 1
    assert [d.label for d in decode_yolo({"output0": yolo_v8_predictions()}, out, {1: 0.25}, 3)] == [1, 1]
    # without the class count, the larger dimension is taken as the anchors
    assert yolo_classes((1, 84, 8400), "v8") == (80, False)
    assert yolo_classes((1, 8400, 84), "v8") == (80, True)
    assert yolo_classes((1, 7, 6), "v8", classes=3) == (3, False)
    assert yolo_classes((1, 6, 7), "v8", classes=3) == (3, True)


def test_yolo_v5_uses_objectness_times_class_score():
    pred = np.zeros((1, 3, 5 + 2), np.float32)
    pred[0, 0] = (10, 10, 4, 4, 0.9, 0.8, 0.1)     # 0.72 class 0
    pred[0, 1] = (30, 30, 4, 4, 0.5, 0.2, 0.9)     # 0.45 class 1
    pred[0, 2] = (50, 50, 4, 4, 0.2, 0.9, 0.0)     # 0.18 below
    out = YoloOutput("yolo", "p", "v5", 0.3, 0.5, 10)
    dets = decode_yolo({"p": pred}, out, {0: 0.3, 1: 0.3})
    assert [(d.label, round(d.score, 3)) for d in dets] == [(0, 0.72), (1, 0.45)]
    assert yolo_classes((1, 3, 7), "v5") == (2, False) and yolo_classes((1, 84, 8400), "v8") == (80, False)
    with pytest.raises(OutputShapeError, match="yolo v8 output"):
        yolo_classes((1, 4, 100), "v8")


def test_nms_by_class_keeps_overlapping_boxes_of_different_classes():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 10]], float)
    keep = nms_by_class(boxes, np.array([0.9, 0.8, 0.7]), np.array([0, 0, 1]), 0.5)
    assert list(keep) == [0, 2]


def test_boxes_scores_labels_formats_batch_count_and_unknown_labels(caplog):
    boxes = np.array([[[10, 10, 20, 30], [0.5, 0.5, 0.25, 0.25], [1, 1, 2, 2]]], np.float32)
    scores = np.array([[0.9, 0.6, 0.99]], np.float32)
    labels = np.array([[1, 2, 1]], np.int64)
    spec_ = BoxesOutput("boxes_scores_labels", "b", "s", "l", "xyxy", False, None, 0.5, 100)
    outputs = {"b": boxes, "s": scores, "l": labels}
    dets = decode_boxes_scores_labels(outputs, spec_, (64, 64), {1: 0.5, 2: 0.5})
    assert [(d.label, round(d.score, 2)) for d in dets] == [(1, 0.99), (1, 0.9), (2, 0.6)]
    # count: only the first 2 rows are valid (padded exports)
    with_count = BoxesOutput("boxes_scores_labels", "b", "s", "l", "xyxy", False, "n", 0.5, 100)
    dets = decode_boxes_scores_labels({"b": boxes, "s": scores, "l": labels, "n": np.array([2])},
                                      with_count, (64, 64), {1: 0.5, 2: 0.5})
    assert len(dets) == 2
    # normalised cxcywh, [N, 4] without batch
    cxcywh = BoxesOutput("boxes_scores_labels", "b", "s", "l", "cxcywh", True, None, 0.5, 100)
    dets = decode_boxes_scores_labels({"b": boxes[0, 1:2], "s": scores[0, 1:2], "l": labels[0, 1:2]},
                                      cxcywh, (64, 128), {2: 0.5})
    assert np.allclose(dets[0][:4], (48, 24, 80, 40))
    xywh = BoxesOutput("boxes_scores_labels", "b", "s", "l", "xywh", False, None, 0.5, 100)
    dets = decode_boxes_scores_labels({"b": boxes[0, :1], "s": scores[0, :1], "l": labels[0, :1]},
                                      xywh, (64, 64), {1: 0.5})
    assert np.allclose(dets[0][:4], (10, 10, 30, 40))
    # a class the manifest does not list is dropped, with a warning
    with caplog.at_level("WARNING"):
        dets = decode_boxes_scores_labels({"b": boxes, "s": scores, "l": labels}, spec_, (64, 64), {1: 0.5})
    assert {d.label for d in dets} == {1} and "not in the manifest" in caplog.text
    with pytest.raises(OutputShapeError, match=r"must be \[N, 4\], \[N\] and \[N\]"):
        decode_boxes_scores_labels({"b": boxes[0, :, :3], "s": scores, "l": labels}, spec_, (64, 64),
                                   {1: 0.5})


def test_class_probabilities():
    assert np.allclose(class_probabilities(np.array([[0.0, 2.0]]), "sigmoid"), [0.5, 1 / (1 + np.exp(-2))])
    assert np.allclose(class_probabilities(np.array([1.0, 1.0]), "softmax"), [0.5, 0.5])
    assert np.allclose(class_probabilities(np.array([1000.0, -1000.0]), "sigmoid"), [1.0, 0.0])
    assert np.allclose(class_probabilities(np.array([0.3]), "none"), [0.3])


# ---------------------------------------------------------------- manifests and findings
TB_SOFTMAX = """
[[findings]]
label = "normal"
report = false
[[findings]]
label = "tb"
display = "Tuberculosis"
threshold = 0.6
refer = true
code = "154283005"
meaning = "Pulmonary tuberculosis"
"""


def test_two_class_softmax_tb_classifier(tmp_path):
    logits = np.array([[0.0, 1.0]], np.float32)       # p(tb) = 0.731
    folder = constant_model(tmp_path / "tb2", [1, 1, 32, 32], {"scores": logits},
                            classifier_manifest("softmax", TB_SOFTMAX))
    model = load_model(folder, "onnxruntime")
    tensor = prepare_input(np.zeros((50, 40), np.float32), model.manifest.input).tensor
    found = decode_findings(model.run(tensor), model.manifest)
    model.close()
    assert len(found) == 1 and found[0].label == "tb" and found[0].positive and found[0].refer
    assert found[0].score == pytest.approx(1 / (1 + np.exp(-1.0)))
    assert found[0].code.value == "154283005" and found[0].code.meaning == "Pulmonary tuberculosis"
    assert refer_flag(found)


def test_multilabel_sigmoid_thresholds_refer_roles_and_heatmap_regions(tmp_path):
    findings = """
[[findings]]
label = "Nodule"
threshold = 0.6
[[findings]]
label = "Effusion"
threshold = 0.9
refer = true
[[findings]]
label = "Pleural thickening"
threshold = 0.2
refer = true
"""
    logits = np.array([[1.0, 1.0, -2.0]], np.float32)   # p = 0.731, 0.731, 0.119
    cam = np.zeros((1, 3, 4, 4), np.float32)
    cam[0, 0, 1:3, 2] = 5.0                            # nodule region: column 2, rows 1-2
    folder = constant_model(tmp_path / "cxr", [1, 1, 32, 32], {"scores": logits, "cam": cam},
                            classifier_manifest("sigmoid", findings, heatmap=True))
    m = load_manifest(folder)
    assert m.findings[0].code == KNOWN_CODES["nodule"] and m.findings[1].code.value == "60046008"
    assert m.findings[2].code is None          # no agreed code: left to the site's manifest
    outputs = {"scores": logits, "cam": cam}
    found = {f.label: f for f in decode_findings(outputs, m)}
    assert found["Nodule"].positive and not found["Nodule"].refer           # 0.73 >= 0.6, no refer role
    assert not found["Effusion"].positive and not found["Effusion"].refer   # 0.73 < 0.9
    assert not found["Pleural thickening"].positive                          # 0.12 < 0.2
    assert not refer_flag(found.values())
    assert found["Nodule"].box == (16.0, 8.0, 24.0, 24.0)                  # 4x4 cells of 8 px
    g = InputGeometry.for_image(m.input, (64, 128))
    full = to_full_image(found.values(), g)
    assert full[0].space == "full" and full[0].box == (64.0, 16.0, 96.0, 48.0)


def test_class_count_must_match_the_findings(tmp_path):
    folder = constant_model(tmp_path / "c", [1, 1, 32, 32], {"scores": np.zeros((1, 3), np.float32)},
                            classifier_manifest("softmax", TB_SOFTMAX))
    m = load_manifest(folder)
    with pytest.raises(OutputShapeError, match=r"3 class\(es\).*2 label"):
        decode_findings({"scores": np.zeros((1, 3), np.float32)}, m)
    assert "3 class(es)" in check_output_shapes(m, {"scores": [1, 3]})[0]


def test_yolo_findings_in_full_image_coordinates(tmp_path):
    m = load_manifest(yolo_folder(tmp_path))
    found = decode_findings({"output0": yolo_v8_predictions()}, m)
    assert [f.label for f in found] == ["nodule", "mass", "mass"]
    assert all(f.positive and f.kind == "detection" for f in found)
    assert found[0].code == KNOWN_CODES["nodule"] and found[1].code == KNOWN_CODES["mass"]
    # a 200 x 100 image letterboxed into 64 x 64: r = 0.32, 64 x 32, pad top 16
    g = InputGeometry.for_image(m.input, (100, 200))
    full = to_full_image(found, g)
    # box (15, 15)-(25, 25): x / 0.32, (y - 16) / 0.32, the top clipped to the image
    assert np.allclose(full[0].box, (46.875, 0.0, 78.125, 28.125), atol=1e-9)
    consolidation = yolo_v8_predictions()
    consolidation[0, 6, 3] = 0.45                      # class 2 reaches its threshold 0.4: refer
    found = decode_findings({"output0": consolidation}, m)
    assert refer_flag(found) and [f.label for f in found if f.refer] == ["consolidation"]


@pytest.mark.parametrize("edit,key", [
    (("channels = 3", "channels = 2"), "input.channels"),
    (('resize = "letterbox"', 'resize = "fill"'), "input.resize"),
    (('interpolation = "bilinear"', 'interpolation = "cubic"'), "input.interpolation"),
    (("mean = 0.0", "mean = [0.1, 0.2]"), "input.mean"),
    (("std = 1.0", "std = [1.0, 0.0, 1.0]"), "input.std"),
    (("pad_value = 0.447058824", "pad_value = 114"), "input.pad_value"),
    (('layout = "v8"\n', ""), "output.layout"),
    (('layout = "v8"', 'layout = "v7"'), "output.layout"),
    (("score_threshold = 0.5", "score_threshold = 2"), "output.score_threshold"),
    (('label = "mass"', 'label = ""'), "findings[1].label"),
    (("threshold = 0.25", "threshold = 1.25"), "findings[1] (mass).threshold"),
    (("refer = true", 'refer = "yes"'), "findings[2] (consolidation).refer"),
    (('label = "consolidation"', 'label = "mass"'), "findings[].label"),
    (('label = "mass"', 'label = "mass"\nindex = 0'), "findings[].index"),
    (('label = "mass"', 'label = "mass"\ncode = "4147007"\nscheme = "SCT"\nmeaning = ""'),
     "findings[1] (mass).meaning"),
    (('label = "mass"', 'label = "mass"\ncode = "RID123"\nmeaning = "Mass"'), "findings[1] (mass).code"),
    (('label = "mass"', 'label = "mass"\nmeaning = "Mass"'), "findings[1] (mass).code"),
])
def test_manifest_errors_name_the_key(tmp_path, edit, key):
    folder = yolo_folder(tmp_path)
    path = folder / "manifest.toml"
    text = path.read_text()
    assert edit[0] in text, edit[0]
    path.write_text(text.replace(edit[0], edit[1], 1))
    with pytest.raises(ManifestError) as info:
        load_manifest(folder)
    assert str(path) in str(info.value) and f"'{key}'" in str(info.value), str(info.value)


def test_new_decodings_need_findings_and_say_which_decoding_fits(tmp_path):
    folder = yolo_folder(tmp_path, findings="")
    with pytest.raises(ManifestError, match=r"key 'findings' is missing: a 'yolo' model"):
        load_manifest(folder)
    # keys of one decoding under another's name
    path = folder / "manifest.toml"
    path.write_text(path.read_text().replace('decoding = "yolo"', 'decoding = "boxes_scores_labels"')
                    + YOLO_FINDINGS)
    with pytest.raises(ManifestError, match=r"output.decoding' is 'boxes_scores_labels', but \[output\] has "
                                            r"the keys of a 'yolo' model"):
        load_manifest(folder)
    with pytest.raises(ManifestError, match="softmax.*at least 2"):
        parse_manifest({"model": {"name": "c", "version": "1", "task": "classification", "sha256": "0" * 64},
                        "input": {"name": "i", "height": 4, "width": 4, "mean": 0, "std": 1},
                        "output": {"score": "s", "decoding": "softmax"},
                        "findings": [{"label": "tb"}]}, tmp_path)


# ---------------------------------------------------------------- the shipped models
def test_shipped_manifests_load_unchanged_with_their_implied_findings():
    tb = load_manifest(DEFAULT_MODELS_DIR / "tb_classifier")
    det = load_manifest(DEFAULT_MODELS_DIR / "nodule_detector")
    assert tb.input.shape == (1, 1, 256, 256) and det.input.shape == (1, 1, 512, 512)
    assert (tb.input.resize, tb.input.interpolation, tb.input.mean, tb.input.std) == \
        ("stretch", "area", 0.5, 0.25)
    assert tb.output.decoding == "none" and tb.output.heatmap == "tb_heatmap" and tb.output.threshold == 0.5
    assert det.output.decoding == "centernet"
    assert det.output_names == ["nodule_heatmap", "nodule_size", "nodule_offset"]
    (f,) = tb.findings
    assert (f.label, f.threshold, f.refer, f.code.value, f.code.scheme) == \
        ("tb", 0.5, True, "56717001", "SCT")
    (n,) = det.findings
    # the nodule finding takes the operating point the training run chose
    assert 0.2 <= det.output.score_threshold <= 0.6
    assert (n.label, n.threshold, n.refer, n.code.value) == \
        ("nodule", det.output.score_threshold, False, "27925004")


def test_shipped_models_give_the_same_findings_as_the_analysis_always_did():
    """On a phantom with a TB pattern and nodules: the appliance's own TB result and nodule
    boxes (``edge.analysis``) equal the generic findings mapped with the geometry."""
    from edge.analysis import Analyzer
    from engines.train.phantom import generate_case, unit_image

    models = {n: load_model(DEFAULT_MODELS_DIR / n, "onnxruntime")
              for n in ("tb_classifier", "nodule_detector")}
    try:
        analyzer = Analyzer(models)
        for seed, cols in ((20240, 1024), (7, 1500)):
            unit = unit_image(generate_case(seed, size=cols, tb=True, nodules=True))
            image = SimpleNamespace(full_rows=unit.shape[0], full_cols=unit.shape[1], pixel_spacing_mm=None)
            outputs, findings = {}, []
            for name, model in models.items():
                spec_ = model.manifest.input
                old = to_model_input(unit, spec_.height, spec_.width, spec_.mean, spec_.std)
                outputs[name] = model.run(old)
                prepared = prepare_input(unit, spec_)
                findings += to_full_image(decode_findings(model.run(prepared.tensor), model.manifest),
                                          prepared.geometry)
            # The analysis of that image as a DICOM file, against the earlier computation
            # on the very image the analysis decoded.
            prepared_ds = analyzer.prepare(_dataset(unit))
            decoded = prepared_ds.image.unit_image
            before = {name: model.run(to_model_input(decoded, m.height, m.width, m.mean, m.std))
                      for name, model in models.items() for m in [model.manifest.input]}
            tb, nodules = _as_before(models, before, image)
            new = analyzer.infer(prepared_ds)
            assert new.tb == tb and new.nodules == nodules and not new.others
            tb, nodules = _as_before(models, outputs, image)   # on ``unit`` itself
            (tb_finding,) = [f for f in findings if f.kind == "classification"]
            assert (tb_finding.score, tb_finding.threshold, tb_finding.positive, tb_finding.refer) == \
                (tb.score, tb.threshold, tb.positive, tb.positive)
            if tb.region is None:
                assert tb_finding.box is None
            else:
                assert np.allclose(tb_finding.box, tb.region, atol=0.006)
            boxes = [f for f in findings if f.kind == "detection"]
            assert len(boxes) == len(nodules) and nodules
            for f, n in zip(boxes, nodules):
                assert f.score == n.score and f.label == "nodule" and not f.refer
                assert np.allclose(f.box, n.box, atol=0.006)
    finally:
        for model in models.values():
            model.close()


def _as_before(models, outputs, image):
    """The TB result and nodules exactly as the appliance computed them before manifests
    declared their findings (stretch resize, CenterNet, heatmap region)."""
    from edge.findings import Nodule, TBResult
    from engines.decode import decode_centernet
    from engines.findings import hot_region

    tb_model, det = models["tb_classifier"], models["nodule_detector"]
    out = outputs["tb_classifier"]
    spec_ = tb_model.manifest.output
    score = float(np.asarray(out[spec_.score]).reshape(-1)[0])
    positive = score >= spec_.threshold
    region = None
    if positive:
        x1, y1, x2, y2 = hot_region(out[spec_.heatmap], image.full_rows, image.full_cols)
        region = [round(v, 2) for v in (x1, y1, x2, y2)]
    tb = TBResult(score=score, threshold=float(spec_.threshold), positive=positive, region=region,
                  model="tb_classifier")
    fx = image.full_cols / det.manifest.input.width
    fy = image.full_rows / det.manifest.input.height
    nodules = []
    for x1, y1, x2, y2, score in decode_centernet(outputs["nodule_detector"], det.manifest):
        box = [min(max(x1 * fx, 0.0), image.full_cols), min(max(y1 * fy, 0.0), image.full_rows),
               min(max(x2 * fx, 0.0), image.full_cols), min(max(y2 * fy, 0.0), image.full_rows)]
        w, h = box[2] - box[0], box[3] - box[1]
        if w > 0 and h > 0:
            nodules.append(Nodule(box=[round(v, 2) for v in box], score=score,
                                  diameter_px=round((w + h) / 2.0, 2), model="nodule_detector"))
    return tb, nodules


def _dataset(unit: np.ndarray):
    """A MONOCHROME2 16-bit image whose display image is ``unit`` (full window)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.SOPInstanceUID = generate_uid()
    ds.Modality, ds.ViewPosition, ds.BodyPartExamined = "DX", "PA", "CHEST"
    ds.Rows, ds.Columns = unit.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.round(unit * 65535).astype(np.uint16).tobytes()
    return ds


def test_centernet_findings_are_decode_centernet():
    m = load_manifest(DEFAULT_MODELS_DIR / "nodule_detector")
    heat = np.zeros((1, 1, 128, 128), np.float32)
    heat[0, 0, 10, 20], heat[0, 0, 50, 60] = 0.9, 0.3
    size = np.full((1, 2, 128, 128), 8.0, np.float32)
    offset = np.full((1, 2, 128, 128), 0.5, np.float32)
    outputs = {"nodule_heatmap": heat, "nodule_size": size, "nodule_offset": offset}
    found = decode_findings(outputs, m)
    assert [f.box + (f.score,) for f in found] == [tuple(b) for b in decode_centernet(outputs, m)]


# ---------------------------------------------------------------- edge models check
def test_check_shipped_and_parity_models(capsys):
    for folder in (DEFAULT_MODELS_DIR / "tb_classifier", DEFAULT_MODELS_DIR / "nodule_detector",
                   PARITY / "yolov8", PARITY / "fasterrcnn", PARITY / "densenet"):
        out, err = io.StringIO(), io.StringIO()
        assert check_model_folder(folder, out, err, runs=1) == 0, err.getvalue()
        text = out.getvalue()
        assert "OK:" in text and "tensorrt 10: all" in text and "inference" in text
        assert "findings on the phantom" in text
    report = inspect_model_folder(DEFAULT_MODELS_DIR / "tb_classifier", runs=1)
    assert report.findings[0].label == "tb" and report.findings[0].space == "full"


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit(folder: Path, old: str, new: str) -> None:
    path = folder / "manifest.toml"
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))


def _refused(folder: Path) -> str:
    out, err = io.StringIO(), io.StringIO()
    assert check_model_folder(folder, out, err, runs=1) == 1
    lines = err.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("refused: "), err.getvalue()
    return lines[0]


def test_check_refuses_broken_folders_with_one_line(tmp_path):
    yolo = _copy(PARITY / "yolov8", tmp_path / "yolo_two_labels")
    text = (yolo / "manifest.toml").read_text()
    (yolo / "manifest.toml").write_text(text[: text.rindex("[[findings]]")])     # 2 labels, 3 classes
    line = _refused(yolo)
    assert "3 class(es)" in line and "2 label(s)" in line

    missing = _copy(PARITY / "yolov8", tmp_path / "missing_output")
    _edit(missing, 'predictions = "output0"', 'predictions = "output1"')
    assert "['output1'] are not outputs" in _refused(missing)

    layout = _copy(PARITY / "fasterrcnn", tmp_path / "wrong_decoding")
    _edit(layout, "batch = false", "batch = true")
    assert "input.batch" in _refused(layout)

    dense = _copy(PARITY / "densenet", tmp_path / "densenet_17")
    text = (dense / "manifest.toml").read_text()
    (dense / "manifest.toml").write_text(text[: text.rindex("[[findings]]")])
    assert "18 class(es)" in _refused(dense)

    wrong_size = _copy(PARITY / "densenet", tmp_path / "wrong_size")
    _edit(wrong_size, "height = 224", "height = 256")
    assert "input.height" in _refused(wrong_size)

    tampered = _copy(DEFAULT_MODELS_DIR / "tb_classifier", tmp_path / "tampered")
    (tampered / "model.onnx").write_bytes((tampered / "model.onnx").read_bytes() + b"\0")
    assert "sha256 mismatch" in _refused(tampered)

    bad_key = _copy(DEFAULT_MODELS_DIR / "nodule_detector", tmp_path / "bad_key")
    _edit(bad_key, "stride = 4", "stride = 0")
    assert "'output.stride'" in _refused(bad_key)

    shape = tmp_path / "yolo_as_classifier"
    constant_model(shape, [1, 1, 32, 32], {"scores": np.zeros((2, 3), np.float32)},
                   classifier_manifest("sigmoid", "[[findings]]\nlabel = \"a\"\n"))
    assert "[1, classes]" in _refused(shape)


def test_check_lists_operators_tensorrt_cannot_build(tmp_path):
    det = [helper.make_node("Det", ["mat"], ["d"]), helper.make_node("Mul", ["d", "zero"], ["dz"])]
    folder = constant_model(tmp_path / "det", [1, 1, 32, 32], {"scores": np.zeros((1, 1), np.float32)},
                            classifier_manifest("none", "[[findings]]\nlabel = \"tb\"\nrefer = true\n"),
                            extra_nodes=det,
                            extra_inits=[numpy_helper.from_array(np.eye(2, dtype=np.float32), "mat")])
    report = tensorrt_operator_report((folder / "model.onnx").read_bytes())
    assert report.unsupported == ["Det"] and "NOT buildable: Det" in report.text
    out, err = io.StringIO(), io.StringIO()
    assert check_model_folder(folder, out, err, runs=1) == 0     # still runs on onnxruntime
    assert "NOT buildable: Det" in out.getvalue()
    assert {"Conv", "Resize", "NonMaxSuppression", "RoiAlign"} <= TENSORRT_SUPPORTED
    assert "Det" not in TENSORRT_SUPPORTED


# ---------------------------------------------------------------- parity with the frameworks
def _unit(name: str) -> np.ndarray:
    return np.asarray(Image.open(PARITY / name), dtype=np.float32) / np.float32(255.0)


def _appliance(folder: Path, unit: np.ndarray, tensor: np.ndarray | None = None):
    m = load_manifest(folder)
    prepared = prepare_input(unit, m.input)
    with OnnxRuntimeRunner(read_verified_model(m), device="cpu") as runner:
        outputs = runner.run({m.input.name: prepared.tensor if tensor is None else tensor})
    return m, outputs, to_full_image(decode_findings(outputs, m), prepared.geometry)


def _same_detections(found, ref: dict, m, box_tol: float, score_tol: float) -> None:
    label_of = {f.index: f.label for f in m.findings}
    assert len(found) == len(ref["boxes"]) > 0
    for f, box, score, label in zip(found, ref["boxes"], ref["scores"], ref["labels"]):
        assert f.label == label_of[label]
        assert abs(f.score - score) <= score_tol, (f.score, score)
        assert np.abs(np.array(f.box) - np.array(box)).max() <= box_tol, (f.box, box)


def test_parity_ultralytics_yolov8():
    """Same image, same boxes/scores/classes as ``YOLO.predict`` (640-px image: the letterbox
    only pads, so both sides feed the network the same numbers)."""
    ref = json.loads((PARITY / "yolov8" / "reference.json").read_text())
    m, _, found = _appliance(PARITY / "yolov8", _unit("image.png"))
    _same_detections(found, ref, m, BOX_TOL_PX, SCORE_TOL)


def test_parity_ultralytics_yolov8_resized_image():
    """A 1000-px image: the letterbox resizes. (1) Our float bilinear letterbox equals
    Ultralytics' 8-bit OpenCV one to within its rounding (< 1/255, placement exact); (2) on
    Ultralytics' own tensor, our decoding and letterbox inversion give its boxes to 0.01 px."""
    ref = json.loads((PARITY / "yolov8" / "reference.json").read_text())["large"]
    m = load_manifest(PARITY / "yolov8")
    theirs = np.asarray(Image.open(PARITY / "yolov8" / "letterbox_large.png"), dtype=np.float32) / 255.0
    ours = prepare_input(_unit("image_large.png"), m.input)
    diff = np.abs(ours.tensor[0, 0] - theirs)
    assert diff.max() < 1.0 / 255 and diff.mean() < 0.35 / 255
    _, top, _, bottom = ours.geometry.content
    pad = np.float32(114 / 255)
    assert np.all(theirs[: int(top)] == pad) and np.all(theirs[int(bottom):] == pad)
    assert not np.all(theirs[int(top)] == pad) and not np.all(theirs[int(bottom) - 1] == pad)
    tensor = np.repeat(theirs[None, None], 3, axis=1).astype(np.float32)
    _, _, found = _appliance(PARITY / "yolov8", _unit("image_large.png"), tensor)
    _same_detections(found, ref, m, BOX_TOL_PX, SCORE_TOL)
    # end to end from the image: most detections agree (random weights amplify the 8-bit
    # rounding of Ultralytics' resize; a trained network does not)
    _, _, ours_found = _appliance(PARITY / "yolov8", _unit("image_large.png"))
    ref_boxes = np.array(ref["boxes"])
    matched = sum(1 for f in ours_found if box_iou(np.array(f.box), ref_boxes).max() >= 0.5)
    assert matched >= 0.75 * len(ref_boxes)


def test_parity_torchvision_fasterrcnn():
    """Same image, same boxes/scores/labels as the torchvision model called on the full image
    (its transform resizes inside; the manifest declares that size and bilinear stretch)."""
    ref = json.loads((PARITY / "fasterrcnn" / "reference.json").read_text())
    m, _, found = _appliance(PARITY / "fasterrcnn", _unit("image.png"))
    _same_detections(found, ref, m, BOX_TOL_PX, SCORE_TOL)


def test_parity_torchxrayvision_densenet():
    """Same probabilities as torchxrayvision's pipeline (normalize, XRayCenterCrop,
    XRayResizer(224, engine="cv2"), sigmoid), and the same class-activation maps."""
    ref = json.loads((PARITY / "densenet" / "reference.json").read_text())
    m, outputs, found = _appliance(PARITY / "densenet", _unit("image.png"))
    probs = class_probabilities(outputs["logits"], "sigmoid")
    assert np.abs(probs - np.array(ref["probabilities"])).max() <= PROB_TOL
    cam = np.array(ref["cam"])
    assert np.abs(outputs["cam"][0] - cam).max() <= 1e-4 * max(1.0, np.abs(cam).max())
    by_label = {f.label: f for f in found}
    assert [f.label for f in m.findings] == ref["labels"]
    for spec_, p in zip(m.findings, ref["probabilities"]):
        if not spec_.report:
            assert spec_.label not in by_label
            continue
        f = by_label[spec_.label]
        assert abs(f.score - p) <= PROB_TOL and f.positive == (p >= spec_.threshold)
        assert f.refer == (f.positive and spec_.refer)
        if f.positive:     # the region lies in the centre crop of the 640 x 594 image
            x1, y1, x2, y2 = f.box
            assert 23 - 1e-6 <= x1 < x2 <= 617 + 1e-6 and 0 <= y1 < y2 <= 594


def test_parity_fixtures_are_small():
    total = sum(p.stat().st_size for p in PARITY.rglob("*") if p.is_file())
    assert total < 15 * 1024 * 1024
    for name in ("yolov8", "fasterrcnn", "densenet"):
        assert (PARITY / name / "model.onnx").stat().st_size < 4 * 1024 * 1024


def test_engine_verify_add_ons_work_for_any_decoding():
    """``commands.reference_tensor`` and ``commands.compare_findings``: what ``edge engines
    verify`` needs to compare a TensorRT engine with ONNX Runtime for the new decodings."""
    from engines import commands

    for name in ("tb_classifier", "nodule_detector"):
        m = load_manifest(DEFAULT_MODELS_DIR / name)
        assert np.array_equal(commands.reference_tensor(m), commands.reference_input(m))
    m = load_manifest(PARITY / "yolov8")
    tensor = commands.reference_tensor(m)
    assert tensor.shape == m.input.shape
    with OnnxRuntimeRunner(read_verified_model(m), device="cpu") as runner:
        expected = runner.run({m.input.name: tensor})
    assert commands.compare_findings(m, expected, expected).agree
    shifted = {"output0": expected["output0"].copy()}
    shifted["output0"][:, 0] += 500.0                     # every box moves far away
    if decode_findings(expected, m):
        assert not commands.compare_findings(m, expected, shifted).agree
    dense = load_manifest(PARITY / "densenet")
    logits = np.full((1, 18), -3.0, np.float32)          # every label negative
    assert commands.compare_findings(dense, {"logits": logits}, {"logits": logits + 0.01}).agree
    assert not commands.compare_findings(dense, {"logits": logits}, {"logits": logits + 6}).agree


def test_models_command_wiring():
    import argparse

    from engines import commands

    parser = argparse.ArgumentParser(prog="edge models")
    commands.add_models_arguments(parser)
    args = parser.parse_args(["check", str(DEFAULT_MODELS_DIR / "tb_classifier"), "--runs", "1"])
    out, err = io.StringIO(), io.StringIO()
    assert commands.run_models(args, out, err) == 0 and "OK: tb_classifier" in out.getvalue()
