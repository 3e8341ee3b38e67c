"""The Secondary Capture: the image with the findings burned in, for any viewer.

8-bit MONOCHROME2 (the most widely displayed form), drawn from the handed ``unit_image``
(the source windowed like the source, display polarity) at a size a radiologist can read:
the image's long side is the handed image's, at least ``MIN_LONG_SIDE`` (1024 px) when
the source is that large, never more than the source's nor ``max_side``. The boxes and
labels of the nodules and other detections are drawn on the image, and the banner
"AI result - not for diagnosis", the TB decision, the nodule count and up to two lines
of other positive findings ("REFER: ...", "Also found: ...") go above it
(``annotate.annotate_image``), text sized to the image. The pixels are already windowed,
so the window given is the full 8-bit range (center 128, width 256): viewers that would
otherwise guess a window from the pixel range show it as drawn. Burned In Annotation is
YES; no pixel spacing is given, because the image is not meant for measuring.
"""
from __future__ import annotations

import datetime
import hashlib
import logging

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import DA, TM, DSfloat

from edge.findings import Findings

from . import common
from .annotate import annotate_image
from .equipment import Equipment
from .inputs import BuildInputs, prepare, with_fallback
from .metadata import SourceMetadata, instance_number
from .uids import result_series_uid

logger = logging.getLogger(__name__)

__all__ = ["MIN_LONG_SIDE", "WINDOW", "build_sc", "sc_image_size"]

#: The image's long side is at least this (when the source is that large).
MIN_LONG_SIDE = 1024
#: (center, width) of the full 8-bit range: identity for the windowed pixels.
WINDOW = (128.0, 256.0)


def build_sc(source: Dataset, findings: Findings, unit_image: np.ndarray, *,
             equipment: Equipment = Equipment(), max_side: int = 2048,
             analysis_time: datetime.datetime | None = None,
             source_digest: str | None = None,
             metadata: SourceMetadata | None = None) -> hd.sc.SCImage:
    """Build the secondary capture for one analysed image (same inputs, same bytes).

    ``unit_image``: the source windowed like the source, display polarity, float 0..1,
    any size with the source's aspect. ``max_side`` caps the image's long side.
    ``source_digest`` and ``metadata`` as for ``build_sr``.
    """
    inputs = prepare(source, findings, equipment=equipment, analysis_time=analysis_time,
                     source_digest=source_digest, meta=metadata)
    full = (inputs.meta.rows, inputs.meta.columns)
    size = sc_image_size(np.shape(unit_image), full, max_side=max_side)
    picture = annotate_image(unit_image, findings, color=False, full_size=full,
                             image_size=size)
    pixels = np.asarray(picture, dtype=np.uint8)
    sc = with_fallback("sc", inputs, lambda i: _build(i, pixels, size))
    logger.debug("built SC %s for %s", sc.SOPInstanceUID, inputs.source_uid)
    return sc


def sc_image_size(handed: tuple[int, ...], source: tuple[int, int], *,
                  max_side: int = 2048) -> tuple[int, int]:
    """(rows, columns) of the SC's image part: the source's aspect, a long side of the
    handed image's, raised to ``MIN_LONG_SIDE`` and capped by the source and
    ``max_side``."""
    if len(handed) != 2 or min(handed) < 1:
        raise ValueError(f"unit_image must be a non-empty 2-D array, got shape {handed}")
    if not isinstance(max_side, (int, np.integer)) or max_side < 64:
        raise ValueError(f"max_side must be an integer >= 64, got {max_side!r}")
    rows, columns = (int(v) for v in source)
    source_long = max(rows, columns)
    long_side = min(source_long, int(max_side), max(max(handed), MIN_LONG_SIDE))
    scale = long_side / source_long
    return max(16, round(rows * scale)), max(16, round(columns * scale))


def _build(inputs: BuildInputs, pixels: np.ndarray, size: tuple[int, int]) -> hd.sc.SCImage:
    equipment, when, demo = inputs.equipment, inputs.when, inputs.demo
    checked = inputs.source
    orientation = _patient_orientation(checked)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=common.stand_in(inputs),   # see common.stand_in
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.MONOCHROME2,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=result_series_uid(checked.StudyInstanceUID, "sc", inputs.versions),
        series_number=common.SERIES_NUMBERS["sc"],
        sop_instance_uid=inputs.result_uid(
            "sc", pixels=hashlib.sha256(pixels.tobytes()).hexdigest(), shape=pixels.shape),
        instance_number=instance_number(checked),
        manufacturer=equipment.manufacturer,
        # highdicom needs an orientation for PATIENT; replaced below when unknown.
        patient_orientation=orientation or ("L", "F"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        manufacturer_model_name=equipment.model_name,
        software_versions=equipment.software_version,
        device_serial_number=equipment.device_serial_number,
        institution_name=equipment.institution_name,
        series_description=common.series_description("sc", demo),
        content_date=when.date(),
        content_time=when.time(),
        series_date=when.date(),
        series_time=when.time(),
        coding_schemes=common.coding_schemes(),
    )
    if orientation is None:
        sc.PatientOrientation = ""   # type 2C: present, empty = unknown
    sc.BurnedInAnnotation = "YES"
    sc.DateOfSecondaryCapture = DA(when.date())
    sc.TimeOfSecondaryCapture = TM(when.time())
    sc.SecondaryCaptureDeviceManufacturer = equipment.manufacturer
    sc.SecondaryCaptureDeviceManufacturerModelName = equipment.model_name
    sc.SecondaryCaptureDeviceSoftwareVersions = equipment.software_version
    sc.DerivationDescription = (
        f"Source image windowed like the source and resized to {size[1]}x{size[0]} px, "
        "with AI findings and a banner burned in")[:1024]
    # Pixels already windowed: the full 8-bit range, so no viewer guesses another window.
    sc.WindowCenter, sc.WindowWidth = (DSfloat(v) for v in WINDOW)
    sc.WindowCenterWidthExplanation = "AS DRAWN"
    sc.ImageComments = "AI result - not for diagnosis" + (f" - {common.DEMO_NOTE}" if demo else "")
    reference = Dataset()
    reference.ReferencedSOPClassUID = checked.SOPClassUID
    reference.ReferencedSOPInstanceUID = checked.SOPInstanceUID
    sc.SourceImageSequence = [reference]
    common.copy_series_anatomy(sc, checked)
    common.finish(sc, inputs)
    return sc


def _patient_orientation(checked: Dataset) -> tuple[str, str] | None:
    """The source's Patient Orientation if it is two single-letter values, else None."""
    value = checked.get("PatientOrientation")
    if not value or isinstance(value, str) or len(value) != 2:
        return None
    row, column = (str(v) for v in value)
    try:
        hd.PatientOrientationValuesBiped(row)
        hd.PatientOrientationValuesBiped(column)
    except ValueError:
        return None
    return row, column
