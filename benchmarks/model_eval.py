"""Evaluate the shipped models on held-out full-resolution DICOM phantoms.

    python -m benchmarks.model_eval --count 200 --seed 424242 [--json PATH] [--update-cards]

Generates ``count`` phantoms (seeds ``seed .. seed+count-1``, disjoint from the training
seeds) at 2000-3000 px with ``engines.train.phantom``, with all of its realism drawn per
image (DR or CR reader, plain / unsharp-mask / multi-scale processing, tone curves,
windows or none, both polarities, scatter, collimation, devices and burned-in text;
nodules and masses of 5-60 mm, alone, several or metastatic). They are written as DICOM
files (DX or CR) in a temporary folder and read back like the appliance (pixels,
modality LUT, DICOM window or percentiles, MONOCHROME1 inversion, area resize,
``to_model_input``); the ONNX models run with ONNX Runtime and the figures quoted in the
model cards are printed:

- TB: ROC AUC, sensitivity at 70% specificity (WHO target product profile: 90% sensitivity
  at 70% specificity), and sensitivity/specificity at the manifest threshold.
- Nodules and masses: sensitivity at 0.5, 1 and 2 false positives per image, overall and
  by size (< 8 mm, 8-30 mm, > 30 mm, and all >= 8 mm), then by processing style at the
  1-FP/image operating point of the whole set. A detection hits a true lesion when its
  centre lies inside the true box or their IoU >= 0.3; further detections on an already
  found lesion count as false positives.
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
from typing import Any

import numpy as np

from engines.preprocess import to_model_input
# the metrics live in engines.train.metrics (shared with the training run); re-exported here
from engines.train.metrics import (  # noqa: F401
    decode_detections, froc, operating_point, roc_auc, sensitivity_at_specificity, size_groups,
)

logger = logging.getLogger(__name__)

FROC_MIN_SCORE = 0.02   # lowest detection score kept for the FROC sweep


# ----------------------------------------------------------------------------- data

def _generate_one(args: tuple[int, str]) -> dict[str, Any]:
    from engines.train import phantom

    seed, out_dir = args
    case = phantom.generate_case(seed)
    name = f"heldout_{seed}.dcm"
    phantom.write_dicom(case, Path(out_dir) / name)
    return {"file": name, "seed": seed, "tb": bool(case.tb), "rows": int(case.pixels.shape[0]),
            "cols": int(case.pixels.shape[1]), "style": case.style["style"],
            "photometric": case.photometric, "window": case.window_center is not None,
            "spacing": case.spacing_attribute is not None,
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
    # by processing style, at the whole set's 1-FP/image operating point
    at_1fp = float(result["nodules"]["thresholds"]["1"])
    result["nodules"]["by_style"] = {}
    for style in sorted({t["style"] for t in truth}):
        subset = [p for p, t in zip(per_image, truth) if t["style"] == style]
        result["nodules"]["by_style"][style] = dict(operating_point(subset, at_1fp), images=len(subset))
    result["conditions"] = {
        "monochrome1": sum(t["photometric"] == "MONOCHROME1" for t in truth),
        "no_window": sum(not t["window"] for t in truth),
        "no_spacing": sum(not t["spacing"] for t in truth)}
    result["seconds"] = round(time.monotonic() - started, 1)
    return result


def _pct(value: float) -> str:
    return "n/a" if value != value else f"{100 * value:.1f}%"


def format_report(result: dict[str, Any]) -> str:
    """Markdown summary of :func:`evaluate` (what the model cards quote)."""
    tb, nod = result["tb"], result["nodules"]
    counts = nod["counts"]
    cond = result.get("conditions", {})
    lines = [
        f"Command: `python -m benchmarks.model_eval --count {result['count']} --seed {result['seed']}` "
        f"({result['count']} phantoms, seeds {result['seed']}..{result['seed'] + result['count'] - 1}, "
        f"{result['image_sizes'][0]}-{result['image_sizes'][1]} px wide, every realism option drawn per "
        f"image ({cond.get('monochrome1', 0)} MONOCHROME1, {cond.get('no_window', 0)} without a window, "
        f"{cond.get('no_spacing', 0)} without pixel spacing), written as DICOM and read back through "
        "the window or percentiles and the area resize like the appliance).",
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
        f"**Nodule/mass detector** ({counts['all']} lesions in {counts['images']} images: "
        f"{counts['small']} < 8 mm, {counts['medium']} 8-30 mm, {counts['large']} > 30 mm). "
        "Sensitivity at false positives per image:",
        "",
        "| FP / image | all | < 8 mm | 8-30 mm | > 30 mm | **>= 8 mm** | score threshold |",
        "|---|---|---|---|---|---|---|",
    ]
    for key in nod["thresholds"]:
        lines.append(f"| {key} | {_pct(nod['all'][key])} | {_pct(nod['small'][key])} | "
                     f"{_pct(nod['medium'][key])} | {_pct(nod['large'][key])} | **{_pct(nod['ge8'][key])}** | "
                     f"{nod['thresholds'][key]:.3f} |")
    if nod.get("by_style"):
        lines += ["", f"By processing style, at the 1 FP/image threshold of the whole set "
                      f"({nod['thresholds']['1']:.3f}):", "",
                  "| style | images | lesions >= 8 mm | sensitivity >= 8 mm | all lesions | FP / image |",
                  "|---|---|---|---|---|---|"]
        for style, op in nod["by_style"].items():
            lines.append(f"| {style} | {op['images']} | {op['lesions']['ge8']} | {_pct(op['by_size']['ge8'])} | "
                         f"{_pct(op['sensitivity'])} | {op['fp_per_image']:.2f} |")
    op = nod["at_threshold"]
    lines += ["", f"At the manifest score threshold {op['threshold']:.2f}: sensitivity {_pct(op['sensitivity'])} "
              f"(>= 8 mm: {_pct(op['by_size']['ge8'])}), {op['fp_per_image']:.2f} false positives per image "
              f"({nod['fp_per_clean_image_at_threshold']:.2f} on images without lesions)."]
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


RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"


def update_results(report: str, path: Path = RESULTS_MD) -> Path:
    """Replace (or append) the model-evaluation section of ``benchmarks/RESULTS.md``."""
    from engines.train.export import EVAL_BEGIN, EVAL_END

    text = path.read_text(encoding="utf-8") if path.exists() else ""
    section = (f"{EVAL_BEGIN}\n## Demonstration models on held-out phantoms\n\n"
               f"Generated by `python -m benchmarks.model_eval --update-results`.\n\n{report.rstrip()}\n{EVAL_END}")
    pattern = re.compile(re.escape(EVAL_BEGIN) + ".*?" + re.escape(EVAL_END), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text, encoding="utf-8")
    return path


def build_parser() -> argparse.ArgumentParser:
    from engines.train.data import EVAL_SEED_DEFAULT

    parser = argparse.ArgumentParser(prog="python -m benchmarks.model_eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=200, help="held-out phantoms (default 200)")
    parser.add_argument("--seed", type=int, default=EVAL_SEED_DEFAULT, help="first phantom seed")
    parser.add_argument("--models-dir", type=Path, default=Path(__file__).resolve().parent.parent
                        / "engines" / "models", help="folder with tb_classifier/ and nodule_detector/")
    parser.add_argument("--workers", type=int, default=2, help="phantom generation processes")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures as JSON here")
    parser.add_argument("--keep", type=Path, default=None, help="keep the DICOM files in this folder")
    parser.add_argument("--update-cards", action="store_true",
                        help="rewrite the measured-performance section of both MODEL_CARD.md files")
    parser.add_argument("--update-results", action="store_true",
                        help="rewrite the model-evaluation section of benchmarks/RESULTS.md")
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
    if args.update_results:
        print(f"updated {update_results(report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
