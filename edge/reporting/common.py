"""What the SR, GSPS and SC builders share: equipment, inputs, dates, codes, labels.

Every result object is placed in the source image's study and copies its patient and
study attributes exactly, so the PACS files it next to the image. Every object is also
reproducible: the same source and findings give the same bytes (no clock reads).
"""
from __future__ import annotations

import copy
import datetime
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import CodedConcept
from pydicom import Dataset
from pydicom.dataelem import DataElement
from pydicom.valuerep import DA, DT, TM

import edge
from edge.findings import Findings, ModelInfo, Nodule

from .uids import OUTPUT_TYPES

logger = logging.getLogger(__name__)

SERIES_NUMBERS: dict[str, int] = {"sr": 9001, "gsps": 9002, "sc": 9003}

# SNOMED CT 56717001 |Tuberculosis (disorder)|; not in pydicom's code dictionary.
TUBERCULOSIS = CodedConcept("56717001", "SCT", "Tuberculosis")
# UCUM annotation for a dimensionless probability (value 0..1).
PROBABILITY_UNIT = CodedConcept("{probability}", "UCUM", "probability")
# IHE AI Results (AIR) profile: purpose of reference of the AI's contributing equipment.
AIR_PROCESSING_ALGORITHM = CodedConcept("Newcode1", "99IHE", "Processing Algorithm")

DEMO_NOTE = "NOT FOR CLINICAL USE (demonstration model)"

# Patient and study attributes copied element by element (value bytes unchanged).
PATIENT_STUDY_KEYWORDS: tuple[str, ...] = (
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
    "OtherPatientIDsSequence", "PatientAge", "PatientSize", "PatientWeight",
    "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber",
    "IssuerOfAccessionNumberSequence", "ReferringPhysicianName", "StudyID",
    "StudyDescription",
)

_LO_MAX = 64
_EPOCH = datetime.datetime(1970, 1, 1)


@dataclass(frozen=True)
class Equipment:
    """The appliance as the creator of the result objects (General Equipment module)."""

    manufacturer: str = "Open X-ray Edge"
    model_name: str = "xray-edge"
    software_version: str = edge.__version__
    device_serial_number: str = "0"
    institution_name: str | None = None

    def __post_init__(self) -> None:
        for name in ("manufacturer", "model_name", "software_version",
                     "device_serial_number", "institution_name"):
            value = getattr(self, name)
            if value is None and name == "institution_name":
                continue
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"Equipment.{name} must be a non-empty string, got {value!r}")
            if len(value) > _LO_MAX or "\\" in value:
                raise ValueError(
                    f"Equipment.{name} must be at most {_LO_MAX} characters without "
                    f"backslashes (DICOM LO), got {value!r}"
                )


def check_inputs(source: Dataset, findings: Findings) -> tuple[int, int]:
    """Validate the source image and findings; return the image's (rows, columns)."""
    if not isinstance(source, Dataset):
        raise TypeError(f"source must be a pydicom Dataset, got {type(source).__name__}")
    if not isinstance(findings, Findings):
        raise TypeError(f"findings must be edge.findings.Findings, got {type(findings).__name__}")
    for keyword in ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID",
                    "SeriesInstanceUID", "Rows", "Columns"):
        if not source.get(keyword):
            raise ValueError(f"source has no {keyword}; cannot reference the image")
    if findings.sop_instance_uid != source.SOPInstanceUID:
        raise ValueError(
            "findings.sop_instance_uid does not match source.SOPInstanceUID; "
            "the findings belong to another image"
        )
    if not findings.eligible:
        raise ValueError(
            f"findings.eligible is False (reason: {findings.reason!r}); "
            "there are no results to report for this image"
        )
    rows, columns = int(source.Rows), int(source.Columns)
    if (findings.rows, findings.columns) not in ((0, 0), (rows, columns)):
        raise ValueError(
            f"findings.rows/columns ({findings.rows}x{findings.columns}) differ from the "
            f"source's Rows/Columns ({rows}x{columns})"
        )
    return rows, columns


def instance_number(source: Dataset) -> int:
    """The result's Instance Number: the source's, or 1 when it has none usable."""
    number = source.get("InstanceNumber")
    try:
        return max(int(number), 1) if number not in (None, "") else 1
    except (TypeError, ValueError):
        return 1


def model_versions(findings: Findings) -> list[str]:
    """``["name@version", ...]`` of the models behind the findings (for UIDs)."""
    return [f"{m.name}@{m.version}" for m in findings.models]


def is_demonstration(findings: Findings) -> bool:
    """True unless every model is marked for clinical use (unknown counts as demo)."""
    return not findings.models or any(not m.clinical_use for m in findings.models)


def tb_model(findings: Findings) -> ModelInfo | None:
    """The model that produced the TB result (name mentions TB), if listed."""
    return _find_model(findings.models, ("tb", "tuberc"))


def nodule_model(findings: Findings) -> ModelInfo | None:
    """The model that produced the nodules (name mentions nodule/detect), if listed."""
    return _find_model(findings.models, ("nodule", "detect"))


def _find_model(models: Sequence[ModelInfo], hints: Sequence[str]) -> ModelInfo | None:
    for model in models:
        words = model.name.lower().replace("-", "_").split("_")
        if any(word.startswith(hint) for word in words for hint in hints):
            return model
    return None


def series_description(object_type: str, demo: bool) -> str:
    """Series Description naming the object and, for demo models, the warning."""
    kinds = {"sr": "AI results", "gsps": "AI annotations", "sc": "AI results image"}
    if object_type not in OUTPUT_TYPES:
        raise ValueError(f"object_type must be one of {OUTPUT_TYPES}, got {object_type!r}")
    text = kinds[object_type]
    return f"{text} - {DEMO_NOTE}" if demo else f"{text} - for review by a physician"


def tb_label(findings: Findings) -> str | None:
    """Short TB line for overlays: ``"TB score 0.83 - refer"`` or ``"TB score 0.12"``."""
    if findings.tb is None:
        return None
    text = f"TB score {findings.tb.score:.2f}"
    return f"{text} - refer" if findings.tb.positive else text


def nodule_label(nodule: Nodule) -> str:
    """Short nodule label for overlays: ``"Nodule 0.91"`` (plus size when known)."""
    text = f"Nodule {nodule.score:.2f}"
    if nodule.diameter_mm is not None:
        text += f", {nodule.diameter_mm:.0f} mm"
    return text


def clip_box(box: Sequence[float], rows: int, columns: int) -> tuple[float, float, float, float]:
    """A ``[x1, y1, x2, y2]`` box ordered and clipped to the image (0..columns, 0..rows)."""
    if len(box) != 4:
        raise ValueError(f"nodule box must be [x1, y1, x2, y2], got {list(box)!r}")
    x1, y1, x2, y2 = (float(v) for v in box)
    if not all(np.isfinite([x1, y1, x2, y2])):
        raise ValueError(f"nodule box has a non-finite coordinate: {list(box)!r}")
    x1, x2 = sorted((min(max(x1, 0.0), columns), min(max(x2, 0.0), columns)))
    y1, y2 = sorted((min(max(y1, 0.0), rows), min(max(y2, 0.0), rows)))
    return round(x1, 2), round(y1, 2), round(x2, 2), round(y2, 2)


def box_polyline(box: tuple[float, float, float, float]) -> np.ndarray:
    """Closed 5-point (column, row) polyline around a box; first point == last."""
    x1, y1, x2, y2 = box
    return np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2], [x1, y1]], dtype=np.float64)


def content_datetime(source: Dataset,
                     analysis_time: datetime.datetime | None = None) -> datetime.datetime:
    """Content date/time of the results, without reading the clock.

    The analysis time (kept in the journal, so a rerun passes the same value) when given;
    otherwise the source's acquisition, content, series or study date/time; 1970-01-01
    when the source has none, so that a rerun still yields identical bytes.
    """
    if analysis_time is not None:
        if not isinstance(analysis_time, datetime.datetime):
            raise TypeError("analysis_time must be a datetime.datetime or None")
        return analysis_time.replace(tzinfo=None)
    value = source.get("AcquisitionDateTime")
    if value:
        try:
            parsed = DT(str(value))
            return datetime.datetime.combine(parsed.date(), parsed.time())
        except ValueError:
            pass
    for prefix in ("Acquisition", "Content", "Series", "Study"):
        day = _parse_date(source.get(f"{prefix}Date"))
        if day is not None:
            clock = _parse_time(source.get(f"{prefix}Time")) or datetime.time(0, 0)
            return datetime.datetime.combine(day, clock)
    return _EPOCH


def _parse_date(value: object) -> datetime.date | None:
    if not value:
        return None
    try:
        parsed = DA(str(value))
    except ValueError:
        return None
    return datetime.date(parsed.year, parsed.month, parsed.day) if parsed else None


def _parse_time(value: object) -> datetime.time | None:
    if not value:
        return None
    try:
        parsed = TM(str(value))
    except ValueError:
        return None
    if not parsed:
        return None
    return datetime.time(parsed.hour, parsed.minute, parsed.second, parsed.microsecond)


def coding_schemes() -> list[CodingSchemeIdentificationItem]:
    """Coding Scheme Identification for the non-standard scheme used (IHE's 99IHE)."""
    return [CodingSchemeIdentificationItem(
        designator="99IHE", name="IHE Coding Scheme",
        responsible_organization="IHE International")]


def air_equipment(equipment: Equipment, when: datetime.datetime) -> Dataset:
    """IHE AIR Contributing Equipment item naming the AI software that made the results."""
    item = Dataset()
    item.Manufacturer = equipment.manufacturer
    item.ManufacturerModelName = equipment.model_name
    item.SoftwareVersions = equipment.software_version
    item.DeviceSerialNumber = equipment.device_serial_number
    if equipment.institution_name:
        item.InstitutionName = equipment.institution_name
    item.PurposeOfReferenceCodeSequence = [copy.deepcopy(AIR_PROCESSING_ALGORITHM)]
    item.ContributionDateTime = DT(when)
    item.ContributionDescription = "AI analysis of the referenced image"
    return item


# Type 2 patient/study attributes highdicom reads from the referenced image.
_TYPE2_DEFAULTS: tuple[tuple[str, str], ...] = (
    ("PatientName", "PN"), ("PatientID", "LO"), ("PatientBirthDate", "DA"),
    ("PatientSex", "CS"), ("AccessionNumber", "SH"), ("StudyID", "SH"),
    ("StudyDate", "DA"), ("StudyTime", "TM"), ("ReferringPhysicianName", "PN"),
)


def stand_in(source: Dataset) -> Dataset:
    """The source as handed to highdicom: same elements, person names blanked.

    highdicom checks person names and warns with the name in the message when it has
    no caret (common from modalities), which would put patient names in the logs, and
    it fails on missing type 2 attributes that non-conformant modalities leave out.
    The stand-in shares the source's element objects (no pixel copy) but has empty
    names and empty stand-ins for missing type 2 attributes; ``finish`` then copies
    the source's real elements onto the result. The source itself is not modified.
    """
    substitute = Dataset({tag: source.get_item(tag) for tag in source.keys()})
    if hasattr(source, "file_meta"):
        substitute.file_meta = source.file_meta
    for keyword, vr in _TYPE2_DEFAULTS:
        if vr == "PN" or keyword not in source:
            substitute[keyword] = DataElement(keyword, vr, "")
    return substitute


def copy_patient_and_study(target: Dataset, source: Dataset) -> None:
    """Copy the source's patient/study elements and character set onto ``target`` as-is."""
    if "SpecificCharacterSet" in source:
        target.SpecificCharacterSet = copy.deepcopy(source.SpecificCharacterSet)
    elif "SpecificCharacterSet" in target:
        del target.SpecificCharacterSet
    for keyword in PATIENT_STUDY_KEYWORDS:
        if keyword in source:
            target[keyword] = copy.deepcopy(source[keyword])


def copy_series_anatomy(target: Dataset, source: Dataset) -> None:
    """General Series Body Part Examined and Laterality for a GSPS/SC series.

    The source's Body Part Examined (e.g. CHEST, unpaired: no Laterality needed) and
    Laterality are copied; without either, Laterality (type 2C) is present and empty,
    meaning unknown.
    """
    if source.get("BodyPartExamined"):
        target.BodyPartExamined = source.BodyPartExamined
    if source.get("Laterality"):
        target.Laterality = source.Laterality
    elif not source.get("BodyPartExamined"):
        target.Laterality = ""


def finish(dataset: Dataset, source: Dataset, equipment: Equipment,
           when: datetime.datetime) -> None:
    """Make the object reproducible and traceable to the AI.

    highdicom stamps the instance creation time (and its own contribution time) with the
    clock; those are replaced by ``when`` so a rerun writes the same bytes. The IHE AIR
    contributing-equipment item is appended, and the source's patient/study elements are
    copied unchanged.
    """
    copy_patient_and_study(dataset, source)
    dataset.InstanceCreationDate = DA(when.date())
    dataset.InstanceCreationTime = TM(when.time())
    items = list(dataset.get("ContributingEquipmentSequence", []))
    for item in items:
        if "ContributionDateTime" in item and item.get("ManufacturerModelName") == "highdicom":
            item.ContributionDateTime = DT(when)
    items.append(air_equipment(equipment, when))
    dataset.ContributingEquipmentSequence = items
