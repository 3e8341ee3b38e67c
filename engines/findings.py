"""From a model's raw outputs to generic findings, by its manifest, with no code per model.

``decode_findings(outputs, manifest)`` reads the outputs the way the manifest's
``[output] decoding`` says and maps every class to its ``[[findings]]`` entry:

- classifiers: one :class:`Finding` per reported label, positive or not (``score`` is the
  class probability; ``box`` is the hottest heatmap region of a positive finding when the
  model has a heatmap, else None);
- detectors: one :class:`Finding` per box at or above its label's threshold.

Boxes are in MODEL-INPUT pixels (``space == "model"``); :func:`to_full_image` maps them to
full-resolution image pixels with the :class:`engines.geometry.InputGeometry` that
preprocessing returned. :func:`check_output_shapes` says whether a network's outputs fit
the declared decoding and class list (used by ``edge models check``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from engines.decode import (OutputShapeError, class_probabilities, decode_boxes_scores_labels,
                            decode_centernet, decode_yolo, yolo_classes)
from engines.geometry import InputGeometry
from engines.labels import Code, FindingSpec

logger = logging.getLogger(__name__)

#: A classifier's heatmap region is the connected area around the hottest cell at or above
#: this fraction of the peak (as the appliance has always drawn the TB region).
REGION_FRACTION = 0.5


@dataclass(frozen=True)
class Finding:
    """One result of one model, in the form reports and the status page use.

    ``box``: ``(x1, y1, x2, y2)`` in ``space`` ("model": model-input pixels; "full":
    full-resolution image pixels), or None. ``refer``: positive and the label raises the
    technician's refer flag.
    """

    label: str
    display: str
    code: Code | None
    score: float
    threshold: float
    positive: bool
    refer: bool
    kind: str                       # "classification" | "detection"
    model: str = ""
    box: tuple[float, float, float, float] | None = None
    space: str = "model"

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "display": self.display, "score": self.score,
                "threshold": self.threshold, "positive": self.positive, "refer": self.refer,
                "kind": self.kind, "model": self.model, "space": self.space,
                "box": list(self.box) if self.box is not None else None,
                "code": None if self.code is None else
                {"value": self.code.value, "scheme": self.code.scheme, "meaning": self.code.meaning}}


def _by_index(manifest: Any) -> dict[int, FindingSpec]:
    return {f.index: f for f in manifest.findings}


def decode_findings(outputs: Mapping[str, np.ndarray], manifest: Any) -> list[Finding]:
    """Decode one image's outputs (by name) into findings; see the module docstring.

    Raises ``KeyError`` for a missing output and :class:`engines.decode.OutputShapeError`
    when an output does not fit the decoding or the class list.
    """
    spec = manifest.output
    if manifest.task == "classification":
        return _classifier_findings(outputs, manifest)
    thresholds = {f.index: f.threshold for f in manifest.findings}
    if spec.decoding == "centernet":
        finding = manifest.findings[0]
        detections = [(x1, y1, x2, y2, s, finding.index)
                      for x1, y1, x2, y2, s in decode_centernet(outputs, manifest)
                      if s >= finding.threshold]
    elif spec.decoding == "yolo":
        if spec.predictions not in outputs:
            raise KeyError(f"{manifest.name}: output {spec.predictions!r} missing; got {sorted(outputs)}")
        shape = np.shape(outputs[spec.predictions])
        classes, _ = yolo_classes(shape, spec.layout, spec.predictions, len(manifest.findings))
        _check_class_count(manifest, classes, spec.predictions, shape)
        detections = decode_yolo(outputs, spec, thresholds, classes)
    elif spec.decoding == "boxes_scores_labels":
        detections = decode_boxes_scores_labels(outputs, spec, (manifest.input.height, manifest.input.width),
                                                thresholds)
    else:
        raise ValueError(f"{manifest.name}: unknown decoding {spec.decoding!r}")
    specs = _by_index(manifest)
    out = []
    for x1, y1, x2, y2, score, index in detections:
        f = specs[index]
        if not f.report:
            continue
        out.append(Finding(label=f.label, display=f.display, code=f.code, score=float(score),
                           threshold=f.threshold, positive=True, refer=f.refer, kind="detection",
                           model=manifest.name, box=(float(x1), float(y1), float(x2), float(y2))))
    return out


def _check_class_count(manifest: Any, classes: int, name: str, shape: Sequence[int]) -> None:
    listed = sorted(f.index for f in manifest.findings)
    if len(listed) != classes or listed != list(range(classes)):
        raise OutputShapeError(
            f"{manifest.name}: output {name!r} has {classes} class(es) (shape {list(shape)}) but the "
            f"manifest's [[findings]] list {len(listed)} label(s) with index(es) {listed}; list "
            f"one per class, index 0..{classes - 1}")


def _classifier_findings(outputs: Mapping[str, np.ndarray], manifest: Any) -> list[Finding]:
    spec = manifest.output
    if spec.score not in outputs:
        raise KeyError(f"{manifest.name}: output {spec.score!r} missing; got {sorted(outputs)}")
    raw = np.asarray(outputs[spec.score])
    if raw.ndim > 2 or (raw.ndim == 2 and raw.shape[0] != 1):
        raise OutputShapeError(f"{manifest.name}: output {spec.score!r} has shape {list(raw.shape)}; a "
                               "classifier's scores are [1, classes] (or [classes])")
    values = raw.reshape(-1)
    _check_class_count(manifest, values.size, spec.score, raw.shape)
    probs = class_probabilities(values, spec.decoding)
    heat = _heatmap(outputs, manifest, values.size)
    out = []
    for f in manifest.findings:
        if not f.report:
            continue
        score = float(probs[f.index])
        positive = score >= f.threshold
        box = None
        if positive and heat is not None:
            plane = heat[f.index] if heat.shape[0] > 1 else heat[0]
            box = hot_region(plane, manifest.input.height, manifest.input.width)
        out.append(Finding(label=f.label, display=f.display, code=f.code, score=score,
                           threshold=f.threshold, positive=positive, refer=positive and f.refer,
                           kind="classification", model=manifest.name, box=box))
    return out


def _heatmap(outputs: Mapping[str, np.ndarray], manifest: Any, classes: int) -> np.ndarray | None:
    name = manifest.output.heatmap
    if not name or name not in outputs:
        return None
    heat = np.asarray(outputs[name], dtype=np.float32)
    while heat.ndim > 3 and heat.shape[0] == 1:
        heat = heat[0]
    if heat.ndim == 2:
        heat = heat[np.newaxis]
    if heat.ndim != 3 or heat.shape[0] not in (1, classes):
        raise OutputShapeError(f"{manifest.name}: heatmap {name!r} has shape "
                               f"{list(np.shape(outputs[name]))}; "
                               f"expected [1, 1 or {classes}, h, w]")
    return heat


def hot_region(heatmap: np.ndarray, height: int, width: int,
               fraction: float = REGION_FRACTION) -> tuple[float, float, float, float] | None:
    """Bounding box, in pixels of a ``height x width`` image the heatmap covers, of the
    4-connected area around the maximum whose cells are at least ``fraction`` of it."""
    heat = np.asarray(heatmap, dtype=np.float32)
    heat = heat.reshape(heat.shape[-2], heat.shape[-1])
    peak = float(heat.max()) if heat.size else 0.0
    if not np.isfinite(peak) or peak <= 0.0:
        return None
    hot = heat >= peak * fraction
    start = np.unravel_index(int(np.argmax(heat)), heat.shape)
    seen = np.zeros_like(hot)
    stack = [start]
    seen[start] = True
    h, w = heat.shape
    r0, r1, c0, c1 = start[0], start[0], start[1], start[1]
    while stack:
        r, c = stack.pop()
        r0, r1, c0, c1 = min(r0, r), max(r1, r), min(c0, c), max(c1, c)
        for nr, nc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
            if 0 <= nr < h and 0 <= nc < w and hot[nr, nc] and not seen[nr, nc]:
                seen[nr, nc] = True
                stack.append((nr, nc))
    sx, sy = width / w, height / h
    return (c0 * sx, r0 * sy, (c1 + 1) * sx, (r1 + 1) * sy)


def to_full_image(findings: Iterable[Finding], geometry: InputGeometry, *,
                  clip: bool = True) -> list[Finding]:
    """The findings with their boxes in full-resolution image pixels (``space == "full"``).

    A box that ends up empty after clipping (wholly in letterbox padding or outside a crop)
    is dropped for detections; a classifier finding keeps its result and loses the region.
    """
    out = []
    for f in findings:
        if f.space == "full":
            out.append(f)
            continue
        if f.box is None:
            out.append(replace(f, space="full"))
            continue
        box = geometry.box_to_full(f.box, clip=clip)
        if box[2] <= box[0] or box[3] <= box[1]:
            if f.kind == "detection":
                continue
            out.append(replace(f, box=None, space="full"))
            continue
        out.append(replace(f, box=box, space="full"))
    return out


def refer_flag(findings: Iterable[Finding]) -> bool:
    """Whether any finding raises the technician's refer flag."""
    return any(f.refer for f in findings)


def check_output_shapes(manifest: Any, shapes: Mapping[str, Sequence[Any]]) -> list[str]:
    """Problems (one line each) with a network's output shapes for the manifest's decoding
    and class list; dimensions that are not fixed numbers are not judged."""
    spec = manifest.output
    problems = []
    missing = [n for n in spec.names if n not in shapes]
    if missing:
        return [f"outputs {missing} named in [output] are not outputs of the network "
                f"(it has {sorted(shapes)})"]

    def fixed(shape: Sequence[Any]) -> bool:
        return all(isinstance(d, int) and d >= 0 for d in shape)

    try:
        if manifest.task == "classification":
            shape = list(shapes[spec.score])
            if fixed(shape):
                values = int(np.prod(shape))
                if len(shape) > 2 or (len(shape) == 2 and shape[0] != 1):
                    problems.append(f"output {spec.score!r} has shape {shape}; a classifier's scores "
                                    "are [1, classes]")
                else:
                    _check_class_count(manifest, values, spec.score, shape)
        elif spec.decoding == "yolo":
            shape = list(shapes[spec.predictions])
            classes, _ = yolo_classes(tuple(shape), spec.layout, spec.predictions, len(manifest.findings))
            _check_class_count(manifest, classes, spec.predictions, shape)
        elif spec.decoding == "centernet":
            for name, channels in ((spec.heatmap, 1), (spec.size, 2), (spec.offset, 2)):
                shape = list(shapes[name])
                if len(shape) != 4 or (isinstance(shape[1], int) and shape[1] != channels):
                    problems.append(f"output {name!r} has shape {shape}; centernet needs "
                                    f"[1, {channels}, H/stride, W/stride]")
        else:
            for name, rank, what in ((spec.boxes, 2, "[N, 4]"), (spec.scores, 1, "[N]"),
                                     (spec.labels, 1, "[N]")):
                shape = list(shapes[name])
                core = shape[1:] if len(shape) == rank + 1 and shape[0] == 1 else shape
                if len(core) != rank or (rank == 2 and isinstance(core[1], int) and core[1] != 4):
                    problems.append(f"output {name!r} has shape {shape}; boxes_scores_labels needs "
                                    f"{what} (optionally with a batch dimension of 1)")
    except OutputShapeError as exc:
        problems.append(str(exc).split(": ", 1)[-1] if str(exc).startswith(manifest.name) else str(exc))
    return problems
