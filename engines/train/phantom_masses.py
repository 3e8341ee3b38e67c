"""Nodules and masses with ground truth: what a radiologist calls "nodule or mass".

Lesions of 5 to 60 mm: solitary nodules, a few at once, the metastatic pattern (3-10 in
both lungs, lower zones and periphery first) and large masses with satellites. Each has
a margin (smooth, lobulated, spiculated), a density (faint, typical, dense; small ones
sometimes calcified), may cavitate (with an air-fluid level), and sits free in the lung,
over a rib, the hilum, the heart, the diaphragm or the apex, or against the chest wall.

Shapes are projected solids: the outline is a radius function ``R(theta)`` (harmonics
give lobulation), the line integral across it is that of a sphere of radius ``R(theta)``,
spicules are thin tapered tubes from the margin. The truth box is the extent of the
solid outline (spicules and halo excluded), mapped to the image; ``diameter_mm`` is the
mean of the outline's width and height, which is what the appliance reports from a box.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from engines.train.phantom_anatomy import Anatomy, Lung
from engines.train.phantom_geometry import LUNG_AIR, MU_CORTEX, Grid, add_tube, smoothstep

logger = logging.getLogger(__name__)

PATTERNS = ("solitary", "multiple", "metastatic", "mass")
_PATTERN_P = (0.32, 0.2, 0.26, 0.22)
SITES = ("lung", "rib", "heart", "hilum", "diaphragm", "apex", "periphery")
_SITE_P = (0.42, 0.2, 0.08, 0.09, 0.09, 0.06, 0.06)
MIN_MM, MAX_MM = 5.0, 60.0
_ANGLES = np.linspace(0.0, 2.0 * math.pi, 72, endpoint=False)


@dataclass
class LesionSpec:
    """One nodule or mass in anatomical mm (centre ``u, v``, mean radius ``r``)."""

    u: float
    v: float
    r: float
    mu: float                     # attenuation per mm of lesion, net of the lung it replaces
    calcified: bool
    site: str
    margin: str = "smooth"        # smooth | lobulated | spiculated
    density: str = "typical"      # faint | typical | dense | calcified
    harmonics: list[tuple[int, float, float]] = field(default_factory=list)   # (k, amp, phase)
    spicules: list[tuple[float, float, float]] = field(default_factory=list)  # (angle, length, radius)
    cavity: tuple[float, float, float, float | None] | None = None   # (du, dv, radius, fluid level)
    halo: float = 0.0             # ground-glass halo strength (0: none)

    def radius(self, theta: np.ndarray) -> np.ndarray:
        """Outline radius at angles ``theta`` (radians, anatomical frame)."""
        out = np.ones_like(theta, dtype=np.float32)
        for k, amp, phase in self.harmonics:
            out = out + np.float32(amp) * np.cos(k * theta + phase).astype(np.float32)
        return np.float32(self.r) * out

    @property
    def r_max(self) -> float:
        return float(self.radius(_ANGLES).max())

    def outline(self) -> tuple[np.ndarray, np.ndarray]:
        """Anatomical points of the solid outline (72 angles)."""
        rad = self.radius(_ANGLES)
        return self.u + rad * np.cos(_ANGLES), self.v + rad * np.sin(_ANGLES)

    @property
    def diameter_mm(self) -> float:
        """Mean of the outline's width and height (the appliance's measure of a box)."""
        us, vs = self.outline()
        return float((us.max() - us.min() + vs.max() - vs.min()) / 2.0)


def _diameter(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(np.exp(rng.uniform(math.log(lo), math.log(hi))))


def _shape(rng: np.random.Generator, spec: LesionSpec, margin: str) -> None:
    """Fill in the outline harmonics and spicules for ``margin``."""
    spec.margin = margin
    if margin == "smooth":
        spec.harmonics = [(2, float(rng.uniform(0.0, 0.08)), float(rng.uniform(0, 2 * math.pi)))]
    elif margin == "lobulated":
        spec.harmonics = [(2, float(rng.uniform(0.02, 0.1)), float(rng.uniform(0, 2 * math.pi)))]
        for k in rng.choice([3, 4, 5, 6], size=2, replace=False):
            spec.harmonics.append((int(k), float(rng.uniform(0.05, 0.12)), float(rng.uniform(0, 2 * math.pi))))
    else:
        spec.harmonics = [(2, float(rng.uniform(0.0, 0.1)), float(rng.uniform(0, 2 * math.pi))),
                          (int(rng.integers(3, 7)), float(rng.uniform(0.03, 0.08)), float(rng.uniform(0, 2 * math.pi)))]
        count = int(rng.integers(8, 22))
        for _ in range(count):
            length = float(np.clip(spec.r * rng.uniform(0.35, 1.0), 3.0, 25.0))
            spec.spicules.append((float(rng.uniform(0, 2 * math.pi)), length,
                                  float(np.clip(spec.r * rng.uniform(0.04, 0.09), 0.35, 1.3))))


def _density(rng: np.random.Generator, diam: float, calcified: bool) -> tuple[str, float]:
    if calcified:
        return "calcified", MU_CORTEX * float(rng.uniform(1.0, 1.8))
    kind = str(rng.choice(["faint", "typical", "dense"], p=[0.18, 0.64, 0.18]))
    lo, hi = {"faint": (0.45, 0.65), "typical": (0.7, 1.2), "dense": (1.25, 1.8)}[kind]
    # at least ~0.09 line integral at the centre, so that a 5 mm nodule is still seen
    return kind, max(LUNG_AIR * float(rng.uniform(lo, hi)), 0.09 / diam)


def _candidate(rng: np.random.Generator, anat: Anatomy, lung: Lung, site: str, r: float,
               lower: bool) -> tuple[float, float] | None:
    """A centre for a lesion of radius ``r`` at ``site`` (not yet checked)."""
    s = lung.side
    u0, u1, v0, v1 = lung.bbox()
    if site == "rib" and anat.ribs:
        ribs = [rib for rib in anat.ribs if rib.side == s]
        rib = ribs[int(rng.integers(0, len(ribs)))]
        phi = float(rng.uniform(0.0, min(rib.phi_med, 2.0))) if rng.random() < 0.7 \
            else float(rng.uniform(rib.phi_ant, 0.0))
        c = rib.c_up if phi >= 0 else rib.c_low
        px, qy = rib.a * math.cos(phi), -c * math.sin(phi)
        cs, sn = math.cos(rib.psi), math.sin(rib.psi)
        return s * (rib.cu + cs * px - sn * qy), rib.cv + sn * px + cs * qy
    if site == "hilum":
        return (s * lung.hilum_u + lung.mid_u + s * float(rng.uniform(-8.0, 22.0)),
                lung.hilum_v + float(rng.uniform(-25.0, 25.0)))
    if site == "diaphragm":
        a = float(rng.uniform(0.25, 0.85)) * lung.width
        dome = float(lung.dome(np.array([a]))[0])
        return s * a, dome + float(rng.uniform(-0.6, 0.5)) * r
    if site == "apex":
        return s * float(rng.uniform(0.5, 1.1)) * lung.apex_u, float(rng.uniform(12.0, 55.0)) + 0.5 * r
    v = float(rng.uniform(v0, v1))
    if lower:   # haematogenous spread: lower zones first
        v = v0 + (v1 - v0) * float(np.sqrt(rng.uniform(0.1, 1.0)))
    if site == "periphery":
        _, lateral = lung.edges(np.array([v], np.float32))
        return s * (float(lateral[0]) - r - float(rng.uniform(2.0, 8.0))) + lung.mid_u, v
    return float(rng.uniform(u0, u1)), v


def _fits(anat: Anatomy, lung: Lung, site: str, u: float, v: float, r: float) -> bool:
    """The lesion projects on the lung the way its site says."""
    depth = lung.point_depth(u, v)
    heart = float(anat.heart.thickness(np.array([u], np.float32), np.array([v], np.float32))[0])
    rim_u = u + 0.8 * r * np.cos(_ANGLES[::9])
    rim_v = v + 0.8 * r * np.sin(_ANGLES[::9])
    rim_in = int((lung.thickness(rim_u.astype(np.float32), rim_v.astype(np.float32)) > 0.0).sum())
    if site == "heart":
        return heart >= 30.0 and depth >= max(heart + 10.0, 40.0) and rim_in >= 5 and r >= 5.0
    if site in ("hilum", "diaphragm"):
        return depth >= 12.0 and rim_in >= 5 and heart < 0.5 * depth
    if heart > 5.0:
        return False
    dome = float(lung.dome(np.array([lung.side * u]))[0])
    if v + 0.7 * r > dome:
        return False
    need = min(2.0 * r + 8.0, 45.0) if site != "apex" else min(r + 10.0, 35.0)
    return depth >= need and rim_in >= 7


def sample_lesions(rng: np.random.Generator, anat: Anatomy, pattern: str | None = None) -> list[LesionSpec]:
    """Draw a lesion pattern (``PATTERNS``; random when None) and place its lesions."""
    if pattern is None:
        pattern = str(rng.choice(PATTERNS, p=_PATTERN_P))
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
    plans: list[tuple[float, str | None, bool]] = []   # (diameter, forced site, metastatic)
    if pattern == "solitary":
        plans = [(_diameter(rng, MIN_MM, 30.0), None, False)]
    elif pattern == "multiple":
        plans = [(_diameter(rng, MIN_MM, 30.0), None, False) for _ in range(int(rng.integers(2, 4)))]
    elif pattern == "metastatic":
        big = float(rng.uniform(25.0, 52.0))       # cannonballs in some, small ones in others
        plans = [(_diameter(rng, MIN_MM, big), None, True) for _ in range(int(rng.integers(3, 11)))]
        plans.sort(key=lambda p: -p[0])
    else:
        site = str(rng.choice(["lung", "hilum", "periphery", "apex", "diaphragm", "heart"],
                              p=[0.4, 0.2, 0.13, 0.1, 0.1, 0.07]))
        plans = [(float(rng.uniform(30.0, MAX_MM)), site, False)]
        plans += [(_diameter(rng, MIN_MM, 20.0), None, False) for _ in range(int(rng.choice([0, 1, 2], p=[0.6, 0.25, 0.15])))]
    out: list[LesionSpec] = []
    first_side = int(rng.integers(0, 2))
    for i, (diam, site, metastatic) in enumerate(plans):
        placed = None
        for attempt in range(300):
            d = diam if attempt < 150 else max(MIN_MM, 0.8 * diam)   # shrink a lesion that does not fit
            r = d / 2.0
            s = site or str(rng.choice(SITES, p=_SITE_P))
            if s == "heart" and d < 10.0:
                s = "lung"                                 # retrocardiac nodules < 1 cm are invisible
            if metastatic and s in ("rib", "lung") and rng.random() < 0.35:
                s = "periphery"
            side = (first_side + i) % 2 if metastatic else int(rng.integers(0, 2))
            if s == "heart":
                side = 1 if rng.random() < 0.8 else 0
            lung = anat.lungs[side]
            cand = _candidate(rng, anat, lung, s, r, lower=metastatic)
            if cand is None:
                continue
            u, v = cand
            if not _fits(anat, lung, s, u, v, r):
                continue
            if any(math.hypot(u - o.u, v - o.v) < r + o.r_max + 4.0 for o in out):
                continue
            placed = (u, v, r, s)
            break
        if placed is None:
            continue
        u, v, r, s = placed
        calcified = bool(not metastatic and 2 * r <= 12.0 and rng.random() < 0.15)
        density, mu = _density(rng, 2 * r, calcified)
        spec = LesionSpec(u=u, v=v, r=r, mu=mu, calcified=calcified, site=s, density=density)
        if calcified:
            margin = "smooth"
        elif metastatic:
            margin = str(rng.choice(["smooth", "lobulated", "spiculated"], p=[0.7, 0.22, 0.08]))
        else:
            big = 2 * r > 30.0
            margin = str(rng.choice(["smooth", "lobulated", "spiculated"],
                                    p=[0.25, 0.4, 0.35] if big else [0.5, 0.28, 0.22]))
        _shape(rng, spec, margin)
        if spec.diameter_mm > MAX_MM:      # lobulation must not take a mass past 60 mm
            spec.r *= MAX_MM / spec.diameter_mm
        if not calcified and 2 * r >= 15.0 and rng.random() < (0.25 if 2 * r > 30.0 else 0.1):
            ri = r * float(rng.uniform(0.3, 0.65))
            off = (r - ri) * float(rng.uniform(0.0, 0.6))
            ang = float(rng.uniform(0, 2 * math.pi))
            level = float(rng.uniform(-0.3, 0.5)) * ri if rng.random() < 0.4 else None
            spec.cavity = (off * math.cos(ang), off * math.sin(ang), ri, level)
        if density == "faint" or (margin == "spiculated" and rng.random() < 0.3):
            spec.halo = float(rng.uniform(0.1, 0.3))
        out.append(spec)
    return out


def render_lesions(mu: np.ndarray, grid: Grid, lesions: list[LesionSpec]) -> None:
    """Add the lesions' attenuation to ``mu``."""
    for n in lesions:
        reach = n.r_max * (1.35 if n.halo else 1.0) + 1.0
        blk = grid.block(n.u - reach, n.u + reach, n.v - reach, n.v + reach)
        if blk is not None:
            sl, U, V = blk
            du, dv = U - np.float32(n.u), V - np.float32(n.v)
            d2 = du * du + dv * dv
            radius = n.radius(np.arctan2(dv, du))
            val = np.float32(n.mu) * 2.0 * np.sqrt(np.maximum(radius * radius - d2, 0.0))
            if n.halo:
                outer = radius * np.float32(1.35)
                ring = 2.0 * np.sqrt(np.maximum(outer * outer - d2, 0.0))
                val = val + np.float32(n.mu * n.halo) * ring * smoothstep(np.sqrt(d2) / np.maximum(radius, 1e-3) - 0.6)
            if n.cavity is not None:
                cu, cv, ri, level = n.cavity
                c2 = (du - np.float32(cu)) ** 2 + (dv - np.float32(cv)) ** 2
                hollow = 2.0 * np.sqrt(np.maximum(np.float32(ri * ri) - c2, 0.0))
                if level is not None:   # fluid fills the cavity below the level
                    hollow = hollow * (1.0 - smoothstep((dv - np.float32(cv + level)) / 0.8 + 0.5))
                val = val - np.float32(n.mu + 0.3 * LUNG_AIR) * hollow
            mu[sl] += val.astype(np.float32)
        for ang, length, rad in n.spicules:
            r0 = float(n.radius(np.array([ang], np.float32))[0]) * 0.92
            p0 = (n.u + r0 * math.cos(ang), n.v + r0 * math.sin(ang))
            p1 = (n.u + (r0 + length) * math.cos(ang), n.v + (r0 + length) * math.sin(ang))
            add_tube(mu, grid, p0, p1, rad, 0.25 * rad, max(n.mu, LUNG_AIR) * 1.6)


def lesion_truth(n: LesionSpec, grid: Grid) -> dict:
    """Truth of one lesion: FOV-mm box of its solid outline and its description."""
    us, vs = n.outline()
    xs = grid.cx + grid.cos * us - grid.sin * vs
    ys = grid.cy + grid.sin * us + grid.cos * vs
    diam = n.diameter_mm
    return {"box_fov": (float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())),
            "diameter_mm": round(diam, 2), "calcified": n.calcified, "site": n.site,
            "kind": "mass" if diam > 30.0 else "nodule", "margin": n.margin, "density": n.density,
            "cavitating": n.cavity is not None}
