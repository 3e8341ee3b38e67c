"""Which source attributes the builders read, and the rules each must meet beyond its VR.

``AttributeChecker`` turns what ``elements.read_element`` read into checked elements:
VR and value multiplicity (``vr.py``), enumerated values and ranges of single
attributes, the items of the sequences we copy, and the rules of attributes that go
together (Window Center with Window Width, Rescale Slope with Intercept). What fails is
emptied when it is type 2 in the results, else left out; both are recorded by keyword.
"""
from __future__ import annotations

import re

from pydicom import Dataset
from pydicom.dataelem import DataElement
from pydicom.datadict import dictionary_VM, tag_for_keyword
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence

from . import vr as vrs
from .elements import ElementRead

__all__ = ["CHECKED_KEYWORDS", "PATIENT_STUDY_KEYWORDS", "REFERENCE_KEYWORDS",
           "SEQUENCE_ITEMS", "TYPE2_KEYWORDS", "UNPAIRED_BODY_PARTS", "AttributeChecker"]

# Identify the source image; without them there is nothing to reference.
REFERENCE_KEYWORDS: tuple[str, ...] = (
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
# Patient and study attributes carried into every result.
PATIENT_STUDY_KEYWORDS: tuple[str, ...] = (
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
    "OtherPatientIDsSequence", "PatientAge", "PatientSize", "PatientWeight",
    "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber",
    "IssuerOfAccessionNumberSequence", "ReferringPhysicianName", "StudyID",
    "StudyDescription",
)
# Type 2 in the results' Patient and General Study modules: emptied, not left out.
TYPE2_KEYWORDS: frozenset[str] = frozenset({
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
    "AccessionNumber", "ReferringPhysicianName", "StudyID"})
# Everything else the builders (or highdicom, on their behalf) read from the source.
IMAGE_KEYWORDS: tuple[str, ...] = (
    "Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation", "Modality",
    "InstanceNumber", "PatientOrientation", "BodyPartExamined", "Laterality", "PixelSpacing",
    "ImagerPixelSpacing")
VOI_KEYWORDS: tuple[str, ...] = (
    "WindowCenter", "WindowWidth", "WindowCenterWidthExplanation", "VOILUTFunction",
    "VOILUTSequence")
MODALITY_LUT_KEYWORDS: tuple[str, ...] = ("RescaleIntercept", "RescaleSlope", "RescaleType")
DATE_KEYWORDS: tuple[str, ...] = (
    "AcquisitionDateTime", "AcquisitionDate", "AcquisitionTime", "ContentDate",
    "ContentTime", "SeriesDate", "SeriesTime")
# highdicom records the source's acquisition equipment as contributing equipment.
SOURCE_EQUIPMENT_KEYWORDS: tuple[str, ...] = (
    "Manufacturer", "ManufacturerModelName", "SoftwareVersions", "DeviceSerialNumber",
    "InstitutionName", "InstitutionalDepartmentName", "InstitutionAddress", "StationName")

CHECKED_KEYWORDS: tuple[str, ...] = tuple(dict.fromkeys(
    REFERENCE_KEYWORDS + PATIENT_STUDY_KEYWORDS + IMAGE_KEYWORDS + VOI_KEYWORDS
    + MODALITY_LUT_KEYWORDS + DATE_KEYWORDS + SOURCE_EQUIPMENT_KEYWORDS))

# Items of the sequences we copy: keyword -> required in the item (type 1).
SEQUENCE_ITEMS: dict[str, dict[str, bool]] = {
    "OtherPatientIDsSequence": {"PatientID": True, "IssuerOfPatientID": False,
                                "TypeOfPatientID": True},
    "IssuerOfAccessionNumberSequence": {"LocalNamespaceEntityID": False,
                                        "UniversalEntityID": False,
                                        "UniversalEntityIDType": False},
    "VOILUTSequence": {"LUTDescriptor": True, "LUTData": True, "LUTExplanation": False},
}
_MAX_ITEMS = {"IssuerOfAccessionNumberSequence": 1}

_ENUMERATED: dict[str, frozenset[str]] = {
    "PatientSex": frozenset({"M", "F", "O"}),
    "Laterality": frozenset({"R", "L"}),
    "VOILUTFunction": frozenset({"LINEAR", "LINEAR_EXACT", "SIGMOID"}),
    "TypeOfPatientID": frozenset({"TEXT", "RFID", "BARCODE"}),
    "UniversalEntityIDType": frozenset({"DNS", "EUI64", "ISO", "URI", "UUID", "X400", "X500"}),
    "PhotometricInterpretation": frozenset({
        "MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB", "YBR_FULL", "YBR_FULL_422",
        "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT"}),
}
_POSITIVE = frozenset({"PixelSpacing", "ImagerPixelSpacing", "WindowWidth", "Rows",
                       "Columns", "SamplesPerPixel"})
_NOT_NEGATIVE = frozenset({"PatientSize", "PatientWeight"})
_ORIENTATION = re.compile(r"[APRLHF]{1,3}")

# Body Part Examined terms of unpaired structures (PS3.16 CID 4031, as dciodvfy applies
# it): a series of one has no Laterality; any other body part needs one (type 2C).
UNPAIRED_BODY_PARTS = frozenset("""
    ABDOMEN ABDOMENPELVIS AORTA BACK BLADDER BRAIN CEREBELLUM CSPINE CTSPINE CERVIX CHEST
    CHESTABDOMEN CHESTABDPELVIS CIRCLEOFWILLIS COCCYX COLON CORONARYARTERY DUODENUM
    WHOLEBODY ESOPHAGUS FACE GALLBLADDER HEAD HEADNECK HEART ILEUM ILIUM JAW JEJUNUM LARYNX
    LIVER LSPINE LSSPINE MAXILLA MEDIASTINUM MOUTH NECK NECKCHEST NECKCHESTABDOMEN
    NECKCHESTABDPELV NOSE PANCREAS PELVIS PENIS PHARYNX PROSTATE RECTUM SCALP SKULL SPINE
    SPLEEN SSPINE STERNUM STOMACH THYMUS THYROID TLSPINE TONGUE TRACHEA TSPINE URETER
    URETHRA UTERUS VAGINA VULVA""".split())


class AttributeChecker:
    """Applies the VR and attribute rules; collects what was dropped or repaired."""

    def __init__(self, encode) -> None:
        self.encode = encode
        self.dropped: set[str] = set()
        self.repaired: set[str] = set()

    def element(self, keyword: str, read: ElementRead) -> DataElement | None:
        tag = tag_for_keyword(keyword)
        try:
            value, repaired = self._value(keyword, read)
        except vrs.InvalidValue:
            self.dropped.add(keyword)
            if keyword in TYPE2_KEYWORDS:
                return DataElement(tag, read.vr, "")
            return None
        if isinstance(value, (str, bytes, list)) and not value and keyword not in TYPE2_KEYWORDS:
            return None     # present without a value: says nothing, and is not type 2 here
        if repaired:
            self.repaired.add(keyword)
        return DataElement(tag, _write_vr(keyword, read, value), value)

    def _value(self, keyword: str, read: ElementRead):
        if read.unreadable:
            raise vrs.InvalidValue("unreadable")
        if read.vr == "SQ":
            return self._items(keyword, read)
        if read.vr in vrs.TEXT_VRS:
            if read.text is None:
                raise vrs.InvalidValue("text that does not decode")
            values = vrs.split_values(read.vr, read.text)
        else:
            values = read.values or []
        vrs.check_multiplicity(dictionary_VM(tag_for_keyword(keyword)), len(values))
        values, repaired = vrs.check_values(read.vr, values, self.encode)
        _check_attribute(keyword, values)
        if read.vr in vrs.BINARY_VRS and read.vr.startswith("O"):
            return values[0] if values else b"", repaired
        if len(values) == 1 and dictionary_VM(tag_for_keyword(keyword)) == "1":
            return values[0], repaired
        return (values if values else ""), repaired

    def _items(self, keyword: str, read: ElementRead):
        items = read.items or []
        if not items or len(items) > _MAX_ITEMS.get(keyword, len(items)):
            raise vrs.InvalidValue("sequence item count")
        out, repaired = DicomSequence(), False
        for item in items:
            clean = Dataset()
            for sub, required in SEQUENCE_ITEMS[keyword].items():
                if sub not in item:
                    if required:
                        raise vrs.InvalidValue("a required item attribute is missing")
                    continue
                value, fixed = self._value(sub, item[sub])
                if required and value in ("", [], b""):
                    raise vrs.InvalidValue("a required item attribute is empty")
                repaired |= fixed
                clean.add(DataElement(tag_for_keyword(sub), _write_vr(sub, item[sub], value),
                                      value))
            _check_item(keyword, clean)
            out.append(clean)
        return out, repaired

    def check_window(self, dataset: Dataset) -> None:
        """Window Center and Width go together, same count, widths usable (C.11.2.1.2)."""
        present = [k for k in VOI_KEYWORDS[:3] if k in dataset]
        if not present:
            return
        centers = _numbers(dataset.get("WindowCenter"))
        widths = _numbers(dataset.get("WindowWidth"))
        linear = (dataset.get("VOILUTFunction") or "LINEAR") == "LINEAR"
        usable = (centers and widths and len(centers) == len(widths)
                  and all(w >= 1.0 if linear else w > 0.0 for w in widths))
        if not usable:
            for keyword in present:
                del dataset[keyword]
                self.dropped.add(keyword)
            if "VOILUTFunction" in dataset and "VOILUTSequence" not in dataset:
                del dataset["VOILUTFunction"]
                self.dropped.add("VOILUTFunction")
            return
        explanation = dataset.get("WindowCenterWidthExplanation")
        if explanation is not None and len(_as_list(explanation)) != len(centers):
            del dataset["WindowCenterWidthExplanation"]
            self.dropped.add("WindowCenterWidthExplanation")

    def check_rescale(self, dataset: Dataset) -> None:
        """Rescale Slope and Intercept go together (C.11.1); the type needs both."""
        if "RescaleSlope" in dataset and "RescaleIntercept" in dataset:
            return
        for keyword in MODALITY_LUT_KEYWORDS:
            if keyword in dataset:
                del dataset[keyword]
                self.dropped.add(keyword)


def _write_vr(keyword: str, read: ElementRead, value) -> str:
    if keyword == "LUTData":
        return "OW" if isinstance(value, bytes) else "US"
    if read.vr in ("US", "SS") and keyword == "LUTDescriptor":
        return "SS" if any(v < 0 for v in _as_list(value)) else "US"
    return read.vr


def _check_attribute(keyword: str, values: list) -> None:
    """Rules of single attributes beyond their VR (enumerated values, ranges)."""
    allowed = _ENUMERATED.get(keyword)
    if allowed is not None and any(v not in allowed for v in values):
        raise vrs.InvalidValue(f"{keyword} is not one of its enumerated values")
    if keyword in _POSITIVE and any(float(v) <= 0 for v in values):
        raise vrs.InvalidValue(f"{keyword} must be positive")
    if keyword in _NOT_NEGATIVE and any(float(v) < 0 for v in values):
        raise vrs.InvalidValue(f"{keyword} must not be negative")
    if keyword == "SamplesPerPixel" and any(v not in (1, 3) for v in values):
        raise vrs.InvalidValue("SamplesPerPixel must be 1 or 3")
    if keyword == "RescaleSlope" and any(float(v) == 0 for v in values):
        raise vrs.InvalidValue("RescaleSlope must not be 0")
    if keyword == "PatientOrientation" and not all(_ORIENTATION.fullmatch(v) for v in values):
        raise vrs.InvalidValue("PatientOrientation must be patient direction letters")


def _check_item(keyword: str, item: Dataset) -> None:
    """Conditional (1C) rules inside the sequence items we copy."""
    if keyword == "IssuerOfAccessionNumberSequence":
        if not (item.get("LocalNamespaceEntityID") or item.get("UniversalEntityID")):
            raise vrs.InvalidValue("an issuer item without an identifier")
        if bool(item.get("UniversalEntityID")) != bool(item.get("UniversalEntityIDType")):
            raise vrs.InvalidValue("Universal Entity ID and its type go together")
    elif keyword == "VOILUTSequence":
        descriptor = _as_list(item.LUTDescriptor)
        data = item.LUTData
        entries = descriptor[0] or 65536
        count = len(data) // 2 if isinstance(data, bytes) else len(_as_list(data))
        if not 8 <= descriptor[2] <= 16 or count != entries:
            raise vrs.InvalidValue("a VOI LUT whose data does not match its descriptor")


def _as_list(value) -> list:
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]


def _numbers(value) -> list[float]:
    return [float(v) for v in _as_list(value)]


