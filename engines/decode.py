"""Decoding of CenterNet-style detection outputs into boxes (numpy only).

Implemented once here so evaluation during training and the appliance read a detector's
outputs the same way. Boxes come out in model-input pixels; mapping back to the full
image is a plain scale (``x * full_width / width``, ``y * full_height / height``).
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

import numpy as np

logger = logging.getLogger(__name__)

Box = tuple[float, float, float, float, float]   # x1, y1, x2, y2, score

# At most this many peaks (or 4 x max_detections, if larger) go into NMS: a flat,
# saturated heatmap would otherwise make every cell a peak.
_MAX_CANDIDATES = 100


def max_pool3x3(heatmap: np.ndarray) -> np.ndarray:
    """3x3 max filter with stride 1 and "same" size (edges padded with -inf)."""
    hm = np.asarray(heatmap, dtype=np.float32)
    padded = np.pad(hm, 1, mode="constant", constant_values=-np.inf)
    h, w = hm.shape
    pooled = padded[0:h, 0:w].copy()
    for dy in range(3):
        for dx in range(3):
            np.maximum(pooled, padded[dy:dy + h, dx:dx + w], out=pooled)
    return pooled


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one ``[x1, y1, x2, y2]`` box with each row of ``boxes``."""
    ix1 = np.maximum(box[0], boxes[:, 0])
    iy1 = np.maximum(box[1], boxes[:, 1])
    ix2 = np.minimum(box[2], boxes[:, 2])
    iy2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(ix2 - ix1, 0, None) * np.clip(iy2 - iy1, 0, None)
    area = max(float(box[2] - box[0]), 0.0) * max(float(box[3] - box[1]), 0.0)
    areas = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
    union = area + areas - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Greedy non-maximum suppression.

    Returns indices into ``boxes`` of the kept boxes, highest score first (ties keep their
    input order). A box whose IoU with an already kept box is above ``iou`` is dropped.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if boxes.shape[0] != scores.shape[0]:
        raise ValueError(f"nms: boxes has {boxes.shape[0]} rows but scores has {scores.shape[0]}")
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size:
        best = int(order[0])
        keep.append(best)
        rest = order[1:]
        order = rest[box_iou(boxes[best], boxes[rest]) <= iou]
    return np.asarray(keep, dtype=np.int64)


def _plane(outputs: Mapping[str, np.ndarray], name: str, channels: int) -> np.ndarray:
    """Output ``name`` as a ``[channels, H, W]`` array (leading batch of 1 removed)."""
    if name not in outputs:
        raise KeyError(f"decode_centernet: output {name!r} missing; got {sorted(outputs)}")
    arr = np.asarray(outputs[name], dtype=np.float32)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 3 or arr.shape[0] != channels:
        raise ValueError(f"decode_centernet: output {name!r} must be [1, {channels}, H, W], "
                         f"got shape {tuple(np.shape(outputs[name]))}")
    return arr


def decode_centernet(outputs: Mapping[str, np.ndarray], manifest: Any) -> list[Box]:
    """Turn detector outputs into boxes ``(x1, y1, x2, y2, score)`` in model-input pixels.

    Peaks are cells equal to their 3x3 neighbourhood maximum and at or above
    ``score_threshold``; each gives a box centred at ``(col + offset_x, row + offset_y) *
    stride`` with the predicted width and height. Then greedy NMS at ``nms_iou``, highest
    score first, at most ``max_detections``. ``manifest`` is a :class:`engines.manifest.Manifest`
    of a detection model (or anything with a matching ``.output``).
    """
    spec = manifest.output
    if getattr(spec, "decoding", None) != "centernet":
        raise ValueError(f"decode_centernet: model {getattr(manifest, 'name', '?')!r} is not a "
                         "centernet detection model (its [output] has no decoding = \"centernet\")")
    heat = _plane(outputs, spec.heatmap, 1)[0]
    size = _plane(outputs, spec.size, 2)
    offset = _plane(outputs, spec.offset, 2)
    if size.shape[1:] != heat.shape or offset.shape[1:] != heat.shape:
        raise ValueError(f"decode_centernet: heatmap {heat.shape}, size {size.shape[1:]} and "
                         f"offset {offset.shape[1:]} grids differ")
    peaks = (heat == max_pool3x3(heat)) & (heat >= np.float32(spec.score_threshold))
    rows, cols = np.nonzero(peaks)
    if rows.size == 0:
        return []
    scores = heat[rows, cols]
    limit = max(_MAX_CANDIDATES, 4 * spec.max_detections)
    if rows.size > limit:
        logger.debug("decode_centernet: %d peaks, keeping the %d best for NMS", rows.size, limit)
        top = np.argsort(-scores, kind="stable")[:limit]
        rows, cols, scores = rows[top], cols[top], scores[top]
    stride = float(spec.stride)
    cx = (cols + offset[0, rows, cols].astype(np.float64)) * stride
    cy = (rows + offset[1, rows, cols].astype(np.float64)) * stride
    w = size[0, rows, cols].astype(np.float64)
    h = size[1, rows, cols].astype(np.float64)
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    keep = nms(boxes, scores, spec.nms_iou)[: spec.max_detections]
    return [(float(boxes[k, 0]), float(boxes[k, 1]), float(boxes[k, 2]), float(boxes[k, 3]),
             float(scores[k])) for k in keep]
