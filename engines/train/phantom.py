"""Procedural frontal chest radiographs with ground truth (TB patterns, nodules and masses).

No public chest X-ray data can be used here, so the demonstration models are trained on,
and the pipeline is tested with, these phantoms. The model is physical: attenuation line
integrals of body, lungs, heart, bones, vessels, lesions and devices are summed; the
exposure adds scatter, collimation and quantum noise; a DR or CR detector blurs; and a
reader's for-presentation processing (dynamic-range compression, edge enhancement or
multi-scale contrast, tone curve) gives the stored 12-16 bit values, with a window, a
full-range window or none, in either polarity (``phantom_imaging``). Lesions are nodules
and masses of 5-60 mm, alone, several, or in the metastatic pattern (``phantom_masses``).

Every random choice comes from a named stream derived from the seed, so the same seed
gives the same image, and ``generate_case(seed, nodules=False)`` gives the same anatomy,
noise and processing without the lesions. ``style`` fixes the reader and processing
(``phantom_imaging.STYLES``) and ``lesions`` the lesion pattern
(``phantom_masses.PATTERNS``) without changing anything else. Coordinates: pixel
``(row i, column j)`` covers ``[j, j+1) x [i, i+1)``; boxes are ``[x1, y1, x2, y2]`` in
full-resolution pixels.

CLI: ``python -m engines.train.phantom --out DIR --count N --seed S`` writes DICOM DX/CR
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

from engines.preprocess import percentile_to_unit, window_to_unit
from engines.train import phantom_imaging as imaging
from engines.train.phantom_anatomy import render_soft_tissue, sample_anatomy
from engines.train.phantom_bones import (
    make_ribs, render_clavicles, render_ribs, render_shoulders, render_spine,
)
from engines.train.phantom_details import (
    confounder_box, end_on_vessels, grow_vessels, render_confounders, render_hila, render_vessels,
    sample_confounders,
)
from engines.train.phantom_devices import (
    burn_text, device_box, marker_box, render_devices, render_lead_markers, sample_devices,
    sample_markers,
)
from engines.train.phantom_geometry import Grid, ValueNoise
from engines.train.phantom_lesions import plan_tb, render_tb
from engines.train.phantom_masses import lesion_truth, render_lesions, sample_lesions

logger = logging.getLogger(__name__)

RENDER_MAX = 1024          # larger images are rendered at this width and upsampled
_STREAMS = ("flags", "acquisition", "anatomy", "ribs", "vessels", "bones", "confounders",
            "noise", "tb", "nodules", "processing", "exposure", "devices", "markers")
PHOTOMETRICS = ("MONOCHROME1", "MONOCHROME2")
STYLES = imaging.STYLES


@dataclass
class PhantomCase:
    """One rendered chest phantom and its ground truth."""

    pixels: np.ndarray          # 2-D uint16 stored values, shape (rows, cols)
    photometric: str            # "MONOCHROME1" | "MONOCHROME2"
    bits_stored: int            # 12..16
    pixel_spacing_mm: float     # isotropic spacing at the detector (also when not written)
    window_center: float | None  # VOI window (None: the image carries no window)
    window_width: float | None
    tb: bool
    tb_patterns: list[dict]     # {"kind", "box": [x1, y1, x2, y2], "severity", "side"}
    nodules: list[dict]         # {"box", "diameter_mm", "calcified", "site", "kind", "margin", ...}
    view: str = "PA"            # "PA" | "AP"
    seed: int = 0
    patient_sex: str = "O"      # "F" | "M", consistent with breast shadows
    confounders: list[dict] = field(default_factory=list)   # {"kind", "box"}: nipples, electrodes...
    style: dict = field(default_factory=dict)   # reader and processing (phantom_imaging.Processing)
    modality: str = "DX"        # "DX" (DR) | "CR"
    spacing_attribute: str | None = "ImagerPixelSpacing"   # how the spacing is written; None: not at all


def _streams(seed: int) -> dict[str, np.random.Generator]:
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    children = np.random.SeedSequence(int(seed)).spawn(len(_STREAMS))
    return {name: np.random.default_rng(ss) for name, ss in zip(_STREAMS, children)}


def _px_box(box_fov: tuple[float, float, float, float], spacing: float, rows: int, cols: int) -> list[float]:
    x0, y0, x1, y1 = box_fov
    return [round(float(np.clip(x0 / spacing, 0, cols)), 2), round(float(np.clip(y0 / spacing, 0, rows)), 2),
            round(float(np.clip(x1 / spacing, 0, cols)), 2), round(float(np.clip(y1 / spacing, 0, rows)), 2)]


@dataclass
class _Acquisition:
    """Per-image positioning and storage, drawn from the acquisition stream."""

    fov_w: float
    rows: int
    spacing: float
    apex_y: float
    cx: float
    tilt: float
    win_shift: float
    win_scale: float
    lo_frac: float
    hi_frac: float

    @property
    def fov_h(self) -> float:
        return self.rows * self.spacing


def _draw_acquisition(rng: np.random.Generator, anat, cols: int) -> _Acquisition:
    ap = anat.view == "AP"
    fov_w = float(np.clip(2.0 * anat.body_half_width + rng.uniform(10.0, 120.0 if ap else 90.0),
                          350.0, 460.0 if ap else 430.0))
    rows = max(64, int(round(cols * float(rng.uniform(0.9, 1.1)))))
    spacing = fov_w / cols
    apex_y = float(rng.uniform(15.0, 80.0))
    if apex_y + anat.lung_bottom + 25.0 > rows * spacing:
        apex_y = max(8.0, rows * spacing - anat.lung_bottom - 25.0)
    tilt_sd, tilt_max = (3.0, 8.0) if ap else (1.5, 4.0)
    return _Acquisition(
        fov_w=fov_w, rows=rows, spacing=spacing, apex_y=apex_y,
        cx=fov_w / 2.0 + float(np.clip(rng.normal(0.0, 10.0), -25.0, 25.0)),
        tilt=math.radians(float(np.clip(rng.normal(0.0, tilt_sd), -tilt_max, tilt_max))),
        win_shift=float(rng.normal(0.0, 0.03)), win_scale=float(rng.uniform(0.92, 1.12)),
        lo_frac=float(rng.uniform(0.01, 0.06)), hi_frac=float(rng.uniform(0.8, 0.95)),
    )


def _lungs_fov(grid: Grid, anat) -> tuple[float, float, float, float]:
    boxes = [grid.box_to_fov(*lung.bbox()) for lung in anat.lungs]
    return (min(b[0] for b in boxes), min(b[1] for b in boxes) - 10.0,
            max(b[2] for b in boxes), max(b[3] for b in boxes) - 30.0)


def generate_case(seed: int, *, size: int | None = None, tb: bool | None = None,
                  nodules: bool | None = None, photometric: str | None = None,
                  style: str | None = None, lesions: str | None = None) -> PhantomCase:
    """Render one chest phantom.

    ``size`` is the number of columns (None: random 2000-3000); the anatomy in mm is the
    same at every size. ``tb``/``nodules`` None draw each with probability 0.5;
    ``nodules=False`` gives no lesions and ``tb=False`` no TB pattern. ``style`` fixes the
    reader and its processing (``STYLES``), ``lesions`` the lesion pattern
    (``phantom_masses.PATTERNS``); None draws them.
    """
    st = _streams(seed)
    flags = st["flags"]
    draw_tb, draw_nod = bool(flags.random() < 0.5), bool(flags.random() < 0.5)
    photo_u = float(flags.random())
    draw_size = int(flags.integers(2000, 3001))
    bits = int(flags.integers(12, 17))
    view = "AP" if flags.random() < 0.3 else "PA"
    spacing_u = float(flags.random())
    tb = draw_tb if tb is None else bool(tb)
    nodules = draw_nod if nodules is None else bool(nodules)
    proc = imaging.draw_processing(st["processing"], view, style)
    cr = proc.system == "CR"
    draw_photo = PHOTOMETRICS[0] if photo_u < (0.7 if cr else 0.3) else PHOTOMETRICS[1]
    photometric = draw_photo if photometric is None else str(photometric)
    if photometric not in PHOTOMETRICS:
        raise ValueError(f"photometric must be one of {PHOTOMETRICS}, got {photometric!r}")
    cols = draw_size if size is None else int(size)
    if cols < 64:
        raise ValueError(f"size must be at least 64 columns, got {size!r}")
    spacing_attribute: str | None = "ImagerPixelSpacing"
    if cr:
        spacing_attribute = None if spacing_u < 0.35 else "PixelSpacing" if spacing_u < 0.6 else "ImagerPixelSpacing"

    anat = sample_anatomy(st["anatomy"], view)
    tb_plans = plan_tb(st["tb"], anat) if tb else []
    anat.ribs = make_ribs(st["ribs"], anat)
    vessels = grow_vessels(st["vessels"], anat)
    vessel_gain = float(st["vessels"].uniform(1.0, 1.5))
    extras = end_on_vessels(st["vessels"], anat) + sample_confounders(st["confounders"], anat)
    devices = sample_devices(st["devices"], anat)
    acq = _draw_acquisition(st["acquisition"], anat, cols)
    rows, spacing = acq.rows, acq.spacing
    markers = sample_markers(st["markers"], acq.fov_w, acq.fov_h, view)

    # attenuation line integrals at the render resolution
    rcols = min(cols, RENDER_MAX)
    rrows = rows if rcols == cols else max(32, int(round(rows * rcols / cols)))
    grid = Grid(rrows, rcols, acq.fov_h / rrows, acq.fov_w / rcols, acq.cx, acq.apex_y, acq.tilt)
    exposure = imaging.draw_exposure(st["exposure"], view, proc.system, acq.fov_w, acq.fov_h,
                                     _lungs_fov(grid, anat))
    mu = np.zeros((rrows, rcols), np.float32)
    texture = ValueNoise(st["anatomy"], -250.0, -50.0, 500.0, 450.0, 9.0)
    air = render_soft_tissue(mu, grid, anat, texture)
    render_hila(mu, grid, anat)
    render_vessels(mu, grid, vessels, vessel_gain)
    render_ribs(mu, grid, anat, anat.ribs)
    render_clavicles(mu, grid, anat, st["bones"])
    render_spine(mu, grid, anat)
    render_shoulders(mu, grid, anat)
    # the display mapping comes from the lesion-free anatomy, as a reader's would
    inside = imaging.field_mask(grid, exposure.field)
    mediastinum = grid.block(anat.spine_u - 30.0, anat.spine_u + 30.0, anat.carina_v,
                             anat.lungs[0].dome_v - 20.0)
    ref = imaging.reference(imaging.present(imaging.expose(mu, grid, exposure, inside)[0], grid.sx, proc),
                            air, inside, mediastinum)
    render_confounders(mu, grid, extras)
    render_devices(mu, grid, devices)
    render_lead_markers(mu, grid, markers)
    tb_boxes = render_tb(mu, grid, anat, tb_plans)
    lesion_specs = sample_lesions(st["nodules"], anat, lesions) if nodules else []
    # a lesion inside a pleural effusion cannot be seen: it is not drawn and not in the truth
    effusions = [b["box"] for b in tb_boxes if b["kind"] == "effusion"]
    lesion_specs = [n for n in lesion_specs if not any(
        x0 <= p[0] <= x1 and y0 <= p[1] <= y1 for p in [grid.to_fov(n.u, n.v)] for x0, y0, x1, y1 in effusions)]
    render_lesions(mu, grid, lesion_specs)

    # exposure at the render grid; quantum noise, detector and processing at full resolution
    signal, intensity = imaging.expose(mu, grid, exposure, inside)
    sigma = np.minimum(1.0 / np.sqrt(np.float32(exposure.quanta * spacing * spacing) * intensity), 0.5)
    full = imaging.upsample(signal, rows, cols)
    full += imaging.upsample(sigma.astype(np.float32), rows, cols) * st["noise"].standard_normal(
        (rows, cols), dtype=np.float32)
    full = imaging.detector(full, spacing, proc, exposure, st["noise"])
    outside = None
    if exposure.shutter:
        outside = 1.0 - imaging.upsample(inside, rows, cols)
    display = imaging.to_display(imaging.present(full, spacing, proc), ref, proc, outside)
    burn_text(display, spacing, markers)
    stored, center, width = imaging.quantize(display, proc, bits, acq.lo_frac, acq.hi_frac,
                                             (acq.win_shift, acq.win_scale))
    maxval = (1 << bits) - 1
    if photometric == "MONOCHROME1":
        stored = (maxval - stored).astype(np.uint16)
        if center is not None:
            center = round(maxval + 1 - center, 2)

    nod_out = []
    for n in lesion_specs:
        truth = lesion_truth(n, grid)
        nod_out.append({"box": _px_box(truth.pop("box_fov"), spacing, rows, cols), **truth})
    tb_out = [dict(b, box=_px_box(b["box"], spacing, rows, cols)) for b in tb_boxes]
    conf_out = [{"kind": it["kind"], "box": _px_box(grid.box_to_fov(*confounder_box(it)), spacing, rows, cols)}
                for it in extras]
    conf_out += [{"kind": it["kind"], "box": _px_box(grid.box_to_fov(*device_box(it)), spacing, rows, cols)}
                 for it in devices]
    conf_out += [{"kind": it["kind"], "box": _px_box(marker_box(it, spacing), spacing, rows, cols)}
                 for it in markers]
    return PhantomCase(
        pixels=stored, photometric=photometric, bits_stored=bits, pixel_spacing_mm=spacing,
        window_center=center, window_width=width,
        tb=tb, tb_patterns=tb_out, nodules=nod_out, view=view, seed=int(seed),
        patient_sex=anat.sex, confounders=conf_out,
        style=dict(proc.describe(), grid=exposure.grid, collimated=exposure.field is not None,
                   shutter=exposure.shutter, spacing=spacing_attribute or "none"),
        modality="CR" if cr else "DX", spacing_attribute=spacing_attribute,
    )


def unit_image(case: PhantomCase) -> np.ndarray:
    """Float32 0..1 image in display polarity (bone bright), as the appliance computes it."""
    if case.window_center is None or case.window_width is None:
        unit = percentile_to_unit(case.pixels)
    else:
        unit = window_to_unit(case.pixels, case.window_center, case.window_width)
    if case.photometric == "MONOCHROME1":
        unit = (1.0 - unit).astype(np.float32)
    return unit


def write_dicom(case: PhantomCase, path, *, patient_name: str = "PHANTOM^CHEST",
                patient_id: str | None = None, patient_age: str = "045Y",
                study_instance_uid: str | None = None, transfer_syntax: str | None = None):
    """Write the case as a DICOM file (DX For Presentation, or CR Image for a CR reader);
    returns the pydicom Dataset."""
    from engines.train.phantom_dicom import write_case

    return write_case(case, path, patient_name=patient_name, patient_id=patient_id,
                      patient_age=patient_age, study_instance_uid=study_instance_uid,
                      transfer_syntax=transfer_syntax)


def truth_entry(case: PhantomCase) -> dict[str, Any]:
    """The ground truth of one case as stored in ``truth.json``."""
    return {"tb": case.tb,
            "nodules": [dict(n) for n in case.nodules],
            "tb_patterns": case.tb_patterns,
            "rows": int(case.pixels.shape[0]), "columns": int(case.pixels.shape[1]),
            "pixel_spacing_mm": case.pixel_spacing_mm, "photometric": case.photometric,
            "view": case.view, "seed": case.seed, "style": case.style, "modality": case.modality}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engines.train.phantom",
                                description="Write procedural chest X-ray phantoms as DICOM DX/CR files "
                                            "with truth.json (TB patterns, nodule and mass boxes).")
    p.add_argument("--out", required=True, type=Path, help="output directory (created)")
    p.add_argument("--count", type=int, default=10, help="number of images (default 10)")
    p.add_argument("--seed", type=int, default=0, help="base seed; image i uses seed*1000000+i")
    p.add_argument("--size", type=int, default=None, help="columns (default: random 2000-3000)")
    p.add_argument("--tb-fraction", type=float, default=0.5, help="fraction of images with TB")
    p.add_argument("--nodule-fraction", type=float, default=0.5, help="fraction of images with nodules")
    p.add_argument("--photometric", choices=PHOTOMETRICS, default=None, help="default: random")
    p.add_argument("--style", choices=STYLES, default=None, help="reader and processing (default: random)")
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
        case = generate_case(case_seed, size=args.size, tb=tb, nodules=nod, photometric=args.photometric,
                             style=args.style)
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
