"""Inference runners behind one interface (:class:`engines.runners.base.Runner`).

``onnxruntime_runner`` runs anywhere; ``tensorrt_runner`` needs TensorRT 10 and a CUDA GPU,
with device memory through ``cuda_memory`` (cuda-python or pycuda). TensorRT and the CUDA
libraries are imported only when a TensorRT runner is made. ``triton_runner`` sends the
tensors to a shared Triton Inference Server (``triton_client``, tritonclient imported when
used), with ONNX Runtime as the local fallback.
"""
from engines.runners.base import BackendUnavailable, Runner, RunnerError

__all__ = ["BackendUnavailable", "Runner", "RunnerError"]
