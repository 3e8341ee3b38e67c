"""The shipped demonstration models: integrity, tensor contract, and that they actually work.

The behaviour checks use small fixed phantom sets (seeds outside the training range) and
thresholds a randomly initialised network cannot meet: TB scores must separate TB from
clean phantoms, and the detector's boxes must land on the true nodules >= 8 mm while
staying quiet on clean images.
"""
from __future__ import annotations

import hashlib

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
NODULE_SEEDS = list(range(52_000, 52_010))      # forced nodules, no TB
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
    """Masses and large nodules are found at the manifest threshold with few false marks.

    The held-out figures by size are in the model card: masses > 30 mm are nearly all
    found, many 8-20 mm nodules are still missed, so the bar is set per size. A randomly
    initialised network finds almost none of them at <= 1 false mark per image."""
    model = models["nodule_detector"]
    # (group, which lesions count in it, at least this many in the set, share to be found)
    groups = [("> 30 mm", lambda mm: mm > 30.0, 2, 1.0),
              (">= 20 mm", lambda mm: mm >= 20.0, 6, 0.8),
              (">= 8 mm", lambda mm: mm >= 8.0, 20, 0.4)]
    found: dict[str, list[bool]] = {name: [] for name, *_ in groups}
    false_pos = 0
    for seed in NODULE_SEEDS:
        case = phantom.generate_case(seed, size=SIZE, nodules=True, tb=False)
        dets = _detections_full_res(model, case)
        margin = 0.01 * min(case.pixels.shape)   # ~10 px: boxes are tight around the lesion
        for nodule in case.nodules:
            hit = any(_centre_inside(d, nodule["box"], margin) for d in dets)
            for name, member, _, _ in groups:
                if member(nodule["diameter_mm"]):
                    found[name].append(hit)
        false_pos += sum(not any(_centre_inside(d, n["box"], margin) for n in case.nodules) for d in dets)
    for name, _, count, share in groups:
        assert len(found[name]) >= count, f"only {len(found[name])} lesions {name} in the set"
        assert np.mean(found[name]) >= share, (name, found[name])
    assert false_pos <= len(NODULE_SEEDS), f"{false_pos} false positives on {len(NODULE_SEEDS)} images"


def test_detector_quiet_on_clean_images(models):
    model = models["nodule_detector"]
    counts = []
    for seed in CLEAN_SEEDS:
        case = phantom.generate_case(seed, size=SIZE, nodules=False, tb=False)
        counts.append(len(_detections_full_res(model, case)))
    assert sum(counts) <= len(CLEAN_SEEDS), counts      # at most one per image on average


# --------------------------------------------------------------- training targets and metrics

def test_centernet_targets_decode_back_to_the_same_boxes():
    """Training targets fed to the appliance's decoder give the boxes back (same convention)."""
    pytest.importorskip("torch", reason="the training code needs the 'train' extra (PyTorch)")
    from engines.manifest import parse_manifest
    from engines.train.data import centernet_targets
    from engines.train.export import MANIFESTS

    data = {section: dict(values) for section, values in MANIFESTS["nodule_detector"].items()}
    data["model"]["sha256"] = "0" * 64          # not checked here: no file is loaded
    manifest = parse_manifest(data, MODELS / "nodule_detector")
    size = manifest.input.height
    boxes = np.array([[100.3, 200.7, 120.9, 219.1], [300.0, 50.5, 340.0, 92.5], [10.2, 400.0, 18.6, 408.4]],
                     np.float32)
    t = centernet_targets(boxes, size, size, manifest.output.stride)
    outputs = {manifest.output.heatmap: t["heatmap"][None], manifest.output.size: t["size"][None],
               manifest.output.offset: t["offset"][None]}
    decoded = sorted(decode_centernet(outputs, manifest), key=lambda d: d[0])
    assert len(decoded) == len(boxes)
    for det, box in zip(decoded, sorted(boxes.tolist())):
        np.testing.assert_allclose(det[:4], box, atol=1e-3)


def test_augment_maps_boxes_with_the_pixels():
    """A bright square drawn in a case stays under its transformed box after augmentation."""
    from engines.train.data import RenderedCase, augment

    image = np.full((600, 640), 0.2, np.float16)
    image[300:340, 400:440] = 0.9
    box = np.array([[400, 300, 440, 340]], np.float32)
    case = RenderedCase(image=image, tb=False, tb_boxes=np.zeros((0, 4), np.float32),
                        nodule_boxes=box, nodule_mm=np.array([12.0], np.float32))
    rng = np.random.default_rng(5)
    for kwargs in ({}, {"patch": 256, "focus": 1.0}):
        for _ in range(5):
            sample = augment(case, 512, 512, rng, noise=0.0, intensity=0.0, **kwargs)
            x1, y1, x2, y2 = sample.nodule_boxes[0]
            unit = sample.tensor[0] * 0.25 + 0.5
            inner = unit[int(y1) + 2:int(y2) - 2, int(x1) + 2:int(x2) - 2]
            assert inner.size and inner.mean() > 0.85
            assert unit.mean() < 0.5


def test_roc_auc_and_sensitivity_at_specificity():
    from benchmarks.model_eval import roc_auc, sensitivity_at_specificity

    pos, neg = [0.9, 0.8, 0.3], [0.1, 0.2, 0.85, 0.5]
    assert roc_auc(pos, neg) == pytest.approx(9 / 12)            # 9 of 12 pairs ordered
    sens, threshold = sensitivity_at_specificity(pos, neg, 0.75)  # 3 of 4 negatives <= 0.5
    assert threshold == 0.5 and sens == pytest.approx(2 / 3)
    assert roc_auc([1.0], [1.0]) == 0.5


def test_froc_counts_hits_duplicates_and_sizes():
    from benchmarks.model_eval import froc

    truth = np.array([[0, 0, 10, 10], [50, 50, 70, 70]], np.float64)
    per_image = [
        # hit small nodule (0.9), duplicate on it (0.8, a false positive), miss large
        ([(1, 1, 9, 9, 0.9), (2, 2, 8, 8, 0.8)], truth, [5.0, 12.0]),
        # clean image with one false positive at 0.7, and one at 0.2
        ([(100, 100, 110, 110, 0.7), (0, 0, 5, 5, 0.2)], np.zeros((0, 4)), []),
        # large nodule found at 0.6
        ([(55, 55, 65, 65, 0.6)], truth[1:], [20.0]),
    ]
    result = froc(per_image, fp_rates=(0.5, 0.7))
    assert result["counts"] == {"all": 3, "small": 1, "ge8": 2, "medium": 2, "large": 0, "images": 3}
    # <= 1.5 FP allowed: threshold 0.8 (1 FP) -> small found only
    assert result["small"]["0.5"] == 1.0 and result["ge8"]["0.5"] == 0.0
    # <= 2.1 FP allowed: down to 0.6 (2 FP) -> 2 of 3 found; 0.2 would be the 3rd FP
    assert result["all"]["0.7"] == pytest.approx(2 / 3) and result["thresholds"]["0.7"] == 0.6
    assert result["ge8"]["0.7"] == 0.5 and result["medium"]["0.7"] == 0.5
    assert result["large"]["0.7"] != result["large"]["0.7"]      # no mass: nan


def test_size_groups_and_operating_point_by_size():
    from benchmarks.model_eval import operating_point, size_groups

    assert size_groups(5.0) == ("small",)
    assert size_groups(8.0) == ("ge8", "medium") and size_groups(30.0) == ("ge8", "medium")
    assert size_groups(30.5) == ("ge8", "large")
    truth = np.array([[0, 0, 10, 10], [50, 50, 100, 100]], np.float64)
    per_image = [([(1, 1, 9, 9, 0.9), (60, 60, 90, 90, 0.4), (200, 200, 210, 210, 0.5)], truth, [6.0, 45.0])]
    op = operating_point(per_image, 0.45)
    assert op["by_size"]["small"] == 1.0 and op["by_size"]["large"] == 0.0
    assert op["fp_per_image"] == 1.0 and op["lesions"]["ge8"] == 1
    assert operating_point(per_image, 0.3)["by_size"]["large"] == 1.0
