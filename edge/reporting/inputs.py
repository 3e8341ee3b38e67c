"""What one build reads: the checked source metadata, the findings, the equipment, the
content time, and the digests that the result and tracking UIDs are derived from.

``prepare`` checks everything that does not depend on the source's metadata (findings,
boxes, scores) before any object is built, so that a build that still fails afterwards
can only have failed on the metadata, and the builders may retry from the minimal
stand-in (``with_fallback``).
"""
from __future__ import annotations

import dataclasses
import datetime
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import highdicom as hd
import numpy as np
import pydicom
from pydicom import Dataset

from edge.findings import Findings, ModelInfo, Other

from .equipment import Equipment
from .metadata import SourceMetadata, content_datetime, read_source
from .uids import REPORT_FORMAT_VERSION, content_digest, result_uid, tracking_uid

logger = logging.getLogger(__name__)

__all__ = ["BuildInputs", "box_polyline", "clip_box", "is_demonstration", "model_versions",
           "nodule_model", "prepare", "read_metadata", "tb_model", "with_fallback"]

T = TypeVar("T")


@dataclass(frozen=True)
class BuildInputs:
    """Everything one result object is built from (see the module docstring)."""

    meta: SourceMetadata
    findings: Findings
    equipment: Equipment
    when: datetime.datetime
    source_key: str            # the caller's source_digest, else a digest of the elements

    @property
    def source(self) -> Dataset:
        """The checked metadata as a dataset (what builders read instead of the source)."""
        return self.meta.dataset

    @property
    def source_uid(self) -> str:
        return self.meta.sop_instance_uid

    @property
    def versions(self) -> list[str]:
        return model_versions(self.findings)

    @property
    def demo(self) -> bool:
        return is_demonstration(self.findings)

    def result_uid(self, object_type: str, **extra: object) -> str:
        """SOP Instance UID of ``object_type`` built from these inputs (and ``extra``)."""
        findings = dataclasses.asdict(self.findings)
        findings.pop("timings_ms", None)      # how long it took is not content
        digest = content_digest({
            "format": REPORT_FORMAT_VERSION, "type": object_type,
            "source": {"uid": self.source_uid, "digest": self.source_key},
            "findings": findings, "equipment": dataclasses.asdict(self.equipment),
            "when": self.when.isoformat(), "minimal": self.meta.minimal,
            "libraries": {"highdicom": hd.__version__, "pydicom": pydicom.__version__},
            "extra": extra,
        })
        return result_uid(self.source_uid, digest, object_type)

    def tracking_uid(self, key: str) -> str:
        """Tracking UID of the finding ``key``: ``"tb"``, ``"nodules"``, ``"nodule-<n>"``
        (n from 1), ``"other-<i>"`` (``findings.others[i]``), each also with ``"-label"``
        (its GSPS label). It changes when that finding or its model changes, and differs
        between findings (the key is part of it)."""
        finding: object
        kind, _, rest = key.partition("-")
        index = int(rest.split("-")[0]) if rest else 0
        if key == "tb":
            finding = {"tb": self.findings.tb, "model": tb_model(self.findings)}
        elif key == "nodules":
            finding = {"count": len(self.findings.nodules),
                       "model": nodule_model(self.findings)}
        elif kind == "nodule":
            finding = {"index": index, "nodule": self.findings.nodules[index - 1],
                       "model": nodule_model(self.findings)}
        elif kind == "other":
            other = self.findings.others[index]
            finding = {"index": index, "other": other,
                       "model": next((m for m in self.findings.models
                                      if m.name == other.model), None)}
        else:
            raise ValueError(f"tracking key {key!r} names no finding")
        digest = content_digest({"source": self.source_key,
                                 "finding": _plain(finding)})
        return tracking_uid(self.source_uid, digest, key)

    def with_metadata(self, meta: SourceMetadata) -> BuildInputs:
        return dataclasses.replace(self, meta=meta)


def prepare(source: Dataset, findings: Findings, *, equipment: Equipment,
            analysis_time: datetime.datetime | None, source_digest: str | None,
            meta: SourceMetadata | None = None) -> BuildInputs:
    """Check the arguments and the source's metadata; see ``BuildInputs``."""
    if not isinstance(source, Dataset):
        raise TypeError(f"source must be a pydicom Dataset, got {type(source).__name__}")
    if not isinstance(findings, Findings):
        raise TypeError(f"findings must be edge.findings.Findings, got {type(findings).__name__}")
    if not isinstance(equipment, Equipment):
        raise TypeError(f"equipment must be an Equipment, got {type(equipment).__name__}")
    if source_digest is not None and (not isinstance(source_digest, str) or not source_digest):
        raise ValueError("source_digest must be a non-empty str (a digest of the source's "
                         "bytes) or None")
    if meta is None:
        meta = read_metadata(source, findings, equipment)
    _check_findings(findings, meta)
    when = content_datetime(meta.dataset, analysis_time)
    return BuildInputs(meta=meta, findings=findings, equipment=equipment, when=when,
                       source_key=source_digest or meta.elements_digest())


def read_metadata(source: Dataset, findings: Findings, equipment: Equipment) -> SourceMetadata:
    """The source's checked metadata, with a character set that can also write the
    equipment's names and the models' names and versions."""
    texts = [*equipment.texts(), *(t for m in findings.models for t in (m.name, m.version)),
             *(str(t) for o in findings.others
               for t in (o.label, o.display, *(o.code or {}).values()))]
    return read_source(source, texts)


def with_fallback(kind: str, inputs: BuildInputs, build: Callable[[BuildInputs], T]) -> T:
    """``build(inputs)``; if that raises, ``build`` again from the minimal stand-in.

    The arguments and findings were checked in ``prepare``, so a failure here comes from
    the source's metadata (or from how highdicom reads it): losing that metadata is
    better than losing the result. Only the exception's type is logged (its message may
    quote patient data).
    """
    try:
        return build(inputs)
    except Exception as exc:   # noqa: BLE001 - retried below, re-raised if that fails
        logger.warning("%s for source %s could not be built from its checked metadata "
                       "(%s); building it from a minimal stand-in (UIDs, geometry, patient "
                       "ID and name) instead", kind.upper(), inputs.source_uid,
                       type(exc).__name__)
    return build(inputs.with_metadata(inputs.meta.minimal_stand_in()))


def _check_findings(findings: Findings, meta: SourceMetadata) -> None:
    """The findings belong to the source and hold something reportable."""
    if findings.sop_instance_uid != meta.sop_instance_uid:
        raise ValueError(
            "findings.sop_instance_uid does not match source.SOPInstanceUID; "
            "the findings belong to another image"
        )
    if not findings.eligible:
        raise ValueError(
            f"findings.eligible is False (reason: {findings.reason!r}); "
            "there are no results to report for this image"
        )
    rows, columns = meta.rows, meta.columns
    if (findings.rows, findings.columns) not in ((0, 0), (rows, columns)):
        raise ValueError(
            f"findings.rows/columns ({findings.rows}x{findings.columns}) differ from the "
            f"source's Rows/Columns ({rows}x{columns})"
        )
    if findings.tb is not None:
        for name in ("score", "threshold"):
            value = getattr(findings.tb, name)
            if not (isinstance(value, (int, float)) and 0.0 <= float(value) <= 1.0):
                raise ValueError(f"findings.tb.{name} must be a probability in 0..1, "
                                 f"got {value!r}")
    for index, nodule in enumerate(findings.nodules, start=1):
        box = clip_box(nodule.box, rows, columns)
        if box[0] == box[2] or box[1] == box[3]:
            raise ValueError(f"nodule {index} box {nodule.box!r} is empty inside the image")
        if not (isinstance(nodule.score, (int, float)) and 0.0 <= float(nodule.score) <= 1.0):
            raise ValueError(f"nodule {index} score must be a probability in 0..1, "
                             f"got {nodule.score!r}")
        if nodule.diameter_mm is not None and not nodule.diameter_mm > 0:
            raise ValueError(f"nodule {index} diameter_mm must be positive, got "
                             f"{nodule.diameter_mm!r}")
    for index, other in enumerate(findings.others):
        _check_other(f"findings.others[{index}]", other, rows, columns)


_CODE_KEYS = ("value", "scheme", "meaning")


def _check_other(name: str, other: Other, rows: int, columns: int) -> None:
    """One finding beyond TB and nodules: named, scored, coded and boxed as reportable."""
    if not isinstance(other, Other):
        raise TypeError(f"{name} must be an edge.findings.Other, got {type(other).__name__}")
    for field in ("label", "display"):
        value = getattr(other, field)
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{name}.{field} must be a non-empty string, got {value!r}")
    if other.kind not in ("classification", "detection"):
        raise ValueError(f"{name}.kind must be 'classification' or 'detection', "
                         f"got {other.kind!r}")
    for field in ("score", "threshold"):
        value = getattr(other, field)
        if not (isinstance(value, (int, float)) and 0.0 <= float(value) <= 1.0):
            raise ValueError(f"{name}.{field} must be a probability in 0..1, got {value!r}")
    if other.code is not None:
        if not (isinstance(other.code, dict)
                and all(isinstance(other.code.get(k), str) and other.code[k].strip()
                        for k in _CODE_KEYS)):
            raise ValueError(f"{name}.code must be None or a dict of non-empty strings "
                             f"{_CODE_KEYS}, got {other.code!r}")
        scheme = other.code["scheme"].strip()
        if len(scheme) > 16 or not scheme.isascii() or "\\" in scheme:
            raise ValueError(f"{name}.code scheme must be a coding scheme designator (at "
                             f"most 16 characters), got {scheme!r}")
    if other.kind == "detection":
        if other.box is None:
            raise ValueError(f"{name} is a detection without a box")
        box = clip_box(other.box, rows, columns)
        if box[0] == box[2] or box[1] == box[3]:
            raise ValueError(f"{name}.box {other.box!r} is empty inside the image")
    if other.diameter_mm is not None and not other.diameter_mm > 0:
        raise ValueError(f"{name}.diameter_mm must be positive, got {other.diameter_mm!r}")


def _plain(value: object) -> object:
    """Dataclasses as dicts, for ``content_digest``."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def model_versions(findings: Findings) -> list[str]:
    """``["name@version", ...]`` of the models behind the findings (for series UIDs)."""
    return [f"{m.name}@{m.version}" for m in findings.models]


def is_demonstration(findings: Findings) -> bool:
    """True unless every model is marked for clinical use (unknown counts as demo)."""
    return not findings.models or any(not m.clinical_use for m in findings.models)


def tb_model(findings: Findings) -> ModelInfo | None:
    """The model that produced the TB result: the one it names, else one whose name
    mentions TB, if listed."""
    named = findings.tb.model if findings.tb is not None else ""
    return _named(findings.models, named) or _find_model(findings.models, ("tb", "tuberc"))


def nodule_model(findings: Findings) -> ModelInfo | None:
    """The model that produced the nodules: the one they name, else one whose name
    mentions nodule/detect, if listed."""
    named = next((n.model for n in findings.nodules if n.model), "")
    return _named(findings.models, named) or _find_model(findings.models, ("nodule", "detect"))


def _named(models: Sequence[ModelInfo], name: str) -> ModelInfo | None:
    return next((m for m in models if name and m.name == name), None)


def _find_model(models: Sequence[ModelInfo], hints: Sequence[str]) -> ModelInfo | None:
    for model in models:
        words = model.name.lower().replace("-", "_").split("_")
        if any(word.startswith(hint) for word in words for hint in hints):
            return model
    return None


def clip_box(box: Sequence[float], rows: int, columns: int) -> tuple[float, float, float, float]:
    """A ``[x1, y1, x2, y2]`` box ordered and clipped to the image (0..columns, 0..rows)."""
    if len(box) != 4:
        raise ValueError(f"a box must be [x1, y1, x2, y2], got {list(box)!r}")
    x1, y1, x2, y2 = (float(v) for v in box)
    if not all(np.isfinite([x1, y1, x2, y2])):
        raise ValueError(f"a box has a non-finite coordinate: {list(box)!r}")
    x1, x2 = sorted((min(max(x1, 0.0), columns), min(max(x2, 0.0), columns)))
    y1, y2 = sorted((min(max(y1, 0.0), rows), min(max(y2, 0.0), rows)))
    return round(x1, 2), round(y1, 2), round(x2, 2), round(y2, 2)


def box_polyline(box: tuple[float, float, float, float]) -> np.ndarray:
    """Closed 5-point (column, row) polyline around a box; first point == last."""
    x1, y1, x2, y2 = box
    return np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2], [x1, y1]], dtype=np.float64)
