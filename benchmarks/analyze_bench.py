"""Time decode-to-model-input and whole analysis of a 2k x 2k chest image per transfer syntax.

    python -m benchmarks.analyze_bench [--runs 20] [--size 2048] [--models-dir DIR] [--backend auto]

The image is a project phantom (``engines.train.phantom``) when that module is installed,
otherwise a synthetic 12-bit chest-like picture. It is written uncompressed, as JPEG 2000
lossless (pydicom + OpenJPEG) and as JPEG lossless SV1 (DCMTK ``dcmcjpeg``), then each
file is read and analyzed ``--runs`` times with the models warm; medians are printed.
Columns: read (dcmread), decode (pixels to unit image), preprocess (model tensors),
prepare (read + triage + decode + preprocess), analyze (prepare + inference), in ms.
"""
from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

from edge.analysis import Analyzer
from edge.imaging import load_for_models

logger = logging.getLogger(__name__)

DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"


def synthetic_chest(size: int, seed: int = 0) -> Dataset:
    """A 12-bit DX For Presentation dataset with smooth chest-like content and mild noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = 0.55 + 0.08 * np.sin(3 * xx) * np.cos(2 * yy)
    for cx in (0.3, 0.7):
        img -= 0.3 * np.exp(-(((xx - cx) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2) ** 2)
    img += 0.25 * np.exp(-((xx - 0.5) / 0.04) ** 2)
    img += rng.normal(0, 0.01, img.shape).astype(np.float32)
    pixels = np.clip(img * 4095, 0, 4095).astype(np.uint16)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = DX_PRESENTATION
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition, ds.PatientAge = "DX", "CHEST", "PA", "040Y"
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.ImagerPixelSpacing = [0.15, 0.15]
    ds.PixelData = pixels.tobytes()
    return ds


def make_inputs(folder: Path, size: int) -> dict[str, Path]:
    """The benchmark image in each transfer syntax; label -> file."""
    source = folder / "uncompressed.dcm"
    try:
        from engines.train import phantom  # type: ignore[attr-defined]

        phantom.write_dicom(phantom.generate_case(0, size=size), source,
                            transfer_syntax=ExplicitVRLittleEndian)
        origin = "phantom"
    except ImportError:
        synthetic_chest(size).save_as(source, enforce_file_format=True)
        origin = "synthetic"
    logger.info("benchmark image: %s, %d x %d", origin, size, size)
    files = {"uncompressed": source}
    ds = pydicom.dcmread(source)
    ds.compress(JPEG2000Lossless, generate_instance_uid=False)
    ds.save_as(folder / "j2k.dcm", enforce_file_format=True)
    files["JPEG 2000 lossless"] = folder / "j2k.dcm"
    if shutil.which("dcmcjpeg"):
        subprocess.run(["dcmcjpeg", "+e1", str(source), str(folder / "sv1.dcm")], check=True, timeout=120)
        files["JPEG lossless SV1"] = folder / "sv1.dcm"
    else:
        logger.warning("dcmcjpeg not found: JPEG lossless not measured")
    return files


def _median_ms(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def bench_file(path: Path, runs: int, analyzer: Analyzer | None, min_side: int) -> dict[str, float]:
    """Median timings (ms) for one file; the first run of each kind is a discarded warm-up."""
    cols: dict[str, list[float]] = {k: [] for k in ("read", "decode", "preprocess", "prepare", "analyze")}
    for i in range(runs + 1):
        t = time.perf_counter()
        ds = pydicom.dcmread(path)
        read_ms = (time.perf_counter() - t) * 1000.0
        if analyzer is None:
            image = load_for_models(ds, min_side=min_side)
            if i:
                cols["read"].append(read_ms)
                cols["decode"].append(image.decode_ms)
            continue
        t = time.perf_counter()
        prepared = analyzer.prepare(path)
        prepare_ms = (time.perf_counter() - t) * 1000.0
        analyzer.infer(prepared)
        analyze_ms = (time.perf_counter() - t) * 1000.0
        if i:
            cols["read"].append(prepared.timings_ms["read"])
            cols["decode"].append(prepared.timings_ms["decode"])
            cols["preprocess"].append(prepared.timings_ms["preprocess"])
            cols["prepare"].append(prepare_ms)
            cols["analyze"].append(analyze_ms)
    return {k: _median_ms(v) for k, v in cols.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="timed runs per file (median reported)")
    parser.add_argument("--size", type=int, default=2048, help="image side in pixels")
    parser.add_argument("--models-dir", type=Path, default=None,
                        help="model folders (default: the shipped engines/models)")
    parser.add_argument("--backend", default="auto", help="auto, onnxruntime or tensorrt")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.runs < 1 or args.size < 64:
        parser.error("--runs must be >= 1 and --size >= 64")

    from engines import DEFAULT_MODELS_DIR

    models_dir = args.models_dir or DEFAULT_MODELS_DIR
    analyzer, models = None, {}
    try:
        from engines.store import load_models

        models = load_models(models_dir, args.backend)
        analyzer = Analyzer(models)
        logger.info("models: %s", ", ".join(f"{m.name} {m.manifest.version} ({m.backend})"
                                            for m in models.values()))
    except Exception as exc:  # noqa: BLE001 - decode timings are still worth printing
        logger.warning("models not loaded from %s (%s): timing decode only", models_dir, exc)
    min_side = analyzer.decode_min_side if analyzer else 512

    with tempfile.TemporaryDirectory(prefix="analyze_bench_") as tmp:
        files = make_inputs(Path(tmp), args.size)
        rows = [(label, path.stat().st_size, bench_file(path, args.runs, analyzer, min_side))
                for label, path in files.items()]
    for model in models.values():
        model.close()

    print(f"\n{args.size} x {args.size}, decode min side {min_side}, median of {args.runs} runs (ms)")
    header = f"{'transfer syntax':<20} {'MB':>6} {'read':>7} {'decode':>7} {'preproc':>8} {'prepare':>8} {'analyze':>8}"
    print(header)
    print("-" * len(header))
    for label, size, t in rows:
        print(f"{label:<20} {size / 1e6:>6.2f} {t['read']:>7.1f} {t['decode']:>7.1f} {t['preprocess']:>8.1f} "
              f"{t['prepare']:>8.1f} {t['analyze']:>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
