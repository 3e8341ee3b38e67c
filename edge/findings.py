"""What the models found in one image, in full-resolution image coordinates.

This is the contract between analysis (``edge.analysis``), reporting (``edge.reporting``),
the journal (stored as JSON) and the web pages.
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


@dataclass(frozen=True)
class Nodule:
    box: list[float]                 # [x1, y1, x2, y2], full-resolution pixel coordinates
    score: float
    diameter_mm: float | None = None  # None when pixel spacing is unknown
    diameter_px: float = 0.0


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Findings":
        data = dict(data)
        tb = data.pop("tb", None)
        nodules = data.pop("nodules", [])
        models = data.pop("models", [])
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(
            tb=TBResult(**tb) if tb else None,
            nodules=[Nodule(**n) for n in nodules],
            models=[ModelInfo(**m) for m in models],
            **known,
        )
