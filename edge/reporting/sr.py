"""The Comprehensive 3D SR (TID 1500 Measurement Report) with the AI findings.

Content tree, all referencing the source image:
- an image-level group "TB": the TB score (a probability), the threshold, and
  "Tuberculosis" present/absent at that threshold;
- an image-level group "Nodules": "Nodule" present/absent (so a negative study says so);
- one planar ROI group per nodule: the box as a closed polyline in full-resolution pixel
  coordinates, the score and, when pixel spacing is known, the long axis in mm.
Each group has a tracking identifier and a deterministic tracking UID, and the TID 4019
algorithm identification of the model that produced it.
"""
from __future__ import annotations

import datetime
import logging

import highdicom as hd
from highdicom.sr import CodedConcept
from pydicom import Dataset
from pydicom.sr.codedict import codes

from edge.findings import Findings, ModelInfo, Nodule

from . import common
from .common import Equipment
from .uids import device_uid, result_series_uid, result_uid, tracking_uid

logger = logging.getLogger(__name__)

PROCEDURES_REPORTED = (codes.SCT.ChestImaging, codes.SCT.PlainRadiography)


def build_sr(source: Dataset, findings: Findings, *, equipment: Equipment = Equipment(),
             analysis_time: datetime.datetime | None = None) -> hd.sr.Comprehensive3DSR:
    """Build the TID 1500 SR for one analysed image (same inputs, same bytes)."""
    rows, columns = common.check_inputs(source, findings)
    if not isinstance(equipment, Equipment):
        raise TypeError(f"equipment must be an Equipment, got {type(equipment).__name__}")
    versions = common.model_versions(findings)
    demo = common.is_demonstration(findings)
    when = common.content_datetime(source, analysis_time)
    groups: list = []
    if findings.tb is not None:
        groups.append(_tb_group(source, findings, versions))
    nodule_model = common.nodule_model(findings)
    if findings.nodules or nodule_model is not None:
        groups.append(_nodule_summary_group(source, findings, versions, nodule_model))
    for index, nodule in enumerate(findings.nodules, start=1):
        groups.append(_nodule_group(source, nodule, index, rows, columns, versions, nodule_model))
    if not groups:
        raise ValueError("findings has neither a TB result nor a nodule model: nothing to report")

    ref = common.stand_in(source)   # what highdicom reads; see common.stand_in
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid(equipment.manufacturer, equipment.model_name,
                           equipment.device_serial_number),
            name=equipment.model_name,
            manufacturer_name=equipment.manufacturer,
            model_name=equipment.model_name,
            serial_number=equipment.device_serial_number,
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=list(PROCEDURES_REPORTED),
        imaging_measurements=groups,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[ref],
        content=report,
        series_instance_uid=result_series_uid(source.StudyInstanceUID, "sr", versions),
        series_number=common.SERIES_NUMBERS["sr"],
        sop_instance_uid=result_uid(source.SOPInstanceUID, versions, "sr"),
        instance_number=common.instance_number(source),
        manufacturer=equipment.manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        institution_name=equipment.institution_name,
        manufacturer_model_name=equipment.model_name,
        software_versions=equipment.software_version,
        device_serial_number=equipment.device_serial_number,
        series_description=common.series_description("sr", demo),
        content_date=when.date(),
        content_time=when.time(),
        series_date=when.date(),
        series_time=when.time(),
        content_qualification="RESEARCH" if demo else "PRODUCT",
        coding_schemes=common.coding_schemes(),
    )
    common.finish(sr, source, equipment, when)
    logger.debug("built SR %s for %s", sr.SOPInstanceUID, source.SOPInstanceUID)
    return sr


def _algorithm(model: ModelInfo | None) -> hd.sr.AlgorithmIdentification | None:
    if model is None:
        return None
    return hd.sr.AlgorithmIdentification(name=model.name, version=model.version)


def _probability(name: CodedConcept, value: float) -> hd.sr.Measurement:
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"a probability must lie in 0..1, got {value!r}")
    return hd.sr.Measurement(name=name, value=round(float(value), 6),
                             unit=common.PROBABILITY_UNIT)


def _present(flag: bool) -> CodedConcept:
    return codes.SCT.Present if flag else codes.SCT.Absent


def _tb_group(source: Dataset, findings: Findings,
              versions: list[str]) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    tb = findings.tb
    assert tb is not None
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid(source.SOPInstanceUID, versions, "tb"),
            identifier="TB",
        ),
        finding_type=common.TUBERCULOSIS,
        finding_sites=[hd.sr.FindingSite(codes.SCT.Lung)],
        algorithm_id=_algorithm(common.tb_model(findings)),
        measurements=[
            _probability(codes.DCM.Probability, tb.score),
            _probability(codes.DCM.ThresholdValue, tb.threshold),
        ],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(common.TUBERCULOSIS, _present(tb.positive)),
        ],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
    )


def _nodule_summary_group(source: Dataset, findings: Findings, versions: list[str],
                          model: ModelInfo | None) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid(source.SOPInstanceUID, versions, "nodules"),
            identifier="Nodules",
        ),
        finding_type=codes.SCT.Nodule,
        finding_sites=[hd.sr.FindingSite(codes.SCT.Lung)],
        algorithm_id=_algorithm(model),
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(codes.SCT.Nodule, _present(bool(findings.nodules))),
        ],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
    )


def _nodule_group(source: Dataset, nodule: Nodule, index: int, rows: int, columns: int,
                  versions: list[str], model: ModelInfo | None,
                  ) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    box = common.clip_box(nodule.box, rows, columns)
    if box[0] == box[2] or box[1] == box[3]:
        raise ValueError(f"nodule {index} box {nodule.box!r} is empty inside the image")
    measurements = [_probability(codes.DCM.Probability, nodule.score)]
    if nodule.diameter_mm is not None:
        if not nodule.diameter_mm > 0:
            raise ValueError(f"nodule {index} diameter_mm must be positive, got "
                             f"{nodule.diameter_mm!r}")
        measurements.append(hd.sr.Measurement(
            name=codes.SCT.LongAxis, value=round(float(nodule.diameter_mm), 2),
            unit=codes.UCUM.Millimeter))
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=common.box_polyline(box),
        source_image=hd.sr.SourceImageForRegion.from_source_image(source),
    )
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid(source.SOPInstanceUID, versions, f"nodule-{index}"),
            identifier=f"Nodule {index}",
        ),
        referenced_region=region,
        finding_type=codes.SCT.Nodule,
        finding_sites=[hd.sr.FindingSite(codes.SCT.Lung)],
        algorithm_id=_algorithm(model),
        measurements=measurements,
    )
