"""The result objects sent to the PACS: TID 1500 SR, GSPS and secondary capture.

``build_results`` builds the configured set for one analysed image. Every object is in
the source's study, in one series per object type, with deterministic UIDs and dates,
so that a rerun after a crash gives byte-identical objects and the PACS keeps one copy.
"""
from __future__ import annotations

import datetime
import logging
from collections.abc import Sequence

import numpy as np
from pydicom import Dataset

from edge.findings import Findings

from .annotate import annotate_image, tb_decision
from .common import SERIES_NUMBERS, Equipment
from .gsps import build_gsps
from .sc import build_sc
from .sr import build_sr
from .uids import OUTPUT_TYPES, result_series_uid, result_uid

logger = logging.getLogger(__name__)

__all__ = [
    "OUTPUT_TYPES", "SERIES_NUMBERS", "Equipment", "annotate_image", "build_gsps",
    "build_results", "build_sc", "build_sr", "result_series_uid", "result_uid",
    "tb_decision",
]


def build_results(source: Dataset, findings: Findings, unit_image: np.ndarray | None,
                  outputs: Sequence[str] = OUTPUT_TYPES, *,
                  equipment: Equipment = Equipment(),
                  analysis_time: datetime.datetime | None = None) -> dict[str, Dataset]:
    """Build the requested result objects, keyed by type (``"sr"``, ``"gsps"``, ``"sc"``).

    ``unit_image`` is needed only for ``"sc"``. Unknown or repeated types raise
    ``ValueError`` before anything is built.
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
    results: dict[str, Dataset] = {}
    for kind in outputs:
        if kind == "sr":
            results[kind] = build_sr(source, findings, equipment=equipment,
                                     analysis_time=analysis_time)
        elif kind == "gsps":
            results[kind] = build_gsps(source, findings, equipment=equipment,
                                       analysis_time=analysis_time)
        else:
            results[kind] = build_sc(source, findings, unit_image, equipment=equipment,
                                     analysis_time=analysis_time)
    return results
