"""Tuberculosis patterns with ground truth (nodules and masses live in ``phantom_masses``).

TB patterns: upper-zone patchy consolidation, cavities,
fibrotic streaks with volume loss, miliary nodules and pleural effusion. Volume loss
changes the anatomy (lower apex, elevated hilum, pulled trachea), so ``plan_tb`` runs
before the anatomy is drawn. Boxes are returned in field-of-view millimetres.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from engines.train.phantom_anatomy import Anatomy, Lung
from engines.train.phantom_geometry import LUNG_AIR, Grid, ValueNoise, add_tube, smoothstep, sphere

logger = logging.getLogger(__name__)

TB_KINDS = ("consolidation", "cavity", "fibrosis", "miliary", "effusion")


@dataclass
class TBPattern:
    kind: str
    side: int
    severity: float                  # 0 subtle .. 1 obvious
    params: dict = field(default_factory=dict)


def plan_tb(rng: np.random.Generator, anat: Anatomy) -> list[TBPattern]:
    """Choose 1-3 TB patterns and apply volume loss to the anatomy (in place)."""
    n = int(rng.choice([1, 2, 3], p=[0.45, 0.35, 0.2]))
    kinds = rng.choice(list(TB_KINDS), size=n, replace=False, p=[0.3, 0.2, 0.2, 0.12, 0.18])
    side = int(rng.choice([-1, 1], p=[0.6, 0.4]))
    plans = []
    for kind in kinds:
        sev = float(rng.random())
        pside = side if rng.random() < 0.75 else -side
        p = TBPattern(kind=str(kind), side=pside, severity=sev)
        lung = anat.lungs[(pside + 1) // 2]
        if kind == "fibrosis":
            loss = 6.0 + 22.0 * sev
            lung.apex_v += loss
            lung.hilum_v -= 8.0 + 18.0 * sev
            lung.width *= 1.0 - 0.06 * sev
            anat.trachea_u += pside * (3.0 + 9.0 * sev)
        p.params["seed"] = int(rng.integers(0, 2**31))
        plans.append(p)
    return plans


def _upper_zone(lung: Lung) -> tuple[float, float, float, float]:
    h = lung.base_v - lung.apex_v
    return (lung.side * 0.52 * lung.width, lung.apex_v + 0.24 * h, 0.36 * lung.width, 0.22 * h)


def _block_extent(grid: Grid, sl, mask: np.ndarray) -> tuple[float, float, float, float] | None:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    i0, i1 = sl[0].start + rows[0], sl[0].start + rows[-1] + 1
    j0, j1 = sl[1].start + cols[0], sl[1].start + cols[-1] + 1
    return j0 * grid.sx, i0 * grid.sy, j1 * grid.sx, i1 * grid.sy


def render_tb(mu: np.ndarray, grid: Grid, anat: Anatomy, plans: list[TBPattern]) -> list[dict]:
    """Draw the planned TB patterns; returns ``{"kind", "box"}`` with FOV-mm boxes."""
    out = []
    for p in plans:
        rng = np.random.default_rng(p.params["seed"])
        lung = anat.lungs[(p.side + 1) // 2]
        box = _DRAW[p.kind](mu, grid, anat, lung, p.severity, rng)
        if box is not None:
            out.append({"kind": p.kind, "box": list(box), "severity": round(p.severity, 3),
                        "side": "right" if p.side < 0 else "left"})
    return out


def _consolidation(mu, grid, anat, lung, sev, rng):
    cu, cv, au, av = _upper_zone(lung)
    au, av = au * (0.7 + 0.5 * sev), av * (0.7 + 0.6 * sev)
    blk = grid.block(cu - au, cu + au, cv - av, cv + av)
    if blk is None:
        return None
    sl, U, V = blk
    field_ = np.zeros_like(U, dtype=np.float32)
    for cell, weight in ((18.0, 0.55), (9.0, 0.3), (4.5, 0.15)):
        field_ += weight * ValueNoise(rng, cu - au, cv - av, 2 * au, 2 * av, cell)(U, V)
    zone = np.clip(1.0 - ((U - cu) / au) ** 2 - ((V - cv) / av) ** 2, 0.0, 1.0) ** 0.5
    thr = 0.54 - 0.14 * sev
    patch = smoothstep((field_ * (0.55 + 0.45 * zone) - thr) / 0.22) * (zone > 0)
    depth = np.minimum(lung.thickness(U, V), 70.0)     # the consolidated lobe, not the whole lung depth
    amp = 0.35 + 0.4 * sev
    add = LUNG_AIR * amp * depth * patch
    mu[sl] += add.astype(np.float32)
    return _block_extent(grid, sl, add > 0.2 * max(float(add.max()), 1e-6))


def _cavity(mu, grid, anat, lung, sev, rng):
    cu0, cv0, au, av = _upper_zone(lung)
    ro = 9.0 + 14.0 * sev
    for _ in range(50):
        u = cu0 + float(rng.uniform(-0.6, 0.6)) * au
        v = cv0 + float(rng.uniform(-0.6, 0.6)) * av
        if lung.point_depth(u, v) > 2 * ro + 10:
            break
    wall = float(rng.uniform(2.0, 6.0))
    ri = ro - wall
    halo = ro * 1.8
    blk = grid.block(u - halo, u + halo, v - halo, v + halo)
    if blk is None:
        return None
    sl, U, V = blk
    d2 = (U - u) ** 2 + (V - v) ** 2
    val = LUNG_AIR * (sphere(d2, ro) - sphere(d2, ri)) - 0.35 * LUNG_AIR * sphere(d2, ri)
    if rng.random() < 0.3:
        val = val + LUNG_AIR * sphere(d2, ri) * (V > v + 0.3 * ri)
    noise = ValueNoise(rng, u - halo, v - halo, 2 * halo, 2 * halo, 7.0)(U, V)
    halo_w = np.clip(1.0 - d2 / (halo * halo), 0.0, 1.0) * smoothstep((noise - 0.35) / 0.3)
    val = val + LUNG_AIR * (0.1 + 0.2 * sev) * lung.thickness(U, V) * halo_w * 0.5
    mu[sl] += val.astype(np.float32)
    return grid.box_to_fov(u - ro, u + ro, v - ro, v + ro)


def _fibrosis(mu, grid, anat, lung, sev, rng):
    s = lung.side
    hu, hv = s * lung.hilum_u + lung.mid_u, lung.hilum_v
    pts = []
    for _ in range(int(6 + 10 * sev)):
        u, v = hu + s * float(rng.uniform(-5, 15)), hv + float(rng.uniform(-10, 5))
        ang = math.radians(float(rng.uniform(-150.0, -50.0)))
        r = float(rng.uniform(0.8, 1.8))
        for _k in range(4):
            ang += math.radians(float(rng.uniform(-18, 18)))
            step = float(rng.uniform(12.0, 24.0))
            nu, nv = u + s * step * math.cos(ang), v + step * math.sin(ang)
            if lung.point_depth(nu, nv) < 5.0:
                break
            add_tube(mu, grid, (u, v), (nu, nv), r, r * 0.85, LUNG_AIR * float(rng.uniform(1.5, 2.5)))
            pts += [(u, v), (nu, nv)]
            u, v, r = nu, nv, r * 0.85
    cu, cv, au, av = _upper_zone(lung)
    cv -= 0.3 * av
    blk = grid.block(cu - au, cu + au, cv - av, cv + av)
    if blk is not None:
        sl, U, V = blk
        scar = ValueNoise(rng, cu - au, cv - av, 2 * au, 2 * av, 5.0)(U, V)
        zone = np.clip(1.0 - ((U - cu) / au) ** 2 - ((V - cv) / av) ** 2, 0.0, 1.0)
        net = smoothstep((np.abs(scar - 0.5) < 0.06) * zone * (0.5 + sev))
        mu[sl] += (LUNG_AIR * 0.25 * (0.4 + 0.6 * sev) * lung.thickness(U, V) * net).astype(np.float32)
    top = lung.apex_v - 10.0
    us = [p[0] for p in pts] + [s * lung.apex_u - 20, s * lung.apex_u + 20]
    vs = [p[1] for p in pts] + [top]
    return grid.box_to_fov(min(us), max(us), min(vs), max(vs))


def _miliary(mu, grid, anat, lung, sev, rng):
    n = int(1500 + 3500 * sev)
    boxes = [lg.bbox() for lg in anat.lungs]
    u_lo, u_hi = min(b[0] for b in boxes), max(b[1] for b in boxes)
    v_lo, v_hi = min(b[2] for b in boxes), max(b[3] for b in boxes)
    cand_u = rng.uniform(u_lo, u_hi, 4 * n).astype(np.float32)
    cand_v = rng.uniform(v_lo, v_hi, 4 * n).astype(np.float32)
    depth = np.maximum(*(lg.thickness(cand_u, cand_v) for lg in anat.lungs))
    keep = np.flatnonzero(depth > 25.0)[:n]
    us, vs = cand_u[keep], cand_v[keep]
    radii = rng.uniform(0.5, 1.5, keep.size).astype(np.float32)
    gain = float(2.5 + 1.5 * sev)     # a dot stands for the dots summed along the beam
    xs = grid.cx + grid.cos * us - grid.sin * vs
    ys = grid.cy + grid.sin * us + grid.cos * vs
    for lo, hi in ((0.5, 0.85), (0.85, 1.2), (1.2, 1.51)):
        sel = (radii >= lo) & (radii < hi)
        if not sel.any():
            continue
        r = 0.5 * (lo + hi)
        kr = int(math.ceil(r / min(grid.sx, grid.sy)))
        oy, ox = np.mgrid[-kr:kr + 1, -kr:kr + 1]
        kern = sphere((ox * grid.sx) ** 2 + (oy * grid.sy) ** 2, max(r, 0.75 * max(grid.sx, grid.sy)))
        kern = kern * ((4.0 / 3.0) * math.pi * r ** 3 / max(kern.sum() * grid.sx * grid.sy, 1e-6))
        ci = np.floor(ys[sel] / grid.sy).astype(np.int64)
        cj = np.floor(xs[sel] / grid.sx).astype(np.int64)
        for dy in range(-kr, kr + 1):
            for dx in range(-kr, kr + 1):
                w = kern[dy + kr, dx + kr]
                if w <= 0:
                    continue
                ii, jj = ci + dy, cj + dx
                ok = (ii >= 0) & (ii < grid.rows) & (jj >= 0) & (jj < grid.cols)
                np.add.at(mu, (ii[ok], jj[ok]), np.float32(LUNG_AIR * gain * w))
    if keep.size == 0:
        return None
    return (float(xs.min()) - 2, float(ys.min()) - 2, float(xs.max()) + 2, float(ys.max()) + 2)


def _effusion(mu, grid, anat, lung, sev, rng):
    s = lung.side
    level0 = lung.base_v - (24.0 + 100.0 * sev ** 1.3)
    rise = 12.0 + 25.0 * sev
    u0, u1, _, v1 = lung.bbox()
    blk = grid.block(u0, u1, level0 - rise - 15.0, v1)
    if blk is None:
        return None
    sl, U, V = blk
    a = s * U
    medial, lateral = lung.edges(V)
    frac = np.clip((a - medial - s * lung.mid_u) / np.maximum(lateral - medial, 1.0), 0.0, 1.0)
    level = level0 - rise * frac ** 2
    fill = smoothstep((V - level) / 14.0)
    depth = np.maximum(lung.thickness(U, V) - anat.heart.thickness(U, V), 0.0)
    add = LUNG_AIR * depth * fill
    mu[sl] += add.astype(np.float32)
    return _block_extent(grid, sl, add > 0.25 * LUNG_AIR * 20.0)


_DRAW = {"consolidation": _consolidation, "cavity": _cavity, "fibrosis": _fibrosis,
         "miliary": _miliary, "effusion": _effusion}
