"""Deterministic UIDs for the result objects: one UID, one content.

A crash between analysis and delivery makes the appliance analyse the image again; the
rerun must give the same objects under the same UIDs, so that the PACS keeps one copy.
Different content, on the other hand, must never reuse a UID: a re-sent image with other
pixels, or a new analysis after a threshold change, gives new objects. A result's SOP
Instance UID is therefore derived from a digest of everything that determines its
content (``content_digest``: the source's UID and bytes, the reported findings, the
equipment, the object type, the content time and ``REPORT_FORMAT_VERSION``). Series UIDs
stay stable per study, object type and model versions, so reruns land in one series.

UIDs use the ``2.25.`` root (PS3.5 B.2: a UUID written as one decimal integer): the first
128 bits of a SHA-256 digest, which keeps them at most 44 characters long.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Sequence

logger = logging.getLogger(__name__)

OUTPUT_TYPES: tuple[str, ...] = ("sr", "gsps", "sc")

# Bump whenever the layout of any result object changes (elements added, moved or
# encoded differently), so that objects of the new layout never reuse an old UID.
REPORT_FORMAT_VERSION = 3

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


def content_digest(content: object) -> str:
    """SHA-256 (hex) of ``content`` as canonical JSON: same content, same digest.

    ``content`` is built from dicts, lists, strings and numbers; keys are sorted, floats
    written exactly (``repr``), other objects by ``repr``.
    """
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      default=repr)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


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


def _check_digest(name: str, digest: str) -> str:
    if not isinstance(digest, str) or not digest:
        raise TypeError(f"{name} must be a non-empty str (see content_digest), "
                        f"got {type(digest).__name__}")
    return digest


def result_uid(source_sop_instance_uid: str, content_digest: str, object_type: str) -> str:
    """SOP Instance UID of the ``object_type`` result with content ``content_digest``."""
    if not source_sop_instance_uid:
        raise ValueError("source_sop_instance_uid must not be empty")
    return hash_uid("instance", str(REPORT_FORMAT_VERSION), str(source_sop_instance_uid),
                    _check_digest("content_digest", content_digest),
                    _check_object_type(object_type))


def result_series_uid(study_instance_uid: str, object_type: str,
                      model_versions: Sequence[str]) -> str:
    """Series Instance UID of the ``object_type`` results within one study."""
    if not study_instance_uid:
        raise ValueError("study_instance_uid must not be empty")
    return hash_uid("series", str(study_instance_uid), _versions_key(model_versions),
                    _check_object_type(object_type))


def tracking_uid(source_sop_instance_uid: str, finding_digest: str, finding_key: str) -> str:
    """Tracking UID of one finding (SR tracking identifier, GSPS tracking UID).

    ``finding_digest`` covers the finding itself (its values and model), so a changed
    finding gets a new tracking UID; the SR and the GSPS of one analysis share it.
    """
    if not source_sop_instance_uid:
        raise ValueError("source_sop_instance_uid must not be empty")
    return hash_uid("finding", str(REPORT_FORMAT_VERSION), str(source_sop_instance_uid),
                    _check_digest("finding_digest", finding_digest), str(finding_key))


def device_uid(manufacturer: str, model_name: str, device_serial_number: str) -> str:
    """Device Observer UID of this appliance, stable across restarts and reruns."""
    return hash_uid("device", manufacturer, model_name, device_serial_number)
