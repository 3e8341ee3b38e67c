"""The model store: load model folders, check them, and pick a runner for each.

``load_models(models_dir, backend)`` is what the appliance calls once at start; models then
stay warm. Every load checks the ONNX file's sha256 against the manifest (a mismatch is a
:class:`ModelIntegrityError`, never a silent load) and checks the manifest's tensor names
against the network. ``backend="auto"`` takes TensorRT when it imports, a CUDA GPU is
present and an engine is cached or can be built; otherwise ONNX Runtime. The choice and
the reason are logged and kept on the :class:`LoadedModel`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
import numpy as np

from engines.builder import (DEFAULT_PRECISION, EngineBuildError, build_engine, default_cache_dir,
                             find_cached_engine, tensorrt_unavailable_reason)
from engines.manifest import (MANIFEST_FILE, Manifest, ManifestError, ModelIntegrityError,
                              load_manifest, read_verified_model)
from engines.runners.base import BackendUnavailable, Runner, RunnerError
from engines.runners.onnxruntime_runner import OnnxRuntimeRunner
from engines.runners.tensorrt_runner import TensorRTRunner

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "onnxruntime", "tensorrt")

__all__ = ["BACKENDS", "LoadedModel", "ModelIntegrityError", "describe_backend", "load_model",
           "load_models", "model_folders"]


@dataclass
class LoadedModel:
    """A checked model with a warm runner. ``run`` takes the ``[1, 1, H, W]`` input tensor."""

    manifest: Manifest
    runner: Runner
    backend_reason: str = ""
    engine_path: Path | None = None

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def backend(self) -> str:
        """"onnxruntime" or "tensorrt"."""
        return self.runner.name

    def run(self, tensor: np.ndarray) -> dict[str, np.ndarray]:
        """Run on one preprocessed input tensor; returns outputs by name."""
        expected = self.manifest.input.shape
        array = np.asarray(tensor)
        if array.shape != expected:
            raise ValueError(f"{self.name}: input tensor must have shape {list(expected)} "
                             f"(see engines.preprocess.to_model_input), got {list(array.shape)}")
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"{self.name}: input tensor must be float32, got {array.dtype}")
        outputs = self.runner.run({self.manifest.input.name: array.astype(np.float32, copy=False)})
        # float32 whatever the backend (an engine may hand back float16 tensors)
        return {name: np.asarray(value, dtype=np.float32) for name, value in outputs.items()}

    def close(self) -> None:
        self.runner.close()


def _check_io(manifest: Manifest, runner: Runner) -> None:
    """The manifest's tensor names and input size must match the network's."""
    if manifest.input.name not in runner.input_names or len(runner.input_names) != 1:
        raise ManifestError(f"{manifest.path}: key 'input.name' is {manifest.input.name!r} but "
                            f"{manifest.onnx_path.name} has inputs {runner.input_names}")
    missing = [n for n in manifest.output_names if n not in runner.output_names]
    if missing:
        raise ManifestError(f"{manifest.path}: [output] names {missing} are not outputs of "
                            f"{manifest.onnx_path.name}, which has {runner.output_names}")
    shape = list(getattr(runner, "input_shapes", {}).get(manifest.input.name, []))
    if len(shape) == 4:
        for axis, key, want in ((2, "input.height", manifest.input.height),
                                (3, "input.width", manifest.input.width)):
            if isinstance(shape[axis], int) and shape[axis] > 0 and shape[axis] != want:
                raise ManifestError(f"{manifest.path}: key '{key}' is {want} but "
                                    f"{manifest.onnx_path.name} takes {shape}")


def _tensorrt_runner(manifest: Manifest, cache_dir: Path, precision: str) -> tuple[TensorRTRunner, Path, bool]:
    result = build_engine(manifest, cache_dir, precision=precision)
    return TensorRTRunner(result.path, label=f"{manifest.name} ({result.path.name})"), result.path, result.reused


def load_model(folder: Path | str, backend: str = "auto", *, cache_dir: Path | str | None = None,
               precision: str = DEFAULT_PRECISION, onnx_device: str = "auto",
               intra_op_threads: int | None = None) -> LoadedModel:
    """Load one model folder on ``backend`` ("auto", "onnxruntime" or "tensorrt").

    ``cache_dir`` holds TensorRT engines (default: :func:`engines.builder.default_cache_dir`);
    ``onnx_device`` ("auto", "cpu", "cuda") and ``intra_op_threads`` tune ONNX Runtime.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    manifest = load_manifest(folder)
    onnx_bytes = read_verified_model(manifest)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    runner: Runner | None = None
    engine: Path | None = None
    if backend == "onnxruntime":
        reason = "backend 'onnxruntime' configured"
    else:
        unavailable = tensorrt_unavailable_reason()
        if unavailable and backend == "tensorrt":
            raise BackendUnavailable(f"{manifest.name}: backend 'tensorrt' configured but {unavailable}; "
                                     "configure backend 'auto' or 'onnxruntime'")
        if unavailable:
            reason = f"TensorRT not used: {unavailable}"
        else:
            try:
                runner, engine, reused = _tensorrt_runner(manifest, cache, precision)
                reason = f"{'cached' if reused else 'newly built'} {precision} engine {engine}"
            except (EngineBuildError, RunnerError, OSError) as exc:
                if backend == "tensorrt":
                    raise
                logger.warning("%s: TensorRT engine unusable (%s); falling back to onnxruntime",
                               manifest.name, exc)
                reason = f"TensorRT engine unusable: {exc}"
    if runner is None:
        runner = OnnxRuntimeRunner(onnx_bytes, device=onnx_device, intra_op_threads=intra_op_threads,
                                   label=f"{manifest.name} ({manifest.onnx_path})")
    try:
        _check_io(manifest, runner)
    except ManifestError:
        runner.close()
        raise
    logger.info("model %s %s: backend %s (%s)", manifest.name, manifest.version, runner.name, reason)
    return LoadedModel(manifest=manifest, runner=runner, backend_reason=reason, engine_path=engine)


def model_folders(models_dir: Path | str) -> list[Path]:
    """Sub-folders of ``models_dir`` that hold a manifest, sorted by name."""
    root = Path(models_dir)
    if not root.is_dir():
        raise ManifestError(f"{root}: models folder does not exist")
    return sorted(p for p in root.iterdir() if (p / MANIFEST_FILE).is_file())


def load_models(models_dir: Path, backend: str = "auto", *, cache_dir: Path | str | None = None,
                precision: str = DEFAULT_PRECISION, onnx_device: str = "auto",
                intra_op_threads: int | None = None) -> dict[str, LoadedModel]:
    """Load every model folder under ``models_dir``, keyed by model name.

    Any bad model stops the load (the appliance must not start half-equipped); the keyword
    options are those of :func:`load_model`.
    """
    folders = model_folders(models_dir)
    if not folders:
        raise ManifestError(f"{models_dir}: no model folders with a {MANIFEST_FILE} found")
    models: dict[str, LoadedModel] = {}
    try:
        for folder in folders:
            model = load_model(folder, backend, cache_dir=cache_dir, precision=precision,
                               onnx_device=onnx_device, intra_op_threads=intra_op_threads)
            if model.name in models:
                model.close()
                raise ManifestError(f"{folder / MANIFEST_FILE}: key 'model.name' {model.name!r} "
                                    "is used by another model folder too")
            models[model.name] = model
    except Exception:
        for loaded in models.values():
            loaded.close()
        raise
    return models


def describe_backend(manifest: Manifest, backend: str = "auto", cache_dir: Path | str | None = None,
                     precision: str = DEFAULT_PRECISION) -> str:
    """Which runner ``load_model`` would use, in words, without building anything."""
    if backend == "onnxruntime":
        return "onnxruntime"
    unavailable = tensorrt_unavailable_reason()
    if unavailable:
        short = unavailable.split(";")[0].split(" (")[0]
        return f"onnxruntime ({short})" if backend == "auto" else f"UNAVAILABLE ({short})"
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    try:
        cached = find_cached_engine(manifest, cache, precision)
    except (RunnerError, OSError) as exc:
        return f"onnxruntime (TensorRT check failed: {exc})" if backend == "auto" else f"UNAVAILABLE ({exc})"
    return f"tensorrt ({precision}, {'cached engine' if cached else 'engine built on first load'})"

