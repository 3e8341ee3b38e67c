"""``edge engines build|list|verify``: manage TensorRT engines and check the model store.

- ``list``: every model folder with version, task, input size, sha256 ok/MISMATCH and the
  runner the appliance would use (nothing is built).
- ``build``: build (or reuse) the TensorRT engine of each model into the engine cache.
- ``verify``: run the cached TensorRT engine and ONNX Runtime (CPU, the reference) on the
  same reference input and compare what matters: the decisions, decoded by the manifest
  (each classifier label against its threshold: the "refer" flag; the detector's boxes,
  matched by label and IoU >= 0.5) and
  the numbers (max abs difference of every output; outputs larger than 1, box sizes in
  pixels, are judged relative to their largest value, so an FP16 engine is not failed for
  rounding a 40-pixel width by 0.02). It never builds: a missing engine is reported.
  The reference input is the model folder's ``reference_input.npy`` when present, else a
  procedural chest phantom with a TB pattern and nodules (so the decisions are not trivial).

Exit codes: 0 ok, 1 a model failed (decision or numbers differ, build error), 2 TensorRT or
a GPU is missing here, or the request itself is invalid (e.g. INT8 without a calibration
set), 3 no engine of that precision is built yet (run ``edge engines build``).
"""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np

from engines.checks import check_model_folder
from engines.builder import (DEFAULT_PRECISION, PRECISIONS, EngineBuildError, build_engine,
                             check_precision, find_cached_engine, tensorrt_unavailable_reason)
from engines.manifest import Manifest, ManifestError, ModelIntegrityError, load_manifest, read_verified_model
from engines.preprocess import to_model_input
from engines.runners.base import BackendUnavailable, Runner, RunnerError
from engines.runners.onnxruntime_runner import OnnxRuntimeRunner
from engines.store import describe_backend, model_folders

logger = logging.getLogger(__name__)

REFERENCE_INPUT = "reference_input.npy"
DEFAULT_TOLERANCE = {"fp32": 1e-3, "fp16": 1e-2, "int8": 5e-2}
EXIT_OK, EXIT_FAILED, EXIT_UNAVAILABLE, EXIT_NOT_BUILT = 0, 1, 2, 3
MATCH_IOU = 0.5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``build``, ``list`` and ``verify`` subcommands to ``parser``."""
    sub = parser.add_subparsers(dest="engines_command", metavar="{build,list,verify,export-triton}")
    sub.required = True
    build = sub.add_parser("build", help="build (or reuse) TensorRT engines into the engine cache")
    build.add_argument("--precision", choices=PRECISIONS, default=None,
                       help="engine precision (default: [models] precision of the config, fp16; "
                            "int8 needs a calibration set)")
    build.add_argument("--calibration", type=Path, metavar="DIR",
                       help="folder of .npy model-input tensors for INT8 calibration")
    build.add_argument("--model", metavar="NAME", help="only this model (default: all)")
    build.add_argument("--force", action="store_true", help="rebuild even when a cached engine is valid")
    sub.add_parser("list", help="list models, their integrity and the runner that would be used")
    verify = sub.add_parser("verify", help="compare TensorRT engines with onnxruntime on a reference input")
    verify.add_argument("--tolerance", type=float, default=None,
                        help="largest allowed output difference (default: 1e-2 for fp16, "
                             "1e-3 for fp32, 5e-2 for int8)")
    verify.add_argument("--precision", choices=PRECISIONS, default=None,
                        help="precision of the engine to verify (default: [models] precision of "
                             "the config, fp16)")
    verify.add_argument("--calibration", type=Path, metavar="DIR", help="calibration set of an int8 engine")
    verify.add_argument("--model", metavar="NAME", help="only this model (default: all)")
    export = sub.add_parser("export-triton", help="write a Triton Inference Server model repository "
                            "(onnxruntime_onnx and tensorrt_plan variants) for the installed models")
    export.add_argument("directory", type=Path, metavar="DIR", help="output folder")
    export.add_argument("--model", metavar="NAME", help="only this model (default: all)")


def reference_input(manifest: Manifest) -> np.ndarray:
    """The model folder's ``reference_input.npy``, else a chest phantom (deterministic) with a
    TB pattern and nodules, preprocessed like a real image; a smooth synthetic image when
    the phantom generator is not installed."""
    path = manifest.folder / REFERENCE_INPUT
    if path.is_file():
        tensor = np.load(path).astype(np.float32)
        if tensor.size != int(np.prod(manifest.input.shape)):
            raise ManifestError(f"{path}: shape {list(tensor.shape)} does not match the model "
                                f"input {list(manifest.input.shape)}")
        return tensor.reshape(manifest.input.shape)
    h, w = manifest.input.height, manifest.input.width
    try:
        from engines.train.phantom import generate_case, unit_image
        unit = unit_image(generate_case(20240, size=max(h, w, 512), tb=True, nodules=True))
    except ImportError:
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        y, x = y / max(h - 1, 1), x / max(w - 1, 1)
        unit = 0.35 + 0.25 * x + 0.15 * np.sin(6.0 * y)
        r = np.hypot(x - 0.62, y - 0.40)
        unit += 0.35 * (r < 0.08) + 0.1 * np.exp(-((r - 0.25) ** 2) / 0.002)
    return to_model_input(np.clip(unit, 0.0, 1.0), h, w, manifest.input.mean, manifest.input.std)


@dataclass(frozen=True)
class DecisionCheck:
    """Whether the engine decides what ONNX Runtime decides on the reference input."""
    agree: bool
    text: str


@dataclass(frozen=True)
class OutputDiff:
    name: str
    max_abs_diff: float
    scale: float          # max(1, max |reference|)
    tolerance: float

    @property
    def scaled_diff(self) -> float:
        """The difference relative to the output's magnitude when it exceeds 1 (pixel sizes)."""
        return self.max_abs_diff / self.scale

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.max_abs_diff)) and self.scaled_diff <= self.tolerance


def compare_runners(reference: Runner, candidate: Runner, inputs: dict[str, np.ndarray],
                    names: list[str], tolerance: float) -> list[OutputDiff]:
    """Run both runners on ``inputs`` and compare the outputs ``names``."""
    return compare_outputs(reference.run(inputs), candidate.run(inputs), names, tolerance)


def compare_outputs(expected: dict[str, np.ndarray], actual: dict[str, np.ndarray],
                    names: list[str], tolerance: float) -> list[OutputDiff]:
    """Max abs difference of each output ``names`` (scaled when the output exceeds 1)."""
    diffs = []
    for name in names:
        ref = np.asarray(expected[name], dtype=np.float64)
        got = np.asarray(actual[name], dtype=np.float64)
        if ref.shape != got.shape:
            raise RunnerError(f"output {name!r}: shape {list(got.shape)} differs from onnxruntime's "
                              f"{list(ref.shape)}")
        diff = float(np.max(np.abs(ref - got))) if ref.size else 0.0
        scale = max(1.0, float(np.max(np.abs(ref))) if ref.size else 1.0)
        diffs.append(OutputDiff(name, diff if np.isfinite(diff) else float("inf"), scale, tolerance))
    return diffs


def _selected(models_dir: Path, name: str | None, err: TextIO) -> list[Path] | None:
    try:
        folders = model_folders(models_dir)
    except ManifestError as exc:
        print(f"engines: {exc}", file=err)
        return None
    if name is not None:
        folders = [f for f in folders if f.name == name]
        if not folders:
            print(f"engines: no model {name!r} in {models_dir}", file=err)
            return None
    if not folders:
        print(f"engines: no model folders (with manifest.toml) in {models_dir}", file=err)
        return None
    return folders


def _list(models_dir: Path, cache_dir: Path, backend: str, precision: str,
          calibration_dir: Path | str | None, out: TextIO, err: TextIO) -> int:
    folders = _selected(models_dir, None, err)
    if folders is None:
        return EXIT_FAILED
    header = ("MODEL", "VERSION", "TASK", "INPUT", "SHA256", "RUNNER")
    rows, problems = [], []
    for folder in folders:
        try:
            manifest = load_manifest(folder)
        except ManifestError as exc:
            rows.append((folder.name, "-", "-", "-", "-", "ERROR (manifest)"))
            problems.append(str(exc))
            continue
        try:
            read_verified_model(manifest)
            integrity = "ok"
        except ModelIntegrityError as exc:
            integrity = "MISSING" if "not found" in str(exc) else "MISMATCH"
            problems.append(str(exc))
        runner = (describe_backend(manifest, backend, cache_dir, precision, calibration_dir)
                  if integrity == "ok" else "none (not loadable)")
        rows.append((manifest.name, manifest.version, manifest.task,
                     f"{manifest.input.width}x{manifest.input.height}", integrity, runner))
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip(), file=out)
    for problem in problems:
        print(f"problem: {problem}", file=err)
    return EXIT_FAILED if problems else EXIT_OK


def _unavailable(action: str, err: TextIO) -> int | None:
    reason = tensorrt_unavailable_reason()
    if reason is None:
        return None
    print(f"engines {action}: TensorRT is not usable here: {reason}. Nothing was built; the "
          "appliance runs the models with onnxruntime on this machine.", file=err)
    return EXIT_UNAVAILABLE


def _build(args: argparse.Namespace, models_dir: Path, cache_dir: Path, out: TextIO, err: TextIO) -> int:
    try:
        check_precision(args.precision, args.calibration)
    except EngineBuildError as exc:
        print(f"engines build: {exc}", file=err)
        return EXIT_UNAVAILABLE
    code = _unavailable("build", err)
    if code is not None:
        return code
    folders = _selected(models_dir, args.model, err)
    if folders is None:
        return EXIT_FAILED
    status = EXIT_OK
    for folder in folders:
        try:
            result = build_engine(load_manifest(folder), cache_dir, precision=args.precision,
                                  calibration_dir=args.calibration, force=args.force)
        except (ManifestError, ModelIntegrityError, EngineBuildError, RunnerError, OSError) as exc:
            print(f"{folder.name}: FAILED: {exc}", file=err)
            status = EXIT_FAILED
            continue
        what = "cached, reused" if result.reused else f"built in {result.seconds:.1f} s"
        print(f"{folder.name}: {args.precision} engine {result.path} ({what})", file=out)
    return status


def _verify(args: argparse.Namespace, models_dir: Path, cache_dir: Path, out: TextIO, err: TextIO) -> int:
    try:
        check_precision(args.precision, args.calibration)
    except EngineBuildError as exc:
        print(f"engines verify: {exc}", file=err)
        return EXIT_UNAVAILABLE
    code = _unavailable("verify", err)
    if code is not None:
        return code
    folders = _selected(models_dir, args.model, err)
    if folders is None:
        return EXIT_FAILED
    from engines.runners.tensorrt_runner import TensorRTRunner

    tolerance = args.tolerance if args.tolerance is not None else DEFAULT_TOLERANCE[args.precision]
    status = EXIT_OK
    for folder in folders:
        try:
            manifest = load_manifest(folder)
            engine = find_cached_engine(manifest, cache_dir, args.precision, args.calibration)
            if engine is None:
                build = f"edge engines build --precision {args.precision}" + (
                    f" --calibration {args.calibration}" if args.calibration else "")
                print(f"{folder.name}: no {args.precision} engine built yet (nothing was built); "
                      f"run `{build}`", file=err)
                status = max(status, EXIT_NOT_BUILT) if status != EXIT_FAILED else status
                continue
            tensor = reference_tensor(manifest)
            inputs = {manifest.input.name: tensor}
            with OnnxRuntimeRunner(read_verified_model(manifest), device="cpu", label=manifest.name) as ref, \
                    TensorRTRunner(engine, label=engine.name) as trt_runner:
                expected, actual = ref.run(inputs), trt_runner.run(inputs)
            diffs = compare_outputs(expected, actual, manifest.output_names, tolerance)
            decision = compare_findings(manifest, expected, actual)
        except (ManifestError, ModelIntegrityError, EngineBuildError, RunnerError, OSError) as exc:
            print(f"{folder.name}: FAILED: {exc}", file=err)
            status = EXIT_FAILED
            continue
        print(f"{manifest.name}: {decision.text}", file=out)
        if not decision.agree:
            status = EXIT_FAILED
        for d in diffs:
            verdict = "ok" if d.ok else "ABOVE TOLERANCE"
            print(f"{manifest.name} {d.name}: max abs diff {d.max_abs_diff:.3g} "
                  f"(scaled {d.scaled_diff:.3g}, tolerance {tolerance:g}) {verdict}", file=out)
            if not d.ok:
                status = EXIT_FAILED
    return status


def run(args: argparse.Namespace, *, models_dir: Path, cache_dir: Path, backend: str,
        precision: str = DEFAULT_PRECISION, calibration_dir: Path | str | None = None,
        out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run the parsed ``engines`` subcommand; returns the process exit code. ``precision``
    and ``calibration_dir`` (the config's) apply when the command line does not say."""
    out, err = out or sys.stdout, err or sys.stderr
    command = getattr(args, "engines_command", None)
    if getattr(args, "precision", "") is None:
        args.precision = precision
    if getattr(args, "calibration", "") is None and getattr(args, "precision", None) == "int8" \
            and calibration_dir is not None:
        args.calibration = Path(calibration_dir)
    try:
        if command == "list":
            return _list(Path(models_dir), Path(cache_dir), backend, precision, calibration_dir, out, err)
        if command == "build":
            return _build(args, Path(models_dir), Path(cache_dir), out, err)
        if command == "verify":
            return _verify(args, Path(models_dir), Path(cache_dir), out, err)
        if command == "export-triton":
            return _export_triton(args, Path(models_dir), out, err)
    except BackendUnavailable as exc:
        print(f"engines {command}: {exc}", file=err)
        return EXIT_UNAVAILABLE
    raise ValueError(f"unknown engines command {command!r}; expected build, list or verify")


def _export_triton(args: argparse.Namespace, models_dir: Path, out: TextIO, err: TextIO) -> int:
    from engines.triton_export import export_repository

    try:
        folders = model_folders(models_dir)
        if args.model:
            folders = [f for f in folders if load_manifest(f).name == args.model]
            if not folders:
                print(f"engines export-triton: no model named {args.model!r} in {models_dir}", file=err)
                return EXIT_FAILED
        exported = export_repository(folders, args.directory)
    except (ManifestError, ModelIntegrityError, OSError) as exc:
        print(f"engines export-triton: {exc}", file=err)
        return EXIT_FAILED
    for e in exported:
        batching = "dynamic batching" if e.batched else f"not batched ({e.note})"
        print(f"{e.name}: Triton version {e.version}, {batching}", file=out)
    print(f"repositories written to {args.directory}: onnxruntime_onnx/ and tensorrt_plan/ "
          f"(see {args.directory / 'README.txt'})", file=out)
    return EXIT_OK


# ---------------------------------------------------------------- any decoding (add-ons)
def reference_tensor(manifest: Manifest) -> np.ndarray:
    """:func:`reference_input` for any ``[input]`` (channels, letterbox, crop...): the same
    tensor as :func:`reference_input` for the shipped single-channel models."""
    path = manifest.folder / REFERENCE_INPUT
    if path.is_file():
        return reference_input(manifest)
    from engines.preprocess import prepare_input
    from engines.train.phantom import generate_case, unit_image

    side = max(manifest.input.height, manifest.input.width, 512)     # as reference_input
    unit = unit_image(generate_case(20240, size=side, tb=True, nodules=True))
    return prepare_input(unit, manifest.input).tensor


def compare_findings(manifest: Manifest, expected: dict[str, np.ndarray],
                     actual: dict[str, np.ndarray]) -> DecisionCheck:
    """Whether the engine decides what ONNX Runtime decides, for any decoding: the same
    findings (label and positive for each class: the refer flag; detections matched one
    to one by label and IoU >= MATCH_IOU)."""
    from engines.decode import box_iou
    from engines.findings import decode_findings

    want, got = decode_findings(expected, manifest), decode_findings(actual, manifest)
    if manifest.task == "classification":
        same = [(f.label, f.positive) for f in want] == [(f.label, f.positive) for f in got]
        worst = max((abs(a.score - b.score) for a, b in zip(want, got)), default=0.0)
        verdict = "same" if same else "DIFFERENT"
        if len(want) == 1 and len(got) == 1:   # one score: the refer flag
            flag = "positive" if got[0].positive else "negative"
            return DecisionCheck(same, f"decision {verdict}: score {got[0].score:.4f} vs onnxruntime "
                                       f"{want[0].score:.4f} at threshold {got[0].threshold:g} ({flag})")
        return DecisionCheck(same, f"decision {verdict}: {sum(f.positive for f in got)} positive label(s) "
                                   f"vs onnxruntime {sum(f.positive for f in want)}, largest score "
                                   f"difference {worst:.4f}")
    free = list(got)
    matched = 0
    for f in want:
        candidates = [g for g in free if g.label == f.label]
        if not candidates:
            continue
        ious = box_iou(np.array(f.box), np.array([g.box for g in candidates]))
        best = int(np.argmax(ious))
        if ious[best] >= MATCH_IOU:
            matched += 1
            free.remove(candidates[best])
    same = matched == len(want) == len(got)
    return DecisionCheck(same, f"decision {'same' if same else 'DIFFERENT'}: {len(got)} box(es) vs "
                               f"onnxruntime {len(want)}, {matched} matched by label at IoU >= {MATCH_IOU}")


# ---------------------------------------------------------------- edge models check DIR
__all__ = ["add_arguments", "add_models_arguments", "check_model_folder", "compare_findings", "run",
           "run_models", "reference_tensor"]


def add_models_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``check`` subcommand of ``edge models`` to ``parser``."""
    sub = parser.add_subparsers(dest="models_command", metavar="{check}")
    sub.required = True
    check = sub.add_parser("check", help="validate a model folder and run it on a chest phantom")
    check.add_argument("folder", type=Path, metavar="DIR", help="model folder (manifest.toml, model.onnx)")
    check.add_argument("--runs", type=int, default=5, help="timed inference runs (default 5)")


def run_models(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run the parsed ``models`` subcommand; returns the exit code (0 ok, 1 refused)."""
    command = getattr(args, "models_command", None)
    if command == "check":
        return check_model_folder(args.folder, out, err, runs=args.runs)
    raise ValueError(f"unknown models command {command!r}; expected check")
