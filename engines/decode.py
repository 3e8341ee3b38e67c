"""Decoding of detector and classifier outputs (numpy only).

Implemented once here so evaluation during training, ``edge models check`` and the
appliance read a model's outputs the same way. Detections come out in model-input pixels;
``engines.geometry.InputGeometry`` maps them back to the full image exactly (for the
shipped CenterNet model, a stretch: ``x * full_width / width``).

- ``decode_centernet``: heatmap + size + offset maps (the shipped nodule detector).
- ``decode_yolo``: Ultralytics-style ``[1, 4 + C, N]`` (v8/v11) or ``[1, N, 5 + C]`` (v5).
- ``decode_boxes_scores_labels``: post-NMS ``boxes``/``scores``/``labels`` exports.
- ``class_probabilities``: a classifier's scores after ``none``/``sigmoid``/``softmax``.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping, NamedTuple

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


class Detection(NamedTuple):
    """One detected box in model-input pixels, with its score and class index."""

    x1: float
    y1: float
    x2: float
    y2: float
    score: float
    label: int


class OutputShapeError(ValueError):
    """A model output does not have the shape its declared decoding needs."""


# Ultralytics' non_max_suppression: at most this many candidates go into NMS, and
# boxes of different classes are kept apart by an offset of this many pixels per class.
_MAX_NMS_CANDIDATES = 30000
_CLASS_OFFSET = 7680.0


def nms_by_class(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, iou: float) -> np.ndarray:
    """Class-wise greedy NMS: boxes of different classes never suppress each other.

    Returns indices of the kept boxes, highest score first (as :func:`nms`).
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if boxes.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    span = max(_CLASS_OFFSET, float(np.abs(boxes).max()) * 2.0 + 1.0)
    shifted = boxes + (np.asarray(labels, dtype=np.float64).reshape(-1, 1) * span)
    return nms(shifted, scores, iou)


def _squeeze_batch(arr: np.ndarray, name: str, rank: int, what: str) -> np.ndarray:
    """``arr`` without a leading batch dimension of 1, checked to have ``rank`` dimensions."""
    out = np.asarray(arr)
    while out.ndim > rank and out.shape[0] == 1:
        out = out[0]
    if out.ndim != rank:
        raise OutputShapeError(f"output {name!r} has shape {list(np.shape(arr))}; {what}")
    return out


def _thresholds(per_class: Mapping[int, float], classes: np.ndarray) -> np.ndarray:
    """Each detection's threshold by its class; classes without one get +inf (dropped)."""
    table = np.full(int(classes.max()) + 2 if classes.size else 1, np.inf, dtype=np.float64)
    for index, value in per_class.items():
        if 0 <= index < table.size - 1:
            table[index] = value
    # a negative class index reads the last cell, which stays +inf
    return table[np.where(classes < 0, table.size - 1, classes)]


def yolo_classes(shape: tuple[int, ...], layout: str, name: str = "predictions",
                 classes: int | None = None) -> tuple[int, bool]:
    """Number of classes in a YOLO output of ``shape`` and whether it is transposed.

    v8/v11: ``[1, 4 + C, N]``, or ``[1, N, 4 + C]`` as some exporters transpose it; the
    orientation is the one that fits ``classes`` (the manifest's class count) when given,
    else the one where the anchors are the larger dimension. v5: ``[1, N, 5 + C]``.
    """
    dims = [d for d in shape]
    while len(dims) > 2 and dims[0] == 1:
        dims = dims[1:]
    want = "[1, 4 + classes, anchors]" if layout == "v8" else "[1, anchors, 5 + classes]"
    if len(dims) != 2:
        raise OutputShapeError(f"output {name!r} has shape {list(shape)}; a yolo {layout} output "
                               f"is {want}")
    if layout == "v8":
        rows, cols = dims
        if classes is not None and rows == 4 + classes:
            transposed = False
        elif classes is not None and cols == 4 + classes:
            transposed = True
        else:
            transposed = isinstance(rows, int) and isinstance(cols, int) and rows > cols
        channels = cols if transposed else rows
        extra = 4
    else:
        channels, transposed, extra = dims[1], False, 5
    if not isinstance(channels, int) or channels <= extra:
        raise OutputShapeError(f"output {name!r} has shape {list(shape)}; a yolo {layout} output "
                               f"is {want} with at least one class")
    return channels - extra, transposed


def decode_yolo(outputs: Mapping[str, np.ndarray], spec: Any, thresholds: Mapping[int, float],
                classes: int | None = None) -> list[Detection]:
    """Ultralytics-style YOLO outputs -> detections in model-input pixels.

    ``spec``: a :class:`engines.manifest.YoloOutput`. Each anchor takes its best class
    (v5: objectness x class score); it is a candidate when that score reaches the class's
    threshold (``thresholds``: class index -> threshold; classes not in it are dropped).
    Then class-wise NMS at ``spec.nms_iou``, highest score first, at most
    ``spec.max_detections`` (as Ultralytics' ``non_max_suppression`` with ``multi_label=False``).
    ``classes``: the manifest's class count, which tells a transposed v8 output apart.
    """
    name = spec.predictions
    if name not in outputs:
        raise KeyError(f"decode_yolo: output {name!r} missing; got {sorted(outputs)}")
    raw = np.asarray(outputs[name], dtype=np.float32)
    _, transposed = yolo_classes(raw.shape, spec.layout, name, classes)
    pred = _squeeze_batch(raw, name, 2, "expected 2 dimensions after the batch")
    if spec.layout == "v8":
        pred = pred if transposed else pred.T            # -> [N, 4 + C]
        cls_scores = pred[:, 4:]
    else:
        cls_scores = pred[:, 5:] * pred[:, 4:5]
    labels = np.argmax(cls_scores, axis=1)
    scores = cls_scores[np.arange(cls_scores.shape[0]), labels]
    keep = scores >= _thresholds(thresholds, labels)
    if not np.any(keep):
        return []
    xywh, scores, labels = pred[keep, :4].astype(np.float64), scores[keep], labels[keep]
    order = np.argsort(-scores, kind="stable")[:_MAX_NMS_CANDIDATES]
    xywh, scores, labels = xywh[order], scores[order], labels[order]
    boxes = np.stack([xywh[:, 0] - xywh[:, 2] / 2, xywh[:, 1] - xywh[:, 3] / 2,
                      xywh[:, 0] + xywh[:, 2] / 2, xywh[:, 1] + xywh[:, 3] / 2], axis=1)
    kept = nms_by_class(boxes, scores, labels, spec.nms_iou)[: spec.max_detections]
    return [Detection(float(boxes[k, 0]), float(boxes[k, 1]), float(boxes[k, 2]), float(boxes[k, 3]),
                      float(scores[k]), int(labels[k])) for k in kept]


def decode_boxes_scores_labels(outputs: Mapping[str, np.ndarray], spec: Any, input_hw: tuple[int, int],
                               thresholds: Mapping[int, float]) -> list[Detection]:
    """Post-NMS ``boxes`` [N, 4], ``scores`` [N], ``labels`` [N] -> detections (model-input px).

    ``spec``: a :class:`engines.manifest.BoxesOutput`. A leading batch dimension of 1 is
    dropped; a ``count`` output limits the valid rows (padded exports). Rows below their
    class's threshold, or whose class is not in ``thresholds``, are dropped (the latter with
    a warning: the manifest does not know that class); highest score first, at most
    ``spec.max_detections``.
    """
    for key in spec.names:
        if key not in outputs:
            raise KeyError(f"decode_boxes_scores_labels: output {key!r} missing; got {sorted(outputs)}")
    boxes = _squeeze_batch(outputs[spec.boxes], spec.boxes, 2, "boxes must be [N, 4] (or [1, N, 4])")
    scores = _squeeze_batch(outputs[spec.scores], spec.scores, 1, "scores must be [N] (or [1, N])")
    labels = _squeeze_batch(outputs[spec.labels], spec.labels, 1, "labels must be [N] (or [1, N])")
    if boxes.shape[1] != 4 or not boxes.shape[0] == scores.shape[0] == labels.shape[0]:
        raise OutputShapeError(f"outputs {spec.boxes!r} {list(boxes.shape)}, {spec.scores!r} "
                               f"{list(scores.shape)} and {spec.labels!r} {list(labels.shape)} must be "
                               "[N, 4], [N] and [N] with the same N")
    n = boxes.shape[0]
    if spec.count:
        n = min(n, int(np.asarray(outputs[spec.count]).reshape(-1)[0]))
    boxes = boxes[:n].astype(np.float64)
    scores = scores[:n].astype(np.float64)
    labels = np.rint(labels[:n].astype(np.float64)).astype(np.int64)
    if spec.normalized:
        boxes = boxes * np.array([input_hw[1], input_hw[0], input_hw[1], input_hw[0]], dtype=np.float64)
    if spec.box_format == "xywh":
        boxes = np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1)
    elif spec.box_format == "cxcywh":
        boxes = np.concatenate([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2], axis=1)
    unknown = sorted({int(v) for v in labels} - set(thresholds))
    if unknown:
        logger.warning("decode_boxes_scores_labels: class index(es) %s are not in the manifest's "
                       "[[findings]]; those detections are dropped", unknown)
    keep = scores >= _thresholds(thresholds, labels) if n else np.zeros(0, dtype=bool)
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    order = np.argsort(-scores, kind="stable")[: spec.max_detections]
    return [Detection(float(boxes[k, 0]), float(boxes[k, 1]), float(boxes[k, 2]), float(boxes[k, 3]),
                      float(scores[k]), int(labels[k])) for k in order]


def class_probabilities(values: np.ndarray, decoding: str) -> np.ndarray:
    """A classifier's per-class scores as probabilities (float64, 1-D).

    ``none``: already probabilities; ``sigmoid``: independent per class (multi-label);
    ``softmax``: one distribution over the classes.
    """
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if decoding == "none":
        return x
    if decoding == "sigmoid":
        return 0.5 * (1.0 + np.tanh(0.5 * x))     # overflow-free logistic
    if decoding == "softmax":
        e = np.exp(x - x.max())
        return e / e.sum()
    raise ValueError(f"decoding must be none, sigmoid or softmax, got {decoding!r}")
