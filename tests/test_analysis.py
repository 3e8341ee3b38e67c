"""Analysis with real (tiny) ONNX models run by ONNX Runtime through engines.store.

The tiny models are built here with onnx.helper: a "TB classifier" whose heatmap is a
sigmoid of 8x8 block means, and a CenterNet "nodule detector" whose heatmap lights up on
bright 4x4 blocks, with a fixed box size. They make findings depend on image content, so
geometry and transfer-syntax consistency can be checked end to end.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000, JPEG2000Lossless, RLELossless

from edge.analysis import Analyzer, analyze_main, format_findings
from engines.findings import hot_region
from edge.imaging import MIN_SIDE_FRACTION
from edge.triage import TriageRules
from engines import DEFAULT_MODELS_DIR
from engines.store import LoadedModel, load_models
from test_imaging import make_dx, save

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

ROWS, COLS = 1030, 1100
BLOB = (700.0, 400.0)          # x, y of the main bright blob, full-resolution pixels
CORNER_BLOB = (1090.0, 15.0)   # a blob whose box must be clipped to the image
BOX_SIZE = 12.0                # detector box side, model-input pixels
DET_SIDE = 128


def _const(name: str, value: float) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(value, dtype=np.float32), name)


def _save_model(folder: Path, graph: onnx.GraphProto, manifest: str) -> None:
    folder.mkdir(parents=True)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    data = model.SerializeToString()
    (folder / "model.onnx").write_bytes(data)
    (folder / "manifest.toml").write_text(manifest.replace("SHA", hashlib.sha256(data).hexdigest()))


def write_tiny_models(root: Path) -> Path:
    """Two tiny models in ``root`` with manifests following the project's contract."""
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 1, 64, 64])
    nodes = [
        helper.make_node("AveragePool", ["image"], ["pool"], kernel_shape=[8, 8], strides=[8, 8]),
        helper.make_node("Mul", ["pool", "two"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["tb_heatmap"]),
        helper.make_node("ReduceMax", ["tb_heatmap"], ["tb_score"], axes=[2, 3], keepdims=0),
    ]
    graph = helper.make_graph(nodes, "tiny_tb", [image], [
        helper.make_tensor_value_info("tb_score", TensorProto.FLOAT, [1, 1]),
        helper.make_tensor_value_info("tb_heatmap", TensorProto.FLOAT, [1, 1, 8, 8])],
        initializer=[_const("two", 2.0)])
    _save_model(root / "tb_classifier", graph, """
[model]
name = "tb_classifier"
version = "0.0.1"
task = "classification"
file = "model.onnx"
sha256 = "SHA"
clinical_use = false
description = "tiny test model"
[input]
name = "image"
height = 64
width = 64
mean = 0.5
std = 0.25
[output]
score = "tb_score"
heatmap = "tb_heatmap"
threshold = 0.5
""")
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 1, DET_SIDE, DET_SIDE])
    nodes = [
        helper.make_node("AveragePool", ["image"], ["pool"], kernel_shape=[4, 4], strides=[4, 4]),
        helper.make_node("Sub", ["pool", "one"], ["centered"]),
        helper.make_node("Mul", ["centered", "two"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["nodule_heatmap"]),
        helper.make_node("Mul", ["pool", "zero"], ["zeros"]),
        helper.make_node("Add", ["zeros", "box"], ["side"]),
        helper.make_node("Concat", ["side", "side"], ["nodule_size"], axis=1),
        helper.make_node("Add", ["zeros", "half"], ["mid"]),
        helper.make_node("Concat", ["mid", "mid"], ["nodule_offset"], axis=1),
    ]
    cells = DET_SIDE // 4
    graph = helper.make_graph(nodes, "tiny_nodule", [image], [
        helper.make_tensor_value_info("nodule_heatmap", TensorProto.FLOAT, [1, 1, cells, cells]),
        helper.make_tensor_value_info("nodule_size", TensorProto.FLOAT, [1, 2, cells, cells]),
        helper.make_tensor_value_info("nodule_offset", TensorProto.FLOAT, [1, 2, cells, cells])],
        initializer=[_const("one", 1.0), _const("two", 2.0), _const("zero", 0.0),
                     _const("box", BOX_SIZE), _const("half", 0.5)])
    _save_model(root / "nodule_detector", graph, f"""
[model]
name = "nodule_detector"
version = "0.0.1"
task = "detection"
file = "model.onnx"
sha256 = "SHA"
[input]
name = "image"
height = {DET_SIDE}
width = {DET_SIDE}
mean = 0.5
std = 0.25
[output]
decoding = "centernet"
heatmap = "nodule_heatmap"
size = "nodule_size"
offset = "nodule_offset"
stride = 4
score_threshold = 0.3
nms_iou = 0.3
max_detections = 20
""")
    return root


def blob_pixels() -> np.ndarray:
    yy, xx = np.mgrid[0:ROWS, 0:COLS].astype(np.float32)
    img = np.full((ROWS, COLS), 400.0, dtype=np.float32)
    for (cx, cy), sigma in ((BLOB, 30.0), (CORNER_BLOB, 20.0)):
        img += 3400.0 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma ** 2))
    return np.clip(img, 0, 4095).astype(np.uint16)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, LoadedModel]:
    loaded = load_models(write_tiny_models(tmp_path_factory.mktemp("models")), "onnxruntime")
    yield loaded
    for model in loaded.values():
        model.close()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("analysis")
    src = save(make_dx(blob_pixels(), window=(2000.0, 4000.0), ImagerPixelSpacing=[0.2, 0.2]),
               tmp / "explicit.dcm")
    out = {"explicit": src}
    for name, syntax, kwargs in (("j2k", JPEG2000Lossless, {}), ("j2k_lossy", JPEG2000, {"j2k_cr": [20]}),
                                 ("rle", RLELossless, {})):
        ds = pydicom.dcmread(src)
        ds.compress(syntax, generate_instance_uid=False, **kwargs)
        ds.save_as(tmp / f"{name}.dcm", enforce_file_format=True)
        out[name] = tmp / f"{name}.dcm"
    if shutil.which("dcmcjpeg"):
        subprocess.run(["dcmcjpeg", "+e1", str(src), str(tmp / "sv1.dcm")], check=True, timeout=60)
        out["jpeg_sv1"] = tmp / "sv1.dcm"
    return out


def _near(box: list[float], x: float, y: float, tolerance: float) -> bool:
    return abs((box[0] + box[2]) / 2 - x) <= tolerance and abs((box[1] + box[3]) / 2 - y) <= tolerance


def _check_geometry(findings, tolerance: float) -> None:
    assert findings.eligible and (findings.rows, findings.columns) == (ROWS, COLS)
    for n in findings.nodules:
        x1, y1, x2, y2 = n.box
        assert 0 <= x1 < x2 <= COLS and 0 <= y1 < y2 <= ROWS
    main = [n for n in findings.nodules if _near(n.box, *BLOB, tolerance)]
    corner = [n for n in findings.nodules if n.box[2] == COLS and n.box[1] == 0.0]
    assert len(main) == 1 and len(corner) == 1 and len(findings.nodules) == 2
    full_side = BOX_SIZE * COLS / DET_SIDE
    assert main[0].box[2] - main[0].box[0] == pytest.approx(full_side, abs=0.02)
    assert main[0].diameter_px == pytest.approx(BOX_SIZE * (COLS + ROWS) / DET_SIDE / 2, abs=0.02)
    assert main[0].diameter_mm == pytest.approx(main[0].diameter_px * 0.2, abs=0.01)


def test_boxes_land_in_full_resolution_whatever_the_decode_resolution(models, files) -> None:
    cell = 4 * COLS / DET_SIDE   # one heatmap cell in full-resolution pixels
    results = []
    for path in (files["explicit"], files["j2k"]):
        for min_side in (None, 300, 2048):
            analyzer = Analyzer(models, decode_min_side=min_side)
            prepared = analyzer.prepare(path)
            expected_side = analyzer.decode_min_side
            assert min(prepared.image.unit_image.shape) >= min(MIN_SIDE_FRACTION * expected_side, ROWS)
            findings = analyzer.infer(prepared)
            _check_geometry(findings, tolerance=cell)
            results.append(findings)
    assert Analyzer(models).decode_min_side == DET_SIDE
    j2k_small = Analyzer(models).prepare(files["j2k"]).image
    assert j2k_small.reduction == 3 and j2k_small.scale_x == COLS / j2k_small.unit_image.shape[1]
    # the steep tiny detector amplifies resampling differences; the edge blob most of all
    first = results[0]
    for other in results[1:]:
        assert abs(other.tb.score - first.tb.score) < 0.05
        for a, b in zip(first.nodules, other.nodules):
            assert np.allclose(a.box, b.box, atol=cell)
            if _near(a.box, *BLOB, cell):
                assert abs(a.score - b.score) < 0.1


def test_jpeg_lossless_sv1_is_covered(files) -> None:
    """JPEG Lossless SV1 is what many CR/DX modalities send; its copy is made with DCMTK."""
    if "jpeg_sv1" not in files:
        pytest.skip("dcmcjpeg (DCMTK) is not installed: no JPEG Lossless SV1 copy to test")
    ds = pydicom.dcmread(files["jpeg_sv1"], stop_before_pixels=True)
    assert str(ds.file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2.4.70"


def test_same_findings_in_every_transfer_syntax(models, files) -> None:
    analyzer = Analyzer(models)
    reference = analyzer.analyze(files["explicit"])
    for name, path in files.items():
        findings = analyzer.analyze(path)
        _check_geometry(findings, tolerance=4 * COLS / DET_SIDE)
        assert findings.sop_instance_uid == reference.sop_instance_uid
        if name in ("rle", "jpeg_sv1"):     # lossless, decoded fully and block-averaged: identical
            assert findings.tb == reference.tb and findings.nodules == reference.nodules, name
        # J2K is read from its wavelet low-pass image (sharper than a block mean): close, not equal
        assert abs(findings.tb.score - reference.tb.score) < 0.02, name
        for a, b in zip(reference.nodules, findings.nodules):
            assert np.allclose(a.box, b.box, atol=1.0) and abs(a.score - b.score) < 0.05, name
        assert set(findings.timings_ms) >= {"decode", "preprocess", "tb", "nodule", "total"}
        assert findings.timings_ms["total"] >= findings.timings_ms["decode"] + findings.timings_ms["tb"]
        assert [m.name for m in findings.models] == ["nodule_detector", "tb_classifier"]
        assert all(m.backend == "onnxruntime" for m in findings.models)


class CountingModel(LoadedModel):
    """A real loaded model that counts its runs."""

    runs = 0

    def run(self, tensor: np.ndarray) -> dict[str, np.ndarray]:
        type(self).runs += 1
        return super().run(tensor)


def test_ineligible_instance_runs_no_model(models, tmp_path) -> None:
    counting = {name: CountingModel(manifest=m.manifest, runner=m.runner) for name, m in models.items()}
    analyzer = Analyzer(counting)
    lateral = save(make_dx(blob_pixels(), ViewPosition="LL"), tmp_path / "lateral.dcm")
    findings = analyzer.analyze(lateral)
    assert not findings.eligible and findings.reason == "lateral view"
    assert findings.tb is None and findings.nodules == [] and findings.models == []
    assert "tb" not in findings.timings_ms and CountingModel.runs == 0
    child = make_dx(blob_pixels(), PatientAge="009Y")
    assert analyzer.analyze(child).reason == "patient under 15 years: outside intended use"
    assert CountingModel.runs == 0
    assert analyzer.analyze(make_dx(blob_pixels())).eligible and CountingModel.runs == 2
    relaxed = Analyzer(counting, triage_rules=TriageRules(min_age_years=0))
    assert relaxed.analyze(child).eligible


def test_tb_threshold_override_and_region(models, files) -> None:
    default = Analyzer(models).analyze(files["explicit"])
    assert default.tb.threshold == 0.5 and default.tb.positive == (default.tb.score >= 0.5)
    low = Analyzer(models, tb_threshold=0.0).analyze(files["explicit"])
    assert low.tb.positive and low.tb.threshold == 0.0 and low.tb.score == pytest.approx(default.tb.score)
    x1, y1, x2, y2 = low.tb.region
    assert x1 <= BLOB[0] <= x2 and y1 <= BLOB[1] <= y2 and 0 <= x1 and x2 <= COLS and y2 <= ROWS
    high = Analyzer(models, tb_threshold=1.0).analyze(files["explicit"])
    assert not high.tb.positive and high.tb.region is None
    with pytest.raises(ValueError, match="tb_threshold"):
        Analyzer(models, tb_threshold=1.5)
    # A second TB classifier is reported as another finding, never replaces the first.
    two = Analyzer({"a": models["tb_classifier"], "b": models["tb_classifier"]})
    both = two.analyze(files["explicit"])
    (other,) = both.others
    assert both.tb.score == other.score and other.kind == "classification"
    assert set(both.timings_ms) >= {"tb", "b"}


def test_hot_region_is_the_connected_area_around_the_peak() -> None:
    heat = np.zeros((1, 1, 8, 8), dtype=np.float32)
    heat[0, 0, 2:4, 5:7] = [[0.9, 0.6], [0.5, 0.2]]
    heat[0, 0, 6, 0] = 0.8                      # hot but not connected to the peak
    assert hot_region(heat, 800, 1600) == (1000.0, 200.0, 1400.0, 400.0)
    assert hot_region(np.zeros((1, 1, 4, 4)), 100, 100) is None


def test_concurrent_analysis_gives_identical_findings(models, files) -> None:
    analyzer = Analyzer(models)
    reference = analyzer.analyze(files["j2k"])
    results: list = []

    def work() -> None:
        for _ in range(3):
            results.append(analyzer.analyze(files["j2k"]))

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 9
    assert all(r.tb == reference.tb and r.nodules == reference.nodules for r in results)


def test_analyze_main_prints_json_text_and_clear_errors(models, files, tmp_path, capsys) -> None:
    models_dir = write_tiny_models(tmp_path / "models")
    rules = TriageRules()
    assert analyze_main(str(files["j2k"]), as_json=True, models_dir=models_dir, backend="onnxruntime",
                        tb_threshold=None, triage_rules=rules) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["eligible"] is True and data["reason"] is None
    assert set(data["tb"]) >= {"score", "threshold", "positive"} and len(data["nodules"]) == 2
    assert set(data["nodules"][0]) >= {"box", "score", "diameter_mm"}
    assert {m["name"] for m in data["models"]} == {"tb_classifier", "nodule_detector"}
    assert analyze_main(str(files["explicit"]), as_json=False, models_dir=models_dir, backend="onnxruntime",
                        tb_threshold=0.0, triage_rules=rules) == 0
    text = capsys.readouterr().out
    assert "POSITIVE" in text and "nodules: 2" in text and "not for clinical use" in text
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\x00" * 300)
    assert analyze_main(str(junk), as_json=True, models_dir=models_dir, backend="onnxruntime",
                        tb_threshold=None, triage_rules=rules) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "junk.dcm" in err and "\n" not in err
    assert analyze_main(str(junk), as_json=True, models_dir=tmp_path / "nowhere", backend="onnxruntime",
                        tb_threshold=None, triage_rules=rules) == 1
    assert "cannot load the models" in capsys.readouterr().err


def _shipped_models_present() -> bool:
    return all((DEFAULT_MODELS_DIR / name / "manifest.toml").is_file()
               for name in ("tb_classifier", "nodule_detector"))


@pytest.mark.skipif(not _shipped_models_present(), reason="trained models not yet in engines/models")
def test_shipped_models_on_a_phantom_in_two_transfer_syntaxes(tmp_path) -> None:
    phantom = pytest.importorskip("engines.train.phantom")
    pytest.importorskip("engines.train.phantom_dicom")
    case = phantom.generate_case(3, size=2048, tb=True, nodules=True)
    paths = []
    for syntax in ("1.2.840.10008.1.2.1", JPEG2000Lossless):
        paths.append(tmp_path / f"phantom_{syntax}.dcm")
        phantom.write_dicom(case, paths[-1], transfer_syntax=syntax)
    loaded = load_models(DEFAULT_MODELS_DIR, "onnxruntime")
    try:
        analyzer = Analyzer(loaded)
        plain, j2k = (analyzer.analyze(path) for path in paths)
    finally:
        for model in loaded.values():
            model.close()
    rows, cols = case.pixels.shape
    for findings in (plain, j2k):
        assert findings.eligible and (findings.rows, findings.columns) == (rows, cols)
        assert 0.0 <= findings.tb.score <= 1.0
        for n in findings.nodules:
            assert 0 <= n.box[0] < n.box[2] <= cols and 0 <= n.box[1] < n.box[3] <= rows
            assert n.diameter_mm is not None and n.diameter_mm > 0
        assert format_findings(findings).startswith("image ")
    assert abs(plain.tb.score - j2k.tb.score) < 0.05
    confident = [n for n in plain.nodules if n.score > 0.5]
    for n in confident:   # a confident detection is found again in the J2K copy, in the same place
        assert any(np.allclose(n.box, m.box, atol=16) for m in j2k.nodules), n


def test_format_findings_lists_other_findings_and_refer_reasons() -> None:
    """One line per other finding (detections with box and size), then what raises refer."""
    from dataclasses import replace

    from edge.findings import Findings, ModelInfo, Nodule, Other, TBResult

    others = [
        Other(label="mass", display="Mass", kind="detection", score=0.812, threshold=0.4, positive=True,
              refer=True, box=[120.4, 60.0, 176.0, 118.2], diameter_mm=23.44, diameter_px=57.0),
        Other(label="effusion", display="Pleural effusion", kind="classification", score=0.12,
              threshold=0.5, positive=False),
        Other(label="consolidation", display="Consolidation", kind="classification", score=0.66,
              threshold=0.5, positive=True, box=[10.0, 20.0, 30.0, 40.0]),
        Other(label="mass", display="Mass", kind="detection", score=0.45, threshold=0.4, positive=True,
              refer=True, box=[1.0, 2.0, 21.0, 22.0], diameter_px=20.0),
    ]
    findings = Findings(sop_instance_uid="2.25.7", eligible=True, rows=2000, columns=2000,
                        tb=TBResult(score=0.2, threshold=0.5, positive=False),
                        nodules=[Nodule(box=[5.0, 5.0, 25.0, 25.0], score=0.7, diameter_px=20.0)],
                        others=others, models=[ModelInfo("cxr", "1.0", "onnxruntime", clinical_use=True)])
    lines = format_findings(findings).splitlines()
    start = lines.index("other findings: 3 positive of 4")
    assert lines[start + 1:start + 6] == [
        "  1. Mass (detection): score 0.812 at threshold 0.400: POSITIVE, refer, box (120, 60)-(176, 118),"
        " diameter 23.4 mm",
        "  2. Pleural effusion (classification): score 0.120 at threshold 0.500: negative",
        "  3. Consolidation (classification): score 0.660 at threshold 0.500: POSITIVE, box (10, 20)-(30, 40)",
        "  4. Mass (detection): score 0.450 at threshold 0.400: POSITIVE, refer, box (1, 2)-(21, 22), diameter 20 px",
        "refer: Mass",
    ]
    assert lines.index("nodules: 1") < start
    assert "TB: score 0.200 at threshold 0.500: negative" in lines

    tb_too = replace(findings, tb=TBResult(score=0.9, threshold=0.5, positive=True))
    assert "refer: Tuberculosis, Mass" in format_findings(tb_too).splitlines()
    quiet = replace(findings, tb=TBResult(score=0.1, threshold=0.5, positive=False),
                                others=[others[1]])
    text = format_findings(quiet)
    assert "other findings: 0 positive of 1" in text and "refer: no" in text.splitlines()
    assert "other findings" not in format_findings(replace(findings, others=[]))
