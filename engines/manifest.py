"""Model manifests: what a model folder's ``manifest.toml`` says, checked on load.

A manifest tells the runtime how to feed a model (input name, size, channels, resize mode,
scaling and normalisation), how to read it (output names and decoding, thresholds) and what
each class means (``[[findings]]``: code, display text, threshold, refer role). Errors name
the file, the key and the allowed values, because the person reading them is installing a
model on a device. Tables: ``[model]``, ``[input]``, ``[output]`` and ``[[findings]]``;
worked examples for each layout are in ``engines/MANIFEST.md``.

Decodings (``[output] decoding``): classification models ``none`` (outputs are already
probabilities; the default, and what the shipped TB model is), ``sigmoid`` or ``softmax``;
detection models ``centernet`` (the default, the shipped nodule model), ``yolo`` (Ultralytics
v5 or v8/v11 layouts) and ``boxes_scores_labels`` (post-NMS exports such as torchvision's).
"""
from __future__ import annotations

import hashlib
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engines.labels import FindingSpec, implied_findings, parse_findings
from engines.tensor_specs import (BOX_FORMATS, CLASSIFIER_DECODINGS, DECODINGS, INTERPOLATIONS,
                                  YOLO_LAYOUTS, BoxesOutput, ClassificationOutput, DetectionOutput,
                                  InputSpec, ManifestError, OutputSpec, Table, YoloOutput, parse_input,
                                  parse_output, section)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

logger = logging.getLogger(__name__)

__all__ = ["BOX_FORMATS", "CLASSIFIER_DECODINGS", "DECODINGS", "INTERPOLATIONS", "MANIFEST_FILE", "TASKS",
           "YOLO_LAYOUTS", "BoxesOutput", "ClassificationOutput", "DetectionOutput", "InputSpec", "Manifest",
           "ManifestError", "ModelIntegrityError", "ModelSection", "OutputSpec", "YoloOutput",
           "load_manifest", "parse_manifest", "read_verified_model", "sha256_hex"]

MANIFEST_FILE = "manifest.toml"
TASKS = ("classification", "detection")
_MODEL_KEYS = {"name", "version", "task", "file", "sha256", "clinical_use", "description"}


class ModelIntegrityError(RuntimeError):
    """A model file is missing or its sha256 differs from the one its manifest records."""


@dataclass(frozen=True)
class ModelSection:
    """The ``[model]`` table."""

    name: str
    version: str
    task: str
    file: str
    sha256: str
    clinical_use: bool = False
    description: str = ""


@dataclass(frozen=True)
class Manifest:
    """A checked manifest. ``folder`` is the model folder it was read from; ``findings``
    the ``[[findings]]`` entries (or the finding an older manifest implies)."""

    model: ModelSection
    input: InputSpec
    output: OutputSpec
    folder: Path
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    findings: tuple[FindingSpec, ...] = ()

    # Flat shortcuts for the [model] keys that every caller needs.
    @property
    def name(self) -> str:
        return self.model.name

    @property
    def version(self) -> str:
        return self.model.version

    @property
    def task(self) -> str:
        return self.model.task

    @property
    def sha256(self) -> str:
        return self.model.sha256

    @property
    def clinical_use(self) -> bool:
        return self.model.clinical_use

    @property
    def description(self) -> str:
        return self.model.description

    @property
    def decoding(self) -> str:
        return self.output.decoding

    @property
    def path(self) -> Path:
        """The manifest file itself."""
        return self.folder / MANIFEST_FILE

    @property
    def onnx_path(self) -> Path:
        return self.folder / self.model.file

    @property
    def output_names(self) -> list[str]:
        return self.output.names


def _findings(data: dict[str, Any], task: str, output: OutputSpec, source: Path) -> tuple[FindingSpec, ...]:
    default = output.threshold if isinstance(output, ClassificationOutput) else output.score_threshold
    if "findings" not in data:
        legacy = (isinstance(output, ClassificationOutput) and output.decoding == "none") or \
            isinstance(output, DetectionOutput)
        if not legacy:
            raise ManifestError(f"{source}: key 'findings' is missing: a {output.decoding!r} model "
                                "needs one [[findings]] table per class (label, and its code, "
                                "display, threshold, refer)")
        return implied_findings(task, default)
    findings = parse_findings(data["findings"], source, default, ManifestError)
    if isinstance(output, DetectionOutput) and (len(findings) != 1 or findings[0].index != 0):
        raise ManifestError(f"{source}: key 'findings' lists {len(findings)} classes, but a "
                            "centernet model has one heatmap channel: one [[findings]] with index 0")
    if isinstance(output, ClassificationOutput) and output.decoding == "softmax" and len(findings) < 2:
        raise ManifestError(f"{source}: key 'findings' lists 1 class, but decoding \"softmax\" needs "
                            "one [[findings]] per class (at least 2; mark a \"normal\" class report = false)")
    return findings


def parse_manifest(data: dict[str, Any], folder: Path, source: Path | None = None) -> Manifest:
    """Check a parsed manifest dict and build a :class:`Manifest` for ``folder``."""
    source = source or Path(folder) / MANIFEST_FILE
    m = Table(section(data, "model", source), "model", source, _MODEL_KEYS)
    task = m.get("task", str, allowed=TASKS)
    sha256 = m.get("sha256", str).strip().lower()
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise m.fail("sha256", f"must be 64 hex digits (sha256 of the ONNX file), got {sha256!r}")
    model = ModelSection(
        name=m.get("name", str), version=m.get("version", str), task=task,
        file=m.get("file", str, "model.onnx"), sha256=sha256,
        clinical_use=m.get("clinical_use", bool, False), description=m.get("description", str, ""),
    )
    if model.name != Path(folder).name:
        logger.warning("%s: model.name %r differs from its folder name %r",
                       source, model.name, Path(folder).name)
    spec = parse_input(data, source)
    output = parse_output(data, task, spec, source, "findings" in data)
    for key in sorted(set(data) - {"model", "input", "output", "findings"}):
        logger.warning("%s: unknown table [%s] ignored", source, key)
    return Manifest(model=model, input=spec, output=output, folder=Path(folder), raw=data,
                    findings=_findings(data, task, output, source))


def load_manifest(folder: Path | str) -> Manifest:
    """Read and check ``<folder>/manifest.toml``. Raises :class:`ManifestError`."""
    folder = Path(folder)
    source = folder / MANIFEST_FILE
    try:
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError(f"{source}: not found; every model folder needs a {MANIFEST_FILE}") from None
    except OSError as exc:
        raise ManifestError(f"{source}: cannot be read ({exc})") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(f"{source}: not valid TOML ({exc})") from exc
    return parse_manifest(data, folder, source)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_verified_model(manifest: Manifest) -> bytes:
    """The ONNX file's bytes, after checking them against ``manifest.sha256``.

    The bytes returned are the bytes hashed, so a file replaced after the check cannot be
    what runs. Raises :class:`ModelIntegrityError` naming the file, both hashes and what to do.
    """
    path = manifest.onnx_path
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ModelIntegrityError(f"{path}: model file not found (named by model.file in "
                                  f"{manifest.path}); copy the ONNX file there") from None
    except OSError as exc:
        raise ModelIntegrityError(f"{path}: model file cannot be read ({exc})") from exc
    actual = sha256_hex(data)
    if actual != manifest.sha256:
        raise ModelIntegrityError(
            f"{path}: sha256 mismatch: manifest {manifest.path} expects {manifest.sha256}, "
            f"the file has {actual}. The model was not loaded. If this file is the model you "
            "meant to install, put its sha256 in the manifest (model.sha256); otherwise restore "
            "the original file.")
    return data
