"""The pixel decoder process: whatever a codec does with an image, the caller gets the image
or a readable error, and the next image is decoded."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from conftest import make_dx
from edge.decoder import DecoderCrashed, IsolatedDecoder
from edge.imaging import ImagingError, load_for_models
from poison import huge_jpegls, panicking_rle, truncated_j2k

FAULTY = [sys.executable, str(Path(__file__).parent / "support" / "faulty_decoder.py")]


@pytest.fixture
def good(tmp_path) -> Path:
    path = tmp_path / "good.dcm"
    make_dx(path, rows=1100, cols=1024, seed=3)
    return path


def _fresh_image_decodes(decoder: IsolatedDecoder, good: Path) -> None:
    image = decoder.load(good, min_side=512)
    reference = load_for_models(good, min_side=512)
    assert image.unit_image.shape == reference.unit_image.shape
    assert (image.unit_image == reference.unit_image).all()
    assert (image.full_rows, image.full_cols) == (1100, 1024)


def test_decoded_in_the_child_exactly_as_in_process(good):
    decoder = IsolatedDecoder().start()
    try:
        _fresh_image_decodes(decoder, good)
        assert decoder.alive and decoder.restarts == 0
    finally:
        decoder.close()
    assert not decoder.alive


def test_a_codec_panic_fails_that_image_only(tmp_path, good):
    """pylibjpeg-rle panics (a BaseException) on this stream; in the service that killed the
    prepare thread and every later image stayed unanalysed."""
    poison = tmp_path / "panic.dcm"
    panicking_rle(poison)
    with pytest.raises(BaseException) as in_process:   # in the service's own process
        load_for_models(poison, min_side=512)
    assert not isinstance(in_process.value, Exception), \
        "the codec no longer panics on this stream: find another poison for this test"
    decoder = IsolatedDecoder().start()
    try:
        with pytest.raises(DecoderCrashed, match="pixel decoder failed on this image"):
            decoder.load(poison, min_side=512)
        _fresh_image_decodes(decoder, good)
    finally:
        decoder.close()


@pytest.mark.parametrize("fault, message", [
    ("SEGFAULT", r"crashed on this image \(SIGSEGV\)"),
    ("ALLOC", "needs more memory than the decoder may use"),
    ("HANG", "took longer than 2 s"),
])
def test_native_crash_hang_and_huge_allocation_fail_the_image_and_the_next_one_works(tmp_path, good, fault, message):
    bad = tmp_path / f"{fault}.dcm"
    make_dx(bad, rows=1024, cols=1024)
    decoder = IsolatedDecoder(command=FAULTY, timeout_s=2.0, memory_mb=1024).start()
    try:
        _fresh_image_decodes(decoder, good)
        started = time.monotonic()
        with pytest.raises(DecoderCrashed, match=message):
            decoder.load(bad, min_side=512)
        assert time.monotonic() - started < 10
        assert decoder.restarts == 1
        _fresh_image_decodes(decoder, good)
    finally:
        decoder.close()


@pytest.mark.parametrize("make, message", [
    (truncated_j2k, "corrupt or truncated"),
    (huge_jpegls, "corrupt or truncated|took longer than"),
])
def test_damaged_streams_give_a_reason_a_technician_reads(tmp_path, good, make, message):
    bad = tmp_path / "bad.dcm"
    make(bad)
    decoder = IsolatedDecoder(timeout_s=5.0, memory_mb=1024).start()
    try:
        with pytest.raises(ImagingError, match=message):
            decoder.load(bad, min_side=512)
        _fresh_image_decodes(decoder, good)   # a codec that failed does not poison the next
    finally:
        decoder.close()
