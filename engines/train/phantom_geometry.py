"""Geometry primitives for the chest phantom: the render grid and projected shapes.

Everything is described in anatomical millimetres: ``u`` runs from the patient's right
(image left on a PA/AP image) to the patient's left, ``v`` runs downwards (head to foot),
with the origin on the midline at the level of the lung apices. Shapes add attenuation
line integrals (dimensionless ``mu * thickness``) to a float32 map over a sub-block of the
grid, so the cost of a small shape does not depend on the image size.
"""
from __future__ import annotations

import logging
import math

import numpy as np

logger = logging.getLogger(__name__)

# Linear attenuation at the effective energy of a chest exposure (about 60 keV), per mm.
MU_SOFT = 0.020          # soft tissue / water
MU_FAT_DEFICIT = 0.002   # fat attenuates this much less than soft tissue
LUNG_AIR = 0.016         # attenuation missing per mm of aerated lung (air fraction ~0.8)
MU_CORTEX = 0.040        # cortical bone, net of the soft tissue it replaces
MU_MARROW = 0.008        # trabecular bone, net


class Grid:
    """A pixel grid over the field of view with a rigid map to anatomical coordinates.

    ``X``/``Y`` are field-of-view millimetres from the top-left corner of the image, pixel
    ``(i, j)`` covers ``[j*sx, (j+1)*sx) x [i*sy, (i+1)*sy)``. The anatomical origin sits
    at ``(cx, cy)`` and the patient is tilted in-plane by ``angle`` radians.
    """

    def __init__(self, rows: int, cols: int, sy: float, sx: float,
                 cx: float, cy: float, angle: float) -> None:
        self.rows, self.cols = int(rows), int(cols)
        self.sy, self.sx = float(sy), float(sx)
        self.cx, self.cy = float(cx), float(cy)
        self.cos, self.sin = math.cos(angle), math.sin(angle)
        self.xs = ((np.arange(self.cols, dtype=np.float32) + 0.5) * self.sx - self.cx)
        self.ys = ((np.arange(self.rows, dtype=np.float32) + 0.5) * self.sy - self.cy)

    def to_fov(self, u: float, v: float) -> tuple[float, float]:
        """Anatomical mm to field-of-view mm."""
        return (self.cx + self.cos * u - self.sin * v, self.cy + self.sin * u + self.cos * v)

    def box_to_fov(self, u0: float, u1: float, v0: float, v1: float) -> tuple[float, float, float, float]:
        """Axis-aligned field-of-view box around an anatomical box."""
        pts = [self.to_fov(u, v) for u in (u0, u1) for v in (v0, v1)]
        xs = [p[0] for p in pts]
        ys = [p[1] for p in pts]
        return min(xs), min(ys), max(xs), max(ys)

    def block(self, u0: float, u1: float, v0: float, v1: float):
        """Slices and anatomical coordinate arrays ``(U, V)`` covering an anatomical box.

        Returns ``None`` when the box misses the grid.
        """
        x0, y0, x1, y1 = self.box_to_fov(u0, u1, v0, v1)
        j0 = max(0, int(math.floor(x0 / self.sx - 0.5)))
        j1 = min(self.cols, int(math.ceil(x1 / self.sx + 0.5)) + 1)
        i0 = max(0, int(math.floor(y0 / self.sy - 0.5)))
        i1 = min(self.rows, int(math.ceil(y1 / self.sy + 0.5)) + 1)
        if j0 >= j1 or i0 >= i1:
            return None
        x = self.xs[np.newaxis, j0:j1]
        y = self.ys[i0:i1, np.newaxis]
        c, s = np.float32(self.cos), np.float32(self.sin)
        if self.sin == 0.0:
            U = np.broadcast_to(x, (i1 - i0, j1 - j0))
            V = np.broadcast_to(y, (i1 - i0, j1 - j0))
        else:
            U = c * x + s * y
            V = c * y - s * x
        return (slice(i0, i1), slice(j0, j1)), U, V

    def full(self):
        """The whole grid as a block."""
        return self.block(-1e6, 1e6, -1e6, 1e6)


def sphere(d2: np.ndarray, r: float) -> np.ndarray:
    """Projected thickness of a sphere of radius ``r`` at squared distance ``d2``."""
    return 2.0 * np.sqrt(np.maximum(np.float32(r * r) - d2, 0.0))


def shell(d: np.ndarray, r, cortex: float, mu_cortex: float, mu_core: float) -> np.ndarray:
    """Line integral across a tube with a cortical shell (bright edges, fainter middle)."""
    d2 = d * d
    outer = 2.0 * np.sqrt(np.maximum(r * r - d2, 0.0))
    ri = np.maximum(r - cortex, 0.2)
    inner = 2.0 * np.sqrt(np.maximum(ri * ri - d2, 0.0))
    return mu_cortex * (outer - inner) + mu_core * inner


def add_disc(mu: np.ndarray, grid: Grid, u: float, v: float, r: float, mu_per_mm: float) -> None:
    """Add a projected sphere (a nodule, a dot) centred at ``(u, v)``."""
    blk = grid.block(u - r, u + r, v - r, v + r)
    if blk is None:
        return
    sl, U, V = blk
    mu[sl] += np.float32(mu_per_mm) * sphere((U - u) ** 2 + (V - v) ** 2, r)


def add_tube(mu: np.ndarray, grid: Grid, p0: tuple[float, float], p1: tuple[float, float],
             r0: float, r1: float, mu_per_mm: float, *, combine: str = "add") -> None:
    """Add a tapered round tube (a vessel, a streak, a wire) from ``p0`` to ``p1``.

    ``combine="max"`` keeps the larger of the existing and new value, which joins the
    segments of one branching tree without bright double-counted joints.
    """
    (u0, v0), (u1, v1) = p0, p1
    rm = max(r0, r1)
    blk = grid.block(min(u0, u1) - rm, max(u0, u1) + rm, min(v0, v1) - rm, max(v0, v1) + rm)
    if blk is None:
        return
    sl, U, V = blk
    du, dv = u1 - u0, v1 - v0
    l2 = max(du * du + dv * dv, 1e-6)
    Ur, Vr = U - np.float32(u0), V - np.float32(v0)
    t = np.clip((Ur * np.float32(du) + Vr * np.float32(dv)) * np.float32(1.0 / l2), 0.0, 1.0)
    d2 = (Ur - t * np.float32(du)) ** 2 + (Vr - t * np.float32(dv)) ** 2
    r = np.float32(r0) + np.float32(r1 - r0) * t
    val = np.float32(mu_per_mm) * 2.0 * np.sqrt(np.maximum(r * r - d2, 0.0))
    if combine == "max":
        np.maximum(mu[sl], val, out=mu[sl])
    else:
        mu[sl] += val


def smoothstep(x: np.ndarray) -> np.ndarray:
    """Cubic 0..1 ramp for x in 0..1 (clipped)."""
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


class ValueNoise:
    """Smooth random field on a coarse lattice (cell in mm), evaluated anywhere."""

    def __init__(self, rng: np.random.Generator, u0: float, v0: float, width: float,
                 height: float, cell: float) -> None:
        # the lattice is rotated by a random angle so that thresholded blobs are not square
        self.angle = float(rng.uniform(0.0, math.pi / 2))
        self.cu, self.cv = u0 + width / 2, v0 + height / 2
        half = 0.75 * max(width, height)
        self.u0, self.v0, self.cell = self.cu - half, self.cv - half, cell
        self.nu = self.nv = int(math.ceil(2 * half / cell)) + 2
        self.lattice = rng.random((self.nv, self.nu)).astype(np.float32)

    def __call__(self, U: np.ndarray, V: np.ndarray) -> np.ndarray:
        c, s = np.float32(math.cos(self.angle)), np.float32(math.sin(self.angle))
        du, dv = U - np.float32(self.cu), V - np.float32(self.cv)
        ru, rv = c * du - s * dv + np.float32(self.cu), s * du + c * dv + np.float32(self.cv)
        fu = np.clip((ru - self.u0) / self.cell, 0.0, self.nu - 1.001)
        fv = np.clip((rv - self.v0) / self.cell, 0.0, self.nv - 1.001)
        iu = fu.astype(np.int32)
        iv = fv.astype(np.int32)
        tu = smoothstep(fu - iu)
        tv = smoothstep(fv - iv)
        lat = self.lattice
        top = lat[iv, iu] * (1 - tu) + lat[iv, iu + 1] * tu
        bottom = lat[iv + 1, iu] * (1 - tu) + lat[iv + 1, iu + 1] * tu
        return (top * (1 - tv) + bottom * tv).astype(np.float32, copy=False)


def lowpass(image: np.ndarray, cell_px: int, passes: int = 3) -> np.ndarray:
    """Large-kernel smoothing: block-average by ``cell_px``, blur, upsample bilinearly."""
    from PIL import Image

    h, w = image.shape
    cell_px = max(1, int(cell_px))
    hs, ws = max(1, h // cell_px), max(1, w // cell_px)
    small = np.asarray(Image.fromarray(np.ascontiguousarray(image, dtype=np.float32))
                       .resize((ws, hs), Image.Resampling.BOX), dtype=np.float32)
    for _ in range(passes):
        padded = np.pad(small, 1, mode="edge")
        small = (padded[1:-1, :-2] + padded[1:-1, 1:-1] + padded[1:-1, 2:]) / 3.0
        padded = np.pad(small, 1, mode="edge")
        small = (padded[:-2, 1:-1] + padded[1:-1, 1:-1] + padded[2:, 1:-1]) / 3.0
    return resize_bilinear(small.astype(np.float32), h, w)


def resize_bilinear(image: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Bilinear resize of a float32 image (PIL, area-aligned pixel centres)."""
    from PIL import Image

    if image.shape == (rows, cols):
        return image
    out = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32)).resize(
        (cols, rows), Image.Resampling.BILINEAR)
    return np.array(out, dtype=np.float32)      # a writable copy
