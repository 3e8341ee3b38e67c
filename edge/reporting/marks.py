"""The findings the objects draw and name: one ``Mark`` per box, and the coded concepts.

The SR, the GSPS and the SC must agree on what they show: each box (a nodule, or a
detection of another label a model declares) has one tracking identifier (``"Nodule 2"``,
``"Mass 1"``: numbered per display name; a nodule detection over 30 mm is a "Mass", and
another model's masses are numbered after it) and one tracking
key (``"nodule-2"``, ``"other-4"``: the finding's position in ``Findings.nodules`` or
``Findings.others``) from which ``BuildInputs.tracking_uid`` derives the UID that the SR's
group and the GSPS's box share.

A finding's coded concept is the one its manifest gives. A finding without one is coded
in the appliance's private scheme ``PRIVATE_SCHEME`` (code value: the model's label,
meaning: its display name), which the SR declares in its Coding Scheme Identification
Sequence (``private_schemes``), as it does any private (``99``) scheme a manifest uses.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from highdicom.sr import CodedConcept
from pydicom.sr.coding import Code

from edge.findings import NODULE_KIND_CODES, Findings, ModelInfo, Other

from .inputs import nodule_model
from .labels import nodule_label, other_label, short_display

__all__ = ["PRIVATE_SCHEME", "PRIVATE_SCHEME_NAME", "Mark", "finding_concept", "marks",
           "model_of", "private_schemes"]

#: Private coding scheme (PS3.3 8.2: private designators start with "99") of the labels a
#: manifest gives no code for.
PRIVATE_SCHEME = "99XRAYEDGE"
PRIVATE_SCHEME_NAME = "X-ray edge model finding labels"
_LONG_MAX = 64                                 # LO: Code Meaning
_UNSAFE = re.compile(r"[\x00-\x1f\x7f\\]")     # not allowed in SH/LO/UC values
#: the coded concept of each ``Nodule.kind``
_KIND_CODES = {kind: Code(value, scheme, meaning) for kind, (scheme, value, meaning) in NODULE_KIND_CODES.items()}


@dataclass(frozen=True)
class Mark:
    """One box the objects draw: where, what, how sure, by which model, and its names."""

    key: str                          # tracking key: "nodule-<n>" | "other-<i>"
    identifier: str                   # tracking identifier: "Nodule 1", "Mass 2"
    label: str                        # the overlay text: "Nodule 0.91, 12 mm"
    box: list[float]                  # [x1, y1, x2, y2], full-resolution pixels
    score: float
    diameter_mm: float | None
    finding_type: Code | CodedConcept
    model: ModelInfo | None


def marks(findings: Findings) -> list[Mark]:
    """The nodules, then the other detections, in the order of the findings."""
    nodules = nodule_model(findings)
    numbers: dict[str, int] = {}
    found = []
    for n, nodule in enumerate(findings.nodules, start=1):
        numbers[nodule.kind] = numbers.get(nodule.kind, 0) + 1      # "Nodule 2", "Mass 1"
        found.append(Mark(key=f"nodule-{n}", identifier=f"{nodule.kind} {numbers[nodule.kind]}",
                          label=nodule_label(nodule), box=nodule.box, score=nodule.score,
                          diameter_mm=nodule.diameter_mm, finding_type=_KIND_CODES[nodule.kind],
                          model=nodules))
    for index, other in enumerate(findings.others):
        if other.kind != "detection" or other.box is None:
            continue
        name = short_display(other)
        numbers[name] = numbers.get(name, 0) + 1
        found.append(Mark(key=f"other-{index}", identifier=f"{name} {numbers[name]}",
                          label=other_label(other), box=other.box, score=other.score,
                          diameter_mm=other.diameter_mm, finding_type=finding_concept(other),
                          model=model_of(findings, other)))
    return found


def finding_concept(other: Other) -> CodedConcept:
    """The finding's coded concept: its manifest's, else its label in ``PRIVATE_SCHEME``."""
    if other.code:
        return CodedConcept(str(other.code["value"]).strip(), str(other.code["scheme"]).strip(),
                            _meaning(str(other.code["meaning"])))
    return CodedConcept(_UNSAFE.sub("_", other.label.strip()), PRIVATE_SCHEME,
                        _meaning(other.display))


def private_schemes(findings: Findings) -> list[str]:
    """The private coding schemes the findings' concepts use, in order of appearance."""
    schemes: list[str] = []
    for other in findings.others:
        scheme = str(other.code["scheme"]).strip() if other.code else PRIVATE_SCHEME
        if scheme.startswith("99") and scheme not in schemes:
            schemes.append(scheme)
    return schemes


def model_of(findings: Findings, other: Other) -> ModelInfo | None:
    """The listed model that produced ``other`` (by name), if any."""
    return next((m for m in findings.models if m.name == other.model), None)


def _meaning(text: str) -> str:
    text = _UNSAFE.sub(" ", text).strip()
    return text if len(text) <= _LONG_MAX else text[:_LONG_MAX - 3].rstrip() + "..."
