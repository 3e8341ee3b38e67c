"""ONNX Runtime runner: the default on machines without TensorRT.

Providers are listed explicitly and checked after the session is made, because ONNX
Runtime falls back to the CPU silently when a GPU provider cannot start.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

import numpy as np

from engines.runners.base import BackendUnavailable, Runner, RunnerError

logger = logging.getLogger(__name__)

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"
DEVICES = ("auto", "cpu", "cuda")


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - onnxruntime is a hard dependency
        raise BackendUnavailable(f"onnxruntime is not installed ({exc}); pip install onnxruntime") from exc
    return onnxruntime


def choose_providers(device: str, available: list[str]) -> list[str]:
    """Provider list for ``device`` ("auto", "cpu" or "cuda") given the available providers.

    "auto" takes CUDA when ONNX Runtime offers it; "cuda" requires it.
    """
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cpu":
        return [CPU_PROVIDER]
    if CUDA_PROVIDER in available:
        return [CUDA_PROVIDER, CPU_PROVIDER]
    if device == "cuda":
        raise BackendUnavailable(
            f"onnxruntime: device 'cuda' requested but this onnxruntime offers only {available}; "
            "install onnxruntime-gpu (with a matching CUDA) or use device 'cpu'")
    return [CPU_PROVIDER]


class OnnxRuntimeRunner(Runner):
    """One ``onnxruntime.InferenceSession`` with all graph optimizations on.

    ``model`` is the ONNX file or its bytes (the store passes the bytes it hashed, so what
    was checked is what runs). ``intra_op_threads`` = None lets ONNX Runtime choose.
    """

    name = "onnxruntime"

    def __init__(self, model: Path | str | bytes, *, device: str = "auto",
                 intra_op_threads: int | None = None, label: str = "") -> None:
        ort = _import_onnxruntime()
        self.label = label or (str(model) if not isinstance(model, bytes) else "model")
        requested = choose_providers(device, list(ort.get_available_providers()))
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle worker threads must not spin: decoding the next image runs on the same
        # cores between inferences (measured here: J2K decode 29 ms instead of 91 ms).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if intra_op_threads is not None:
            if intra_op_threads < 0:
                raise ValueError(f"intra_op_threads must be >= 0 (0 = onnxruntime default), "
                                 f"got {intra_op_threads}")
            options.intra_op_num_threads = int(intra_op_threads)
        source = model if isinstance(model, bytes) else str(model)
        try:
            self._session = ort.InferenceSession(source, sess_options=options, providers=requested)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise RunnerError(f"onnxruntime could not load {self.label}: {exc}") from exc
        self.providers: list[str] = list(self._session.get_providers())
        if requested[0] == CUDA_PROVIDER and CUDA_PROVIDER not in self.providers:
            message = (f"onnxruntime: {self.label}: {CUDA_PROVIDER} was requested but the session "
                       f"runs on {self.providers} (CUDA/cuDNN libraries missing or no GPU?)")
            if device == "cuda":
                raise BackendUnavailable(message)
            logger.warning("%s; running on the CPU", message)
        self._inputs = [i.name for i in self._session.get_inputs()]
        self._outputs = [o.name for o in self._session.get_outputs()]
        self.input_shapes = {i.name: list(i.shape) for i in self._session.get_inputs()}
        self.output_shapes = {o.name: list(o.shape) for o in self._session.get_outputs()}
        logger.info("onnxruntime: %s loaded on %s", self.label, ", ".join(self.providers))

    @property
    def input_names(self) -> list[str]:
        return list(self._inputs)

    @property
    def output_names(self) -> list[str]:
        return list(self._outputs)

    @property
    def device(self) -> str:
        """"cuda" when the session really runs on the CUDA provider, else "cpu"."""
        return "cuda" if self.providers and self.providers[0] == CUDA_PROVIDER else "cpu"

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._session is None:
            raise RunnerError(f"onnxruntime: {self.label} was closed")
        self.check_inputs(inputs)
        feed = {name: np.ascontiguousarray(inputs[name]) for name in self._inputs}
        try:
            values = self._session.run(self._outputs, feed)
        except Exception as exc:
            raise RunnerError(f"onnxruntime: running {self.label} failed: {exc}") from exc
        return dict(zip(self._outputs, values))

    def close(self) -> None:
        self._session = None
