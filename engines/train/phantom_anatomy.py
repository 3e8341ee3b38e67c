"""Chest anatomy of the phantom: parameters drawn per patient, lungs, heart and soft tissue.

The lungs and heart are analytic thickness fields (mm of aerated lung / heart along the
beam) that can be evaluated on a grid block or at single points, so lesion placement and
vessel growth use exactly the shapes that are drawn. Bones live in ``phantom_bones``,
vessels and small soft-tissue details in ``phantom_vessels``.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from engines.train.phantom_geometry import (
    LUNG_AIR, MU_FAT_DEFICIT, MU_SOFT, Grid, add_tube, smoothstep,
)

logger = logging.getLogger(__name__)


@dataclass
class Lung:
    """One lung field; ``side`` -1 is the patient's right (image left), +1 the left."""

    side: int
    apex_v: float       # top of the apex
    apex_u: float       # lateral distance of the apex from the midline
    width: float        # lateral distance of the chest wall at the base
    dome_v: float       # top of the diaphragm dome
    dome_u: float       # lateral distance of the dome top
    cp_depth: float     # costophrenic angle below the dome top
    med_drop: float     # cardiophrenic angle below the dome top
    depth: float        # largest antero-posterior lung depth
    med_base: float     # medial (mediastinal) border distance from the midline
    knob_amp: float = 0.0   # aortic knob bulge of the medial border (left lung)
    knob_v: float = 60.0
    knob_w: float = 18.0    # vertical extent of that bulge (broad on the right: superior vena cava)
    trunk_amp: float = 0.0  # pulmonary trunk bulge below the knob (left lung)
    mid_u: float = 0.0      # midline shift of the mediastinum (rotation)
    hilum_u: float = 60.0
    hilum_v: float = 110.0
    chest_top: float | None = None   # apex level before any volume loss: the rib cage stays put

    def __post_init__(self) -> None:
        if self.chest_top is None:
            self.chest_top = self.apex_v

    @property
    def base_v(self) -> float:
        """Level of the costophrenic angle."""
        return self.dome_v + self.cp_depth

    def bbox(self) -> tuple[float, float, float, float]:
        """Anatomical box holding the lung, including the posterior recess."""
        lo = self.side * self.width
        hi = self.side * (self.med_base * 0.5) + self.mid_u
        return min(lo, hi), max(lo, hi), self.apex_v, self.base_v + 40.0

    def edges(self, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Medial and lateral border distances (from the midline) at levels ``v``."""
        t = np.clip((v - self.apex_v) / (self.base_v - self.apex_v), 0.0, 1.0)
        grow = np.sqrt(np.clip(t * (2.0 - t), 0.0, 1.0))
        lateral = self.apex_u + (self.width - self.apex_u) * grow
        medial = (self.med_base + self.knob_amp * np.exp(-((v - self.knob_v) / self.knob_w) ** 2)
                  + self.trunk_amp * np.exp(-((v - self.hilum_v + 12.0) / 22.0) ** 2))
        medial = medial + (self.apex_u - medial) * np.clip(1.0 - np.sqrt(t / 0.16), 0.0, 1.0)
        return medial, lateral

    def dome(self, a: np.ndarray) -> np.ndarray:
        """Level of the lung base (diaphragm) at lateral distance ``a``."""
        lat = self.dome_v + self.cp_depth * ((a - self.dome_u) / (self.width - self.dome_u)) ** 2
        med = self.dome_v + self.med_drop * ((self.dome_u - a) / self.dome_u) ** 2
        return np.where(a > self.dome_u, lat, med)

    def thickness(self, U: np.ndarray, V: np.ndarray) -> np.ndarray:
        """Aerated lung depth (mm) at anatomical points; 0 outside the lung."""
        a = self.side * U
        medial, lateral = self.edges(V)
        medial = medial + self.side * self.mid_u
        span = np.maximum(lateral - medial, 1.0)
        w = np.clip((a - medial) / span, 0.0, 1.0)
        across = np.sqrt(np.clip(1.0 - np.abs(2.0 * w - 1.0) ** 4, 0.0, 1.0))
        t = np.clip((V - self.apex_v) / (self.base_v - self.apex_v), 0.0, 1.0)
        depth = self.depth * np.clip(t / 0.6, 0.0, 1.0) ** 0.6
        vd = self.dome(a)
        above = np.sqrt(np.clip((vd - V) / 6.0, 0.0, 1.0)) * 0.78 + 0.22
        below = 0.22 * np.exp(-np.maximum(V - vd, 0.0) / 22.0) * smoothstep((a - 0.6 * self.dome_u) / 30.0)
        base = np.where(V < vd, above, below)
        inside = (V > self.apex_v) & (a > medial) & (a < lateral)
        return np.where(inside, depth * across * base, 0.0).astype(np.float32)

    def point_depth(self, u: float, v: float) -> float:
        """Lung depth at one point (used for placing vessels and lesions)."""
        return float(self.thickness(np.array([u], np.float32), np.array([v], np.float32))[0])


@dataclass
class Heart:
    """Heart silhouette: a tilted ventricular ellipsoid and a right atrial ellipsoid."""

    lv_u: float
    lv_v: float
    lv_a: float
    lv_b: float
    lv_angle: float
    ra_u: float
    ra_v: float
    ra_a: float
    ra_b: float
    depth: float

    def bbox(self) -> tuple[float, float, float, float]:
        r = max(self.lv_a, self.lv_b)
        return (min(self.lv_u - r, self.ra_u - self.ra_a), self.lv_u + r,
                min(self.lv_v - r, self.ra_v - self.ra_b), max(self.lv_v + r, self.ra_v + self.ra_b))

    def thickness(self, U: np.ndarray, V: np.ndarray) -> np.ndarray:
        """Heart thickness along the beam (mm)."""
        c, s = math.cos(self.lv_angle), math.sin(self.lv_angle)
        du, dv = U - self.lv_u, V - self.lv_v
        p = (c * du + s * dv) / self.lv_a
        q = (-s * du + c * dv) / self.lv_b
        lv = np.clip(1.0 - p * p - q * q, 0.0, 1.0) ** 0.35
        ra = np.clip(1.0 - ((U - self.ra_u) / self.ra_a) ** 2 - ((V - self.ra_v) / self.ra_b) ** 2,
                     0.0, 1.0) ** 0.35
        return (self.depth * np.maximum(lv, 0.85 * ra)).astype(np.float32)


@dataclass
class Anatomy:
    """All per-patient anatomical parameters, in anatomical mm."""

    view: str
    sex: str
    size: float
    lungs: list[Lung]
    heart: Heart
    rib_spacing: float
    body_half_width: float
    body_half_depth: float
    neck_half_width: float
    shoulder_v: float
    fat: float
    spine_u: float
    trachea_u: float
    trachea_r: float
    carina_v: float
    clavicle_v: float
    clavicle_rise: float
    scapula_overlap: float
    bone_factor: float
    breasts: list[dict] = field(default_factory=list)
    stomach: dict | None = None
    ribs: list = field(default_factory=list)          # phantom_bones.Rib, filled in later

    @property
    def lung_bottom(self) -> float:
        return max(lung.base_v for lung in self.lungs)


def sample_anatomy(rng: np.random.Generator, view: str) -> Anatomy:
    """Draw one patient: size, inspiration, heart size, rotation, sex."""
    sex = "F" if rng.random() < 0.5 else "M"
    size = float(np.clip(rng.normal(1.0, 0.07), 0.84, 1.18)) * (1.04 if sex == "M" else 0.97)
    rib_spacing = 24.0 * size * float(rng.uniform(0.95, 1.05))
    # inspiration depth: supine and portable (AP) images are often taken in poorer inspiration
    ribs_above_dome = float(rng.uniform(7.8, 10.2) if view == "AP" else rng.uniform(8.6, 10.8))
    dome_right = -6.0 + (ribs_above_dome - 1.0) * rib_spacing
    half_width = float(rng.uniform(128.0, 152.0)) * size
    rotation = float(np.clip(rng.normal(0.0, 5.0), -14.0, 14.0))
    ap = view == "AP"
    lungs = []
    for side in (-1, 1):
        cp = float(rng.uniform(32.0, 55.0))
        dome_v = dome_right + (float(rng.uniform(8.0, 24.0)) if side > 0 else 0.0)
        width = half_width * (1.0 + side * rotation / 300.0) * float(rng.uniform(0.97, 1.03))
        lungs.append(Lung(
            side=side,
            apex_v=float(rng.uniform(-4.0, 4.0)),
            apex_u=float(rng.uniform(40.0, 55.0)) * size,
            width=width,
            dome_v=dome_v,
            dome_u=width * float(rng.uniform(0.38, 0.52)),
            cp_depth=cp,
            med_drop=float(rng.uniform(12.0, 30.0)),
            depth=float(rng.uniform(135.0, 175.0)) * size,
            med_base=float(rng.uniform(18.0, 26.0) if side < 0 else rng.uniform(15.0, 21.0)),
            knob_amp=float(rng.uniform(7.0, 16.0) if side > 0 else rng.uniform(2.0, 9.0)),
            knob_v=float(rng.uniform(0.2, 0.27) if side > 0 else rng.uniform(0.28, 0.4)) * dome_right,
            knob_w=18.0 if side > 0 else float(rng.uniform(25.0, 45.0)),
            trunk_amp=float(rng.uniform(3.0, 10.0)) if side > 0 else 0.0,
            mid_u=0.3 * rotation,
            hilum_u=float(rng.uniform(52.0, 66.0)) * size,
            hilum_v=dome_right * (0.46 if side < 0 else 0.41) + float(rng.uniform(-8.0, 8.0)),
        ))
    ctr = float(rng.uniform(0.36, 0.5)) * (1.0 + 0.03 * max(0.0, 9.6 - ribs_above_dome))
    heart_w = ctr * 2.0 * half_width * (1.12 if ap else 1.0)
    right_edge = -heart_w * float(rng.uniform(0.28, 0.36)) + 0.5 * rotation
    left_edge = right_edge + heart_w
    angle = math.radians(float(rng.uniform(36.0, 50.0)))
    lv_a, lv_b = 0.58 * heart_w, 0.46 * heart_w * float(rng.uniform(0.92, 1.08))
    ex = math.hypot(lv_a * math.cos(angle), lv_b * math.sin(angle))
    ey = math.hypot(lv_a * math.sin(angle), lv_b * math.cos(angle))
    heart = Heart(
        lv_u=left_edge - ex, lv_v=lungs[1].dome_v - 0.55 * ey,
        lv_a=lv_a, lv_b=lv_b, lv_angle=angle,
        ra_u=right_edge + 0.19 * heart_w, ra_v=lungs[0].dome_v - 0.26 * heart_w,
        ra_a=0.19 * heart_w, ra_b=0.34 * heart_w,
        depth=lungs[1].depth * float(rng.uniform(0.86, 1.0)),
    )
    breasts = []
    if sex == "F" and rng.random() < 0.85:
        bsize = float(rng.uniform(0.7, 1.3))
        for side in (-1, 1):
            breasts.append({"u": side * half_width * float(rng.uniform(0.55, 0.75)),
                            "v": dome_right - float(rng.uniform(25.0, 55.0)),
                            "a": 80.0 * bsize, "b": 60.0 * bsize,
                            "depth": float(rng.uniform(10.0, 28.0)) * bsize})
    stomach = None
    if rng.random() < 0.6:
        stomach = {"u": float(rng.uniform(45.0, 80.0)), "v": lungs[1].dome_v + float(rng.uniform(22.0, 40.0)),
                   "a": float(rng.uniform(20.0, 38.0)), "b": float(rng.uniform(12.0, 22.0)),
                   "depth": float(rng.uniform(25.0, 60.0))}
    return Anatomy(
        view=view, sex=sex, size=size, lungs=lungs, heart=heart, rib_spacing=rib_spacing,
        body_half_width=half_width + float(rng.uniform(22.0, 48.0)) * size,
        body_half_depth=float(rng.uniform(92.0, 125.0)) * size,
        neck_half_width=float(rng.uniform(48.0, 62.0)) * size,
        shoulder_v=float(rng.uniform(-45.0, -20.0)),
        fat=float(rng.uniform(4.0, 26.0)) * size,
        spine_u=rotation,
        trachea_u=0.3 * rotation,
        trachea_r=float(rng.uniform(7.0, 9.5)),
        carina_v=dome_right * float(rng.uniform(0.27, 0.33)),
        clavicle_v=float(rng.uniform(12.0, 34.0)) - (18.0 if ap else 0.0),
        clavicle_rise=float(rng.uniform(4.0, 30.0)),
        scapula_overlap=float(rng.uniform(20.0, 50.0) if ap else rng.uniform(-25.0, 22.0)),
        bone_factor=float(rng.uniform(0.8, 1.25)),
        breasts=breasts, stomach=stomach,
    )


def body_profile(anat: Anatomy, V: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Body half width and half depth at levels ``V`` (neck, shoulders, chest, abdomen)."""
    sh = smoothstep((V - anat.shoulder_v + 35.0) / 50.0)
    half_w = anat.neck_half_width + (anat.body_half_width + 20.0 - anat.neck_half_width) * sh
    half_w = half_w - 20.0 * smoothstep((V - anat.shoulder_v - 20.0) / 120.0)
    half_d = 0.6 * anat.body_half_depth + 0.4 * anat.body_half_depth * sh
    return half_w, half_d


def render_soft_tissue(mu: np.ndarray, grid: Grid, anat: Anatomy, texture=None) -> np.ndarray:
    """Body, lungs (minus heart), trachea, stomach gas and breasts; returns the lung air map.

    ``texture`` is an optional smooth 0..1 field (``ValueNoise``) that varies lung density a little.
    """
    sl, U, V = grid.full()
    half_w, half_d = body_profile(anat, V)
    rel = np.clip(1.0 - (U / half_w) ** 2, 0.0, 1.0)
    body = 2.0 * half_d * np.sqrt(rel)
    inner_w = np.maximum(half_w - anat.fat, 1.0)
    inner = 2.0 * half_d * np.sqrt(np.clip(1.0 - (U / inner_w) ** 2, 0.0, 1.0))
    mu[sl] += MU_SOFT * body - MU_FAT_DEFICIT * (body - inner)

    air = np.zeros_like(mu)
    heart = anat.heart
    for lung in anat.lungs:
        blk = grid.block(*lung.bbox())
        if blk is None:
            continue
        bsl, BU, BV = blk
        depth = lung.thickness(BU, BV)
        if texture is not None:
            depth = depth * (1.0 - 0.12 * (texture(BU, BV) - 0.5))
        depth = np.maximum(depth - heart.thickness(BU, BV), 0.0)
        air[bsl] = np.maximum(air[bsl], depth)
    mu -= LUNG_AIR * air

    # trachea and main bronchi: air columns over the mediastinum
    tu, tr, cv = anat.trachea_u, anat.trachea_r, anat.carina_v
    trachea = np.zeros_like(mu)
    add_tube(trachea, grid, (tu, -220.0), (tu - 0.1 * tr, cv), tr, tr, MU_SOFT, combine="max")
    add_tube(trachea, grid, (tu - 0.1 * tr, cv), (tu - 26.0, cv + 28.0), tr * 0.8, tr * 0.6, MU_SOFT,
             combine="max")
    add_tube(trachea, grid, (tu - 0.1 * tr, cv), (tu + 38.0, cv + 34.0), tr * 0.72, tr * 0.55, MU_SOFT,
             combine="max")
    mu -= trachea * np.clip(1.0 - air / 40.0, 0.0, 1.0)

    if anat.stomach:
        st = anat.stomach
        blk = grid.block(st["u"] - st["a"], st["u"] + st["a"], st["v"] - st["b"], st["v"] + st["b"])
        if blk is not None:
            bsl, BU, BV = blk
            rho = ((BU - st["u"]) / st["a"]) ** 2 + ((BV - st["v"]) / st["b"]) ** 2
            gas = st["depth"] * np.sqrt(np.clip(1.0 - rho, 0.0, 1.0)) * (BV < st["v"] + 0.3 * st["b"])
            mu[bsl] -= MU_SOFT * gas
    for br in anat.breasts:
        # sharp lower border (inframammary fold), soft fade upwards
        blk = grid.block(br["u"] - br["a"], br["u"] + br["a"], br["v"] - 2.2 * br["b"], br["v"] + br["b"])
        if blk is None:
            continue
        bsl, BU, BV = blk
        bv = np.where(BV > br["v"], br["b"], 2.2 * br["b"])
        rho = np.clip(((BU - br["u"]) / br["a"]) ** 2 + ((BV - br["v"]) / bv) ** 2, 0.0, 1.0)
        mu[bsl] += (MU_SOFT * br["depth"] * np.sqrt(1.0 - rho)).astype(np.float32)
    return air
