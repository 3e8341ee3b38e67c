"""A site's own models through the whole appliance: ``edge serve`` with Orthanc as the PACS.

The models folder holds what a site might install instead of the demonstration models
(no code change, manifests only): a YOLOv8-layout detector with three labels (nodule,
mass, consolidation; letterboxed 3-channel input) and a multi-label sigmoid classifier
(pleural effusion, which refers by its manifest's rule, and cardiomegaly, which does not).
Both are real ONNX networks with planted outputs (``support.planted_models``), so the
findings are known in advance. The results must reach the PACS as SR, GSPS and SC with
those findings and their codes, valid for dciodvfy, and the refer flag must follow the
classifier's manifest.
"""
from __future__ import annotations

import io
import re
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests

from conftest import EdgeServer, OrthancPACS, require_tool, wait_until
from engines.train.phantom import generate_case, write_dicom

pytest.importorskip("onnx")
from support.planted_models import MODEL_HEAD, constant_model  # noqa: E402

pytestmark = pytest.mark.slow

SR, GSPS, SC = ("1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.11.1",
                "1.2.840.10008.5.1.4.1.1.7")
SIDE = 64    # the detector's input, letterboxed

# (cx, cy, w, h) in model-input pixels and the class scores (nodule, mass, consolidation)
ANCHORS = [(20.0, 24.0, 6.0, 6.0, (0.90, 0.0, 0.0)),
           (44.0, 30.0, 12.0, 12.0, (0.0, 0.80, 0.0)),
           (22.0, 44.0, 14.0, 10.0, (0.0, 0.0, 0.70)),
           (40.0, 50.0, 6.0, 6.0, (0.0, 0.10, 0.0))]      # mass below its threshold


def _detector(root: Path) -> Path:
    pred = np.zeros((1, 7, len(ANCHORS)), np.float32)
    for k, (cx, cy, w, h, scores) in enumerate(ANCHORS):
        pred[0, :4, k] = (cx, cy, w, h)
        pred[0, 4:, k] = scores
    return constant_model(root / "cxr_yolo", [1, 3, SIDE, SIDE], {"output0": pred},
                          MODEL_HEAD.format(name="cxr_yolo", task="detection") + f"""
[input]
name = "input"
height = {SIDE}
width = {SIDE}
channels = 3
resize = "letterbox"
interpolation = "bilinear"
pad_value = 0.447058824
mean = 0.0
std = 1.0

[output]
decoding = "yolo"
predictions = "output0"
layout = "v8"
score_threshold = 0.25
nms_iou = 0.7
max_detections = 50

[[findings]]
label = "nodule"
threshold = 0.5

[[findings]]
label = "mass"
threshold = 0.3

[[findings]]
label = "consolidation"
threshold = 0.5
""")


def _classifier(root: Path) -> Path:
    logits = np.array([[2.0, -2.0]], np.float32)          # p = 0.881, 0.119
    return constant_model(root / "cxr_labels", [1, 1, 32, 32], {"scores": logits},
                          MODEL_HEAD.format(name="cxr_labels", task="classification") + """
[input]
name = "input"
height = 32
width = 32
mean = 0.5
std = 0.25

[output]
decoding = "sigmoid"
score = "scores"

[[findings]]
label = "effusion"
display = "Pleural effusion"
threshold = 0.6
refer = true

[[findings]]
label = "cardiomegaly"
threshold = 0.5
""")


def _errors(path: Path) -> list[str]:
    run = subprocess.run([require_tool("dciodvfy"), str(path)], capture_output=True, text=True,
                         timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if "Error" in line]


def test_site_models_by_manifest_reach_the_pacs_with_their_findings_and_codes(tmp_path):
    require_tool("storescu")
    models = tmp_path / "site-models"
    _detector(models), _classifier(models)
    pacs = OrthancPACS(tmp_path).start()
    server = EdgeServer(tmp_path, destinations=[pacs.destination()],
                        extra={"models": {"dir": str(models)}})
    try:
        server.start()
        source = tmp_path / "chest.dcm"
        ds = write_dicom(generate_case(5, size=1200, tb=False, nodules=False), source)
        assert server.storescu(source).returncode == 0
        wait_until(lambda: len(pacs.get("/instances")) >= 3, 90, what="SR, GSPS and SC in Orthanc")

        (job,) = server.jobs()
        assert job["state"] == "analyzed", job
        findings = job["findings"]
        assert findings["tb"] is None and len(findings["nodules"]) == 1
        others = {o["label"]: o for o in findings["others"]}
        assert set(others) == {"mass", "consolidation", "effusion", "cardiomegaly"}
        assert others["mass"]["code"]["value"] == "4147007"
        assert others["consolidation"]["code"]["value"] == "95436008"
        assert others["effusion"]["positive"] and others["effusion"]["refer"]
        assert not others["cardiomegaly"]["positive"] and not others["cardiomegaly"]["refer"]
        assert not others["mass"]["refer"] and not others["consolidation"]["refer"]
        metrics = requests.get(f"http://127.0.0.1:{server.web_port}/metrics", timeout=10).text
        for label, kind, count in (("mass", "detection", 1), ("consolidation", "detection", 1),
                                   ("effusion", "classification", 1), ("nodule", "detection", 1),
                                   ("cardiomegaly", "classification", 0)):
            assert f'edge_findings_total{{kind="{kind}",label="{label}"}} {count}.0' in metrics \
                or f'edge_findings_total{{label="{label}",kind="{kind}"}} {count}.0' in metrics, label
        assert "edge_instances_referred_total 1.0" in metrics
        # the detections lie where Ultralytics' letterbox puts them on the full image: content
        # resized to round(side * r), padded by round(pad / 2 -/+ 0.1) px
        rows, cols = int(ds.Rows), int(ds.Columns)
        r = min(SIDE / rows, SIDE / cols)
        new_w, new_h = round(cols * r), round(rows * r)
        left, top = round((SIDE - new_w) / 2 - 0.1), round((SIDE - new_h) / 2 - 0.1)
        cx, cy, w, h, _ = ANCHORS[1]
        sx, sy = cols / new_w, rows / new_h
        want = [(cx - w / 2 - left) * sx, (cy - h / 2 - top) * sy,
                (cx + w / 2 - left) * sx, (cy + h / 2 - top) * sy]
        assert np.allclose(others["mass"]["box"], want, atol=2.0), (others["mass"]["box"], want)

        objects = {}
        base = f"http://127.0.0.1:{pacs.http_port}"
        for oid in pacs.get("/instances"):
            data = requests.get(f"{base}/instances/{oid}/file", timeout=30).content
            obj = pydicom.dcmread(io.BytesIO(data))
            objects[str(obj.SOPClassUID)] = (obj, data)
        assert set(objects) == {SR, GSPS, SC}, "the PACS should hold exactly SR, GSPS and SC"
        for uid, (obj, data) in objects.items():
            path = tmp_path / f"{obj.Modality}.dcm"
            path.write_bytes(data)
            assert _errors(path) == [], f"{obj.Modality}: dciodvfy errors"
        dump = subprocess.run([require_tool("dsrdump"), "+Pc", str(tmp_path / "SR.dcm")],
                              capture_output=True, text=True, timeout=60).stdout
        for code, meaning in (("27925004", "Nodule"), ("4147007", "Mass"),
                              ("95436008", "Lung consolidation"), ("60046008", "Pleural effusion"),
                              ("8186001", "Cardiomegaly")):
            assert code in dump and meaning in dump, f"{meaning} ({code}) missing from the SR"
        assert "cxr_yolo" in dump and "cxr_labels" in dump       # algorithm identification
        assert '"Algorithm Parameters")="backend onnxruntime"' in dump   # what ran it
        gsps = objects[GSPS][0]
        labels = [t.UnformattedTextValue for layer in gsps.GraphicAnnotationSequence
                  for t in getattr(layer, "TextObjectSequence", [])]
        assert any("Mass" in t for t in labels) and any("consolidation" in t.lower() for t in labels)
        _technician_sees_the_refer(server, tmp_path, str(ds.SOPInstanceUID))
    finally:
        server.stop()
        pacs.stop()


def _technician_sees_the_refer(server: EdgeServer, tmp_path: Path, uid: str) -> None:
    """The status page in Chromium: the refer flag names the finding that raised it, and
    the other findings are listed (screenshot test-artifacts/site-models-board.png)."""
    pytest.importorskip("playwright.sync_api")
    from test_web_browser import CHROMIUM, StatusPage

    if not Path(CHROMIUM).exists():
        pytest.skip("Chromium is not installed (run `make test`, which installs it)")
    match = re.search(r"Status page password \(shown only once, keep it\): (\S+)",
                      server.log.read_text())
    assert match, "edge serve printed no status page password"
    with StatusPage(f"http://127.0.0.1:{server.web_port}", match.group(1),
                    tmp_path / "profile") as page:
        page.login()
        page.wait_for_latest(uid, "REFER", timeout_s=15)
        assert "Pleural effusion" in page.latest()["flag"]
        shown = page.page.inner_text("#latest")
        assert "Mass" in shown and "Lung consolidation" in shown, shown
        page.page.wait_for_function("() => { const i = document.querySelector('#latest img');"
                                    " return i && i.complete && i.naturalWidth > 0; }",
                                    timeout=15_000)     # the thumbnail with the boxes
        page.screenshot("site-models-board.png")
        assert not page.console_errors, page.console_errors


def test_a_broken_model_stops_the_start_unless_the_config_says_skip(tmp_path):
    models = tmp_path / "site-models"
    _classifier(models)
    broken = _detector(models)
    manifest = broken / "manifest.toml"
    manifest.write_text(manifest.read_text().replace('layout = "v8"', 'layout = "v5"'))
    (tmp_path / "strict").mkdir()
    (tmp_path / "lenient").mkdir()
    server = EdgeServer(tmp_path / "strict", extra={"models": {"dir": str(models)}})
    run = server.edge("serve", check=False)
    assert run.returncode == 2
    (line,) = [l for l in run.stderr.splitlines() if l.startswith("edge: ")]
    assert "cxr_yolo" in line and "v5" in line and "edge models check" in line, line

    lenient = EdgeServer(tmp_path / "lenient",
                         extra={"models": {"dir": str(models), "skip_broken": True}})
    try:
        lenient.start()
        log = lenient.log.read_text()
        assert "model folder cxr_yolo refused" in log
        source = tmp_path / "chest.dcm"
        write_dicom(generate_case(5, size=1200, tb=False, nodules=False), source)
        assert lenient.storescu(source).returncode == 0
        wait_until(lambda: lenient.jobs() and lenient.jobs()[0]["state"] == "analyzed", 60,
                   what="analysis on the model that loaded")
        labels = {o["label"] for o in lenient.jobs()[0]["findings"]["others"]}
        assert labels == {"effusion", "cardiomegaly"}
    finally:
        lenient.stop()
