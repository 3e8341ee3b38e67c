"""Result objects (SR, GSPS, SC) checked the way a receiver reads them.

Each object is written to bytes and read back; the real dicom3tools ``dciodvfy`` checks
the IOD, DCMTK's ``dsrdump`` reads the SR and ``dcmp2pgm`` renders the presentation state
over the source image. How real viewers (OHIF, Orthanc's web viewer) show them is in
``test_viewers.py``.
"""
from __future__ import annotations

import datetime
import io
import json
import re
import subprocess
from dataclasses import replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian

from conftest import require_tool
from edge.findings import Findings, ModelInfo, Nodule, Other, TBResult
from edge.reporting import (OUTPUT_TYPES, Equipment, annotate_image, build_gsps,
                            build_results, build_sc, build_sr, result_series_uid, result_uid)
from edge.reporting import common
from edge.reporting.annotate import banner_lines
from edge.reporting.sc import sc_image_size
from engines.preprocess import resize_area, window_to_unit
from support.viewers import ohif_labels


SIZE = 1024
CENTER, WIDTH = 1800.0, 1600.0
VIETNAMESE = "Nguyễn^Văn An"
BOXES = ([200.0, 300.0, 260.0, 360.0], [600.0, 500.0, 700.0, 590.0])


def make_source(tmp_path: Path, *, monochrome1: bool = False, spacing: bool = True,
                name: str = "Doe^Jane", dated: bool = True, voi_lut: bool = False) -> Dataset:
    """A small synthetic DX image, written to a file and read back like a spooled one."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"   # DX for presentation
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.10" + ("1" if monochrome1 else "2")
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.11"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.12"
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = name
    ds.PatientID = "PID-0042"
    ds.PatientBirthDate = "19800101"
    ds.PatientSex = "F"
    ds.PatientAge = "044Y"
    ds.StudyDate, ds.StudyTime = ("20240501", "101500") if dated else ("", "")
    if dated:
        ds.AcquisitionDate, ds.AcquisitionTime = "20240501", "101600.250000"
    ds.AccessionNumber = "ACC-7"
    ds.ReferringPhysicianName = "Trần^Bình"
    ds.StudyID = "S7"
    ds.Modality = "DX"
    ds.Manufacturer = "Test Modality Inc"
    ds.SeriesNumber, ds.InstanceNumber = 1, 3
    ds.BodyPartExamined = "CHEST"
    ds.PatientOrientation = ["L", "F"]
    ds.Rows = ds.Columns = SIZE
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    body = 1000 + 1500 * np.exp(-((xx - SIZE / 2) ** 2 + (yy - SIZE / 2) ** 2) / (2 * 340.0 ** 2))
    pixels = body.astype(np.uint16)
    ds.WindowCenter, ds.WindowWidth = CENTER, WIDTH
    if monochrome1:   # same look, stored inverted
        pixels = (4095 - pixels).astype(np.uint16)
        ds.WindowCenter = 4095 - CENTER
    ds.PixelData = pixels.tobytes()
    if spacing:
        ds.ImagerPixelSpacing = [0.2, 0.2]
    if voi_lut:   # many DR images carry a VOI LUT as well as a window
        lut = Dataset()
        lut.add_new("LUTDescriptor", "US", [4096, 0, 12])
        lut.add_new("LUTData", "OW", np.arange(4096, dtype="<u2").tobytes())
        ds.VOILUTSequence = [lut]
        ds.VOILUTFunction = "SIGMOID"
    path = tmp_path / f"source_{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return pydicom.dcmread(path)


def make_findings(source: Dataset, *, positive: bool = True, nodules: int = 2,
                  spacing: bool = True, clinical: bool = False, version: str = "0.1.0",
                  boxes: tuple = BOXES, tb: bool = True) -> Findings:
    models = [ModelInfo("tb_classifier", version, "onnxruntime", clinical),
              ModelInfo("nodule_detector", "0.1.0", "onnxruntime", clinical)]
    found = [Nodule(box=list(box), score=score, diameter_mm=(mm if spacing else None),
                    diameter_px=mm * 5)
             for box, score, mm in zip(boxes, (0.91, 0.77), (12.0, 20.0))][:nodules]
    return Findings(
        sop_instance_uid=source.SOPInstanceUID, eligible=True,
        tb=TBResult(score=0.83 if positive else 0.12, threshold=0.5, positive=positive)
        if tb else None,
        nodules=found, models=models, rows=SIZE, columns=SIZE,
        pixel_spacing_mm=[0.2, 0.2] if spacing else None)


def unit_image(source: Dataset) -> np.ndarray:
    unit = window_to_unit(source.pixel_array, float(source.WindowCenter), float(source.WindowWidth))
    if source.PhotometricInterpretation == "MONOCHROME1":
        unit = 1.0 - unit
    return resize_area(unit, SIZE // 2, SIZE // 2)


def to_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def write(ds: Dataset, path: Path) -> Path:
    path.write_bytes(to_bytes(ds))
    return path


def dciodvfy_errors(path: Path) -> list[str]:
    require_tool("dciodvfy")
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if "Error" in line]


CASES = {
    "positive": dict(source={}, findings={}),
    "negative": dict(source={}, findings=dict(positive=False, nodules=0)),
    "no_spacing": dict(source=dict(spacing=False), findings=dict(spacing=False)),
    "mono1_utf8": dict(source=dict(monochrome1=True, name=VIETNAMESE), findings={}),
    "lut_and_window": dict(source=dict(voi_lut=True), findings={}),
    "edge_boxes_no_tb": dict(source={}, findings=dict(
        tb=False, boxes=([0.0, 0.0, 1024.0, 1024.0], [-5.0, 1000.0, 30.0, 1030.0]))),
}


@pytest.fixture(params=list(CASES))
def case(request, tmp_path):
    spec = CASES[request.param]
    source = make_source(tmp_path, **spec["source"])
    findings = make_findings(source, **spec["findings"])
    return request.param, source, findings


def test_every_object_passes_dciodvfy(case, tmp_path):
    name, source, findings = case
    results = build_results(source, findings, unit_image(source))
    assert set(results) == set(OUTPUT_TYPES)
    for kind, ds in results.items():
        path = write(ds, tmp_path / f"{name}_{kind}.dcm")
        back = pydicom.dcmread(path)
        assert back.SOPInstanceUID == ds.SOPInstanceUID
        assert dciodvfy_errors(path) == [], f"{name} {kind}"


def test_dciodvfy_reports_a_broken_object(tmp_path):
    """The validator used above does flag a missing required attribute."""
    source = make_source(tmp_path)
    gsps = build_gsps(source, make_findings(source))
    del gsps.DisplayedAreaSelectionSequence
    assert dciodvfy_errors(write(gsps, tmp_path / "broken.dcm"))


def dsrdump(path: Path) -> str:
    require_tool("dsrdump")
    run = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return run.stdout


def test_sr_positive_as_dsrdump_reads_it(tmp_path):
    source = make_source(tmp_path)
    text = dsrdump(write(build_sr(source, make_findings(source)), tmp_path / "sr.dcm"))
    assert '"Imaging Measurement Report"' in text
    assert 'IMAGE:(,,"Source")=(DX image,)' in text.split('"Image Library"')[1]
    # the TB result: a report-level evaluation with the numbers it was inferred from
    evaluations = text.split('CONTAINER:(,,"Qualitative Evaluations")')[1]
    assert 'CODE:(,,"Tuberculosis")=(52101004,SCT,"Present")' in evaluations
    assert 'inferred from NUM:(,,"Probability")="83.0" (%,UCUM,"Percent")' in evaluations
    assert 'inferred from NUM:(,,"Threshold Value")="50.0" (%,UCUM,"Percent")' in evaluations
    assert 'TEXT:(,,"Algorithm Name")="tb_classifier"' in evaluations
    assert 'CODE:(,,"Nodule")=(52101004,SCT,"Present")' in evaluations
    # the nodules: one planar ROI each, labels that read as written
    assert '"Tracking Identifier")="Nodule 1"' in text and '"Nodule 2"' in text
    assert '"Tracking Identifier")="TB"' not in text
    assert text.count('CODE:(,,"Finding")=(27925004,SCT,"Nodule")') == 2
    assert 'NUM:(,,"Certainty of Finding")="91.0" (%,UCUM,"Percent")' in text
    assert 'NUM:(,,"Long axis")="12.0" (mm,UCUM,"mm")' in text
    assert "{probability}" not in text
    assert "SCOORD:(,,\"Image Region\")=(POLYLINE,200/300" in text
    # the finding site on the measurements, where OHIF does not print its code
    assert re.search(r'NUM:\(,,"Long axis"\)[^\n]*\n\s*<has concept mod CODE:\(,,'
                     r'"Finding Site"\)=\(39607008,SCT,"Lung"\)>', text)
    assert 'TEXT:(,,"Algorithm Name")="nodule_detector"' in text
    assert 'TEXT:(,,"Algorithm Version")="0.1.0"' in text
    assert "Content Date/Time   : 2024-05-01 10:16:00" in text


def test_sr_negative_and_without_spacing(tmp_path):
    source = make_source(tmp_path, spacing=False)
    negative = dsrdump(write(build_sr(source, make_findings(source, positive=False, nodules=0)),
                             tmp_path / "neg.dcm"))
    evaluations = negative.split('CONTAINER:(,,"Qualitative Evaluations")')[1]
    assert 'CODE:(,,"Tuberculosis")=(272519000,SCT,"Absent")' in evaluations
    assert 'inferred from NUM:(,,"Probability")="12.0" (%,UCUM,"Percent")' in evaluations
    assert 'CODE:(,,"Nodule")=(272519000,SCT,"Absent")' in evaluations
    # one group, over the whole image: the region searched, no nodule in it
    assert negative.count('"Measurement Group"') == 1
    assert '"Tracking Identifier")="Nodules"' in negative and "Nodule 1" not in negative
    assert "(POLYLINE,0/0,...)" in negative and "NUM:(,," not in negative.split(
        '"Qualitative Evaluations"')[0].split('"Imaging Measurements"')[1]
    no_mm = dsrdump(write(build_sr(source, make_findings(source, spacing=False)),
                          tmp_path / "nomm.dcm"))
    assert "Long axis" not in no_mm and "(POLYLINE,200/300" in no_mm


def test_sr_without_tb_or_nodule_model(tmp_path):
    """Whatever is missing, the report keeps one group with a region (OHIF needs one)."""
    source = make_source(tmp_path)
    findings = make_findings(source, tb=False, nodules=0)
    no_tb = dsrdump(write(build_sr(source, findings), tmp_path / "no_tb.dcm"))
    assert '"Tracking Identifier")="Nodules"' in no_tb and "Tuberculosis" not in no_tb
    tb_only = replace(make_findings(source, nodules=0), models=findings.models[:1])
    text = dsrdump(write(build_sr(source, tb_only), tmp_path / "tb_only.dcm"))
    assert '"Tracking Identifier")="TB"' in text and '"Nodule")' not in text
    group = text.split('"Imaging Measurements"')[1].split('"Qualitative Evaluations"')[0]
    assert 'CODE:(,,"Tuberculosis")=(52101004,SCT,"Present")' in group
    assert "(POLYLINE,0/0,...)" in group and "NUM:(,," not in group
    for name in ("no_tb", "tb_only"):
        assert dciodvfy_errors(tmp_path / f"{name}.dcm") == [], name


def report_evaluations(sr: Dataset) -> dict[str, Dataset]:
    """The report-level qualitative evaluations (TID 1500 row 13), by concept name."""
    root = sr.ContentSequence
    container = [item for item in root
                 if item.ConceptNameCodeSequence[0].CodeValue == "C0034375"]
    assert len(container) == 1
    return {item.ConceptNameCodeSequence[0].CodeMeaning: item
            for item in container[0].ContentSequence}


def test_sr_content_read_back_with_highdicom(tmp_path):
    source = make_source(tmp_path)
    findings = make_findings(source)
    sr = hd.sr.srread(io.BytesIO(to_bytes(build_sr(source, findings))))
    report = sr.content
    rois = report.get_planar_roi_measurement_groups()
    assert len(rois) == 2 and not report.get_image_measurement_groups()
    for group, nodule, index in zip(rois, findings.nodules, (1, 2)):
        assert group.tracking_identifier == f"Nodule {index}"
        assert UID(group.tracking_uid).is_valid
        assert group.finding_type == hd.sr.CodedConcept("27925004", "SCT", "Nodule")
        region = group.roi
        assert region.value_type == hd.sr.ValueTypeValues.SCOORD
        points = region.value
        assert points.shape == (5, 2) and np.array_equal(points[0], points[-1])
        x1, y1, x2, y2 = nodule.box
        assert points[:, 0].min() == x1 and points[:, 0].max() == x2
        assert points[:, 1].min() == y1 and points[:, 1].max() == y2
        ref = region.ReferencedSOPSequence[0] if "ReferencedSOPSequence" in region else \
            region.ContentSequence[0].ReferencedSOPSequence[0]
        assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
        by_name = {m.name.meaning: m for m in group.get_measurements()}
        assert float(by_name["Long axis"].value) == nodule.diameter_mm
        certainty = by_name["Certainty of Finding"]
        assert float(certainty.value) == pytest.approx(nodule.score * 100)
        assert certainty.unit.value == "%"
    gsps = build_gsps(source, findings)   # the same finding carries the same tracking UID
    boxes = gsps.GraphicAnnotationSequence[0].GraphicObjectSequence
    assert [b.TrackingUID for b in boxes] == [str(g.tracking_uid) for g in rois]
    evaluations = report_evaluations(sr)
    tb = evaluations["Tuberculosis"]
    assert tb.ConceptCodeSequence[0].CodeMeaning == "Present"
    numbers = {item.ConceptNameCodeSequence[0].CodeMeaning: item
               for item in tb.ContentSequence if item.ValueType == "NUM"}
    assert {item.RelationshipType for item in numbers.values()} == {"INFERRED FROM"}
    probability = numbers["Probability"].MeasuredValueSequence[0]
    assert float(probability.NumericValue) == pytest.approx(findings.tb.score * 100)
    assert probability.MeasurementUnitsCodeSequence[0].CodeValue == "%"
    threshold = numbers["Threshold Value"].MeasuredValueSequence[0]
    assert float(threshold.NumericValue) == pytest.approx(findings.tb.threshold * 100)
    assert evaluations["Nodule"].ConceptCodeSequence[0].CodeMeaning == "Present"
    assert sr.ContentQualification == "RESEARCH"
    assert sr.CurrentRequestedProcedureEvidenceSequence[0].StudyInstanceUID == \
        source.StudyInstanceUID
    air = [item for item in sr.ContributingEquipmentSequence
           if item.PurposeOfReferenceCodeSequence[0].CodeValue == "Newcode1"]
    assert len(air) == 1
    assert air[0].PurposeOfReferenceCodeSequence[0].CodingSchemeDesignator == "99IHE"
    assert air[0].Manufacturer == Equipment().manufacturer
    assert air[0].SoftwareVersions == Equipment().software_version


def test_sr_labels_read_as_written_in_ohif(tmp_path):
    source = make_source(tmp_path)
    """OHIF's label rule (support.viewers.ohif_labels; test_viewers.py runs the viewer)."""
    positive = pydicom.dcmread(io.BytesIO(to_bytes(build_sr(source, make_findings(source)))))
    labels = {name: lines for name, (_, lines) in ohif_labels(positive).items()}
    assert labels == {
        "Nodule 1": ["Certainty of Finding: 91.00 %", "Long axis: 12.00 mm"],
        "Nodule 2": ["Certainty of Finding: 77.00 %", "Long axis: 20.00 mm"],
    }
    negative = pydicom.dcmread(io.BytesIO(to_bytes(build_sr(
        source, make_findings(source, positive=False, nodules=0)))))
    assert {name: lines for name, (_, lines) in ohif_labels(negative).items()} == \
        {"Nodules": []}


def render(gsps_path: Path, source_path: Path, workdir: Path) -> tuple[np.ndarray, str]:
    """dcmp2pgm's rendering of the image under the state, and its dump of the state."""
    out = workdir / "out.pgm"
    require_tool("dcmp2pgm")
    run = subprocess.run(["dcmp2pgm", "-v", "-p", str(gsps_path), str(source_path), str(out)],
                         capture_output=True, text=True, timeout=60, cwd=workdir)
    assert run.returncode == 0, run.stderr
    return np.asarray(Image.open(out)).astype(int), run.stdout + run.stderr


def test_a_detection_over_30_mm_is_named_a_mass_in_every_object(tmp_path):
    """Radiologists call an opacity over 3 cm a mass: the SR's finding and tracking
    identifier, the GSPS label and the FHIR observation say "Mass" for the 45 mm one and
    "Nodule" for the 12 mm one; without pixel spacing the size is unknown: "Nodule"."""
    from edge.fhir import build_bundle
    from edge.config_outbound import FhirConfig

    source = make_source(tmp_path)
    findings = make_findings(source)
    big = replace(findings.nodules[1], diameter_mm=45.0)
    findings = replace(findings, nodules=[findings.nodules[0], big])
    text = dsrdump(write(build_sr(source, findings), tmp_path / "sr.dcm"))
    assert '"Tracking Identifier")="Nodule 1"' in text and '"Tracking Identifier")="Mass 1"' in text
    assert text.count('CODE:(,,"Finding")=(27925004,SCT,"Nodule")') == 1
    assert text.count('CODE:(,,"Finding")=(4147007,SCT,"Mass")') == 1
    assert 'NUM:(,,"Long axis")="45.0" (mm,UCUM,"mm")' in text
    gsps = build_gsps(source, findings)
    labels = [t.UnformattedTextValue for t in gsps.GraphicAnnotationSequence[0].TextObjectSequence]
    assert any(v.startswith("Mass 0.77, 45 mm") for v in labels), labels
    assert any(v.startswith("Nodule 0.91, 12 mm") for v in labels), labels
    assert "1 nodule(s), 1 mass(es) marked" in labels, labels
    assert "Nodules: 1, masses: 1 marked" in banner_lines(findings)
    assert dciodvfy_errors(write(gsps, tmp_path / "gsps.dcm")) == []
    _, bundle = build_bundle(source, findings, config=FhirConfig(base_url="http://emr/fhir"),
                             equipment=Equipment(), issued=datetime.datetime(2026, 1, 2, 3, 4, 5))
    codes = [c["code"] for e in json.loads(bundle)["entry"]
             if e["resource"]["resourceType"] == "Observation"
             for c in e["resource"]["code"]["coding"]]
    assert "4147007" in codes and "27925004" in codes
    unknown = replace(findings, nodules=[replace(big, diameter_mm=None)])
    assert '"Tracking Identifier")="Nodule 1"' in dsrdump(write(build_sr(source, unknown), tmp_path / "u.dcm"))


@pytest.mark.parametrize("monochrome1", [False, True])
def test_gsps_rendered_by_dcmp2pgm(tmp_path, monochrome1):
    """What DCMTK shows of the state, and only that (docs/CONFORMANCE.md says the same)."""
    source = make_source(tmp_path, monochrome1=monochrome1, name=VIETNAMESE)
    findings = make_findings(source)
    source_path = write(source, tmp_path / "source.dcm")
    gsps_path = write(build_gsps(source, findings), tmp_path / "gsps.dcm")
    image, dump = render(gsps_path, source_path, tmp_path)
    assert image.shape == (SIZE, SIZE)
    # Rendered like the source: its window, and MONOCHROME1 not turned into a negative.
    expected = unit_image(source)
    expected_full = np.kron(expected, np.ones((2, 2)))
    assert np.abs(image - expected_full * 255).mean() < 4.0
    assert image[SIZE // 2, SIZE // 2] > image[10, 10] + 100
    # It reads the layer, the boxes and the labels ...
    assert "Graphic Layer #1 [AI]" in dump
    assert "type=polyline filled=no units=pixel" in dump
    assert "200\\300, 260\\300, 260\\360, 200\\360, 200\\300" in dump
    assert '"Nodule 0.91, 12 mm"' in dump and '"TB score 0.83 - refer"' in dump
    # ... but draws none of them into its output, and the state has no overlay.
    assert "Number of activated overlays: 0" in dump
    assert np.abs(image[300, 200:261] - expected_full[300, 200:261] * 255).max() < 12


def test_gsps_references_and_lut(tmp_path):
    for monochrome1, shape in ((False, "IDENTITY"), (True, "INVERSE")):
        source = make_source(tmp_path, monochrome1=monochrome1)
        gsps = pydicom.dcmread(io.BytesIO(to_bytes(build_gsps(source, make_findings(
            source, positive=False, nodules=0)))))
        series = gsps.ReferencedSeriesSequence[0]
        assert series.SeriesInstanceUID == source.SeriesInstanceUID
        assert series.ReferencedImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        area = gsps.DisplayedAreaSelectionSequence[0]
        assert list(area.DisplayedAreaBottomRightHandCorner) == [SIZE, SIZE]
        assert float(gsps.SoftcopyVOILUTSequence[0].WindowCenter) == float(source.WindowCenter)
        assert gsps.PresentationLUTShape == shape
        texts = [t.UnformattedTextValue
                 for t in gsps.GraphicAnnotationSequence[0].TextObjectSequence]
        assert texts[0] == "TB score 0.12" and "No nodules marked" in texts
        assert "GraphicObjectSequence" not in gsps.GraphicAnnotationSequence[0]


def test_sc_pixels_show_banner_and_boxes(tmp_path):
    source = make_source(tmp_path)
    findings = make_findings(source)
    sc = pydicom.dcmread(io.BytesIO(to_bytes(build_sc(source, findings, unit_image(source),
                                                       max_side=400))))
    assert sc.PhotometricInterpretation == "MONOCHROME2" and sc.BitsAllocated == 8
    assert sc.BurnedInAnnotation == "YES"
    assert sc.Columns == 400 and sc.Rows > 400            # the image, and the banner above
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    pixels = sc.pixel_array
    banner = sc.Rows - sc.Columns          # square source: the banner is the extra rows
    assert banner > 20
    scale = sc.Columns / SIZE
    assert (pixels[:banner] > 200).sum() > 100       # white text on the dark banner
    for box in BOXES:
        x1, y1, x2, y2 = (v * scale for v in box)
        middle = round((x1 + x2) / 2)
        assert pixels[banner + round(y1), middle] == 255, box       # the white edge
        inside = pixels[banner + round((y1 + y2) / 2), middle]
        assert 0 < inside < 255                                     # tissue shows through


def text_rows(band: np.ndarray) -> list[tuple[int, int]]:
    """(first, last) row of each run of rows holding white text in ``band``."""
    rows = np.flatnonzero((band > 200).sum(axis=1) > 0)
    runs, start = [], None
    for a, b in zip(rows, list(rows[1:]) + [None]):
        start = a if start is None else start
        if b is None or b != a + 1:
            runs.append((int(start), int(a)))
            start = None
    return runs


def test_sc_size_window_and_legible_text(tmp_path):
    """Readable at a workstation: >= 1024 px long side when the source is that large (up
    to the source's size), the full 8-bit window, text about 2 % of the width high."""
    source = make_source(tmp_path)          # 1024 x 1024
    findings = make_findings(source)
    handed = unit_image(source)             # 512 x 512: enlarged to the 1024 minimum
    sc = pydicom.dcmread(write(build_sc(source, findings, handed), tmp_path / "sc.dcm"))
    assert sc.Columns == 1024 and sc.Rows > 1024
    banner = sc.Rows - 1024
    assert (float(sc.WindowCenter), float(sc.WindowWidth)) == (128.0, 256.0)
    assert "1024x1024" in sc.DerivationDescription
    assert dciodvfy_errors(tmp_path / "sc.dcm") == []
    pixels = sc.pixel_array
    lines = text_rows(pixels[:banner])
    assert len(lines) == 3                                   # banner: three lines
    assert all(last - first + 1 >= 18 for first, last in lines), lines   # cap height px
    label_box = BOXES[0]                                     # its label sits above it
    label = pixels[banner + round(label_box[1]) - 40:banner + round(label_box[1]) - 2,
                   round(label_box[0]):round(label_box[0]) + 200]
    assert max(last - first + 1 for first, last in text_rows(label)) >= 14
    # The lungs keep the contrast the source's window gave them (no re-windowing).
    image = pixels[banner:].astype(float) / 255
    expected = np.kron(handed, np.ones((2, 2)))
    assert np.abs(image - expected)[600:, :].mean() < 0.02

    # From a larger source the handed image's size is kept, up to the source's size.
    assert sc_image_size((1250, 1024), (2500, 2048)) == (1250, 1024)
    assert sc_image_size((600, 500), (2500, 2048)) == (1024, 839)
    assert sc_image_size((600, 500), (900, 700)) == (900, 700)      # never above the source
    assert sc_image_size((3000, 2400), (3000, 2400)) == (2048, 1638)  # capped by max_side


def test_annotate_color_thumbnail(tmp_path):
    source = make_source(tmp_path)
    thumb = annotate_image(unit_image(source), make_findings(source), max_side=256, color=True)
    assert thumb.mode == "RGB" and max(thumb.size) <= 256
    pixels = np.asarray(thumb)
    assert ((pixels[..., 0] == 255) & (pixels[..., 1] == 200) & (pixels[..., 2] == 0)).any()


def test_rebuild_gives_identical_bytes_and_uids(tmp_path):
    source = make_source(tmp_path, monochrome1=True, name=VIETNAMESE)
    findings = make_findings(source)
    unit = unit_image(source)
    first = {k: to_bytes(v) for k, v in build_results(source, findings, unit).items()}
    again = {k: to_bytes(v) for k, v in build_results(source, findings, unit).items()}
    assert first == again
    versions = ["tb_classifier@0.1.0", "nodule_detector@0.1.0"]
    uids = set()
    for kind, data in first.items():
        ds = pydicom.dcmread(io.BytesIO(data))
        assert ds.SOPInstanceUID.startswith("2.25.") and ds.SOPInstanceUID.is_valid
        assert ds.SeriesInstanceUID == result_series_uid(source.StudyInstanceUID, kind, versions)
        uids |= {ds.SOPInstanceUID, ds.SeriesInstanceUID}
    assert len(uids) == 6
    newer = build_results(source, make_findings(source, version="0.2.0"), unit)
    for kind, ds in newer.items():
        old = pydicom.dcmread(io.BytesIO(first[kind]))
        assert ds.SOPInstanceUID != old.SOPInstanceUID
        assert ds.SeriesInstanceUID != old.SeriesInstanceUID


def test_patient_and_study_carried_exactly(tmp_path):
    source_path = write(make_source(tmp_path, monochrome1=True, name=VIETNAMESE),
                        tmp_path / "source.dcm")
    source = pydicom.dcmread(source_path)
    raw_source = pydicom.dcmread(source_path)
    results = build_results(source, make_findings(source), unit_image(source))
    keywords = ("SpecificCharacterSet", "PatientName", "PatientID", "PatientBirthDate",
                "PatientSex", "PatientAge", "StudyDate", "StudyTime", "AccessionNumber",
                "ReferringPhysicianName", "StudyID", "StudyInstanceUID")
    for kind, number in (("sr", 9001), ("gsps", 9002), ("sc", 9003)):
        back = pydicom.dcmread(io.BytesIO(to_bytes(results[kind])))
        for keyword in keywords:
            assert back.get_item(keyword).value == raw_source.get_item(keyword).value, \
                (kind, keyword)
        assert str(back.PatientName) == VIETNAMESE
        assert back.SeriesNumber == number and back.InstanceNumber == 3
        assert "NOT FOR CLINICAL USE" in back.SeriesDescription
        assert len(back.SeriesDescription) <= 64


def test_clinical_models_and_given_analysis_time(tmp_path):
    source = make_source(tmp_path)
    when = datetime.datetime(2024, 6, 2, 8, 30, 5)
    sr = pydicom.dcmread(io.BytesIO(to_bytes(
        build_sr(source, make_findings(source, clinical=True), analysis_time=when))))
    assert sr.ContentQualification == "PRODUCT"
    assert "NOT FOR CLINICAL USE" not in sr.SeriesDescription
    assert (sr.ContentDate, sr.ContentTime) == ("20240602", "083005")
    assert sr.InstanceCreationDate == "20240602"
    undated = make_source(tmp_path, dated=False)
    gsps = pydicom.dcmread(io.BytesIO(to_bytes(build_gsps(undated, make_findings(undated)))))
    assert gsps.PresentationCreationDate == "19700101"   # no clock read, still reproducible


def test_bad_inputs_are_refused_with_named_arguments(tmp_path):
    source = make_source(tmp_path)
    findings = make_findings(source)
    with pytest.raises(ValueError, match="sop_instance_uid"):
        build_sr(source, replace(findings, sop_instance_uid="1.2.3"))
    with pytest.raises(ValueError, match="eligible"):
        build_gsps(source, replace(findings, eligible=False, reason="lateral view"))
    with pytest.raises(ValueError, match="rows/columns"):
        build_sr(source, replace(findings, rows=512, columns=512))
    with pytest.raises(ValueError, match="outputs"):
        build_results(source, findings, None, outputs=("sr", "pdf"))
    with pytest.raises(ValueError, match="unit_image"):
        build_results(source, findings, None, outputs=("sc",))
    with pytest.raises(ValueError, match="Equipment.manufacturer"):
        Equipment(manufacturer="x" * 65)
    with pytest.raises(ValueError, match="object_type"):
        result_uid(source.SOPInstanceUID, "ab12", "pdf")
    with pytest.raises(TypeError, match="content_digest"):
        result_uid(source.SOPInstanceUID, ["m@1"], "sr")
    assert result_series_uid("1.2", "sr", ["a@1", "b@2"]) == \
        result_series_uid("1.2", "sr", ["b@2", "a@1"])
    uid = result_uid("1.2.3", "ab12", "sr")
    assert uid.startswith("2.25.") and UID(uid).is_valid and len(uid) <= 64


def test_single_component_name_and_missing_type2_attributes(tmp_path, caplog, recwarn):
    """Names without a caret are kept as sent and never appear in warnings or logs."""
    source = make_source(tmp_path, name="MOSTAFA")
    for keyword in ("PatientSex", "AccessionNumber", "StudyID", "ReferringPhysicianName"):
        del source[keyword]
    caplog.set_level("DEBUG")
    results = build_results(source, make_findings(source), unit_image(source))
    assert str(source.PatientName) == "MOSTAFA"            # the source is untouched
    for kind, ds in results.items():
        path = write(ds, tmp_path / f"{kind}.dcm")
        assert dciodvfy_errors(path) == [], kind
        back = pydicom.dcmread(path)
        assert str(back.PatientName) == "MOSTAFA"
        assert back.PatientSex == "" and back.AccessionNumber == ""
    messages = [str(w.message) for w in recwarn] + [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "MOSTAFA" in m]


# --- Findings beyond TB and nodules (Findings.others) --------------------------------

SCT_MASS = {"value": "4147007", "scheme": "SCT", "meaning": "Mass"}
OPACITY = {"value": "112001", "scheme": "DCM", "meaning": "Opacity"}
EFFUSION = {"value": "60046008", "scheme": "SCT", "meaning": "Pleural effusion"}
OTHER_BOXES = {"mass": ([700.0, 200.0, 860.0, 350.0], [100.0, 100.0, 160.0, 150.0]),
               "consolidation": [150.0, 600.0, 400.0, 800.0]}


def make_other_findings(source: Dataset, *, tb: bool = True, detector: bool = True,
                        mass_score: float = 0.82) -> Findings:
    """A YOLO-style detector (nodule, mass coded, consolidation uncoded and referring) and
    a multi-label classifier (Lung Opacity refers and is positive; Effusion positive;
    Enlarged Cardiomediastinum uncoded and negative), next to a negative TB screen: the
    refer flag is raised by the other findings only."""
    models = [ModelInfo("tb_classifier", "0.1.0", "onnxruntime"),
              ModelInfo("chest_detector", "1.2.0", "onnxruntime"),
              ModelInfo("chest_classifier", "2.0.0", "onnxruntime")]
    detections = [
        Other("mass", "Mass", "detection", mass_score, 0.25, True, False, SCT_MASS,
              "chest_detector", OTHER_BOXES["mass"][0], 31.0, 155.0),
        Other("consolidation", "Consolidation", "detection", 0.64, 0.25, True, True, None,
              "chest_detector", OTHER_BOXES["consolidation"], 45.0, 225.0),
        Other("mass", "Mass", "detection", 0.41, 0.25, True, False, SCT_MASS,
              "chest_detector", OTHER_BOXES["mass"][1], 11.0, 55.0),
    ]
    classifications = [
        Other("Lung Opacity", "Lung Opacity", "classification", 0.66, 0.5, True, True,
              OPACITY, "chest_classifier"),
        Other("Effusion", "Effusion", "classification", 0.71, 0.45, True, False, EFFUSION,
              "chest_classifier"),
        Other("Enlarged Cardiomediastinum", "Enlarged Cardiomediastinum", "classification",
              0.2, 0.45, False, False, None, "chest_classifier"),
    ]
    base = make_findings(source, positive=False, nodules=1 if detector else 0, tb=tb)
    return replace(base, models=[m for m in models if detector or m.name != "chest_detector"
                                 if tb or m.name != "tb_classifier"],
                   others=(detections if detector else []) + classifications)


@pytest.fixture
def others_case(tmp_path):
    source = make_source(tmp_path)
    findings = make_other_findings(source)
    assert findings.refer and not findings.tb.positive
    return source, findings


def test_others_every_object_passes_dciodvfy(others_case, tmp_path):
    source, findings = others_case
    for kind, ds in build_results(source, findings, unit_image(source)).items():
        assert dciodvfy_errors(write(ds, tmp_path / f"others_{kind}.dcm")) == [], kind


def test_others_sr_as_dsrdump_reads_it(others_case, tmp_path):
    source, findings = others_case
    path = write(build_sr(source, findings), tmp_path / "sr.dcm")
    require_tool("dsrdump")
    run = subprocess.run(["dsrdump", "+Pc", str(path)], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    text = run.stdout
    groups, evaluations = text.split('"Qualitative Evaluations"')
    # a planar ROI per detection, numbered per finding, the coded concept as its finding
    for name in ("Nodule 1", "Mass 1", "Mass 2", "Consolidation 1"):
        assert f'"Tracking Identifier")="{name}"' in groups, name
    assert groups.count('"Finding")=(4147007,SCT,"Mass")') == 2
    assert '"Finding")=(consolidation,99XRAYEDGE,"Consolidation")' in groups
    assert 'NUM:(111012,DCM,"Certainty of Finding")="82.0" (%,UCUM,"Percent")' in groups
    assert 'NUM:(103339001,SCT,"Long axis")="31.0" (mm,UCUM,"mm")' in groups
    assert 'TEXT:(111001,DCM,"Algorithm Name")="chest_detector"' in groups
    assert "(POLYLINE,700/200" in groups and "(POLYLINE,150/600" in groups
    # report level: each classification at its threshold, each detected concept present
    opacity = evaluations.split('CODE:(112001,DCM,"Opacity")=(52101004,SCT,"Present")')[1]
    opacity = opacity.split("<contains")[0]       # the items under it
    assert 'inferred from NUM:(122157,DCM,"Probability")="66.0" (%,UCUM,"Percent")' in opacity
    assert '"Threshold Value")="50.0" (%,UCUM,"Percent")' in opacity
    assert '"Algorithm Name")="chest_classifier"' in opacity
    assert 'CODE:(60046008,SCT,"Pleural effusion")=(52101004,SCT,"Present")' in evaluations
    assert ('CODE:(Enlarged Cardiomediastinum,99XRAYEDGE,"Enlarged Cardiomediastinum")='
            '(272519000,SCT,"Absent")') in evaluations
    # the referring detection is visible at report level too, once per concept
    assert evaluations.count('CODE:(consolidation,99XRAYEDGE,"Consolidation")='
                             '(52101004,SCT,"Present")') == 1
    assert evaluations.count('CODE:(4147007,SCT,"Mass")=(52101004,SCT,"Present")') == 1
    assert 'CODE:(56717001,SCT,"Tuberculosis")=(272519000,SCT,"Absent")' in evaluations
    assert 'TEXT:(111001,DCM,"Algorithm Name")="chest_classifier"' in evaluations
    # the private scheme is declared
    sr = pydicom.dcmread(path)
    declared = {item.CodingSchemeDesignator: item
                for item in sr.CodingSchemeIdentificationSequence}
    assert set(declared) == {"99IHE", "99XRAYEDGE"}
    assert declared["99XRAYEDGE"].CodingSchemeName


def test_others_sr_groups_in_ohif_and_shared_tracking_uids(others_case):
    source, findings = others_case
    sr = pydicom.dcmread(io.BytesIO(to_bytes(build_sr(source, findings))))
    labels = ohif_labels(sr)
    assert {name: lines for name, (_, lines) in labels.items()} == {
        "Nodule 1": ["Certainty of Finding: 91.00 %", "Long axis: 12.00 mm"],
        "Mass 1": ["Certainty of Finding: 82.00 %", "Long axis: 31.00 mm"],
        "Consolidation 1": ["Certainty of Finding: 64.00 %", "Long axis: 45.00 mm"],
        "Mass 2": ["Certainty of Finding: 41.00 %", "Long axis: 11.00 mm"],
    }
    gsps = build_gsps(source, findings)
    annotation = gsps.GraphicAnnotationSequence[0]
    boxes = {b.TrackingID: b.TrackingUID for b in annotation.GraphicObjectSequence}
    assert boxes == {name: uid for name, (uid, _) in labels.items()}
    label_uids = [t.TrackingUID for t in annotation.TextObjectSequence if "TrackingUID" in t]
    assert len(set(boxes.values()) | set(label_uids)) == 8
    # a changed finding gets a new tracking UID; the others keep theirs
    changed = make_other_findings(source, mass_score=0.83)
    again = {name: uid for name, (uid, _) in ohif_labels(pydicom.dcmread(io.BytesIO(
        to_bytes(build_sr(source, changed))))).items()}
    assert again["Mass 1"] != boxes["Mass 1"]
    assert {k: v for k, v in again.items() if k != "Mass 1"} == \
        {k: v for k, v in boxes.items() if k != "Mass 1"}


def test_others_gsps_boxes_and_labels(others_case, tmp_path):
    source, findings = others_case
    source_path = write(source, tmp_path / "source.dcm")
    gsps_path = write(build_gsps(source, findings), tmp_path / "gsps.dcm")
    _, dump = render(gsps_path, source_path, tmp_path)
    assert "700\\200, 860\\200, 860\\350, 700\\350, 700\\200" in dump
    for label in ("Mass 0.82, 31 mm", "Mass 0.41, 11 mm", "Consolidation 0.64, 45 mm",
                  "Nodule 0.91, 12 mm", "TB score 0.12", "1 nodule(s) marked",
                  "REFER: Consolidation, Lung Opacity",
                  "Also found: Mass (2 marked), Effusion 0.71"):
        assert f'"{label}"' in dump, label


def test_others_sc_pixels_show_boxes_and_banner(others_case, tmp_path):
    source, findings = others_case
    sc = pydicom.dcmread(write(build_sc(source, findings, unit_image(source)),
                               tmp_path / "sc.dcm"))
    pixels = sc.pixel_array
    banner = sc.Rows - sc.Columns
    scale = sc.Columns / SIZE
    assert len(text_rows(pixels[:banner])) == 5          # three lines, REFER, also found
    for box in (*OTHER_BOXES["mass"], OTHER_BOXES["consolidation"]):
        x1, y1, x2, y2 = (v * scale for v in box)
        middle = round((x1 + x2) / 2)
        assert pixels[banner + round(y1), middle] == 255, box       # the white edge
        assert 0 < pixels[banner + round((y1 + y2) / 2), middle] < 255
    # shipped models only: the banner keeps its three lines
    plain = make_findings(source)
    plain_sc = build_sc(source, plain, unit_image(source))
    assert plain_sc.Rows - plain_sc.Columns < banner


def test_others_banner_is_bounded_and_colours_refer(tmp_path):
    source = make_source(tmp_path)
    many = [Other(f"finding{n}", f"Finding number {n}", "classification", 0.9, 0.5, True,
                  n % 2 == 0, None, "chest_classifier") for n in range(12)]
    findings = replace(make_other_findings(source), others=many)
    lines = banner_lines(findings)
    assert len(lines) == 5
    assert lines[:3] == banner_lines(replace(findings, others=[]))   # unchanged
    assert lines[3].startswith("REFER: Finding number 0") and lines[3].endswith("more")
    assert lines[4].startswith("Also found: ") and len(lines[4]) <= 60
    thumb = np.asarray(annotate_image(unit_image(source), make_other_findings(source),
                                      max_side=512, color=True))
    assert ((thumb[..., 0] == 255) & (thumb[..., 1] == 90) & (thumb[..., 2] == 60)).any()


def test_others_rebuild_gives_identical_bytes(others_case):
    source, findings = others_case
    unit = unit_image(source)
    first = {k: to_bytes(v) for k, v in build_results(source, findings, unit).items()}
    again = {k: to_bytes(v) for k, v in build_results(
        source, Findings.from_dict(findings.to_dict()), unit).items()}
    assert first == again
    plain = build_results(source, replace(findings, others=[]), unit)
    for kind, ds in plain.items():
        assert ds.SOPInstanceUID != pydicom.dcmread(io.BytesIO(first[kind])).SOPInstanceUID


def test_others_classifier_only_keeps_a_group(tmp_path):
    """Without TB and detectors the report still has a group (OHIF needs one): the whole
    image, for the referring classification."""
    source = make_source(tmp_path)
    findings = make_other_findings(source, tb=False, detector=False)
    assert common.nodule_model(findings) is None
    path = write(build_sr(source, findings), tmp_path / "sr.dcm")
    assert dciodvfy_errors(path) == []
    sr = pydicom.dcmread(path)
    assert {name: lines for name, (_, lines) in ohif_labels(sr).items()} == \
        {"Lung Opacity": []}
    text = dsrdump(path)
    group = text.split('"Imaging Measurements"')[1].split('"Qualitative Evaluations"')[0]
    assert "(POLYLINE,0/0,...)" in group and 'CODE:(,,"Opacity")=(52101004,SCT,"Present")' \
        in group
    assert "Tuberculosis" not in text and '"Nodule")' not in text


def test_others_bad_inputs_are_refused_with_named_arguments(others_case):
    source, findings = others_case
    others = findings.others
    with pytest.raises(ValueError, match=r"others\[0\]\.score"):
        build_sr(source, replace(findings, others=[replace(others[0], score=1.5)]))
    with pytest.raises(ValueError, match=r"others\[1\] is a detection without a box"):
        build_gsps(source, replace(findings, others=[others[0], replace(others[1], box=None)]))
    with pytest.raises(ValueError, match=r"others\[0\]\.code"):
        build_sr(source, replace(findings, others=[replace(others[0], code={"value": "1"})]))
    with pytest.raises(ValueError, match=r"others\[0\]\.kind"):
        build_sr(source, replace(findings, others=[replace(others[0], kind="segmentation")]))


def test_sr_built_without_rereading_equals_highdicoms_construction(tmp_path, monkeypatch):
    """The SR's shortcut constructor (``sr.Comprehensive3DSR``) writes the same bytes as
    highdicom's own, for every kind of report, and its content reads back the same."""
    from edge.reporting import PredecessorDocument, sr as sr_module

    source = make_source(tmp_path)
    earlier = PredecessorDocument(study_instance_uid=str(source.StudyInstanceUID),
                                  series_instance_uid="1.2.826.0.1.3680043.8.498.90",
                                  sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34",
                                  sop_instance_uid="1.2.826.0.1.3680043.8.498.91")
    variants = [(make_findings(source), ()), (make_findings(source, positive=False, nodules=0), ()),
                (make_findings(source, tb=False, spacing=False), ()),
                (make_other_findings(source), ()), (make_other_findings(source, detector=False), ()),
                (make_findings(source), (earlier,))]
    for findings, predecessors in variants:
        fast = build_sr(source, findings, source_digest="d", predecessors=predecessors)
        assert type(fast) is sr_module.Comprehensive3DSR
        with monkeypatch.context() as patch:
            patch.setattr(sr_module, "Comprehensive3DSR", hd.sr.Comprehensive3DSR)
            reference = build_sr(source, findings, source_digest="d", predecessors=predecessors)
        assert type(reference) is hd.sr.Comprehensive3DSR
        assert to_bytes(fast) == to_bytes(reference)
        assert fast.content[0].ContentSequence == reference.content[0].ContentSequence
        assert len(fast.content) == len(reference.content) == 1
