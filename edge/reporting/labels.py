"""The words the result objects show: series descriptions, overlay labels, the demo note."""
from __future__ import annotations

from edge.findings import Findings, Nodule

from .uids import OUTPUT_TYPES

__all__ = ["DEMO_NOTE", "nodule_label", "series_description", "tb_label"]

DEMO_NOTE = "NOT FOR CLINICAL USE (demonstration model)"


def series_description(object_type: str, demo: bool) -> str:
    """Series Description naming the object and, for demo models, the warning."""
    kinds = {"sr": "AI results", "gsps": "AI annotations", "sc": "AI results image"}
    if object_type not in OUTPUT_TYPES:
        raise ValueError(f"object_type must be one of {OUTPUT_TYPES}, got {object_type!r}")
    text = kinds[object_type]
    return f"{text} - {DEMO_NOTE}" if demo else f"{text} - for review by a physician"


def tb_label(findings: Findings) -> str | None:
    """Short TB line for overlays: ``"TB score 0.83 - refer"`` or ``"TB score 0.12"``."""
    if findings.tb is None:
        return None
    text = f"TB score {findings.tb.score:.2f}"
    return f"{text} - refer" if findings.tb.positive else text


def nodule_label(nodule: Nodule) -> str:
    """Short nodule label for overlays: ``"Nodule 0.91"`` (plus size when known)."""
    text = f"Nodule {nodule.score:.2f}"
    if nodule.diameter_mm is not None:
        text += f", {nodule.diameter_mm:.0f} mm"
    return text
