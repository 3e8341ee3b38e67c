"""Export trained networks to ONNX and write the model folder (manifest, card).

The exported graph is static-shaped ``[1, 1, H, W]``, opset 17, batch norm folded into the
convolutions, and is checked to contain only operations TensorRT 10 builds. After export
the ONNX file is run once through ONNX Runtime and compared with PyTorch, so a broken
export never reaches ``engines/models``.
"""
from __future__ import annotations

import copy
import hashlib
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
    torch.onnx.export(folded, (example,), buffer, input_names=[input_name],
                      output_names=output_names, opset_version=OPSET, dynamo=False,
                      do_constant_folding=True)
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
