"""Specific Character Set: what a source's text bytes mean, and what a result declares.

Text is decoded strictly here (pydicom's own decoding replaces undecodable bytes with
U+FFFD and carries on, which would pass mojibake on to the PACS). A source whose
Specific Character Set is unknown or malformed is read as ISO_IR 192 where its bytes are
valid UTF-8 (the usual cause: a modality that writes UTF-8 and declares it wrongly), and
so is 8-bit text where no character set is declared; values that decode neither way are
left out by the caller.

A result declares the source's character set when it is one that highdicom writes and
dciodvfy checks (``_KEPT``) and it can write every text of the result; otherwise the
same text is written as ISO_IR 192, or with no Specific Character Set at all when every
text is ASCII.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from pydicom.charset import CODES_TO_ENCODINGS, encode_string, handled_encodings, python_encoding

from .vr import CHARSET_VRS

__all__ = ["UTF8", "SourceCharset", "encoder", "output_terms", "read_character_set"]

UTF8 = "ISO_IR 192"
_ESC = 0x1B
_DEFAULT_TERMS = frozenset({"", "ISO_IR 6", "ISO 2022 IR 6"})
# Defined terms (PS3.3 C.12.1.1.2) without and with code extensions.
_SINGLE_TERMS = frozenset({"ISO_IR 13", "ISO_IR 100", "ISO_IR 101", "ISO_IR 109",
                           "ISO_IR 110", "ISO_IR 126", "ISO_IR 127", "ISO_IR 138",
                           "ISO_IR 144", "ISO_IR 148", "ISO_IR 166", "ISO_IR 192",
                           "GB18030", "GBK"})
_STANDALONE_TERMS = frozenset({"ISO_IR 192", "GB18030", "GBK"})
_EXTENSION_TERMS = frozenset(t for t in python_encoding if t.startswith("ISO 2022 IR "))
_MULTI_BYTE_EXTENSIONS = frozenset({"ISO 2022 IR 87", "ISO 2022 IR 159", "ISO 2022 IR 149",
                                    "ISO 2022 IR 58"})
# What a result may declare as the source did: highdicom 0.28 accepts these, dciodvfy
# checks them correctly (it rejects valid GBK and lone ISO_IR 13 text), and pydicom
# writes them with the escape sequences DICOM expects (not so for ISO 2022 IR 58).
_KEPT = frozenset({"ISO_IR 100", "ISO_IR 101", "ISO_IR 109", "ISO_IR 110", "ISO_IR 126",
                   "ISO_IR 127", "ISO_IR 138", "ISO_IR 144", "ISO_IR 148", "ISO_IR 166",
                   "ISO_IR 192", "GB18030", "ISO 2022 IR 6", "ISO 2022 IR 13",
                   "ISO 2022 IR 87", "ISO 2022 IR 100", "ISO 2022 IR 101", "ISO 2022 IR 109",
                   "ISO 2022 IR 110", "ISO 2022 IR 126", "ISO 2022 IR 127", "ISO 2022 IR 138",
                   "ISO 2022 IR 144", "ISO 2022 IR 148", "ISO 2022 IR 159",
                   "ISO 2022 IR 166"})
# Spellings seen from modalities for the defined terms ("ISO-IR 100", "ISO_IR100").
_MISSPELLED = re.compile(r"ISO[ _-]?IR[ _-]?(\d+)")
_MISSPELLED_2022 = re.compile(r"ISO[ _-]?2022[ _-]?IR[ _-]?(\d+)")
_FRAGMENTS = re.compile(rb"(^[^\x1b]+|[\x1b][^\x1b]*)")


def _codec(term: str) -> str:
    """Python codec of a defined term; the default repertoire is ASCII, not Latin-1."""
    return "ascii" if term in _DEFAULT_TERMS else python_encoding[term]


@dataclass(frozen=True)
class SourceCharset:
    """How to read a source's text: its terms, and whether they were usable as sent."""

    terms: tuple[str, ...]      # defined terms after repair; () = default repertoire
    valid: bool                 # False: unknown/malformed; text is read as UTF-8
    repaired: bool              # the declared value was misspelled but recognisable
    declared: bool              # the source had a (non-empty) Specific Character Set

    @property
    def codecs(self) -> list[str]:
        if not self.valid:
            return ["utf_8"]
        return [_codec(t) for t in (self.terms or ("",))]

    def decode(self, raw: bytes, vr: str) -> str | None:
        """``raw`` as text, or None when its bytes are not valid in this character set."""
        if vr not in CHARSET_VRS:
            codecs = ["ascii"]
        else:
            codecs = self.codecs
        try:
            if _ESC in raw and len(codecs) > 1:
                return "".join(_decode_fragment(f, codecs, vr)
                               for f in _FRAGMENTS.findall(raw))
        except (UnicodeError, LookupError):
            return None
        for codec in (codecs[:1] + self._unannounced() if vr in CHARSET_VRS else codecs):
            try:
                return raw.decode(codec)
            except (UnicodeError, LookupError):
                continue
        return None

    def _unannounced(self) -> list[str]:
        """Readings of 8-bit text that the declared terms do not announce: the declared
        single-byte sets used without their escape sequence (as pydicom writes them),
        and UTF-8 where no character set is declared at all (modalities do both)."""
        if not self.valid or self.codecs[0] != "ascii":
            return []
        if not self.terms:
            return ["utf_8"]
        return [c for t, c in zip(self.terms[1:], self.codecs[1:])
                if t not in _MULTI_BYTE_EXTENSIONS]


def _decode_fragment(fragment: bytes, codecs: Sequence[str], vr: str) -> str:
    """One ISO 2022 fragment (escape sequence + text), decoded strictly (PS3.5 6.1.2.5)."""
    if fragment[0] != _ESC:
        return fragment.decode(codecs[0])
    length = 4 if fragment.startswith((b"\x1b$(", b"\x1b$)")) else 3
    codec = CODES_TO_ENCODINGS.get(fragment[:length])
    if codec == "iso8859":           # ESC ( B: back to ASCII
        codec = "ascii"
    if codec is None or (codec not in codecs and codec != "ascii"):
        raise UnicodeError("escape sequence of a character set that is not declared")
    if codec in handled_encodings:
        return fragment.decode(codec)
    body = fragment[length:]
    # A delimiter returns to the first character set (PS3.5 6.1.2.5.3).
    delimiters = b"^=\\" if vr == "PN" else b"\\\t\n\f\r"
    cut = next((i for i, byte in enumerate(body) if byte in delimiters), len(body))
    return body[:cut].decode(codec) + body[cut:].decode(codecs[0])


def read_character_set(value: str | Sequence[str] | None) -> SourceCharset:
    """The source's Specific Character Set value(s), checked against PS3.3 C.12.1.1.2."""
    if value is None:
        values: list[str] = []
    elif isinstance(value, str):
        values = value.split("\\")
    else:
        values = [str(v) for v in value]
    values = [v.strip() for v in values]
    if not any(values):
        return SourceCharset((), valid=True, repaired=False, declared=False)
    terms = [_respell(v) for v in values]
    valid = _valid_terms(terms)
    if valid and terms in (["ISO_IR 6"], ["ISO 2022 IR 6"]):   # the default repertoire
        return SourceCharset((), valid=True, repaired=True, declared=True)
    return SourceCharset(tuple(terms) if valid else (), valid=valid,
                         repaired=valid and terms != values, declared=True)


def _respell(term: str) -> str:
    if term in python_encoding:
        return term
    match = _MISSPELLED_2022.fullmatch(term.upper())
    if match and f"ISO 2022 IR {match.group(1)}" in python_encoding:
        return f"ISO 2022 IR {match.group(1)}"
    match = _MISSPELLED.fullmatch(term.upper())
    if match and f"ISO_IR {match.group(1)}" in python_encoding:
        return f"ISO_IR {match.group(1)}"
    return term


def _valid_terms(terms: list[str]) -> bool:
    if len(terms) == 1:
        return terms[0] in _SINGLE_TERMS | {"ISO_IR 6"} or (
            terms[0] in _EXTENSION_TERMS and terms[0] not in _MULTI_BYTE_EXTENSIONS)
    if any(t in _STANDALONE_TERMS for t in terms):
        return False
    first, rest = terms[0], terms[1:]
    return (first == "" or (first in _EXTENSION_TERMS and first not in _MULTI_BYTE_EXTENSIONS)) \
        and all(t in _EXTENSION_TERMS for t in rest)


def output_terms(charset: SourceCharset, texts: Iterable[str]) -> tuple[str, ...]:
    """Specific Character Set of a result holding ``texts``; () means none is written.

    The source's own terms when they are valid, kept (``_KEPT``) and write every text
    back to the same text; otherwise ISO_IR 192 (any text), or () when all is ASCII.
    """
    texts = list(texts)
    if charset.valid and charset.terms:
        terms = _equivalent_kept(charset.terms)
        if terms and all(_round_trips(t, terms) for t in texts):
            return terms
    return () if all(t.isascii() for t in texts) else (UTF8,)


def _equivalent_kept(terms: tuple[str, ...]) -> tuple[str, ...] | None:
    """The same character sets in a form we keep, or None (then UTF-8 is written)."""
    if len(terms) == 1 and terms[0] in _EXTENSION_TERMS:     # no escapes needed alone
        terms = (terms[0].replace("ISO 2022 IR ", "ISO_IR "),)
    if terms[0] == "":
        terms = ("ISO 2022 IR 6", *terms[1:])
    return terms if all(t in _KEPT for t in terms) else None


def _round_trips(text: str, terms: Sequence[str]) -> bool:
    """True when ``text`` written in ``terms`` reads back as the same text."""
    codecs = [_codec(t) for t in terms]
    for char in text:            # checked first: pydicom would warn and write "?"
        if not any(_encodes(char, codec) for codec in codecs):
            return False
    if len(codecs) == 1 or text.isascii():
        return True
    written = encode_string(text, [python_encoding[t] for t in terms])
    return SourceCharset(tuple(terms), True, False, True).decode(written, "LO") == text


def _encodes(char: str, codec: str) -> bool:
    try:
        char.encode(codec)
    except (UnicodeError, LookupError):
        return False
    return True


def encoder(terms: Sequence[str]) -> Callable[[str], bytes]:
    """A function that writes a text in ``terms`` (for byte-length checks)."""
    if not terms:
        return lambda text: text.encode("ascii", "replace")
    if len(terms) == 1:
        codec = _codec(terms[0])
        return lambda text: text.encode(codec, "replace")
    codecs = [python_encoding[t] for t in terms]      # pydicom's names, for its encoder
    return lambda text: encode_string(text, codecs)
