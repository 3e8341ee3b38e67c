"""The words the result objects show: series descriptions, overlay labels, the demo note,
and the summary lines of the findings beyond TB and nodules (English, as the rest)."""
from __future__ import annotations

from collections.abc import Callable

from edge.findings import Findings, Nodule, Other

from .uids import OUTPUT_TYPES

__all__ = ["DEMO_NOTE", "SUMMARY_CHARACTERS", "nodule_label", "nodules_marked", "other_label",
           "other_lines", "series_description", "short_display", "tb_label"]

DEMO_NOTE = "NOT FOR CLINICAL USE (demonstration model)"
#: Longest summary line when the caller cannot measure text (about what fits the SC).
SUMMARY_CHARACTERS = 60
_DISPLAY_MAX = 40   # a display name in labels and tracking identifiers (LO: 64)


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
    """Short nodule label for overlays: ``"Nodule 0.91"`` or ``"Mass 0.88"`` (plus size when
    known; a mass is a nodule detection over 30 mm, ``Nodule.kind``)."""
    text = f"{nodule.kind} {nodule.score:.2f}"
    if nodule.diameter_mm is not None:
        text += f", {nodule.diameter_mm:.0f} mm"
    return text


def nodules_marked(findings: Findings, *, banner: bool = False) -> str:
    """How many nodules and masses (``Nodule.kind``) are marked: ``"Nodules: 2 marked"``,
    ``"Nodules: 1, masses: 1 marked"`` on the SC banner, ``"2 nodule(s), 1 mass(es) marked"``
    on the GSPS."""
    nodules = sum(n.kind == "Nodule" for n in findings.nodules)
    masses = len(findings.nodules) - nodules
    if banner:
        if nodules and masses:
            return f"Nodules: {nodules}, masses: {masses} marked"
        if masses:
            return f"Masses: {masses} marked"
        return f"Nodules: {nodules} marked" if nodules else "Nodules: none found"
    if not findings.nodules:
        return "No nodules marked"
    parts = ([f"{nodules} nodule(s)"] if nodules else []) + ([f"{masses} mass(es)"] if masses else [])
    return ", ".join(parts) + " marked"


def short_display(other: Other) -> str:
    """The finding's display name, one line, at most 40 characters."""
    text = " ".join(str(other.display).split()) or str(other.label).strip() or "Finding"
    return text if len(text) <= _DISPLAY_MAX else text[:_DISPLAY_MAX - 3].rstrip() + "..."


def other_label(other: Other) -> str:
    """Short label of a detection for overlays: ``"Mass 0.82, 31 mm"`` (size when known)."""
    text = f"{short_display(other)} {other.score:.2f}"
    if other.diameter_mm is not None:
        text += f", {other.diameter_mm:.0f} mm"
    return text


def other_lines(findings: Findings, fits: Callable[[str], bool] | None = None) -> list[str]:
    """Summary lines of the other findings, at most two, each made to ``fits``
    (default: at most ``SUMMARY_CHARACTERS``): ``"REFER: Consolidation, Mass"`` for the
    positive findings that refer, then ``"Also found: Effusion 0.71, Mass (2 marked)"``
    for the other positive ones; beyond what fits, ``"+N more"``. Empty when there is
    nothing positive beyond TB and nodules."""
    fits = fits or (lambda line: len(line) <= SUMMARY_CHARACTERS)
    refer: list[str] = []
    found: dict[str, int] = {}        # item -> number of marks (0: a classification)
    for other in findings.others:
        if not other.positive:
            continue
        name = short_display(other)
        if other.refer:
            if name not in refer:
                refer.append(name)
        elif other.kind == "detection":
            found[name] = found.get(name, 0) + 1
        else:
            found.setdefault(f"{name} {other.score:.2f}", 0)
    also = [f"{item} ({count} marked)" if count > 1 else item for item, count in found.items()]
    return [_summary(prefix, items, fits)
            for prefix, items in (("REFER: ", refer), ("Also found: ", also)) if items]


def _summary(prefix: str, items: list[str], fits: Callable[[str], bool]) -> str:
    """``prefix`` and as many ``items`` as fit, then ``"+N more"`` for the rest."""
    for shown in range(len(items), 0, -1):
        rest = len(items) - shown
        line = prefix + ", ".join(items[:shown]) + (f", +{rest} more" if rest else "")
        if fits(line):
            return line
    return f"{prefix}{len(items)} finding(s)"
