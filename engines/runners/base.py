"""The one small interface every inference runner implements.

A runner owns a loaded network on one backend (ONNX Runtime, TensorRT) and maps named
numpy inputs to named numpy outputs. The model store picks the runner; callers only see
this interface, so a deployment can switch backends without code changes.
"""
from __future__ import annotations

import abc
import logging
from typing import Mapping

import numpy as np

logger = logging.getLogger(__name__)


class RunnerError(RuntimeError):
    """A runner could not be created or could not run."""


class BackendUnavailable(RunnerError):
    """The requested backend cannot run on this machine (library or GPU missing)."""


class Runner(abc.ABC):
    """Named numpy tensors in, named numpy tensors out."""

    #: backend name: "onnxruntime", "tensorrt" or "triton"
    name: str = "runner"

    @property
    @abc.abstractmethod
    def input_names(self) -> list[str]:
        """Names of the network inputs."""

    @property
    @abc.abstractmethod
    def output_names(self) -> list[str]:
        """Names of the network outputs."""

    @abc.abstractmethod
    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the network once; returns every output by name (host arrays the caller owns)."""

    def close(self) -> None:
        """Release the backend's resources (device memory, sessions). Safe to call twice."""

    def check_inputs(self, inputs: Mapping[str, np.ndarray]) -> None:
        """Raise a clear error when an input is missing or unexpected."""
        missing = [n for n in self.input_names if n not in inputs]
        extra = [n for n in inputs if n not in self.input_names]
        if missing or extra:
            raise RunnerError(f"{self.name}: inputs must be exactly {self.input_names}; "
                              f"missing {missing}, unexpected {extra}")

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
