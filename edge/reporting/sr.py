"""The Comprehensive 3D SR (TID 1500 Measurement Report) with the AI findings.

Content tree (``tid1500.MeasurementReport``), all referencing the source image:
- Image Library: the source image;
- Imaging Measurements: one planar ROI group (TID 1410) per box (``marks.marks``): per
  nodule, finding "Nodule" ("Mass" over 30 mm), and per detection of another label a
  model declares (mass, consolidation, ...), its coded concept, tracking identifier
  "<display> <n>"; each with
  the box as a closed polyline in full-resolution pixel coordinates, the detector's
  "Certainty of Finding" (percent) and, when pixel spacing is known, the long axis (mm);
  on an image without boxes, one "Nodules" group over the whole image instead, with
  "Nodule" absent (the region searched, nothing found; "TB" with its decision when no
  nodule detector ran, else the first other classification, referring ones first);
- Qualitative Evaluations, about the whole image (TID 1500 rows 12-13):
  "Tuberculosis" present/absent at the configured threshold (the refer decision),
  inferred from the TB probability and the threshold (NUM, percent), and "Nodule"
  present/absent; then, in the findings' order, each other classification present/absent
  at its threshold (inferred from its probability and threshold, as TB's) and each other
  detected concept present (once per concept and model). A finding that raises the refer
  flag is therefore always a "present" evaluation here.
Every group and evaluation names the model behind it (TID 4019). Measurement groups have
a tracking identifier and a deterministic tracking UID (shared with the GSPS's box), and
the finding site (lung) on their measurements. A finding whose manifest gives no code is
coded in the private scheme ``marks.PRIVATE_SCHEME`` (label and display name), declared
in the Coding Scheme Identification Sequence with any other private scheme used.

Why this layout: OHIF 3.x turns every measurement group into an annotation and reads its
first image coordinate; an image-level group (TID 1501) has none and crashes its SR
viewport, and so does a report without any group (hence the whole-image "Nodules" group
on a negative image; it has no numbers, so OHIF draws a frame without a label). A
whole-image group for TB would be drawn as a frame with its label outside the image, so
the TB result is a report-level evaluation, which OHIF does not read and TID 1500
readers and dsrdump do. OHIF labels a box with the group's NUM items as
``<concept name>: <value, 2 decimals> <unit code value>``, and a group-level finding site
as ``363698007: <meaning>``: the units are UCUM codes that read as written ("%", "mm"),
and the finding site sits on the measurements (TID 300), which OHIF does not print. An SR
that replaces earlier ones of the same image lists them in the Predecessor Documents
Sequence.
"""
from __future__ import annotations

import copy
import datetime
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
from highdicom.sr import CodedConcept
from pydicom import Dataset
from pydicom.sr.codedict import codes

from edge.findings import Findings, ModelInfo, Other

from . import common
from .equipment import Equipment, device_observer
from .inputs import BuildInputs, prepare, with_fallback
from .labels import short_display
from .marks import Mark, finding_concept, marks, model_of
from .metadata import SourceMetadata, instance_number
from .tid1500 import Evaluation, Evidence, MeasurementReport
from .uids import result_series_uid

logger = logging.getLogger(__name__)

__all__ = ["CERTAINTY_OF_FINDING", "PERCENT", "PROCEDURES_REPORTED", "PredecessorDocument",
           "build_sr"]

PROCEDURES_REPORTED = (codes.SCT.ChestImaging, codes.SCT.PlainRadiography)
#: (111012, DCM, "Certainty of Finding"), in percent, as the CAD SR templates report a
#: detected finding: the detector's confidence that the marked nodule is real (not a
#: probability of disease, which "Probability" next to a box could be read as).
CERTAINTY_OF_FINDING = codes.DCM.CertaintyOfFinding
#: (%, UCUM, "Percent"): viewers print the unit's code value, and "%" reads as written.
PERCENT = codes.UCUM.Percent
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
    if (findings.tb is None and not findings.nodules and not findings.others
            and common.nodule_model(findings) is None):
        raise ValueError("findings has no TB result, no nodule model and no other finding: "
                         "nothing to report")
    sr = with_fallback("sr", inputs, lambda i: _build(i, predecessors))
    logger.debug("built SR %s for %s", sr.SOPInstanceUID, inputs.source_uid)
    return sr


def _build(inputs: BuildInputs, predecessors: tuple[PredecessorDocument, ...],
           ) -> hd.sr.Comprehensive3DSR:
    findings, equipment, when = inputs.findings, inputs.equipment, inputs.when
    ref = common.stand_in(inputs)   # what highdicom reads; see common.stand_in
    nodule_model = common.nodule_model(findings)
    groups = [_mark_group(inputs, ref, mark) for mark in marks(findings)]
    evaluations = []
    whole: _WholeImage | None = None    # what a whole-image group would show
    if findings.tb is not None:
        evaluations.append(_tb_evaluation(inputs))
        whole = _WholeImage(evaluations[-1], "tb", "TB")
    if findings.nodules or nodule_model is not None:
        evaluations.append(Evaluation(codes.SCT.Nodule, _present(bool(findings.nodules)),
                                      algorithm=_algorithm(nodule_model)))
        whole = _WholeImage(evaluations[-1], "nodules", "Nodules")
    others = _other_evaluations(findings)
    evaluations.extend(item.evaluation for item in others)
    if not groups:   # OHIF needs a group with a region to open the report
        whole = whole or min(others, key=lambda item: item.rank)
        groups.append(_whole_image_group(inputs, ref, whole))
    report = MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=device_observer(equipment)),
        procedure_reported=list(PROCEDURES_REPORTED),
        images=[ref],
        imaging_measurements=groups,
        qualitative_evaluations=evaluations,
    )
    sr = Comprehensive3DSR(
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
        coding_schemes=common.coding_schemes(findings),
        previous_versions=[p.as_dataset() for p in predecessors] or None,
    )
    common.finish(sr, inputs)
    return sr


class Comprehensive3DSR(hd.sr.Comprehensive3DSR):
    """highdicom's Comprehensive 3D SR, constructed without re-reading its own content.

    highdicom's constructor deep-copies the whole content tree, parses the copy back into
    content items and searches it twice for the images it references to build the
    evidence sequence: about two thirds of the SR's build time (~70 ms per image on the
    2-core box, the largest single cost of the report stage). Here every region references
    the one evidence image, so the document is constructed around the root container
    without its children and the children are attached afterwards, exactly as highdicom
    attaches them (the same elements, not copies). The encoded bytes are the same as
    highdicom's own construction (``tests/test_reporting.py`` compares them for every kind
    of report); ``content`` is parsed when first asked for.
    """

    def __init__(self, *, content, **kwargs):
        root = content if isinstance(content, Dataset) else content[0]   # a template: one root item
        bare = Dataset()
        for element in root:
            if element.keyword != "ContentSequence":
                bare.add(element)
        bare.ContentSequence = []     # highdicom searches it for references: none here
        super().__init__(content=bare, **kwargs)
        self.ContentSequence = root.ContentSequence
        self._root = root
        self._parsed = None

    @property
    def content(self) -> hd.sr.ContentSequence:
        if self._parsed is None:
            self._parsed = hd.sr.ContentSequence(
                [hd.sr.ContentItem._from_dataset_derived(copy.deepcopy(self._root))], is_root=True)
        return self._parsed


def _algorithm(model: ModelInfo | None) -> hd.sr.AlgorithmIdentification | None:
    """TID 4019: the model's name and version, and as its parameter the inference backend
    that ran it for this image (onnxruntime, tensorrt, or triton, with Triton's local
    fallback recorded as onnxruntime)."""
    if model is None:
        return None
    parameters = [f"backend {model.backend}"] if model.backend else None
    return hd.sr.AlgorithmIdentification(name=model.name, version=model.version,
                                         parameters=parameters)


def _percent(probability: float) -> float:
    """A probability (0..1) in percent."""
    if not 0.0 <= float(probability) <= 1.0:
        raise ValueError(f"a probability must lie in 0..1, got {probability!r}")
    return round(float(probability) * 100.0, 4)


def _present(flag: bool) -> CodedConcept:
    return codes.SCT.Present if flag else codes.SCT.Absent


#: Findings whose site is the lung (SNOMED CT): nodule, pulmonary nodule, mass, lung
#: consolidation, tuberculosis, pulmonary tuberculosis, atelectasis; DCM opacity. Others
#: (pleural effusion, pneumothorax, cardiomegaly, a site's own labels) get no finding
#: site rather than a wrong one.
LUNG_FINDINGS = frozenset({("SCT", "27925004"), ("SCT", "786838002"), ("SCT", "4147007"),
                           ("SCT", "95436008"), ("SCT", "56717001"), ("SCT", "154283005"),
                           ("SCT", "46621007"), ("DCM", "112001")})


def _in_lung(concept) -> bool:
    return (str(concept.scheme_designator), str(concept.value)) in LUNG_FINDINGS


def _lung() -> list[hd.sr.FindingSite]:
    return [hd.sr.FindingSite(codes.SCT.Lung)]


def _tb_evaluation(inputs: BuildInputs) -> Evaluation:
    """"Tuberculosis" present/absent: the refer decision at the configured threshold."""
    tb = inputs.findings.tb
    assert tb is not None
    return Evaluation(
        common.TUBERCULOSIS, _present(tb.positive),
        algorithm=_algorithm(common.tb_model(inputs.findings)),
        inferred_from=(Evidence(codes.DCM.Probability, _percent(tb.score), PERCENT),
                       Evidence(codes.DCM.ThresholdValue, _percent(tb.threshold), PERCENT)))


@dataclass(frozen=True)
class _WholeImage:
    """A report-level evaluation that a whole-image group can show, with its names."""

    evaluation: Evaluation
    key: str            # tracking key (``BuildInputs.tracking_uid``)
    identifier: str     # tracking identifier
    rank: int = 0       # lower first: referring, then positive, then the others


def _other_evaluations(findings: Findings) -> list[_WholeImage]:
    """Each other classification present/absent at its threshold (with its probability
    and threshold, as TB's), and each detected concept present, once per model."""
    def detected(other: Other) -> tuple[str, str, str]:
        concept = finding_concept(other)
        return concept.value, concept.scheme_designator, other.model

    present = {detected(o) for o in findings.other_detections if o.positive}
    items: list[_WholeImage] = []
    seen: set[tuple[str, str, str]] = set()
    for index, other in enumerate(findings.others):
        concept = finding_concept(other)
        algorithm = _algorithm(model_of(findings, other))
        if other.kind == "detection":
            if detected(other) in seen:
                continue
            seen.add(detected(other))
            evaluation = Evaluation(concept, _present(detected(other) in present),
                                    algorithm=algorithm)
        else:
            evaluation = Evaluation(
                concept, _present(other.positive), algorithm=algorithm,
                inferred_from=(
                    Evidence(codes.DCM.Probability, _percent(other.score), PERCENT),
                    Evidence(codes.DCM.ThresholdValue, _percent(other.threshold), PERCENT)))
        rank = 0 if other.refer else 1 if other.positive else 2
        items.append(_WholeImage(evaluation, f"other-{index}", short_display(other), rank))
    return items


def _whole_image_group(inputs: BuildInputs, ref: Dataset, whole: _WholeImage,
                       ) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """An image-level conclusion over the region it was drawn from, the whole image:
    "Nodule" absent (the region searched), or "Tuberculosis" when no nodule detector ran,
    or another classification when neither ran. Numbers stay with the report-level
    evaluation, so OHIF draws no label outside the image."""
    evaluation = whole.evaluation
    whole_image = (0.0, 0.0, float(inputs.meta.columns), float(inputs.meta.rows))
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=inputs.tracking_uid(whole.key), identifier=whole.identifier),
        referenced_region=_region(whole_image, ref),
        finding_type=evaluation.name,
        algorithm_id=evaluation.algorithm,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(evaluation.name,
                                                             evaluation.value)],
    )


def _mark_group(inputs: BuildInputs, ref: Dataset, mark: Mark,
                ) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """One box: its finding, the detector's certainty and, when known, its long axis."""
    box = common.clip_box(mark.box, inputs.meta.rows, inputs.meta.columns)
    sites = _lung() if _in_lung(mark.finding_type) else None
    measurements = [hd.sr.Measurement(name=CERTAINTY_OF_FINDING,
                                      value=_percent(mark.score), unit=PERCENT,
                                      finding_sites=sites)]
    if mark.diameter_mm is not None:
        measurements.append(hd.sr.Measurement(
            name=codes.SCT.LongAxis, value=round(float(mark.diameter_mm), 2),
            unit=codes.UCUM.Millimeter, finding_sites=sites))
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=inputs.tracking_uid(mark.key), identifier=mark.identifier),
        referenced_region=_region(box, ref),
        finding_type=mark.finding_type,
        algorithm_id=_algorithm(mark.model),
        measurements=measurements,
    )


def _region(box: tuple[float, float, float, float], ref: Dataset) -> hd.sr.ImageRegion:
    """A box of the source image as a closed polyline (full-resolution pixels)."""
    return hd.sr.ImageRegion(graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                             graphic_data=common.box_polyline(box),
                             source_image=hd.sr.SourceImageForRegion.from_source_image(ref))
