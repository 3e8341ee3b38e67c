"""The shipped demonstration models: integrity, tensor contract, and that they actually work.

The behaviour checks use small fixed phantom sets (seeds outside the training range) and
thresholds a randomly initialised network cannot meet: TB scores must separate TB from
clean phantoms, and the detector's boxes must land on the true nodules >= 8 mm while
staying quiet on clean images.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import engines
from engines.decode import decode_centernet
from engines.manifest import load_manifest
from engines.preprocess import to_model_input
from engines.store import load_models
from engines.train import phantom
from engines.train.data import TRAIN_SEED_BASE, TRAIN_SEED_SPAN

MODELS = engines.DEFAULT_MODELS_DIR
TB_SEEDS = list(range(51_000, 51_008))          # 4 forced TB, 4 forced clean
NODULE_SEEDS = list(range(52_000, 52_008))      # forced nodules, no TB
CLEAN_SEEDS = list(range(53_000, 53_006))       # no nodules, no TB
SIZE = 1024


def test_fixture_seeds_are_not_training_seeds():
    for seed in TB_SEEDS + NODULE_SEEDS + CLEAN_SEEDS:
        assert not TRAIN_SEED_BASE <= seed < TRAIN_SEED_BASE + TRAIN_SEED_SPAN


@pytest.mark.parametrize("name", ["tb_classifier", "nodule_detector"])
def test_files_and_sha256(name):
    folder = MODELS / name
    for file in ("model.onnx", "manifest.toml", "MODEL_CARD.md"):
        assert (folder / file).is_file(), f"{folder / file} missing"
    manifest = load_manifest(folder)
    assert manifest.name == name
    assert manifest.clinical_use is False
    assert hashlib.sha256((folder / "model.onnx").read_bytes()).hexdigest() == manifest.sha256
    card = (folder / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert "not for clinical use" in card.lower()
    assert "python -m benchmarks.model_eval" in card and "python -m engines.train.train" in card


def _session(name: str) -> ort.InferenceSession:
    return ort.InferenceSession(str(MODELS / name / "model.onnx"), providers=["CPUExecutionProvider"])


def test_tb_tensor_contract():
    manifest = load_manifest(MODELS / "tb_classifier")
    session = _session("tb_classifier")
    (inp,) = session.get_inputs()
    assert inp.name == manifest.input.name
    assert list(inp.shape) == [1, 1, manifest.input.height, manifest.input.width]
    assert inp.type == "tensor(float)"
    rng = np.random.default_rng(3)
    tensor = rng.normal(0, 1, inp.shape).astype(np.float32)
    out = dict(zip([o.name for o in session.get_outputs()], session.run(None, {inp.name: tensor})))
    assert set(out) == {manifest.output.score, manifest.output.heatmap}
    score, heat = out[manifest.output.score], out[manifest.output.heatmap]
    assert score.shape == (1, 1)
    assert heat.ndim == 4 and heat.shape[:2] == (1, 1)
    assert 0.0 <= score.min() and score.max() <= 1.0
    assert 0.0 <= heat.min() and heat.max() <= 1.0


def test_detector_tensor_contract():
    manifest = load_manifest(MODELS / "nodule_detector")
    spec = manifest.output
    session = _session("nodule_detector")
    (inp,) = session.get_inputs()
    assert inp.name == manifest.input.name
    assert list(inp.shape) == [1, 1, manifest.input.height, manifest.input.width]
    grid = [manifest.input.height // spec.stride, manifest.input.width // spec.stride]
    shapes = {o.name: list(o.shape) for o in session.get_outputs()}
    assert shapes == {spec.heatmap: [1, 1, *grid], spec.size: [1, 2, *grid], spec.offset: [1, 2, *grid]}
    tensor = np.random.default_rng(4).normal(0, 1, inp.shape).astype(np.float32)
    out = dict(zip(shapes, session.run(list(shapes), {inp.name: tensor})))
    for name in (spec.heatmap, spec.offset):
        assert 0.0 <= out[name].min() and out[name].max() <= 1.0


@pytest.fixture(scope="module")
def models():
    loaded = load_models(MODELS, backend="onnxruntime")
    assert set(loaded) >= {"tb_classifier", "nodule_detector"}
    return loaded


def _run(model, unit: np.ndarray) -> dict[str, np.ndarray]:
    inp = model.manifest.input
    return model.run(to_model_input(unit, inp.height, inp.width, inp.mean, inp.std))


def test_tb_scores_separate_tb_from_clean(models):
    model = models["tb_classifier"]
    pos, neg = [], []
    for i, seed in enumerate(TB_SEEDS):
        case = phantom.generate_case(seed, size=SIZE, tb=i % 2 == 0, nodules=False)
        score = float(_run(model, phantom.unit_image(case))[model.manifest.output.score][0, 0])
        (pos if case.tb else neg).append(score)
    assert len(pos) == len(neg) == 4
    pairs_ordered = sum(p > n for p in pos for n in neg)
    assert np.mean(pos) - np.mean(neg) > 0.3, (pos, neg)
    assert pairs_ordered >= 14, (pos, neg)       # AUC >= 0.875 on 16 pairs


def _detections_full_res(model, case) -> list[tuple[float, float, float, float, float]]:
    inp = model.manifest.input
    rows, cols = case.pixels.shape
    dets = decode_centernet(_run(model, phantom.unit_image(case)), model.manifest)
    sx, sy = cols / inp.width, rows / inp.height
    return [(d[0] * sx, d[1] * sy, d[2] * sx, d[3] * sy, d[4]) for d in dets]


def _centre_inside(det, box, margin: float) -> bool:
    cx, cy = (det[0] + det[2]) / 2, (det[1] + det[3]) / 2
    return (box[0] - margin <= cx <= box[2] + margin) and (box[1] - margin <= cy <= box[3] + margin)


def test_detector_finds_large_nodules(models):
    model = models["nodule_detector"]
    found, total, false_pos = 0, 0, 0
    for seed in NODULE_SEEDS:
        case = phantom.generate_case(seed, size=SIZE, nodules=True, tb=False)
        dets = _detections_full_res(model, case)
        margin = 0.01 * min(case.pixels.shape)   # ~10 px: boxes are tight around the sphere
        for nodule in case.nodules:
            if nodule["diameter_mm"] < 8.0:
                continue
            total += 1
            found += any(_centre_inside(d, nodule["box"], margin) for d in dets)
        false_pos += sum(not any(_centre_inside(d, n["box"], margin) for n in case.nodules) for d in dets)
    assert total >= 4
    assert found / total >= 0.75, f"found {found} of {total} nodules >= 8 mm"
    assert false_pos <= len(NODULE_SEEDS), f"{false_pos} false positives on {len(NODULE_SEEDS)} images"


def test_detector_quiet_on_clean_images(models):
    model = models["nodule_detector"]
    counts = []
    for seed in CLEAN_SEEDS:
        case = phantom.generate_case(seed, size=SIZE, nodules=False, tb=False)
        counts.append(len(_detections_full_res(model, case)))
    assert sum(counts) <= len(CLEAN_SEEDS) // 2, counts
