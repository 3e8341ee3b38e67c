"""What each model label means: the ``[[findings]]`` tables of a manifest.

Every class a model outputs maps to one finding: a coded concept (scheme, value, meaning),
a display text, a threshold, and whether a positive result raises the technician's
"refer" flag. A manifest lists them as ``[[findings]]`` tables::

    [[findings]]
    label = "tb"                    # the model's name for the class (unique)
    index = 1                       # class index in the output (default: list position)
    display = "Tuberculosis"        # shown to people (default: the code's meaning, else the label)
    code = "154283005"              # optional coded concept ...
    scheme = "SCT"                  # ... its coding scheme (default SCT) ...
    meaning = "Pulmonary tuberculosis"   # ... and its code meaning
    threshold = 0.6                 # default: [output] threshold / score_threshold
    refer = true                    # positive -> refer flag (default false)
    report = true                   # false: decoded, never reported (e.g. a "normal" class)

A label without ``code`` gets one from :data:`KNOWN_CODES` when its name is listed there,
else no code (reports then carry the display text only, and ``edge models check`` says so).
Manifests without ``[[findings]]`` (the shipped demonstration models) get the finding they
always implied: see :func:`implied_findings`.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

FINDING_KEYS = {"label", "index", "display", "code", "scheme", "meaning", "threshold", "refer", "report"}


@dataclass(frozen=True)
class Code:
    """A coded concept: ``value`` in coding ``scheme`` (DICOM designator), with its meaning."""

    value: str
    scheme: str
    meaning: str


# Codes for common chest X-ray labels, used when a [[findings]] entry names the label but
# no code. Only codes checked against a published source are listed:
# - DICOM PS3.16 (as shipped in pydicom 3.0 ``pydicom.sr.codedict``): Nodule 27925004 and
#   Mass 4147007 (CID 6102/6104 chest CAD findings), Pneumothorax 36118008 (CID 6105),
#   Pleural effusion 60046008, Fibrosis 112674009, Pathologic calcification 18115005,
#   Opacity DCM 112001 (CID 6104).
# - SNOMED CT browser (International edition): 786838002 Nodule of lung / Pulmonary nodule.
# - Published value sets and code tables (HL7 FHIR value sets; CDC/IJTLD SNOMED-ICD table):
#   154283005 Pulmonary tuberculosis, 95436008 Lung consolidation, 56717001 Tuberculosis,
#   46621007 Atelectasis, 8186001 Cardiomegaly.
# Pleural thickening and lung mass are deliberately absent (no code found that two sources
# agree on): a site that reports them puts the code in its manifest.
KNOWN_CODES: dict[str, Code] = {
    "tb": Code("56717001", "SCT", "Tuberculosis"),
    "tuberculosis": Code("56717001", "SCT", "Tuberculosis"),
    "pulmonary_tuberculosis": Code("154283005", "SCT", "Pulmonary tuberculosis"),
    "nodule": Code("27925004", "SCT", "Nodule"),
    "lung_nodule": Code("786838002", "SCT", "Pulmonary nodule"),
    "pulmonary_nodule": Code("786838002", "SCT", "Pulmonary nodule"),
    "mass": Code("4147007", "SCT", "Mass"),
    "consolidation": Code("95436008", "SCT", "Lung consolidation"),
    "effusion": Code("60046008", "SCT", "Pleural effusion"),
    "pleural_effusion": Code("60046008", "SCT", "Pleural effusion"),
    "pneumothorax": Code("36118008", "SCT", "Pneumothorax"),
    "cardiomegaly": Code("8186001", "SCT", "Cardiomegaly"),
    "atelectasis": Code("46621007", "SCT", "Atelectasis"),
    "fibrosis": Code("112674009", "SCT", "Fibrosis"),
    "calcification": Code("18115005", "SCT", "Pathologic calcification"),
    "lung_opacity": Code("112001", "DCM", "Opacity"),
    "opacity": Code("112001", "DCM", "Opacity"),
}


def label_key(label: str) -> str:
    """``"Lung Opacity"``, ``"lung-opacity"`` -> ``"lung_opacity"`` (for :data:`KNOWN_CODES`)."""
    return re.sub(r"[^a-z0-9]+", "_", label.strip().lower()).strip("_")


@dataclass(frozen=True)
class FindingSpec:
    """One ``[[findings]]`` entry, checked, with defaults filled in."""

    label: str
    index: int
    display: str
    code: Code | None
    threshold: float
    refer: bool = False
    report: bool = True


def implied_findings(task: str, default_threshold: float) -> tuple[FindingSpec, ...]:
    """The finding a manifest without ``[[findings]]`` has always meant.

    A single-score classifier is the TB screen (refers when positive); a CenterNet
    detector finds nodules (no refer). Codes are those the reports have always used.
    """
    if task == "classification":
        return (FindingSpec("tb", 0, "Tuberculosis", KNOWN_CODES["tb"], default_threshold, refer=True),)
    return (FindingSpec("nodule", 0, "Nodule", KNOWN_CODES["nodule"], default_threshold, refer=False),)


def parse_findings(entries: Any, source: Path, default_threshold: float,
                   error: type[Exception] = ValueError) -> tuple[FindingSpec, ...]:
    """Check the ``[[findings]]`` array of tables; errors name the file, entry and key."""
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise error(f"{source}: key 'findings' must be an array of tables ([[findings]] ... ), "
                    "one per model class")
    out: list[FindingSpec] = []
    for n, entry in enumerate(entries):
        where = f"findings[{n}]"

        def fail(key: str, problem: str) -> Exception:
            return error(f"{source}: key '{where}.{key}' {problem}")

        for key in sorted(set(entry) - FINDING_KEYS):
            logger.warning("%s: unknown key [%s] %s ignored (known keys: %s)",
                           source, where, key, ", ".join(sorted(FINDING_KEYS)))
        label = entry.get("label")
        if not isinstance(label, str) or not label.strip():
            raise fail("label", "is missing or empty (the model's name for this class)")
        where = f"findings[{n}] ({label})"
        index = entry.get("index", n)
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise fail("index", f"must be a whole number >= 0 (the class index in the output), got {index!r}")
        display = entry.get("display")
        if display is not None and (not isinstance(display, str) or not display.strip()):
            raise fail("display", f"must be a non-empty string, got {display!r}")
        threshold = entry.get("threshold", default_threshold)
        if isinstance(threshold, int) and not isinstance(threshold, bool):
            threshold = float(threshold)
        if not isinstance(threshold, float) or not 0.0 <= threshold <= 1.0:
            raise fail("threshold", f"must be a number between 0 and 1, got {threshold!r}")
        flags = {}
        for key, default in (("refer", False), ("report", True)):
            value = entry.get(key, default)
            if not isinstance(value, bool):
                raise fail(key, f"must be true or false, got {value!r}")
            flags[key] = value
        code = _code(entry, label, fail)
        if display is None:   # what people read: the code's meaning, else the label
            display = code.meaning if code is not None and code.meaning else label
        out.append(FindingSpec(label=label.strip(), index=index, display=display.strip(), code=code,
                               threshold=threshold, **flags))
    seen_labels: dict[str, int] = {}
    seen_index: dict[int, str] = {}
    for spec in out:
        if spec.label in seen_labels:
            raise error(f"{source}: key 'findings[].label' {spec.label!r} is used twice; labels must "
                        "be unique")
        if spec.index in seen_index:
            raise error(f"{source}: key 'findings[].index' {spec.index} is used by both "
                        f"{seen_index[spec.index]!r} and {spec.label!r}")
        seen_labels[spec.label] = spec.index
        seen_index[spec.index] = spec.label
    return tuple(out)


def _code(entry: dict[str, Any], label: str, fail) -> Code | None:
    value = entry.get("code")
    if value is None:
        for key in ("scheme", "meaning"):
            if key in entry:
                raise fail("code", f"is missing but '{key}' is given; give code, scheme and meaning together")
        return KNOWN_CODES.get(label_key(label))
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise fail("code", f"must be a non-empty string (the code value, e.g. \"27925004\"), got {value!r}")
    scheme = entry.get("scheme", "SCT")
    if not isinstance(scheme, str) or not scheme.strip():
        raise fail("scheme", f"must be a coding scheme designator such as \"SCT\", got {scheme!r}")
    meaning = entry.get("meaning")
    if meaning is None:
        known = KNOWN_CODES.get(label_key(label))
        if known is not None and known.value == value.strip() and known.scheme == scheme.strip():
            meaning = known.meaning
    if not isinstance(meaning, str) or not meaning.strip():
        raise fail("meaning", "is missing: a code needs its code meaning (e.g. \"Pulmonary nodule\")")
    if scheme.strip() == "SCT" and not value.strip().isdigit():
        raise fail("code", f"{value!r} is not a SNOMED CT concept id (digits only)")
    return Code(value.strip(), scheme.strip(), meaning.strip())
