"""Reading source elements as text or values, strictly and without changing the source.

pydicom converts an element in place the first time it is read, decoding text with the
declared character set and replacing what does not decode. Here text is decoded from
the raw bytes by ``charset.SourceCharset`` instead, and elements are read through a view
of the dataset (``view``), so the source stays as it was received.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from pydicom import Dataset
from pydicom.dataelem import RawDataElement
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName

from . import vr as vrs
from .charset import SourceCharset

__all__ = ["ElementRead", "read_element", "reads_digest", "text_of", "view"]

_SCS_TAG = 0x00080005


@dataclass
class ElementRead:
    """One source element as read: decoded text, binary values, or sequence items."""

    vr: str
    text: str | None = None          # text VRs; None: the bytes did not decode
    values: list | None = None       # binary VRs
    items: list[dict[str, ElementRead]] | None = None
    unreadable: bool = False
    raw: bytes | None = None         # the bytes of text that did not decode

    def canonical(self) -> object:
        """A JSON-able form of what was read, for the elements digest."""
        if self.items is not None:
            return [{k: r.canonical() for k, r in item.items()} for item in self.items]
        if self.values is not None:
            return [hashlib.sha256(v).hexdigest() if isinstance(v, bytes) else repr(v)
                    for v in self.values]
        if self.text is not None:
            return vrs.split_values(self.vr, self.text)
        return {"raw": (self.raw or b"").hex(), "unreadable": self.unreadable}

    def texts(self) -> list[str]:
        if self.vr in vrs.CHARSET_VRS and self.text:
            return [self.text]
        return [t for item in self.items or () for r in item.values() for t in r.texts()]


def read_element(dataset: Dataset, keyword: str, charset: SourceCharset,
                 items: dict[str, dict[str, bool]]) -> ElementRead:
    """``keyword`` of ``dataset`` (a ``view``) as read; ``items`` names the keywords read
    inside each sequence's items. Never raises: what cannot be parsed is unreadable."""
    tag = tag_for_keyword(keyword)
    vr = _vr_for(tag, dataset.get_item(tag))
    try:
        if vr in vrs.TEXT_VRS:
            element = dataset.get_item(tag)
            text = text_of(element, charset, vr)
            raw = element.value if text is None and isinstance(element.value, bytes) else None
            return ElementRead(vr, text=text, raw=raw)
        if vr == "SQ":
            found = []
            for item in dataset[tag].value:
                item = view(item)
                wanted = items.get(keyword, {})
                found.append({k: read_element(item, k, charset, items) for k in wanted
                              if tag_for_keyword(k) in item})
            return ElementRead(vr, items=found)
        value = dataset[tag].value
        if value is None:
            values = []
        elif isinstance(value, (bytes, bytearray)):
            values = [bytes(value)]
        elif isinstance(value, (list, tuple, MultiValue)):
            values = list(value)
        else:
            values = [value]
        return ElementRead(vr, values=values)
    except Exception:   # noqa: BLE001 - an element pydicom cannot parse is left out
        return ElementRead(vr, unreadable=True)


def view(dataset: Dataset) -> Dataset:
    """A new dataset sharing ``dataset``'s (raw or converted) elements.

    Without Specific Character Set: text is decoded here (``charset.py``), and pydicom
    would otherwise warn about a bad one, value included, while converting sequences.
    """
    return Dataset({tag: dataset.get_item(tag) for tag in dataset.keys() if tag != _SCS_TAG})


def reads_digest(charset: SourceCharset, reads: dict[str, ElementRead]) -> str:
    """SHA-256 of what was read: the same whether pydicom had converted elements or not."""
    text = json.dumps({"charset": list(charset.terms), "valid": charset.valid,
                       "elements": {k: r.canonical() for k, r in reads.items()}},
                      sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _vr_for(tag: int, element) -> str:
    """The dictionary VR; for "US or SS"-style VRs, the one the element was read with."""
    vr = dictionary_VR(tag)
    if " or " in vr:
        options = vr.split(" or ")
        return element.VR if element.VR in options else options[0]
    return vr


def text_of(element, charset: SourceCharset | None, vr: str) -> str | None:
    """An element's value as text, decoded strictly from the bytes when still raw."""
    value = element.value
    if value is None:
        return ""
    if isinstance(value, (bytes, bytearray)):
        if charset is None:
            try:
                return bytes(value).decode("ascii")
            except UnicodeError:
                return None
        return charset.decode(bytes(value), vr)
    if isinstance(element, RawDataElement):
        return None
    if isinstance(value, (list, tuple, MultiValue)):
        return "\\".join(_one_text(v) for v in value)
    return _one_text(value)


def _one_text(value) -> str:
    if isinstance(value, PersonName):
        return str(value)
    original = getattr(value, "original_string", None)
    return str(original) if original is not None else str(value)


