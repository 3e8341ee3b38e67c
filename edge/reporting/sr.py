"""The Comprehensive 3D SR (TID 1500 Measurement Report) with the AI findings.

Content tree, all referencing the source image:
- an image-level group "TB": the TB score (a probability), the threshold, and
  "Tuberculosis" present/absent at that threshold;
- an image-level group "Nodules": "Nodule" present/absent (so a negative study says so);
- one planar ROI group per nodule: the box as a closed polyline in full-resolution pixel
  coordinates, the score and, when pixel spacing is known, the long axis in mm.
Each group has a tracking identifier and a deterministic tracking UID, and the TID 4019
algorithm identification of the model that produced it. An SR that replaces earlier
ones of the same image lists them in the Predecessor Documents Sequence.
"""
from __future__ import annotations

import datetime
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
from highdicom.sr import CodedConcept
from pydicom import Dataset
from pydicom.sr.codedict import codes

from edge.findings import Findings, ModelInfo, Nodule

from . import common
from .equipment import Equipment, device_observer
from .inputs import BuildInputs, prepare, with_fallback
from .metadata import SourceMetadata, instance_number
from .uids import result_series_uid

logger = logging.getLogger(__name__)

__all__ = ["PROCEDURES_REPORTED", "PredecessorDocument", "build_sr"]

PROCEDURES_REPORTED = (codes.SCT.ChestImaging, codes.SCT.PlainRadiography)
_UID = re.compile(r"(?=.{1,64}$)(0|[1-9]\d*)(\.(0|[1-9]\d*))*")


@dataclass(frozen=True)
class PredecessorDocument:
    """An earlier SR of the same source image that a new SR replaces (PS3.3 C.17.2)."""

    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    sop_instance_uid: str

    def __post_init__(self) -> None:
        for name in ("study_instance_uid", "series_instance_uid", "sop_class_uid",
                     "sop_instance_uid"):
            value = getattr(self, name)
            if not isinstance(value, str) or not _UID.fullmatch(value):
                raise ValueError(f"PredecessorDocument.{name} must be a valid UID, "
                                 f"got {value!r}")

    def as_dataset(self) -> Dataset:
        """The instance as highdicom's ``previous_versions`` reads it (four UIDs)."""
        ds = Dataset()
        ds.StudyInstanceUID = self.study_instance_uid
        ds.SeriesInstanceUID = self.series_instance_uid
        ds.SOPClassUID = self.sop_class_uid
        ds.SOPInstanceUID = self.sop_instance_uid
        return ds


def build_sr(source: Dataset, findings: Findings, *, equipment: Equipment = Equipment(),
             analysis_time: datetime.datetime | None = None,
             source_digest: str | None = None,
             predecessors: Sequence[PredecessorDocument] = (),
             metadata: SourceMetadata | None = None) -> hd.sr.Comprehensive3DSR:
    """Build the TID 1500 SR for one analysed image (same inputs, same bytes).

    ``source_digest``: a digest of the source's bytes as received (default: a digest of
    the elements read). ``predecessors``: earlier SRs of this image that this one
    replaces. ``metadata``: the source's checked metadata when the caller has it already.
    """
    predecessors = tuple(predecessors)
    for index, item in enumerate(predecessors):
        if not isinstance(item, PredecessorDocument):
            raise TypeError(f"predecessors[{index}] must be a PredecessorDocument, "
                            f"got {type(item).__name__}")
    inputs = prepare(source, findings, equipment=equipment, analysis_time=analysis_time,
                     source_digest=source_digest, meta=metadata)
    if findings.tb is None and not findings.nodules and common.nodule_model(findings) is None:
        raise ValueError("findings has neither a TB result nor a nodule model: nothing to report")
    sr = with_fallback("sr", inputs, lambda i: _build(i, predecessors))
    logger.debug("built SR %s for %s", sr.SOPInstanceUID, inputs.source_uid)
    return sr


def _build(inputs: BuildInputs, predecessors: tuple[PredecessorDocument, ...],
           ) -> hd.sr.Comprehensive3DSR:
    findings, equipment, when = inputs.findings, inputs.equipment, inputs.when
    ref = common.stand_in(inputs)   # what highdicom reads; see common.stand_in
    groups: list = []
    if findings.tb is not None:
        groups.append(_tb_group(inputs, ref))
    nodule_model = common.nodule_model(findings)
    if findings.nodules or nodule_model is not None:
        groups.append(_nodule_summary_group(inputs, ref, nodule_model))
    for index, nodule in enumerate(findings.nodules, start=1):
        groups.append(_nodule_group(inputs, ref, nodule, index, nodule_model))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=device_observer(equipment)),
        procedure_reported=list(PROCEDURES_REPORTED),
        imaging_measurements=groups,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[ref],
        content=report,
        series_instance_uid=result_series_uid(ref.StudyInstanceUID, "sr", inputs.versions),
        series_number=common.SERIES_NUMBERS["sr"],
        sop_instance_uid=inputs.result_uid(
            "sr", predecessors=[p.sop_instance_uid for p in predecessors]),
        instance_number=instance_number(inputs.source),
        manufacturer=equipment.manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        institution_name=equipment.institution_name,
        manufacturer_model_name=equipment.model_name,
        software_versions=equipment.software_version,
        device_serial_number=equipment.device_serial_number,
        series_description=common.series_description("sr", inputs.demo),
        content_date=when.date(),
        content_time=when.time(),
        series_date=when.date(),
        series_time=when.time(),
        content_qualification="RESEARCH" if inputs.demo else "PRODUCT",
        coding_schemes=common.coding_schemes(),
        previous_versions=[p.as_dataset() for p in predecessors] or None,
    )
    common.finish(sr, inputs)
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


def _tb_group(inputs: BuildInputs, ref: Dataset) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    tb = inputs.findings.tb
    assert tb is not None
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=inputs.tracking_uid("tb"), identifier="TB"),
        finding_type=common.TUBERCULOSIS,
        finding_sites=[hd.sr.FindingSite(codes.SCT.Lung)],
        algorithm_id=_algorithm(common.tb_model(inputs.findings)),
        measurements=[
            _probability(codes.DCM.Probability, tb.score),
            _probability(codes.DCM.ThresholdValue, tb.threshold),
        ],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(common.TUBERCULOSIS, _present(tb.positive)),
        ],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(ref)],
    )


def _nodule_summary_group(inputs: BuildInputs, ref: Dataset, model: ModelInfo | None,
                          ) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=inputs.tracking_uid("nodules"), identifier="Nodules"),
        finding_type=codes.SCT.Nodule,
        finding_sites=[hd.sr.FindingSite(codes.SCT.Lung)],
        algorithm_id=_algorithm(model),
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(codes.SCT.Nodule,
                                        _present(bool(inputs.findings.nodules))),
        ],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(ref)],
    )


def _nodule_group(inputs: BuildInputs, ref: Dataset, nodule: Nodule, index: int,
                  model: ModelInfo | None,
                  ) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    box = common.clip_box(nodule.box, inputs.meta.rows, inputs.meta.columns)
    measurements = [_probability(codes.DCM.Probability, nodule.score)]
    if nodule.diameter_mm is not None:
        measurements.append(hd.sr.Measurement(
            name=codes.SCT.LongAxis, value=round(float(nodule.diameter_mm), 2),
            unit=codes.UCUM.Millimeter))
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=common.box_polyline(box),
        source_image=hd.sr.SourceImageForRegion.from_source_image(ref),
    )
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=inputs.tracking_uid(f"nodule-{index}"), identifier=f"Nodule {index}"),
        referenced_region=region,
        finding_type=codes.SCT.Nodule,
        finding_sites=[hd.sr.FindingSite(codes.SCT.Lung)],
        algorithm_id=_algorithm(model),
        measurements=measurements,
    )
