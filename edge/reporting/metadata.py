"""The source image's metadata, checked before any result object is built from it.

Modalities send damaged metadata: impossible dates, unknown character sets, a Window
Width of 0, a backslash inside a patient ID. One such value must not cost the result.
``read_source`` checks every attribute the builders copy or read against its VR, value
multiplicity and value rules (``vr.py``), decodes text strictly (``charset.py``), and
keeps what is valid, repairs what can be repaired (``"2024-05-01"`` is a date), empties
what is type 2 in the results and leaves out the rest. The builders then read only the
checked ``SourceMetadata.dataset``, never the source itself.

What was dropped or repaired is logged by keyword only, never by value: the values are
patient data. Only a missing reference (SOP Class/Instance, Study and Series Instance
UIDs) or image geometry (Rows, Columns) still refuses the image.
"""
from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from pydicom import Dataset
from pydicom.dataelem import DataElement
from pydicom.datadict import tag_for_keyword
from pydicom.multival import MultiValue

from . import vr as vrs
from .attributes import (CHECKED_KEYWORDS, PATIENT_STUDY_KEYWORDS, REFERENCE_KEYWORDS,
                         SEQUENCE_ITEMS, TYPE2_KEYWORDS, AttributeChecker)
from .charset import encoder, output_terms, read_character_set
from .dates import content_datetime
from .elements import read_element, reads_digest, text_of, view

logger = logging.getLogger(__name__)

__all__ = ["CHECKED_KEYWORDS", "PATIENT_STUDY_KEYWORDS", "REFERENCE_KEYWORDS",
           "TYPE2_KEYWORDS", "SourceMetadata", "content_datetime", "instance_number",
           "read_source"]

_UID = re.compile(r"[0-9.]{1,64}")


@dataclass(frozen=True)
class SourceMetadata:
    """The checked metadata of one source image; builders read only this.

    ``dataset`` holds the checked elements with decoded values, the Specific Character
    Set the results declare (``character_set``), and no pixel data.
    """

    dataset: Dataset
    character_set: tuple[str, ...]
    dropped: tuple[str, ...] = ()       # left out (type 3) or emptied (type 2)
    repaired: tuple[str, ...] = ()
    minimal: bool = False               # built from the last-resort stand-in
    source: Dataset | None = field(default=None, repr=False, compare=False)
    reads_digest: str = ""              # digest of the elements as read (see read_source)

    @property
    def sop_instance_uid(self) -> str:
        return str(self.dataset.SOPInstanceUID)

    @property
    def rows(self) -> int:
        return int(self.dataset.Rows)

    @property
    def columns(self) -> int:
        return int(self.dataset.Columns)

    def elements_digest(self) -> str:
        """SHA-256 of the source elements read here (as decoded, so the same whether
        pydicom had converted them or not) and of the pixel data as received."""
        if self.source is None:
            raise ValueError("no source dataset to digest")
        sha = hashlib.sha256(self.reads_digest.encode())
        tag = tag_for_keyword("PixelData")
        if tag in self.source:
            value = self.source.get_item(tag).value
            if isinstance(value, (bytes, bytearray)):
                sha.update(value)
        return sha.hexdigest()

    def minimal_stand_in(self) -> SourceMetadata:
        """The last resort: references, geometry, patient ID and name, nothing else."""
        keep = (*REFERENCE_KEYWORDS, "Rows", "Columns", "SamplesPerPixel",
                "PhotometricInterpretation", "Modality", "PatientID", "PatientName")
        dataset = Dataset()
        texts = []
        for keyword in keep:
            if keyword in self.dataset:
                element = self.dataset[keyword]
                dataset.add(DataElement(element.tag, element.VR, element.value))
                if element.VR in vrs.CHARSET_VRS:
                    texts.append(str(element.value))
        terms = () if all(t.isascii() for t in texts) else ("ISO_IR 192",)
        if terms:
            dataset.SpecificCharacterSet = list(terms) if len(terms) > 1 else terms[0]
        if hasattr(self.dataset, "file_meta"):
            dataset.file_meta = self.dataset.file_meta
        return replace(self, dataset=dataset, character_set=terms, minimal=True)


def read_source(source: Dataset, extra_texts: Iterable[str] = ()) -> SourceMetadata:
    """Check the source's metadata (see the module docstring); log what was dropped.

    ``extra_texts`` are the other texts the results will hold (equipment names), so that
    the declared character set can write them too. Raises ``ValueError`` only when a
    reference UID or the image geometry is missing or unusable.
    """
    if not isinstance(source, Dataset):
        raise TypeError(f"source must be a pydicom Dataset, got {type(source).__name__}")
    dataset = Dataset()
    for keyword, uid in _references(source).items():
        dataset[keyword] = DataElement(tag_for_keyword(keyword), "UI", uid)
    charset = read_character_set(_character_set_value(source))
    source_view = view(source)   # pydicom converts what it reads in place: not in the source
    reads = {k: read_element(source_view, k, charset, SEQUENCE_ITEMS)
             for k in CHECKED_KEYWORDS
             if k not in REFERENCE_KEYWORDS and tag_for_keyword(k) in source_view}
    texts = [t for r in reads.values() for t in r.texts()]
    terms = output_terms(charset, [*texts, *extra_texts])
    checker = AttributeChecker(encoder(terms))
    for keyword, read in reads.items():
        element = checker.element(keyword, read)
        if element is not None:
            dataset.add(element)
    checker.check_window(dataset)
    checker.check_rescale(dataset)
    for keyword in ("Rows", "Columns"):
        if keyword not in dataset:
            raise ValueError(f"source {keyword} is missing or not a positive integer; "
                             "cannot reference the image")
    if terms:
        dataset.SpecificCharacterSet = list(terms) if len(terms) > 1 else terms[0]
    if hasattr(source, "file_meta"):
        dataset.file_meta = source.file_meta
    repaired = set(checker.repaired)
    if charset.declared and (not charset.valid or charset.repaired):
        (repaired if terms else checker.dropped).add("SpecificCharacterSet")
    elif not charset.declared and not all(t.isascii() for t in texts):
        repaired.add("SpecificCharacterSet")     # undeclared 8-bit text, read as UTF-8
    meta = SourceMetadata(dataset=dataset, character_set=terms,
                          dropped=tuple(sorted(checker.dropped)),
                          repaired=tuple(sorted(repaired - checker.dropped)), source=source,
                          reads_digest=reads_digest(charset, reads))
    if meta.dropped or meta.repaired:
        # Keywords only: the values are patient data.
        logger.warning("source %s: metadata left out or emptied: %s; repaired: %s",
                       meta.sop_instance_uid, ", ".join(meta.dropped) or "none",
                       ", ".join(meta.repaired) or "none")
    return meta


def _references(source: Dataset) -> dict[str, str]:
    """The UIDs that identify the source, as sent: results must reference exactly these,
    so they are only checked to be UIDs at all (leading zeros and the like are kept)."""
    uids = {}
    for keyword in REFERENCE_KEYWORDS:
        tag = tag_for_keyword(keyword)
        text = text_of(source.get_item(tag), None, "UI") if tag in source else None
        values = vrs.split_values("UI", text or "")
        if len(values) != 1 or not _UID.fullmatch(values[0]):
            raise ValueError(f"source has no usable {keyword}; cannot reference the image")
        uids[keyword] = values[0]
    return uids


def _character_set_value(source: Dataset):
    tag = tag_for_keyword("SpecificCharacterSet")
    if tag not in source:
        return None
    element = source.get_item(tag)
    value = element.value
    if isinstance(value, bytes):
        return value.decode("ascii", "replace")
    return list(value) if isinstance(value, MultiValue) else value


def instance_number(dataset: Dataset) -> int:
    """The result's Instance Number: the source's (checked), or 1 when it has none."""
    number = dataset.get("InstanceNumber")
    try:
        return max(int(number), 1) if number not in (None, "") else 1
    except (TypeError, ValueError):
        return 1
