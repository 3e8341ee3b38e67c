"""Where a model-input pixel lies in the full-resolution image, and back, exactly.

Preprocessing (``engines.preprocess.prepare_input``) resizes the source image into the
model input by one of three modes; each is an axis-aligned affine map, so it can be
inverted without approximation:

- ``stretch``: the whole source image fills the whole input (aspect ratio not kept).
- ``letterbox``: the source is scaled to fit, keeping its aspect ratio, to ``new_w x new_h``
  (rounded to whole pixels) and placed at ``(pad_left, pad_top)``; the rest is padding.
- ``crop``: a centred ``crop_w x crop_h`` region of the source (whole pixels, at
  ``(crop_x, crop_y)``) fills the whole input.

Coordinates are continuous pixel coordinates: pixel ``(row i, column j)`` covers
``[j, j+1) x [i, i+1)``, so an image of width ``w`` spans ``0..w``. The source image is the
one that was preprocessed (it may be a reduced-resolution decode); ``full`` is the image
whose coordinates the results are reported in, and the source is taken to cover it exactly.

Per axis: ``model = scale * full + offset`` and ``full = (model - offset) / scale``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

logger = logging.getLogger(__name__)

RESIZE_MODES = ("stretch", "letterbox", "crop")
PAD_POSITIONS = ("center", "top_left")

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Placement:
    """Where the source image goes in the model input, in whole pixels.

    ``region``: the part of the source that is used (``x, y, width, height``; the whole
    image except for ``crop``). ``target``: where that region lands in the input
    (``x, y, width, height``; the whole input except for ``letterbox``).
    """

    region: tuple[int, int, int, int]
    target: tuple[int, int, int, int]


def placement(mode: str, source_hw: tuple[int, int], input_hw: tuple[int, int], *,
              pad_position: str = "center", crop_fraction: float = 1.0) -> Placement:
    """The pixel placement of a ``source_hw`` image in a ``input_hw`` model input.

    Letterbox follows Ultralytics' ``LetterBox``: scale ``r = min(H/h, W/w)``, resized size
    ``round(w*r) x round(h*r)`` (at least 1), centred padding ``(W - new_w) // 2`` left and
    ``(H - new_h) // 2`` top. Crop follows torchxrayvision's ``XRayCenterCrop``: the largest
    region with the input's aspect ratio (times ``crop_fraction``), starting at
    ``w // 2 - crop_w // 2``.
    """
    h, w = int(source_hw[0]), int(source_hw[1])
    in_h, in_w = int(input_hw[0]), int(input_hw[1])
    if h <= 0 or w <= 0 or in_h <= 0 or in_w <= 0:
        raise ValueError(f"placement: sizes must be positive, got source {source_hw}, input {input_hw}")
    if mode == "stretch":
        return Placement((0, 0, w, h), (0, 0, in_w, in_h))
    if mode == "letterbox":
        if pad_position not in PAD_POSITIONS:
            raise ValueError(f"pad_position must be one of {', '.join(PAD_POSITIONS)}, got {pad_position!r}")
        r = min(in_h / h, in_w / w)
        new_w, new_h = max(int(round(w * r)), 1), max(int(round(h * r)), 1)
        new_w, new_h = min(new_w, in_w), min(new_h, in_h)
        if pad_position == "center":
            left, top = (in_w - new_w) // 2, (in_h - new_h) // 2
        else:
            left, top = 0, 0
        return Placement((0, 0, w, h), (left, top, new_w, new_h))
    if mode == "crop":
        if not 0.0 < crop_fraction <= 1.0:
            raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction!r}")
        if w * in_h > h * in_w:          # source wider than the input: full height
            crop_h, crop_w = h, max(int(round(h * in_w / in_h)), 1)
        else:
            crop_w, crop_h = w, max(int(round(w * in_h / in_w)), 1)
        crop_w = max(int(round(crop_w * crop_fraction)), 1)
        crop_h = max(int(round(crop_h * crop_fraction)), 1)
        x0, y0 = w // 2 - crop_w // 2, h // 2 - crop_h // 2
        return Placement((x0, y0, crop_w, crop_h), (0, 0, in_w, in_h))
    raise ValueError(f"resize mode must be one of {', '.join(RESIZE_MODES)}, got {mode!r}")


@dataclass(frozen=True)
class InputGeometry:
    """The exact map between model-input pixels and full-resolution image pixels.

    Build it with :meth:`for_image` (from an ``[input]`` spec and the image size) or take
    it from :func:`engines.preprocess.prepare_input`, which returns the one it used.
    """

    input_width: int
    input_height: int
    full_width: int
    full_height: int
    scale_x: float     # model px per full px
    scale_y: float
    offset_x: float    # model px
    offset_y: float
    mode: str = "stretch"
    content: Box = (0.0, 0.0, 0.0, 0.0)   # the input area that shows image (model px)

    @classmethod
    def for_image(cls, spec: Any, source_hw: Sequence[int],
                  full_hw: Sequence[int] | None = None) -> "InputGeometry":
        """Geometry for an ``[input]`` spec (``engines.manifest.InputSpec``) and an image.

        ``source_hw``: (rows, columns) of the image that was preprocessed; ``full_hw``:
        (rows, columns) of the full-resolution image (default: the same).
        """
        return cls.from_placement(
            placement(getattr(spec, "resize", "stretch"), (int(source_hw[0]), int(source_hw[1])),
                      (spec.height, spec.width), pad_position=getattr(spec, "pad_position", "center"),
                      crop_fraction=getattr(spec, "crop_fraction", 1.0)),
            source_hw, full_hw or source_hw, (spec.height, spec.width), getattr(spec, "resize", "stretch"))

    @classmethod
    def from_placement(cls, place: Placement, source_hw: Sequence[int], full_hw: Sequence[int],
                       input_hw: Sequence[int], mode: str = "stretch") -> "InputGeometry":
        src_h, src_w = int(source_hw[0]), int(source_hw[1])
        full_h, full_w = int(full_hw[0]), int(full_hw[1])
        rx, ry, rw, rh = place.region
        tx, ty, tw, th = place.target
        # source px -> model px: model = (src - r0) * t_size / r_size + t0; full = src * full / src
        sx_src, sy_src = tw / rw, th / rh
        fx, fy = full_w / src_w, full_h / src_h
        return cls(input_width=int(input_hw[1]), input_height=int(input_hw[0]),
                   full_width=full_w, full_height=full_h,
                   scale_x=sx_src / fx, scale_y=sy_src / fy,
                   offset_x=tx - rx * sx_src, offset_y=ty - ry * sy_src, mode=mode,
                   content=(float(tx), float(ty), float(tx + tw), float(ty + th)))

    def to_model(self, x: float, y: float) -> tuple[float, float]:
        """A full-resolution point in model-input pixels."""
        return x * self.scale_x + self.offset_x, y * self.scale_y + self.offset_y

    def to_full(self, x: float, y: float) -> tuple[float, float]:
        """A model-input point in full-resolution pixels."""
        return (x - self.offset_x) / self.scale_x, (y - self.offset_y) / self.scale_y

    def box_to_model(self, box: Sequence[float]) -> Box:
        """``[x1, y1, x2, y2]`` in full-resolution pixels -> model-input pixels."""
        x1, y1 = self.to_model(box[0], box[1])
        x2, y2 = self.to_model(box[2], box[3])
        return (x1, y1, x2, y2)

    def box_to_full(self, box: Sequence[float], *, clip: bool = True) -> Box:
        """``[x1, y1, x2, y2]`` in model-input pixels -> full-resolution pixels.

        With ``clip`` (the default), the box is clipped to the image (a detection that
        reaches into letterbox padding or past a crop edge ends at the image border).
        """
        x1, y1 = self.to_full(box[0], box[1])
        x2, y2 = self.to_full(box[2], box[3])
        if clip:
            x1, x2 = (min(max(v, 0.0), float(self.full_width)) for v in (x1, x2))
            y1, y2 = (min(max(v, 0.0), float(self.full_height)) for v in (y1, y2))
        return (x1, y1, x2, y2)
