"""The results' content date and time: from the analysis time or the source, never the
clock, so that a rerun writes the same bytes."""
from __future__ import annotations

import datetime
import re

from pydicom import Dataset

__all__ = ["content_datetime"]

_EPOCH = datetime.datetime(1970, 1, 1)


def content_datetime(dataset: Dataset,
                     analysis_time: datetime.datetime | None = None) -> datetime.datetime:
    """Content date/time of the results, without reading the clock.

    The analysis time (kept in the journal, so a rerun passes the same value) when given;
    otherwise the source's acquisition, content, series or study date/time; 1970-01-01
    when the source has none, so that a rerun still yields identical bytes.
    """
    if analysis_time is not None:
        if not isinstance(analysis_time, datetime.datetime):
            raise TypeError("analysis_time must be a datetime.datetime or None")
        return analysis_time.replace(tzinfo=None)
    stamp = _parse_datetime(dataset.get("AcquisitionDateTime"))
    if stamp is not None:
        return stamp
    for prefix in ("Acquisition", "Content", "Series", "Study"):
        day = _parse_datetime(dataset.get(f"{prefix}Date"), date_only=True)
        if day is not None:
            clock = _parse_time(dataset.get(f"{prefix}Time")) or datetime.time(0, 0)
            return datetime.datetime.combine(day.date(), clock)
    return _EPOCH


def _parse_datetime(value, date_only: bool = False) -> datetime.datetime | None:
    """A checked DA or DT value (offset ignored) as a datetime, or None."""
    text = str(value or "").strip()
    digits = re.match(r"\d+", text)
    if not digits or (date_only and len(digits.group()) != 8):
        return None
    raw = digits.group()
    parts = [int(raw[0:4]), int(raw[4:6] or 1), int(raw[6:8] or 1)]
    try:
        stamp = datetime.datetime(*parts)
    except ValueError:
        return None
    if len(raw) > 8:
        clock = _parse_time(raw[8:] + text[len(raw):].split("+")[0].split("-")[0])
        if clock is not None:
            stamp = datetime.datetime.combine(stamp.date(), clock)
    return stamp


def _parse_time(value) -> datetime.time | None:
    match = re.fullmatch(r"(\d{2})(\d{2})?(\d{2})?(?:\.(\d{1,6}))?", str(value or "").strip())
    if not match:
        return None
    hours, minutes, seconds, fraction = match.groups()
    try:
        return datetime.time(int(hours), int(minutes or 0), min(int(seconds or 0), 59),
                             int((fraction or "0").ljust(6, "0")))
    except ValueError:
        return None
