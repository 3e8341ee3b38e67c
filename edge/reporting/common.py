"""What the SR, GSPS and SC builders share: codes, the highdicom input, the finishing step.

Every result object is placed in the source image's study and carries its checked
patient and study attributes (``metadata.read_source``), so the PACS files it next to the
image. Every object is also reproducible: the same inputs give the same bytes (no clock
reads). Equipment, source checks, findings and labels live in their own modules; their
names are re-exported here for older imports.
"""
from __future__ import annotations

import datetime
import logging

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import CodedConcept
from pydicom import Dataset
from pydicom.dataelem import DataElement
from pydicom.valuerep import DA, DT, TM

from edge.findings import Findings

from .attributes import UNPAIRED_BODY_PARTS
from .equipment import AIR_PROCESSING_ALGORITHM, Equipment, air_equipment
from .inputs import (BuildInputs, box_polyline, clip_box, is_demonstration, model_versions,
                     nodule_model, tb_model)
from .labels import DEMO_NOTE, nodule_label, series_description, tb_label
from .marks import PRIVATE_SCHEME, PRIVATE_SCHEME_NAME, private_schemes
from .metadata import PATIENT_STUDY_KEYWORDS, content_datetime, instance_number

logger = logging.getLogger(__name__)

__all__ = [
    "AIR_PROCESSING_ALGORITHM", "DEMO_NOTE", "PATIENT_STUDY_KEYWORDS",
    "SERIES_NUMBERS", "TUBERCULOSIS", "Equipment", "air_equipment", "box_polyline",
    "clip_box", "coding_schemes", "content_datetime", "copy_series_anatomy", "finish",
    "instance_number", "is_demonstration", "model_versions", "nodule_label", "nodule_model",
    "series_description", "stand_in", "tb_label", "tb_model",
]

SERIES_NUMBERS: dict[str, int] = {"sr": 9001, "gsps": 9002, "sc": 9003}

# SNOMED CT 56717001 |Tuberculosis (disorder)|; not in pydicom's code dictionary.
TUBERCULOSIS = CodedConcept("56717001", "SCT", "Tuberculosis")


def coding_schemes(findings: Findings | None = None) -> list[CodingSchemeIdentificationItem]:
    """Coding Scheme Identification for the non-standard schemes used: IHE's 99IHE, and
    the private schemes of the ``findings``' concepts (``marks.private_schemes``)."""
    items = [CodingSchemeIdentificationItem(
        designator="99IHE", name="IHE Coding Scheme",
        responsible_organization="IHE International")]
    for scheme in private_schemes(findings) if findings is not None else ():
        if scheme == "99IHE":
            continue
        name = PRIVATE_SCHEME_NAME if scheme == PRIVATE_SCHEME else "Model manifest codes"
        items.append(CodingSchemeIdentificationItem(designator=scheme, name=name))
    return items


# Type 2 patient/study attributes highdicom reads from the referenced image.
_TYPE2_DEFAULTS: tuple[tuple[str, str], ...] = (
    ("PatientName", "PN"), ("PatientID", "LO"), ("PatientBirthDate", "DA"),
    ("PatientSex", "CS"), ("AccessionNumber", "SH"), ("StudyID", "SH"),
    ("StudyDate", "DA"), ("StudyTime", "TM"), ("ReferringPhysicianName", "PN"),
)


# The GSPS sets its VOI itself (gsps._voi); highdicom's copy of a source LUT is wrong.
_VOI_KEYWORDS = frozenset({"WindowCenter", "WindowWidth", "WindowCenterWidthExplanation",
                           "VOILUTFunction", "VOILUTSequence"})


def stand_in(inputs: BuildInputs) -> Dataset:
    """The image as handed to highdicom: the checked metadata, person names blanked.

    highdicom checks person names and warns with the name in the message when it has
    no caret (common from modalities), which would put patient names in the logs, and
    it fails on missing type 2 attributes that non-conformant modalities leave out.
    The stand-in therefore has empty names and empty stand-ins for missing type 2
    attributes; ``finish`` then writes the checked names onto the result. It has no VOI
    attributes: the GSPS builder writes the VOI itself.
    """
    checked = inputs.meta.dataset
    substitute = Dataset({tag: checked[tag] for tag in checked.keys()
                          if checked[tag].keyword not in _VOI_KEYWORDS})
    if hasattr(checked, "file_meta"):
        substitute.file_meta = checked.file_meta
    for keyword, vr in _TYPE2_DEFAULTS:
        if vr == "PN" or keyword not in checked:
            substitute[keyword] = DataElement(keyword, vr, "")
    if "SamplesPerPixel" not in checked:
        substitute.SamplesPerPixel = 1
    if not checked.get("Modality"):   # highdicom needs one to accept the image as a source
        substitute.Modality = "OT"
    return substitute


def copy_patient_and_study(target: Dataset, checked: Dataset) -> None:
    """The checked patient/study elements and the declared character set, onto ``target``."""
    if "SpecificCharacterSet" in checked:
        target.SpecificCharacterSet = checked.SpecificCharacterSet
    elif "SpecificCharacterSet" in target:
        del target.SpecificCharacterSet
    for keyword in PATIENT_STUDY_KEYWORDS:
        if keyword in checked:
            element = checked[keyword]
            target[keyword] = DataElement(element.tag, element.VR, element.value)


def copy_series_anatomy(target: Dataset, checked: Dataset) -> None:
    """General Series Body Part Examined and Laterality for a GSPS/SC series.

    The source's (checked) Body Part Examined is copied. Laterality (type 2C) is absent
    for an unpaired body part such as CHEST; otherwise it is the source's, or present
    and empty (unknown) when the source has none.
    """
    part = checked.get("BodyPartExamined")
    if part:
        target.BodyPartExamined = part
    if part in UNPAIRED_BODY_PARTS:
        if "Laterality" in target:
            del target.Laterality
    else:
        target.Laterality = checked.get("Laterality") or ""


def finish(dataset: Dataset, inputs: BuildInputs) -> None:
    """Make the object reproducible and traceable to this box (the one adapter).

    highdicom stamps the instance creation time (and its own contribution time) with the
    clock; those are replaced by the content time so a rerun writes the same bytes.
    highdicom has no parameter for Station Name, nor a purpose of reference outside DCM
    for contributing equipment, so the station name and the IHE AIR item are added here.
    The checked patient/study elements are written last (with their real names).
    """
    when: datetime.datetime = inputs.when
    equipment = inputs.equipment
    copy_patient_and_study(dataset, inputs.meta.dataset)
    dataset.InstanceCreationDate = DA(when.date())
    dataset.InstanceCreationTime = TM(when.time())
    if equipment.station_name:
        dataset.StationName = equipment.station_name
    items = list(dataset.get("ContributingEquipmentSequence", []))
    for item in items:
        if "ContributionDateTime" in item and item.get("ManufacturerModelName") == "highdicom":
            item.ContributionDateTime = DT(when)
    items.append(air_equipment(equipment, when))
    dataset.ContributingEquipmentSequence = items
