"""The ``[input]`` and ``[output]`` tables of a model manifest: what a model takes and gives.

Parsed here, checked key by key; every error names the file and the key (``input.channels``,
``output.layout``) and the allowed values. ``engines.manifest`` puts them together with
``[model]`` and ``[[findings]]``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from engines.geometry import PAD_POSITIONS, RESIZE_MODES

logger = logging.getLogger(__name__)

CLASSIFIER_DECODINGS = ("none", "sigmoid", "softmax")
DECODINGS = ("centernet", "yolo", "boxes_scores_labels")
YOLO_LAYOUTS = ("v8", "v5")
BOX_FORMATS = ("xyxy", "xywh", "cxcywh")
INTERPOLATIONS = ("area", "area_exact", "bilinear")

_INPUT_KEYS = {"name", "height", "width", "mean", "std", "channels", "batch", "resize",
               "interpolation", "pad_value", "pad_position", "crop_fraction", "value_range"}
_CLASSIFICATION_KEYS = {"decoding", "score", "heatmap", "threshold"}
# the [output] keys that belong to each detection decoding
_DECODING_KEYS = {
    "centernet": {"heatmap", "size", "offset", "stride", "score_threshold", "nms_iou", "max_detections"},
    "yolo": {"predictions", "layout", "score_threshold", "nms_iou", "max_detections"},
    "boxes_scores_labels": {"boxes", "scores", "labels", "count", "box_format", "normalized",
                            "score_threshold", "max_detections"},
}
_REQUIRED_KEYS = {"centernet": ("heatmap", "size", "offset"), "yolo": ("predictions",),
                  "boxes_scores_labels": ("boxes", "scores", "labels")}


class ManifestError(ValueError):
    """A manifest is missing, unreadable, or has a missing or invalid key."""


Number = Union[float, tuple[float, ...]]


@dataclass(frozen=True)
class InputSpec:
    """The ``[input]`` table: an NCHW float32 tensor built from the 0..1 display image.

    ``resize`` ("stretch", "letterbox", "crop") with ``interpolation``; the 0..1 image is
    mapped linearly onto ``value_range``, then ``(x - mean) / std`` per channel. ``mean`` and
    ``std`` are a number or one number per channel, as written in the manifest.
    """

    name: str
    height: int
    width: int
    mean: Number
    std: Number
    channels: int = 1
    batch: bool = True
    resize: str = "stretch"
    interpolation: str = "area"
    pad_value: float = 0.0
    pad_position: str = "center"
    crop_fraction: float = 1.0
    value_range: tuple[float, float] = (0.0, 1.0)

    @property
    def shape(self) -> tuple[int, ...]:
        """The tensor shape: ``(1, C, H, W)``, or ``(C, H, W)`` with ``batch = false``."""
        chw = (self.channels, self.height, self.width)
        return (1, *chw) if self.batch else chw

    @property
    def means(self) -> tuple[float, ...]:
        """``mean`` for each channel."""
        return _per_channel(self.mean, self.channels)

    @property
    def stds(self) -> tuple[float, ...]:
        return _per_channel(self.std, self.channels)


def _per_channel(value: Number, channels: int) -> tuple[float, ...]:
    if isinstance(value, tuple):
        return value if len(value) == channels else value * channels
    return (float(value),) * channels


@dataclass(frozen=True)
class ClassificationOutput:
    """The ``[output]`` table of a classification model.

    ``score``: the output with one value per class (``[1, K]``; the shipped TB model's is
    ``[1, 1]``); ``decoding`` turns it into probabilities. ``heatmap``: an optional
    class-activation map ``[1, K or 1, h, w]`` covering the model input.
    """

    score: str
    heatmap: str | None
    threshold: float
    decoding: str = "none"

    @property
    def names(self) -> list[str]:
        return [self.score] + ([self.heatmap] if self.heatmap else [])


@dataclass(frozen=True)
class DetectionOutput:
    """The ``[output]`` table of a CenterNet-style detection model."""

    decoding: str
    heatmap: str
    size: str
    offset: str
    stride: int
    score_threshold: float
    nms_iou: float
    max_detections: int

    @property
    def names(self) -> list[str]:
        return [self.heatmap, self.size, self.offset]


@dataclass(frozen=True)
class YoloOutput:
    """``decoding = "yolo"``: one ``predictions`` tensor, boxes as cx, cy, w, h in model-input
    pixels. ``layout`` "v8" (v8/v11: ``[1, 4 + C, N]``, class scores) or "v5" (``[1, N, 5 + C]``,
    objectness times class score). Class-wise NMS at ``nms_iou``."""

    decoding: str
    predictions: str
    layout: str
    score_threshold: float
    nms_iou: float
    max_detections: int

    @property
    def names(self) -> list[str]:
        return [self.predictions]


@dataclass(frozen=True)
class BoxesOutput:
    """``decoding = "boxes_scores_labels"``: detections after NMS, as torchvision and many
    exporters produce them: ``boxes`` [N, 4] (``box_format``, in model-input pixels or, with
    ``normalized``, fractions of the input size), ``scores`` [N], ``labels`` [N] (class
    indices), optionally with a batch dimension and a ``count`` output (valid rows)."""

    decoding: str
    boxes: str
    scores: str
    labels: str
    box_format: str
    normalized: bool
    count: str | None
    score_threshold: float
    max_detections: int

    @property
    def names(self) -> list[str]:
        return [self.boxes, self.scores, self.labels] + ([self.count] if self.count else [])


OutputSpec = Union[ClassificationOutput, DetectionOutput, YoloOutput, BoxesOutput]


class Table:
    """Reads typed keys from one TOML table and names file and key in every error."""

    def __init__(self, data: dict[str, Any], table: str, source: Path, known: set[str]) -> None:
        self.data, self.table, self.source = data, table, source
        for key in sorted(set(data) - known):
            logger.warning("%s: unknown key [%s] %s ignored (known keys: %s)",
                           source, table, key, ", ".join(sorted(known)))

    def fail(self, key: str, problem: str) -> ManifestError:
        return ManifestError(f"{self.source}: key '{self.table}.{key}' {problem}")

    def get(self, key: str, kind: type, default: Any = ..., *, allowed: tuple = ()) -> Any:
        if key not in self.data:
            if default is not ...:
                return default
            hint = f" (allowed values: {', '.join(map(str, allowed))})" if allowed else ""
            raise self.fail(key, f"is missing{hint}")
        value = self.data[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise self.fail(key, f"must be a {kind.__name__}, got {value!r}")
        if kind is str and not value.strip():
            raise self.fail(key, "must not be empty")
        if allowed and value not in allowed:
            raise self.fail(key, f"is {value!r}; allowed values: {', '.join(map(str, allowed))}")
        return value

    def positive(self, key: str, kind: type, default: Any = ...) -> Any:
        value = self.get(key, kind, default)
        if value <= 0:
            raise self.fail(key, f"must be > 0, got {value!r}")
        return value

    def fraction(self, key: str, default: Any = ...) -> float:
        value = self.get(key, float, default)
        if not 0.0 <= value <= 1.0:
            raise self.fail(key, f"must be between 0 and 1, got {value!r}")
        return value

    def numbers(self, key: str, default: Any = ..., *, count: int | None = None,
                positive: bool = False) -> Number:
        """A number, or an array of numbers (returned as a tuple)."""
        if key not in self.data and default is not ...:
            return default
        value = self.data.get(key)
        if isinstance(value, list):
            if not value or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
                raise self.fail(key, f"must be a number or an array of numbers, got {value!r}")
            if count is not None and len(value) not in (1, count):
                raise self.fail(key, f"has {len(value)} values but input.channels is {count}; give "
                                      "one value, or one per channel")
            out: Number = tuple(float(v) for v in value)
            check = out
        else:
            out = self.get(key, float)
            check = (out,)
        if positive and any(v <= 0 for v in check):
            raise self.fail(key, f"must be > 0, got {value!r}")
        return out


def section(data: dict[str, Any], table: str, source: Path) -> dict[str, Any]:
    section = data.get(table)
    if not isinstance(section, dict):
        raise ManifestError(f"{source}: table [{table}] is missing; a manifest needs "
                            "[model], [input] and [output] tables")
    return section


def parse_input(data: dict[str, Any], source: Path) -> InputSpec:
    i = Table(section(data, "input", source), "input", source, _INPUT_KEYS)
    channels = i.get("channels", int, 1)
    if channels not in (1, 3):
        raise i.fail("channels", f"must be 1 or 3 (a grayscale image is replicated), got {channels!r}")
    resize = i.get("resize", str, "stretch", allowed=RESIZE_MODES)
    value_range = i.data.get("value_range", [0.0, 1.0])
    if (not isinstance(value_range, list) or len(value_range) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value_range)
            or value_range[0] == value_range[1]):
        raise i.fail("value_range", "must be two different numbers [low, high]: what the 0..1 "
                                     f"display image is scaled to (e.g. [0, 255]), got {value_range!r}")
    pad_value = i.get("pad_value", float, 0.0)
    if not 0.0 <= pad_value <= 1.0:
        raise i.fail("pad_value", "is the gray level of letterbox borders on the 0..1 display "
                                   f"scale (Ultralytics: 114/255 = 0.447), got {pad_value!r}")
    crop_fraction = i.get("crop_fraction", float, 1.0)
    if not 0.0 < crop_fraction <= 1.0:
        raise i.fail("crop_fraction", f"must be in (0, 1], got {crop_fraction!r}")
    for key, mode in (("pad_value", "letterbox"), ("pad_position", "letterbox"), ("crop_fraction", "crop")):
        if key in i.data and resize != mode:
            logger.warning("%s: key 'input.%s' is used only with resize = \"%s\" (this model: %s)",
                           source, key, mode, resize)
    return InputSpec(
        name=i.get("name", str), height=i.positive("height", int), width=i.positive("width", int),
        mean=i.numbers("mean", count=channels), std=i.numbers("std", count=channels, positive=True),
        channels=channels, batch=i.get("batch", bool, True), resize=resize,
        interpolation=i.get("interpolation", str, "area", allowed=INTERPOLATIONS),
        pad_value=pad_value, pad_position=i.get("pad_position", str, "center", allowed=PAD_POSITIONS),
        crop_fraction=crop_fraction, value_range=(float(value_range[0]), float(value_range[1])))


def _detection_decoding(o: Table) -> str:
    """The declared decoding, checked against the keys present, so that a manifest written
    for one decoding but declaring another is named for what it is."""
    decoding = o.get("decoding", str, "centernet", allowed=DECODINGS)
    missing = [k for k in _REQUIRED_KEYS[decoding] if k not in o.data]
    if missing:
        fits = [d for d in DECODINGS if d != decoding and all(k in o.data for k in _REQUIRED_KEYS[d])]
        if fits:
            raise o.fail("decoding", f"is {decoding!r}, but [output] has the keys of a {fits[0]!r} "
                                      f"model and lacks {', '.join(missing)}; allowed values: "
                                      f"{', '.join(DECODINGS)}")
    return decoding


def parse_output(data: dict[str, Any], task: str, spec: InputSpec, source: Path,
                 has_findings: bool) -> OutputSpec:
    table = section(data, "output", source)
    if task == "classification":
        o = Table(table, "output", source, _CLASSIFICATION_KEYS)
        threshold = o.fraction("threshold", 0.5) if has_findings else o.fraction("threshold")
        return ClassificationOutput(
            score=o.get("score", str), heatmap=o.get("heatmap", str, None), threshold=threshold,
            decoding=o.get("decoding", str, "none", allowed=CLASSIFIER_DECODINGS))
    decoding = _detection_decoding(Table(table, "output", source, set(table)))
    o = Table(table, "output", source, _DECODING_KEYS[decoding] | {"decoding"})
    if decoding == "centernet":
        output = DetectionOutput(
            decoding=decoding, heatmap=o.get("heatmap", str), size=o.get("size", str),
            offset=o.get("offset", str), stride=o.positive("stride", int),
            score_threshold=o.fraction("score_threshold"), nms_iou=o.fraction("nms_iou"),
            max_detections=o.positive("max_detections", int))
        if spec.height % output.stride or spec.width % output.stride:
            raise o.fail("stride", f"({output.stride}) must divide input.height and input.width "
                                    f"({spec.height}x{spec.width})")
        return output
    if decoding == "yolo":
        return YoloOutput(
            decoding=decoding, predictions=o.get("predictions", str),
            layout=o.get("layout", str, allowed=YOLO_LAYOUTS),
            score_threshold=o.fraction("score_threshold"), nms_iou=o.fraction("nms_iou", 0.7),
            max_detections=o.positive("max_detections", int, 300))
    return BoxesOutput(
        decoding=decoding, boxes=o.get("boxes", str), scores=o.get("scores", str),
        labels=o.get("labels", str), box_format=o.get("box_format", str, "xyxy", allowed=BOX_FORMATS),
        normalized=o.get("normalized", bool, False), count=o.get("count", str, None),
        score_threshold=o.fraction("score_threshold"),
        max_detections=o.positive("max_detections", int, 100))
