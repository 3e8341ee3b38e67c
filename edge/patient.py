"""Patient attributes as people read them (for screens only: never for logs or metrics)."""
from __future__ import annotations


def display_name(dicom_name: str) -> str:
    """DICOM PN ``FAMILY^GIVEN^MIDDLE^PREFIX^SUFFIX`` as people write it (first group only)."""
    parts = [p.strip() for p in (dicom_name or "").split("=")[0].split("^")]
    return " ".join(p for p in parts if p)
