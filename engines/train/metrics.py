"""Detection and classification metrics of the demonstration models.

Used by the training run (validation, operating point) and by ``benchmarks.model_eval``
(held-out evaluation), so both count the same way:

- ROC AUC (Mann-Whitney U) and sensitivity at a specificity, for the TB score;
- FROC of the nodule/mass detector: sensitivity at given false positives per image,
  overall and by lesion size (< 8 mm, 8-30 mm, > 30 mm, all >= 8 mm). A detection hits
  a true lesion when its centre lies inside the true box or their IoU >= 0.3; further
  detections on an already found lesion are false positives.
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

logger = logging.getLogger(__name__)

FP_RATES = (0.5, 1.0, 2.0)
SMALL_MM = 8.0
MASS_MM = 30.0
#: size groups of a lesion: "small" < 8 mm, "medium" 8-30 mm, "large" > 30 mm (masses);
#: "ge8" is every lesion of 8 mm or more (the acceptance figure)
SIZE_GROUPS = ("all", "small", "ge8", "medium", "large")
Detection = tuple[float, float, float, float, float]


def size_groups(mm: float) -> tuple[str, ...]:
    """The groups a lesion of ``mm`` counts in (besides "all")."""
    if mm < SMALL_MM:
        return ("small",)
    return ("ge8", "medium") if mm <= MASS_MM else ("ge8", "large")


def roc_auc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """Area under the ROC curve (Mann-Whitney U with ties counted half), from average ranks:
    O(n log n), so it serves a site's calibration set of thousands of cases as well."""
    pos = np.asarray(positive, np.float64).reshape(-1)
    neg = np.asarray(negative, np.float64).reshape(-1)
    if pos.size == 0 or neg.size == 0:
        raise ValueError("roc_auc: need at least one positive and one negative score")
    _, inverse, counts = np.unique(np.concatenate([pos, neg]), return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0      # 1-based, ties share their mean
    rank_sum = average_rank[inverse[:pos.size]].sum()
    return float((rank_sum - pos.size * (pos.size + 1) / 2.0) / (pos.size * neg.size))


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


def hits(det: Detection, boxes: np.ndarray) -> np.ndarray:
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


def _match(dets: Sequence[Detection], boxes: np.ndarray) -> list[tuple[float, int | None]]:
    """Each detection in score order with the true lesion it finds (its index), or None for
    a false positive; a lesion already found makes a later detection on it a false one."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    found = np.zeros(len(boxes), bool)
    out: list[tuple[float, int | None]] = []
    for det in sorted(dets, key=lambda d: -d[4]):
        hit = hits(det, boxes) & ~found
        j = int(np.argmax(hit)) if hit.any() else None
        if j is not None:
            found[j] = True
        out.append((det[4], j))
    return out


def froc(per_image: Sequence[tuple[Sequence[Detection], np.ndarray, Sequence[float]]],
         fp_rates: Sequence[float] = FP_RATES) -> dict[str, Any]:
    """Sensitivity at given false positives per image, overall and by lesion size.

    ``per_image``: (detections with scores, true boxes [M, 4], true diameters in mm).
    Detections are matched greedily in score order within each image. Returns
    ``{group: {"0.5": sens, ...} for SIZE_GROUPS, "counts": {...}, "thresholds": {...}}``.
    """
    events = []      # (score, is_tp, groups of the lesion found)
    counts = dict.fromkeys(SIZE_GROUPS, 0)
    for dets, boxes, sizes in per_image:
        for mm in sizes:
            for g in ("all",) + size_groups(mm):
                counts[g] += 1
        events += [(score, j is not None, () if j is None else ("all",) + size_groups(sizes[j]))
                   for score, j in _match(dets, boxes)]
    n_images = max(1, len(per_image))
    events.sort(key=lambda e: -e[0])
    result: dict[str, Any] = {g: {} for g in counts}
    result["counts"] = dict(counts, images=len(per_image))
    result["thresholds"] = {}
    for rate in fp_rates:
        tp = dict.fromkeys(counts, 0)
        fp = 0
        best = dict(tp)
        threshold = 1.0
        i = 0
        while i < len(events):
            score = events[i][0]
            step_fp, step_tp = 0, dict.fromkeys(tp, 0)
            while i < len(events) and events[i][0] == score:   # ties enter together
                if events[i][1]:
                    for g in events[i][2]:
                        step_tp[g] += 1
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
                    threshold: float) -> dict[str, Any]:
    """Sensitivity (all lesions, and by size group) and false positives per image when
    keeping detections >= ``threshold``."""
    found_by = dict.fromkeys(SIZE_GROUPS, 0)
    total_by = dict.fromkeys(SIZE_GROUPS, 0)
    fps = 0
    for dets, boxes, sizes in per_image:
        # greedy in score order: the matches above the threshold are those of all detections
        matched = [j for score, j in _match(dets, boxes) if score >= threshold]
        fps += sum(j is None for j in matched)
        found = set(matched)
        for j, mm in enumerate(sizes):
            for g in ("all",) + size_groups(mm):
                total_by[g] += 1
                found_by[g] += int(j in found)
    sens = {g: found_by[g] / total_by[g] if total_by[g] else float("nan") for g in SIZE_GROUPS}
    return {"threshold": threshold, "sensitivity": sens["all"], "by_size": sens,
            "lesions": total_by, "fp_per_image": fps / max(1, len(per_image))}


@functools.lru_cache(maxsize=1)
def _detector_manifest():
    """The shipped detector's manifest (``export.MANIFESTS``), parsed once."""
    from engines.manifest import parse_manifest
    from engines.train.export import MANIFESTS

    data = {section: dict(values) for section, values in MANIFESTS["nodule_detector"].items()}
    data["model"]["sha256"] = "0" * 64      # no file is loaded
    return parse_manifest(data, Path("nodule_detector"))


def decode_detections(outputs: dict[str, np.ndarray], *, stride: int, score_threshold: float,
                      nms_iou: float, max_detections: int) -> list[Detection]:
    """Decode CenterNet outputs with ``engines.decode`` at the given settings (model-input px),
    through the shipped detector's manifest as the appliance would."""
    from dataclasses import replace

    from engines.decode import decode_centernet

    manifest = _detector_manifest()
    output = replace(manifest.output, stride=stride, score_threshold=score_threshold, nms_iou=nms_iou,
                     max_detections=max_detections)
    return decode_centernet(outputs, replace(manifest, output=output))
