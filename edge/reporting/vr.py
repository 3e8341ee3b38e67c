"""Value rules of the DICOM Value Representations we copy from source images (PS3.5 6.2).

``check_values`` takes the decoded values of one element and returns them, repaired where
a repair keeps the meaning (``"2024-05-01"`` as a DA is ``"20240501"``; an over-long DS
is rewritten to 16 characters), or raises ``InvalidValue``. Lengths are counted in bytes
of the encoding the value will be written in, because that is what receivers (and
dciodvfy) check. Messages name the rule only, never the value: they may reach a log.
"""
from __future__ import annotations

import datetime
import math
import re
from collections.abc import Callable, Sequence

from pydicom.valuerep import format_number_as_ds

__all__ = ["InvalidValue", "TEXT_VRS", "CHARSET_VRS", "SINGLE_VALUE_VRS", "BINARY_VRS",
           "check_multiplicity", "check_values", "split_values"]


class InvalidValue(ValueError):
    """A value breaks its VR's rules (the message names the rule, not the value)."""


# VRs whose values are character strings in the file.
TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH",
                      "ST", "TM", "UC", "UI", "UR", "UT"})
# Of those, the ones whose bytes depend on Specific Character Set (the rest are ASCII).
CHARSET_VRS = frozenset({"LO", "LT", "PN", "SH", "ST", "UC", "UT"})
# Never multi-valued: a backslash is an ordinary character in them.
SINGLE_VALUE_VRS = frozenset({"LT", "ST", "UR", "UT"})
BINARY_VRS = frozenset({"US", "SS", "UL", "SL", "FL", "FD", "OW", "OB", "OF", "OD", "OL",
                        "OV", "SV", "UV", "AT"})

# Maximum length of one value in bytes (PN: per component group).
_MAX_BYTES = {"AE": 16, "AS": 4, "CS": 16, "DA": 8, "DS": 16, "DT": 26, "IS": 12, "LO": 64,
              "LT": 10240, "PN": 64, "SH": 16, "ST": 1024, "TM": 14, "UI": 64,
              "UT": 2 ** 32 - 2, "UC": 2 ** 32 - 2, "UR": 2 ** 32 - 2}
# Control characters allowed in the text VRs (PS3.5 6.1.3); none elsewhere.
_TEXT_CONTROLS = frozenset("\t\n\f\r")
_FREE_TEXT_VRS = frozenset({"LT", "ST", "UT"})

_AS = re.compile(r"\d{3}[DWMY]")
_CS = re.compile(r"[A-Z0-9 _]*")
_DA = re.compile(r"(\d{4})(\d{2})(\d{2})")
_DA_SEPARATED = re.compile(r"(\d{4})[.\-/](\d{2})[.\-/](\d{2})")
_TM = re.compile(r"(\d{2})(?:(\d{2})(?:(\d{2})(?:\.(\d{1,6}))?)?)?")
_TM_FRACTION_TOO_LONG = re.compile(r"(\d{6})\.(\d{7,})")
_TM_COLONS = re.compile(r"(\d{2}):(\d{2})(?::(\d{2})(\.\d+)?)?")
_DT = re.compile(r"(\d{4})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})"
                 r"(?:(\d{2})(?:\.(\d{1,6}))?)?)?)?)?)?([+-]\d{4})?")
_DS = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_IS = re.compile(r"[+-]?\d+")
_UI = re.compile(r"(0|[1-9]\d*)(\.(0|[1-9]\d*))*")

_INT_RANGES = {"US": (0, 2 ** 16 - 1), "SS": (-2 ** 15, 2 ** 15 - 1),
               "UL": (0, 2 ** 32 - 1), "SL": (-2 ** 31, 2 ** 31 - 1)}


def split_values(vr: str, text: str) -> list[str]:
    """One element's decoded text as its values: split at backslashes, padding removed.

    Trailing spaces are insignificant in every text VR (PS3.5 6.2), leading ones in all
    but the free-text VRs; UI values may be padded with NUL.
    """
    parts = [text] if vr in SINGLE_VALUE_VRS else text.split("\\")
    if vr == "UI":
        parts = [p.rstrip("\0 ") for p in parts]
    elif vr in _FREE_TEXT_VRS or vr == "PN":
        parts = [p.rstrip(" \0") for p in parts]
    else:
        parts = [p.strip(" \0") for p in parts]
    return [] if parts == [""] else parts


def check_multiplicity(vm: str, count: int) -> None:
    """Raise ``InvalidValue`` unless ``count`` values satisfy a dictionary VM such as
    ``"1"``, ``"2"``, ``"1-3"``, ``"1-n"`` or ``"2-2n"`` (zero values: empty, allowed)."""
    if count == 0:
        return
    low, _, high = vm.partition("-")
    minimum = int(low)
    if not high:
        ok = count == minimum
    elif high.endswith("n"):
        step = int(high[:-1] or 1)
        ok = count >= minimum and count % step == 0
    else:
        ok = minimum <= count <= int(high)
    if not ok:
        raise InvalidValue(f"{count} values where the value multiplicity is {vm}")


def check_values(vr: str, values: Sequence, encode: Callable[[str], bytes],
                 ) -> tuple[list, bool]:
    """``values`` checked against ``vr``'s rules: ``(values, repaired)``.

    ``encode`` writes a text value in the output character set (lengths are counted in
    its bytes). Raises ``InvalidValue`` when a value breaks a rule that no repair fixes.
    """
    if vr in BINARY_VRS:
        return [_check_binary(vr, v) for v in values], False
    if vr not in TEXT_VRS:
        raise InvalidValue(f"VR {vr} is not one that is copied")
    out, repaired = [], False
    for value in values:
        if not isinstance(value, str):
            raise InvalidValue(f"a {vr} value that is not text")
        fixed = _REPAIRS.get(vr, _no_repair)(value)
        repaired |= fixed != value
        _check_characters(vr, fixed)
        _FORMATS.get(vr, _no_format)(fixed)
        _check_length(vr, fixed, encode)
        out.append(fixed)
    return out, repaired


def _check_binary(vr: str, value):
    if vr in _INT_RANGES:
        low, high = _INT_RANGES[vr]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise InvalidValue(f"a {vr} value outside {low}..{high}")
    elif vr in ("FL", "FD") and not (isinstance(value, (int, float)) and math.isfinite(value)):
        raise InvalidValue(f"a {vr} value that is not a finite number")
    return value


def _check_characters(vr: str, value: str) -> None:
    allowed = _TEXT_CONTROLS if vr in _FREE_TEXT_VRS else frozenset()
    for char in value:
        code = ord(char)
        if (code < 0x20 or 0x7F <= code <= 0x9F) and char not in allowed:
            raise InvalidValue(f"a control character in a {vr} value")
        if char == "\ufffd":
            raise InvalidValue(f"a {vr} value that did not decode")
    if vr not in TEXT_VRS - CHARSET_VRS:
        return
    if not value.isascii():
        raise InvalidValue(f"a non-ASCII character in a {vr} value")


def _check_length(vr: str, value: str, encode: Callable[[str], bytes]) -> None:
    limit = _MAX_BYTES.get(vr)
    if limit is None:
        return
    if vr == "PN":
        groups = value.split("=")
        if len(groups) > 3:
            raise InvalidValue("a PN value with more than 3 component groups")
        for group in groups:
            if len(group.split("^")) > 5:
                raise InvalidValue("a PN component group with more than 5 components")
            if len(encode(group)) > limit:
                raise InvalidValue(f"a PN component group longer than {limit} bytes")
        return
    size = len(encode(value)) if vr in CHARSET_VRS else len(value)
    if size > limit:
        raise InvalidValue(f"a {vr} value longer than {limit} bytes")


def _no_repair(value: str) -> str:
    return value


def _no_format(value: str) -> None:
    return None


def _repair_cs(value: str) -> str:
    """Code strings are upper case; ``"f"`` means ``"F"``."""
    upper = value.upper()
    return upper if _CS.fullmatch(upper) else value


def _repair_da(value: str) -> str:
    """``YYYY.MM.DD`` (ACR-NEMA) and ``YYYY-MM-DD`` written as ``YYYYMMDD``."""
    match = _DA_SEPARATED.fullmatch(value)
    return "".join(match.groups()) if match else value


def _repair_tm(value: str) -> str:
    """``HH:MM:SS`` (ACR-NEMA) without colons; fractions cut to 6 digits."""
    match = _TM_COLONS.fullmatch(value)
    if match:
        hours, minutes, seconds, fraction = match.groups()
        value = hours + minutes + (seconds or "") + (fraction or "")
    match = _TM_FRACTION_TOO_LONG.fullmatch(value)
    if match:
        value = f"{match.group(1)}.{match.group(2)[:6]}"
    return value


def _repair_ds(value: str) -> str:
    """An over-long but valid decimal rewritten in at most 16 characters."""
    if len(value) <= 16 or not _DS.fullmatch(value):
        return value
    number = float(value)
    return format_number_as_ds(number) if math.isfinite(number) else value


def _check_as(value: str) -> None:
    if not _AS.fullmatch(value):
        raise InvalidValue("an AS value that is not nnnD/W/M/Y")


def _check_cs(value: str) -> None:
    if not _CS.fullmatch(value):
        raise InvalidValue("a CS value with characters other than A-Z, 0-9, space, _")


def _check_da(value: str) -> None:
    match = _DA.fullmatch(value)
    if not match:
        raise InvalidValue("a DA value that is not YYYYMMDD")
    _calendar_date(*(int(v) for v in match.groups()))


def _calendar_date(year: int, month: int, day: int) -> None:
    try:
        datetime.date(year, month, day)
    except ValueError:
        raise InvalidValue("a date that is not in the calendar") from None


def _check_tm(value: str) -> None:
    match = _TM.fullmatch(value)
    if not match:
        raise InvalidValue("a TM value that is not HH[MM[SS[.F]]]")
    hours, minutes, seconds, _ = match.groups()
    _clock(hours, minutes, seconds)


def _clock(hours: str | None, minutes: str | None, seconds: str | None) -> None:
    if (hours and int(hours) > 23) or (minutes and int(minutes) > 59) or \
            (seconds and int(seconds) > 60):
        raise InvalidValue("a time of day out of range")


def _check_dt(value: str) -> None:
    match = _DT.fullmatch(value)
    if not match:
        raise InvalidValue("a DT value that is not YYYY[MM[DD[HH[MM[SS[.F]]]]]][&ZZXX]")
    year, month, day, hours, minutes, seconds, _, offset = match.groups()
    _calendar_date(int(year), int(month or 1), int(day or 1))
    _clock(hours, minutes, seconds)
    if offset:
        minutes_offset = int(offset[3:])
        if not -1200 <= int(offset) <= 1400 or minutes_offset > 59:
            raise InvalidValue("a DT value with an impossible UTC offset")


def _check_ds(value: str) -> None:
    if not _DS.fullmatch(value) or not math.isfinite(float(value)):
        raise InvalidValue("a DS value that is not a finite decimal number")


def _check_is(value: str) -> None:
    if not _IS.fullmatch(value) or not -2 ** 31 <= int(value) <= 2 ** 31 - 1:
        raise InvalidValue("an IS value that is not a 32-bit integer")


def _check_ui(value: str) -> None:
    if not _UI.fullmatch(value):
        raise InvalidValue("a UI value that is not dotted decimal without leading zeros")


def _check_ae(value: str) -> None:
    if not value.strip():
        raise InvalidValue("an AE value of only spaces")


_REPAIRS: dict[str, Callable[[str], str]] = {
    "CS": _repair_cs, "DA": _repair_da, "TM": _repair_tm, "DS": _repair_ds,
}
_FORMATS: dict[str, Callable[[str], None]] = {
    "AE": _check_ae, "AS": _check_as, "CS": _check_cs, "DA": _check_da, "DS": _check_ds,
    "DT": _check_dt, "IS": _check_is, "TM": _check_tm, "UI": _check_ui,
}
