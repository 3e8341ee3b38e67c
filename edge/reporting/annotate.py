"""Drawing the findings onto the image: the secondary capture and the web thumbnails.

The image is the display-polarity ``unit_image`` (0..1, windowed like the source, usually
reduced resolution); full-resolution boxes map to it by the ratio of the two sizes: one
box and label per nodule and per detection of another label a model declares
(``marks.marks``). A banner is added above the image (not over it: TB often shows at the
lung apices) with the not-for-diagnosis note, the TB decision and the nodule count, then
at most two lines for the other positive findings ("REFER: ..." for those that refer,
"Also found: ..." for the rest, summarised to the width), so the result cannot be
mistaken for the original image and the banner stays at most five lines.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from edge.findings import Findings

from . import common
from .labels import nodules_marked, other_lines
from .marks import marks

logger = logging.getLogger(__name__)

_BOX_COLOR_RGB = (255, 200, 0)        # amber: visible on grey, not "alarm red"
_REFER_COLOR_RGB = (255, 90, 60)


def tb_decision(findings: Findings) -> str:
    """The technician's line: refer for TB testing or not (or why there is no result)."""
    if findings.tb is None:
        return "No TB result"
    prefix = f"TB score {findings.tb.score:.2f} - "
    return prefix + ("REFER for TB testing" if findings.tb.positive else "No TB signs")


def banner_lines(findings: Findings, fits: Callable[[str], bool] | None = None) -> list[str]:
    """The banner text, top to bottom (three to five lines); ``fits`` says whether a line
    of the other findings fits (``labels.other_lines``)."""
    demo = common.is_demonstration(findings)
    return [
        "AI result - not for diagnosis" + (" (demonstration model)" if demo else ""),
        tb_decision(findings),
        nodules_marked(findings, banner=True),
        *other_lines(findings, fits),
    ]


def annotate_image(unit_image: np.ndarray, findings: Findings, *, max_side: int = 1024,
                   color: bool = False, full_size: Sequence[int] | None = None,
                   image_size: Sequence[int] | None = None) -> Image.Image:
    """The image with boxes, labels and the banner above it.

    By default the whole picture (banner included) fits in ``max_side`` px each way and
    the image is never enlarged (thumbnails). ``image_size`` (rows, columns) instead sets
    the size of the image part exactly (enlarged or reduced; the banner is added above
    it), as the secondary capture does. Text sizes follow the image width. ``full_size``
    is the (rows, columns) the boxes refer to; by default the findings' rows/columns, or
    the image's own size when those are unknown (0). Returns an 8-bit ``"L"`` image, or
    ``"RGB"`` with ``color=True`` (amber boxes, for the web page).
    """
    image = _to_uint8(unit_image)
    if not isinstance(max_side, (int, np.integer)) or max_side < 64:
        raise ValueError(f"max_side must be an integer >= 64, got {max_side!r}")
    height, width = image.shape
    if full_size is None:
        full_size = ((findings.rows, findings.columns) if findings.rows and findings.columns
                     else (height, width))
    full_rows, full_cols = (int(v) for v in full_size)
    if full_rows <= 0 or full_cols <= 0:
        raise ValueError(f"full_size must be two positive integers, got {full_size!r}")

    if image_size is not None:
        out_h, out_w = (int(v) for v in image_size)
        if out_h < 16 or out_w < 16:
            raise ValueError(f"image_size must be two integers >= 16, got {image_size!r}")
    font_size = text_size(out_w if image_size is not None else min(max_side, width))
    font = _font(font_size)
    lines = banner_lines(findings)    # the number of lines, before the width is known
    line_height = round(font_size * 1.3)
    banner_height = line_height * len(lines) + font_size // 2
    if image_size is None:
        scale = min(max_side / width, (max_side - banner_height) / height, 1.0)
        out_w, out_h = max(1, round(width * scale)), max(1, round(height * scale))
    picture = Image.fromarray(image)   # uint8 2-D: mode "L"
    if (out_w, out_h) != (width, height):
        # BOX averages when reducing; LANCZOS keeps edges sharp when enlarging.
        enlarge = out_w > width or out_h > height
        picture = picture.resize((out_w, out_h), Image.Resampling.LANCZOS if enlarge
                                 else Image.Resampling.BOX)

    mode = "RGB" if color else "L"
    canvas = Image.new(mode, (out_w, out_h + banner_height), 0)
    canvas.paste(picture.convert(mode), (0, banner_height))
    draw = ImageDraw.Draw(canvas)
    label_font = _font(max(9, round(font_size * 0.8)))
    white = (255, 255, 255) if color else 255
    if len(lines) > 3:   # the other findings' lines, summarised to the width
        room = out_w - font_size
        lines = banner_lines(findings, lambda text: draw.textlength(text, font=font) <= room)
    for number, line in enumerate(lines):
        fill = white
        if color and number == 1 and findings.tb is not None and findings.tb.positive:
            fill = _REFER_COLOR_RGB
        if color and number > 2 and line.startswith("REFER"):
            fill = _REFER_COLOR_RGB
        draw.text((font_size // 2, font_size // 4 + number * line_height), line, fill=fill,
                  font=font)

    sx, sy = out_w / full_cols, out_h / full_rows
    thickness = max(2, round(min(out_w, out_h) / 300))
    for mark in marks(findings):
        x1, y1, x2, y2 = common.clip_box(mark.box, full_rows, full_cols)
        box = (round(x1 * sx), round(y1 * sy) + banner_height,
               max(round(x2 * sx) - 1, round(x1 * sx)),
               max(round(y2 * sy) - 1, round(y1 * sy)) + banner_height)
        if color:
            draw.rectangle(box, outline=_BOX_COLOR_RGB, width=thickness)
        else:   # white box with a black edge: visible on bright and dark tissue
            outer = (box[0] - 1, box[1] - 1, box[2] + 1, box[3] + 1)
            draw.rectangle(outer, outline=0, width=thickness + 2)
            draw.rectangle(box, outline=255, width=thickness)
        _draw_label(draw, mark.label, box, banner_height, out_w, label_font,
                    (_BOX_COLOR_RGB if color else 255), (0, 0, 0) if color else 0)
    return canvas


def text_size(image_width: int) -> int:
    """Banner font size in px for an image ``image_width`` px wide (labels: 0.8 of it):
    about 29 px at 1024 px, which stays legible when a viewer fits the image to a
    screen."""
    return max(10, round(image_width * 0.028))


def _draw_label(draw: ImageDraw.ImageDraw, text: str, box: tuple[int, int, int, int],
                top_limit: int, image_width: int, font: ImageFont.ImageFont, fill,
                background) -> None:
    """Label on a dark patch above the box (inside the image), or below it at the top."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    text_w, text_h = right - left + 4, bottom - top + 4
    x = min(box[0], max(0, image_width - text_w))
    y = box[1] - text_h - 2
    if y < top_limit:
        y = box[3] + 2
    draw.rectangle((x, y, x + text_w, y + text_h), fill=background)
    draw.text((x + 2 - left, y + 2 - top), text, fill=fill, font=font)


def _to_uint8(unit_image: np.ndarray) -> np.ndarray:
    array = np.asarray(unit_image)
    if array.ndim != 2 or array.size == 0:
        raise ValueError(f"unit_image must be a non-empty 2-D array, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.floating):
        raise TypeError(f"unit_image must be a float array scaled 0..1, got {array.dtype}")
    array = np.nan_to_num(array.astype(np.float32, copy=False), nan=0.0, posinf=1.0, neginf=0.0)
    return np.round(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8)


@lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.ImageFont:
    """Pillow's bundled scalable font (no system font needed), else its bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):   # Pillow < 10.1 or no FreeType
        return ImageFont.load_default()
