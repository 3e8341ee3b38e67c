"""Triage: is this instance a frontal chest radiograph of an adult, which the models may read?

The shipped models are meant for PA/AP chest X-rays of patients aged 15 and over (the WHO
guidance for TB computer-aided detection covers that age group). Everything else is
skipped with a reason a technician understands; nothing here reads pixel data.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, fields
from datetime import date

from pydicom.dataset import Dataset

logger = logging.getLogger(__name__)

#: SOP classes of projection X-ray images the models can read.
XRAY_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.1": "CR Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
}
_SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"

#: Anatomic Region Sequence codes meaning chest, thorax or lung (SNOMED CT, and the older
#: SNOMED-RT values that DICOM used before 2019).
CHEST_REGION_CODES: frozenset[tuple[str, str]] = frozenset({
    ("SCT", "816094009"),   # Chest (CID 4031 since 2019)
    ("SCT", "51185008"),    # Thoracic structure (the earlier "Chest" concept)
    ("SCT", "43799004"),    # Thorax
    ("SCT", "302551006"),   # Entire thorax
    ("SCT", "39607008"),    # Lung
    ("SCT", "3341006"),     # Right lung
    ("SCT", "44029006"),    # Left lung
    ("SRT", "T-D3000"),     # Chest
    ("SRT", "T-28000"),     # Lung
})
_SNOMED_SCHEMES = {"SCT", "SRT", "SNM3", "99SDM"}

_LATERAL_VIEWS = {"LL", "RL", "LATERAL", "LAT", "LLD", "RLD"}
#: View Code Sequence codes (CID 4010) for lateral projections, used when ViewPosition is empty.
_LATERAL_VIEW_CODES = {("SCT", "399198007"), ("SCT", "399173006"), ("SCT", "49370004")}
_GRAYSCALE = {"MONOCHROME1", "MONOCHROME2"}
_AGE_PATTERN = re.compile(r"^\s*(\d{1,3})\s*([DWMY])\s*$")
_DAYS_PER_UNIT = {"D": 1.0, "W": 7.0, "M": 365.25 / 12.0, "Y": 365.25}


def _upper_tuple(value: object, name: str) -> tuple[str, ...]:
    if isinstance(value, str):
        raise TypeError(f"TriageRules.{name}: expected a list of strings, got the string {value!r}")
    try:
        items = tuple(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"TriageRules.{name}: expected a list of strings, got {type(value).__name__}") from None
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"TriageRules.{name}: every entry must be a string, got {item!r}")
    return tuple(item.strip().upper() for item in items)


@dataclass(frozen=True)
class TriageRules:
    """Which instances are analyzed. Field names match the ``[triage]`` config section.

    An empty string in ``body_parts`` or ``views`` admits images that leave the attribute
    empty or absent (common on portable units).
    """

    modalities: tuple[str, ...] = ("CR", "DX")
    body_parts: tuple[str, ...] = ("CHEST", "THORAX", "")
    views: tuple[str, ...] = ("PA", "AP", "")
    min_age_years: int = 15
    min_side_px: int = 1024
    max_side_px: int = 5000

    def __post_init__(self) -> None:
        for name in ("modalities", "body_parts", "views"):
            object.__setattr__(self, name, _upper_tuple(getattr(self, name), name))
        for name in ("min_age_years", "min_side_px", "max_side_px"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"TriageRules.{name}: expected a non-negative integer, got {value!r}")
        if self.min_side_px > self.max_side_px:
            raise ValueError(
                f"TriageRules.min_side_px ({self.min_side_px}) must not be larger than "
                f"max_side_px ({self.max_side_px})")

    @classmethod
    def from_mapping(cls, data: object) -> "TriageRules":
        """Build from a config object or dict with the same field names (extra keys ignored)."""
        names = [f.name for f in fields(cls)]
        if isinstance(data, dict):
            return cls(**{k: data[k] for k in names if k in data})
        return cls(**{k: getattr(data, k) for k in names if hasattr(data, k)})


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    if value is None:
        return ""
    if not isinstance(value, str) and hasattr(value, "__iter__"):
        value = value[0] if len(value) else ""  # type: ignore[index]
    return str(value).strip().upper()


def patient_age_years(ds: Dataset) -> float | None:
    """Age in years at the time of the study, from PatientAge or else the birth and study dates.

    Returns None when neither is known or the values cannot be parsed.
    """
    age = _AGE_PATTERN.match(str(ds.get("PatientAge", "") or ""))
    if age:
        return int(age.group(1)) * _DAYS_PER_UNIT[age.group(2)] / 365.25
    birth = _parse_date(ds.get("PatientBirthDate", ""))
    if birth is None:
        return None
    for keyword in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate"):
        when = _parse_date(ds.get(keyword, ""))
        if when is not None:
            days = (when - birth).days
            return days / 365.25 if days >= 0 else None
    return None


def _parse_date(value: object) -> date | None:
    text = str(value or "").strip()
    if len(text) != 8 or not text.isdigit():
        return None
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None


def _region_codes(ds: Dataset) -> list[tuple[str, str]]:
    codes = []
    for item in ds.get("AnatomicRegionSequence", None) or []:
        scheme = str(item.get("CodingSchemeDesignator", "") or "").strip().upper()
        value = str(item.get("CodeValue", "") or "").strip().upper()
        if scheme in _SNOMED_SCHEMES and value:
            codes.append(("SRT" if scheme in {"SNM3", "99SDM"} else scheme, value))
    return codes


def _modality_reason(ds: Dataset, rules: TriageRules) -> str | None:
    modality = _text(ds, "Modality")
    sop_class = str(ds.get("SOPClassUID", "") or "")
    if sop_class.startswith(_SECONDARY_CAPTURE_PREFIX):
        return "not an X-ray image (secondary capture)"
    if modality not in rules.modalities:
        return f"not an X-ray image (modality {modality or 'unknown'})"
    if sop_class and sop_class not in XRAY_SOP_CLASSES:
        return f"not an X-ray image (SOP class {sop_class})"
    return None


def _pixel_reason(ds: Dataset, rules: TriageRules) -> str | None:
    frames = ds.get("NumberOfFrames", 1)
    try:
        if int(frames or 1) > 1:
            return "multi-frame image"
    except (TypeError, ValueError):
        return "multi-frame image"
    photometric = _text(ds, "PhotometricInterpretation")
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1 or (photometric and photometric not in _GRAYSCALE):
        return "colour image"
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if min(rows, cols) < rules.min_side_px:
        return f"image too small ({cols} x {rows})"
    if max(rows, cols) > rules.max_side_px:
        return f"image too large ({cols} x {rows})"
    return None


def _anatomy_reason(ds: Dataset, rules: TriageRules) -> str | None:
    body_part = _text(ds, "BodyPartExamined")
    if body_part not in rules.body_parts:
        return "not a chest image"
    codes = _region_codes(ds)
    if codes and not any(code in CHEST_REGION_CODES for code in codes):
        return "not a chest image"
    view = _text(ds, "ViewPosition")
    if view and view in rules.views:
        return None
    if view in _LATERAL_VIEWS:
        return "lateral view"
    if not view:
        for item in ds.get("ViewCodeSequence", None) or []:
            code = (str(item.get("CodingSchemeDesignator", "")).strip().upper(),
                    str(item.get("CodeValue", "")).strip())
            if code in _LATERAL_VIEW_CODES:
                return "lateral view"
    if view not in rules.views:
        return f"not a frontal view (view {view or 'not recorded'})"
    return None


def triage(ds: Dataset, rules: TriageRules = TriageRules()) -> str | None:
    """Return None when ``ds`` is eligible for analysis, else the reason it is skipped.

    Checks, in order: X-ray modality and SOP class, single frame, grayscale, size,
    chest anatomy, frontal view, patient age (only when known).
    """
    for check in (_modality_reason, _pixel_reason, _anatomy_reason):
        reason = check(ds, rules)
        if reason:
            return reason
    age = patient_age_years(ds)
    if age is not None and age < rules.min_age_years:
        return f"patient under {rules.min_age_years} years: outside intended use"
    return None
