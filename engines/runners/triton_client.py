"""Connection to a Triton Inference Server with ``tritonclient`` (gRPC or HTTP).

:class:`TritonSettings` says how to reach the server (the appliance's ``[models] triton_*``
keys); :class:`TritonClient` wraps the calls the runner needs (liveness, readiness, model
metadata and config, inference) with the configured timeouts, TLS and headers.
``tritonclient`` is imported only when a client is made.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from engines.runners.base import BackendUnavailable, RunnerError

logger = logging.getLogger(__name__)

PROTOCOLS = ("grpc", "http")
_NP_TO_TRITON = {np.dtype(np.float32): "FP32", np.dtype(np.float16): "FP16",
                 np.dtype(np.int64): "INT64", np.dtype(np.int32): "INT32", np.dtype(np.uint8): "UINT8"}


class TritonUnavailable(RunnerError):
    """Triton cannot be reached, answered with an error, or too slowly."""


class TritonModelMismatch(RunnerError):
    """Triton serves a model that is not the one the manifest describes."""


@dataclass(frozen=True)
class TritonSettings:
    """How to reach the Triton server (``[models] triton_*`` keys of the appliance)."""

    url: str
    protocol: str = "grpc"
    timeout_s: float = 5.0            # a request slower than this falls back
    connect_timeout_s: float = 2.0    # probes: server live, model ready, metadata
    retry_s: float = 10.0             # after a failure, Triton is tried again after this
    fallback: bool = True             # run locally on ONNX Runtime when Triton fails
    tls: bool = False
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    headers: tuple[tuple[str, str], ...] = ()   # e.g. ("authorization", "Bearer ...")

    @classmethod
    def from_config(cls, models: Any) -> "TritonSettings | None":
        """From the appliance's ``[models]`` section (``edge.config.ModelsConfig``); None
        when no ``triton_url`` is set."""
        if not getattr(models, "triton_url", None):
            return None
        return cls(url=models.triton_url, protocol=models.triton_protocol,
                   timeout_s=models.triton_timeout_s, retry_s=models.triton_retry_s,
                   fallback=models.triton_fallback, tls=models.triton_tls, ca=models.triton_ca,
                   cert=models.triton_cert, key=models.triton_key,
                   headers=tuple(models.triton_headers))

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        if not self.url:
            raise ValueError("url: the Triton server address (host:port) is required")


def _import(protocol: str) -> Any:
    try:
        if protocol == "grpc":
            import tritonclient.grpc as client
        else:
            import tritonclient.http as client
    except ImportError as exc:
        raise BackendUnavailable(f"tritonclient is not installed ({exc}); pip install "
                                 f"'tritonclient[{protocol}]' (the appliance's 'triton' extra)") from exc
    return client


class TritonClient:
    """One connection to the server; thread-safe (the HTTP client gets one per thread)."""

    def __init__(self, settings: TritonSettings) -> None:
        self.settings = settings
        self._module = _import(settings.protocol)
        self._local = threading.local()
        self._grpc = None
        self.headers = {k: v for k, v in settings.headers} or None

    def client(self) -> Any:
        s = self.settings
        if s.protocol == "grpc":
            if self._grpc is None:
                kw: dict[str, Any] = {}
                if s.tls:
                    kw = {"ssl": True, "root_certificates": s.ca, "private_key": s.key,
                          "certificate_chain": s.cert}
                self._grpc = self._module.InferenceServerClient(s.url, **kw)
            return self._grpc
        client = getattr(self._local, "client", None)
        if client is None:
            kw = {"connection_timeout": s.connect_timeout_s, "network_timeout": s.timeout_s}
            if s.tls:
                import ssl

                def context_factory(*_args, **_kw):
                    ctx = ssl.create_default_context(cafile=s.ca)
                    if s.cert:
                        ctx.load_cert_chain(s.cert, s.key)
                    return ctx
                kw.update(ssl=True, ssl_context_factory=context_factory)
            client = self._local.client = self._module.InferenceServerClient(s.url, **kw)
        return client

    def _timeout(self, seconds: float) -> dict[str, Any]:
        return {"client_timeout": seconds} if self.settings.protocol == "grpc" else {}

    def server_live(self) -> bool:
        return bool(self.client().is_server_live(headers=self.headers,
                                                 **self._timeout(self.settings.connect_timeout_s)))

    def model_ready(self, name: str, version: str = "") -> bool:
        return bool(self.client().is_model_ready(name, version, headers=self.headers,
                                                 **self._timeout(self.settings.connect_timeout_s)))

    def metadata(self, name: str) -> dict:
        kw = self._timeout(self.settings.connect_timeout_s)
        if self.settings.protocol == "grpc":
            kw["as_json"] = True
        return dict(self.client().get_model_metadata(name, headers=self.headers, **kw))

    def config(self, name: str) -> dict:
        kw = self._timeout(self.settings.connect_timeout_s)
        if self.settings.protocol == "grpc":
            kw["as_json"] = True
        out = dict(self.client().get_model_config(name, headers=self.headers, **kw))
        return dict(out.get("config", out))   # gRPC wraps it in "config"

    def infer(self, name: str, version: str, inputs: Mapping[str, np.ndarray],
              outputs: list[str]) -> dict[str, np.ndarray]:
        m = self._module
        request = []
        for key, array in inputs.items():
            array = np.ascontiguousarray(array)
            item = m.InferInput(key, list(array.shape), _NP_TO_TRITON.get(array.dtype, "FP32"))
            item.set_data_from_numpy(array)
            request.append(item)
        wanted = [m.InferRequestedOutput(o) for o in outputs]
        result = self.client().infer(name, request, model_version=version, outputs=wanted,
                                     headers=self.headers, **self._timeout(self.settings.timeout_s))
        return {o: np.array(result.as_numpy(o)) for o in outputs}

    def close(self) -> None:
        for client in (self._grpc, getattr(self._local, "client", None)):
            try:
                if client is not None:
                    client.close()
            except Exception:   # noqa: BLE001 - closing a broken channel
                pass
        self._grpc = None
        self._local = threading.local()


def short_error(exc: BaseException) -> str:
    """One line of an exception for logs and messages (tritonclient and grpc errors are long)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]
