"""Images that must not stop the appliance: corrupt pixel data that makes codecs panic,
truncated streams, headers that ask for gigabytes, and damaged metadata."""
from __future__ import annotations

import struct
from pathlib import Path

from pydicom.encaps import encapsulate, get_frame
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

from conftest import make_dx


def panicking_rle(path: Path, *, side: int = 1024, seed: int = 0):
    """RLE Lossless whose first segment decodes to two bytes more than the image holds:
    pylibjpeg-rle raises a Rust panic (``pyo3_runtime.PanicException``, a BaseException)."""
    ds = make_dx(rows=side, cols=side, seed=seed)

    def segment(nbytes: int) -> bytes:
        out = bytearray()
        while nbytes > 0:
            k = min(128, nbytes)
            out += bytes([257 - k, 0x10])   # replicate run of k bytes
            nbytes -= k
        return bytes(out)

    n = side * side
    first, second = segment(n + 2), segment(n)
    header = struct.pack("<16I", 2, 64, 64 + len(first), *([0] * 13))
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.PixelData = encapsulate([header + first + second])
    ds.save_as(path, enforce_file_format=True)
    return ds


def truncated_j2k(path: Path, *, side: int = 1024, seed: int = 0):
    """JPEG 2000 whose codestream was cut in half (no end marker)."""
    ds = make_dx(rows=side, cols=side, seed=seed)
    ds.compress(JPEG2000Lossless)
    frame = get_frame(ds.PixelData, 0)
    ds.PixelData = encapsulate([frame[: len(frame) // 2]])
    ds.save_as(path, enforce_file_format=True)
    return ds


def huge_jpegls(path: Path, *, side: int = 1024, seed: int = 0):
    """JPEG-LS whose frame header claims 60000 x 60000 pixels (Rows/Columns say ``side``):
    the codec tries to allocate gigabytes."""
    ds = make_dx(rows=side, cols=side, seed=seed)
    ds.compress(JPEGLSLossless)
    frame = bytearray(get_frame(ds.PixelData, 0))
    sof = frame.find(b"\xff\xf7")
    frame[sof + 5:sof + 9] = struct.pack(">HH", 60000, 60000)
    ds.PixelData = encapsulate([bytes(frame)])
    ds.save_as(path, enforce_file_format=True)
    return ds


#: Damaged metadata that must not cost the results: keyword -> value (raw, as a modality
#: might send it).
BAD_METADATA = {
    "PatientBirthDate": "19801341",
    "StudyDate": "2024",
    "WindowWidth": "0",
    "SpecificCharacterSet": "ISO_IR 999",
}


def bad_metadata(path: Path, *, side: int = 1024, seed: int = 0, **overrides):
    """A good image whose metadata carries the values of ``BAD_METADATA`` (or ``overrides``)."""
    from pydicom.dataelem import RawDataElement
    from pydicom.datadict import dictionary_VR, tag_for_keyword

    ds = make_dx(rows=side, cols=side, seed=seed)
    for keyword, value in (overrides or BAD_METADATA).items():
        tag = tag_for_keyword(keyword)
        raw = value.encode("latin-1") if isinstance(value, str) else value
        ds[tag] = RawDataElement(tag, dictionary_VR(tag), len(raw), raw, 0, False, True, True, False)
    ds.save_as(path, enforce_file_format=True)
    return ds
