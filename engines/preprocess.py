"""Model-input preprocessing shared by training and inference.

Both the training code (on phantoms) and the appliance (on received DICOM images) go
through these functions, so a model always sees the same polarity, range and geometry.

Contract:
- ``unit_image``: a 2-D float32 array in display polarity (MONOCHROME2: dense tissue and
  bone are bright), scaled to 0..1 by the DICOM window (or percentiles when no window).
- ``to_model_input``: resizes ("stretch", aspect ratio not kept) to the model's input
  size by area averaging and normalises with the manifest's mean/std, giving an
  ``[1, 1, H, W]`` float32 array. A box in model-input pixels maps back to the full image
  by multiplying x by ``full_width / W`` and y by ``full_height / H``.
"""
from __future__ import annotations

import numpy as np


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


def to_model_input(unit_image: np.ndarray, height: int, width: int,
                   mean: float = 0.5, std: float = 0.25) -> np.ndarray:
    """Resize a 0..1 display-polarity image and normalise it to an NCHW float32 tensor."""
    resized = resize_area(unit_image, height, width)
    tensor = (resized - np.float32(mean)) / np.float32(std)
    return tensor[np.newaxis, np.newaxis, :, :].astype(np.float32, copy=False)
