"""TensorRT engine build and cache (TensorRT 10 API).

An engine is built on the device from the model's ONNX file and cached as
``<cache_dir>/<model-name>-<key>.engine``, where ``key`` is a truncated sha256 of what makes
an engine valid: the model's sha256, the TensorRT version, the GPU (name, compute
capability, multiprocessors, memory: an Orin Nano, NX and AGX all call themselves "Orin"),
the platform (Jetson module and L4T release) and the precision (and, for INT8, the
calibration set). A JSON sidecar beside it records that key material, so a person can see
why an engine was (not) reused. FP16 is the default; "fp32" really is FP32 (TF32, which
TensorRT enables by default on Ampere/Orin, is cleared); INT8 needs a calibration set (a
folder of ``.npy`` input tensors) and is refused without one.

A timing cache per TensorRT version and GPU is kept in the cache folder and reused, so a
rebuild (another model version, a damaged engine) takes a fraction of the first build.
Whatever TensorRT raises while building (it raises TypeError and ValueError for ordinary
failures) is reported as an :class:`EngineBuildError` naming the model.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engines.manifest import Manifest, read_verified_model, sha256_hex
from engines.runners.base import BackendUnavailable, RunnerError
from engines.runners.cuda_memory import DeviceBuffer, Stream, gpu_identity, gpu_problem
from engines.runners.tensorrt_runner import import_tensorrt, trt_logger

logger = logging.getLogger(__name__)

PRECISIONS = ("fp16", "fp32", "int8")
DEFAULT_PRECISION = "fp16"
DEFAULT_WORKSPACE_MB = 1024
KEY_LENGTH = 16


class EngineBuildError(RunnerError):
    """An engine could not be built (bad request, parser or builder failure)."""


def default_cache_dir() -> Path:
    """``$EDGE_ENGINE_CACHE`` or ``~/.cache/xray-edge/engines``."""
    return Path(os.environ.get("EDGE_ENGINE_CACHE") or "~/.cache/xray-edge/engines").expanduser()


def tensorrt_unavailable_reason() -> str | None:
    """Why TensorRT cannot run here (no module, old version, broken install, no usable GPU,
    in the words of the library that failed), or None when it can."""
    try:
        import_tensorrt()
    except BackendUnavailable as exc:
        return str(exc)
    return gpu_problem()


_TEGRA_RELEASE = Path("/etc/nv_tegra_release")
_DEVICE_MODEL = Path("/proc/device-tree/model")


def platform_identity(release: Path = _TEGRA_RELEASE, model: Path = _DEVICE_MODEL) -> str:
    """The Jetson module and L4T release ("NVIDIA Jetson Orin NX ...; L4T R36.4.3"), or ""
    off a Jetson: part of the engine key, so that a reflash or another module rebuilds."""
    parts = []
    try:
        parts.append(model.read_text(errors="replace").strip("\x00 \n"))
    except OSError:
        pass
    try:
        found = re.search(r"R(\d+) \(release\), REVISION: ([\d.]+)", release.read_text(errors="replace"))
    except OSError:
        found = None
    if found:
        parts.append(f"L4T R{found.group(1)}.{found.group(2)}")
    return "; ".join(p for p in parts if p)


def on_jetson(release: Path = _TEGRA_RELEASE) -> bool:
    """True on a Jetson (L4T), where not using TensorRT costs 10-50x in speed."""
    return release.exists()


@dataclass(frozen=True)
class EngineKey:
    """What an engine depends on; ``digest()`` names its cache file."""

    model_sha256: str
    tensorrt_version: str
    gpu_name: str
    precision: str
    calibration_sha256: str = ""   # INT8 only
    gpu: str = ""                  # compute capability, multiprocessors, memory
    platform: str = ""             # Jetson module and L4T release

    def digest(self) -> str:
        material = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
        return hashlib.sha256(material).hexdigest()[:KEY_LENGTH]


@dataclass(frozen=True)
class BuildResult:
    path: Path            # the .engine file
    key: EngineKey
    reused: bool          # True: found in the cache, nothing was built
    seconds: float        # build time (0 when reused)


def engine_path(cache_dir: Path, manifest: Manifest, key: EngineKey) -> Path:
    return Path(cache_dir) / f"{manifest.name}-{key.digest()}.engine"


def sidecar_path(engine: Path) -> Path:
    return engine.with_suffix(".json")


def check_precision(precision: str, calibration_dir: Path | str | None) -> None:
    """Refuse an unknown precision, and INT8 without a calibration set."""
    if precision not in PRECISIONS:
        raise EngineBuildError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "int8" and calibration_dir is None:
        raise EngineBuildError("precision int8 needs a calibration set: pass a folder of .npy input "
                               "tensors (--calibration DIR); without one use fp16")
    if precision != "int8" and calibration_dir is not None:
        raise EngineBuildError(f"a calibration set is only used with precision int8, not {precision}")


def calibration_files(calibration_dir: Path | str, manifest: Manifest) -> list[Path]:
    """The calibration tensors (``*.npy``), each checked to be the model's input shape."""
    folder = Path(calibration_dir)
    if not folder.is_dir():
        raise EngineBuildError(f"calibration folder {folder} does not exist")
    files = sorted(folder.glob("*.npy"))
    if not files:
        raise EngineBuildError(f"calibration folder {folder} holds no .npy files; save model-input "
                               f"tensors of shape {list(manifest.input.shape)} there")
    for path in files:
        shape = np.load(path, mmap_mode="r").shape
        if int(np.prod(shape)) != int(np.prod(manifest.input.shape)):
            raise EngineBuildError(f"calibration tensor {path} has shape {list(shape)}; "
                                   f"{manifest.name} takes {list(manifest.input.shape)}")
    return files


def _files_digest(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def engine_key(manifest: Manifest, precision: str, calibration: list[Path] | None = None) -> EngineKey:
    """The cache key for ``manifest`` on this machine's TensorRT and GPU 0."""
    trt = import_tensorrt()
    gpu = gpu_identity(0)
    return EngineKey(model_sha256=manifest.sha256, tensorrt_version=str(trt.__version__),
                     gpu_name=gpu["name"], precision=precision,
                     calibration_sha256=_files_digest(calibration) if calibration else "",
                     gpu=f"sm_{gpu['compute_capability']}, {gpu['multiprocessors']} SMs, "
                         f"{gpu['memory_mb']} MB", platform=platform_identity())


def cached_engine(path: Path) -> bool:
    """True when ``path`` and its sidecar exist and the engine's bytes match the sidecar."""
    side = sidecar_path(path)
    if not path.is_file() or not side.is_file():
        return False
    try:
        recorded = json.loads(side.read_text())["engine_sha256"]
    except (OSError, ValueError, KeyError) as exc:
        logger.warning("engine cache: unreadable sidecar %s (%s); rebuilding", side, exc)
        return False
    if sha256_hex(path.read_bytes()) != recorded:
        logger.warning("engine cache: %s does not match its sidecar (damaged?); rebuilding", path)
        return False
    return True


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _make_calibrator(trt: Any, files: list[Path], shape: tuple[int, ...]) -> Any:
    """An entropy calibrator feeding one ``.npy`` tensor per batch."""

    class _Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.index, self.stream = 0, Stream()
            self.buffer = DeviceBuffer(int(np.prod(shape)) * 4)

        def get_batch_size(self) -> int:
            return 1

        def get_batch(self, names: list[str]) -> list[int] | None:
            if self.index >= len(files):
                return None
            tensor = np.ascontiguousarray(np.load(files[self.index]), dtype=np.float32).reshape(shape)
            self.index += 1
            self.buffer.copy_from_host(tensor, self.stream)
            self.stream.synchronize()
            return [self.buffer.ptr]

        def read_calibration_cache(self) -> None:
            return None   # the engine itself is cached, keyed by the calibration set

        def write_calibration_cache(self, cache: Any) -> None:
            pass

        def free(self) -> None:
            self.buffer.free()
            self.stream.free()

    return _Calibrator()


def timing_cache_path(cache_dir: Path, key: EngineKey) -> Path:
    """Timing cache shared by the models built with this TensorRT on this GPU."""
    material = f"{key.tensorrt_version}|{key.gpu_name}|{key.gpu}|{key.platform}".encode()
    return Path(cache_dir) / f"timing-{hashlib.sha256(material).hexdigest()[:KEY_LENGTH]}.cache"


def _serialize(manifest: Manifest, precision: str, calibration: list[Path] | None,
               workspace_mb: int, timing_cache: Path | None = None) -> bytes:
    """Parse the (verified) ONNX file and build a serialized engine.

    TensorRT raises TypeError/ValueError (not only returns None) for ordinary failures: a
    builder it cannot create, unsupported types, dynamic dimensions it cannot resolve;
    every one is an EngineBuildError naming the model.
    """
    try:
        return _serialize_unchecked(manifest, precision, calibration, workspace_mb, timing_cache)
    except (EngineBuildError, BackendUnavailable):
        raise
    except Exception as exc:   # noqa: BLE001 - see the docstring
        raise EngineBuildError(f"TensorRT failed to build an engine for {manifest.name} "
                               f"({precision}): {type(exc).__name__}: {exc}") from exc


def _serialize_unchecked(manifest: Manifest, precision: str, calibration: list[Path] | None,
                         workspace_mb: int, timing_cache: Path | None) -> bytes:
    trt = import_tensorrt()
    onnx_bytes = read_verified_model(manifest)
    log = trt_logger(trt)
    builder = trt.Builder(log)
    network = builder.create_network(0)   # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, log)
    if not parser.parse(onnx_bytes):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT could not parse {manifest.onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    profile = None
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        dims = list(tensor.shape)
        if -1 in dims:   # dynamic axes: fix them to the manifest's single-image shape
            fixed = [want if have == -1 else have for have, want in zip(dims, manifest.input.shape)]
            profile = profile or builder.create_optimization_profile()
            profile.set_shape(tensor.name, fixed, fixed, fixed)
    if profile is not None:
        config.add_optimization_profile(profile)
    calibrator = None
    flag = {"fp16": "FP16", "int8": "INT8"}.get(precision)
    if flag and not hasattr(trt.BuilderFlag, flag):
        raise EngineBuildError(f"TensorRT {trt.__version__} has no BuilderFlag.{flag} (TensorRT 11 builds "
                               "strongly typed networks only); build with --precision fp32, or give "
                               "the model an ONNX file already converted to that precision")
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)   # on by default: fp32 would be TF32 on Orin
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
        calibrator = _make_calibrator(trt, calibration or [], manifest.input.shape)
        config.int8_calibrator = calibrator
        if profile is not None:
            config.set_calibration_profile(profile)
    cache = _load_timing_cache(config, timing_cache)
    try:
        serialized = builder.build_serialized_network(network, config)
    finally:
        if calibrator is not None:
            calibrator.free()
    if serialized is None:
        raise EngineBuildError(f"TensorRT failed to build an engine for {manifest.name} "
                               f"({precision}); see the TensorRT messages above")
    if cache is not None and timing_cache is not None:
        try:
            _atomic_write(timing_cache, bytes(cache.serialize()))
        except OSError as exc:
            logger.warning("engine cache: timing cache %s not saved (%s)", timing_cache, exc)
    return bytes(serialized)


def _load_timing_cache(config: Any, path: Path | None) -> Any:
    """Attach the saved timing cache (or a new one) to ``config``; None without a path."""
    if path is None:
        return None
    data = b""
    if path.is_file():
        try:
            data = path.read_bytes()
        except OSError as exc:
            logger.warning("engine cache: timing cache %s unreadable (%s); starting a new one", path, exc)
    cache = config.create_timing_cache(data)
    if cache is None and data:   # damaged: start afresh rather than fail the build
        logger.warning("engine cache: timing cache %s is not usable; starting a new one", path)
        cache = config.create_timing_cache(b"")
    if cache is not None:
        config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


def build_engine(manifest: Manifest, cache_dir: Path | str, *, precision: str = DEFAULT_PRECISION,
                 calibration_dir: Path | str | None = None, workspace_mb: int = DEFAULT_WORKSPACE_MB,
                 force: bool = False) -> BuildResult:
    """The engine for ``manifest``: reused from ``cache_dir`` when valid, else built and cached.

    Raises :class:`EngineBuildError` for a bad request or a failed build, and
    :class:`BackendUnavailable` when TensorRT or a GPU is missing.
    """
    check_precision(precision, calibration_dir)
    calibration = calibration_files(calibration_dir, manifest) if calibration_dir is not None else None
    reason = tensorrt_unavailable_reason()
    if reason:
        raise BackendUnavailable(f"cannot build a TensorRT engine for {manifest.name}: {reason}")
    key = engine_key(manifest, precision, calibration)
    path = engine_path(Path(cache_dir), manifest, key)
    if not force and cached_engine(path):
        logger.info("engine cache: reusing %s for %s (%s)", path, manifest.name, precision)
        return BuildResult(path=path, key=key, reused=True, seconds=0.0)
    logger.info("engine cache: building %s engine for %s on %s with TensorRT %s (takes a while)",
                precision, manifest.name, key.gpu_name, key.tensorrt_version)
    start = time.monotonic()
    data = _serialize(manifest, precision, calibration, workspace_mb,
                      timing_cache=timing_cache_path(Path(cache_dir), key))
    seconds = time.monotonic() - start
    _atomic_write(path, data)
    sidecar = {
        "model": manifest.name, "version": manifest.version, "onnx": str(manifest.onnx_path),
        "key": key.digest(), "key_material": dataclasses.asdict(key),
        "engine_sha256": sha256_hex(data), "engine_bytes": len(data),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "build_seconds": round(seconds, 3),
    }
    _atomic_write(sidecar_path(path), json.dumps(sidecar, indent=2).encode())
    logger.info("engine cache: built %s in %.1f s", path, seconds)
    return BuildResult(path=path, key=key, reused=False, seconds=seconds)


def find_cached_engine(manifest: Manifest, cache_dir: Path | str,
                       precision: str = DEFAULT_PRECISION,
                       calibration_dir: Path | str | None = None) -> Path | None:
    """The valid cached engine for ``manifest`` at ``precision`` (INT8: built from
    ``calibration_dir``), or None; never builds. Needs TensorRT and a GPU."""
    check_precision(precision, calibration_dir)
    calibration = calibration_files(calibration_dir, manifest) if calibration_dir is not None else None
    path = engine_path(Path(cache_dir), manifest, engine_key(manifest, precision, calibration))
    return path if cached_engine(path) else None
