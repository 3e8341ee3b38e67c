"""Model folders with planted outputs, for tests of the model contract and the service.

``constant_model`` writes a real ONNX network (ONNX Runtime and TensorRT build it) whose
outputs are planted constants that still depend on the input, with its manifest (the
``@SHA@`` placeholder is replaced by the file's sha256): a model whose findings a test
knows in advance, through any decoding the manifest declares.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["MODEL_HEAD", "YOLO_FINDINGS", "classifier_manifest", "constant_model", "save_model",
           "yolo_folder", "yolo_v8_predictions"]


def save_model(folder: Path, graph, manifest: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    data = model.SerializeToString()
    (folder / "model.onnx").write_bytes(data)
    (folder / "manifest.toml").write_text(manifest.replace("@SHA@", hashlib.sha256(data).hexdigest()))
    return folder


def constant_model(folder: Path, input_shape: list[int], outputs: dict[str, np.ndarray], manifest: str,
                   extra_nodes=(), extra_inits=()) -> Path:
    """Outputs = planted constants + 0 * mean(input) (so they still depend on the input)."""
    nodes = [helper.make_node("ReduceMean", ["input"], ["m"], keepdims=0),
             helper.make_node("Mul", ["m", "zero"], ["z"])] + list(extra_nodes)
    inits = [numpy_helper.from_array(np.array(0.0, np.float32), "zero")] + list(extra_inits)
    outs = []
    for name, value in outputs.items():
        nodes.append(helper.make_node("Add", [f"{name}_c", "z"], [name]))
        inits.append(numpy_helper.from_array(value.astype(np.float32), f"{name}_c"))
        outs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(value.shape)))
    graph = helper.make_graph(nodes, "planted",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, input_shape)],
                              outs, inits)
    return save_model(folder, graph, manifest)


MODEL_HEAD = """
[model]
name = "{name}"
version = "1.0"
task = "{task}"
sha256 = "@SHA@"
"""


def yolo_v8_predictions() -> np.ndarray:
    """[1, 4 + 3, 6]: planted anchors (cx, cy, w, h, class scores)."""
    anchors = [
        (20, 20, 10, 10, (0.90, 0.10, 0.0)),   # A: class 0
        (21, 20, 10, 10, (0.80, 0.05, 0.0)),   # overlaps A, same class: suppressed
        (21, 21, 10, 10, (0.10, 0.70, 0.0)),   # overlaps A, class 1: kept (class-wise NMS)
        (50, 40, 8, 6, (0.0, 0.0, 0.35)),      # class 2, below its threshold 0.4
        (40, 50, 6, 8, (0.0, 0.30, 0.0)),      # class 1, above its threshold 0.25
        (10, 50, 4, 4, (0.2, 0.0, 0.0)),       # class 0, below 0.5
    ]
    out = np.zeros((1, 7, len(anchors)), np.float32)
    for k, (cx, cy, w, h, cls) in enumerate(anchors):
        out[0, :4, k] = (cx, cy, w, h)
        out[0, 4:, k] = cls
    return out


YOLO_FINDINGS = """
[[findings]]
label = "nodule"
threshold = 0.5
[[findings]]
label = "mass"
threshold = 0.25
[[findings]]
label = "consolidation"
threshold = 0.4
refer = true
"""


def yolo_folder(root: Path, layout: str = "v8", predictions: np.ndarray | None = None,
                findings: str = YOLO_FINDINGS) -> Path:
    pred = yolo_v8_predictions() if predictions is None else predictions
    return constant_model(root / f"yolo_{layout}", [1, 3, 64, 64], {"output0": pred},
                          MODEL_HEAD.format(name=f"yolo_{layout}", task="detection") + f"""
[input]
name = "input"
height = 64
width = 64
channels = 3
resize = "letterbox"
interpolation = "bilinear"
pad_value = 0.447058824
mean = 0.0
std = 1.0

[output]
decoding = "yolo"
predictions = "output0"
layout = "{layout}"
score_threshold = 0.5
nms_iou = 0.45
max_detections = 10
""" + findings)


def classifier_manifest(decoding: str, findings: str, heatmap: bool = False, classes: int = 2) -> str:
    return MODEL_HEAD.format(name="cls", task="classification") + f"""
[input]
name = "input"
height = 32
width = 32
mean = 0.5
std = 0.25

[output]
decoding = "{decoding}"
score = "scores"
{'heatmap = "cam"' if heatmap else ''}
""" + findings


