"""What the models found in one image, in full-resolution image coordinates.

This is the contract between analysis (``edge.analysis``), reporting (``edge.reporting``),
the journal (stored as JSON) and the web pages.

The two findings the appliance was built around keep their own fields, because the
technician's screen and the reports treat them specially: ``tb`` (the TB screen of a
classifier: score, threshold, refer decision) and ``nodules`` (a detector's nodule boxes).
Every other finding an installed model declares in its manifest (``[[findings]]``: mass,
consolidation, effusion, ...) is an :class:`Other` in ``others``, with its coded concept,
score, threshold, decision and, for detections, its box. :meth:`Findings.refer` is true
when the TB screen is positive or any positive finding's manifest says it refers.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelInfo:
    name: str            # e.g. "tb_classifier"
    version: str         # e.g. "0.1.0"
    backend: str         # "onnxruntime" | "tensorrt" | "triton"
    clinical_use: bool = False   # False for the shipped demonstration models


@dataclass(frozen=True)
class TBResult:
    score: float         # probability 0..1
    threshold: float
    positive: bool       # score >= threshold: refer for TB testing
    # coarse heatmap bounding box of the most suspicious region, full-res pixels, or None
    region: list[float] | None = None
    model: str = ""      # name of the model that screened (a ModelInfo.name); "" unknown


#: A nodule detection larger than this (long axis, when the pixel spacing gives its size) is
#: named a mass, as radiologists do (Fleischner glossary: an opacity greater than 3 cm).
MASS_MM = 30.0
#: (scheme, value, meaning) of each kind of nodule detection (SNOMED CT).
NODULE_KIND_CODES = {"Nodule": ("SCT", "27925004", "Nodule"), "Mass": ("SCT", "4147007", "Mass")}


@dataclass(frozen=True)
class Nodule:
    box: list[float]                 # [x1, y1, x2, y2], full-resolution pixel coordinates
    score: float
    diameter_mm: float | None = None  # None when pixel spacing is unknown
    diameter_px: float = 0.0
    model: str = ""                   # name of the detector (a ModelInfo.name); "" unknown

    @property
    def kind(self) -> str:
        """"Mass" when its size is known and above ``MASS_MM``, else "Nodule"."""
        return "Mass" if self.diameter_mm is not None and self.diameter_mm > MASS_MM else "Nodule"


@dataclass(frozen=True)
class Other:
    """A finding other than the TB screen and nodules, as the model's manifest declares it.

    ``code``: {"value", "scheme", "meaning"} of its coded concept, or None when the manifest
    gives none. Classifications are listed positive or not (``box``: the hottest heatmap
    region of a positive one, when the model has a heatmap); detections only when found,
    with ``box`` [x1, y1, x2, y2] in full-resolution pixels and a size.
    """

    label: str
    display: str
    kind: str                        # "classification" | "detection"
    score: float
    threshold: float
    positive: bool
    refer: bool = False              # positive, and the manifest says it refers
    code: dict[str, str] | None = None
    model: str = ""
    box: list[float] | None = None
    diameter_mm: float | None = None
    diameter_px: float = 0.0


#: Codes whose detections are the appliance's "nodules" (SNOMED CT Nodule, Pulmonary nodule).
NODULE_CODES = frozenset({("SCT", "27925004"), ("SCT", "786838002")})
#: Codes whose classification is the TB screen (SNOMED CT Tuberculosis, Pulmonary tuberculosis).
TB_CODES = frozenset({("SCT", "56717001"), ("SCT", "154283005")})


@dataclass
class Findings:
    sop_instance_uid: str
    eligible: bool
    reason: str | None = None
    tb: TBResult | None = None
    nodules: list[Nodule] = field(default_factory=list)
    timings_ms: dict[str, float] = field(default_factory=dict)
    models: list[ModelInfo] = field(default_factory=list)
    rows: int = 0
    columns: int = 0
    pixel_spacing_mm: list[float] | None = None   # [row, column] spacing used for mm sizes
    others: list[Other] = field(default_factory=list)

    @property
    def refer(self) -> bool:
        """Whether the technician is told to refer: TB positive, or any referring finding."""
        return bool(self.tb is not None and self.tb.positive) or any(o.refer for o in self.others)

    def refer_reasons(self) -> list[str]:
        """Display names of what raises the refer flag ("Tuberculosis" first)."""
        reasons = ["Tuberculosis"] if self.tb is not None and self.tb.positive else []
        for other in self.others:
            if other.refer and other.display not in reasons:
                reasons.append(other.display)
        return reasons

    @property
    def other_detections(self) -> list[Other]:
        return [o for o in self.others if o.kind == "detection"]

    @property
    def other_classifications(self) -> list[Other]:
        return [o for o in self.others if o.kind == "classification"]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Findings":
        data = dict(data)
        tb = data.pop("tb", None)
        nodules = data.pop("nodules", [])
        models = data.pop("models", [])
        others = data.pop("others", [])
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(
            tb=TBResult(**tb) if tb else None,
            nodules=[Nodule(**n) for n in nodules],
            models=[ModelInfo(**m) for m in models],
            others=[Other(**{k: v for k, v in o.items() if k in Other.__dataclass_fields__})
                    for o in others],
            **known,
        )
