"""DICOM writer for chest phantoms: DX For Presentation (DR) or CR Image Storage (CR).

A DR case is written as Digital X-Ray Image Storage - For Presentation with every type 1
and 2 attribute of the DX modules; a CR case as Computed Radiography Image Storage, the
way CR readers send, where the pixel spacing may be ImagerPixelSpacing, PixelSpacing or
absent. Either way ``dciodvfy`` reports no errors. A case without a window is written
without one (the appliance then uses percentiles). All UIDs, dates and times are derived
from the case seed, so the same seed writes the same bytes.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import logging
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian

logger = logging.getLogger(__name__)

DX_PRESENTATION_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"
CR_IMAGE_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1"
_UNCOMPRESSED = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}
_LOSSLESS = {
    "1.2.840.10008.1.2.5",        # RLE Lossless
    "1.2.840.10008.1.2.4.90",     # JPEG 2000 Lossless Only
    "1.2.840.10008.1.2.4.80",     # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.70",     # JPEG Lossless SV1 (needs an encoder that may be missing)
    "1.2.840.10008.1.2.4.57",     # JPEG Lossless
}


def _uid(case, *parts: str) -> str:
    """A 2.25 UID (128-bit integer) hashed from the seed: same seed, same UID."""
    text = "|".join(["xray-edge-phantom", str(case.seed), *parts]).encode()
    return "2.25." + str(int.from_bytes(hashlib.sha256(text).digest()[:16], "big"))


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def build_dataset(case, *, patient_name: str = "PHANTOM^CHEST", patient_id: str | None = None,
                  patient_age: str = "045Y", study_instance_uid: str | None = None) -> Dataset:
    """Build the DX For Presentation dataset (without file meta) for ``case``."""
    if case.photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"case.photometric must be MONOCHROME1 or MONOCHROME2, got {case.photometric!r}")
    if case.pixels.ndim != 2 or case.pixels.dtype != np.uint16:
        raise ValueError("case.pixels must be a 2-D uint16 array")
    when = _dt.datetime(2024, 1, 1, 8, 0, 0) + _dt.timedelta(days=case.seed % 366, minutes=(case.seed * 7) % 600)
    date, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    rows, cols = case.pixels.shape
    view = case.view if case.view in ("PA", "AP") else "PA"

    cr = getattr(case, "modality", "DX") == "CR"
    spacing_attribute = getattr(case, "spacing_attribute", "ImagerPixelSpacing")
    if not cr:
        spacing_attribute = "ImagerPixelSpacing"       # type 1 in the DX Detector module
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["DERIVED", "PRIMARY"] if not cr else ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = CR_IMAGE_SOP_CLASS if cr else DX_PRESENTATION_SOP_CLASS
    ds.SOPInstanceUID = _uid(case, "instance")
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = date
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = time
    ds.AccessionNumber = f"PH{case.seed % 10**14:014d}"[-16:]
    ds.Modality = "CR" if cr else "DX"
    if not cr:
        ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Manufacturer = "xray-edge phantom generator"
    ds.InstitutionName = "Phantom"
    ds.ReferringPhysicianName = ""
    ds.StationName = "PHANTOM"
    ds.StudyDescription = "Chest phantom (synthetic, not a patient)"
    ds.SeriesDescription = f"Chest {view} phantom"
    ds.ManufacturerModelName = "engines.train.phantom"
    ds.PatientName = patient_name
    ds.PatientID = patient_id if patient_id is not None else f"PH{case.seed:010d}"
    ds.PatientBirthDate = ""
    ds.PatientSex = case.patient_sex if case.patient_sex in ("M", "F", "O") else "O"
    ds.PatientAge = patient_age
    ds.BodyPartExamined = "CHEST"
    ds.KVP = 120
    ds.SoftwareVersions = "phantom 2"
    spacing = [f"{case.pixel_spacing_mm:.6f}", f"{case.pixel_spacing_mm:.6f}"]
    if spacing_attribute == "ImagerPixelSpacing":
        ds.ImagerPixelSpacing = spacing
    if not cr:
        ds.DetectorType = "SCINTILLATOR"
        ds.PositionerType = "NONE"
    ds.ViewPosition = view
    ds.StudyInstanceUID = study_instance_uid or _uid(case, "study")
    ds.SeriesInstanceUID = _uid(case, "series")
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ["L", "F"]
    if not cr:
        ds.ImageLaterality = "U"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = case.photometric
    ds.Rows, ds.Columns = int(rows), int(cols)
    ds.BitsAllocated = 16
    ds.BitsStored = int(case.bits_stored)
    ds.HighBit = int(case.bits_stored) - 1
    ds.PixelRepresentation = 0
    if spacing_attribute == "PixelSpacing":
        ds.PixelSpacing = spacing
    if not cr:
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = -1 if case.photometric == "MONOCHROME2" else 1
    if case.window_center is not None and case.window_width is not None:
        ds.WindowCenter = f"{case.window_center:.2f}"
        ds.WindowWidth = f"{case.window_width:.2f}"
    elif not cr:
        raise ValueError("case.window_center: a DX For Presentation image needs a window")
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.LossyImageCompression = "00"
    ds.BurnedInAnnotation = "YES" if any(c.get("kind") == "text" for c in case.confounders) else "NO"
    if not cr:
        ds.PresentationLUTShape = "IDENTITY" if case.photometric == "MONOCHROME2" else "INVERSE"
    ds.AnatomicRegionSequence = [_code("51185008", "SCT", "Thorax")]
    # View Code Sequence belongs to DX positioning; CR objects carry it too (a standard
    # extended attribute), as many CR readers do and as edge/demo.py expects
    ds.ViewCodeSequence = [_code("399348003", "SCT", "postero-anterior") if view == "PA"
                           else _code("399198009", "SCT", "antero-posterior")]
    ds.ViewCodeSequence[0].ViewModifierCodeSequence = []
    if not cr:
        ds.AcquisitionContextSequence = []
    ds.PixelData = np.ascontiguousarray(case.pixels).astype("<u2").tobytes()
    return ds


def write_case(case, path, *, patient_name: str = "PHANTOM^CHEST", patient_id: str | None = None,
               patient_age: str = "045Y", study_instance_uid: str | None = None,
               transfer_syntax: str | None = None) -> Dataset:
    """Write ``case`` to ``path`` (explicit VR little endian unless ``transfer_syntax``)."""
    ds = build_dataset(case, patient_name=patient_name, patient_id=patient_id,
                       patient_age=patient_age, study_instance_uid=study_instance_uid)
    add_file_meta(ds, case.pixels, transfer_syntax)
    pydicom.dcmwrite(Path(path), ds, enforce_file_format=True)
    return ds


def add_file_meta(ds: Dataset, pixels: np.ndarray, transfer_syntax: str | None = None) -> Dataset:
    """Give ``ds`` its file meta information, compressing ``pixels`` for a lossless
    ``transfer_syntax`` (default explicit VR little endian); returns ``ds``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = "2.25.86119473958215826040155935131557061851"
    meta.ImplementationVersionName = "XRAYEDGE_PH1"
    ds.file_meta = meta
    if transfer_syntax and transfer_syntax not in _UNCOMPRESSED:
        uid = UID(transfer_syntax)
        if uid not in _LOSSLESS:
            raise ValueError(f"transfer_syntax {transfer_syntax!r} is not a lossless transfer syntax UID "
                             f"this writer knows ({', '.join(sorted(_UNCOMPRESSED | _LOSSLESS))})")
        try:
            ds.compress(uid, pixels)
        except (NotImplementedError, RuntimeError) as exc:
            raise ValueError(f"transfer_syntax {transfer_syntax!r} cannot be encoded here ({exc}); "
                             "use RLE, JPEG 2000 lossless or JPEG-LS lossless") from exc
    elif transfer_syntax:
        meta.TransferSyntaxUID = transfer_syntax
    return ds
