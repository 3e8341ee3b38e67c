"""Model manifests: what a model folder's ``manifest.toml`` says, checked on load.

A manifest tells the runtime how to feed a model (input name, size, normalisation) and how
to read it (output names, thresholds, decoding). Errors name the file, the key and the
allowed values, because the person reading them is installing a model on a device.
The format is fixed in the project's model manifest contract (``[model]``, ``[input]``,
``[output]`` tables).
"""
from __future__ import annotations

import hashlib
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.toml"
TASKS = ("classification", "detection")
DECODINGS = ("centernet",)

_MODEL_KEYS = {"name", "version", "task", "file", "sha256", "clinical_use", "description"}
_INPUT_KEYS = {"name", "height", "width", "mean", "std"}
_CLASSIFICATION_KEYS = {"score", "heatmap", "threshold"}
_DETECTION_KEYS = {"decoding", "heatmap", "size", "offset", "stride", "score_threshold",
                   "nms_iou", "max_detections"}


class ManifestError(ValueError):
    """A manifest is missing, unreadable, or has a missing or invalid key."""


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
class InputSpec:
    """The ``[input]`` table: tensor ``[1, 1, height, width]`` float32, ``(x - mean) / std``."""

    name: str
    height: int
    width: int
    mean: float
    std: float

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (1, 1, self.height, self.width)


@dataclass(frozen=True)
class ClassificationOutput:
    """The ``[output]`` table of a classification model."""

    score: str
    heatmap: str
    threshold: float

    @property
    def names(self) -> list[str]:
        return [self.score, self.heatmap]


@dataclass(frozen=True)
class DetectionOutput:
    """The ``[output]`` table of a CenterNet-style detection model."""

    decoding: str
    heatmap: str
    size: str
    offset: str
    stride: int
    score_threshold: float
    nms_iou: float
    max_detections: int

    @property
    def names(self) -> list[str]:
        return [self.heatmap, self.size, self.offset]


OutputSpec = Union[ClassificationOutput, DetectionOutput]


@dataclass(frozen=True)
class Manifest:
    """A checked manifest. ``folder`` is the model folder it was read from."""

    model: ModelSection
    input: InputSpec
    output: OutputSpec
    folder: Path
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

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
    def path(self) -> Path:
        """The manifest file itself."""
        return self.folder / MANIFEST_FILE

    @property
    def onnx_path(self) -> Path:
        return self.folder / self.model.file

    @property
    def output_names(self) -> list[str]:
        return self.output.names


class _Table:
    """Reads typed keys from one TOML table and names file and key in every error."""

    def __init__(self, data: dict[str, Any], table: str, source: Path, known: set[str]) -> None:
        self.data, self.table, self.source = data, table, source
        for key in sorted(set(data) - known):
            logger.warning("%s: unknown key [%s] %s ignored (known keys: %s)",
                           source, table, key, ", ".join(sorted(known)))

    def _fail(self, key: str, problem: str) -> ManifestError:
        return ManifestError(f"{self.source}: key '{self.table}.{key}' {problem}")

    def get(self, key: str, kind: type, default: Any = ..., *, allowed: tuple = ()) -> Any:
        if key not in self.data:
            if default is not ...:
                return default
            hint = f" (allowed values: {', '.join(map(str, allowed))})" if allowed else ""
            raise self._fail(key, f"is missing{hint}")
        value = self.data[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise self._fail(key, f"must be a {kind.__name__}, got {value!r}")
        if kind is str and not value.strip():
            raise self._fail(key, "must not be empty")
        if allowed and value not in allowed:
            raise self._fail(key, f"is {value!r}; allowed values: {', '.join(map(str, allowed))}")
        return value

    def positive(self, key: str, kind: type) -> Any:
        value = self.get(key, kind)
        if value <= 0:
            raise self._fail(key, f"must be > 0, got {value!r}")
        return value

    def fraction(self, key: str) -> float:
        value = self.get(key, float)
        if not 0.0 <= value <= 1.0:
            raise self._fail(key, f"must be between 0 and 1, got {value!r}")
        return value


def _section(data: dict[str, Any], table: str, source: Path) -> dict[str, Any]:
    section = data.get(table)
    if not isinstance(section, dict):
        raise ManifestError(f"{source}: table [{table}] is missing; a manifest needs "
                            "[model], [input] and [output] tables")
    return section


def parse_manifest(data: dict[str, Any], folder: Path, source: Path | None = None) -> Manifest:
    """Check a parsed manifest dict and build a :class:`Manifest` for ``folder``."""
    source = source or Path(folder) / MANIFEST_FILE
    m = _Table(_section(data, "model", source), "model", source, _MODEL_KEYS)
    task = m.get("task", str, allowed=TASKS)
    sha256 = m.get("sha256", str).strip().lower()
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise m._fail("sha256", f"must be 64 hex digits (sha256 of the ONNX file), got {sha256!r}")
    model = ModelSection(
        name=m.get("name", str), version=m.get("version", str), task=task,
        file=m.get("file", str, "model.onnx"), sha256=sha256,
        clinical_use=m.get("clinical_use", bool, False), description=m.get("description", str, ""),
    )
    if model.name != Path(folder).name:
        logger.warning("%s: model.name %r differs from its folder name %r",
                       source, model.name, Path(folder).name)
    i = _Table(_section(data, "input", source), "input", source, _INPUT_KEYS)
    spec = InputSpec(name=i.get("name", str), height=i.positive("height", int),
                     width=i.positive("width", int), mean=i.get("mean", float),
                     std=i.positive("std", float))
    if task == "classification":
        o = _Table(_section(data, "output", source), "output", source, _CLASSIFICATION_KEYS)
        output: OutputSpec = ClassificationOutput(
            score=o.get("score", str), heatmap=o.get("heatmap", str), threshold=o.fraction("threshold"))
    else:
        o = _Table(_section(data, "output", source), "output", source, _DETECTION_KEYS)
        output = DetectionOutput(
            decoding=o.get("decoding", str, "centernet", allowed=DECODINGS),
            heatmap=o.get("heatmap", str), size=o.get("size", str), offset=o.get("offset", str),
            stride=o.positive("stride", int), score_threshold=o.fraction("score_threshold"),
            nms_iou=o.fraction("nms_iou"), max_detections=o.positive("max_detections", int))
        if spec.height % output.stride or spec.width % output.stride:
            raise o._fail("stride", f"({output.stride}) must divide input.height and input.width "
                                    f"({spec.height}x{spec.width})")
    return Manifest(model=model, input=spec, output=output, folder=Path(folder), raw=data)


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
