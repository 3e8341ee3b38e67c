"""Things on and around the patient, and what readers burn into the pixels.

Radiopaque objects go into the attenuation map like anatomy: lead side markers ("L",
"R") in a plastic tab, monitoring cables and oxygen tubing across the image, nasogastric
tubes and central lines in AP portable images, pacemakers with their leads, gown snaps
and necklaces (small dense round shadows that are not nodules). Burned-in annotations
(side letters, "PORTABLE", dates, exposure values) are drawn into the display image after
processing, as a reader's annotation would be. Every object is reported with its box so
that false positives can be traced.
"""
from __future__ import annotations

import logging
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from engines.train.phantom_anatomy import Anatomy
from engines.train.phantom_geometry import MU_SOFT, Grid, add_disc, add_tube

logger = logging.getLogger(__name__)

_WORDS = ("PORTABLE", "AP SUPINE", "AP ERECT", "SEMI-ERECT", "PA", "ERECT", "INSP", "CHEST",
          "MOBILE", "BEDSIDE", "ICU 3", "WARD B", "SITTING", "24H")
_MARKERS = ("L", "R", "L", "R", "AP", "PA")


def _curve(points: list[tuple[float, float]], steps: int = 24) -> list[tuple[float, float]]:
    """Smooth polyline through control points (Catmull-Rom)."""
    pts = [points[0]] + points + [points[-1]]
    out = []
    for i in range(1, len(pts) - 2):
        p0, p1, p2, p3 = (np.asarray(p, np.float64) for p in pts[i - 1:i + 3])
        for t in np.linspace(0.0, 1.0, steps, endpoint=False):
            q = 0.5 * ((2 * p1) + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t * t
                       + (-p0 + 3 * p1 - 3 * p2 + p3) * t ** 3)
            out.append((float(q[0]), float(q[1])))
    out.append(tuple(points[-1]))
    return out


def _box(points: list[tuple[float, float]], r: float) -> tuple[float, float, float, float]:
    us, vs = [p[0] for p in points], [p[1] for p in points]
    return min(us) - r, max(us) + r, min(vs) - r, max(vs) + r


def sample_devices(rng: np.random.Generator, anat: Anatomy) -> list[dict]:
    """Draw the objects for this patient (anatomical mm); AP portable images get more."""
    ap = anat.view == "AP"
    lw, rw = anat.lungs[1].width, anat.lungs[0].width
    bottom = anat.lung_bottom
    items: list[dict] = []
    for _ in range(int(rng.integers(0, 3 if ap else 2) + (1 if rng.random() < 0.5 else 0))):
        # cables and tubing lying across the patient or beside them
        start = (float(rng.uniform(-rw - 120, lw + 120)), float(rng.uniform(-60, bottom + 60)))
        pts = [start]
        ang = float(rng.uniform(0, 2 * math.pi))
        for _k in range(int(rng.integers(2, 5))):
            ang += float(rng.uniform(-1.0, 1.0))
            step = float(rng.uniform(60.0, 160.0))
            pts.append((pts[-1][0] + step * math.cos(ang), pts[-1][1] + step * math.sin(ang)))
        tubing = bool(rng.random() < 0.35)
        items.append({"kind": "tubing" if tubing else "cable", "path": _curve(pts),
                      "r": float(rng.uniform(2.0, 4.0) if tubing else rng.uniform(0.5, 1.3)),
                      "mu": float(MU_SOFT * 0.8 if tubing else rng.uniform(0.06, 0.3))})
    if rng.random() < (0.4 if ap else 0.03):
        tu = anat.trachea_u + float(rng.uniform(-6, 6))
        path = [(tu, -200.0), (tu + 4.0, anat.carina_v), (tu + 10.0, bottom - 40.0),
                (float(rng.uniform(40.0, 80.0)), bottom + float(rng.uniform(10.0, 40.0)))]
        items.append({"kind": "ng_tube", "path": _curve(path), "r": 0.7, "mu": 0.15})
    if rng.random() < (0.3 if ap else 0.05):
        side = int(rng.choice([-1, 1]))
        path = [(side * float(rng.uniform(60, 110)), float(rng.uniform(5, 30))),
                (side * 40.0, float(rng.uniform(25, 45))), (-15.0, float(rng.uniform(60, 80))),
                (-18.0, float(rng.uniform(95, 125)))]
        items.append({"kind": "central_line", "path": _curve(path), "r": 0.8, "mu": 0.09})
    if rng.random() < 0.05:
        side = int(rng.choice([-1, 1], p=[0.25, 0.75]))
        u, v = side * float(rng.uniform(60.0, 105.0)), float(rng.uniform(10.0, 50.0))
        items.append({"kind": "pacemaker", "u": u, "v": v, "r": float(rng.uniform(20.0, 26.0)),
                      "mu": 0.12})
        heart = anat.heart
        for k in range(int(rng.integers(1, 3))):
            path = [(u, v), (u * 0.5, v + 20.0), (-10.0, float(rng.uniform(70, 100))),
                    (heart.lv_u - float(rng.uniform(0, 30)), heart.lv_v + float(rng.uniform(10, 40)))]
            items.append({"kind": "pacing_lead", "path": _curve(path), "r": 0.9, "mu": 0.2})
    if rng.random() < 0.15:
        u0, v0 = float(rng.uniform(-90, 90)), float(rng.uniform(-30, 40))
        for k in range(int(rng.integers(2, 6))):
            items.append({"kind": "snap", "u": u0 + float(rng.uniform(-4, 4)), "v": v0 + 28.0 * k,
                          "r": float(rng.uniform(3.0, 5.5)), "mu": 0.3})
    if anat.sex == "F" and rng.random() < 0.08:
        depth = float(rng.uniform(30, 90))
        for t in np.linspace(-1.0, 1.0, int(rng.integers(14, 30))):
            items.append({"kind": "bead", "u": 45.0 * float(t) * 1.3, "v": -40.0 + depth * (1 - t * t),
                          "r": float(rng.uniform(1.5, 3.0)), "mu": 0.4})
    return items


def render_devices(mu: np.ndarray, grid: Grid, items: list[dict]) -> None:
    """Draw the objects into the attenuation map."""
    for it in items:
        kind = it["kind"]
        if "path" in it:
            path, r = it["path"], it["r"]
            for p0, p1 in zip(path[:-1], path[1:]):
                add_tube(mu, grid, p0, p1, r, r, it["mu"], combine="max" if kind != "tubing" else "add")
                if kind == "tubing":   # hollow: the lumen is air
                    add_tube(mu, grid, p0, p1, 0.7 * r, 0.7 * r, -it["mu"])
        elif kind == "pacemaker":
            blk = grid.block(it["u"] - it["r"], it["u"] + it["r"], it["v"] - it["r"], it["v"] + it["r"])
            if blk is not None:
                sl, U, V = blk
                rho = np.maximum(np.abs(U - it["u"]) / it["r"], np.abs(V - it["v"]) / (0.8 * it["r"]))
                mu[sl] += (it["mu"] * 8.0 * np.clip((1.0 - rho) / 0.05, 0.0, 1.0)).astype(np.float32)
        else:
            add_disc(mu, grid, it["u"], it["v"], it["r"], it["mu"])


def device_box(it: dict) -> tuple[float, float, float, float]:
    """Anatomical box (u0, u1, v0, v1) of an object."""
    if "path" in it:
        return _box(it["path"], it["r"])
    r = it["r"]
    return it["u"] - r, it["u"] + r, it["v"] - r, it["v"] + r


def _text_mask(text: str, height_px: int) -> np.ndarray:
    """0..1 mask of ``text`` in Pillow's built-in font, about ``height_px`` tall."""
    font = ImageFont.load_default(size=max(6, int(height_px)))
    x0, y0, x1, y1 = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), text, font=font)
    canvas = Image.new("L", (max(1, x1 - x0 + 2), max(1, y1 - y0 + 2)), 0)
    ImageDraw.Draw(canvas).text((1 - x0, 1 - y0), text, fill=255, font=font)
    return np.asarray(canvas, np.float32) / 255.0


def sample_markers(rng: np.random.Generator, fov_w: float, fov_h: float, view: str) -> list[dict]:
    """Lead side markers (physical, in the beam) and burned-in annotations (FOV mm)."""
    items = []
    if rng.random() < 0.75:
        x = float(rng.uniform(0.04, 0.2) if rng.random() < 0.5 else rng.uniform(0.8, 0.96)) * fov_w
        items.append({"kind": "lead_marker", "text": str(rng.choice(_MARKERS)),
                      "x": x, "y": float(rng.uniform(0.03, 0.3)) * fov_h, "mm": float(rng.uniform(8.0, 16.0))})
    for _ in range(int(rng.integers(0, 5))):
        word = str(rng.choice(_WORDS))
        if rng.random() < 0.3:
            word = f"{int(rng.integers(2015, 2026))}-{int(rng.integers(1, 13)):02d}-{int(rng.integers(1, 29)):02d}"
        elif rng.random() < 0.2:
            word = f"{int(rng.integers(70, 130))} kV {rng.uniform(0.5, 6.0):.1f} mAs"
        if view == "AP" and rng.random() < 0.3:
            word = "PORTABLE"
        corner_x = float(rng.uniform(0.02, 0.25) if rng.random() < 0.5 else rng.uniform(0.6, 0.85))
        corner_y = float(rng.uniform(0.01, 0.1) if rng.random() < 0.6 else rng.uniform(0.88, 0.97))
        items.append({"kind": "text", "text": word, "x": corner_x * fov_w, "y": corner_y * fov_h,
                      "mm": float(rng.uniform(3.0, 8.0)), "white": bool(rng.random() < 0.85),
                      "backing": bool(rng.random() < 0.2)})
    return items


def render_lead_markers(mu: np.ndarray, grid: Grid, items: list[dict]) -> None:
    """Lead letters in a faint plastic tab, in the attenuation map (render grid)."""
    for it in items:
        if it["kind"] != "lead_marker":
            continue
        mask = _text_mask(it["text"], it["mm"] / grid.sy)
        i0, j0 = int(it["y"] / grid.sy), int(it["x"] / grid.sx)
        h, w = mask.shape
        i1, j1 = min(grid.rows, i0 + h), min(grid.cols, j0 + w)
        if i1 <= i0 or j1 <= j0:
            continue
        pad = max(1, int(2.0 / grid.sx))
        mu[max(0, i0 - pad):i1 + pad, max(0, j0 - pad):j1 + pad] += np.float32(MU_SOFT * 4.0)
        mu[i0:i1, j0:j1] += np.float32(3.0) * mask[:i1 - i0, :j1 - j0]


def burn_text(display: np.ndarray, spacing: float, items: list[dict]) -> None:
    """Burn annotations into a 0..1 display image in place (full resolution)."""
    rows, cols = display.shape
    for it in items:
        if it["kind"] != "text":
            continue
        mask = _text_mask(it["text"], it["mm"] / spacing)
        i0, j0 = int(it["y"] / spacing), int(it["x"] / spacing)
        h, w = mask.shape
        i1, j1 = min(rows, i0 + h), min(cols, j0 + w)
        if i1 <= i0 or j1 <= j0:
            continue
        region = display[i0:i1, j0:j1]
        m = mask[:i1 - i0, :j1 - j0]
        if it["backing"]:
            region[...] = 0.0 if it["white"] else 1.0
        target = 1.0 if it["white"] else 0.0
        region[...] = region * (1.0 - m) + np.float32(target) * m


def marker_box(it: dict, spacing: float) -> tuple[float, float, float, float]:
    """FOV-mm box of a marker or annotation (approximate text width)."""
    width = 0.62 * it["mm"] * max(1, len(it["text"]))
    return it["x"], it["y"], it["x"] + width, it["y"] + it["mm"] * 1.2
