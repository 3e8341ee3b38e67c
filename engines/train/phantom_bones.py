"""Bones of the chest phantom: ribs, clavicles, spine, scapulae and humeral heads.

Each hemi-rib is a planar loop around the chest, which projects on a frontal image as a
half-ellipse: the upper arc is the posterior rib (from the spine, dense, narrow) and the
lower arc the anterior rib (to the costochondral junction, fainter and broader). Bones are
tubes with a cortical shell, so their margins are brighter than their middle.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from engines.train.phantom_anatomy import Anatomy
from engines.train.phantom_geometry import (
    MU_CORTEX, MU_MARROW, Grid, shell, smoothstep, sphere,
)

logger = logging.getLogger(__name__)


@dataclass
class Rib:
    side: int
    cu: float          # lateral distance of the ellipse centre (top of the posterior arc)
    cv: float          # level of the ellipse centre (lateral turning point)
    a: float           # horizontal semi-axis
    c_up: float        # vertical semi-axis of the posterior arc
    c_low: float       # vertical semi-axis of the anterior arc
    phi_med: float     # end angle of the posterior arc at the spine (radians, > 0)
    phi_ant: float     # end angle of the anterior arc (radians, < 0)
    psi: float         # tilt: lateral part lower
    hw_post: float
    hw_ant: float
    density: float
    ant_density: float


def make_ribs(rng: np.random.Generator, anat: Anatomy) -> list[Rib]:
    """Eleven hemi-ribs per side spaced by the anatomy's rib spacing."""
    ribs = []
    dv = anat.rib_spacing
    for lung in anat.lungs:
        for k in range(1, 12):
            top = lung.chest_top - 7.0 + (k - 1) * dv * float(rng.uniform(0.97, 1.03))
            c_up = 16.0 if k == 1 else min(18.0 + 3.2 * k, 42.0) * float(rng.uniform(0.9, 1.1))
            cv = top + c_up
            _, lateral = lung.edges(np.array([cv + 10.0]))
            lat = float(lateral[0]) + 3.0
            if k >= 9:
                lat = lung.width + 4.0
            cu = lat * (0.45 if k == 1 else 0.33)
            a = lat - cu
            phi_med = math.acos(float(np.clip((18.0 - cu) / a, -0.99, 0.99)))
            a_end = (30.0 if k == 1 else 36.0 + 5.0 * k + (12.0 * (k - 6) if k > 6 else 0.0))
            a_end *= float(rng.uniform(0.9, 1.1))
            phi_ant = -math.acos(float(np.clip((a_end - cu) / a, -0.99, 0.99)))
            drop = (2.2 if k == 1 else 3.1 if k < 7 else 2.6) * dv
            c_low = max((drop - c_up) / max(math.sin(-phi_ant), 0.2), c_up)
            if k >= 10:
                phi_ant = -0.5 if k == 10 else -0.3
            ribs.append(Rib(
                side=lung.side, cu=cu, cv=cv, a=a, c_up=c_up, c_low=c_low,
                phi_med=phi_med, phi_ant=phi_ant,
                psi=math.radians(max(0.0, k - 3) * 1.2 * float(rng.uniform(0.6, 1.4))),
                hw_post=(5.8 if k == 1 else 4.6) * float(rng.uniform(0.9, 1.12)) * anat.size,
                hw_ant=6.6 * float(rng.uniform(0.9, 1.12)) * anat.size,
                density=float(rng.uniform(0.88, 1.12)),
                ant_density=float(rng.uniform(0.42, 0.62)) * (1.0 if k < 7 else 0.7 if k == 7 else 0.45),
            ))
    return ribs


def _draw_rib_part(mu: np.ndarray, grid: Grid, rib: Rib, scale: float, posterior: bool) -> None:
    s = rib.side
    hw = max(rib.hw_post, rib.hw_ant)
    drop = rib.a * math.sin(rib.psi)
    if posterior:
        a0, a1 = 18.0 - hw, rib.cu + rib.a + hw
        v0, v1 = rib.cv - rib.c_up - hw, rib.cv + hw + drop
    else:
        a0 = rib.cu + rib.a * math.cos(rib.phi_ant) - 2 * hw
        a1 = rib.cu + rib.a + hw
        v0, v1 = rib.cv - hw, rib.cv + rib.c_low + hw + drop
    blk = grid.block(min(s * a0, s * a1), max(s * a0, s * a1), v0, v1)
    if blk is None:
        return
    sl, U, V = blk
    P = s * U - np.float32(rib.cu)
    Q = V - np.float32(rib.cv)
    if rib.psi:
        c, sn = np.float32(math.cos(rib.psi)), np.float32(math.sin(rib.psi))
        P, Q = c * P + sn * Q, c * Q - sn * P
    cvert = np.where(Q < 0, np.float32(rib.c_up), np.float32(rib.c_low))
    x = P / np.float32(rib.a)
    y = Q / cvert
    rho = np.sqrt(x * x + y * y) + np.float32(1e-4)
    grad = np.sqrt((x / rib.a) ** 2 + (y / cvert) ** 2) / rho
    d = (rho - 1.0) / np.maximum(grad, 1e-4)
    phi = np.arctan2(-y, x)
    if posterior:
        inside = (phi >= 0) & (phi <= rib.phi_med)
    else:
        inside = (phi < 0) & (phi >= rib.phi_ant)
    t = np.clip((0.2 - phi) / 0.7, 0.0, 1.0)
    r = rib.hw_post + (rib.hw_ant - rib.hw_post) * t
    dens = rib.density * (1.0 - (1.0 - rib.ant_density) * t)
    fade = np.clip((rib.phi_med - phi) / 0.12, 0.0, 1.0) * np.clip((phi - rib.phi_ant) / 0.1, 0.0, 1.0)
    near = np.abs(d) < r
    val = shell(np.where(near, d, r), r, 1.3, MU_CORTEX, MU_MARROW)
    mu[sl] += np.where(inside, val * (dens * fade * scale), 0.0).astype(np.float32)


def render_ribs(mu: np.ndarray, grid: Grid, anat: Anatomy, ribs: list[Rib]) -> None:
    """Posterior and anterior arcs of every rib."""
    scale = 0.6 * anat.bone_factor
    for rib in ribs:
        _draw_rib_part(mu, grid, rib, scale, posterior=True)
        _draw_rib_part(mu, grid, rib, scale, posterior=False)


def render_clavicles(mu: np.ndarray, grid: Grid, anat: Anatomy, rng: np.random.Generator) -> None:
    """S-shaped clavicles from the sternal notch towards the shoulders."""
    for side in (-1, 1):
        a0 = float(rng.uniform(16.0, 26.0))
        a1 = float(rng.uniform(135.0, 165.0)) * anat.size
        v0 = anat.clavicle_v + float(rng.uniform(-4.0, 4.0))
        rise = anat.clavicle_rise + float(rng.uniform(-4.0, 4.0))
        bend = float(rng.uniform(3.0, 8.0))
        blk = grid.block(min(side * a0, side * a1) - 10, max(side * a0, side * a1) + 10,
                         v0 - rise - 25.0, v0 + 25.0)
        if blk is None:
            continue
        sl, U, V = blk
        tau = (side * U - a0) / (a1 - a0)
        tc = np.clip(tau, 0.0, 1.0)
        center = v0 - rise * tc + bend * np.sin(2.0 * math.pi * tc) * 0.5
        slope = (-rise + bend * math.pi * np.cos(2.0 * math.pi * tc)) / (a1 - a0)
        d = (V - center) / np.sqrt(1.0 + slope * slope)
        hw = (5.5 + 3.5 * np.exp(-(tc / 0.1) ** 2) + 2.0 * np.exp(-((1.0 - tc) / 0.15) ** 2)) * anat.size
        ends = smoothstep(tau / 0.03) * smoothstep((1.0 - tau) / 0.05)
        val = shell(np.minimum(np.abs(d), hw), hw, 1.6, MU_CORTEX, MU_MARROW)
        mu[sl] += (0.85 * anat.bone_factor * ends * val).astype(np.float32)


def render_spine(mu: np.ndarray, grid: Grid, anat: Anatomy) -> None:
    """Vertebral bodies with endplates, pedicles and spinous processes, behind the mediastinum."""
    su = anat.spine_u
    period = anat.rib_spacing
    v_start = anat.lungs[0].chest_top - 6.0 - 3 * period
    blk = grid.block(su - 45.0, su + 45.0, v_start, 1e5)
    if blk is None:
        return
    sl, U, V = blk
    du = U - np.float32(su)
    half = (13.0 + 9.0 * np.clip((V + 60.0) / 330.0, 0.0, 1.0)) * anat.size
    ph = np.mod((V - v_start) / period, 1.0)
    body_v = (0.45 + 0.55 * smoothstep(ph / 0.06) * smoothstep((0.8 - ph) / 0.06)) * (V > v_start)
    body = shell(np.minimum(np.abs(du), half), half, 1.6, 0.6 * MU_CORTEX, MU_MARROW)
    plate = (np.exp(-((ph - 0.03) * period / 1.2) ** 2) + np.exp(-((ph - 0.77) * period / 1.2) ** 2))
    across = np.sqrt(np.clip(1.0 - (du / half) ** 2, 0.0, 1.0))
    val = 0.45 * body * body_v + 0.05 * plate * across * (V > v_start)
    pv = (ph - 0.3) * period
    for sign in (-1.0, 1.0):
        rho = np.sqrt(((du - sign * (half - 5.0)) / 3.6) ** 2 + (pv / 5.5) ** 2)
        val = val + 0.06 * np.exp(-((rho - 1.0) / 0.3) ** 2) + 0.02 * (rho < 1.0)
    spin = ((du / 4.0) ** 2 + (((ph - 0.72) * period) / 7.0) ** 2) < 1.0
    val = val + 0.04 * spin
    mu[sl] += (anat.bone_factor * val).astype(np.float32)


def render_shoulders(mu: np.ndarray, grid: Grid, anat: Anatomy) -> None:
    """Scapulae (medial border over the lateral lung when the shoulders are not rotated
    forward) and the humeral heads in the upper corners."""
    for lung in anat.lungs:
        s = lung.side
        v_top = lung.chest_top + 5.0
        v_inf = lung.dome_v * 0.62
        med_top = lung.width - anat.scapula_overlap
        blk = grid.block(min(s * (med_top - 10), s * (lung.width + 80)), max(s * (med_top - 10), s * (lung.width + 80)),
                         v_top - 30.0, v_inf + 5.0)
        if blk is not None:
            sl, U, V = blk
            a = s * U
            med = med_top + 0.12 * (V - v_top)
            frac = np.clip((v_inf - V) / (v_inf - v_top), 0.0, 1.0)
            lat = med_top + 0.12 * (v_inf - v_top) + (lung.width + 45.0 - med_top) * frac ** 0.7
            inside = smoothstep((a - med) / 3.0) * smoothstep((lat - a) / 5.0)
            vert = smoothstep((V - v_top + 25.0) / 20.0) * smoothstep((v_inf - V) / 4.0)
            ridge = np.exp(-((a - med - 1.5) / 1.4) ** 2) * vert
            mu[sl] += (anat.bone_factor * (0.07 * inside * vert + 0.07 * ridge)).astype(np.float32)
        hu, hv, r = s * (anat.body_half_width - 8.0), anat.shoulder_v + 8.0, 24.0 * anat.size
        blk = grid.block(hu - r, hu + r, hv - r, hv + r)
        if blk is not None:
            sl, U, V = blk
            d2 = (U - hu) ** 2 + (V - hv) ** 2
            ball = MU_MARROW * sphere(d2, r) + MU_CORTEX * (sphere(d2, r) - sphere(d2, r - 2.0))
            mu[sl] += (0.4 * anat.bone_factor * ball).astype(np.float32)
        # humeral neck and shaft, going down and outwards
        ang = math.radians(70.0)
        end = (hu + s * 140.0 * math.cos(ang), hv + 140.0 * math.sin(ang))
        blk = grid.block(min(hu, end[0]) - 16, max(hu, end[0]) + 16, hv, end[1] + 16)
        if blk is not None:
            sl, U, V = blk
            du, dv = end[0] - hu, end[1] - hv
            t = np.clip(((U - hu) * du + (V - hv) * dv) / (du * du + dv * dv), 0.0, 1.0)
            d = np.sqrt((U - hu - t * du) ** 2 + (V - hv - t * dv) ** 2)
            rr = 11.0 * anat.size
            val = shell(np.minimum(d, rr), rr, 2.5, MU_CORTEX, MU_MARROW) * smoothstep((t - 0.12) / 0.1)
            mu[sl] += (0.6 * anat.bone_factor * val).astype(np.float32)
