"""A real Triton Inference Server for the tests, from the ``nvidia-pytriton`` wheel.

The wheel ships the Triton 2.x ``tritonserver`` binary with its Python backend (CPU only
here) but no ONNX Runtime backend, so the test repository wraps each ONNX model in a
Python-backend model (``model.py`` runs onnxruntime inside the server's own virtual
environment, ``make triton-server``: .cache/triton-venv, because the wheel pins numpy < 2).
The repository uses the same tensors, dynamic batching, version numbers and manifest
parameters as ``edge engines export-triton``; only the platform differs.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TRITON_VENV = Path(os.environ.get("EDGE_TEST_TRITON_VENV", ROOT / ".cache" / "triton-venv"))

MODEL_PY = '''\
"""Python-backend wrapper of an ONNX model (the pytriton server has no onnxruntime backend)."""
import json
import os
import time

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.inputs = [i["name"] for i in config["input"]]
        self.outputs = [o["name"] for o in config["output"]]
        params = config.get("parameters", {})
        self.delay_s = float(params.get("test_delay_ms", {}).get("string_value", "0") or 0) / 1000.0

    def execute(self, requests):
        # dynamic batching: the requests of several boxes run as one batch
        feeds = [[pb_utils.get_input_tensor_by_name(r, n).as_numpy() for n in self.inputs]
                 for r in requests]
        sizes = [f[0].shape[0] for f in feeds]
        batch = {n: np.concatenate([f[i] for f in feeds]) for i, n in enumerate(self.inputs)}
        if self.delay_s:
            time.sleep(self.delay_s)
        values = self.session.run(self.outputs, batch)
        responses, start = [], 0
        for size in sizes:
            tensors = [pb_utils.Tensor(n, np.ascontiguousarray(v[start:start + size]))
                       for n, v in zip(self.outputs, values)]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += size
        return responses
'''


def server_missing() -> str | None:
    """Why the test server cannot run here, or None."""
    if not (TRITON_VENV / "ready").is_file():
        return (f"the Triton test server is not installed in {TRITON_VENV} (run `make triton-server`, "
                "which `make test` runs: pip install nvidia-pytriton into its own venv)")
    return None


def _site_packages() -> Path:
    return next((TRITON_VENV / "lib").glob("python3*/site-packages"))


def _venv_libdir() -> str:
    """LIBDIR of the server venv's Python (where its libpython lives)."""
    try:
        return subprocess.run([str(TRITON_VENV / "bin" / "python"), "-c",
                               "import sysconfig; print(sysconfig.get_config_var('LIBDIR') or '')"],
                              capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return sysconfig.get_config_var("LIBDIR") or ""


def server_dir() -> Path:
    return _site_packages() / "pytriton" / "tritonserver"


def write_python_repository(models_dir: Path, repo: Path, *, version_override: str | None = None,
                            delay_ms: float = 0.0) -> Path:
    """A Triton model repository of Python-backend wrappers of every model under
    ``models_dir``; ``version_override`` writes another manifest_version (mismatch tests)."""
    import dataclasses

    from engines.manifest import load_manifest, read_verified_model
    from engines.store import model_folders
    from engines.triton_export import batchable_onnx, config_pbtxt, model_layout, triton_version

    repo = Path(repo)
    for folder in model_folders(models_dir):
        manifest = load_manifest(folder)
        original = read_verified_model(manifest)
        data, note = batchable_onnx(manifest, original)
        served = data if data is not None else original
        layout = model_layout(served, data is not None, note)
        shown = manifest
        if version_override is not None:
            shown = dataclasses.replace(manifest, model=dataclasses.replace(manifest.model,
                                                                            version=version_override))
        extra = {"test_delay_ms": str(delay_ms)} if delay_ms else {}
        model_dir = repo / manifest.name
        version_dir = model_dir / str(triton_version(shown.version))
        version_dir.mkdir(parents=True, exist_ok=True)
        (model_dir / "config.pbtxt").write_text(config_pbtxt(shown, layout, backend="python",
                                                             instance_kind="KIND_CPU",
                                                             extra_parameters=extra))
        (version_dir / "model.onnx").write_bytes(served)
        (version_dir / "model.py").write_text(MODEL_PY)
    return repo


class TritonServer:
    """``tritonserver`` as a subprocess on fixed ports (kept across restarts)."""

    def __init__(self, repo: Path, log: Path, *, http_port: int, grpc_port: int,
                 metrics_port: int) -> None:
        self.repo, self.log = Path(repo), Path(log)
        self.http_port, self.grpc_port, self.metrics_port = http_port, grpc_port, metrics_port
        self.proc: subprocess.Popen | None = None

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        # the Python backend stub links libpython: the server venv interpreter's first (a
        # system libpython of the same version may differ), then the wheel's bundled libraries
        libdir = _venv_libdir()
        libs = [libdir, str(_site_packages() / "nvidia_pytriton.libs")]
        env["LD_LIBRARY_PATH"] = ":".join([*libs, env.get("LD_LIBRARY_PATH", "")]).rstrip(":")
        env["PATH"] = f"{TRITON_VENV / 'bin'}:{env.get('PATH', '')}"
        for key in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
            env.pop(key, None)
        return env

    def start(self, timeout: float = 90.0) -> "TritonServer":
        base = server_dir()
        cmd = [str(base / "bin" / "tritonserver"), f"--model-repository={self.repo}",
               f"--backend-directory={base / 'backends'}", f"--cache-directory={base / 'caches'}",
               f"--http-port={self.http_port}", f"--grpc-port={self.grpc_port}",
               f"--metrics-port={self.metrics_port}", "--allow-metrics=true",
               "--http-address=127.0.0.1", "--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1",
               "--allow-gpu-metrics=false", "--allow-cpu-metrics=true", "--log-verbose=0",
               "--backend-config=python,shm-default-byte-size=4194304",
               "--strict-readiness=true", "--exit-timeout-secs=5"]
        self._log = open(self.log, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env(),
                                     start_new_session=True)
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        import requests

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"tritonserver exited with {self.proc.returncode}; "
                                   f"log: {self.log.read_text(errors='replace')[-3000:]}")
            try:
                if requests.get(f"http://{self.http_url}/v2/health/ready", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"tritonserver not ready within {timeout} s; log: {self.log}")

    def kill(self) -> None:
        """SIGKILL the server and its Python-backend stubs (its own process group)."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None
        if getattr(self, "_log", None):
            self._log.close()
