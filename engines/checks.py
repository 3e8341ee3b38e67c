"""``edge models check DIR``: can this model folder be installed, and what does it find?

:func:`check_model_folder` loads a model folder the way the appliance does (manifest,
sha256, ONNX Runtime on the CPU), checks that the network's tensors fit what the manifest
declares (input name and shape, output names, output shapes for the declared decoding,
one ``[[findings]]`` entry per class), runs it on a built-in chest phantom, and prints the
findings in full-image pixels and the timing. It also lists the ONNX operators that the
TensorRT 10 ONNX parser does not support (the model then runs on ONNX Runtime only, 10-50x
slower on a Jetson). A broken or mismatched model is refused with one line on ``err``.

Exit codes: 0 the model can be installed; 1 refused.
"""
from __future__ import annotations

import logging
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from engines.decode import OutputShapeError
from engines.findings import Finding, check_output_shapes, decode_findings, refer_flag, to_full_image
from engines.manifest import Manifest, ManifestError, ModelIntegrityError, load_manifest, read_verified_model
from engines.preprocess import prepare_input
from engines.runners.base import RunnerError

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_REFUSED = 0, 1
PHANTOM_SEED, PHANTOM_COLUMNS = 20240, 1024
MAX_LISTED = 20            # findings printed one per line

# ONNX operators the TensorRT 10 ONNX parser supports ("Y" rows of the operator support
# matrix, docs/operators.md of onnx/onnx-tensorrt, branch 10.1-GA, commit 96e7811, June 2024:
# "TensorRT 10.0 supports operators in the inclusive range of opset 9 to opset 20").
TENSORRT_SOURCE = "ONNX-TensorRT 10.1 operator support matrix (onnx/onnx-tensorrt docs/operators.md)"
TENSORRT_OPSETS = (9, 20)
TENSORRT_SUPPORTED = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast
CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum
DeformConv DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike
Flatten Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool
GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization GRU HardSigmoid HardSwish
Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu
Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean
MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad
ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform
RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax
ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence
RNN RoiAlign Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid
Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan
Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())
# Resize modes the parser takes (same matrix, "Resize" restrictions).
TENSORRT_RESIZE_MODES = frozenset({"nearest", "linear"})


class ModelRefused(ManifestError):
    """The folder cannot be installed; the message is the one line the user sees."""


@dataclass
class OperatorReport:
    """What the TensorRT 10 parser would say about the ONNX operators (by the table above)."""

    opset: int | None = None
    operators: set[str] = field(default_factory=set)
    unsupported: list[str] = field(default_factory=list)
    checked: bool = True

    @property
    def text(self) -> str:
        if not self.checked:
            return "tensorrt 10: operators not checked (the onnx package is not installed)"
        parts = []
        if self.unsupported:
            parts.append(f"NOT buildable: {', '.join(self.unsupported)}; this model would run on "
                         "onnxruntime only (10-50x slower on a Jetson)")
        else:
            parts.append(f"all {len(self.operators)} operator types supported")
        if self.opset is not None and not TENSORRT_OPSETS[0] <= self.opset <= TENSORRT_OPSETS[1]:
            parts.append(f"opset {self.opset} is outside {TENSORRT_OPSETS[0]}-{TENSORRT_OPSETS[1]}")
        elif self.opset is not None:
            parts.append(f"opset {self.opset}")
        return f"tensorrt 10: {'; '.join(parts)} [{TENSORRT_SOURCE}]"


def tensorrt_operator_report(onnx_bytes: bytes) -> OperatorReport:
    """Operator types of the model (subgraphs included) checked against TensorRT 10's list."""
    try:
        import onnx
    except ImportError:
        return OperatorReport(checked=False)
    model = onnx.load_from_string(onnx_bytes)
    report = OperatorReport()
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            report.opset = int(imp.version)
    problems: set[str] = set()

    def walk(graph: Any) -> None:
        for node in graph.node:
            domain = node.domain if node.domain not in ("", "ai.onnx") else ""
            name = f"{domain}:{node.op_type}" if domain else node.op_type
            report.operators.add(name)
            if domain or node.op_type not in TENSORRT_SUPPORTED:
                problems.add(name)
            if node.op_type == "Resize":
                for attr in node.attribute:
                    if attr.name == "mode" and attr.s.decode() not in TENSORRT_RESIZE_MODES:
                        problems.add(f"Resize(mode={attr.s.decode()})")
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)
                for sub in attr.graphs:
                    walk(sub)

    walk(model.graph)
    report.unsupported = sorted(problems)
    return report


def phantom_image() -> np.ndarray:
    """The built-in test image: a procedural chest phantom with a TB pattern and nodules."""
    from engines.train.phantom import generate_case, unit_image

    return unit_image(generate_case(PHANTOM_SEED, size=PHANTOM_COLUMNS, tb=True, nodules=True))


@dataclass
class CheckReport:
    manifest: Manifest
    operators: OperatorReport
    output_shapes: dict[str, list[int]]
    findings: list[Finding]
    image_hw: tuple[int, int]
    preprocess_ms: float
    inference_ms: float
    decode_ms: float
    warnings: list[str]


def check_io(manifest: Manifest, runner: Any) -> None:
    """The network's tensors must be what the manifest declares: its one input (name,
    rank, fixed sizes), every named output, and output shapes that fit the declared
    decoding and class list (where the network fixes them). Raises :class:`ModelRefused`
    (a :class:`ManifestError`) naming the key. Used at load (``engines.store``) and by
    ``edge models check``."""
    spec = manifest.input
    if runner.input_names != [spec.name]:
        raise ModelRefused(f"{manifest.path}: key 'input.name' is {spec.name!r} but the network's "
                           f"inputs are {runner.input_names} (it must have exactly that one input)")
    shape = list(getattr(runner, "input_shapes", {}).get(spec.name, []))
    if shape and len(shape) != len(spec.shape):
        raise ModelRefused(f"{manifest.path}: the network takes {spec.name!r} {shape} but the manifest "
                           f"declares {list(spec.shape)} (check input.batch)")
    keys = ("batch", "channels", "height", "width")[-len(shape):] if shape else ()
    for have, want, key in zip(shape, spec.shape, keys):
        if isinstance(have, int) and have > 0 and have != want:
            raise ModelRefused(f"{manifest.path}: key 'input.{key}' gives {want} but the network takes "
                               f"{spec.name!r} {shape}")
    missing = [n for n in manifest.output_names if n not in runner.output_names]
    if missing:
        raise ModelRefused(f"{manifest.path}: [output] names {missing} are not outputs of "
                           f"{manifest.onnx_path.name}, which has {runner.output_names}")
    shapes = getattr(runner, "output_shapes", None)
    problems = check_output_shapes(manifest, shapes) if shapes is not None else []
    if problems:
        raise ModelRefused(f"{manifest.path}: {problems[0]}")


def inspect_model_folder(folder: Path | str, *, runs: int = 5,
                         image: np.ndarray | None = None) -> CheckReport:
    """Everything :func:`check_model_folder` prints; raises :class:`ModelRefused`."""
    from engines.runners.onnxruntime_runner import OnnxRuntimeRunner

    folder = Path(folder)
    try:
        manifest = load_manifest(folder)
        onnx_bytes = read_verified_model(manifest)
    except (ManifestError, ModelIntegrityError) as exc:
        raise ModelRefused(str(exc)) from exc
    try:
        operators = tensorrt_operator_report(onnx_bytes)
    except Exception as exc:   # noqa: BLE001 - onnx raises DecodeError and others
        raise ModelRefused(f"{manifest.onnx_path}: not a readable ONNX file ({exc})") from exc
    try:
        runner = OnnxRuntimeRunner(onnx_bytes, device="cpu", label=f"{manifest.name} ({manifest.onnx_path})")
    except RunnerError as exc:
        raise ModelRefused(str(exc)) from exc
    with runner:
        check_io(manifest, runner)
        unit = phantom_image() if image is None else np.asarray(image, dtype=np.float32)
        t0 = time.perf_counter()
        prepared = prepare_input(unit, manifest.input)
        t1 = time.perf_counter()
        feed = {manifest.input.name: prepared.tensor}
        try:
            outputs = runner.run(feed)
            times = []
            for _ in range(max(1, runs)):
                start = time.perf_counter()
                runner.run(feed)
                times.append((time.perf_counter() - start) * 1000.0)
        except RunnerError as exc:
            raise ModelRefused(f"{manifest.onnx_path}: running it on the phantom failed: {exc}") from exc
    shapes = {name: list(np.shape(value)) for name, value in outputs.items()}
    problems = check_output_shapes(manifest, shapes)
    if problems:
        raise ModelRefused(f"{manifest.path}: on the phantom, {problems[0]}")
    t2 = time.perf_counter()
    try:
        found = decode_findings({k: np.asarray(v, dtype=np.float32) for k, v in outputs.items()}, manifest)
    except (OutputShapeError, KeyError, ValueError) as exc:
        raise ModelRefused(f"{manifest.path}: the outputs do not decode as {manifest.decoding!r}: "
                           f"{exc}") from exc
    decode_ms = (time.perf_counter() - t2) * 1000.0
    warnings = [f"[[findings]] {f.label!r} has no code: reports will carry its display text only; "
                "add code, scheme and meaning" for f in manifest.findings if f.code is None and f.report]
    if manifest.decoding == "boxes_scores_labels":
        spec = manifest.output
        labels = {int(round(float(v))) for v in np.asarray(outputs[spec.labels]).reshape(-1)}
        unknown = sorted(labels - {f.index for f in manifest.findings})
        if unknown:
            warnings.append(f"the model output class index(es) {unknown}, which no [[findings]] index "
                            "names; such detections are dropped")
    if not manifest.clinical_use:
        warnings.append("model.clinical_use is false: results are labelled not for clinical use")
    return CheckReport(manifest=manifest, operators=operators, output_shapes=shapes,
                       findings=to_full_image(found, prepared.geometry), image_hw=unit.shape[:2],
                       preprocess_ms=(t1 - t0) * 1000.0, inference_ms=statistics.median(times),
                       decode_ms=decode_ms, warnings=warnings)


def _describe(f: Finding) -> str:
    code = f" ({f.code.scheme} {f.code.value} \"{f.code.meaning}\")" if f.code else " (no code)"
    verdict = ("POSITIVE" if f.positive else "negative") + (", REFER" if f.refer else "")
    box = ""
    if f.box is not None:
        x1, y1, x2, y2 = f.box
        box = f", box ({x1:.1f}, {y1:.1f})-({x2:.1f}, {y2:.1f}) px"
    return f"  {f.display}{code}: score {f.score:.3f} at threshold {f.threshold:.3f}: {verdict}{box}"


def check_model_folder(path: Path | str, out: TextIO | None = None, err: TextIO | None = None,
                       *, runs: int = 5) -> int:
    """``edge models check DIR``: print what the model folder is and finds; 0 ok, 1 refused."""
    out, err = out or sys.stdout, err or sys.stderr
    try:
        report = inspect_model_folder(path, runs=runs)
    except ModelRefused as exc:
        print("refused: " + " ".join(str(exc).split()), file=err)
        return EXIT_REFUSED
    m, spec = report.manifest, report.manifest.input
    print(f"model {m.name} {m.version}: {m.task}, decoding {m.decoding}, from {m.folder}", file=out)
    print(f"manifest ok, sha256 ok; input {spec.name} {list(spec.shape)}, resize {spec.resize} "
          f"({spec.interpolation}), value range {spec.value_range[0]:g}..{spec.value_range[1]:g}, "
          f"mean {spec.mean}, std {spec.std}", file=out)
    shapes = ", ".join(f"{name} {shape}" for name, shape in report.output_shapes.items())
    labels = ", ".join(f.label + ("" if f.report else " (not reported)") for f in m.findings)
    print(f"outputs: {shapes}; {len(m.findings)} label(s): {labels}", file=out)
    print(report.operators.text, file=out)
    rows, cols = report.image_hw
    print(f"phantom {cols} x {rows} px: preprocess {report.preprocess_ms:.1f} ms, inference "
          f"{report.inference_ms:.1f} ms (median of {max(1, runs)}, onnxruntime cpu), decode "
          f"{report.decode_ms:.1f} ms", file=out)
    positives = [f for f in report.findings if f.positive]
    print(f"findings on the phantom: {len(report.findings)} ({len(positives)} positive); refer flag: "
          f"{'YES' if refer_flag(report.findings) else 'no'}", file=out)
    for f in report.findings[:MAX_LISTED]:
        print(_describe(f), file=out)
    if len(report.findings) > MAX_LISTED:
        print(f"  ... and {len(report.findings) - MAX_LISTED} more", file=out)
    for warning in report.warnings:
        print(f"warning: {warning}", file=out)
    print(f"OK: {m.name} {m.version} can be installed", file=out)
    return EXIT_OK
