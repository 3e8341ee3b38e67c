"""Tests for the procedural chest phantom generator (engines.train.phantom)."""
from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pydicom
import pytest

from engines.train import phantom

DCIODVFY = shutil.which("dciodvfy") or "/usr/bin/dciodvfy"


def test_same_seed_same_bytes_and_different_seeds_differ(tmp_path):
    a = phantom.generate_case(11, size=256)
    b = phantom.generate_case(11, size=256)
    c = phantom.generate_case(12, size=256)
    assert a.pixels.dtype == np.uint16 and a.pixels.ndim == 2
    assert a.pixels.tobytes() == b.pixels.tobytes()
    assert a.nodules == b.nodules and a.tb_patterns == b.tb_patterns
    assert a.pixels.shape != c.pixels.shape or not np.array_equal(a.pixels, c.pixels)
    phantom.write_dicom(a, tmp_path / "a.dcm")
    phantom.write_dicom(b, tmp_path / "b.dcm")
    phantom.write_dicom(c, tmp_path / "c.dcm")
    assert (tmp_path / "a.dcm").read_bytes() == (tmp_path / "b.dcm").read_bytes()
    ds_a, ds_c = pydicom.dcmread(tmp_path / "a.dcm"), pydicom.dcmread(tmp_path / "c.dcm")
    assert ds_a.SOPInstanceUID != ds_c.SOPInstanceUID
    assert ds_a.StudyInstanceUID != ds_c.StudyInstanceUID


def test_case_fields_are_in_range():
    for seed in range(6):
        case = phantom.generate_case(seed, size=200)
        rows, cols = case.pixels.shape
        assert cols == 200 and 0.89 * cols <= rows <= 1.11 * cols
        assert 12 <= case.bits_stored <= 16
        assert int(case.pixels.max()) < (1 << case.bits_stored)
        assert 350.0 / 200 <= case.pixel_spacing_mm <= 460.0 / 200   # AP portable fields are wider
        assert case.photometric in ("MONOCHROME1", "MONOCHROME2")
        assert case.view in ("PA", "AP")
        assert case.tb == bool(case.tb_patterns)
        assert case.style["style"] in phantom.STYLES and case.modality in ("DX", "CR")
        assert (case.window_center is None) == (case.window_width is None)
        assert case.modality == "CR" or case.window_center is not None   # DX needs a window
        for n in case.nodules:
            assert 5.0 <= n["diameter_mm"] <= 60.01
            assert n["kind"] == ("mass" if n["diameter_mm"] > 30.0 else "nodule")


def test_default_size_is_a_full_resolution_radiograph():
    case = phantom.generate_case(2)
    rows, cols = case.pixels.shape
    assert 2000 <= cols <= 3000 and 0.89 * cols <= rows <= 1.11 * cols
    assert 350.0 <= cols * case.pixel_spacing_mm <= 460.0
    unit = phantom.unit_image(case)
    assert 0.1 < float(unit.mean()) < 0.9 and float(unit.std()) > 0.1


def test_defaults_give_about_half_tb_and_half_nodules():
    cases = [phantom.generate_case(1000 + s, size=96) for s in range(40)]
    tb = sum(c.tb for c in cases)
    nod = sum(bool(c.nodules) for c in cases)
    assert 10 <= tb <= 30, tb
    assert 10 <= nod <= 30, nod
    assert {c.photometric for c in cases} == {"MONOCHROME1", "MONOCHROME2"}
    assert {c.modality for c in cases} == {"DX", "CR"}
    assert {c.style["enhancement"] for c in cases} == {"plain", "unsharp", "multiscale"}
    assert {c.style["voi"] for c in cases} == {"window", "full", "none"}


def test_lesions_cover_nodules_to_masses_in_every_pattern():
    """Over many cases: 5-60 mm, the metastatic pattern (3-10 in both lungs), masses,
    every margin and site, some cavitating."""
    sizes, margins, sites, cavitating = [], set(), set(), 0
    for seed in range(60):
        case = phantom.generate_case(seed, size=128, tb=False, nodules=True)
        assert case.nodules, seed
        sizes += [n["diameter_mm"] for n in case.nodules]
        margins |= {n["margin"] for n in case.nodules}
        sites |= {n["site"] for n in case.nodules}
        cavitating += sum(n["cavitating"] for n in case.nodules)
    assert min(sizes) < 8.0 and max(sizes) > 45.0 and sum(s > 30.0 for s in sizes) >= 8
    assert margins == {"smooth", "lobulated", "spiculated"}
    assert {"lung", "rib", "hilum", "diaphragm", "periphery"} <= sites and cavitating >= 1
    for seed in range(5):
        meta = phantom.generate_case(seed, size=256, tb=False, nodules=True, lesions="metastatic")
        assert 3 <= len(meta.nodules) <= 10
        centres = [(n["box"][0] + n["box"][2]) / 2 for n in meta.nodules]
        cols = meta.pixels.shape[1]
        assert min(centres) < cols / 2 < max(centres), "metastases in both lungs"
        mass = phantom.generate_case(seed, size=256, tb=False, nodules=True, lesions="mass")
        assert max(n["diameter_mm"] for n in mass.nodules) > 30.0
    with pytest.raises(ValueError, match="pattern"):
        phantom.generate_case(1, size=64, nodules=True, lesions="clusters")


def test_style_changes_the_processing_not_the_patient():
    """The same seed in every style: the same lesions in the same place, a different image."""
    cases = {style: phantom.generate_case(4, size=256, tb=False, nodules=True, style=style)
             for style in phantom.STYLES}
    boxes = {style: [n["box"] for n in case.nodules] for style, case in cases.items()}
    assert all(b == boxes["dr_plain"] for b in boxes.values())
    assert all(case.style["style"] == style for style, case in cases.items())
    assert {case.modality for case in cases.values()} == {"DX", "CR"}
    plain, unsharp = (phantom.unit_image(cases[s]) for s in ("cr_plain", "cr_unsharp"))
    assert plain.shape == unsharp.shape and np.abs(plain - unsharp).mean() > 0.01
    with pytest.raises(ValueError, match="style"):
        phantom.generate_case(1, size=64, style="film")


def test_monochrome1_inverts_polarity():
    m1 = phantom.generate_case(21, size=256, photometric="MONOCHROME1")
    m2 = phantom.generate_case(21, size=256, photometric="MONOCHROME2")
    assert not np.array_equal(m1.pixels, m2.pixels)
    # stored values run in opposite directions ...
    assert np.corrcoef(m1.pixels.ravel().astype(float), m2.pixels.ravel().astype(float))[0, 1] < -0.99
    # ... and the display images agree
    u1, u2 = phantom.unit_image(m1), phantom.unit_image(m2)
    assert u1.dtype == np.float32 and 0.0 <= u1.min() and u1.max() <= 1.0
    assert np.abs(u1 - u2).max() < 1e-3
    assert u2.std() > 0.1   # the window shows structure, not a flat image


def _display_diff(seed: int, size: int = 512):
    with_n = phantom.generate_case(seed, size=size, nodules=True)
    without = phantom.generate_case(seed, size=size, nodules=False)
    sign = 1.0 if with_n.photometric == "MONOCHROME2" else -1.0
    diff = sign * (with_n.pixels.astype(np.float64) - without.pixels.astype(np.float64))
    return with_n, without, diff


@pytest.mark.parametrize("seed", [3, 8, 31, 77])
def test_nodule_boxes_lie_on_the_drawn_nodules(seed):
    case, clean, diff = _display_diff(seed)
    assert case.nodules, "nodules=True must give at least one nodule"
    assert clean.nodules == []
    assert clean.pixels.shape == case.pixels.shape
    rows, cols = case.pixels.shape
    for n in case.nodules:
        x1, y1, x2, y2 = n["box"]
        assert 0 <= x1 < x2 <= cols and 0 <= y1 < y2 <= rows
        # the box is the outline's extent: its mean side is the diameter (up to the tilt)
        d_px = n["diameter_mm"] / case.pixel_spacing_mm
        assert abs(((x2 - x1) + (y2 - y1)) / 2 - d_px) < 0.05 * d_px + 0.05, (n, d_px)
        cx, cy, r = (x1 + x2) / 2, (y1 + y2) / 2, d_px / 2
        yy, xx = np.mgrid[0:rows, 0:cols]
        dist = np.hypot(xx + 0.5 - cx, yy + 0.5 - cy)
        inside = diff[dist <= max(0.8 * r, 1.0)].mean()
        ring = diff[(dist >= 1.4 * r + 3) & (dist <= 1.4 * r + 7)].mean()
        assert inside > ring + 2.0, (n, inside, ring)
    # away from every lesion the two renders are the same anatomy (scatter and processing
    # spread a lesion's signal a little)
    far = np.ones_like(diff, dtype=bool)
    for n in case.nodules:
        x1, y1, x2, y2 = n["box"]
        m = int((x2 - x1) / 4) + 8
        far[max(0, int(y1) - m):int(y2) + m, max(0, int(x1) - m):int(x2) + m] = False
    assert np.abs(diff[far]).mean() < 0.01 * (case.pixels.max() - case.pixels.min())


def test_cli_writes_files_truth_and_valid_dicom(tmp_path):
    out = tmp_path / "ph"
    assert phantom.main(["--out", str(out), "--count", "3", "--seed", "4", "--size", "320",
                         "--tb-fraction", "1", "--nodule-fraction", "1"]) == 0
    truth = json.loads((out / "truth.json").read_text())
    files = sorted(p.name for p in out.glob("*.dcm"))
    assert len(files) == 3 and sorted(truth) == files
    for name in files:
        entry = truth[name]
        assert entry["tb"] is True and entry["nodules"]
        ds = pydicom.dcmread(out / name)
        assert ds.SOPClassUID == {"DX": "1.2.840.10008.5.1.4.1.1.1.1",
                                  "CR": "1.2.840.10008.5.1.4.1.1.1"}[entry["modality"]]
        assert ds.Modality == entry["modality"] and ds.BodyPartExamined == "CHEST"
        assert ds.Columns == 320 and ds.Rows == entry["rows"]
        if ds.Modality == "DX":
            assert ds.PresentationLUTShape == ("INVERSE" if ds.PhotometricInterpretation == "MONOCHROME1"
                                               else "IDENTITY")
        spacing = entry["style"]["spacing"]
        if spacing == "none":
            assert "ImagerPixelSpacing" not in ds and "PixelSpacing" not in ds
        else:
            assert float(ds[spacing].value[0]) == pytest.approx(entry["pixel_spacing_mm"], rel=1e-5)
        assert ds.pixel_array.shape == (ds.Rows, ds.Columns)
        for n in entry["nodules"]:
            x1, y1, x2, y2 = n["box"]
            assert 0 <= x1 < x2 <= ds.Columns and 0 <= y1 < y2 <= ds.Rows
        for p in entry["tb_patterns"]:
            x1, y1, x2, y2 = p["box"]
            assert 0 <= x1 < x2 <= ds.Columns and 0 <= y1 < y2 <= ds.Rows
            assert p["kind"] in ("consolidation", "cavity", "fibrosis", "miliary", "effusion")
        assert _dciodvfy_errors(out / name) == []
    # same seed, same files
    again = tmp_path / "again"
    assert phantom.main(["--out", str(again), "--count", "3", "--seed", "4", "--size", "320",
                         "--tb-fraction", "1", "--nodule-fraction", "1"]) == 0
    for name in files + ["truth.json"]:
        assert (out / name).read_bytes() == (again / name).read_bytes()


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="photometric"):
        phantom.generate_case(1, size=128, photometric="RGB")
    with pytest.raises(ValueError, match="seed"):
        phantom.generate_case(-1, size=128)
    with pytest.raises(ValueError, match="size"):
        phantom.generate_case(1, size=8)


def test_anatomy_is_the_same_in_mm_at_any_size():
    from engines.preprocess import resize_area

    small = phantom.generate_case(5, size=200, nodules=False, tb=False)
    large = phantom.generate_case(5, size=400, nodules=False, tb=False)
    other = phantom.generate_case(6, size=200, nodules=False, tb=False)
    assert small.pixel_spacing_mm == pytest.approx(2.0 * large.pixel_spacing_mm)
    rows, cols = small.pixels.shape
    assert abs(large.pixels.shape[0] - 2 * rows) <= 1
    down = resize_area(phantom.unit_image(large), rows, cols)
    same = np.corrcoef(down.ravel(), phantom.unit_image(small).ravel())[0, 1]
    crop = phantom.unit_image(other)[:rows, :cols]
    h, w = crop.shape
    diff = np.corrcoef(down[:h, :w].ravel(), crop.ravel())[0, 1]
    assert same > 0.97 and same > diff + 0.05, (same, diff)


def _first_seeds_per_kind() -> dict[str, int]:
    """Seeds whose TB case has a given pattern and no fibrosis (which moves the anatomy)."""
    found: dict[str, int] = {}
    for seed in range(300):
        kinds = [p["kind"] for p in phantom.generate_case(seed, size=64, tb=True, nodules=False).tb_patterns]
        if "fibrosis" in kinds:
            found.setdefault("fibrosis", seed)
            continue
        for kind in kinds:
            found.setdefault(kind, seed)
        if len(found) == 5:
            break
    return found


def test_tb_pattern_boxes_lie_on_the_drawn_patterns():
    seeds = _first_seeds_per_kind()
    assert sorted(seeds) == ["cavity", "consolidation", "effusion", "fibrosis", "miliary"]
    for kind, seed in seeds.items():
        sick = phantom.generate_case(seed, size=256, tb=True, nodules=False)
        healthy = phantom.generate_case(seed, size=256, tb=False, nodules=False)
        assert sick.tb and not healthy.tb and healthy.tb_patterns == []
        diff = phantom.unit_image(sick) - phantom.unit_image(healthy)
        rows, cols = diff.shape
        union = np.zeros_like(diff, dtype=bool)
        for p in sick.tb_patterns:
            x1, y1, x2, y2 = p["box"]
            assert 0 <= x1 < x2 <= cols and 0 <= y1 < y2 <= rows
            inside = np.zeros_like(diff, dtype=bool)
            inside[int(y1):int(np.ceil(y2)), int(x1):int(np.ceil(x2))] = True
            union |= inside
            # every TB pattern adds density (display brighter) where its box says
            assert diff[inside].mean() > 0.01, (kind, p)
        if kind != "fibrosis":
            assert np.abs(diff[union]).mean() > 4 * np.abs(diff[~union]).mean(), kind


def test_confounders_appear_in_negative_images():
    kinds: set[str] = set()
    for seed in range(40):
        case = phantom.generate_case(seed, size=96, tb=False, nodules=False)
        assert case.nodules == [] and case.tb_patterns == []
        kinds.update(c["kind"] for c in case.confounders)
    assert {"end_on_vessel", "nipple", "electrode", "cable", "lead_marker", "text"} <= kinds


def _dciodvfy_errors(path, iod: str | None = None) -> list[str]:
    res = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    report = res.stdout + res.stderr
    if iod is None:
        iod = "CRImage" if pydicom.dcmread(path, stop_before_pixels=True).Modality == "CR" \
            else "DXImageForPresentation"
    assert iod in report
    return [line for line in report.splitlines() if line.startswith("Error")]


@pytest.mark.parametrize("photometric,transfer_syntax", [
    ("MONOCHROME1", None),
    ("MONOCHROME2", "1.2.840.10008.1.2.4.90"),   # JPEG 2000 lossless
    ("MONOCHROME1", "1.2.840.10008.1.2.5"),      # RLE lossless
])
def test_write_dicom_photometrics_and_lossless_syntaxes(tmp_path, photometric, transfer_syntax):
    case = phantom.generate_case(9, size=300, photometric=photometric)
    path = tmp_path / "x.dcm"
    phantom.write_dicom(case, path, patient_id="P1", study_instance_uid="1.2.3.4",
                        transfer_syntax=transfer_syntax)
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == (transfer_syntax or "1.2.840.10008.1.2.1")
    assert ds.PhotometricInterpretation == photometric
    assert ds.PatientID == "P1" and ds.StudyInstanceUID == "1.2.3.4"
    assert ds.BitsStored == case.bits_stored and ds.HighBit == case.bits_stored - 1
    assert np.array_equal(ds.pixel_array, case.pixels)
    if case.window_center is None:
        assert "WindowCenter" not in ds and ds.Modality == "CR"
    else:
        assert float(ds.WindowCenter) == pytest.approx(case.window_center, abs=0.01)
    assert _dciodvfy_errors(path) == []


def test_cr_without_window_or_spacing_reads_like_the_appliance(tmp_path):
    """A CR reader's object without window and pixel spacing: valid, and the appliance
    sees the same display image (percentiles) and no spacing."""
    from edge.imaging import load_for_models
    from engines.preprocess import resize_area

    seed = next(s for s in range(200) if (lambda c: c.modality == "CR" and c.window_center is None
                                          and c.spacing_attribute is None)(phantom.generate_case(s, size=64)))
    case = phantom.generate_case(seed, size=1024)
    path = tmp_path / "cr.dcm"
    ds = phantom.write_dicom(case, path)
    assert ds.Modality == "CR" and "WindowCenter" not in ds and "ImagerPixelSpacing" not in ds
    assert _dciodvfy_errors(path, iod="CRImage") == []
    seen = load_for_models(path, min_side=512)
    assert seen.pixel_spacing_mm is None
    ours = resize_area(phantom.unit_image(case), *seen.unit_image.shape)
    assert np.abs(ours - seen.unit_image).mean() < 0.02


def test_write_dicom_rejects_lossy_or_unknown_syntax(tmp_path):
    case = phantom.generate_case(9, size=96)
    with pytest.raises(ValueError, match="transfer_syntax"):
        phantom.write_dicom(case, tmp_path / "x.dcm", transfer_syntax="1.2.840.10008.1.2.4.91")
