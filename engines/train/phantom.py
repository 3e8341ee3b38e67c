"""Procedural frontal chest radiographs with ground truth (TB patterns, lung nodules).

No public chest X-ray data can be used here, so the demonstration models are trained on,
and the pipeline is tested with, these phantoms. The model is physical: attenuation line
integrals of body, lungs, heart, bones, vessels and lesions are summed, quantum noise is
added for an exposure drawn per image, then a log signal with dynamic-range compression
is stored as 12-16 bit values, as a DX "for presentation" image would be.

Every random choice comes from a named stream derived from the seed, so the same seed
gives the same image, and ``generate_case(seed, nodules=False)`` gives the same anatomy,
noise and exposure without the nodules. Coordinates: pixel ``(row i, column j)`` covers
``[j, j+1) x [i, i+1)``; boxes are ``[x1, y1, x2, y2]`` in full-resolution pixels.

CLI: ``python -m engines.train.phantom --out DIR --count N --seed S`` writes DICOM DX
files and ``DIR/truth.json``.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engines.preprocess import window_to_unit
from engines.train.phantom_anatomy import render_soft_tissue, sample_anatomy
from engines.train.phantom_bones import (
    make_ribs, render_clavicles, render_ribs, render_shoulders, render_spine,
)
from engines.train.phantom_details import (
    confounder_box, end_on_vessels, grow_vessels, render_confounders, render_hila, render_vessels,
    sample_confounders,
)
from engines.train.phantom_geometry import Grid, ValueNoise, lowpass, resize_bilinear
from engines.train.phantom_lesions import plan_tb, render_nodules, render_tb, sample_nodules

logger = logging.getLogger(__name__)

RENDER_MAX = 1024          # larger images are rendered at this width and upsampled
_STREAMS = ("flags", "acquisition", "anatomy", "ribs", "vessels", "bones", "confounders",
            "noise", "tb", "nodules")
PHOTOMETRICS = ("MONOCHROME1", "MONOCHROME2")


@dataclass
class PhantomCase:
    """One rendered chest phantom and its ground truth."""

    pixels: np.ndarray          # 2-D uint16 stored values, shape (rows, cols)
    photometric: str            # "MONOCHROME1" | "MONOCHROME2"
    bits_stored: int            # 12..16
    pixel_spacing_mm: float     # isotropic ImagerPixelSpacing
    window_center: float        # VOI window showing lungs and mediastinum well
    window_width: float
    tb: bool
    tb_patterns: list[dict]     # {"kind", "box": [x1, y1, x2, y2], "severity", "side"}
    nodules: list[dict]         # {"box": [x1, y1, x2, y2], "diameter_mm", "calcified", "site"}
    view: str = "PA"            # "PA" | "AP"
    seed: int = 0
    patient_sex: str = "O"      # "F" | "M", consistent with breast shadows
    confounders: list[dict] = field(default_factory=list)   # {"kind", "box"}: nipples, electrodes...


def _streams(seed: int) -> dict[str, np.random.Generator]:
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    children = np.random.SeedSequence(int(seed)).spawn(len(_STREAMS))
    return {name: np.random.default_rng(ss) for name, ss in zip(_STREAMS, children)}


def _px_box(box_fov: tuple[float, float, float, float], spacing: float, rows: int, cols: int) -> list[float]:
    x0, y0, x1, y1 = box_fov
    return [round(float(np.clip(x0 / spacing, 0, cols)), 2), round(float(np.clip(y0 / spacing, 0, rows)), 2),
            round(float(np.clip(x1 / spacing, 0, cols)), 2), round(float(np.clip(y1 / spacing, 0, rows)), 2)]


def _blur3(image: np.ndarray, k: float) -> np.ndarray:
    """Separable 3-tap blur [k, 1-2k, k]: the detector's modulation transfer."""
    out = image * np.float32(1.0 - 2.0 * k)
    out[:, 1:] += np.float32(k) * image[:, :-1]
    out[:, :-1] += np.float32(k) * image[:, 1:]
    out[:, 0] += np.float32(k) * image[:, 0]
    out[:, -1] += np.float32(k) * image[:, -1]
    res = out * np.float32(1.0 - 2.0 * k)
    res[1:, :] += np.float32(k) * out[:-1, :]
    res[:-1, :] += np.float32(k) * out[1:, :]
    res[0, :] += np.float32(k) * out[0, :]
    res[-1, :] += np.float32(k) * out[-1, :]
    return res


@dataclass
class _Acquisition:
    """Per-image exposure, positioning and processing, drawn from the acquisition stream."""

    fov_w: float
    rows: int
    spacing: float
    apex_y: float
    cx: float
    tilt: float
    quanta: float        # detected quanta per mm2 without attenuation (sets the noise)
    alpha: float         # dynamic range compression
    beta: float          # detail (edge) enhancement
    mtf_k: float         # detector blur
    win_shift: float
    win_scale: float
    lo_frac: float
    hi_frac: float

    @property
    def fov_h(self) -> float:
        return self.rows * self.spacing


def _draw_acquisition(rng: np.random.Generator, anat, cols: int) -> _Acquisition:
    fov_w = float(np.clip(2.0 * anat.body_half_width + rng.uniform(10.0, 90.0), 350.0, 430.0))
    rows = max(64, int(round(cols * float(rng.uniform(0.9, 1.1)))))
    spacing = fov_w / cols
    apex_y = float(rng.uniform(30.0, 75.0))
    if apex_y + anat.lung_bottom + 25.0 > rows * spacing:
        apex_y = max(8.0, rows * spacing - anat.lung_bottom - 25.0)
    return _Acquisition(
        fov_w=fov_w, rows=rows, spacing=spacing, apex_y=apex_y,
        cx=fov_w / 2.0 + float(np.clip(rng.normal(0.0, 8.0), -20.0, 20.0)),
        tilt=math.radians(float(np.clip(rng.normal(0.0, 1.5), -4.0, 4.0))),
        quanta=math.exp(float(rng.uniform(math.log(2e4), math.log(1.5e5)))),
        alpha=float(rng.uniform(0.6, 0.85)), beta=float(rng.uniform(0.2, 0.8)),
        mtf_k=float(rng.uniform(0.08, 0.22)),
        win_shift=float(rng.normal(0.0, 0.03)), win_scale=float(rng.uniform(0.92, 1.12)),
        lo_frac=float(rng.uniform(0.01, 0.06)), hi_frac=float(rng.uniform(0.8, 0.95)),
    )


def _process(att: np.ndarray, grid: Grid, acq: _Acquisition) -> np.ndarray:
    """For-presentation processing: compress the large-scale range, enhance detail."""
    coarse = lowpass(att, max(1, int(round(12.0 / grid.sx))), passes=4)
    fine = lowpass(att, max(1, int(round(2.0 / grid.sx))), passes=1)
    return att - np.float32(acq.alpha) * coarse + np.float32(acq.beta) * (att - fine)


def _mapping(proc_anat: np.ndarray, air: np.ndarray, grid: Grid, anat, acq: _Acquisition,
             bits: int) -> tuple[float, float, float, float]:
    """Stored-value gain/offset and VOI window (centre, width), from the lesion-free anatomy."""
    lung_vals = proc_anat[air > 40.0]
    if lung_vals.size < 16:
        lung_vals = proc_anat.ravel()
    p_lung = float(np.percentile(lung_vals, 2.0))
    mediastinum = grid.block(anat.spine_u - 30.0, anat.spine_u + 30.0, anat.carina_v,
                             anat.lungs[0].dome_v - 20.0)
    p_dense = float(np.percentile(proc_anat[mediastinum[0]], 60.0)) if mediastinum else float(proc_anat.max())
    g_lo = float(proc_anat.min()) - 0.05
    g_hi = float(proc_anat.max()) + 0.6          # headroom for lesions; metal may clip
    maxval = (1 << bits) - 1
    gain = (acq.hi_frac - acq.lo_frac) * maxval / (g_hi - g_lo)
    offset = acq.lo_frac * maxval - g_lo * gain
    span = p_dense - p_lung
    w_lo = (p_lung - 0.1 * span) * gain + offset
    w_hi = (p_dense + 0.22 * span) * gain + offset
    width = max(16.0, (w_hi - w_lo) * acq.win_scale)
    center = (w_lo + w_hi) / 2.0 + acq.win_shift * (w_hi - w_lo)
    return gain, offset, center, width


def generate_case(seed: int, *, size: int | None = None, tb: bool | None = None,
                  nodules: bool | None = None, photometric: str | None = None) -> PhantomCase:
    """Render one chest phantom.

    ``size`` is the number of columns (None: random 2000-3000); the anatomy in mm is the
    same at every size. ``tb``/``nodules`` None draw each with probability 0.5.
    """
    st = _streams(seed)
    flags = st["flags"]
    draw_tb, draw_nod = bool(flags.random() < 0.5), bool(flags.random() < 0.5)
    draw_photo = PHOTOMETRICS[0] if flags.random() < 0.4 else PHOTOMETRICS[1]
    draw_size = int(flags.integers(2000, 3001))
    bits = int(flags.integers(12, 17))
    view = "AP" if flags.random() < 0.2 else "PA"
    tb = draw_tb if tb is None else bool(tb)
    nodules = draw_nod if nodules is None else bool(nodules)
    photometric = draw_photo if photometric is None else str(photometric)
    if photometric not in PHOTOMETRICS:
        raise ValueError(f"photometric must be one of {PHOTOMETRICS}, got {photometric!r}")
    cols = draw_size if size is None else int(size)
    if cols < 64:
        raise ValueError(f"size must be at least 64 columns, got {size!r}")

    anat = sample_anatomy(st["anatomy"], view)
    tb_plans = plan_tb(st["tb"], anat) if tb else []
    anat.ribs = make_ribs(st["ribs"], anat)
    vessels = grow_vessels(st["vessels"], anat)
    vessel_gain = float(st["vessels"].uniform(1.0, 1.5))
    extras = end_on_vessels(st["vessels"], anat) + sample_confounders(st["confounders"], anat)
    acq = _draw_acquisition(st["acquisition"], anat, cols)
    rows, spacing = acq.rows, acq.spacing

    # attenuation line integrals at the render resolution
    rcols = min(cols, RENDER_MAX)
    rrows = rows if rcols == cols else max(32, int(round(rows * rcols / cols)))
    grid = Grid(rrows, rcols, acq.fov_h / rrows, acq.fov_w / rcols, acq.cx, acq.apex_y, acq.tilt)
    mu = np.zeros((rrows, rcols), np.float32)
    texture = ValueNoise(st["anatomy"], -250.0, -50.0, 500.0, 450.0, 9.0)
    air = render_soft_tissue(mu, grid, anat, texture)
    render_hila(mu, grid, anat)
    render_vessels(mu, grid, vessels, vessel_gain)
    render_ribs(mu, grid, anat, anat.ribs)
    render_clavicles(mu, grid, anat, st["bones"])
    render_spine(mu, grid, anat)
    render_shoulders(mu, grid, anat)
    gain, offset, center, width = _mapping(_process(mu, grid, acq), air, grid, anat, acq, bits)
    render_confounders(mu, grid, extras)
    tb_boxes = render_tb(mu, grid, anat, tb_plans)
    nod_specs = sample_nodules(st["nodules"], anat) if nodules else []
    render_nodules(mu, grid, nod_specs)

    # quantum noise at full resolution (Poisson statistics of the detected quanta), blur, store
    sigma = 1.0 / np.sqrt(np.float32(acq.quanta * spacing * spacing) * np.exp(-np.maximum(mu, 0.0)))
    sigma = np.minimum(sigma, 0.5).astype(np.float32)
    full = resize_bilinear(_process(mu, grid, acq), rows, cols)
    full += resize_bilinear(sigma, rows, cols) * st["noise"].standard_normal((rows, cols), dtype=np.float32)
    full = _blur3(full, acq.mtf_k)
    maxval = (1 << bits) - 1
    stored = np.clip(np.rint(full * np.float32(gain) + np.float32(offset)), 0, maxval).astype(np.uint16)
    if photometric == "MONOCHROME1":
        stored = (maxval - stored).astype(np.uint16)
        center = maxval + 1 - center

    nod_out = []
    for n in nod_specs:
        x, y = grid.to_fov(n.u, n.v)
        nod_out.append({"box": _px_box((x - n.r, y - n.r, x + n.r, y + n.r), spacing, rows, cols),
                        "diameter_mm": round(2.0 * n.r, 2), "calcified": n.calcified, "site": n.site})
    tb_out = [dict(b, box=_px_box(b["box"], spacing, rows, cols)) for b in tb_boxes]
    conf_out = [{"kind": it["kind"], "box": _px_box(grid.box_to_fov(*confounder_box(it)), spacing, rows, cols)}
                for it in extras]
    return PhantomCase(
        pixels=stored, photometric=photometric, bits_stored=bits, pixel_spacing_mm=spacing,
        window_center=round(float(center), 2), window_width=round(float(width), 2),
        tb=tb, tb_patterns=tb_out, nodules=nod_out, view=view, seed=int(seed),
        patient_sex=anat.sex, confounders=conf_out,
    )


def unit_image(case: PhantomCase) -> np.ndarray:
    """Float32 0..1 image in display polarity (bone bright), as the appliance computes it."""
    unit = window_to_unit(case.pixels, case.window_center, case.window_width)
    if case.photometric == "MONOCHROME1":
        unit = (1.0 - unit).astype(np.float32)
    return unit


def write_dicom(case: PhantomCase, path, *, patient_name: str = "PHANTOM^CHEST",
                patient_id: str | None = None, patient_age: str = "045Y",
                study_instance_uid: str | None = None, transfer_syntax: str | None = None):
    """Write the case as a DX For Presentation DICOM file; returns the pydicom Dataset."""
    from engines.train.phantom_dicom import write_case

    return write_case(case, path, patient_name=patient_name, patient_id=patient_id,
                      patient_age=patient_age, study_instance_uid=study_instance_uid,
                      transfer_syntax=transfer_syntax)


def truth_entry(case: PhantomCase) -> dict[str, Any]:
    """The ground truth of one case as stored in ``truth.json``."""
    return {"tb": case.tb,
            "nodules": [{"box": n["box"], "diameter_mm": n["diameter_mm"], "calcified": n["calcified"]}
                        for n in case.nodules],
            "tb_patterns": case.tb_patterns,
            "rows": int(case.pixels.shape[0]), "columns": int(case.pixels.shape[1]),
            "pixel_spacing_mm": case.pixel_spacing_mm, "photometric": case.photometric,
            "view": case.view, "seed": case.seed}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engines.train.phantom",
                                description="Write procedural chest X-ray phantoms as DICOM DX files "
                                            "with truth.json (TB patterns, nodule boxes).")
    p.add_argument("--out", required=True, type=Path, help="output directory (created)")
    p.add_argument("--count", type=int, default=10, help="number of images (default 10)")
    p.add_argument("--seed", type=int, default=0, help="base seed; image i uses seed*1000000+i")
    p.add_argument("--size", type=int, default=None, help="columns (default: random 2000-3000)")
    p.add_argument("--tb-fraction", type=float, default=0.5, help="fraction of images with TB")
    p.add_argument("--nodule-fraction", type=float, default=0.5, help="fraction of images with nodules")
    p.add_argument("--photometric", choices=PHOTOMETRICS, default=None, help="default: random")
    p.add_argument("--transfer-syntax", default=None, help="transfer syntax UID (default explicit VR LE)")
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.count < 1:
        print("error: --count must be at least 1", file=sys.stderr)
        return 2
    for name in ("tb_fraction", "nodule_fraction"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            print(f"error: --{name.replace('_', '-')} must be between 0 and 1", file=sys.stderr)
            return 2
    if args.seed < 0:
        print("error: --seed must be non-negative", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(np.random.SeedSequence([args.seed, 20240611]))
    truth: dict[str, Any] = {}
    for i in range(args.count):
        case_seed = args.seed * 1_000_000 + i
        tb = bool(rng.random() < args.tb_fraction)
        nod = bool(rng.random() < args.nodule_fraction)
        case = generate_case(case_seed, size=args.size, tb=tb, nodules=nod, photometric=args.photometric)
        name = f"phantom_{i:05d}.dcm"
        write_dicom(case, args.out / name, transfer_syntax=args.transfer_syntax)
        truth[name] = truth_entry(case)
        logger.info("wrote %s (tb=%s, nodules=%d)", name, tb, len(case.nodules))
    (args.out / "truth.json").write_text(json.dumps(truth, indent=1, sort_keys=True) + "\n")
    print(f"wrote {args.count} images and truth.json to {args.out}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
