"""Evaluate the shipped models on held-out full-resolution DICOM phantoms.

    python -m benchmarks.model_eval --count 150 --seed 424242 [--json PATH] [--update-cards]

Generates ``count`` phantoms (seeds ``seed .. seed+count-1``, disjoint from the training
seeds) at 2000-3000 px with ``engines.train.phantom``, writes them as DICOM files in a
temporary folder, reads them back like the appliance (pixels, modality LUT, DICOM window,
MONOCHROME1 inversion, area resize, ``to_model_input``), runs the ONNX models with ONNX
Runtime and prints the figures quoted in the model cards:

- TB: ROC AUC, sensitivity at 70% specificity (WHO target product profile: 90% sensitivity
  at 70% specificity), and sensitivity/specificity at the manifest threshold.
- Nodules: sensitivity at 0.5, 1 and 2 false positives per image, overall and by size
  (< 8 mm, >= 8 mm). A detection hits a true nodule when its centre lies inside the true
  box or their IoU >= 0.3; further detections on an already found nodule count as false
  positives.
"""
from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from engines.preprocess import to_model_input

logger = logging.getLogger(__name__)

FP_RATES = (0.5, 1.0, 2.0)
FROC_MIN_SCORE = 0.02   # lowest detection score kept for the FROC sweep
SMALL_MM = 8.0
Detection = tuple[float, float, float, float, float]


# ----------------------------------------------------------------------------- metrics

def roc_auc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """Area under the ROC curve (Mann-Whitney U with ties counted half)."""
    pos = np.asarray(positive, np.float64)
    neg = np.asarray(negative, np.float64)
    if pos.size == 0 or neg.size == 0:
        raise ValueError("roc_auc: need at least one positive and one negative score")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (pos.size * neg.size))


def sensitivity_at_specificity(positive: Sequence[float], negative: Sequence[float],
                               specificity: float) -> tuple[float, float]:
    """Sensitivity at the lowest threshold whose specificity is >= ``specificity``.

    A case is called positive when its score is strictly above the threshold. Returns
    ``(sensitivity, threshold)``.
    """
    pos = np.asarray(positive, np.float64)
    neg = np.sort(np.asarray(negative, np.float64))
    if pos.size == 0 or neg.size == 0:
        raise ValueError("sensitivity_at_specificity: need positive and negative scores")
    k = int(np.ceil(specificity * neg.size)) - 1      # at least k+1 negatives <= threshold
    threshold = float(neg[min(max(k, 0), neg.size - 1)])
    return float(np.mean(pos > threshold)), threshold


def _hits(det: Detection, boxes: np.ndarray) -> np.ndarray:
    """Which true boxes a detection hits (centre inside, or IoU >= 0.3)."""
    if len(boxes) == 0:
        return np.zeros(0, bool)
    x1, y1, x2, y2 = det[:4]
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    inside = (boxes[:, 0] <= cx) & (cx <= boxes[:, 2]) & (boxes[:, 1] <= cy) & (cy <= boxes[:, 3])
    ix = np.clip(np.minimum(x2, boxes[:, 2]) - np.maximum(x1, boxes[:, 0]), 0, None)
    iy = np.clip(np.minimum(y2, boxes[:, 3]) - np.maximum(y1, boxes[:, 1]), 0, None)
    inter = ix * iy
    union = (x2 - x1) * (y2 - y1) + (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1e-9), 0.0)
    return inside | (iou >= 0.3)


def froc(per_image: Sequence[tuple[Sequence[Detection], np.ndarray, Sequence[float]]],
         fp_rates: Sequence[float] = FP_RATES) -> dict[str, Any]:
    """Sensitivity at given false positives per image, overall and by nodule size.

    ``per_image``: (detections with scores, true boxes [M, 4], true diameters in mm).
    Detections are matched greedily in score order within each image. Returns
    ``{"all"|"small"|"large": {"0.5": sens, ...}, "counts": {...}, "thresholds": {...}}``.
    """
    events = []      # (score, is_tp, group of the nodule found or None)
    counts = {"all": 0, "small": 0, "large": 0}
    for dets, boxes, sizes in per_image:
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        found = np.zeros(len(boxes), bool)
        for mm in sizes:
            counts["all"] += 1
            counts["small" if mm < SMALL_MM else "large"] += 1
        for det in sorted(dets, key=lambda d: -d[4]):
            hit = _hits(det, boxes) & ~found
            if hit.any():
                j = int(np.argmax(hit))
                found[j] = True
                events.append((det[4], True, "small" if sizes[j] < SMALL_MM else "large"))
            else:
                events.append((det[4], False, None))
    n_images = max(1, len(per_image))
    events.sort(key=lambda e: -e[0])
    result: dict[str, Any] = {g: {} for g in counts}
    result["counts"] = dict(counts, images=len(per_image))
    result["thresholds"] = {}
    for rate in fp_rates:
        tp = {"all": 0, "small": 0, "large": 0}
        fp = 0
        best = dict(tp)
        threshold = 1.0
        i = 0
        while i < len(events):
            score = events[i][0]
            step_fp, step_tp = 0, dict.fromkeys(tp, 0)
            while i < len(events) and events[i][0] == score:   # ties enter together
                if events[i][1]:
                    step_tp["all"] += 1
                    step_tp[events[i][2]] += 1
                else:
                    step_fp += 1
                i += 1
            if (fp + step_fp) / n_images > rate:
                break
            fp += step_fp
            tp = {g: tp[g] + step_tp[g] for g in tp}
            best, threshold = dict(tp), score
        key = f"{rate:g}"
        for g in counts:
            result[g][key] = best[g] / counts[g] if counts[g] else float("nan")
        result["thresholds"][key] = threshold
    return result


def operating_point(per_image: Sequence[tuple[Sequence[Detection], np.ndarray, Sequence[float]]],
                    threshold: float) -> dict[str, float]:
    """Sensitivity and false positives per image when keeping detections >= ``threshold``."""
    found_total, nodules, fps = 0, 0, 0
    for dets, boxes, _ in per_image:
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        found = np.zeros(len(boxes), bool)
        nodules += len(boxes)
        for det in sorted((d for d in dets if d[4] >= threshold), key=lambda d: -d[4]):
            hit = _hits(det, boxes) & ~found
            if hit.any():
                found[int(np.argmax(hit))] = True
            else:
                fps += 1
        found_total += int(found.sum())
    return {"threshold": threshold, "sensitivity": found_total / nodules if nodules else float("nan"),
            "fp_per_image": fps / max(1, len(per_image))}


# ----------------------------------------------------------------------------- decoding

def decode_detections(outputs: dict[str, np.ndarray], *, stride: int, score_threshold: float,
                      nms_iou: float, max_detections: int) -> list[Detection]:
    """Decode CenterNet outputs with ``engines.decode`` at the given settings (model-input px)."""
    from types import SimpleNamespace

    from engines.decode import decode_centernet

    spec = SimpleNamespace(decoding="centernet", heatmap="nodule_heatmap", size="nodule_size",
                           offset="nodule_offset", stride=stride, score_threshold=score_threshold,
                           nms_iou=nms_iou, max_detections=max_detections)
    return decode_centernet(outputs, SimpleNamespace(output=spec, name="nodule_detector"))


# ----------------------------------------------------------------------------- data

def _generate_one(args: tuple[int, str]) -> dict[str, Any]:
    from engines.train import phantom

    seed, out_dir = args
    case = phantom.generate_case(seed)
    name = f"heldout_{seed}.dcm"
    phantom.write_dicom(case, Path(out_dir) / name)
    return {"file": name, "seed": seed, "tb": bool(case.tb), "rows": int(case.pixels.shape[0]),
            "cols": int(case.pixels.shape[1]),
            "nodules": [{"box": [float(v) for v in n["box"]], "diameter_mm": float(n["diameter_mm"])}
                        for n in case.nodules]}


def generate_heldout(out_dir: Path, count: int, seed: int, *, workers: int = 2) -> list[dict[str, Any]]:
    """Write ``count`` full-resolution DICOM phantoms (seeds ``seed``..) and return their truth."""
    from engines.train.data import TRAIN_SEED_BASE, TRAIN_SEED_SPAN

    seeds = list(range(seed, seed + count))
    if any(TRAIN_SEED_BASE <= s < TRAIN_SEED_BASE + TRAIN_SEED_SPAN for s in seeds):
        raise ValueError(f"seed: {seed}..{seed + count - 1} overlaps the training seeds "
                         f"{TRAIN_SEED_BASE}..{TRAIN_SEED_BASE + TRAIN_SEED_SPAN - 1}")
    jobs = [(s, str(out_dir)) for s in seeds]
    if workers <= 1:
        return [_generate_one(j) for j in jobs]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        return list(pool.map(_generate_one, jobs, chunksize=4))


def read_unit_image(path: Path) -> np.ndarray:
    """A received DX image as the appliance sees it (``edge.imaging``): 0..1 display polarity.

    ``edge.imaging`` applies the modality LUT, the DICOM window and MONOCHROME1 inversion and
    reduces the image to at least 512 px a side; ``to_model_input`` then area-resizes it.
    """
    from edge.imaging import load_for_models

    return load_for_models(path, min_side=512).unit_image


def _load(folder: Path, threads: int = 2) -> Any:
    """One model folder on ONNX Runtime (CPU), sha256-checked by ``engines.store``."""
    from engines.store import load_model

    return load_model(folder, backend="onnxruntime", onnx_device="cpu", intra_op_threads=threads)


def _run(model: Any, unit: np.ndarray) -> dict[str, np.ndarray]:
    inp = model.manifest.input
    return model.run(to_model_input(unit, inp.height, inp.width, inp.mean, inp.std))


# ----------------------------------------------------------------------------- evaluation

def evaluate(*, models_dir: Path, count: int, seed: int, workers: int = 2,
             keep_dir: Path | None = None) -> dict[str, Any]:
    """Generate the held-out set, run both models and return all figures as a dict."""
    started = time.monotonic()
    from engines.decode import decode_centernet

    tb_model = _load(Path(models_dir) / "tb_classifier")
    det_model = _load(Path(models_dir) / "nodule_detector")
    det_out = det_model.manifest.output
    # the FROC sweeps all thresholds, so decode with a low one (everything else as shipped)
    sweep = replace(det_model.manifest, output=replace(det_out, score_threshold=FROC_MIN_SCORE))
    with tempfile.TemporaryDirectory(prefix="model_eval_") as tmp:
        folder = Path(keep_dir or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        truth = generate_heldout(folder, count, seed, workers=workers)
        gen_s = time.monotonic() - t0
        tb_pos, tb_neg, per_image = [], [], []
        for item in truth:
            unit = read_unit_image(folder / item["file"])
            score = float(_run(tb_model, unit)[tb_model.manifest.output.score].reshape(-1)[0])
            (tb_pos if item["tb"] else tb_neg).append(score)
            dets = decode_centernet(_run(det_model, unit), sweep)
            sx = item["cols"] / det_model.manifest.input.width
            sy = item["rows"] / det_model.manifest.input.height
            full = [(d[0] * sx, d[1] * sy, d[2] * sx, d[3] * sy, d[4]) for d in dets]
            per_image.append((full, np.asarray([n["box"] for n in item["nodules"]], np.float64).reshape(-1, 4),
                              [n["diameter_mm"] for n in item["nodules"]]))
    threshold = float(tb_model.manifest.output.threshold)
    result: dict[str, Any] = {
        "count": count, "seed": seed, "generate_seconds": round(gen_s, 1),
        "image_sizes": [min(t["cols"] for t in truth), max(t["cols"] for t in truth)],
        "tb": {"positives": len(tb_pos), "negatives": len(tb_neg)},
    }
    if tb_pos and tb_neg:
        sens70, thr70 = sensitivity_at_specificity(tb_pos, tb_neg, 0.70)
        result["tb"].update({
            "auc": roc_auc(tb_pos, tb_neg), "sensitivity_at_70_specificity": sens70,
            "threshold_at_70_specificity": thr70,
            "at_threshold": {"threshold": threshold,
                             "sensitivity": float(np.mean(np.asarray(tb_pos) >= threshold)),
                             "specificity": float(np.mean(np.asarray(tb_neg) < threshold))}})
    result["nodules"] = froc(per_image)
    result["nodules"]["at_threshold"] = operating_point(per_image, float(det_out.score_threshold))
    clean = [p for p in per_image if len(p[1]) == 0]
    result["nodules"]["fp_per_clean_image_at_threshold"] = (
        operating_point(clean, float(det_out.score_threshold))["fp_per_image"] if clean else float("nan"))
    result["seconds"] = round(time.monotonic() - started, 1)
    return result


def _pct(value: float) -> str:
    return "n/a" if value != value else f"{100 * value:.1f}%"


def format_report(result: dict[str, Any]) -> str:
    """Markdown summary of :func:`evaluate` (what the model cards quote)."""
    tb, nod = result["tb"], result["nodules"]
    counts = nod["counts"]
    lines = [
        f"Command: `python -m benchmarks.model_eval --count {result['count']} --seed {result['seed']}` "
        f"({result['count']} phantoms, seeds {result['seed']}..{result['seed'] + result['count'] - 1}, "
        f"{result['image_sizes'][0]}-{result['image_sizes'][1]} px wide, written as DICOM and read back "
        "through the DICOM window and area resize like the appliance).",
        "",
        f"**TB classifier** ({tb['positives']} TB, {tb['negatives']} clean):",
    ]
    if "auc" in tb:
        at = tb["at_threshold"]
        lines += [
            f"- ROC AUC **{tb['auc']:.3f}**",
            f"- sensitivity at 70% specificity **{_pct(tb['sensitivity_at_70_specificity'])}** "
            f"(score threshold {tb['threshold_at_70_specificity']:.3f}; WHO target 90% at 70%)",
            f"- at the manifest threshold {at['threshold']:.2f}: sensitivity {_pct(at['sensitivity'])}, "
            f"specificity {_pct(at['specificity'])}",
        ]
    lines += [
        "",
        f"**Nodule detector** ({counts['all']} nodules in {counts['images']} images: "
        f"{counts['small']} < 8 mm, {counts['large']} >= 8 mm). Sensitivity at false positives per image:",
        "",
        "| FP / image | all | < 8 mm | >= 8 mm | score threshold |",
        "|---|---|---|---|---|",
    ]
    for key in nod["thresholds"]:
        lines.append(f"| {key} | {_pct(nod['all'][key])} | {_pct(nod['small'][key])} | "
                     f"{_pct(nod['large'][key])} | {nod['thresholds'][key]:.3f} |")
    op = nod["at_threshold"]
    lines += ["", f"At the manifest score threshold {op['threshold']:.2f}: sensitivity {_pct(op['sensitivity'])}, "
              f"{op['fp_per_image']:.2f} false positives per image "
              f"({nod['fp_per_clean_image_at_threshold']:.2f} on images without nodules)."]
    return "\n".join(lines) + "\n"


def update_cards(models_dir: Path, report: str) -> list[Path]:
    """Replace the measured-performance section of both model cards with ``report``."""
    from engines.train.export import EVAL_BEGIN, EVAL_END

    written = []
    for name in ("tb_classifier", "nodule_detector"):
        path = Path(models_dir) / name / "MODEL_CARD.md"
        text = path.read_text(encoding="utf-8")
        pattern = re.compile(re.escape(EVAL_BEGIN) + ".*?" + re.escape(EVAL_END), re.S)
        if not pattern.search(text):
            raise ValueError(f"{path}: no {EVAL_BEGIN} ... {EVAL_END} section to update")
        path.write_text(pattern.sub(lambda _: f"{EVAL_BEGIN}\n{report.rstrip()}\n{EVAL_END}", text),
                        encoding="utf-8")
        written.append(path)
    return written


def build_parser() -> argparse.ArgumentParser:
    from engines.train.data import EVAL_SEED_DEFAULT

    parser = argparse.ArgumentParser(prog="python -m benchmarks.model_eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=150, help="held-out phantoms (default 150)")
    parser.add_argument("--seed", type=int, default=EVAL_SEED_DEFAULT, help="first phantom seed")
    parser.add_argument("--models-dir", type=Path, default=Path(__file__).resolve().parent.parent
                        / "engines" / "models", help="folder with tb_classifier/ and nodule_detector/")
    parser.add_argument("--workers", type=int, default=2, help="phantom generation processes")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures as JSON here")
    parser.add_argument("--keep", type=Path, default=None, help="keep the DICOM files in this folder")
    parser.add_argument("--update-cards", action="store_true",
                        help="rewrite the measured-performance section of both MODEL_CARD.md files")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.count < 2:
        print("--count must be at least 2", file=sys.stderr)
        return 2
    result = evaluate(models_dir=args.models_dir, count=args.count, seed=args.seed,
                      workers=args.workers, keep_dir=args.keep)
    report = format_report(result)
    print(report)
    print(f"({result['seconds']:.0f} s, of which {result['generate_seconds']:.0f} s generating phantoms)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if args.update_cards:
        for path in update_cards(args.models_dir, report):
            print(f"updated {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
