"""Deterministic UIDs for the result objects.

A crash between analysis and delivery makes the appliance analyse the image again. The
objects built on the rerun must carry the same UIDs, so that the PACS keeps one copy
instead of two. Every UID here is therefore a pure function of its inputs: the source's
UIDs, the model versions (``"name@version"``) and the object type.

UIDs use the ``2.25.`` root (PS3.5 B.2: a UUID written as one decimal integer): the first
128 bits of a SHA-256 digest, which keeps them at most 44 characters long.
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Sequence

logger = logging.getLogger(__name__)

OUTPUT_TYPES: tuple[str, ...] = ("sr", "gsps", "sc")

_UID_MAX_LENGTH = 64
_SEPARATOR = "\x1f"   # ASCII unit separator: cannot occur in a UID or a model name


def hash_uid(*parts: str) -> str:
    """A ``2.25.`` UID derived from ``parts`` (same parts, same UID)."""
    for index, part in enumerate(parts):
        if not isinstance(part, str):
            raise TypeError(f"UID part {index} must be str, got {type(part).__name__}")
    digest = hashlib.sha256(_SEPARATOR.join(parts).encode("utf-8")).digest()
    uid = "2.25." + str(int.from_bytes(digest[:16], "big"))
    if len(uid) > _UID_MAX_LENGTH:   # cannot happen for 128 bits; kept as a guard
        raise AssertionError(f"derived UID longer than {_UID_MAX_LENGTH} characters")
    return uid


def _check_object_type(object_type: str) -> str:
    if object_type not in OUTPUT_TYPES:
        raise ValueError(
            f"object_type must be one of {OUTPUT_TYPES}, got {object_type!r}"
        )
    return object_type


def _versions_key(model_versions: Iterable[str]) -> str:
    """Order-independent key for the model versions that produced a result."""
    if isinstance(model_versions, str):
        raise TypeError("model_versions must be a sequence of 'name@version' strings, not a str")
    versions = sorted(str(v) for v in model_versions)
    return ",".join(versions)


def result_uid(source_sop_instance_uid: str, model_versions: Sequence[str],
               object_type: str) -> str:
    """SOP Instance UID of the ``object_type`` result for one source image."""
    if not source_sop_instance_uid:
        raise ValueError("source_sop_instance_uid must not be empty")
    return hash_uid("instance", str(source_sop_instance_uid), _versions_key(model_versions),
                    _check_object_type(object_type))


def result_series_uid(study_instance_uid: str, object_type: str,
                      model_versions: Sequence[str]) -> str:
    """Series Instance UID of the ``object_type`` results within one study."""
    if not study_instance_uid:
        raise ValueError("study_instance_uid must not be empty")
    return hash_uid("series", str(study_instance_uid), _versions_key(model_versions),
                    _check_object_type(object_type))


def tracking_uid(source_sop_instance_uid: str, model_versions: Sequence[str],
                 finding_key: str) -> str:
    """Tracking UID of one finding (SR tracking identifier, GSPS tracking UID)."""
    if not source_sop_instance_uid:
        raise ValueError("source_sop_instance_uid must not be empty")
    return hash_uid("finding", str(source_sop_instance_uid), _versions_key(model_versions),
                    str(finding_key))


def device_uid(manufacturer: str, model_name: str, device_serial_number: str) -> str:
    """Device Observer UID of this appliance, stable across restarts and reruns."""
    return hash_uid("device", manufacturer, model_name, device_serial_number)
