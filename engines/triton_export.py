"""``edge engines export-triton DIR``: a Triton Inference Server model repository from the manifests.

For each installed model folder, two repositories are written side by side:

- ``DIR/onnxruntime_onnx/<name>/``: ``config.pbtxt`` with ``platform: "onnxruntime_onnx"``
  and the ONNX file as ``<version>/model.onnx`` (any Triton server, CPU or GPU);
- ``DIR/tensorrt_plan/<name>/``: ``config.pbtxt`` with ``platform: "tensorrt_plan"``; the
  engine ``<version>/model.plan`` is built on the GPU server itself (a plan only runs on
  the GPU and TensorRT it was built with): the command line is in ``DIR/README.txt``.

The model name is the manifest's ``[model] name``; the Triton version number is derived
from the manifest's ``version`` (``major * 1000000 + minor * 1000 + patch``; ``0.1.0`` is
1000), and the manifest's version and sha256 are written as config ``parameters``
(``manifest_version``, ``manifest_sha256``), so a box can check that Triton serves exactly
the model its manifest describes (``engines.runners.triton_runner``).

Dynamic batching needs a batch dimension the server may vary. Most exports fix it to 1;
when ``onnx`` is installed the export makes it symbolic (inputs and outputs), checks with
ONNX Runtime that two images run as one batch and give the same outputs, and then writes
``max_batch_size`` and ``dynamic_batching`` so requests from many boxes are batched. Else
the model is served unbatched (``max_batch_size: 0``) and the config says why.
"""
from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engines.manifest import Manifest, load_manifest, read_verified_model

logger = logging.getLogger(__name__)

PLATFORMS = ("onnxruntime_onnx", "tensorrt_plan")
MAX_BATCH_SIZE = 8
QUEUE_DELAY_US = 2000
_TYPES = {"tensor(float)": "TYPE_FP32", "tensor(float16)": "TYPE_FP16", "tensor(int64)": "TYPE_INT64",
          "tensor(int32)": "TYPE_INT32", "tensor(uint8)": "TYPE_UINT8", "tensor(bool)": "TYPE_BOOL"}


def triton_version(version: str) -> int:
    """The Triton version number of a manifest version: ``x.y.z`` -> ``x*10^6 + y*10^3 + z``
    (each part below 1000); other version strings get 1 (the manifest version is still
    compared, through the ``manifest_version`` parameter)."""
    m = re.fullmatch(r"(\d{1,3})\.(\d{1,3})(?:\.(\d{1,3}))?", version.strip())
    if not m:
        return 1
    major, minor, patch = (int(p) if p else 0 for p in m.groups())
    return max(1, major * 1_000_000 + minor * 1_000 + patch)


@dataclass(frozen=True)
class Tensor:
    name: str
    data_type: str
    dims: tuple[int, ...]     # without the batch dimension when the model is batched


@dataclass(frozen=True)
class ModelLayout:
    """What a Triton config says about one model's tensors."""

    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    max_batch_size: int
    batching_note: str = ""


def _session_tensors(onnx_bytes: bytes) -> tuple[list[Tensor], list[Tensor]]:
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])

    def convert(items) -> list[Tensor]:
        return [Tensor(i.name, _TYPES.get(i.type, "TYPE_FP32"),
                       tuple(d if isinstance(d, int) else -1 for d in i.shape)) for i in items]
    return convert(session.get_inputs()), convert(session.get_outputs())


def batchable_onnx(manifest: Manifest, onnx_bytes: bytes) -> tuple[bytes | None, str]:
    """The ONNX model with a symbolic batch dimension, checked with ONNX Runtime, or
    (None, why not)."""
    if not manifest.input.batch:
        return None, "the model input has no batch dimension ([input] batch = false)"
    inputs, outputs = _session_tensors(onnx_bytes)
    if all(t.dims and t.dims[0] == -1 for t in (*inputs, *outputs)):
        return onnx_bytes, ""
    try:
        import onnx
    except ImportError:
        return None, "the batch dimension is fixed to 1 and onnx is not installed to free it"
    model = onnx.load_from_string(onnx_bytes)
    for value in (*model.graph.input, *model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims:
            dims[0].ClearField("dim_value")
            dims[0].dim_param = "batch"
    data = model.SerializeToString()
    try:
        import onnxruntime as ort

        one = np.random.default_rng(0).normal(size=manifest.input.shape).astype(np.float32)
        pair = np.concatenate([one, one * 0.5], axis=0)
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        reference = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
        name = manifest.input.name
        batched = session.run(None, {name: pair})
        single = reference.run(None, {name: one * 0.5})
        if not all(b.shape[0] == 2 and np.allclose(b[1:], s, atol=1e-4) for b, s in zip(batched, single)):
            return None, "the graph does not give the same outputs for a batch of 2 (fixed reshapes)"
    except Exception as exc:   # noqa: BLE001 - onnxruntime raises its own types
        return None, f"the graph does not run with a batch of 2 ({type(exc).__name__})"
    return data, ""


def model_layout(onnx_bytes: bytes, batched: bool, note: str = "") -> ModelLayout:
    inputs, outputs = _session_tensors(onnx_bytes)
    if batched:
        inputs = [Tensor(t.name, t.data_type, t.dims[1:]) for t in inputs]
        outputs = [Tensor(t.name, t.data_type, t.dims[1:]) for t in outputs]
    return ModelLayout(tuple(inputs), tuple(outputs), MAX_BATCH_SIZE if batched else 0, note)


def config_pbtxt(manifest: Manifest, layout: ModelLayout, *, platform: str | None = None,
                 backend: str | None = None, instance_kind: str = "KIND_AUTO",
                 extra_parameters: dict[str, str] | None = None) -> str:
    """A Triton ``config.pbtxt`` (protobuf text format) for one model."""
    version = triton_version(manifest.version)
    lines = [f'name: "{manifest.name}"']
    if platform:
        lines.append(f'platform: "{platform}"')
    if backend:
        lines.append(f'backend: "{backend}"')
    lines.append(f"max_batch_size: {layout.max_batch_size}")
    if layout.batching_note:
        lines.append(f"# not batched: {layout.batching_note}")
    lines.append(f"version_policy: {{ specific: {{ versions: [ {version} ] }} }}")

    def tensors(kind: str, items: tuple[Tensor, ...]) -> None:
        lines.append(f"{kind} [")
        lines.append(",\n".join(f'  {{ name: "{t.name}" data_type: {t.data_type} '
                                f'dims: [ {", ".join(str(d) for d in t.dims)} ] }}' for t in items))
        lines.append("]")
    tensors("input", layout.inputs)
    tensors("output", layout.outputs)
    if layout.max_batch_size > 0:
        lines.append(f"dynamic_batching {{ max_queue_delay_microseconds: {QUEUE_DELAY_US} }}")
    lines.append(f"instance_group [ {{ kind: {instance_kind} count: 1 }} ]")
    params = {"manifest_version": manifest.version, "manifest_sha256": manifest.sha256,
              **(extra_parameters or {})}
    for key, value in params.items():
        lines.append(f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}')
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Exported:
    name: str
    version: int
    batched: bool
    note: str
    paths: tuple[Path, ...]
    input_name: str = ""
    input_dims: tuple[int, ...] = ()   # without the batch dimension when batched


def export_model(folder: Path, out_dir: Path) -> Exported:
    """Write both repository variants of one model folder under ``out_dir``."""
    manifest = load_manifest(folder)
    original = read_verified_model(manifest)
    data, note = batchable_onnx(manifest, original)
    batched = data is not None
    served = data if batched else original
    layout = model_layout(served, batched, note)
    version = triton_version(manifest.version)
    extra = {"served_sha256": hashlib.sha256(served).hexdigest()}
    paths = []
    for platform in PLATFORMS:
        model_dir = Path(out_dir) / platform / manifest.name
        (model_dir / str(version)).mkdir(parents=True, exist_ok=True)
        kind = "KIND_GPU" if platform == "tensorrt_plan" else "KIND_AUTO"
        (model_dir / "config.pbtxt").write_text(config_pbtxt(
            manifest, layout, platform=platform, instance_kind=kind, extra_parameters=extra))
        # the ONNX file goes to both: the plan is built from it on the server
        (model_dir / str(version) / "model.onnx").write_bytes(served)
        paths.append(model_dir)
    return Exported(manifest.name, version, batched, note, tuple(paths), layout.inputs[0].name,
                    layout.inputs[0].dims)


README = """Triton model repositories written by `edge engines export-triton`.

onnxruntime_onnx/  any Triton server (CPU or GPU):
    tritonserver --model-repository={root}/onnxruntime_onnx

tensorrt_plan/     GPU servers: build each engine on the server itself, with its TensorRT:
{plans}
    tritonserver --model-repository={root}/tensorrt_plan

The model names and versions come from the manifests; the boxes check the parameters
manifest_version and manifest_sha256 before they use a model, and refuse a mismatch.
"""


def _shapes(e: Exported) -> str:
    dims = "x".join(str(d) for d in e.input_dims)
    return (f"--minShapes={e.input_name}:1x{dims} --optShapes={e.input_name}:4x{dims} "
            f"--maxShapes={e.input_name}:{MAX_BATCH_SIZE}x{dims} ")


def export_repository(models: list[Path], out_dir: Path) -> list[Exported]:
    """Export every model folder in ``models`` and write ``README.txt``."""
    out = [export_model(folder, out_dir) for folder in models]
    root = Path(out_dir).resolve()
    plans = "\n".join(
        f"    trtexec --onnx={root}/tensorrt_plan/{e.name}/{e.version}/model.onnx "
        + (_shapes(e) if e.batched else "")
        + f"--fp16 --saveEngine={root}/tensorrt_plan/{e.name}/{e.version}/model.plan" for e in out)
    (Path(out_dir) / "README.txt").write_text(README.format(root=root, plans=plans))
    return out
