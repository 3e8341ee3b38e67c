"""Image formation of the chest phantom: exposure, scatter, detector, processing, storage.

Real readers differ far more in what they do to the signal than phantoms of one
rendering would show, so every step is drawn per image:

- exposure: quanta (noise), heel-effect gradient, collimated field (unexposed borders,
  sometimes blacked out by an electronic shutter), scatter (broad blur of the primary,
  much stronger without an anti-scatter grid, as in AP portable images), grid-line moire;
- detector: DR flat panel or CR phosphor plate (more blur, more noise, reader line jitter);
- processing for presentation: dynamic-range compression plus ``plain`` (mild detail
  enhancement), ``unsharp`` (strong single-scale unsharp masking, the edge enhancement CR
  readers apply, with halos around masses) or ``multiscale`` (band-pass pyramid with a
  power-law gain that flattens large structures and lifts small ones, like MUSICA);
- tone curve (linear, S-curve, gamma) and latitude, stored with a lung-mediastinum
  window, a full-range window, or no window at all (the appliance then uses percentiles).

All of it works in millimetres, so a case rendered at 640 px for training and at 2500 px
for evaluation is processed alike.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from engines.train.phantom_geometry import Grid, lowpass, resize_bilinear

logger = logging.getLogger(__name__)

SYSTEMS = ("DR", "CR")
ENHANCEMENTS = ("plain", "unsharp", "multiscale")
STYLES = tuple(f"{s.lower()}_{e}" for s in SYSTEMS for e in ENHANCEMENTS)
VOI_MODES = ("window", "full", "none")
COLLIMATOR_MU = 5.0        # line integral the collimator blades add (primary ~0.7%)


@dataclass
class Exposure:
    """What reaches the detector: dose, scatter, grid, field."""

    quanta: float                  # detected quanta per mm2 without attenuation (sets the noise)
    spr: float                     # scatter-to-primary ratio where the body is uniform
    scatter_mm: float              # scale of the scatter blur
    grid: bool                     # anti-scatter grid used
    grid_lines: tuple[float, float, int, float] | None   # (cycles/px, amplitude, axis, phase)
    heel: tuple[float, int]        # (fractional exposure change across the image, axis)
    field: tuple[float, float, float, float] | None      # collimated field, FOV mm (x0, y0, x1, y1)
    shutter: bool                  # display black outside the field


@dataclass
class Processing:
    """Detector and for-presentation processing."""

    system: str                    # "DR" | "CR"
    enhancement: str               # "plain" | "unsharp" | "multiscale"
    mtf_mm: float                  # detector blur (Gaussian sigma, mm)
    row_jitter: float              # CR reader: line-to-line gain noise (log units)
    alpha: float                   # share of the coarse signal removed (dynamic-range compression)
    compress_mm: float             # scale of that coarse signal
    bands: list[tuple[float, float]]   # (scale mm, gain) of the detail terms
    power: float                   # multiscale: band non-linearity exponent (1: linear)
    tone: str                      # "linear" | "s_curve" | "gamma"
    tone_param: float
    latitude: float                # > 1: a wider signal range fills the display span
    voi: str                       # "window" | "full" | "none"

    @property
    def style(self) -> str:
        return f"{self.system.lower()}_{self.enhancement}"

    def describe(self) -> dict:
        return {"style": self.style, "system": self.system, "enhancement": self.enhancement,
                "tone": self.tone, "voi": self.voi, "detail_gain": round(max(g for _, g in self.bands), 3),
                "latitude": round(self.latitude, 3)}


def draw_processing(rng: np.random.Generator, view: str, style: str | None = None) -> Processing:
    """Draw the reader and its processing; ``style`` (one of ``STYLES``) fixes system and
    enhancement. The draws shared by all styles come first, so one seed in two styles of
    the same system differs only in the enhancement."""
    system = "CR" if rng.random() < 0.4 else "DR"
    enhancement = str(rng.choice(ENHANCEMENTS, p=[0.3, 0.35, 0.35]))
    if style is not None:
        if style not in STYLES:
            raise ValueError(f"style must be one of {STYLES}, got {style!r}")
        system, enhancement = style.split("_")[0].upper(), style.split("_")[1]
    cr = system == "CR"
    u = rng.random(6)
    mtf = float(0.18 + 0.22 * u[0] if cr else 0.08 + 0.12 * u[0])
    jitter = float(0.002 + 0.006 * u[1]) if cr else 0.0
    tone = ("linear", "s_curve", "gamma")[int(np.searchsorted([0.4, 0.8], u[2], side="right"))]
    tone_param = {"linear": 1.0, "s_curve": 3.0 + 5.0 * float(u[3]), "gamma": 0.6 + 0.9 * float(u[3])}[tone]
    latitude = float(np.exp(math.log(0.85) + (math.log(1.6) - math.log(0.85)) * u[4]))
    # a DX For Presentation image must carry a window; CR readers often send none
    voi_p = [0.35, 0.3, 0.35] if cr else [0.6, 0.4, 0.0]
    voi = VOI_MODES[int(np.searchsorted(np.cumsum(voi_p)[:-1], u[5], side="right"))]
    compress_mm = float(rng.uniform(10.0, 35.0))
    e = rng.random(6)
    power = 1.0
    if enhancement == "plain":
        alpha = 0.45 + 0.4 * float(e[0])
        bands = [(2.0, 0.35 * float(e[1]))]
    elif enhancement == "unsharp":
        alpha = 0.4 + 0.45 * float(e[0])
        bands = [(1.5 + 8.5 * float(e[2]), 0.8 + (3.2 if cr else 1.7) * float(e[1]))]
        if e[3] < 0.4:
            bands.append((12.0 + 18.0 * float(e[4]), 0.3 + 0.7 * float(e[5])))
    else:
        alpha = 0.5 + 0.35 * float(e[0])
        power = 0.5 + 0.35 * float(e[2])
        peak = 0.6 + 1.9 * float(e[1])
        centre = 3.0 * float(e[3])        # which band gets the most gain
        bands = [(2.0 ** i, peak * math.exp(-0.5 * ((i - centre) / 1.5) ** 2) + 0.15) for i in range(6)]
    return Processing(
        system=system, enhancement=enhancement, mtf_mm=mtf, row_jitter=jitter, alpha=alpha,
        compress_mm=compress_mm, bands=bands, power=power, tone=tone, tone_param=tone_param,
        latitude=latitude, voi=voi)


def draw_exposure(rng: np.random.Generator, view: str, system: str, fov_w: float, fov_h: float,
                  lungs_fov: tuple[float, float, float, float]) -> Exposure:
    """Draw dose, scatter, grid and collimation; the field always keeps the lungs in view."""
    portable = view == "AP"
    cr = system == "CR"
    quanta = math.exp(float(rng.uniform(math.log(1.0e4), math.log(6e4)) if cr
                            else rng.uniform(math.log(2.5e4), math.log(1.8e5))))
    grid = bool(rng.random() < (0.35 if portable else 0.9))
    spr = float(rng.uniform(0.1, 0.5) if grid else rng.uniform(0.5, 1.5))
    lines = None
    if grid and rng.random() < 0.45:
        lines = (float(rng.uniform(0.06, 0.45)), float(rng.uniform(0.003, 0.015)), int(rng.integers(0, 2)),
                 float(rng.uniform(0, 2 * math.pi)))
    field = None
    shutter = False
    if rng.random() < 0.6:
        x0, y0, x1, y1 = lungs_fov
        margins = rng.uniform(0.0, 1.0, 4) * np.array([x0 - 4.0, y0 - 4.0, fov_w - x1 - 4.0, fov_h - y1 - 4.0])
        margins = np.maximum(margins, 0.0) * (rng.random(4) < 0.75)
        if margins.max() > 3.0:
            field = (float(margins[0]), float(margins[1]), float(fov_w - margins[2]), float(fov_h - margins[3]))
            shutter = bool(rng.random() < 0.35)
    return Exposure(quanta=quanta, spr=spr, scatter_mm=float(rng.uniform(40.0, 90.0)), grid=grid,
                    grid_lines=lines, heel=(float(rng.uniform(-0.1, 0.1)), int(rng.integers(0, 2))),
                    field=field, shutter=shutter)


def field_mask(grid: Grid, field: tuple[float, float, float, float] | None, soft_mm: float = 1.0) -> np.ndarray:
    """1 inside the collimated field, 0 outside, with a soft penumbra (render grid)."""
    ones = np.ones((grid.rows, grid.cols), np.float32)
    if field is None:
        return ones
    x = (np.arange(grid.cols, dtype=np.float32) + 0.5) * grid.sx
    y = (np.arange(grid.rows, dtype=np.float32) + 0.5) * grid.sy
    x0, y0, x1, y1 = field

    def ramp(t: np.ndarray) -> np.ndarray:
        return np.clip(t / soft_mm + 0.5, 0.0, 1.0)

    return (ramp(y - y0) * ramp(y1 - y))[:, None] * (ramp(x - x0) * ramp(x1 - x))[None, :] * ones


def expose(mu: np.ndarray, grid: Grid, exp_: Exposure, inside: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Log signal ``L`` (dense = high) and detected intensity (for the noise), render grid."""
    primary = np.exp(-np.maximum(mu + np.float32(COLLIMATOR_MU) * (1.0 - inside), -2.0)).astype(np.float32)
    amount, axis = exp_.heel
    n = primary.shape[1] if axis == 0 else primary.shape[0]
    ramp = 1.0 + amount * np.linspace(-1.0, 1.0, n, dtype=np.float32)
    primary *= ramp[None, :] if axis == 0 else ramp[:, None]
    # scatter comes from the photons the body takes out of the beam (none from open air):
    # a broad blur of primary * (1 - primary), so spr is the scatter-to-primary ratio in the lungs
    cell = max(1, int(round(exp_.scatter_mm / grid.sx)))
    scatter = np.float32(exp_.spr) * lowpass(primary * (1.0 - np.minimum(primary, 1.0)) * inside, cell, passes=3)
    total = primary + scatter + np.float32(1e-4)
    return (-np.log(total)).astype(np.float32), total


def _blur3(image: np.ndarray, k: float) -> np.ndarray:
    """Separable 3-tap blur [k, 1-2k, k] with edge replication."""
    k = np.float32(k)
    out = image * (1 - 2 * k)
    out[:, 1:] += k * image[:, :-1]
    out[:, :-1] += k * image[:, 1:]
    out[:, 0] += k * image[:, 0]
    out[:, -1] += k * image[:, -1]
    res = out * (1 - 2 * k)
    res[1:, :] += k * out[:-1, :]
    res[:-1, :] += k * out[1:, :]
    res[0, :] += k * out[0, :]
    res[-1, :] += k * out[-1, :]
    return res


def detector(signal: np.ndarray, spacing: float, proc: Processing, exp_: Exposure,
             rng: np.random.Generator) -> np.ndarray:
    """Detector blur (at most 3 passes: finer blur is invisible at model size), grid moire, CR lines."""
    var = (proc.mtf_mm / spacing) ** 2
    passes = int(min(3, max(1, math.ceil(var / 0.5))))
    for _ in range(passes):
        signal = _blur3(signal, min(0.25, var / (2 * passes)))
    if exp_.grid_lines is not None:
        freq, amp, axis, phase = exp_.grid_lines
        n = signal.shape[1] if axis == 0 else signal.shape[0]
        wave = (amp * np.cos(2 * math.pi * freq * np.arange(n) + phase)).astype(np.float32)
        signal += wave[None, :] if axis == 0 else wave[:, None]
    if proc.row_jitter:
        signal += (proc.row_jitter * rng.standard_normal(signal.shape[0], dtype=np.float32))[:, None]
    return signal


def _nonlinear(band: np.ndarray, power: float, ref: float = 0.08) -> np.ndarray:
    """Power-law band gain: small details lifted (at most 4x), large ones compressed."""
    if power >= 1.0:
        return band
    gain = np.minimum((np.abs(band) / np.float32(ref) + np.float32(1e-6)) ** np.float32(power - 1.0), 4.0)
    return band * gain


def present(signal: np.ndarray, spacing: float, proc: Processing) -> np.ndarray:
    """For-presentation processing of the log signal (any resolution; scales in mm)."""
    def cell(mm: float) -> int:
        return max(1, int(round(mm / spacing)))

    coarse = lowpass(signal, cell(proc.compress_mm), passes=3)
    out = signal - np.float32(proc.alpha) * coarse
    if proc.enhancement == "multiscale":
        previous = signal
        for scale, gain in proc.bands:
            smooth = lowpass(signal, cell(scale), passes=2) if cell(scale) > 1 else _blur3(signal, 0.2)
            out += np.float32(gain) * _nonlinear(previous - smooth, proc.power)
            previous = smooth
    else:
        for scale, gain in proc.bands:
            if gain:
                smooth = lowpass(signal, cell(scale), passes=2) if cell(scale) > 1 else _blur3(signal, 0.2)
                out += np.float32(gain) * (signal - smooth)
    return out


def tone(t: np.ndarray, proc: Processing) -> np.ndarray:
    """Tone curve from the normalised signal (0: lung, 1: mediastinum) to 0..1."""
    t = (t - 0.5) / np.float32(proc.latitude) + 0.5
    if proc.tone == "s_curve":
        return (1.0 / (1.0 + np.exp(-np.float32(proc.tone_param) * (t - 0.5)))).astype(np.float32)
    if proc.tone == "gamma":
        return np.clip((t + 0.15) / 1.3, 0.0, 1.0) ** np.float32(proc.tone_param)
    return np.clip(0.1 + 0.8 * t, 0.0, 1.0)


@dataclass
class Mapping:
    """Normalisation of the processed signal, from the lesion-free anatomy."""

    lo: float      # processed value shown as lung
    hi: float      # ... and as mediastinum


def reference(processed: np.ndarray, air: np.ndarray, inside: np.ndarray,
              mediastinum: tuple | None) -> Mapping:
    """Lung (2nd percentile of aerated lung) and mediastinum (60th percentile) levels."""
    lung = processed[(air > 40.0) & (inside > 0.5)]
    if lung.size < 16:
        lung = processed.ravel()
    p_lung = float(np.percentile(lung, 2.0))
    p_dense = float(np.percentile(processed[mediastinum[0]], 60.0)) if mediastinum else float(processed.max())
    span = max(p_dense - p_lung, 1e-3)
    return Mapping(lo=p_lung - 0.1 * span, hi=p_dense + 0.22 * span)


def to_display(processed: np.ndarray, ref: Mapping, proc: Processing,
               outside: np.ndarray | None) -> np.ndarray:
    """0..1 display image (bone bright) through the tone curve; shuttered borders black."""
    y = tone((processed - np.float32(ref.lo)) / np.float32(ref.hi - ref.lo), proc)
    if outside is not None:
        y = y * (1.0 - outside)
    return y.astype(np.float32, copy=False)


def quantize(display: np.ndarray, proc: Processing, bits: int, lo_frac: float, hi_frac: float,
             win: tuple[float, float]) -> tuple[np.ndarray, float | None, float | None]:
    """Stored values (MONOCHROME2) and the window (centre, width; None without one)."""
    maxval = (1 << bits) - 1
    lo, hi = lo_frac * maxval, hi_frac * maxval
    stored = np.clip(np.rint(lo + (hi - lo) * display), 0, maxval).astype(np.uint16)
    if proc.voi == "none":
        return stored, None, None
    if proc.voi == "full":
        return stored, round((lo + hi) / 2.0, 2), round(hi - lo + 1.0, 2)
    y0, y1 = (float(v) for v in tone(np.array([0.0, 1.0], np.float32), proc))
    s0, s1 = lo + (hi - lo) * y0, lo + (hi - lo) * y1
    shift, scale = win
    width = max(16.0, (s1 - s0) * scale)
    return stored, round((s0 + s1) / 2.0 + shift * (s1 - s0), 2), round(width, 2)


def upsample(image: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Render grid to full resolution (bilinear)."""
    return resize_bilinear(image, rows, cols)
