"""Installing the project: a wheel ships the models and works on its own; installs are quiet.

A new user's first commands (`make demo`, `make test`) start with `pip install -e .`; a box
may be installed from a wheel (`pip wheel .`). Neither may scroll setuptools warnings past
the user, and the wheel must carry every model folder (ONNX file, manifest, model card) and
the web templates, and analyse an image with nothing from the checkout on the path.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow

PIP = [sys.executable, "-m", "pip"]
# What setuptools prints when the package layout or the package data is declared badly.
BUILD_WARNINGS = re.compile(r"BuildBackendWarning|SetuptoolsDeprecationWarning|"
                            r"is absent from the `packages` configuration|Editable installation")


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    res = _run(PIP + ["wheel", "--no-deps", "-w", str(out), str(ROOT)])
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert not BUILD_WARNINGS.search(res.stdout + res.stderr), res.stdout + res.stderr
    wheels = list(out.glob("xray_edge-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_contains_every_model_and_the_web_files(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    model_dirs = sorted(p.parent for p in (ROOT / "engines" / "models").glob("*/manifest.toml"))
    assert model_dirs, "no model folders in the checkout"
    for folder in model_dirs:
        rel = folder.relative_to(ROOT).as_posix()
        for name in ("manifest.toml", "MODEL_CARD.md"):
            assert f"{rel}/{name}" in names, f"{rel}/{name} missing from the wheel"
        onnx = [n for n in names if n.startswith(rel + "/") and n.endswith(".onnx")]
        assert onnx, f"no ONNX file of {rel} in the wheel"
    for name in ("edge/web/templates/index.html", "edge/web/static/app.js", "edge/web/static/style.css"):
        assert name in names, f"{name} missing from the wheel"
    assert not [n for n in names if "__pycache__" in n or n.startswith(("tests/", "benchmarks/"))]


def test_wheel_install_analyzes_an_image_without_the_checkout(wheel, tmp_path):
    site = tmp_path / "site"
    res = _run(PIP + ["install", "--no-deps", "--target", str(site), str(wheel)])
    assert res.returncode == 0, res.stderr[-2000:]
    from engines.train.phantom import generate_case, write_dicom
    image = tmp_path / "cxr.dcm"
    write_dicom(generate_case(7, size=1200, tb=True, nodules=True), image)
    env = dict(os.environ, PYTHONPATH=str(site))
    env.pop("EDGE_TEST_MODELS_DIR", None)
    where = _run([sys.executable, "-c", "import edge, engines; print(edge.__file__); print(engines.__file__)"],
                 cwd=tmp_path, env=env)
    assert all(line.startswith(str(site)) for line in where.stdout.split()), where.stdout
    res = _run([sys.executable, "-m", "edge.cli", "analyze", str(image), "--json"], cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    findings = json.loads(res.stdout)
    assert findings["eligible"] is True and findings["tb"] is not None
    assert {m["name"] for m in findings["models"]} == {"tb_classifier", "nodule_detector"}


def test_editable_install_prints_no_setuptools_warnings(tmp_path):
    """What `make install` runs (pip install -e .), into an empty environment."""
    venv = tmp_path / "venv"
    res = _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    assert res.returncode == 0, res.stderr
    res = _run(PIP + ["--python", str(venv / "bin" / "python"), "install", "--quiet", "--no-deps",
                      "-e", str(ROOT)])
    assert res.returncode == 0, res.stderr[-2000:]
    assert not BUILD_WARNINGS.search(res.stdout + res.stderr), res.stdout + res.stderr
