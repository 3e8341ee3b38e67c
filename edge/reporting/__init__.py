"""The result objects sent to the PACS: TID 1500 SR, GSPS and secondary capture.

``build_results`` builds the configured set for one analysed image. Every object is in
the source's study, in one series per object type, with UIDs derived from everything that
determines its content (``uids``) and dates that do not read the clock, so that a rerun
after a crash gives byte-identical objects under the same UIDs, and different content
never reuses a UID. The source's metadata is checked first (``metadata``): damaged
attributes are repaired or left out and logged by keyword, never cost the result.
"""
from __future__ import annotations

import datetime
import logging
from collections.abc import Sequence

import numpy as np
from pydicom import Dataset

from edge.findings import Findings

from . import iod_lookups
from .annotate import annotate_image, tb_decision
from .common import SERIES_NUMBERS
from .equipment import Equipment, equipment_from_identity
from .gsps import build_gsps
from .inputs import read_metadata
from .metadata import SourceMetadata, read_source
from .sc import build_sc
from .sr import PredecessorDocument, build_sr
from .uids import (OUTPUT_TYPES, REPORT_FORMAT_VERSION, content_digest, result_series_uid,
                   result_uid)

logger = logging.getLogger(__name__)

iod_lookups.install()   # highdicom's IOD table walks, answered once per SOP class

__all__ = [
    "OUTPUT_TYPES", "REPORT_FORMAT_VERSION", "SERIES_NUMBERS", "Equipment",
    "PredecessorDocument", "SourceMetadata", "annotate_image", "build_gsps",
    "build_results", "build_sc", "build_sr", "content_digest", "equipment_from_identity",
    "read_source", "result_series_uid", "result_uid", "tb_decision",
]


def build_results(source: Dataset, findings: Findings, unit_image: np.ndarray | None,
                  outputs: Sequence[str] = OUTPUT_TYPES, *,
                  equipment: Equipment = Equipment(),
                  analysis_time: datetime.datetime | None = None,
                  source_digest: str | None = None,
                  predecessors: Sequence[PredecessorDocument] = ()) -> dict[str, Dataset]:
    """Build the requested result objects, keyed by type (``"sr"``, ``"gsps"``, ``"sc"``).

    ``unit_image`` is needed only for ``"sc"``. ``source_digest`` is a digest of the
    source's bytes as received (e.g. the spool file's SHA-256); without it, a digest of
    the source elements read is used. ``predecessors`` are earlier SRs of this image that
    the new SR replaces. Unknown or repeated types raise ``ValueError`` before anything
    is built; the source's metadata is checked once for all objects.
    """
    if isinstance(outputs, str):
        outputs = (outputs,)
    unknown = [o for o in outputs if o not in OUTPUT_TYPES]
    if unknown:
        raise ValueError(f"outputs has unknown types {unknown}; valid: {OUTPUT_TYPES}")
    if len(set(outputs)) != len(outputs):
        raise ValueError(f"outputs lists a type twice: {list(outputs)}")
    if "sc" in outputs and unit_image is None:
        raise ValueError("unit_image is required when outputs includes 'sc'")
    if not isinstance(equipment, Equipment):
        raise TypeError(f"equipment must be an Equipment, got {type(equipment).__name__}")
    if not isinstance(findings, Findings):
        raise TypeError(f"findings must be edge.findings.Findings, got {type(findings).__name__}")
    metadata = read_metadata(source, findings, equipment)
    if source_digest is None:     # digest the source once, not once per object
        source_digest = metadata.elements_digest()
    common = dict(equipment=equipment, analysis_time=analysis_time, metadata=metadata,
                  source_digest=source_digest)
    results: dict[str, Dataset] = {}
    for kind in outputs:
        if kind == "sr":
            results[kind] = build_sr(source, findings, predecessors=predecessors, **common)
        elif kind == "gsps":
            results[kind] = build_gsps(source, findings, **common)
        else:
            results[kind] = build_sc(source, findings, unit_image, **common)
    return results
