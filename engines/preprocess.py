"""Model-input preprocessing shared by training and inference.

Both the training code (on phantoms) and the appliance (on received DICOM images) go
through these functions, so a model always sees the same polarity, range and geometry.

Contract:
- ``unit_image``: a 2-D float32 array in display polarity (MONOCHROME2: dense tissue and
  bone are bright), scaled to 0..1 by the DICOM window (or percentiles when no window).
- ``prepare_input(unit_image, spec)``: everything an ``[input]`` table declares (resize
  mode and interpolation, channels, value range, per-channel mean/std), giving the tensor
  and the :class:`engines.geometry.InputGeometry` that maps boxes back to the image exactly.
- ``to_model_input``: the original single-channel form (stretch, area average,
  ``(x - mean) / std``), ``[1, 1, H, W]`` float32; ``prepare_input`` gives the same bytes for
  a manifest that declares nothing more.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from engines.geometry import InputGeometry, placement

logger = logging.getLogger(__name__)

INTERPOLATIONS = ("area", "area_exact", "bilinear")


def window_to_unit(pixels: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM linear VOI window (PS3.3 C.11.2.1.2.1) mapped to 0..1 float32."""
    pixels = np.asarray(pixels, dtype=np.float32)
    width = max(float(width), 1.0)
    low = float(center) - 0.5 - (width - 1.0) / 2.0
    out = (pixels - low) / (width - 1.0)
    return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)


def percentile_to_unit(pixels: np.ndarray, low_pct: float = 0.5, high_pct: float = 99.5) -> np.ndarray:
    """Scale to 0..1 between two percentiles; used when the image carries no VOI."""
    pixels = np.asarray(pixels, dtype=np.float32)
    sample = pixels[:: max(1, pixels.shape[0] // 512), :: max(1, pixels.shape[1] // 512)]
    lo, hi = np.percentile(sample, [low_pct, high_pct])
    if hi <= lo:
        hi = lo + 1.0
    return np.clip((pixels - lo) / (hi - lo), 0.0, 1.0).astype(np.float32, copy=False)


def resize_area(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Area-average resize of a 2-D float image to (height, width).

    Integer factors use a reshape-mean (exact box filter); other factors use PIL's
    box filter, which is an area average as well.
    """
    image = np.asarray(image, dtype=np.float32)
    h, w = image.shape
    if (h, w) == (height, width):
        return image
    if h % height == 0 and w % width == 0:
        fy, fx = h // height, w // width
        return image.reshape(height, fy, width, fx).mean(axis=(1, 3), dtype=np.float32)
    from PIL import Image

    resized = Image.fromarray(image, mode="F").resize((width, height), Image.Resampling.BOX)
    return np.asarray(resized, dtype=np.float32)


def _area_axis(image: np.ndarray, size: int, axis: int) -> np.ndarray:
    """Exact pixel-overlap average along one axis (integral of the piecewise-constant row)."""
    n = image.shape[axis]
    if n == size:
        return image
    moved = np.moveaxis(image.astype(np.float64, copy=False), axis, 0)
    integral = np.concatenate([np.zeros((1,) + moved.shape[1:]), np.cumsum(moved, axis=0)])
    edges = np.arange(size + 1, dtype=np.float64) * (n / size)
    base = np.minimum(np.floor(edges).astype(np.int64), n - 1)
    frac = (edges - base)[(...,) + (None,) * (moved.ndim - 1)]
    at_edges = integral[base] + frac * moved[base]            # integral up to each edge
    out = (at_edges[1:] - at_edges[:-1]) * (size / n)
    return np.moveaxis(out, 0, axis)


def resize_area_exact(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Area average with exact fractional pixel overlaps: OpenCV's ``INTER_AREA`` when
    shrinking (torchxrayvision's ``XRayResizer(engine="cv2")``)."""
    image = np.asarray(image, dtype=np.float32)
    if image.shape == (height, width):
        return image
    return _area_axis(_area_axis(image, width, 1), height, 0).astype(np.float32)


def _linear_axis(image: np.ndarray, size: int, axis: int) -> np.ndarray:
    n = image.shape[axis]
    if n == size:
        return image
    src = (np.arange(size, dtype=np.float64) + 0.5) * (n / size) - 0.5
    src = np.maximum(src, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n - 1)
    i1 = np.minimum(i0 + 1, n - 1)
    frac = (src - i0).astype(np.float32)
    shape = [1] * image.ndim
    shape[axis] = size
    frac = frac.reshape(shape)
    a, b = np.take(image, i0, axis=axis), np.take(image, i1, axis=axis)
    return a + (b - a) * frac


def resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize with half-pixel centres and no anti-aliasing: OpenCV's
    ``INTER_LINEAR`` and PyTorch's ``interpolate(mode="bilinear", align_corners=False)``
    (Ultralytics' letterbox, torchvision's detection transform)."""
    image = np.asarray(image, dtype=np.float32)
    return _linear_axis(_linear_axis(image, width, 1), height, 0).astype(np.float32, copy=False)


def resize(image: np.ndarray, height: int, width: int, interpolation: str = "area") -> np.ndarray:
    """Resize a 2-D float image by ``interpolation`` ("area", "area_exact", "bilinear")."""
    if interpolation == "area":
        return resize_area(image, height, width)
    if interpolation == "area_exact":
        return resize_area_exact(image, height, width)
    if interpolation == "bilinear":
        return resize_bilinear(image, height, width)
    raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}")


def to_model_input(unit_image: np.ndarray, height: int, width: int,
                   mean: float = 0.5, std: float = 0.25) -> np.ndarray:
    """Resize a 0..1 display-polarity image and normalise it to an NCHW float32 tensor."""
    resized = resize_area(unit_image, height, width)
    tensor = (resized - np.float32(mean)) / np.float32(std)
    return tensor[np.newaxis, np.newaxis, :, :].astype(np.float32, copy=False)


@dataclass(frozen=True)
class ModelInput:
    """A preprocessed tensor and the geometry that maps its pixels to the full image."""

    tensor: np.ndarray
    geometry: InputGeometry


def place_image(unit_image: np.ndarray, spec: Any) -> tuple[np.ndarray, Any]:
    """The 2-D 0..1 image as the model sees it (resized, padded or cropped), before scaling."""
    image = np.asarray(unit_image, dtype=np.float32)
    if image.ndim != 2:
        raise ValueError(f"unit_image must be a 2-D grayscale array, got shape {list(image.shape)}")
    place = placement(spec.resize, image.shape, (spec.height, spec.width),
                      pad_position=spec.pad_position, crop_fraction=spec.crop_fraction)
    rx, ry, rw, rh = place.region
    tx, ty, tw, th = place.target
    region = image[ry:ry + rh, rx:rx + rw]
    resized = resize(region, th, tw, spec.interpolation)
    if (tw, th) == (spec.width, spec.height):
        return resized, place
    canvas = np.full((spec.height, spec.width), np.float32(spec.pad_value), dtype=np.float32)
    canvas[ty:ty + th, tx:tx + tw] = resized
    return canvas, place


def prepare_input(unit_image: np.ndarray, spec: Any, full_hw: Sequence[int] | None = None) -> ModelInput:
    """Preprocess a 0..1 display image for a model with ``[input]`` ``spec``.

    ``spec`` is an :class:`engines.manifest.InputSpec`. ``full_hw`` is (rows, columns) of the
    full-resolution image when ``unit_image`` was decoded at a reduced size (the geometry then
    reports full-resolution coordinates). A grayscale image is replicated to every channel.
    """
    image, place = place_image(unit_image, spec)
    low, high = spec.value_range
    if (low, high) != (0.0, 1.0):
        image = (np.float32(low) + image * np.float32(high - low)).astype(np.float32, copy=False)
    planes = [(image - np.float32(m)) / np.float32(s) for m, s in zip(spec.means, spec.stds)]
    chw = np.stack(planes).astype(np.float32, copy=False)
    tensor = chw[np.newaxis] if spec.batch else chw
    source_hw = np.shape(unit_image)
    geometry = InputGeometry.from_placement(place, source_hw, full_hw or source_hw,
                                            (spec.height, spec.width), spec.resize)
    return ModelInput(np.ascontiguousarray(tensor), geometry)
