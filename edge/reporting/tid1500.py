"""TID 1500 Measurement Report content with report-level qualitative evaluations.

highdicom's ``MeasurementReport`` (0.28) writes rows 1-4 and 6-9 of TID 1500 only: no
Image Library unless given images it can describe fully, and no Qualitative Evaluations
container (rows 12-14) for conclusions about the whole image, such as "no nodule". This
module is the one small adapter: it assembles the same content items highdicom does
(language, observation context, procedure reported, imaging measurements) from
highdicom's own building blocks, and adds:

- the Image Library (row 5, TID 1600) with one entry per source image, by reference only
  (the entry descriptors of TID 1602 are optional and read attributes a damaged source
  may lack);
- the Imaging Measurements container (row 6) only when there are groups (TID 1500 needs
  rows 6, 10 or 12: the qualitative evaluations are always present here);
- the Qualitative Evaluations container (row 12) with CODE items (row 13). TID 1500 is
  extensible, and rows 12-14 have no place for numbers or provenance: each CODE item
  may carry the algorithm that made it (TID 4019, HAS CONCEPT MOD, as in a measurement
  group) and the numbers it was inferred from (NUM, INFERRED FROM), so that a score
  and its threshold stay next to the decision made from them.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
from highdicom.sr import CodedConcept
from highdicom.sr.templates import Template
from pydicom import Dataset
from pydicom.sr.coding import Code
from pydicom.sr.codedict import codes

__all__ = ["QUALITATIVE_EVALUATIONS", "Evaluation", "Evidence", "MeasurementReport"]

#: TID 1500 row 12: (C0034375, UMLS, "Qualitative Evaluations").
QUALITATIVE_EVALUATIONS = CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
_SOURCE = CodedConcept("260753009", "SCT", "Source")

_Groups = (hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations,
           hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations,
           hd.sr.MeasurementsAndQualitativeEvaluations)
_R = hd.sr.RelationshipTypeValues


@dataclass(frozen=True)
class Evidence:
    """A number a qualitative evaluation was inferred from (a NUM item)."""

    name: Code | CodedConcept
    value: float
    unit: Code | CodedConcept


@dataclass(frozen=True)
class Evaluation:
    """One report-level qualitative evaluation: ``name`` is ``value`` (row 13)."""

    name: Code | CodedConcept
    value: Code | CodedConcept
    algorithm: hd.sr.AlgorithmIdentification | None = None
    inferred_from: tuple[Evidence, ...] = ()

    def content_item(self) -> hd.sr.CodeContentItem:
        item = hd.sr.CodeContentItem(name=self.name, value=self.value,
                                     relationship_type=_R.CONTAINS)
        children: list[Dataset] = []
        if self.algorithm is not None:
            if not isinstance(self.algorithm, hd.sr.AlgorithmIdentification):
                raise TypeError("Evaluation.algorithm must be a highdicom "
                                "AlgorithmIdentification")
            children.extend(self.algorithm)
        for evidence in self.inferred_from:
            if not isinstance(evidence, Evidence):
                raise TypeError(f"Evaluation.inferred_from items must be Evidence, got "
                                f"{type(evidence).__name__}")
            children.append(hd.sr.NumContentItem(
                name=evidence.name, value=evidence.value, unit=evidence.unit,
                relationship_type=_R.INFERRED_FROM))
        if children:
            item.ContentSequence = hd.sr.ContentSequence(children)
        return item


class MeasurementReport(Template):
    """TID 1500 with an image library and report-level qualitative evaluations."""

    def __init__(self, *, observation_context: hd.sr.ObservationContext,
                 procedure_reported: Sequence[Code | CodedConcept],
                 images: Sequence[Dataset],
                 imaging_measurements: Sequence = (),
                 qualitative_evaluations: Sequence[Evaluation] = (),
                 title: Code | CodedConcept = codes.cid7021.ImagingMeasurementReport) -> None:
        super().__init__(is_root=True)
        if not isinstance(observation_context, hd.sr.ObservationContext):
            raise TypeError("observation_context must be a highdicom ObservationContext")
        if not procedure_reported:
            raise ValueError("procedure_reported must name at least one procedure")
        if not images:
            raise ValueError("images must list at least one source image")
        if not imaging_measurements and not qualitative_evaluations:
            raise ValueError("imaging_measurements and qualitative_evaluations are both "
                             "empty: TID 1500 needs at least one of them")
        for index, group in enumerate(imaging_measurements):
            if not isinstance(group, _Groups):
                raise TypeError(f"imaging_measurements[{index}] must be a highdicom "
                                f"measurement group, got {type(group).__name__}")
        for index, evaluation in enumerate(qualitative_evaluations):
            if not isinstance(evaluation, Evaluation):
                raise TypeError(f"qualitative_evaluations[{index}] must be an Evaluation, "
                                f"got {type(evaluation).__name__}")

        root = hd.sr.ContainerContentItem(name=title, template_id="1500")
        content = hd.sr.ContentSequence()
        content.extend(hd.sr.LanguageOfContentItemAndDescendants(
            CodedConcept("en-US", "RFC5646", "English (United States)")))
        content.extend(observation_context)
        for procedure in procedure_reported:
            content.append(hd.sr.CodeContentItem(
                name=codes.DCM.ProcedureReported, value=procedure,
                relationship_type=_R.HAS_CONCEPT_MOD))
        content.append(_image_library(images))
        if imaging_measurements:
            container = hd.sr.ContainerContentItem(name=codes.DCM.ImagingMeasurements,
                                                   relationship_type=_R.CONTAINS)
            container.ContentSequence = hd.sr.ContentSequence()
            for group in imaging_measurements:
                container.ContentSequence.extend(group)
            content.append(container)
        if qualitative_evaluations:
            container = hd.sr.ContainerContentItem(name=QUALITATIVE_EVALUATIONS,
                                                   relationship_type=_R.CONTAINS)
            container.ContentSequence = hd.sr.ContentSequence(
                [e.content_item() for e in qualitative_evaluations])
            content.append(container)
        root.ContentSequence = content
        self.append(root)


def _image_library(images: Sequence[Dataset]) -> hd.sr.ContainerContentItem:
    """TID 1600: one group, one entry (TID 1601) per image, referenced by UID only."""
    group = hd.sr.ContainerContentItem(name=codes.DCM.ImageLibraryGroup,
                                       relationship_type=_R.CONTAINS)
    group.ContentSequence = hd.sr.ContentSequence([
        hd.sr.ImageContentItem(name=_SOURCE, referenced_sop_class_uid=image.SOPClassUID,
                               referenced_sop_instance_uid=image.SOPInstanceUID,
                               relationship_type=_R.CONTAINS)
        for image in images])
    library = hd.sr.ContainerContentItem(name=codes.DCM.ImageLibrary,
                                         relationship_type=_R.CONTAINS)
    library.ContentSequence = hd.sr.ContentSequence([group])
    return library
