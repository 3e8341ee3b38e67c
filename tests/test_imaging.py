"""Imaging: every accepted transfer syntax and both polarities give the same model view.

Compressed copies are made with the real DCMTK tools (dcmcjpeg, dcmcjpls, dcmcrle,
dcmconv) and pydicom's encoders, then decoded by edge.imaging.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, get_frame
from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                         JPEG2000, JPEG2000Lossless, JPEGLSLossless, RLELossless, generate_uid)

from edge.imaging import (ImagingError, block_factor, block_mean, decode_j2k_reduced, keeps_min_side,
                          load_for_models, pixel_spacing, reduction_levels, use_j2k_threads)

DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
ROWS, COLS = 1030, 1100          # not multiples of the block/reduction factors on purpose
WINDOW = (2100.0, 3000.0)        # center, width of the 12-bit test images
DCMTK = all(shutil.which(tool) for tool in ("dcmcjpeg", "dcmcjpls", "dcmcrle", "dcmconv"))


def chest_pixels(rows: int = ROWS, cols: int = COLS, bits: int = 12, seed: int = 0) -> np.ndarray:
    """A smooth chest-like picture (MONOCHROME2 polarity): dark lungs, bright spine and blobs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    y, x = yy / rows, xx / cols
    img = 0.55 + 0.1 * np.sin(3 * x) * np.cos(2 * y)
    for cx in (0.3, 0.7):
        img -= 0.3 * np.exp(-(((x - cx) / 0.15) ** 2 + ((y - 0.5) / 0.3) ** 2) ** 2)
    img += 0.25 * np.exp(-((x - 0.5) / 0.04) ** 2)
    for _ in range(4):
        cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.01, 0.03)
        img += 0.2 * np.exp(-(((x - cx) ** 2 + (y - cy) ** 2) / r ** 2))
    top = (1 << bits) - 1
    return np.clip(img * top, 0, top).astype(np.uint16 if bits > 8 else np.uint8)


def make_dx(pixels: np.ndarray, *, bits: int = 12, photometric: str = "MONOCHROME2",
            window: tuple[float, float] | None = WINDOW, **attrs: object) -> Dataset:
    """A minimal DX For Presentation dataset around ``pixels`` (explicit VR little endian)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = DX_PRESENTATION
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = DX_PRESENTATION
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "DX", "CHEST", "PA"
    ds.PatientAge = "040Y"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated = 8 if bits <= 8 else 16
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, 0
    ds.PresentationLUTShape = "INVERSE" if photometric == "MONOCHROME1" else "IDENTITY"
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.tobytes()
    return ds


def save(ds: Dataset, path: Path, syntax: str = ExplicitVRLittleEndian) -> Path:
    ds.file_meta.TransferSyntaxUID = syntax
    ds.save_as(path, enforce_file_format=True)
    return path


def dcmtk(tool: str, src: Path, dst: Path, *options: str) -> Path:
    subprocess.run([tool, *options, str(src), str(dst)], check=True, capture_output=True, timeout=60)
    return dst


def pydicom_compressed(src: Path, dst: Path, syntax: str, **kwargs: object) -> Path:
    ds = pydicom.dcmread(src)
    ds.compress(syntax, **kwargs)
    ds.save_as(dst, enforce_file_format=True)
    return dst


@pytest.fixture(scope="module")
def variants(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path, bool]]:
    """name -> (file, uncompressed reference file, lossless?) for every accepted syntax."""
    tmp = tmp_path_factory.mktemp("syntaxes")
    ref12 = save(make_dx(chest_pixels()), tmp / "ref12.dcm")
    ref8 = save(make_dx(chest_pixels(bits=8), bits=8, window=(128.0, 256.0)), tmp / "ref8.dcm")
    out = {
        "explicit": (ref12, ref12, True),
        "implicit": (save(pydicom.dcmread(ref12), tmp / "implicit.dcm", ImplicitVRLittleEndian), ref12, True),
        "rle_pydicom": (pydicom_compressed(ref12, tmp / "rle_py.dcm", RLELossless), ref12, True),
        "jpegls_pydicom": (pydicom_compressed(ref12, tmp / "jls_py.dcm", JPEGLSLossless), ref12, True),
        "j2k_lossless": (pydicom_compressed(ref12, tmp / "j2k.dcm", JPEG2000Lossless), ref12, True),
        "j2k_lossy": (pydicom_compressed(ref12, tmp / "j2k_lossy.dcm", JPEG2000, j2k_cr=[20]), ref12, False),
    }
    if DCMTK:
        out.update({
            "deflated": (dcmtk("dcmconv", ref12, tmp / "deflated.dcm", "+td"), ref12, True),
            "rle_dcmtk": (dcmtk("dcmcrle", ref12, tmp / "rle.dcm"), ref12, True),
            "jpeg_sv1": (dcmtk("dcmcjpeg", ref12, tmp / "sv1.dcm", "+e1"), ref12, True),
            "jpeg_p14": (dcmtk("dcmcjpeg", ref12, tmp / "p14.dcm", "+el"), ref12, True),
            "jpegls_lossless": (dcmtk("dcmcjpls", ref12, tmp / "jls.dcm", "+el"), ref12, True),
            "jpegls_near": (dcmtk("dcmcjpls", ref12, tmp / "jls_near.dcm", "+en", "+md", "3"), ref12, False),
            "jpeg_baseline": (dcmtk("dcmcjpeg", ref8, tmp / "baseline.dcm", "+eb", "+q", "95"), ref8, False),
            "jpeg_extended": (dcmtk("dcmcjpeg", ref12, tmp / "extended.dcm", "+ee", "+q", "95"), ref12, False),
        })
    return out


SYNTAX_OF = {
    "explicit": ExplicitVRLittleEndian, "implicit": ImplicitVRLittleEndian,
    "deflated": DeflatedExplicitVRLittleEndian, "rle_pydicom": RLELossless, "rle_dcmtk": RLELossless,
    "jpeg_sv1": "1.2.840.10008.1.2.4.70", "jpeg_p14": "1.2.840.10008.1.2.4.57",
    "jpeg_baseline": "1.2.840.10008.1.2.4.50", "jpeg_extended": "1.2.840.10008.1.2.4.51",
    "jpegls_lossless": JPEGLSLossless,
    "jpegls_pydicom": JPEGLSLossless, "jpegls_near": "1.2.840.10008.1.2.4.81",
    "j2k_lossless": JPEG2000Lossless, "j2k_lossy": JPEG2000,
}


@pytest.mark.parametrize("name", sorted(SYNTAX_OF))
def test_every_transfer_syntax_gives_the_same_unit_image(variants, name: str) -> None:
    if name not in variants:
        pytest.skip("DCMTK command-line tools not installed")
    path, ref_path, lossless = variants[name]
    assert str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID) == SYNTAX_OF[name]
    # full resolution: lossless syntaxes decode to exactly the reference
    full, ref_full = load_for_models(path, min_side=2048), load_for_models(ref_path, min_side=2048)
    assert full.unit_image.shape == (ROWS, COLS) and full.reduction == 0 and full.block == 1
    diff = np.abs(full.unit_image - ref_full.unit_image)
    if lossless:
        assert diff.max() == 0.0
    else:
        assert diff.mean() < 0.01 and diff.max() < 0.12
    # model resolution: J2K is decoded reduced, the others block-averaged; same geometry
    small, ref_small = load_for_models(path, min_side=256), load_for_models(ref_path, min_side=256)
    assert small.unit_image.shape == ref_small.unit_image.shape == (258, 275)
    assert (small.scale_x, small.scale_y) == (COLS / 275, ROWS / 258)
    assert small.unit_image.dtype == np.float32
    assert 0.0 <= small.unit_image.min() and small.unit_image.max() <= 1.0
    diff = np.abs(small.unit_image - ref_small.unit_image)
    assert diff.mean() < 0.01 and np.percentile(diff, 99) < 0.05
    if name.startswith("j2k"):
        assert small.reduction == 2 and small.block == 1
    else:
        assert small.reduction == 0 and small.block == 4


@pytest.mark.parametrize("window", [WINDOW, None], ids=["window", "percentiles"])
def test_monochrome1_gives_the_same_display_image(tmp_path: Path, window) -> None:
    pixels = chest_pixels()
    mono2 = make_dx(pixels, window=window)
    inverted_window = None if window is None else (4096.0 - window[0], window[1])
    mono1 = make_dx(4095 - pixels, photometric="MONOCHROME1", window=inverted_window)
    a = load_for_models(mono2, min_side=256).unit_image
    b = load_for_models(mono1, min_side=256).unit_image
    np.testing.assert_allclose(a, b, atol=1e-3)
    # and through JPEG 2000 (reduced decode) as well
    j2k = pydicom_compressed(save(mono1, tmp_path / "m1.dcm"), tmp_path / "m1j2k.dcm", JPEG2000Lossless)
    c = load_for_models(j2k, min_side=256)
    assert c.reduction == 2 and c.photometric == "MONOCHROME1"
    assert np.abs(c.unit_image - a).mean() < 0.01
    # the lungs (dark in display polarity) really are dark
    assert a[129, 82] < a[129, 137]


def test_inverse_presentation_lut_on_monochrome2_is_inverted() -> None:
    pixels = chest_pixels(rows=300, cols=300)
    plain = load_for_models(make_dx(pixels), min_side=100).unit_image
    inverse = load_for_models(make_dx(pixels, PresentationLUTShape="INVERSE"), min_side=100).unit_image
    np.testing.assert_allclose(inverse, 1.0 - plain, atol=1e-6)


def test_rescale_and_voi_lut_sequence_match_the_plain_window() -> None:
    pixels = chest_pixels(rows=400, cols=400)
    center, width = WINDOW
    plain = load_for_models(make_dx(pixels), min_side=100).unit_image
    # stored = (value + 1000) / 2, with the modality rescale undoing it
    rescaled = make_dx(((pixels.astype(np.int32) + 1000) // 2).astype(np.uint16), window=WINDOW,
                       RescaleSlope=2, RescaleIntercept=-1000)
    got = load_for_models(rescaled, min_side=100).unit_image
    assert np.abs(got - plain).max() < 2.0 / width + 1e-6
    # a VOI LUT that is the same linear window, 12-bit output
    lut_in = np.arange(4096, dtype=np.float64)
    lut_out = np.clip((lut_in - (center - 0.5 - (width - 1) / 2)) / (width - 1), 0, 1) * 4095
    lut_ds = make_dx(pixels, window=None)
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 12]
    item.LUTData = np.rint(lut_out).astype(np.uint16).tolist()
    lut_ds.VOILUTSequence = [item]
    got = load_for_models(lut_ds, min_side=100).unit_image
    assert np.abs(got - plain).max() < 0.002


def test_j2k_reduced_resolution_maps_back_to_full_resolution_exactly(tmp_path: Path) -> None:
    pixels = np.full((ROWS, COLS), 500, dtype=np.uint16)
    x1, y1, x2, y2 = 701, 333, 781, 413          # a bright square, full-resolution pixels
    pixels[y1:y2, x1:x2] = 3500
    src = save(make_dx(pixels, window=(2000.0, 4000.0)), tmp_path / "square.dcm")
    j2k = pydicom_compressed(src, tmp_path / "square_j2k.dcm", JPEG2000Lossless)
    frame = get_frame(pydicom.dcmread(j2k).PixelData, 0, number_of_frames=1)
    assert reduction_levels(frame, 128) == 3        # ceil(1030 / 8) = 129 >= 128, /16 would be 65
    assert reduction_levels(frame, 2000) == 0
    for path in (j2k, src):
        image = load_for_models(path, min_side=128)
        rows, cols = image.unit_image.shape
        assert (rows, cols) == (-(-ROWS // 8), -(-COLS // 8))
        assert image.scale_x == COLS / cols and image.scale_y == ROWS / rows
        assert (image.full_rows, image.full_cols) == (ROWS, COLS)
        ys, xs = np.nonzero(image.unit_image > 0.5)
        bx1, by1 = image.to_full(xs.min(), ys.min())
        bx2, by2 = image.to_full(xs.max() + 1, ys.max() + 1)
        tolerance = 1.5 * image.scale_x                 # one reduced pixel and a bit
        assert abs(bx1 - x1) <= tolerance and abs(bx2 - x2) <= tolerance
        assert abs(by1 - y1) <= tolerance and abs(by2 - y2) <= tolerance
    # no half-pixel bias between the wavelet low-pass image and the block mean
    centroids = []
    for path in (j2k, src):
        unit = load_for_models(path, min_side=128).unit_image
        weight = np.clip(unit - np.median(unit), 0, None)
        ys, xs = np.mgrid[0:unit.shape[0], 0:unit.shape[1]]
        centroids.append(((weight * xs).sum() / weight.sum(), (weight * ys).sum() / weight.sum()))
    assert np.allclose(centroids[0], centroids[1], atol=0.1)
    assert load_for_models(j2k, min_side=128).reduction == 3


def test_j2k_decodes_on_several_threads_to_the_same_values(variants, monkeypatch) -> None:
    """The decoder process sets OPJ_NUM_THREADS (OpenJPEG reads it per decode); the
    operator's own value wins, and the threads change no sample."""
    monkeypatch.delenv("OPJ_NUM_THREADS", raising=False)
    use_j2k_threads()
    threads = int(os.environ["OPJ_NUM_THREADS"])
    assert 1 <= threads <= 4
    monkeypatch.setenv("OPJ_NUM_THREADS", "1")
    use_j2k_threads()
    assert os.environ["OPJ_NUM_THREADS"] == "1"
    frame = get_frame(pydicom.dcmread(variants["j2k_lossless"][0]).PixelData, 0, number_of_frames=1)
    single = [decode_j2k_reduced(frame, levels) for levels in (0, 1)]
    monkeypatch.setenv("OPJ_NUM_THREADS", "2")
    for levels, expected in enumerate(single):
        assert np.array_equal(decode_j2k_reduced(frame, levels), expected)


def test_decode_size_stays_near_the_model_side() -> None:
    # a 2048 x 1943 detector image: 512 x 486 is close enough to a 512 model input
    assert block_factor(1943, 2048, 512) == 4 and block_factor(1943, 2048, 600) == 3
    assert block_factor(300, 300, 512) == 1
    assert keeps_min_side(1943, 2048, 4, 512) and not keeps_min_side(1943, 2048, 8, 512)
    assert not keeps_min_side(1800, 2048, 4, 512)          # 450 < 0.9 * 512


def test_block_mean_averages_partial_edge_blocks() -> None:
    image = np.arange(7 * 5, dtype=np.float32).reshape(7, 5)
    out = block_mean(image, 3)
    assert out.shape == (3, 2)
    assert out[0, 0] == image[:3, :3].mean() and out[2, 1] == image[6:, 3:].mean()
    assert out[1, 1] == image[3:6, 3:].mean() and out[2, 0] == image[6:, :3].mean()


def _truncate_encapsulated(path: Path, out: Path) -> Path:
    ds = pydicom.dcmread(path)
    frame = get_frame(ds.PixelData, 0, number_of_frames=1)
    ds.PixelData = encapsulate([frame[: len(frame) // 2]])
    ds.save_as(out, enforce_file_format=True)
    return out


@pytest.mark.parametrize("name", ["j2k_lossless", "jpeg_sv1", "jpegls_pydicom", "rle_pydicom"])
def test_truncated_compressed_pixel_data_raises_imaging_error(variants, tmp_path: Path, name: str) -> None:
    if name not in variants:
        pytest.skip("DCMTK command-line tools not installed")
    bad = _truncate_encapsulated(variants[name][0], tmp_path / "bad.dcm")
    for min_side in (256, 2048):
        with pytest.raises(ImagingError, match="corrupt or truncated"):
            load_for_models(bad, min_side=min_side)


def test_j2k_stream_that_disagrees_with_rows_and_columns_is_refused(variants, tmp_path: Path) -> None:
    ds = pydicom.dcmread(variants["j2k_lossless"][0])
    ds.Rows = ROWS - 2
    with pytest.raises(ImagingError, match="does not match its header"):
        load_for_models(ds, min_side=256)


def test_garbled_j2k_header_is_one_clear_error_without_decoder_tracebacks(variants, caplog) -> None:
    ds = pydicom.dcmread(variants["j2k_lossless"][0])
    frame = bytearray(get_frame(ds.PixelData, 0, number_of_frames=1))
    frame[100:140] = np.random.default_rng(0).integers(0, 256, 40, dtype=np.uint8).tobytes()
    ds.PixelData = encapsulate([bytes(frame)])
    with caplog.at_level("DEBUG"), pytest.raises(ImagingError, match="corrupt or truncated"):
        load_for_models(ds, min_side=256)
    assert not [r for r in caplog.records if r.levelname in ("WARNING", "ERROR")]


def test_truncated_native_pixel_data_and_non_dicom_file_raise_imaging_error(tmp_path: Path) -> None:
    ds = make_dx(chest_pixels(rows=200, cols=200))
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3 * 2]
    with pytest.raises(ImagingError, match="corrupt or truncated"):
        load_for_models(ds, min_side=100)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"this is not a DICOM file" * 20)
    with pytest.raises(ImagingError, match="not a readable DICOM file"):
        load_for_models(junk)
    with pytest.raises(ImagingError, match="file not found"):
        load_for_models(tmp_path / "missing.dcm")


@pytest.mark.parametrize("photometric", ["PALETTE COLOR", "YBR_FULL", "RGB"])
def test_unsupported_photometric_raises_a_clear_error(photometric: str) -> None:
    ds = make_dx(chest_pixels(rows=64, cols=64, bits=8), bits=8, photometric=photometric)
    if photometric != "PALETTE COLOR":
        ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
        ds.PixelData = np.repeat(chest_pixels(rows=64, cols=64, bits=8)[..., None], 3, axis=2).tobytes()
    with pytest.raises(ImagingError, match=f"unsupported photometric interpretation '{photometric}'"):
        load_for_models(ds)


def test_pixel_spacing_sources() -> None:
    ds = make_dx(chest_pixels(rows=64, cols=64), ImagerPixelSpacing=[0.2, 0.15],
                 EstimatedRadiographicMagnificationFactor=1.1)
    spacing, source = pixel_spacing(ds)
    assert spacing == pytest.approx((0.2 / 1.1, 0.15 / 1.1)) and "Magnification" in source
    del ds.EstimatedRadiographicMagnificationFactor
    assert pixel_spacing(ds) == ((0.2, 0.15), "ImagerPixelSpacing")
    ds.PixelSpacing, ds.PixelSpacingCalibrationType = [0.18, 0.14], "GEOMETRY"
    assert pixel_spacing(ds) == ((0.18, 0.14), "PixelSpacing")
    del ds.ImagerPixelSpacing, ds.PixelSpacingCalibrationType
    assert pixel_spacing(ds) == ((0.18, 0.14), "PixelSpacing")
    del ds.PixelSpacing
    assert pixel_spacing(ds) == (None, None)
    image = load_for_models(make_dx(chest_pixels(rows=64, cols=64), ImagerPixelSpacing=[0.3, 0.3]), min_side=32)
    assert image.pixel_spacing_mm == (0.3, 0.3) and image.spacing_source == "ImagerPixelSpacing"


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
def test_phantom_decodes_to_the_unit_image_the_models_were_trained_on(tmp_path: Path, photometric: str) -> None:
    phantom = pytest.importorskip("engines.train.phantom")
    pytest.importorskip("engines.train.phantom_dicom")
    from engines.preprocess import resize_area

    # plain processing: the check is about the decode path, not about how sharp a reader makes it
    case = phantom.generate_case(5, size=1100, tb=True, nodules=True, photometric=photometric,
                                 style="dr_plain")
    expected = phantom.unit_image(case)
    for syntax in (ExplicitVRLittleEndian, JPEG2000Lossless):
        path = tmp_path / f"{photometric}_{syntax}.dcm"
        phantom.write_dicom(case, path, transfer_syntax=syntax)
        full = load_for_models(path, min_side=4096)
        assert full.photometric == photometric and full.reduction == 0
        np.testing.assert_allclose(full.unit_image, expected, atol=1e-6)
        small = load_for_models(path, min_side=256)
        reference = resize_area(expected, *small.unit_image.shape)
        # a reduced-resolution JPEG 2000 decode is the wavelet's low-pass, not an area mean:
        # on the textured lung fields ~1.5 of 255 grey levels apart on average (0.0056)
        assert np.abs(small.unit_image - reference).mean() < 0.008
        assert small.pixel_spacing_mm == pytest.approx((case.pixel_spacing_mm,) * 2, rel=0.2)
