"""Triton runner: the tensors of one model go to a shared Triton Inference Server.

The connection itself (settings, timeouts, TLS, headers) is ``engines.runners.triton_client``.

Pre- and post-processing stay on the box (the manifest drives them as for every runner);
only the input tensor and the outputs travel, over gRPC (default) or HTTP with
``tritonclient``. Before a model is used, Triton's copy is checked against the manifest:
the model is ready, its version number is the one ``edge engines export-triton`` derives
from the manifest version, its ``manifest_version`` / ``manifest_sha256`` config parameters
(where the repository has them) equal the manifest's, and its tensors are the manifest's.
A mismatch is a :class:`TritonModelMismatch`, never silently used.

:class:`TritonWithFallback` is what the model store gives the appliance: it runs on Triton
and, when Triton is unreachable, fails or answers slower than ``timeout_s``, runs the same
request locally on ONNX Runtime (when fallback is on), then tries Triton again after
``retry_s``. ``last_backend`` says which backend produced the last outputs; counters and
round-trip times are kept for the metrics (:class:`TritonStats`).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from engines.runners.base import Runner, RunnerError
from engines.runners.triton_client import (PROTOCOLS, TritonClient, TritonModelMismatch, TritonSettings,
                                           TritonUnavailable, short_error)

logger = logging.getLogger(__name__)

__all__ = ["PROTOCOLS", "TritonClient", "TritonModelMismatch", "TritonRunner", "TritonSettings",
           "TritonStats", "TritonUnavailable", "TritonWithFallback", "check_server"]


def _triton_version(version: str) -> str:
    from engines.triton_export import triton_version
    return str(triton_version(version))


def _param(config: dict, key: str) -> str | None:
    value = (config.get("parameters") or {}).get(key)
    return None if value is None else str(value.get("string_value", ""))


class TritonRunner(Runner):
    """Runs one manifest's model on Triton; checked against the manifest when made."""

    name = "triton"

    def __init__(self, manifest: Any, settings: TritonSettings, *, client: TritonClient | None = None) -> None:
        self.manifest = manifest
        self.settings = settings
        self._owns_client = client is None
        self.client = client or TritonClient(settings)
        self.model_name = manifest.name
        self.version = _triton_version(manifest.version)
        self._inputs: list[str] = []
        self._outputs: list[str] = []
        self.batched = False
        self._shapes: dict[str, list[int]] = {}
        self.check()

    def check(self) -> None:
        """Triton is live and serves this manifest's model; raises TritonUnavailable or
        TritonModelMismatch saying what differs."""
        m, url = self.manifest, self.settings.url
        try:
            if not self.client.server_live():
                raise TritonUnavailable(f"Triton at {url} is not live")
            ready = self.client.model_ready(self.model_name, self.version)
            if not ready and not self.client.model_ready(self.model_name):
                raise TritonModelMismatch(
                    f"Triton at {url} has no ready model {self.model_name!r}; export the "
                    "repository with `edge engines export-triton DIR` and load it on the server")
            meta = self.client.metadata(self.model_name)
            config = self.client.config(self.model_name)
        except RunnerError:
            raise
        except Exception as exc:   # noqa: BLE001 - tritonclient raises its own and grpc errors
            raise TritonUnavailable(f"Triton at {url} unreachable: {short_error(exc)}") from None
        versions = [str(v) for v in meta.get("versions", [])]
        problems = []
        if not ready or (versions and self.version not in versions):
            problems.append(f"version {', '.join(versions) or '?'} on Triton, manifest version "
                            f"{m.version} is Triton version {self.version}")
        served_version = _param(config, "manifest_version")
        if served_version is not None and served_version != m.version:
            problems.append(f"manifest_version {served_version!r} on Triton, {m.version!r} here")
        served_sha = _param(config, "manifest_sha256")
        if served_sha is not None and served_sha.lower() != m.sha256.lower():
            problems.append(f"manifest_sha256 {served_sha[:12]}... on Triton, {m.sha256[:12]}... here")
        self._inputs = [i["name"] for i in meta.get("inputs", [])]
        self._outputs = [o["name"] for o in meta.get("outputs", [])]
        self._shapes = {o["name"]: [int(d) for d in o.get("shape", [])] for o in meta.get("outputs", [])}
        if self._inputs != [m.input.name]:
            problems.append(f"inputs {self._inputs} on Triton, [{m.input.name!r}] in the manifest")
        missing = [o for o in m.output_names if o not in self._outputs]
        if missing:
            problems.append(f"outputs {missing} of the manifest are not served (Triton has {self._outputs})")
        self.batched = int(config.get("max_batch_size", 0) or 0) > 0
        if problems:
            raise TritonModelMismatch(f"model {self.model_name} on Triton at {url} is not the "
                                      f"installed one: {'; '.join(problems)}; export it again with "
                                      "`edge engines export-triton` and reload the server")

    @property
    def input_names(self) -> list[str]:
        return list(self._inputs)

    @property
    def output_names(self) -> list[str]:
        return list(self._outputs)

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.check_inputs(inputs)
        add_batch = self.batched and not self.manifest.input.batch
        feed = {k: (v[None] if add_batch else v) for k, v in inputs.items()}
        try:
            out = self.client.infer(self.model_name, self.version, feed, self._outputs)
        except Exception as exc:   # noqa: BLE001 - tritonclient raises its own and grpc errors
            raise TritonUnavailable(f"Triton at {self.settings.url}: {self.model_name} failed: "
                                    f"{short_error(exc)}") from None
        missing = [o for o in self._outputs if out.get(o) is None]
        if missing:
            raise TritonUnavailable(f"Triton at {self.settings.url}: {self.model_name} answered "
                                    f"without outputs {missing}")
        for name, value in out.items():   # a bad answer is a failed request, never decoded
            want = self._shapes.get(name, [])
            if want and (value.ndim != len(want) or any(w > 0 and w != g for w, g in zip(want, value.shape))):
                raise TritonUnavailable(f"Triton at {self.settings.url}: {self.model_name} answered "
                                        f"{name} of shape {list(value.shape)}, expected {want}")
        return {k: (v[0] if add_batch else v) for k, v in out.items()}

    def close(self) -> None:
        if self._owns_client:
            self.client.close()


@dataclass
class TritonStats:
    """Counters of one model's runs for the metrics (read at scrape time)."""

    runs: dict[str, int] = field(default_factory=lambda: {"triton": 0, "onnxruntime": 0})
    fallbacks: dict[str, int] = field(default_factory=lambda: {"unreachable": 0, "timeout": 0,
                                                               "error": 0, "mismatch": 0})
    round_trip_sum_s: float = 0.0
    round_trip_count: int = 0
    last_round_trip_s: float | None = None
    last_error: str = ""


class TritonWithFallback(Runner):
    """Triton first; ONNX Runtime (made on demand, kept warm) when Triton fails and
    ``settings.fallback`` is on. Without fallback a Triton failure raises
    :class:`TritonUnavailable` (the pipeline keeps the image and tries again)."""

    def __init__(self, manifest: Any, settings: TritonSettings,
                 make_local: Callable[[], Runner], *, client: TritonClient | None = None) -> None:
        self.manifest = manifest
        self.settings = settings
        self._make_local = make_local
        self._client = client
        self.remote: TritonRunner | None = None
        self.local: Runner | None = None
        self.stats = TritonStats()
        self.last_backend = "triton"
        self.problem = ""                 # why Triton is not used now ("" when it is)
        self.mismatch = False
        self._retry_at = 0.0
        self._lock = threading.Lock()
        self._connect()
        if self.remote is None and not settings.fallback:
            error = TritonModelMismatch if self.mismatch else TritonUnavailable
            raise error(self.problem + "; [models] triton_fallback is off")
        if settings.fallback:   # warm, so that the first fallback costs no session start
            self._local_runner()

    @property
    def name(self) -> str:   # type: ignore[override] - what runs now
        return "triton" if self.remote is not None else "onnxruntime"

    def _connect(self) -> None:
        try:
            runner = TritonRunner(self.manifest, self.settings, client=self._client)
        except TritonModelMismatch as exc:
            if not self.mismatch:
                logger.error("%s", exc)
            self._down(str(exc), "mismatch", mismatch=True)
            return
        except RunnerError as exc:
            self._down(str(exc), "unreachable")
            return
        if self.remote is None:
            logger.info("model %s %s: Triton at %s (%s)", self.manifest.name, self.manifest.version,
                        self.settings.url, self.settings.protocol)
        self.remote, self.problem, self.mismatch = runner, "", False

    def _down(self, problem: str, reason: str, *, mismatch: bool = False) -> None:
        was_up = self.remote is not None or not self.problem
        if self.remote is not None:
            self.remote.close()
        self.remote = None
        self.problem, self.mismatch = problem, mismatch
        self.stats.last_error = reason
        self._retry_at = time.monotonic() + self.settings.retry_s
        if was_up:
            logger.warning("model %s: Triton not used (%s); %s, trying Triton again in %.0f s",
                           self.manifest.name, problem,
                           "analysing locally on onnxruntime" if self.settings.fallback
                           else "images wait", self.settings.retry_s)

    def _local_runner(self) -> Runner:
        if self.local is None:
            self.local = self._make_local()
        return self.local

    @property
    def input_names(self) -> list[str]:
        if self.remote is not None:
            return self.remote.input_names
        return self._local_runner().input_names

    @property
    def output_names(self) -> list[str]:
        if self.remote is not None:
            return self.remote.output_names
        return self._local_runner().output_names

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._lock:
            if self.remote is None and time.monotonic() >= self._retry_at:
                self._connect()
                if self.remote is not None:
                    logger.info("model %s: Triton at %s is back; analysing on Triton again",
                                self.manifest.name, self.settings.url)
            remote = self.remote
        if remote is not None:
            started = time.perf_counter()
            try:
                out = remote.run(inputs)
            except TritonUnavailable as exc:
                elapsed = time.perf_counter() - started
                reason = "timeout" if elapsed >= self.settings.timeout_s * 0.95 else (
                    "unreachable" if "unavailable" in str(exc).lower() or "connect" in str(exc).lower()
                    else "error")
                with self._lock:
                    if self.remote is remote:
                        self._down(str(exc), reason)
                    self.stats.fallbacks[reason] = self.stats.fallbacks.get(reason, 0) + 1
            else:
                elapsed = time.perf_counter() - started
                with self._lock:
                    self.stats.runs["triton"] += 1
                    self.stats.round_trip_sum_s += elapsed
                    self.stats.round_trip_count += 1
                    self.stats.last_round_trip_s = elapsed
                self.last_backend = "triton"
                return out
        else:   # Triton not used until retry_s has passed: counted under the last reason
            with self._lock:
                reason = self.stats.last_error or "unreachable"
                self.stats.fallbacks[reason] = self.stats.fallbacks.get(reason, 0) + 1
        if not self.settings.fallback:
            raise TritonUnavailable(f"{self.problem}; [models] triton_fallback is off, the image "
                                    "waits for Triton")
        out = self._local_runner().run(inputs)
        with self._lock:
            self.stats.runs["onnxruntime"] += 1
        self.last_backend = "onnxruntime"
        return out

    def close(self) -> None:
        if self.remote is not None:
            self.remote.close()
            self.remote = None
        if self.local is not None:
            self.local.close()
            self.local = None


def check_server(settings: TritonSettings, manifests: list[Any]) -> dict[str, Any]:
    """Reachability, per-model readiness and manifest match, and the round-trip time of a
    live check: for ``edge echo triton``, the health monitor and the status page."""
    out: dict[str, Any] = {"url": settings.url, "protocol": settings.protocol, "reachable": False,
                           "round_trip_ms": None, "models": [], "error": ""}
    try:
        client = TritonClient(settings)
    except RunnerError as exc:
        out["error"] = str(exc)
        return out
    try:
        started = time.perf_counter()
        try:
            live = client.server_live()
        except Exception as exc:   # noqa: BLE001 - grpc/http errors of every kind
            out["error"] = f"unreachable: {short_error(exc)}"
            return out
        out["round_trip_ms"] = round((time.perf_counter() - started) * 1000.0, 2)
        out["reachable"] = bool(live)
        for manifest in manifests:
            entry = {"name": manifest.name, "version": manifest.version, "ready": False, "error": ""}
            try:
                TritonRunner(manifest, settings, client=client)
                entry["ready"] = True
            except RunnerError as exc:
                entry["error"] = str(exc)
                entry["mismatch"] = isinstance(exc, TritonModelMismatch)
            out["models"].append(entry)
    finally:
        client.close()
    return out
