"""Export trained networks to ONNX and write the model folder (manifest, card).

The exported graph is static-shaped ``[1, 1, H, W]``, opset 17, batch norm folded into the
convolutions, and is checked to contain only operations TensorRT 10 builds. After export
the ONNX file is run once through ONNX Runtime and compared with PyTorch, so a broken
export never reaches ``engines/models``.
"""
from __future__ import annotations

import copy
import json
import hashlib
import inspect
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

logger = logging.getLogger(__name__)

OPSET = 17
ALLOWED_OPS = frozenset({"Conv", "Relu", "Sigmoid", "Add", "Concat", "Resize", "MaxPool",
                         "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Reshape",
                         "Flatten", "ConvTranspose", "Constant", "Identity", "Mul"})


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Copy of ``model`` in eval mode with every Conv2d+BatchNorm2d pair fused into one Conv2d."""
    model = copy.deepcopy(model).eval()

    def fold(module: nn.Module) -> None:
        names = list(module._modules.keys())
        for i, name in enumerate(names):
            child = module._modules[name]
            if child is None:
                continue
            if isinstance(child, nn.BatchNorm2d) and i > 0:
                prev = module._modules[names[i - 1]]
                if isinstance(prev, nn.Conv2d):
                    module._modules[names[i - 1]] = fuse_conv_bn_eval(prev, child)
                    module._modules[name] = nn.Identity()
                    continue
            fold(child)

    fold(model)
    remaining = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if remaining:
        raise RuntimeError(f"{len(remaining)} BatchNorm2d layers could not be folded")
    return model


def export_onnx(model: nn.Module, path: Path, *, height: int, width: int,
                input_name: str, output_names: list[str]) -> dict[str, Any]:
    """Export ``model`` to ``path`` and verify it with ONNX Runtime against PyTorch.

    Returns a summary: op types used, file size and the max abs difference per output.
    """
    import onnx
    import onnxruntime as ort

    folded = fold_batchnorm(model)
    example = torch.zeros(1, 1, height, width)
    buffer = io.BytesIO()
    options: dict[str, Any] = {}
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        options["dynamo"] = False        # the TorchScript exporter: no onnxscript needed
    torch.onnx.export(folded, (example,), buffer, input_names=[input_name],
                      output_names=output_names, opset_version=OPSET,
                      do_constant_folding=True, **options)
    proto = onnx.load_from_string(buffer.getvalue())
    proto.producer_name = "xray-edge engines.train"
    onnx.checker.check_model(proto, full_check=True)
    ops = sorted({node.op_type for node in proto.graph.node})
    bad = sorted(set(ops) - ALLOWED_OPS)
    if bad:
        raise RuntimeError(f"exported graph for {path} uses ops outside the TensorRT list: {bad}")
    data = proto.SerializeToString()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)

    rng = np.random.default_rng(0)
    probe = rng.normal(0.0, 1.0, (1, 1, height, width)).astype(np.float32)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    got = dict(zip(output_names, session.run(output_names, {input_name: probe})))
    with torch.no_grad():
        want = [t.numpy() for t in model.eval()(torch.from_numpy(probe))]
    diffs = {}
    for name, ref in zip(output_names, want):
        if got[name].shape != ref.shape:
            raise RuntimeError(f"{name}: ONNX shape {got[name].shape} != torch shape {ref.shape}")
        diffs[name] = float(np.max(np.abs(got[name] - ref)))
    if max(diffs.values()) > 1e-3:
        raise RuntimeError(f"ONNX Runtime disagrees with PyTorch for {path}: {diffs}")
    logger.info("exported %s (%d bytes, ops %s, max diff %s)", path, len(data), ops, diffs)
    return {"ops": ops, "bytes": len(data), "max_abs_diff": diffs,
            "shapes": {name: list(got[name].shape) for name in output_names}}


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file (the manifest's integrity check)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def write_manifest(folder: Path, sections: dict[str, dict[str, Any]]) -> Path:
    """Write ``manifest.toml`` (sections in the order given; values are str/int/float/bool)."""
    lines: list[str] = []
    for section, values in sections.items():
        if lines:
            lines.append("")
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
    path = Path(folder) / "manifest.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def ort_latency_ms(onnx_path: Path, *, runs: int = 20, threads: int = 2) -> float:
    """Median single-image ONNX Runtime CPU latency in ms (after two warm-up runs)."""
    import time

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    meta = session.get_inputs()[0]
    shape = [int(d) for d in meta.shape]
    tensor = np.random.default_rng(1).normal(0, 1, shape).astype(np.float32)
    for _ in range(2):
        session.run(None, {meta.name: tensor})
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, {meta.name: tensor})
        times.append((time.perf_counter() - start) * 1000.0)
    return float(np.median(times))


VERSION = "0.2.0"
EVAL_BEGIN = "<!-- model_eval:begin -->"
EVAL_END = "<!-- model_eval:end -->"

MANIFESTS: dict[str, dict[str, dict[str, Any]]] = {
    "tb_classifier": {
        "model": {"name": "tb_classifier", "version": VERSION, "task": "classification",
                  "file": "model.onnx", "sha256": "", "clinical_use": False,
                  "description": "Demonstration TB classifier trained on procedural chest phantoms"},
        "input": {"name": "image", "height": 256, "width": 256, "mean": 0.5, "std": 0.25},
        "output": {"score": "tb_score", "heatmap": "tb_heatmap", "threshold": 0.5},
    },
    "nodule_detector": {
        "model": {"name": "nodule_detector", "version": VERSION, "task": "detection",
                  "file": "model.onnx", "sha256": "", "clinical_use": False,
                  "description": "Demonstration lung nodule and mass detector (5-60 mm) trained on "
                                 "procedural chest phantoms"},
        "input": {"name": "image", "height": 512, "width": 512, "mean": 0.5, "std": 0.25},
        "output": {"decoding": "centernet", "heatmap": "nodule_heatmap", "size": "nodule_size",
                   "offset": "nodule_offset", "stride": 4, "score_threshold": 0.3, "nms_iou": 0.3,
                   "max_detections": 20},
    },
}


def write_manifest_for(name: str, folder: Path, *, size: int | None = None,
                       output: dict[str, Any] | None = None) -> Path:
    """Write the manifest of model ``name`` with the sha256 of ``folder/model.onnx``.

    ``size`` overrides the square input size (it must match the exported graph) and
    ``output`` overrides ``[output]`` values (the calibrated operating point).
    """
    if name not in MANIFESTS:
        raise ValueError(f"name: unknown model {name!r}; expected one of {sorted(MANIFESTS)}")
    sections = copy.deepcopy(MANIFESTS[name])
    if size is not None:
        sections["input"]["height"] = sections["input"]["width"] = int(size)
    for key, value in (output or {}).items():
        if key not in sections["output"]:
            raise ValueError(f"output: unknown [output] key {key!r} for {name}")
        sections["output"][key] = value
    sections["model"]["sha256"] = sha256_file(Path(folder) / sections["model"]["file"])
    return write_manifest(Path(folder), sections)


def _architecture(name: str, width: int, deep_width: int | None = None) -> str:
    if name == "tb_classifier":
        chans = f"{2 * width}, {3 * width}, {4 * width}, {4 * width} ch"
        return (
            f"Class-activation style CNN. Stem 3x3/2 conv ({width} ch), then four stages of a "
            f"3x3/2 conv + residual block ({chans}; strides 4 to 32), a small top-down "
            "pathway (1x1 laterals, nearest x2 upsampling, add) back to stride 8, a 3x3 conv and "
            "a 1x1 conv giving a 32x32 logit map. `tb_heatmap` = sigmoid(map); `tb_score` = "
            "sigmoid(a * max(map) + b * mean(map) + c). Trained with image-level BCE plus "
            "weakly supervised BCE on the map (cells inside the phantom's TB pattern boxes = 1).")
    deep = deep_width or 4 * width
    chans = f"{2 * width}, {3 * width}, {deep}, {deep} ch"
    return (
        f"CenterNet-style anchor-free detector. Stem 3x3/2 conv ({width} ch), stages of a 3x3/2 "
        f"conv + residual blocks ({chans}; strides 4 to 32; the stride-16/32 stages are the "
        "widest: they see whole 3-6 cm masses with their surroundings), a top-down pathway "
        "(1x1 laterals, nearest x2 upsampling, add) back to stride 4 (128x128 cells), then "
        "heads: heatmap (3x3 conv + 1x1, sigmoid), size (3x3 conv + 1x1, box w/h in input "
        "pixels) and offset (1x1, sigmoid). Trained on windows of the 512x512 view "
        "(fully convolutional; most centred near a lesion) with CenterNet's penalty-reduced "
        "focal loss on Gaussian centre targets, L1 size loss (x0.1) and L1 offset loss.")


_LIMITS = (
    "- Trained and evaluated **only on procedural phantoms** generated by "
    "`engines/train/phantom.py`. Real radiographs differ in anatomy, pathology, devices, "
    "positioning and processing; **performance on real patients is unknown** and is expected "
    "to be worse than on the phantoms. The held-out figures above say how well the model "
    "learnt the generator, not how it reads patients.\n"
    "- What was done to narrow the gap: the generator draws per image a DR or CR reader "
    "(blur, noise, CR line jitter), scatter with and without a grid, grid-line moire, "
    "heel effect, collimation with unexposed or shuttered (black) borders, the reader's "
    "processing (dynamic-range compression with plain detail enhancement, strong unsharp-mask "
    "edge enhancement with halos, or multi-scale contrast equalisation), tone curves and "
    "latitude, a lung window, a full-range window or none, both polarities, pixel spacings "
    "from 0.12 to 0.23 mm or none written, PA and AP portable positioning (tilt, rotation, "
    "poorer inspiration, cut-off fields), lead side markers, burned-in text, cables, tubing, "
    "ECG electrodes, lines, pacemakers, gown snaps and necklaces; lesions of 5-60 mm alone, "
    "several, in the metastatic pattern or as masses, with smooth, lobulated or spiculated "
    "margins, faint to dense, cavitating, over ribs, hila, heart, diaphragm and apices. "
    "Training adds another layer of edge enhancement/smoothing and tone changes on the fly.\n"
    "- What was not done: no real image was used for training, tuning or testing; the "
    "anatomy, lung texture, vessels and noise are simple parametric models; no other "
    "pathology than TB patterns and nodules/masses (no pneumonia, atelectasis, heart failure, "
    "pneumothorax, fractures, post-surgical changes, lymphadenopathy); no lateral views, "
    "children, scanned film, stitched images or lossy compression artefacts; the processing "
    "models are generic, not those of any vendor. A real radiograph can still fail in ways "
    "no phantom shows.\n"
    "- No real patient data, no reader study, no regulatory clearance. **Not for clinical "
    "use**; every result object the appliance writes says so.\n"
    "- Adults only (the appliance's triage skips patients under 15 years), frontal (PA/AP) "
    "views only.\n"
    "- A site that needs a real model installs its own validated ONNX file and manifest.\n")


def write_card(name: str, folder: Path, *, run: dict[str, Any], training: dict[str, Any],
               export: dict[str, Any], evaluation_md: str | None) -> Path:
    """Write ``MODEL_CARD.md`` for model ``name`` from the run, training and export summaries."""
    manifest = copy.deepcopy(MANIFESTS[name])
    inp, out = manifest["input"], manifest["output"]
    inp["height"], inp["width"] = export["input_size"]
    out.update(export.get("output", {}))
    data = run["data"]
    shapes = ", ".join(f"`{k}` {v}" for k, v in export["shapes"].items())
    eval_text = evaluation_md or ("Not measured in this run. Run `python -m benchmarks.model_eval "
                                  "--update-cards` to measure and fill this section.\n")
    history = training.get("history", [])
    last = history[-1] if history else {}
    text = f"""# Model card: {name} {VERSION}

**Demonstration model - not for clinical use.** It proves the appliance's pipeline
(DICOM in, inference, DICOM SR/GSPS/SC out); it does not make a diagnosis.

## Intended use
{manifest['model']['description']}. Shipped with the X-ray room edge appliance so that an
installation works end to end before a site installs its own validated model. Outputs are
labelled as demonstration results in every object sent to the PACS.

## Inputs and outputs
- Input `{inp['name']}`: [1, 1, {inp['height']}, {inp['width']}] float32, the whole image in display
  polarity scaled 0..1 by its DICOM window (0.5/99.5 percentiles without one), area-resized
  (stretched) to {inp['height']}x{inp['width']} and normalised as (x - {inp['mean']}) / {inp['std']}
  (`engines.preprocess.to_model_input`).
- Outputs: {shapes}. See `manifest.toml` and `engines/decode.py`.
- Default operating point: {', '.join(f'{k} = {v}' for k, v in out.items() if isinstance(v, float))}{_calibration_note(name)}.

## Architecture
{_architecture(name, export['width'], export.get('deep_width'))}
{export['parameters']:,} parameters; ONNX opset {OPSET}, static shape, batch norm folded;
ops: {', '.join(export['ops'])} (all built by TensorRT 10). File size {export['bytes'] / 1e6:.2f} MB.

## Training data
{data['train_cases']} procedural chest phantoms for training and {data['val_cases']} for validation (seeds
{data['seeds']}, the last {data['val_cases']} for validation), rendered at {data['render_size']} px width by `engines.train.phantom`
(generator hash {data['phantom_hash']}), {data['tb_fraction']:.0%} with TB patterns,
{data['nodule_case_fraction']:.0%} with nodules or masses ({data['nodules']} lesions in all: {_sizes(data)}).
Readers and processing styles: {_styles(data)}. Each sample is a random crop (88-100% of
each side), flip, random edge enhancement or smoothing and tone curve (domain
randomisation on top of the generator's), mild gamma/contrast/brightness change and mild
noise, with the area resize and normalisation of `engines.preprocess.to_model_input` as
in the appliance.

## Training
The shipped `model.onnx` is the output of this run: `{run['command']}` (seeded, {run.get('device', 'CPU')},
{run['threads']} CPU threads, torch {run['torch']}; `make models` runs
`python -m engines.train.train --out engines/models`).
{training['steps']} steps of batch {training['batch']}, AdamW with warm-up and cosine decay,
{training['seconds']} s for this model; {run['total_seconds']} s ({run['total_seconds'] / 60:.0f} min) wall time for the
whole run including rendering ({data['render_seconds']} s{_render_note(data)}) and evaluation, {_cpu(run)}.
Last validation check: {json.dumps(last)}.

## Measured performance (held-out phantoms)
{EVAL_BEGIN}
{eval_text.rstrip()}
{EVAL_END}

## Latency
ONNX Runtime {_ort_version()} on the CPU (intra-op threads {run['threads']}), one image,
median of 20 runs after warm-up: **{export['latency_ms']:.1f} ms** (measured by the training
run on a shared 2-core development machine; preprocessing not included).

## Limitations
{_LIMITS}"""
    path = Path(folder) / "MODEL_CARD.md"
    path.write_text(text, encoding="utf-8")
    return path


def _render_note(data: dict[str, Any]) -> str:
    if data.get("render_seconds", 0) >= 60:
        return ""
    return ("; the phantoms came from the rendering cache of an earlier run with the same "
            "generator hash, rendering them afresh takes about 10 min on 2 cores")


def _cpu(run: dict[str, Any]) -> str:
    if "cpu_seconds" not in run:
        return "CPU time not recorded"
    load = run.get("load_average") or []
    return (f"{run['cpu_seconds']} s CPU time ({run['cpu_seconds'] / 120:.0f} min on 2 idle cores; "
            f"load average at the end {load[0] if load else 'n/a'} on a machine shared with other work)")


def _sizes(data: dict[str, Any]) -> str:
    sizes = data.get("lesion_sizes") or {}
    return ", ".join(f"{v} {k}" for k, v in sizes.items()) or "sizes not recorded"


def _styles(data: dict[str, Any]) -> str:
    styles = data.get("styles") or {}
    return ", ".join(f"{k} {v}" for k, v in styles.items()) or "not recorded"


def _calibration_note(name: str) -> str:
    if name == "nodule_detector":
        return (" (score_threshold chosen by the training run: the score at <= 0.5 false "
                "positives per image on the validation phantoms)")
    return ""


def _ort_version() -> str:
    import onnxruntime as ort

    return ort.__version__
