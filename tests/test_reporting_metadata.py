"""Damaged source metadata, per-box identity and content-derived UIDs of the results.

The fuzz cases corrupt one or several attributes of a valid source the way modalities do
(raw bytes, as a received file would hold them); every case must still give all three
objects, which must write, read back and pass ``dciodvfy``, and no bad value may reach
the logs. The identity and UID tests check what a receiver reads from the objects.
"""
from __future__ import annotations

import copy
import dataclasses
import io
import logging
import random
import re
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from conftest import make_dx, require_tool
from edge.config import IdentityConfig
from edge.findings import Findings, ModelInfo, Nodule, TBResult
from edge.reporting import (REPORT_FORMAT_VERSION, Equipment, PredecessorDocument,
                            build_gsps, build_results, build_sr,
                            equipment_from_identity, read_source)


SIZE = 256
SOP_UID = "1.2.826.0.1.3680043.8.498.7701"
STUDY_UID = "1.2.826.0.1.3680043.8.498.7702"
VIETNAMESE = "Nguyễn^Văn An"
UNIT = np.linspace(0.0, 1.0, (SIZE // 2) ** 2, dtype=np.float32).reshape(SIZE // 2, SIZE // 2)


def encode(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def make_source() -> Dataset:
    """A valid DX image with every attribute the builders copy, read back from bytes."""
    ds = make_dx(rows=SIZE, cols=SIZE, sop_uid=SOP_UID, study_uid=STUDY_UID,
                 patient_name=VIETNAMESE, charset="ISO_IR 192")
    ds.ReferringPhysicianName = "Trần^Bình"
    ds.IssuerOfPatientID = "HOSPITAL-A"
    other = Dataset()
    other.PatientID, other.TypeOfPatientID = "OLD-7", "TEXT"
    ds.OtherPatientIDsSequence = [other]
    issuer = Dataset()
    issuer.LocalNamespaceEntityID = "RIS"
    ds.IssuerOfAccessionNumberSequence = [issuer]
    ds.PatientSize, ds.PatientWeight = "1.62", "55"
    ds.StudyDescription = "Chest PA"
    ds.PatientOrientation = ["P", "F"]
    ds.AcquisitionDateTime = "20261125101012.5"
    ds.AcquisitionDate, ds.AcquisitionTime = "20261125", "101012"
    ds.SeriesDate, ds.SeriesTime = "20261125", "101000"
    ds.InstitutionName = "Bệnh viện Phổi"
    ds.InstitutionalDepartmentName = "Radiology"
    ds.StationName = "XR-ROOM-2"
    ds.ManufacturerModelName = "DR-1000"
    ds.SoftwareVersions = ["1.0", "2.3"]
    ds.DeviceSerialNumber = "MOD-1"
    ds.PixelSpacing = [0.15, 0.15]
    ds.WindowCenterWidthExplanation = "NORMAL"
    ds.VOILUTFunction = "LINEAR"
    lut = Dataset()
    lut.add_new("LUTDescriptor", "US", [4096, 0, 12])
    lut.add_new("LUTData", "OW", np.arange(4096, dtype="<u2").tobytes())
    ds.VOILUTSequence = [lut]
    return pydicom.dcmread(io.BytesIO(encode(ds)))


@pytest.fixture(scope="module")
def source_bytes() -> bytes:
    return encode(make_source())


def read(data: bytes) -> Dataset:
    return pydicom.dcmread(io.BytesIO(data))


def findings_for(source: Dataset, *, score: float = 0.83, threshold: float = 0.5,
                 box: tuple = (40.0, 60.0, 90.0, 110.0), timings: dict | None = None,
                 ) -> Findings:
    return Findings(
        sop_instance_uid=str(source.SOPInstanceUID), eligible=True,
        tb=TBResult(score=score, threshold=threshold, positive=score >= threshold),
        nodules=[Nodule(box=list(box), score=0.91, diameter_mm=7.5, diameter_px=50.0),
                 Nodule(box=[150.0, 150.0, 200.0, 210.0], score=0.6, diameter_mm=9.0,
                        diameter_px=60.0)],
        models=[ModelInfo("tb_classifier", "0.1.0", "onnxruntime"),
                ModelInfo("nodule_detector", "0.1.0", "onnxruntime")],
        rows=SIZE, columns=SIZE, timings_ms=timings or {"tb": 3.0})


def set_raw(ds: Dataset, keyword: str, value: bytes | None) -> None:
    """Put ``value`` into ``ds`` as raw bytes, as if received that way (None: remove)."""
    tag = Tag(tag_for_keyword(keyword))
    if value is None:
        if tag in ds:
            del ds[tag]
        return
    if len(value) % 2:
        value += b"\0" if dictionary_VR(tag) == "UI" else b" "
    vr = dictionary_VR(tag).split(" or ")[0]
    ds[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)


def dciodvfy_errors(data: bytes, path: Path) -> list[str]:
    return dciodvfy_all({path: data})[path]


def dciodvfy_all(files: dict[Path, bytes]) -> dict[Path, list[str]]:
    """dciodvfy's error lines per file (run side by side: it is single-threaded)."""
    require_tool("dciodvfy")
    runs = {}
    for path, data in files.items():
        path.write_bytes(data)
        runs[path] = subprocess.Popen(["dciodvfy", str(path)], stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, errors="replace")
    errors = {}
    for path, run in runs.items():
        output, _ = run.communicate(timeout=60)
        errors[path] = [line for line in output.splitlines() if "Error" in line]
    return errors


TEXT_KEYWORDS = ("PatientName", "PatientID", "IssuerOfPatientID", "ReferringPhysicianName",
                 "StudyDescription", "InstitutionName", "AccessionNumber", "StudyID")
# One bad value per entry: (keyword, raw bytes or None to remove it). Grouped by VR.
LONG = "SECRETVALUE" * 7
BAD_VALUES: list[tuple[str, bytes | None]] = [
    # DA
    ("PatientBirthDate", b"20241341"), ("PatientBirthDate", b"2024"),
    ("PatientBirthDate", b"abcd"), ("PatientBirthDate", b"20240230"),
    ("PatientBirthDate", b"19800101\\19800102"), ("PatientBirthDate", b"1980\x0701"),
    ("StudyDate", b"20241341"), ("StudyDate", b"0000000"), ("AcquisitionDate", b"99999999"),
    ("SeriesDate", "2024ễ01".encode()), ("ContentDate", b"2026112"),
    # TM
    ("StudyTime", b"256000"), ("StudyTime", b"abc"), ("StudyTime", b"10\\11"),
    ("AcquisitionTime", b"106161"), ("SeriesTime", b"1015.5"),
    # DT
    ("AcquisitionDateTime", b"2024134101"), ("AcquisitionDateTime", b"20240501101600+9999"),
    ("AcquisitionDateTime", b"garbage!"),
    # PN
    ("PatientName", LONG.encode()), ("PatientName", b"SECRET\x07NAME"),
    ("PatientName", b"SECRET\\NAME"), ("PatientName", b"A=B=C=SECRETGROUP"),
    ("PatientName", b"A^B^C^D^E^SECRETCOMPONENT"), ("PatientName", b"\xff\xfeSECRETBYTES"),
    ("ReferringPhysicianName", LONG.encode()),
    # LO / SH / ST
    ("PatientID", b"SECRETID1\\SECRETID2"), ("PatientID", LONG.encode()),
    ("PatientID", b"SECRET\x01ID"), ("PatientID", b"SECRET\xc3ID"),
    ("IssuerOfPatientID", LONG.encode()), ("StudyDescription", b"SECRET\x1b\x00DESC"),
    ("StudyDescription", LONG.encode()), ("AccessionNumber", b"SECRETACCESSION17"),
    ("StudyID", b"SECRET\\STUDY"), ("InstitutionName", LONG.encode()),
    ("Manufacturer", b"SECRET\x02MAKER"), ("SoftwareVersions", b"1.0\\" + LONG.encode()),
    ("StationName", b"SECRETSTATIONNAME20"), ("InstitutionAddress", b"SECRET\x00ADDRESS"),
    # CS
    ("PatientSex", b"X"), ("PatientSex", b"SECRETSEX"), ("PatientSex", b"M\\F"),
    ("BodyPartExamined", b"CHEST!"), ("BodyPartExamined", b"SECRETBODYPART123"),
    ("Laterality", b"B"), ("BodyPartExamined", b"knee"),
    ("PatientOrientation", b"X\\Y"), ("PatientOrientation", b"L"),
    ("PatientOrientation", b"L\\F\\H"), ("VOILUTFunction", b"CURVY"),
    ("PhotometricInterpretation", b"MONOCHROME3"), ("Modality", b"SECRET MODALITY17"),
    # AS
    ("PatientAge", b"44"), ("PatientAge", b"044Years"), ("PatientAge", b"044Y\\045Y"),
    # DS
    ("PatientSize", b"abc"), ("PatientSize", b"-1.7"), ("PatientSize", b"1e999"),
    ("PatientSize", b"1.7\\1.8"), ("PatientWeight", b"NaN"),
    ("WindowWidth", b"0"), ("WindowWidth", b"-5"), ("WindowWidth", b"abc"),
    ("WindowWidth", b""), ("WindowCenter", b"abc"), ("WindowCenter", b"100\\200"),
    ("WindowCenterWidthExplanation", b"SECRET\x05EXPL"), ("PixelSpacing", b"0.2"),
    ("PixelSpacing", b"0\\0"), ("ImagerPixelSpacing", b"abc\\def"),
    ("RescaleSlope", b"0"), ("RescaleIntercept", b"abc"),
    # IS
    ("InstanceNumber", b"abc"), ("InstanceNumber", b"1.5"),
    ("InstanceNumber", b"99999999999999"), ("InstanceNumber", b"1\\2"),
    # Specific Character Set
    ("SpecificCharacterSet", b"ISO_IR 999"), ("SpecificCharacterSet", b"ISO 2022 IR 6\\bogus"),
    ("SpecificCharacterSet", b"ISO_IR 192\\ISO 2022 IR 87"), ("SpecificCharacterSet", b"\x01"),
    ("SpecificCharacterSet", b"ISO_IR 100"), ("SpecificCharacterSet", None),
    # missing type 1 attributes of the modules we copy from
    ("Modality", None), ("PhotometricInterpretation", None), ("SamplesPerPixel", None),
    ("PatientOrientation", None), ("WindowWidth", None), ("RescaleIntercept", None),
    ("Manufacturer", None), ("PatientName", None), ("StudyDate", None),
    ("InstanceNumber", None),
]
# Sequences broken inside their items: how -> the sequence.
ITEM_DAMAGE = {"other_ids_without_type": "OtherPatientIDsSequence",
               "other_ids_bad_id": "OtherPatientIDsSequence",
               "two_issuers": "IssuerOfAccessionNumberSequence",
               "empty_issuer": "IssuerOfAccessionNumberSequence",
               "lut_short": "VOILUTSequence", "lut_without_descriptor": "VOILUTSequence"}


def break_item(ds: Dataset, how: str) -> None:
    if how == "other_ids_without_type":
        del ds.OtherPatientIDsSequence[0].TypeOfPatientID
    elif how == "other_ids_bad_id":
        set_raw(ds.OtherPatientIDsSequence[0], "PatientID", b"SECRET\\OTHERID")
    elif how == "two_issuers":
        ds.IssuerOfAccessionNumberSequence.append(copy.deepcopy(
            ds.IssuerOfAccessionNumberSequence[0]))
    elif how == "empty_issuer":
        ds.IssuerOfAccessionNumberSequence = [Dataset()]
    elif how == "lut_short":
        ds.VOILUTSequence[0].LUTData = b"\0\0" * 10
    elif how == "lut_without_descriptor":
        del ds.VOILUTSequence[0].LUTDescriptor


def combinations() -> list[list[tuple[str, bytes | None]]]:
    """Several corruptions at once: a few chosen ones, then seeded random draws."""
    chosen = [
        [("SpecificCharacterSet", b"ISO_IR 999"), ("PatientBirthDate", b"20241341"),
         ("WindowWidth", b"0"), ("PatientAge", b"44")],
        [("StudyDate", b"2024"), ("StudyTime", b"abc"), ("AcquisitionDateTime", b"x"),
         ("AcquisitionDate", b"x"), ("SeriesDate", b"x"), ("ContentDate", b"x")],
        [("PatientName", b"\xff\xfe"), ("PatientID", b"A\\B"), ("Modality", None),
         ("PhotometricInterpretation", None), ("VOILUTSequence", None)],
    ]
    rng = random.Random(1500)
    singles = [entry for entry in BAD_VALUES if entry[0] != "SpecificCharacterSet"]
    for _ in range(6):
        draw = rng.sample(singles, 5)
        chosen.append(list({k: v for k, v in draw}.items()))
    return chosen


CASES = ([(f"{k}={v!r}", [(k, v)], None) for k, v in BAD_VALUES]
         + [(how, [], how) for how in ITEM_DAMAGE]
         + [(f"combination-{i}", combo, None) for i, combo in enumerate(combinations())])


def corrupted(source_bytes: bytes, changes, item_damage) -> Dataset:
    ds = read(source_bytes)
    for keyword, value in changes:
        set_raw(ds, keyword, value)
    if item_damage:
        break_item(ds, item_damage)
    return ds


def bad_texts(changes) -> list[str]:
    """The bad values as text, where they are distinctive enough to look for in logs."""
    texts = []
    for _, value in changes:
        if value is None:
            continue
        text = value.decode("utf-8", "replace")
        for part in re.split(r"[\x00-\x1f\\=^]", text):
            if len(part) >= 4 and not part.replace(".", "").isdigit():
                texts.append(part)
    return texts


@pytest.mark.parametrize("name,changes,item_damage", CASES, ids=[c[0] for c in CASES])
def test_damaged_metadata_still_gives_valid_results(name, changes, item_damage, source_bytes,
                                                    tmp_path, caplog, recwarn):
    source = corrupted(source_bytes, changes, item_damage)
    caplog.set_level(logging.INFO)                   # highdicom's DEBUG lines: keywords
    caplog.set_level(logging.DEBUG, logger="edge")
    results = build_results(source, findings_for(source), UNIT)
    assert set(results) == {"sr", "gsps", "sc"}
    messages = [r.getMessage() for r in caplog.records] + [str(w.message) for w in recwarn]
    assert not [m for m in messages if "minimal stand-in" in m], messages
    files = {}
    for kind, ds in results.items():
        data = files[tmp_path / f"{kind}.dcm"] = encode(ds)
        back = read(data)
        for keyword in TEXT_KEYWORDS:       # decodes with the declared character set
            assert "\ufffd" not in str(back.get(keyword, "")), (name, kind, keyword)
        assert back.SOPInstanceUID == ds.SOPInstanceUID
        assert back.StudyInstanceUID == STUDY_UID
    for path, errors in dciodvfy_all(files).items():
        assert errors == [], (name, path.name)
    # Keywords only in the logs: none of the bad values (nor the patient's name).
    logged = "\n".join(re.sub(r"\d+(\.\d+)+", "<uid>", m) for m in messages)
    for text in bad_texts(changes) + ["Nguy", "SECRET"]:
        assert text not in logged, (name, text)
    # ... but the keywords of what was dropped or repaired.
    reported = " ".join(m for m in messages if "metadata left out" in m)
    damaged = [k for k, v in changes   # a value, not just an empty or missing element
               if v and v.strip(b" \0") and k != "SpecificCharacterSet"]
    damaged += [ITEM_DAMAGE[item_damage]] if item_damage else []
    if damaged:
        assert any(k in reported for k in damaged), (name, messages)


def test_a_valid_source_logs_nothing_and_is_carried_exactly(source_bytes, caplog):
    caplog.set_level(logging.WARNING)
    source = read(source_bytes)
    results = build_results(source, findings_for(source), UNIT)
    assert not caplog.records, [r.getMessage() for r in caplog.records]
    raw = read(source_bytes)
    for ds in results.values():
        back = read(encode(ds))
        for keyword in ("SpecificCharacterSet", "PatientName", "PatientID", "PatientBirthDate",
                        "OtherPatientIDsSequence", "IssuerOfAccessionNumberSequence",
                        "ReferringPhysicianName", "StudyDescription", "PatientSize"):
            assert back[keyword].value == raw[keyword].value, keyword
    gsps = read(encode(results["gsps"]))
    voi = gsps.SoftcopyVOILUTSequence[0]
    assert float(voi.WindowWidth) == 2000 and voi.WindowCenterWidthExplanation == "NORMAL"


def test_unusable_windows_fall_back_to_the_lut_or_nothing(source_bytes):
    source = read(source_bytes)
    set_raw(source, "WindowWidth", b"0")
    gsps = build_gsps(source, findings_for(source))
    voi = gsps.SoftcopyVOILUTSequence[0]
    assert "WindowWidth" not in voi and "VOILUTSequence" in voi
    set_raw(source, "VOILUTSequence", None)
    assert "SoftcopyVOILUTSequence" not in build_gsps(source, findings_for(source))


def test_repairs_keep_the_meaning(source_bytes, caplog):
    source = read(source_bytes)
    set_raw(source, "PatientBirthDate", b"1980-01-31")
    set_raw(source, "StudyTime", b"10:15:00")
    set_raw(source, "PatientSex", b"f")
    set_raw(source, "SpecificCharacterSet", b"ISO-IR 192")
    set_raw(source, "PatientWeight", b"55.123456789012345678")
    caplog.set_level(logging.WARNING)
    sr = read(encode(build_sr(source, findings_for(source))))
    assert (sr.PatientBirthDate, sr.StudyTime, sr.PatientSex) == ("19800131", "101500", "F")
    assert sr.SpecificCharacterSet == "ISO_IR 192" and str(sr.PatientName) == VIETNAMESE
    assert len(sr["PatientWeight"].value.original_string) <= 16
    log = caplog.text
    for keyword in ("PatientBirthDate", "StudyTime", "PatientSex", "SpecificCharacterSet",
                    "PatientWeight"):
        assert keyword in log.split("repaired:")[1]


@pytest.mark.parametrize("charset", [b"ISO_IR 999", b"ISO 2022 IR 6\\bogus", b"\x01"])
def test_unknown_charset_with_utf8_text_is_read_as_utf8(source_bytes, charset, tmp_path):
    source = read(source_bytes)
    set_raw(source, "SpecificCharacterSet", charset)
    for kind, ds in build_results(source, findings_for(source), UNIT).items():
        data = encode(ds)
        back = read(data)
        assert back.SpecificCharacterSet == "ISO_IR 192"
        assert str(back.PatientName) == VIETNAMESE
        assert str(back.ReferringPhysicianName) == "Trần^Bình"
        assert dciodvfy_errors(data, tmp_path / f"{kind}.dcm") == []


def test_undecodable_text_is_dropped_and_the_charset_describes_the_rest(source_bytes):
    source = read(source_bytes)
    set_raw(source, "SpecificCharacterSet", b"ISO_IR 999")
    set_raw(source, "PatientName", b"Jos\xe9^Garc\xeda")     # Latin-1, not UTF-8
    set_raw(source, "ReferringPhysicianName", b"Smith^Ann")
    set_raw(source, "InstitutionName", b"Clinic")
    set_raw(source, "IssuerOfPatientID", None)
    sr = read(encode(build_sr(source, findings_for(source), equipment=Equipment())))
    assert sr.PatientName == "" and sr.PatientID == "PID00000"
    assert str(sr.ReferringPhysicianName) == "Smith^Ann"
    assert "SpecificCharacterSet" not in sr     # everything left is ASCII
    source = read(source_bytes)
    set_raw(source, "PatientName", b"Nguy\xe1n")           # invalid UTF-8 under ISO_IR 192
    sr = read(encode(build_sr(source, findings_for(source))))
    assert sr.PatientName == "" and str(sr.ReferringPhysicianName) == "Trần^Bình"
    assert sr.SpecificCharacterSet == "ISO_IR 192"


def test_latin1_source_switches_to_utf8_only_when_it_must(tmp_path):
    ds = make_dx(rows=SIZE, cols=SIZE, sop_uid=SOP_UID, patient_name="José^García",
                 charset="ISO_IR 100")
    source_data = encode(ds)
    source = read(source_data)
    sr = build_sr(source, findings_for(source))
    back = read(encode(sr))
    assert back.SpecificCharacterSet == "ISO_IR 100"
    assert back["PatientName"].value == read(source_data)["PatientName"].value
    vietnamese_site = Equipment(institution_name="Bệnh viện Phổi")
    data = encode(build_sr(source, findings_for(source), equipment=vietnamese_site))
    back = read(data)
    assert back.SpecificCharacterSet == "ISO_IR 192"
    assert str(back.PatientName) == "José^García"
    assert back.InstitutionName == "Bệnh viện Phổi"
    assert dciodvfy_errors(data, tmp_path / "sr.dcm") == []


def test_iso2022_source_is_carried_byte_for_byte(tmp_path):
    ds = make_dx(rows=SIZE, cols=SIZE, sop_uid=SOP_UID, charset="\\ISO 2022 IR 87")
    ds.PatientName = "Yamada^Tarou=山田^太郎=やまだ^たろう"
    source_data = encode(ds)
    source = read(source_data)
    data = encode(build_sr(source, findings_for(source)))
    back = read(data)
    assert back.SpecificCharacterSet == ["ISO 2022 IR 6", "ISO 2022 IR 87"]   # same meaning
    assert back.get_item("PatientName").value == read(source_data).get_item("PatientName").value
    assert dciodvfy_errors(data, tmp_path / "sr.dcm") == []


def test_missing_references_or_geometry_still_refuse(source_bytes):
    for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Rows"):
        source = read(source_bytes)
        set_raw(source, keyword, None)
        with pytest.raises(ValueError, match=keyword):
            read_source(source)


def test_last_resort_minimal_stand_in(source_bytes, monkeypatch, caplog, tmp_path):
    import edge.reporting.gsps as gsps_module

    def broken(checked):
        raise RuntimeError("simulated failure on " + str(checked.PatientName))

    monkeypatch.setattr(gsps_module, "_voi_from_window", broken)
    source = read(source_bytes)
    findings = findings_for(source)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(RuntimeError):       # the stand-in path fails as well here
        build_gsps(source, findings)
    assert "minimal stand-in" in caplog.text and "Nguy" not in caplog.text
    calls = []

    def fails_once(checked):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("simulated")
        return None

    monkeypatch.setattr(gsps_module, "_voi_from_window", fails_once)
    gsps = build_gsps(source, findings)
    data = encode(gsps)
    back = read(data)
    assert str(back.PatientName) == VIETNAMESE and back.PatientID == "PID00000"
    assert "StudyDescription" not in back and back.AccessionNumber == ""
    assert dciodvfy_errors(data, tmp_path / "gsps.dcm") == []
    monkeypatch.undo()
    assert build_gsps(source, findings).SOPInstanceUID != gsps.SOPInstanceUID


# ---------------------------------------------------------------- per-box identity

def test_equipment_from_identity_configured_and_derived(tmp_path):
    configured = equipment_from_identity(IdentityConfig(
        serial_number="SN-0042", station_name="XRAY-ROOM-3", institution_name="Bệnh viện"))
    assert (configured.device_serial_number, configured.station_name,
            configured.institution_name) == ("SN-0042", "XRAY-ROOM-3", "Bệnh viện")
    machine_id = tmp_path / "machine-id"
    machine_id.write_text("0123456789abcdef0123456789abcdef\n")
    derived = equipment_from_identity(None, machine_id_path=machine_id,
                                      hostname="radiology-room-number-7.hospital.local")
    assert re.fullmatch(r"M-[0-9A-F]{12}", derived.device_serial_number)
    assert "0123456789" not in derived.device_serial_number.lower()
    assert derived.station_name == "radiology-room-n"          # first label, 16 characters
    assert derived.institution_name is None
    again = equipment_from_identity(IdentityConfig(), machine_id_path=machine_id,
                                    hostname="radiology-room-number-7.hospital.local")
    assert again == derived                                     # stable per box
    machine_id.write_text("fedcba9876543210fedcba9876543210\n")
    other = equipment_from_identity(None, machine_id_path=machine_id, hostname="x")
    assert other.device_serial_number != derived.device_serial_number
    no_id = equipment_from_identity(None, machine_id_path=tmp_path / "absent",
                                    hostname="edge-7")
    assert re.fullmatch(r"H-[0-9A-F]{12}", no_id.device_serial_number)
    assert no_id.station_name == "edge-7"
    with pytest.raises(ValueError, match="station_name"):
        Equipment(station_name="A" * 17)


def test_identity_in_every_object(source_bytes, tmp_path):
    source = read(source_bytes)
    equipment = equipment_from_identity(IdentityConfig(
        serial_number="SN-0042", station_name="XRAY-ROOM-3",
        institution_name="Bệnh viện Phổi Trung ương"))
    results = build_results(source, findings_for(source), UNIT, equipment=equipment)
    for kind, ds in results.items():
        data = encode(ds)
        back = read(data)
        assert (back.DeviceSerialNumber, back.StationName, back.InstitutionName) == \
            ("SN-0042", "XRAY-ROOM-3", "Bệnh viện Phổi Trung ương"), kind
        air = [item for item in back.ContributingEquipmentSequence
               if item.PurposeOfReferenceCodeSequence[0].CodeValue == "Newcode1"]
        assert len(air) == 1
        assert (air[0].DeviceSerialNumber, air[0].StationName) == ("SN-0042", "XRAY-ROOM-3")
        assert dciodvfy_errors(data, tmp_path / f"{kind}.dcm") == [], kind
    path = tmp_path / "sr.dcm"
    path.write_bytes(encode(results["sr"]))
    dump = subprocess.run([require_tool("dsrdump"), str(path)], capture_output=True, text=True,
                          timeout=60).stdout
    assert 'TEXT:(,,"Device Observer Name")="XRAY-ROOM-3"' in dump
    assert 'TEXT:(,,"Device Observer Serial Number")="SN-0042"' in dump


def device_observer_uid(sr: Dataset) -> str:
    def walk(items):
        for item in items:
            if item.ConceptNameCodeSequence[0].CodeValue == "121012":   # Device Observer UID
                return item.UID
            found = walk(item.get("ContentSequence", []))
            if found:
                return found
        return None
    return walk(sr.ContentSequence)


def test_two_boxes_have_different_device_observers(source_bytes):
    source = read(source_bytes)
    findings = findings_for(source)
    first = build_sr(source, findings, equipment=Equipment(device_serial_number="M-AAAA"))
    second = build_sr(source, findings, equipment=Equipment(device_serial_number="M-BBBB"))
    assert device_observer_uid(first) and device_observer_uid(second)
    assert device_observer_uid(first) != device_observer_uid(second)


# ---------------------------------------------------------------- one UID, one content

def uids(source: Dataset, findings: Findings, **kwargs) -> dict[str, str]:
    results = build_results(source, findings, UNIT, analysis_time=None, **kwargs)
    return {kind: str(ds.SOPInstanceUID) for kind, ds in results.items()}


def test_same_inputs_same_bytes_any_change_new_uids(source_bytes):
    source = read(source_bytes)
    findings = findings_for(source)
    first = {k: encode(v) for k, v in build_results(
        source, findings, UNIT, source_digest="sha256:aa").items()}
    again = {k: encode(v) for k, v in build_results(
        read(source_bytes), findings_for(source, timings={"tb": 99.0}), UNIT,
        source_digest="sha256:aa").items()}
    assert first == again                      # timings are not content
    base = {k: str(read(v).SOPInstanceUID) for k, v in first.items()}
    changed = {
        "source_digest": uids(source, findings, source_digest="sha256:bb"),
        "threshold": uids(source, findings_for(source, threshold=0.6), source_digest="sha256:aa"),
        "score": uids(source, findings_for(source, score=0.84), source_digest="sha256:aa"),
        "box": uids(source, findings_for(source, box=(41.0, 60.0, 90.0, 110.0)),
                    source_digest="sha256:aa"),
        "serial": uids(source, findings, source_digest="sha256:aa",
                       equipment=Equipment(device_serial_number="M-OTHER")),
    }
    for what, new in changed.items():
        for kind in ("sr", "gsps", "sc"):
            assert new[kind] != base[kind], (what, kind)
    assert len({uid for new in changed.values() for uid in new.values()}) == 15
    assert REPORT_FORMAT_VERSION >= 2


def test_default_digest_follows_the_pixels(source_bytes):
    source = read(source_bytes)
    other = read(source_bytes)
    pixels = bytearray(other.PixelData)
    pixels[100] ^= 0xFF
    other.PixelData = bytes(pixels)
    assert uids(source, findings_for(source)) == uids(read(source_bytes), findings_for(source))
    assert uids(other, findings_for(other))["sr"] != uids(source, findings_for(source))["sr"]


def test_tracking_uids_follow_their_finding(source_bytes):
    source = read(source_bytes)

    def tracking(findings: Findings) -> list[str]:
        boxes = build_gsps(source, findings, source_digest="d") \
            .GraphicAnnotationSequence[0].GraphicObjectSequence
        rois = hd.sr.srread(io.BytesIO(encode(build_sr(source, findings, source_digest="d")))) \
            .content.get_planar_roi_measurement_groups()
        assert [b.TrackingUID for b in boxes] == [str(g.tracking_uid) for g in rois]
        return [b.TrackingUID for b in boxes]

    base = tracking(findings_for(source))
    moved = tracking(findings_for(source, box=(42.0, 60.0, 90.0, 110.0)))
    assert moved[0] != base[0]
    assert moved[1] == base[1]          # that finding did not change
    assert tracking(findings_for(source, timings={"tb": 1.0})) == base


def test_predecessors_in_the_sr(source_bytes, tmp_path):
    source = read(source_bytes)
    findings = findings_for(source)
    old = build_sr(source, findings_for(source, threshold=0.7))
    predecessor = PredecessorDocument(
        study_instance_uid=str(old.StudyInstanceUID),
        series_instance_uid=str(old.SeriesInstanceUID),
        sop_class_uid=str(old.SOPClassUID), sop_instance_uid=str(old.SOPInstanceUID))
    results = build_results(source, findings, UNIT, predecessors=[predecessor])
    plain = build_results(source, findings, UNIT)
    assert results["sr"].SOPInstanceUID != plain["sr"].SOPInstanceUID
    assert results["gsps"].SOPInstanceUID == plain["gsps"].SOPInstanceUID
    data = encode(results["sr"])
    back = read(data)
    item = back.PredecessorDocumentsSequence[0]
    assert item.StudyInstanceUID == old.StudyInstanceUID
    series = item.ReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == old.SeriesInstanceUID
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == old.SOPInstanceUID
    assert dciodvfy_errors(data, tmp_path / "sr.dcm") == []
    path = tmp_path / "sr.dcm"
    dump = subprocess.run([require_tool("dsrdump"), str(path)], capture_output=True, text=True,
                          timeout=60).stdout
    assert re.search(r"Predecessor Docs\s*:\s*1", dump)
    with pytest.raises(ValueError, match="sop_instance_uid"):
        PredecessorDocument("1.2", "1.3", "1.2.840.10008.5.1.4.1.1.88.34", "not a uid")
    with pytest.raises(TypeError, match="predecessors"):
        build_sr(source, findings, predecessors=[dataclasses.asdict(predecessor)])
