"""The model store: load model folders, check them, and pick a runner for each.

``load_models(models_dir, backend)`` is what the appliance calls once at start; models then
stay warm. Every load checks the ONNX file's sha256 against the manifest (a mismatch is a
:class:`ModelIntegrityError`, never a silent load) and checks the manifest's tensor names
against the network. ``backend="auto"`` takes TensorRT when it imports, a CUDA GPU is
present and an engine is cached or can be built; otherwise ONNX Runtime. The choice and
the reason are logged and kept on the :class:`LoadedModel`.

Any failure on the TensorRT path falls back to ONNX Runtime in ``auto`` mode (TensorRT
raises TypeError, ValueError, AttributeError as well as its own errors); on a Jetson that
fallback is a WARNING, because it costs 10-50x in speed. With ``build_in_background`` (the
service), a model whose engine is not built yet starts on ONNX Runtime at once and
switches to TensorRT when the engine is ready, so a first start never exceeds the service
manager's start timeout. A cached engine that TensorRT cannot load is rebuilt once.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from engines.checks import check_io
from engines.builder import (DEFAULT_PRECISION, build_engine, default_cache_dir,
                             find_cached_engine, on_jetson, tensorrt_unavailable_reason)
from engines.manifest import (MANIFEST_FILE, Manifest, ManifestError, ModelIntegrityError,
                              load_manifest, read_verified_model)
from engines.runners.base import BackendUnavailable, Runner, RunnerError
from engines.runners.onnxruntime_runner import OnnxRuntimeRunner
from engines.runners.tensorrt_runner import EngineUnreadable, TensorRTRunner
from engines.runners.triton_runner import TritonSettings, TritonWithFallback

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "onnxruntime", "tensorrt", "triton")

__all__ = ["BACKENDS", "LoadedModel", "ModelIntegrityError", "describe_backend", "load_model",
           "load_models", "model_folders"]


@dataclass
class LoadedModel:
    """A checked model with a warm runner. ``run`` takes the ``[1, 1, H, W]`` input tensor.

    ``tensorrt_expected``: TensorRT was asked for (auto or tensorrt) on a Jetson, where it
    should run; when ``backend`` is then not "tensorrt", the box is 10-50x slower than it
    should be and says so (``tensorrt_missing``). ``building``: an engine is being built in
    the background; the runner switches to it when it is ready.
    """

    manifest: Manifest
    runner: Runner
    backend_reason: str = ""
    engine_path: Path | None = None
    tensorrt_expected: bool = False
    building: bool = False
    precision: str = DEFAULT_PRECISION
    _swap: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _builder: threading.Thread | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def backend(self) -> str:
        """"onnxruntime" or "tensorrt"."""
        return self.runner.name

    @property
    def last_backend(self) -> str:
        """The backend that produced the last outputs (Triton, or its local fallback)."""
        return str(getattr(self.runner, "last_backend", None) or self.runner.name)

    @property
    def tensorrt_missing(self) -> bool:
        return self.tensorrt_expected and self.backend != "tensorrt"

    def run(self, tensor: np.ndarray) -> dict[str, np.ndarray]:
        """Run on one preprocessed input tensor; returns outputs by name."""
        expected = self.manifest.input.shape
        array = np.asarray(tensor)
        if array.shape != expected:
            raise ValueError(f"{self.name}: input tensor must have shape {list(expected)} "
                             f"(see engines.preprocess.to_model_input), got {list(array.shape)}")
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"{self.name}: input tensor must be float32, got {array.dtype}")
        with self._swap:   # the runner is not replaced under a run
            outputs = self.runner.run({self.manifest.input.name: array.astype(np.float32, copy=False)})
        # float32 whatever the backend (an engine may hand back float16 tensors)
        return {name: np.asarray(value, dtype=np.float32) for name, value in outputs.items()}

    def switch_runner(self, runner: Runner, reason: str, engine: Path | None = None) -> None:
        """Replace the runner (after a background engine build); the old one is closed."""
        with self._swap:
            old, self.runner = self.runner, runner
            self.backend_reason, self.engine_path = reason, engine
        old.close()

    def close(self) -> None:
        if self._builder is not None:
            self._builder.join(timeout=1.0)
        with self._swap:
            self.runner.close()


def _tensorrt_runner(manifest: Manifest, cache_dir: Path, precision: str,
                     calibration_dir: Path | str | None = None) -> tuple[TensorRTRunner, Path, bool]:
    """Build (or reuse) the engine and load it; an engine this TensorRT cannot load is
    rebuilt once rather than reported."""
    result = build_engine(manifest, cache_dir, precision=precision, calibration_dir=calibration_dir)
    label = f"{manifest.name} ({result.path.name})"
    try:
        return TensorRTRunner(result.path, label=label), result.path, result.reused
    except EngineUnreadable as exc:
        logger.warning("%s: cached engine %s cannot be loaded (%s); rebuilding it",
                       manifest.name, result.path, exc)
        result = build_engine(manifest, cache_dir, precision=precision,
                              calibration_dir=calibration_dir, force=True)
        return TensorRTRunner(result.path, label=label), result.path, False


def load_model(folder: Path | str, backend: str = "auto", *, cache_dir: Path | str | None = None,
               precision: str = DEFAULT_PRECISION, calibration_dir: Path | str | None = None,
               onnx_device: str = "auto", intra_op_threads: int | None = None,
               build_in_background: bool = False,
               on_switch: Callable[["LoadedModel"], None] | None = None,
               triton: TritonSettings | None = None) -> LoadedModel:
    """Load one model folder on ``backend`` ("auto", "onnxruntime", "tensorrt" or "triton").

    ``cache_dir`` holds TensorRT engines (default: :func:`engines.builder.default_cache_dir`);
    ``precision`` and ``calibration_dir`` (INT8) choose the engine; ``onnx_device`` ("auto",
    "cpu", "cuda") and ``intra_op_threads`` tune ONNX Runtime. With ``build_in_background``,
    an engine that is not cached yet is built in a thread while the model runs on ONNX
    Runtime; ``on_switch(model)`` is called when it switched to TensorRT. ``triton`` (for
    backend "triton"): the server, with ONNX Runtime as the local fallback.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    manifest = load_manifest(folder)
    onnx_bytes = read_verified_model(manifest)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    runner: Runner | None = None
    engine: Path | None = None
    build_later = False
    expected = backend not in ("onnxruntime", "triton") and on_jetson()
    if backend == "triton":
        if triton is None:
            raise ValueError("backend 'triton' needs the Triton server settings ([models] triton_url)")

        def local() -> OnnxRuntimeRunner:
            return OnnxRuntimeRunner(onnx_bytes, device=onnx_device, intra_op_threads=intra_op_threads,
                                     label=f"{manifest.name} ({manifest.onnx_path}, Triton fallback)")
        runner = TritonWithFallback(manifest, triton, local)
        reason = (f"Triton at {triton.url} ({triton.protocol})" if runner.name == "triton"
                  else f"Triton not used now ({runner.problem}); local onnxruntime")
    elif backend == "onnxruntime":
        reason = "backend 'onnxruntime' configured"
    else:
        unavailable = tensorrt_unavailable_reason()
        if unavailable and backend == "tensorrt":
            raise BackendUnavailable(f"{manifest.name}: backend 'tensorrt' configured but {unavailable}; "
                                     "configure backend 'auto' or 'onnxruntime'")
        if unavailable:
            reason = f"TensorRT not used: {unavailable}"
        elif build_in_background and not _engine_ready(manifest, cache, precision, calibration_dir):
            reason = f"TensorRT {precision} engine being built; onnxruntime until it is ready"
            build_later = True
        else:
            try:
                runner, engine, reused = _tensorrt_runner(manifest, cache, precision, calibration_dir)
                reason = f"{'cached' if reused else 'newly built'} {precision} engine {engine}"
            except Exception as exc:   # noqa: BLE001 - TensorRT raises TypeError/ValueError too
                if backend == "tensorrt" or isinstance(exc, (ModelIntegrityError, ManifestError)):
                    raise
                reason = f"TensorRT engine unusable: {type(exc).__name__}: {exc}"
    if runner is None:
        runner = OnnxRuntimeRunner(onnx_bytes, device=onnx_device, intra_op_threads=intra_op_threads,
                                   label=f"{manifest.name} ({manifest.onnx_path})")
    try:
        check_io(manifest, runner)
    except ManifestError:
        runner.close()
        raise
    model = LoadedModel(manifest=manifest, runner=runner, backend_reason=reason, engine_path=engine,
                        tensorrt_expected=expected, precision=precision)
    if expected and runner.name != "tensorrt" and not build_later:
        logger.warning("model %s %s runs on %s on this Jetson, 10-50x slower than with TensorRT: %s",
                       manifest.name, manifest.version, runner.name, reason)
    else:
        logger.info("model %s %s: backend %s (%s)", manifest.name, manifest.version, runner.name, reason)
    if build_later:
        model.building = True
        model._builder = threading.Thread(
            target=_build_and_switch, args=(model, cache, precision, calibration_dir, on_switch),
            name=f"engine-build-{manifest.name}", daemon=True)
        model._builder.start()
    return model


def _engine_ready(manifest: Manifest, cache: Path, precision: str,
                  calibration_dir: Path | str | None) -> bool:
    try:
        return find_cached_engine(manifest, cache, precision, calibration_dir) is not None
    except Exception as exc:   # noqa: BLE001 - cannot tell: build (in the background)
        logger.debug("engine cache check of %s failed: %s", manifest.name, exc)
        return False


def _build_and_switch(model: LoadedModel, cache: Path, precision: str,
                      calibration_dir: Path | str | None,
                      on_switch: Callable[[LoadedModel], None] | None) -> None:
    """Background thread: build the engine, load it, and switch the model to it."""
    manifest = model.manifest
    try:
        runner, engine, _ = _tensorrt_runner(manifest, cache, precision, calibration_dir)
        try:
            check_io(manifest, runner)
        except ManifestError:
            runner.close()
            raise
    except Exception as exc:   # noqa: BLE001 - stays on onnxruntime, loudly
        model.backend_reason = f"TensorRT engine unusable: {type(exc).__name__}: {exc}"
        log = logger.warning if model.tensorrt_expected else logger.info
        log("model %s: the %s engine could not be built or loaded (%s); it stays on %s",
            manifest.name, precision, exc, model.backend)
        return
    finally:
        model.building = False
    model.switch_runner(runner, f"newly built {precision} engine {engine}", engine)
    logger.info("model %s %s now runs on TensorRT (%s engine %s)", manifest.name, manifest.version,
                precision, engine)
    if on_switch is not None:
        on_switch(model)


def model_folders(models_dir: Path | str) -> list[Path]:
    """Sub-folders of ``models_dir`` that hold a manifest, sorted by name."""
    root = Path(models_dir)
    if not root.is_dir():
        raise ManifestError(f"{root}: models folder does not exist")
    return sorted(p for p in root.iterdir() if (p / MANIFEST_FILE).is_file())


def load_models(models_dir: Path, backend: str = "auto", *, cache_dir: Path | str | None = None,
                precision: str = DEFAULT_PRECISION, calibration_dir: Path | str | None = None,
                onnx_device: str = "auto", intra_op_threads: int | None = None,
                build_in_background: bool = False,
                on_switch: Callable[[LoadedModel], None] | None = None,
                refused: list[str] | None = None,
                triton: TritonSettings | None = None) -> dict[str, LoadedModel]:
    """Load every model folder under ``models_dir``, keyed by model name.

    By default any bad model stops the load (the appliance must not start half-equipped).
    With a ``refused`` list, a folder that cannot be loaded (manifest, integrity, tensors
    that do not match the manifest) is skipped instead, one line per folder appended to
    ``refused`` and logged; at least one model must load. The keyword options are those
    of :func:`load_model`.
    """
    folders = model_folders(models_dir)
    if not folders:
        raise ManifestError(f"{models_dir}: no model folders with a {MANIFEST_FILE} found")
    models: dict[str, LoadedModel] = {}
    try:
        for folder in folders:
            try:
                model = load_model(folder, backend, cache_dir=cache_dir, precision=precision,
                                   calibration_dir=calibration_dir, onnx_device=onnx_device,
                                   intra_op_threads=intra_op_threads,
                                   build_in_background=build_in_background, on_switch=on_switch,
                                   triton=triton)
                if model.name in models:
                    model.close()
                    raise ManifestError(f"{folder / MANIFEST_FILE}: key 'model.name' {model.name!r} "
                                        "is used by another model folder too")
            except (ManifestError, ModelIntegrityError, RunnerError) as exc:
                if refused is None:
                    raise
                line = f"model folder {folder.name} refused: " + " ".join(str(exc).split())
                logger.error("%s", line)
                refused.append(line)
                continue
            models[model.name] = model
        if not models:
            raise ManifestError(f"{models_dir}: no model could be loaded ({'; '.join(refused or [])})")
    except Exception:
        for loaded in models.values():
            loaded.close()
        raise
    return models


def describe_backend(manifest: Manifest, backend: str = "auto", cache_dir: Path | str | None = None,
                     precision: str = DEFAULT_PRECISION, calibration_dir: Path | str | None = None) -> str:
    """Which runner ``load_model`` would use, in words, without building anything."""
    if backend in ("onnxruntime", "triton"):
        return backend if backend == "onnxruntime" else "triton (local onnxruntime as fallback)"
    unavailable = tensorrt_unavailable_reason()
    if unavailable:
        short = unavailable.split(";")[0].split(" (")[0]
        return f"onnxruntime ({short})" if backend == "auto" else f"UNAVAILABLE ({short})"
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    try:
        cached = find_cached_engine(manifest, cache, precision, calibration_dir)
    except (RunnerError, OSError) as exc:
        return f"onnxruntime (TensorRT check failed: {exc})" if backend == "auto" else f"UNAVAILABLE ({exc})"
    return f"tensorrt ({precision}, {'cached engine' if cached else 'engine built on first load'})"

