"""Build the model-contract parity fixtures: three models as sites get them, with references.

Writes ``tests/fixtures/model_parity/``:

- ``image.png``: one 8-bit chest phantom (``engines.train.phantom``), the image every
  framework and the appliance see;
- ``yolov8/``: a YOLOv8 detector built by Ultralytics from its yaml (3 classes, "n" depth and
  1/4 of its width, random weights), exported by Ultralytics to ONNX; reference = ``YOLO.predict``;
- ``fasterrcnn/``: a torchvision ``FasterRCNN`` (MobileNetV3 backbone at width 0.25, random
  weights) exported with its transform and NMS inside (``boxes``/``labels``/``scores``);
  reference = the model called on the full image, as torchvision is used;
- ``densenet/``: a torchxrayvision ``DenseNet`` (18 pathologies, small growth rate, random
  weights) with a class-activation map output; reference = torchxrayvision's own pipeline
  (``normalize``, ``XRayCenterCrop``, ``XRayResizer(224, engine="cv2")``), sigmoid.

Each model folder gets ``manifest.toml`` (sha256 filled in), ``model.onnx`` and
``reference.json`` (the framework's results, in full-image pixels, and what the appliance
gave when this script ran, for the record). ``tests/test_model_contract.py`` needs only ONNX
Runtime to check the appliance against these references.

Run once, from the repository root, in a SEPARATE environment with the frameworks::

    python3.11 -m venv /tmp/fw
    /tmp/fw/bin/pip install torch==2.14.1 torchvision==0.29.1
    /tmp/fw/bin/pip install ultralytics torchxrayvision onnx onnxruntime
    /tmp/fw/bin/python tests/support/make_parity_fixtures.py

Nothing is downloaded: weights are random (seeded), Ultralytics runs offline without
auto-install, and every socket connection is refused while this script runs.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "model_parity"
_TMP = Path(tempfile.mkdtemp(prefix="parity-"))
os.environ.update({"YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "false", "YOLO_CONFIG_DIR": str(_TMP / "yolo"),
                   "TORCH_HOME": str(_TMP / "torch"), "HF_HUB_OFFLINE": "1"})


def _no_network(*args, **kwargs):
    raise OSError("make_parity_fixtures: network access refused (nothing may be downloaded)")


socket.socket.connect = _no_network          # type: ignore[method-assign]
socket.create_connection = _no_network       # type: ignore[assignment]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from engines.train.phantom import generate_case, unit_image  # noqa: E402

# image.png is 640 columns wide, so that Ultralytics' letterbox to 640 only pads it (no
# 8-bit resize: both sides then feed the network the same numbers); image_large.png is the
# same phantom at 1000 columns, for the resize checks.
PHANTOM_SEED, PHANTOM_COLUMNS, LARGE_COLUMNS = 20251, 640, 1000
YOLO_SIZE = 640


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def gap_threshold(scores: list[float], low: int, high: int) -> float:
    """A threshold between two result scores (ranks ``low..high``) with the widest gap, so
    that rounding differences between runtimes cannot move a result across it."""
    s = sorted(scores, reverse=True)
    best, at = -1.0, 0.0
    for k in range(low, min(high, len(s) - 1)):
        gap = s[k] - s[k + 1]
        if gap > best:
            best, at = gap, (s[k] + s[k + 1]) / 2
    return round(at, 6)


def calibrate_batchnorm(module: torch.nn.Module, *batches: torch.Tensor) -> None:
    """Set the BatchNorm statistics from these inputs (weights stay random). With random
    weights and identity statistics, activations shrink layer by layer until every output
    is the same; real models were trained with statistics that keep them alive."""
    with torch.no_grad():
        for mod in module.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                mod.momentum = None            # cumulative average over the batches given
                mod.reset_running_stats()
        module.train()
        for batch in batches:
            module(batch)
        module.eval()


def write_manifest(folder: Path, text: str) -> None:
    digest = sha256(folder / "model.onnx")
    (folder / "manifest.toml").write_text(text.replace("@SHA256@", digest).lstrip())


def phantom_u8(columns: int, name: str) -> np.ndarray:
    """The phantom as 8 bits (what a PNG/JPEG-fed framework sees), saved as ``name``."""
    case = generate_case(PHANTOM_SEED, size=columns, tb=True, nodules=True)
    u8 = np.rint(unit_image(case) * 255.0).astype(np.uint8)
    OUT.mkdir(parents=True, exist_ok=True)
    Image.fromarray(u8, mode="L").save(OUT / name, optimize=True)
    return u8


# ------------------------------------------------------------------ Ultralytics YOLOv8
YOLO_LABELS = ("nodule", "mass", "consolidation")


def make_yolo(u8: np.ndarray, large: np.ndarray) -> dict:
    import ultralytics
    import yaml
    from ultralytics import YOLO
    from ultralytics.data.augment import LetterBox

    cfg = yaml.safe_load((Path(ultralytics.__file__).parent / "cfg/models/v8/yolov8.yaml").read_text())
    cfg["nc"] = len(YOLO_LABELS)
    cfg["scales"] = {"n": [0.33, 0.0625, 1024]}          # yolov8n depth, 1/4 of its width
    cfg_path = _TMP / "yolov8n.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    (OUT / "yolov8").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = YOLO(str(cfg_path), task="detect")
    square = torch.nn.functional.interpolate(
        torch.from_numpy(u8.astype(np.float32) / 255.0)[None, None].expand(1, 3, -1, -1),
        size=(YOLO_SIZE, YOLO_SIZE), mode="bilinear", align_corners=False)
    calibrate_batchnorm(model.model, square, torch.flip(square, dims=[3]))
    with torch.no_grad():                 # the class bias prior leaves every score near 1e-4
        for seq in model.model.model[-1].cv3:
            seq[-1].bias.fill_(-2.0)

    def predict(image: np.ndarray, conf: float):
        bgr = np.repeat(image[:, :, None], 3, axis=2)
        # rect=False: the square letterbox of a fixed-size export (a PyTorch model otherwise
        # gets a minimum rectangle, e.g. 608 x 640, which no fixed-size ONNX file takes)
        return model.predict(bgr, imgsz=YOLO_SIZE, conf=conf, iou=0.7, max_det=300, rect=False,
                             device="cpu", verbose=False)[0].boxes

    conf = gap_threshold(predict(u8, 0.01).conf.tolist(), 8, 30)
    result, result_large = predict(u8, conf), predict(large, conf)
    # what Ultralytics feeds the network for the large image (gray: one channel of three)
    letterboxed = LetterBox(YOLO_SIZE, auto=False, stride=32)(image=np.repeat(large[:, :, None], 3, axis=2))
    Image.fromarray(letterboxed[:, :, 0], mode="L").save(OUT / "yolov8" / "letterbox_large.png",
                                                         optimize=True)
    os.chdir(_TMP)                        # Ultralytics writes the export into the cwd
    onnx_file = _TMP / Path(model.export(format="onnx", imgsz=YOLO_SIZE, opset=17, simplify=False,
                                         dynamic=False, device="cpu"))
    os.chdir(ROOT)
    folder = OUT / "yolov8"
    (folder / "model.onnx").write_bytes(onnx_file.read_bytes())
    findings = "".join(f"""
[[findings]]
label = "{label}"
index = {i}
display = "{label.capitalize()}"
refer = {"true" if label == "consolidation" else "false"}
""" for i, label in enumerate(YOLO_LABELS))
    write_manifest(folder, f"""
[model]
name = "yolov8"
version = "0.0.1"
task = "detection"
file = "model.onnx"
sha256 = "@SHA256@"
description = "Parity fixture: Ultralytics YOLOv8 (yolov8.yaml, 1/4 of n width, 3 classes, random weights)"

[input]
name = "images"
height = {YOLO_SIZE}
width = {YOLO_SIZE}
channels = 3
resize = "letterbox"
interpolation = "bilinear"
pad_value = 0.447058824   # 114 / 255, Ultralytics' LetterBox
value_range = [0.0, 1.0]
mean = 0.0
std = 1.0

[output]
decoding = "yolo"
predictions = "output0"
layout = "v8"
score_threshold = {conf}
nms_iou = 0.7
max_detections = 300
{findings}""")
    return {"framework": f"ultralytics {ultralytics.__version__}, torch {torch.__version__}",
            "call": f"YOLO(yolov8.yaml).predict(image, imgsz={YOLO_SIZE}, conf={conf}, iou=0.7, max_det=300, "
                    "rect=False)",
            "boxes": result.xyxy.tolist(), "scores": result.conf.tolist(),
            "labels": [int(v) for v in result.cls.tolist()],
            "large": {"image": "image_large.png", "boxes": result_large.xyxy.tolist(),
                      "scores": result_large.conf.tolist(),
                      "labels": [int(v) for v in result_large.cls.tolist()]}}


# ------------------------------------------------------------------ torchvision Faster R-CNN
TV_LABELS = ("nodule", "mass", "effusion")      # torchvision class ids 1..3 (0 is background)


def make_fasterrcnn(u8: np.ndarray, large: np.ndarray) -> dict:
    import torchvision
    from torch import nn
    from torchvision.models import mobilenet_v3_large
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.rpn import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign

    torch.manual_seed(1)
    features = mobilenet_v3_large(weights=None, width_mult=0.25, reduced_tail=True).features
    backbone = nn.Sequential(features, nn.Conv2d(features[-1].out_channels, 32, 1))
    backbone.out_channels = 32
    model = FasterRCNN(
        backbone, min_size=320, max_size=640,
        rpn_anchor_generator=AnchorGenerator(sizes=((32, 64, 128),), aspect_ratios=((0.5, 1.0, 2.0),)),
        box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2), box_head=TwoMLPHead(32 * 7 * 7, 64),
        box_predictor=FastRCNNPredictor(64, len(TV_LABELS) + 1), box_score_thresh=0.0,
        box_detections_per_img=100)
    model.eval()
    image = torch.from_numpy(np.repeat((u8.astype(np.float32) / 255.0)[None], 3, axis=0))
    with torch.no_grad():
        batch = model.transform([image])[0].tensors
    calibrate_batchnorm(model.backbone, batch, torch.flip(batch, dims=[3]))
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.weight.mul_(10.0)
    with torch.no_grad():
        probe = model([image])[0]
    thresh = gap_threshold(probe["scores"].tolist(), 8, 30)
    model.roi_heads.score_thresh = thresh
    with torch.no_grad():
        result = model([image])[0]
        resized = model.transform.resize(image, None)[0]
    height, width = int(resized.shape[-2]), int(resized.shape[-1])
    folder = OUT / "fasterrcnn"
    folder.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(model, ([torch.rand(3, height, width)],), str(folder / "model.onnx"),
                      opset_version=17, input_names=["images"],
                      output_names=["boxes", "labels", "scores"], dynamo=False)
    findings = "".join(f"""
[[findings]]
label = "{label}"
index = {i + 1}
display = "{label.capitalize()}"
""" for i, label in enumerate(TV_LABELS))
    write_manifest(folder, f"""
[model]
name = "fasterrcnn"
version = "0.0.1"
task = "detection"
file = "model.onnx"
sha256 = "@SHA256@"
description = "Parity fixture: torchvision FasterRCNN (MobileNetV3 width 0.25, random weights), NMS inside"

[input]
name = "images"
batch = false              # torchvision takes a list of [3, H, W] images
height = {height}          # the size torchvision's transform resizes this image to
width = {width}
channels = 3
resize = "stretch"
interpolation = "bilinear"
value_range = [0.0, 1.0]
mean = 0.0                 # ImageNet normalisation is inside the graph
std = 1.0

[output]
decoding = "boxes_scores_labels"
boxes = "boxes"
scores = "scores"
labels = "labels"
box_format = "xyxy"
score_threshold = {thresh}
max_detections = 100
{findings}""")
    return {"framework": f"torchvision {torchvision.__version__}, torch {torch.__version__}",
            "call": f"FasterRCNN(...)([image])[0] with box_score_thresh={thresh}",
            "boxes": result["boxes"].tolist(), "scores": result["scores"].tolist(),
            "labels": [int(v) for v in result["labels"].tolist()]}


# ------------------------------------------------------------------ torchxrayvision DenseNet
class _WithCam(torch.nn.Module):
    """The DenseNet's logits plus its class-activation maps (classifier weights applied to
    the last feature map, before pooling)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        feats = torch.relu(self.model.features(x))
        logits = self.model(x)
        cam = torch.einsum("kc,bchw->bkhw", self.model.classifier.weight, feats)
        return logits, cam


def make_densenet(u8: np.ndarray, large: np.ndarray) -> dict:
    import torchxrayvision as xrv
    from torchvision import transforms

    torch.manual_seed(2)
    model = xrv.models.DenseNet(weights=None, growth_rate=8, block_config=(2, 2, 2, 2),
                                num_init_features=16).eval()
    labels = list(xrv.datasets.default_pathologies)
    pipeline = transforms.Compose([xrv.datasets.XRayCenterCrop(),
                                   xrv.datasets.XRayResizer(224, engine="cv2")])
    img = pipeline(xrv.datasets.normalize(u8.astype(np.float32), 255)[None])
    batch = torch.from_numpy(img)[None]
    calibrate_batchnorm(model, batch, torch.flip(batch, dims=[3]))
    with torch.no_grad():                 # logits of a few units, not saturated probabilities
        model.classifier.weight.mul_(3.0)
    wrapped = _WithCam(model).eval()
    with torch.no_grad():
        logits, cam = wrapped(torch.from_numpy(img)[None])
    probs = torch.sigmoid(logits)[0]
    folder = OUT / "densenet"
    folder.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(wrapped, torch.zeros(1, 1, 224, 224), str(folder / "model.onnx"), opset_version=17,
                      input_names=["image"], output_names=["logits", "cam"], dynamo=False)
    refer = {"Consolidation", "Nodule", "Mass", "Lung Opacity"}
    findings = "".join(f"""
[[findings]]
label = "{label}"
threshold = {0.5 if i % 2 == 0 else 0.45}
refer = {"true" if label in refer else "false"}
""" + ('report = false\n' if label in ("Hernia", "Fracture") else "") for i, label in enumerate(labels))
    write_manifest(folder, f"""
[model]
name = "densenet"
version = "0.0.1"
task = "classification"
file = "model.onnx"
sha256 = "@SHA256@"
description = "Parity fixture: torchxrayvision DenseNet (18 pathologies, growth 8, random weights)"

[input]
name = "image"
height = 224
width = 224
resize = "crop"             # XRayCenterCrop
interpolation = "area_exact"  # XRayResizer(engine="cv2"): cv2.INTER_AREA
value_range = [-1024.0, 1024.0]  # xrv.datasets.normalize(img, 255)
mean = 0.0
std = 1.0

[output]
decoding = "sigmoid"
score = "logits"
heatmap = "cam"
{findings}""")
    return {"framework": f"torchxrayvision {xrv.__version__}, torch {torch.__version__}",
            "call": "sigmoid(DenseNet(XRayResizer(224, 'cv2')(XRayCenterCrop()(normalize(image, 255)))))",
            "labels": labels, "probabilities": probs.tolist(), "cam": cam[0].tolist()}


# ------------------------------------------------------------------ the appliance, for the record
def appliance_results(u8: np.ndarray, name: str) -> list[dict]:
    from engines.findings import decode_findings, to_full_image
    from engines.manifest import load_manifest, read_verified_model
    from engines.preprocess import prepare_input
    from engines.runners.onnxruntime_runner import OnnxRuntimeRunner

    manifest = load_manifest(OUT / name)
    prepared = prepare_input(u8.astype(np.float32) / np.float32(255.0), manifest.input)
    with OnnxRuntimeRunner(read_verified_model(manifest), device="cpu") as runner:
        outputs = runner.run({manifest.input.name: prepared.tensor})
    found = to_full_image(decode_findings(outputs, manifest), prepared.geometry)
    return [f.to_dict() for f in found]


def main() -> int:
    u8 = phantom_u8(PHANTOM_COLUMNS, "image.png")
    large = phantom_u8(LARGE_COLUMNS, "image_large.png")
    for name, make in (("yolov8", make_yolo), ("fasterrcnn", make_fasterrcnn), ("densenet", make_densenet)):
        reference = make(u8, large)
        reference["appliance_when_generated"] = appliance_results(u8, name)
        (OUT / name / "reference.json").write_text(json.dumps(reference, indent=1) + "\n")
        size = (OUT / name / "model.onnx").stat().st_size
        rows = len(reference.get("boxes", reference.get("labels")))
        print(f"{name}: model.onnx {size / 1e6:.2f} MB, reference {rows} rows")
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"fixtures: {total / 1e6:.2f} MB in {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
