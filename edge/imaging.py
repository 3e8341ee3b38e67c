"""DICOM pixels to the models' view of the image: display polarity, 0..1, near model size.

The models need about 512 pixels a side, not the detector's 2-3k, so decoding stops there:
JPEG 2000 is decoded at a reduced resolution level (the wavelet's low-pass image, several
times faster than a full decode); other transfer syntaxes are decoded fully and then
block-averaged. Either way the result is the full image stretched to ``unit_image``'s
size, so a point maps back to full resolution by ``x * scale_x, y * scale_y`` (the J2K
low-pass image is re-centred on the blocks first; see ``align_reduced``).

Grey levels follow PS3.3 C.11: stored values -> Modality LUT (rescale or LUT) -> VOI
(first window, or the VOI LUT; percentiles when the image has neither) -> MONOCHROME1 or
INVERSE presentation inverted, so the models always see bone bright.
"""
from __future__ import annotations

import io
import logging
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi, get_decoder, pixel_array
from pydicom.uid import UID

from engines.preprocess import percentile_to_unit, window_to_unit

logger = logging.getLogger(__name__)

J2K_SYNTAXES = {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"}
GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")
# JPEG (baseline, extended, lossless), JPEG-LS and JPEG 2000: streams that end with FFD9
_END_MARKER_SYNTAXES = J2K_SYNTAXES | {
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
    "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"}
_SOC_SIZ = b"\xff\x4f\xff\x51"
#: Decoded sides may fall this far below ``min_side`` (the model resize stretches them).
MIN_SIDE_FRACTION = 0.9
#: OpenJPEG (Pillow's) decodes a JPEG 2000 image's code-blocks on up to this many threads.
#: On the 2-core benchmark machine two threads take the 2k reduced decode from 164 to 89 ms
#: (the decode is most of a JPEG 2000 image's analysis); when several images are decoded
#: at once they only share the cores as they would anyway.
J2K_MAX_THREADS = 4


class _QuietDecoderLog(logging.Filter):
    """Drops pydicom's per-plugin decode tracebacks for threads inside ``_quiet_decoder``.

    A corrupt image is reported once, as an ImagingError a technician can read; the
    decoder's tracebacks would otherwise land in the log (and on ``edge analyze``'s screen).
    """

    def __init__(self) -> None:
        super().__init__()
        self.threads: set[int] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        return record.thread not in self.threads


_QUIET = _QuietDecoderLog()
logging.getLogger("pydicom.pixels.decoders.base").addFilter(_QUIET)


@contextmanager
def _quiet_decoder() -> Iterator[None]:
    ident = threading.get_ident()
    _QUIET.threads.add(ident)
    try:
        yield
    finally:
        _QUIET.threads.discard(ident)


class ImagingError(Exception):
    """The image cannot be turned into model input; the message is meant for a technician."""


@dataclass
class ImageForModels:
    """The image as the models see it, with the exact mapping back to full resolution."""

    unit_image: np.ndarray            # float32 2-D, display polarity, 0..1
    full_rows: int
    full_cols: int
    scale_x: float                    # full_cols / unit_cols
    scale_y: float                    # full_rows / unit_rows
    pixel_spacing_mm: tuple[float, float] | None   # (row, column) spacing at full resolution
    spacing_source: str | None        # which attribute the spacing came from
    decode_ms: float                  # pixel decode to unit_image, milliseconds
    photometric: str
    reduction: int = 0                # JPEG 2000 resolution levels discarded (0: full decode)
    block: int = 1                    # block-average factor applied after decoding

    def to_full(self, x: float, y: float) -> tuple[float, float]:
        """Map a point in unit_image pixels to full-resolution pixels."""
        return x * self.scale_x, y * self.scale_y


def load_for_models(path_or_ds: str | os.PathLike[str] | Dataset, *, min_side: int = 512) -> ImageForModels:
    """Decode a grayscale DICOM image to a 0..1 display-polarity image of about ``min_side``.

    ``min_side`` is the largest model input side: the decoded image keeps both sides at or
    above MIN_SIDE_FRACTION of it (unless the image itself is smaller). Raises ImagingError
    for unreadable files, corrupt pixel data and non-grayscale images.
    """
    if isinstance(min_side, bool) or not isinstance(min_side, int) or min_side < 1:
        raise ValueError(f"min_side: expected a positive integer, got {min_side!r}")
    ds = read_dataset(path_or_ds)
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if photometric not in GRAYSCALE or int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise ImagingError(
            f"unsupported photometric interpretation {photometric or 'missing'!r}: "
            "only grayscale (MONOCHROME1/MONOCHROME2) images can be analyzed")
    if "PixelData" not in ds:
        raise ImagingError("the file has no image data (Pixel Data is missing)")
    full_rows, full_cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if full_rows < 1 or full_cols < 1:
        raise ImagingError(f"invalid image size ({full_cols} x {full_rows})")

    start = time.perf_counter()
    stored, reduction = _decode_near(ds, min_side)
    block = block_factor(stored.shape[0], stored.shape[1], min_side)
    values = block_mean(stored, block)
    unit = to_unit(values, ds, photometric)
    decode_ms = (time.perf_counter() - start) * 1000.0

    unit_rows, unit_cols = unit.shape
    spacing, source = pixel_spacing(ds)
    return ImageForModels(
        unit_image=unit, full_rows=full_rows, full_cols=full_cols,
        scale_x=full_cols / unit_cols, scale_y=full_rows / unit_rows,
        pixel_spacing_mm=spacing, spacing_source=source, decode_ms=decode_ms,
        photometric=photometric, reduction=reduction, block=block)


def use_j2k_threads() -> None:
    """Let OpenJPEG decode on several threads: it reads ``OPJ_NUM_THREADS`` each time a
    decoder is created. A value already in the environment (the operator's) is kept."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):   # pragma: no cover - non-Linux
        cores = os.cpu_count() or 1
    os.environ.setdefault("OPJ_NUM_THREADS", str(max(1, min(J2K_MAX_THREADS, cores))))


def warm_codecs() -> None:
    """Import the pixel decoders now, so the first image does not pay for loading them,
    and give OpenJPEG its threads (``use_j2k_threads``)."""
    import importlib

    use_j2k_threads()

    from PIL import Jpeg2KImagePlugin  # noqa: F401 - the reduced JPEG 2000 decode
    for name in ("pylibjpeg", "openjpeg", "libjpeg", "rle", "jpeg_ls"):
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    for syntax in _END_MARKER_SYNTAXES | {"1.2.840.10008.1.2.5"}:
        try:
            get_decoder(UID(syntax)).is_available
        except NotImplementedError:
            pass


def read_dataset(path_or_ds: str | os.PathLike[str] | Dataset, *, pixels: bool = True) -> Dataset:
    """Return the dataset itself, or read it from a path (without the pixel data when
    ``pixels`` is False); ImagingError when unreadable."""
    if isinstance(path_or_ds, Dataset):
        return path_or_ds
    if not isinstance(path_or_ds, (str, os.PathLike)):
        raise TypeError(f"path_or_ds: expected a path or a pydicom Dataset, got {type(path_or_ds).__name__}")
    path = Path(path_or_ds)
    try:
        return pydicom.dcmread(path, stop_before_pixels=not pixels)
    except FileNotFoundError:
        raise ImagingError(f"file not found: {path}") from None
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as exc:
        raise ImagingError(f"not a readable DICOM file: {path.name} ({exc.__class__.__name__})") from exc


def _transfer_syntax(ds: Dataset) -> UID:
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID", None) if meta is not None else None
    return UID(str(uid)) if uid else UID("1.2.840.10008.1.2.1")


def _decode_near(ds: Dataset, min_side: int) -> tuple[np.ndarray, int]:
    """Stored pixel values (first frame), J2K at a reduced level; returns (array, levels)."""
    syntax = _transfer_syntax(ds)
    frame = _first_frame(ds, syntax) if syntax in _END_MARKER_SYNTAXES else b""
    if frame:
        _check_end_marker(frame, syntax)
    if syntax in J2K_SYNTAXES:
        width, height = _j2k_header(frame)[:2]
        if (height, width) != (int(ds.Rows), int(ds.Columns)):
            raise ImagingError(f"image data does not match its header: the JPEG 2000 stream is "
                               f"{width} x {height}, Rows/Columns say {ds.Columns} x {ds.Rows}")
        # Fewer levels are tried when a reduction fails: a tile may have fewer levels than the
        # main header says, and Pillow (13.0) rejects some reductions of odd-sized images
        # ("broken data stream" at reduce=2 for 2048 x 1873) that one level less decodes.
        # A full decode costs 3-4x the one-level decode, so it comes last.
        for levels in range(reduction_levels(frame, min_side), 0, -1):
            try:
                return align_reduced(decode_j2k_reduced(frame, levels), levels), levels
            except ImagingError as exc:
                logger.info("JPEG 2000 decode discarding %d level(s) failed (%s)", levels, exc)
    name = syntax.name if syntax.is_transfer_syntax else str(syntax)
    if syntax.is_compressed:
        try:
            available = get_decoder(syntax).is_available
        except NotImplementedError:
            available = False
        if not available:
            raise ImagingError(f"cannot decode {name}: no decoder for this compression is installed")
    try:
        with _quiet_decoder():
            arr = pixel_array(ds, index=0)
    except Exception as exc:  # decoders raise many types; the technician needs one message
        logger.debug("pixel decode failed: %s", exc)
        raise ImagingError(f"image data is corrupt or truncated: could not decode {name} pixel data") from exc
    if arr.ndim != 2:
        raise ImagingError(f"expected a single grayscale frame, got pixel data of shape {arr.shape}")
    return arr, 0


def _first_frame(ds: Dataset, syntax: UID) -> bytes:
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        return get_frame(ds.PixelData, 0, number_of_frames=frames)
    except Exception as exc:
        raise ImagingError(f"image data is corrupt or truncated: could not read the {syntax.name} frame") from exc


def _check_end_marker(frame: bytes, syntax: UID) -> None:
    """JPEG, JPEG-LS and JPEG 2000 streams end with FFD9; decoders fill a cut-off image silently.

    Trailing zero bytes (fragment padding) are allowed.
    """
    if not frame.rstrip(b"\x00").endswith(b"\xff\xd9"):
        raise ImagingError(f"image data is corrupt or truncated: the {syntax.name} stream has no end marker")


def _j2k_header(frame: bytes) -> tuple[int, int, int, bool, int]:
    """(width, height, precision, signed, decomposition levels) from a J2K main header."""
    start = frame.find(_SOC_SIZ)
    if start < 0 or len(frame) < start + 46:
        raise ImagingError("image data is corrupt or truncated: no JPEG 2000 codestream header")
    siz = start + 2
    lsiz = int.from_bytes(frame[siz + 2:siz + 4], "big")
    xsiz, ysiz, xo, yo = (int.from_bytes(frame[siz + 6 + 4 * i:siz + 10 + 4 * i], "big") for i in range(4))
    ssiz = frame[siz + 40]
    pos, levels = siz + 2 + lsiz, 0
    while pos + 4 <= len(frame):
        marker = frame[pos:pos + 2]
        if marker[0] != 0xFF or marker[1] in (0x90, 0x93, 0xD9):   # SOT, SOD, EOC: header ends
            break
        length = int.from_bytes(frame[pos + 2:pos + 4], "big")
        if marker[1] == 0x52 and pos + 9 < len(frame):            # COD: SPcod starts at +9
            levels = frame[pos + 9]
        pos += 2 + length
    return xsiz - xo, ysiz - yo, (ssiz & 0x7F) + 1, bool(ssiz & 0x80), levels


def keeps_min_side(rows: int, cols: int, factor: int, min_side: int) -> bool:
    """Whether reducing by ``factor`` (sides ceil(n / factor)) keeps both sides near min_side.

    "Near" is MIN_SIDE_FRACTION of it: a 2048 x 1943 image then decodes at level 2
    (512 x 486, stretched 5% by the model resize) instead of level 1 at about 4x the time.
    """
    need = MIN_SIDE_FRACTION * min_side
    return -(-rows // factor) >= need and -(-cols // factor) >= need


def block_factor(rows: int, cols: int, min_side: int) -> int:
    """Largest block-average factor that keeps both sides near ``min_side`` (at least 1)."""
    factor = 1
    while keeps_min_side(rows, cols, factor + 1, min_side):
        factor += 1
    return factor


def reduction_levels(frame: bytes, min_side: int) -> int:
    """Largest number of J2K resolution levels to discard keeping both sides near min_side.

    Reduced sizes are ceil(n / 2**levels); the codestream's decomposition levels cap it.
    """
    width, height, _, _, levels = _j2k_header(frame)
    best = 0
    for n in range(1, levels + 1):
        if keeps_min_side(height, width, 2 ** n, min_side):
            best = n
    return best


def decode_j2k_reduced(frame: bytes, levels: int) -> np.ndarray:
    """Decode a JPEG 2000 codestream with ``levels`` resolution levels discarded.

    Uses Pillow's OpenJPEG binding (pylibjpeg-openjpeg offers no reduce argument). Pillow
    scales samples to 8 or 16 bits and offsets signed ones; both are undone here.
    """
    from PIL import Image

    _, _, precision, signed, _ = _j2k_header(frame)
    try:
        with Image.open(io.BytesIO(frame)) as im:
            im.reduce = levels
            im.load()
            mode = im.mode
            data = np.asarray(im)
    except Exception as exc:
        raise ImagingError("image data is corrupt or truncated: could not decode JPEG 2000 stream") from exc
    if mode not in ("L", "I;16") or data.ndim != 2:
        raise ImagingError(f"unexpected JPEG 2000 content (mode {mode}, shape {data.shape})")
    values = data.astype(np.int32)
    shift = (8 if mode == "L" else 16) - precision
    if shift > 0:
        values >>= shift
    if signed:
        values -= 1 << (precision - 1)
    return values


def align_reduced(reduced: np.ndarray, levels: int) -> np.ndarray:
    """Resample a reduced J2K image so pixel i is centred where a block mean's pixel i is.

    The wavelet low-pass sample i of level N sits on full-resolution pixel i * 2**N, while
    the block average of pixels [i * 2**N, (i + 1) * 2**N) is centred (2**N - 1) / 2 pixels
    further on. A linear interpolation by that fraction of a reduced pixel removes the
    shift, so ``x * scale_x`` maps back without a bias (edges repeat the last sample).
    """
    values = np.asarray(reduced, dtype=np.float32)
    frac = np.float32((2 ** levels - 1) / 2 ** (levels + 1))
    if levels <= 0 or min(values.shape) < 2:
        return values
    values = (1 - frac) * values + frac * np.concatenate([values[1:], values[-1:]], axis=0)
    return (1 - frac) * values + frac * np.concatenate([values[:, 1:], values[:, -1:]], axis=1)


def block_mean(image: np.ndarray, factor: int) -> np.ndarray:
    """Average ``factor`` x ``factor`` blocks; edge blocks average what they hold.

    The output has ceil(n / factor) pixels a side, the same rule as a reduced J2K decode.
    """
    image = np.asarray(image)
    if factor <= 1:
        return image.astype(np.float32)
    h, w = image.shape
    hh, ww = h - h % factor, w - w % factor
    bh, bw = hh // factor, ww // factor
    out = np.empty((-(-h // factor), -(-w // factor)), dtype=np.float32)
    out[:bh, :bw] = _block_sum(image[:hh, :ww], factor) / np.float32(factor * factor)
    if ww < w:
        out[:bh, bw] = image[:hh, ww:].reshape(bh, factor, w - ww).mean(axis=(1, 2), dtype=np.float32)
    if hh < h:
        out[bh, :bw] = image[hh:, :ww].reshape(h - hh, bw, factor).mean(axis=(0, 2), dtype=np.float32)
        if ww < w:
            out[bh, bw] = image[hh:, ww:].mean(dtype=np.float32)
    return out


def _block_sum(image: np.ndarray, factor: int) -> np.ndarray:
    """Sums of factor x factor blocks (sides divisible by factor), by strided adds.

    Integer pixels are summed in a wide integer type: about ten times faster than a
    float reshape-mean on a 2k x 2k image.
    """
    if image.dtype.kind == "u":
        acc = np.uint32 if image.dtype.itemsize <= 2 else np.uint64
    elif image.dtype.kind == "i":
        acc = np.int32 if image.dtype.itemsize <= 2 else np.int64
    else:
        acc = np.float64
    rows = image[0::factor].astype(acc)
    for k in range(1, factor):
        rows += image[k::factor]
    out = rows[:, 0::factor].copy()
    for k in range(1, factor):
        out += rows[:, k::factor]
    return out.astype(np.float32)


def to_unit(values: np.ndarray, ds: Dataset, photometric: str) -> np.ndarray:
    """Stored values (possibly block-averaged) -> Modality LUT -> VOI -> display polarity 0..1."""
    values = _modality(values, ds)
    unit = _voi(values, ds)
    shape = str(ds.get("PresentationLUTShape", "") or "").strip().upper()
    if photometric == "MONOCHROME1" or shape == "INVERSE":
        unit = 1.0 - unit
    return np.ascontiguousarray(unit, dtype=np.float32)


def _modality(values: np.ndarray, ds: Dataset) -> np.ndarray:
    if "ModalityLUTSequence" in ds:
        lut_out = apply_modality_lut(np.rint(values).astype(np.int64), ds)
        return np.asarray(lut_out, dtype=np.float32)
    slope = _float(ds.get("RescaleSlope", None), 1.0)
    intercept = _float(ds.get("RescaleIntercept", None), 0.0)
    values = np.asarray(values, dtype=np.float32)
    if slope != 1.0 or intercept != 0.0:
        values = values * np.float32(slope) + np.float32(intercept)
    return values


def _first_window(ds: Dataset) -> tuple[float, float] | None:
    center, width = ds.get("WindowCenter", None), ds.get("WindowWidth", None)
    if center is None or width is None:
        return None
    center = center[0] if isinstance(center, MultiValue) else center
    width = width[0] if isinstance(width, MultiValue) else width
    c, w = _float(center, None), _float(width, None)
    if c is None or w is None or w <= 0:
        return None
    return c, w


def _voi(values: np.ndarray, ds: Dataset) -> np.ndarray:
    window = _first_window(ds)
    if window is not None:
        center, width = window
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
        if function == "SIGMOID":
            return (1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))).astype(np.float32)
        if function == "LINEAR_EXACT":
            return np.clip((values - (center - width / 2.0)) / width, 0.0, 1.0).astype(np.float32)
        return window_to_unit(values, center, width)
    if ds.get("VOILUTSequence", None):
        item = ds.VOILUTSequence[0]
        bits = int(item.LUTDescriptor[2]) if "LUTDescriptor" in item else 16
        mapped = apply_voi(np.rint(values).astype(np.int64), ds, 0)
        return np.clip(np.asarray(mapped, dtype=np.float32) / float(2 ** bits - 1), 0.0, 1.0)
    return percentile_to_unit(values)


def _float(value: object, default: float | None) -> float | None:
    if value is None or value == "":
        return default
    try:
        out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return default
    return out if np.isfinite(out) else default


def _pair(value: object) -> tuple[float, float] | None:
    try:
        row, col = (float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    if not (np.isfinite(row) and np.isfinite(col)) or row <= 0 or col <= 0:
        return None
    return row, col


def pixel_spacing(ds: Dataset) -> tuple[tuple[float, float] | None, str | None]:
    """(row, column) spacing in mm at the patient, and the attribute it came from.

    ImagerPixelSpacing is at the detector, so it is divided by the
    EstimatedRadiographicMagnificationFactor when present. A PixelSpacing that states a
    PixelSpacingCalibrationType was measured in the patient plane and is preferred.
    """
    calibrated = _pair(ds.get("PixelSpacing", None))
    if calibrated and str(ds.get("PixelSpacingCalibrationType", "") or "").strip():
        return calibrated, "PixelSpacing"
    imager = _pair(ds.get("ImagerPixelSpacing", None))
    if imager:
        factor = _float(ds.get("EstimatedRadiographicMagnificationFactor", None), None)
        if factor is not None and factor > 0:
            return (imager[0] / factor, imager[1] / factor), \
                "ImagerPixelSpacing/EstimatedRadiographicMagnificationFactor"
        return imager, "ImagerPixelSpacing"
    if calibrated:
        return calibrated, "PixelSpacing"
    return None, None
