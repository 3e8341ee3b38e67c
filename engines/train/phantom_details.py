"""Pulmonary vessels and confounders of the chest phantom.

Vessels branch from the hila and taper towards the periphery. Confounders are normal
findings or objects that look a little like nodules (nipple shadows, end-on vessels, ECG
electrodes, buttons); they appear in negative images too, so a detector learns to ignore
them. Each confounder is reported with its anatomical box for false-positive analysis.
"""
from __future__ import annotations

import logging
import math

import numpy as np

from engines.train.phantom_anatomy import Anatomy
from engines.train.phantom_geometry import LUNG_AIR, MU_SOFT, Grid, add_disc, add_tube

logger = logging.getLogger(__name__)

Segment = tuple[tuple[float, float], tuple[float, float], float, float]

# (angle in degrees in the lateral/down frame, radius mm, length mm)
_ROOTS = [(-85.0, 4.0, 28.0), (-50.0, 3.4, 24.0), (-15.0, 3.4, 24.0), (20.0, 3.8, 26.0), (55.0, 5.0, 30.0),
          (95.0, 4.4, 26.0)]


def grow_vessels(rng: np.random.Generator, anat: Anatomy) -> list[Segment]:
    """Branching vessel trees from both hila, grown level by level inside the lungs."""
    segments: list[Segment] = []
    for lung in anat.lungs:
        s = lung.side
        hu = s * lung.hilum_u + lung.mid_u
        hv = lung.hilum_v
        # live branches: start u, v, angle (deg), radius, length
        live = [(hu + s * float(rng.uniform(-4, 4)), hv + float(rng.uniform(-6, 6)),
                 ang + float(rng.uniform(-12, 12)), r * anat.size * float(rng.uniform(0.85, 1.15)),
                 ln * anat.size * float(rng.uniform(0.85, 1.15))) for ang, r, ln in _ROOTS]
        for level in range(6):
            if not live:
                break
            arr = np.asarray(live, dtype=np.float64)
            rad = np.radians(arr[:, 2])
            eu = arr[:, 0] + s * arr[:, 4] * np.cos(rad)
            ev = arr[:, 1] + arr[:, 4] * np.sin(rad)
            depth = lung.thickness(eu.astype(np.float32), ev.astype(np.float32))
            nxt = []
            for (u, v, ang, r, ln), e_u, e_v, dep in zip(live, eu, ev, depth):
                if dep < 10.0:
                    if level == 0:
                        continue
                    e_u, e_v = u + 0.5 * (e_u - u), v + 0.5 * (e_v - v)
                    segments.append(((u, v), (float(e_u), float(e_v)), r, r * 0.6))
                    continue
                r_end = r * 0.88
                segments.append(((u, v), (float(e_u), float(e_v)), r, r_end))
                if r_end < 0.8 or level == 5:
                    continue
                n_child = 3 if rng.random() < 0.2 else 2
                spread = float(rng.uniform(18.0, 34.0))
                for c in range(n_child):
                    off = spread * (c - (n_child - 1) / 2.0) * (2.0 / max(n_child - 1, 1))
                    nxt.append((float(e_u), float(e_v), ang + off + float(rng.uniform(-8, 8)),
                                r_end * float(rng.uniform(0.72, 0.86)), ln * float(rng.uniform(0.72, 0.92))))
            live = nxt
    return segments


def render_vessels(mu: np.ndarray, grid: Grid, segments: list[Segment], gain: float) -> None:
    """Draw vessel segments; one tree's overlapping joints are merged with a maximum."""
    buf = np.zeros_like(mu)
    for p0, p1, r0, r1 in segments:
        add_tube(buf, grid, p0, p1, r0, r1, LUNG_AIR * gain, combine="max")
    mu += buf


def render_hila(mu: np.ndarray, grid: Grid, anat: Anatomy) -> None:
    """Hilar shadows: the main pulmonary arteries and bronchi, a comma-shaped density."""
    for lung in anat.lungs:
        s = lung.side
        # from the mediastinal border out to where the vessel trees start
        inner = lung.med_base + (lung.trunk_amp if s > 0 else 0.0)
        cu = s * 0.5 * (inner + lung.hilum_u) + lung.mid_u
        cv = lung.hilum_v + (6.0 if s < 0 else -4.0)
        a, b = 0.5 * (lung.hilum_u - inner) + 4.0, 24.0 * anat.size
        blk = grid.block(cu - a, cu + a, cv - b, cv + b)
        if blk is None:
            continue
        sl, U, V = blk
        # lean the long axis outwards at the bottom, like the descending pulmonary arteries
        du = U - cu - s * 0.25 * (V - cv)
        rho = (du / a) ** 2 + ((V - cv) / b) ** 2
        mu[sl] += (LUNG_AIR * 20.0 * anat.size * np.clip(1.0 - rho, 0.0, 1.0)).astype(np.float32)


def end_on_vessels(rng: np.random.Generator, anat: Anatomy) -> list[dict]:
    """Vessels running along the beam: small dense dots (< 4 mm) in the inner lung."""
    dots = []
    for lung in anat.lungs:
        u0, u1, v0, v1 = lung.bbox()
        for _ in range(int(rng.integers(3, 9))):
            for _try in range(20):
                u, v = float(rng.uniform(u0, u1)), float(rng.uniform(v0, v1))
                if lung.point_depth(u, v) > 60.0 and abs(u - lung.side * lung.hilum_u) < 0.6 * lung.width:
                    r = float(rng.uniform(1.0, 1.9))
                    dots.append({"kind": "end_on_vessel", "u": u, "v": v, "r": r,
                                 "mu": LUNG_AIR * float(rng.uniform(2.0, 3.5))})
                    break
    return dots


def sample_confounders(rng: np.random.Generator, anat: Anatomy) -> list[dict]:
    """Nipple shadows, ECG electrodes with leads, buttons."""
    items: list[dict] = []
    if rng.random() < (0.6 if anat.sex == "F" else 0.35):
        sides = (-1, 1) if rng.random() < 0.7 else (int(rng.choice([-1, 1])),)
        v = anat.lungs[0].dome_v - float(rng.uniform(10.0, 60.0))
        r = float(rng.uniform(3.5, 6.5))
        length = float(rng.uniform(5.0, 12.0))
        for side in sides:
            lung = anat.lungs[(side + 1) // 2]
            items.append({"kind": "nipple", "u": side * lung.width * float(rng.uniform(0.55, 0.72)),
                          "v": v + float(rng.uniform(-8.0, 8.0)), "r": r, "length": length})
    if rng.random() < 0.15:
        for _ in range(int(rng.integers(2, 6))):
            side = int(rng.choice([-1, 1]))
            lung = anat.lungs[(side + 1) // 2]
            u = side * float(rng.uniform(20.0, lung.width + 20.0))
            v = float(rng.uniform(-30.0, lung.base_v + 40.0))
            wire = [(u, v)]
            ang = math.radians(float(rng.uniform(0, 360)))
            for _k in range(int(rng.integers(3, 7))):
                ang += math.radians(float(rng.uniform(-35, 35)))
                step = float(rng.uniform(30.0, 70.0))
                wire.append((wire[-1][0] + step * math.cos(ang), wire[-1][1] + step * math.sin(ang)))
            items.append({"kind": "electrode", "u": u, "v": v, "r": float(rng.uniform(9.0, 13.0)),
                          "wire": wire, "wire_r": float(rng.uniform(0.5, 0.9))})
    if rng.random() < 0.08:
        u = float(rng.uniform(-40.0, 40.0))
        v = float(rng.uniform(60.0, 160.0))
        gap = float(rng.uniform(60.0, 90.0))
        for k in range(int(rng.integers(1, 5))):
            items.append({"kind": "button", "u": u + float(rng.uniform(-3, 3)), "v": v + k * gap,
                          "r": float(rng.uniform(4.5, 8.0))})
    return items


def render_confounders(mu: np.ndarray, grid: Grid, items: list[dict]) -> None:
    """Draw nipples, end-on vessels, electrodes (foam pad, metal snap, lead) and buttons."""
    for it in items:
        kind, u, v, r = it["kind"], it["u"], it["v"], it["r"]
        if kind == "end_on_vessel":
            add_disc(mu, grid, u, v, r, it["mu"])
        elif kind == "nipple":
            blk = grid.block(u - r, u + r, v - r, v + r)
            if blk is not None:
                sl, U, V = blk
                rho2 = ((U - u) ** 2 + (V - v) ** 2) / (r * r)
                mu[sl] += (MU_SOFT * it["length"] * np.sqrt(np.clip(1.0 - rho2 ** 2, 0.0, 1.0))).astype(np.float32)
        elif kind == "electrode":
            add_disc(mu, grid, u, v, r, 0.002)
            add_disc(mu, grid, u, v, 3.5, 0.09)
            add_disc(mu, grid, u, v, 1.6, 0.25)
            wire = it["wire"]
            for p0, p1 in zip(wire[:-1], wire[1:]):
                add_tube(mu, grid, p0, p1, it["wire_r"], it["wire_r"], 0.12)
        elif kind == "button":
            add_disc(mu, grid, u, v, r, 0.012)
            for k in range(4):
                ang = math.pi / 4 + k * math.pi / 2
                add_disc(mu, grid, u + 0.35 * r * math.cos(ang), v + 0.35 * r * math.sin(ang),
                         0.15 * r, -0.012 * r / (0.15 * r))


def confounder_box(it: dict) -> tuple[float, float, float, float]:
    """Anatomical box (u0, u1, v0, v1) of a confounder's main shadow."""
    r = it["r"]
    return it["u"] - r, it["u"] + r, it["v"] - r, it["v"] + r
