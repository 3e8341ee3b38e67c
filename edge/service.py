"""The running appliance: listener, analysis workers, delivery, web, systemd watchdog.

``Appliance(config).start()`` wires the parts together; ``stop()`` takes them down in
reverse order. Everything durable lives in the journal and the storage dir, so a stop at
any moment (even SIGKILL) resumes cleanly at the next start.
"""
from __future__ import annotations

import logging
import signal
import tempfile
import threading
import time
from pathlib import Path

from dicom_node.scp import SCPSettings, StoreSCP, make_server_ssl_context

from . import systemd
from .commitment import CommitmentService
from .config import Config, ConfigError
from .decoder import IsolatedDecoder
from .journal import Journal
from .metrics import Metrics
from .outbox import Outbox
from .receiver import Receiver
from .recovery import RecoveryReport, open_journal, recover_spool
from .storage import Spool

logger = logging.getLogger(__name__)

#: A part of the shutdown slower than this is named in the log.
SLOW_STOP_S = 3.0


class Appliance:
    """All long-running parts of ``edge serve``."""

    def __init__(self, config: Config):
        self.config = config
        self.journal: Journal | None = None
        self.spool: Spool | None = None
        self.scp: StoreSCP | None = None
        self.metrics = Metrics(known_calling_aes=config.node.allowed_calling_aets)
        self.models: dict = {}
        self.refused_models: list[str] = []   # model folders refused at start (models.skip_broken)
        self.pipeline = None
        self.outbox = None
        self.commitment: CommitmentService | None = None
        self.health = None
        self.web = None
        self.work_available = threading.Event()
        self.recovery = RecoveryReport()
        self.decoders: list[IsolatedDecoder] = []
        self._stopping = threading.Event()
        self._stopped = False
        self._started_at = time.time()
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ life cycle
    def start(self) -> "Appliance":
        """Start every part; a ConfigError names what is wrong (and nothing is left running)."""
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> "Appliance":
        cfg = self.config
        storage = cfg.storage_dir
        _check_storage_dir(storage)
        self.journal = open_journal(cfg.journal_path, self.recovery)
        resumed = self.journal.resume_interrupted()
        if resumed:
            logger.info("resuming %d instance(s) interrupted during analysis", resumed)
        self.spool = Spool(storage, cfg.storage.min_free_mb)
        self._start_analysis()      # models first: a bad model stops the start, loudly
        self.outbox = Outbox(cfg, self.journal, metrics=self.metrics).start()
        self.pipeline.start()
        if cfg.node.commitment != "off":
            self.commitment = CommitmentService(cfg, self.journal, metrics=self.metrics).start()
            self.outbox.on_progress(self.commitment.wake)
        forward_to = tuple(d.name for d in cfg.source_destinations)
        if forward_to:
            logger.info("router mode: every received image is forwarded to %s", ", ".join(forward_to))
        receiver = Receiver(self.journal, self.spool, on_new=self._new_instance,
                            on_received=self.metrics.instance_received,
                            observe_stage=self.metrics.observe_stage, forward_to=forward_to)
        node = cfg.node
        try:
            self.scp = StoreSCP(self._scp_settings(), receiver,
                                on_commitment=self.commitment.on_request if self.commitment else None
                                ).start()
        except OSError as exc:
            raise ConfigError(f"node.port: cannot listen for DICOM on {node.host}:{node.port} "
                              f"({exc.strerror or exc}); is another edge serve or a PACS using "
                              "it? Choose another port or stop the other program") from None
        if self.journal.count_instances_by_state().get("received"):
            self.work_available.set()
        try:
            self._start_web()
        except OSError as exc:
            raise ConfigError(f"web.port: cannot serve the status page on {cfg.web.host}:"
                              f"{cfg.web.port} ({exc.strerror or exc}); choose another port or "
                              "stop the program using it") from None
        # The listener is up: images the journal lost are recovered while the X-ray machine
        # can already send new ones.
        self._start_thread("journal-recovery", self._recover)
        self._start_thread("watchdog", self._watchdog_loop)
        systemd.notify("READY=1\nSTATUS=listening for DICOM on port %d" % self.scp.port)
        return self

    def _new_instance(self, sop_instance_uid: str) -> None:
        """A new image is journaled (and queued for forwarding in router mode)."""
        self.work_available.set()
        if self.outbox is not None:
            self.outbox.wake()
        if self.commitment is not None:
            self.commitment.wake()

    def _recover(self) -> None:
        try:
            recover_spool(self.journal, self.config.storage_dir, self.recovery,
                          older_than=self._started_at,
                          forward_to=tuple(d.name for d in self.config.source_destinations))
        except Exception:   # noqa: BLE001 - the service runs on; the log says why
            logger.exception("journal recovery from the spool failed")
            return
        if self.recovery.recovered:
            self.work_available.set()
            if self.outbox is not None:
                self.outbox.wake()

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._stopping.set()
        self.work_available.set()
        systemd.notify("STOPPING=1")
        started = time.monotonic()
        parts = [(what, getattr(part, method)) for what, part, method in (
            ("DICOM listener", self.scp, "shutdown"), ("status page", self.web, "stop"),
            ("health monitor", self.health, "stop"), ("analysis", self.pipeline, "stop"),
            ("storage commitment", self.commitment, "stop"), ("outbox", self.outbox, "stop"))
            if part is not None]
        parts += [(f"model {name}", model.close) for name, model in self.models.items()]
        parts += [("image decoder", decoder.close) for decoder in self.decoders]
        parts += [(f"thread {t.name}", lambda t=t: t.join(timeout=10)) for t in self._threads]
        for what, step in parts:
            t0 = time.monotonic()
            step()
            took = time.monotonic() - t0
            if took > SLOW_STOP_S:   # systemd kills a stop that hangs: say where
                logger.warning("stopping: the %s took %.1f s", what, took)
        if self.journal is not None:
            self.journal.close()
        logger.info("stopped in %.1f s", time.monotonic() - started)

    def serve_forever(self) -> None:
        """Block until SIGINT/SIGTERM, then stop cleanly."""
        def _signal(signum, frame):
            logger.info("signal %d: stopping", signum)
            self._stopping.set()
        signal.signal(signal.SIGTERM, _signal)
        signal.signal(signal.SIGINT, _signal)
        try:
            while not self._stopping.wait(0.5):
                pass
        finally:
            self.stop()

    # ------------------------------------------------------------------ parts
    def _start_analysis(self) -> None:
        from engines.manifest import ManifestError
        from engines.runners.base import RunnerError
        from engines.runners.triton_runner import TritonSettings
        from engines.store import ModelIntegrityError, load_models

        from .analysis import Analyzer, model_input_side
        from .pipeline import Pipeline, decode_side

        cfg = self.config
        try:
            self.models = load_models(cfg.models_dir, cfg.models.backend, cache_dir=cfg.engine_cache_dir,
                                      precision=cfg.models.precision,
                                      calibration_dir=cfg.models.calibration_dir,
                                      build_in_background=True, on_switch=self._model_switched,
                                      refused=self.refused_models if cfg.models.skip_broken else None,
                                      triton=TritonSettings.from_config(cfg.models))
        except (ManifestError, ModelIntegrityError, RunnerError, OSError) as exc:
            hint = "" if cfg.models.skip_broken else (
                " (check it with `edge models check DIR`; [models] skip_broken = true runs on "
                "the models that load)")
            raise ConfigError(f"models could not be loaded from {cfg.models_dir}: "
                              + " ".join(str(exc).split()) + hint) from exc
        decoder = self._decoder("analysis").start()
        analyzer = Analyzer(self.models, tb_threshold=cfg.models.tb_threshold, triage_rules=cfg.triage,
                            decoder=decoder, decode_min_side=decode_side(cfg, model_input_side(self.models)))
        self.pipeline = Pipeline(cfg, self.journal, analyzer, work_available=self.work_available,
                                 metrics=self.metrics, on_results=lambda: self.outbox and self.outbox.wake())
        self.metrics.set_model_info(self.model_info())
        self.metrics.declare_findings(declared_findings(self.models))
        if cfg.models.backend == "triton":
            self.metrics.watch_triton(self.triton_stats)

    def _decoder(self, name: str) -> IsolatedDecoder:
        """A pixel decoder process (see edge.decoder) with the configured limits."""
        decoder = IsolatedDecoder(timeout_s=self.config.analysis.decode_timeout_s,
                                  memory_mb=self.config.analysis.decode_memory_mb, name=name)
        self.decoders.append(decoder)
        return decoder

    def model_info(self) -> list[dict]:
        return [{"name": m.manifest.name, "version": m.manifest.version, "backend": m.backend}
                for m in self.models.values()]

    def triton_check(self) -> dict | None:
        """Triton reachability, model readiness and round-trip time (backend "triton"), for
        the health monitor's slow checks; with the runs and fallbacks of each model."""
        from engines.runners.triton_runner import TritonSettings, check_server

        settings = TritonSettings.from_config(self.config.models)
        if settings is None or self.config.models.backend != "triton":
            return None
        out = check_server(settings, [m.manifest for m in self.models.values()])
        for entry in out["models"]:
            model = self.models.get(entry["name"])
            runner = getattr(model, "runner", None)
            if runner is not None and hasattr(runner, "stats"):
                entry["backend"] = runner.name
                entry["problem"] = runner.problem
        return out

    def _triton_health(self) -> dict | None:
        """The health monitor's Triton check; the model info series follow the backend in
        use (Triton, or the local fallback)."""
        if self.config.models.backend != "triton":
            return None
        out = self.triton_check()
        self.metrics.set_model_info(self.model_info())
        return out

    def triton_stats(self) -> dict:
        """Per model: runs by backend, fallbacks by reason, round trips (for /metrics)."""
        return {name: m.runner.stats for name, m in self.models.items()
                if hasattr(m.runner, "stats")}

    def _model_switched(self, model) -> None:
        """A background engine build finished: the model now runs on TensorRT."""
        self.metrics.set_model_info(self.model_info())

    def _start_web(self) -> None:
        from .health import HealthMonitor
        from .web import create_app, serve_web

        listener_up = lambda: bool(self.scp and self.scp.accepting)   # noqa: E731
        self.health = HealthMonitor(self.config, self.journal, models=self.model_info,
                                    listener_up=listener_up, service_problems=self.service_problems,
                                    notices=self.notices, triton=self._triton_health,
                                    last_progress=lambda: self.pipeline and self.pipeline.last_progress
                                    ).start()
        app = create_app(self.config, self.journal, self.metrics, health=self.health,
                         models=self.model_info(), listener_up=listener_up,
                         wake=self._wake_workers, image_decoder=self._decoder("thumbnails"))
        self.web = serve_web(app, self.config.web.host, self.config.web.port, tls_cert=self.config.web.tls_cert, tls_key=self.config.web.tls_key)

    def _wake_workers(self) -> None:
        self.work_available.set()
        if self.outbox is not None:
            self.outbox.wake()

    def _scp_settings(self) -> SCPSettings:
        node = self.config.node
        ssl_context = None
        if node.tls_cert and node.tls_key:
            ssl_context = make_server_ssl_context(node.tls_cert, node.tls_key, node.tls_ca)
        return SCPSettings(
            ae_title=node.ae_title, host=node.host, port=node.port,
            allowed_calling_aets=node.allowed_calling_aets,
            require_called_aet=node.require_called_aet,
            max_associations=node.max_associations,
            max_associations_per_peer=node.max_associations_per_peer,
            association_request_timeout_s=node.association_request_timeout_s,
            pdu_timeout_s=node.pdu_timeout_s,
            max_instance_bytes=node.max_instance_mb * 1024 * 1024,
            ssl_context=ssl_context)

    def _start_thread(self, name: str, target) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def service_problems(self) -> list[str]:
        """Problems of the running parts: dead worker threads, results that cannot be written."""
        problems = []
        for part in (self.pipeline, self.outbox, self.commitment):
            dead = getattr(part, "dead_workers", None)
            if dead is not None:
                problems += [f"worker_dead:{name}" for name in dead()]
        if self.pipeline is not None and self.pipeline.results_write_error is not None:
            problems.append("results_write_error")
        if any(m.tensorrt_missing and not m.building for m in self.models.values()):
            problems.append("tensorrt_not_used")
        return problems

    def notices(self) -> list[str]:
        """Things the technician and the engineer should know (shown on the status page)."""
        out = []
        if self.pipeline is not None and self.pipeline.results_write_error is not None:
            out.append(self.pipeline.results_write_error[1])
        recovered = self.recovery.summary()
        if recovered:
            out.append(f"Journal recovery: {recovered}")
        out += self.refused_models
        for m in self.models.values():
            if m.building:
                out.append(f"{m.name}: the TensorRT {m.precision} engine is being built; "
                           f"analysing with {m.backend} until it is ready")
            elif getattr(m.runner, "problem", ""):
                out.append(f"{m.name}: Triton not used ({m.runner.problem}); "
                           + ("analysing locally on onnxruntime" if self.config.models.triton_fallback
                              else "images wait for Triton"))
            elif m.tensorrt_missing:
                out.append(f"{m.name} runs on {m.backend}, not TensorRT, on this Jetson: analysis is "
                           f"10-50x slower ({m.backend_reason})")
        return out

    def healthy(self) -> bool:
        """What the systemd watchdog vouches for: no critical problem in the health snapshot
        (listener accepting, workers alive, analysis not stalled) and a sound journal."""
        try:
            if self.health is None or self.journal is None:
                return False
            return not self.health.snapshot()["critical"] and self.journal.check_integrity()
        except Exception:  # noqa: BLE001
            logger.exception("health check raised")
            return False

    def _watchdog_loop(self) -> None:
        interval = systemd.watchdog_interval_s()
        if interval is None:
            return
        while not self._stopping.wait(interval):
            if self.healthy():
                systemd.notify("WATCHDOG=1")
            else:
                logger.error("health check failed: not petting the systemd watchdog")


def storage_path(config: Config, rel: str) -> Path:
    return config.storage_dir / rel


def _check_storage_dir(storage: Path) -> None:
    """The storage dir exists (or can be made) and is writable, else a ConfigError."""
    try:
        storage.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=storage, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise ConfigError(f"storage.dir: cannot use {str(storage)!r} for images and the journal "
                          f"({exc.strerror or exc}); create it, make it writable for this user, "
                          "or choose another directory") from None


def declared_findings(models: dict) -> list[tuple[str, str]]:
    """(metric label, kind) of every reported finding the loaded models declare, named as
    ``Metrics.findings_observed`` names them (the TB screen "tuberculosis", nodules "nodule")."""
    from .findings import NODULE_CODES, TB_CODES
    from .metrics import NODULE_LABEL, TB_LABEL

    out = []
    for model in models.values():
        kind = model.manifest.task
        for spec in model.manifest.findings:
            if not spec.report:
                continue
            code = (spec.code.scheme, spec.code.value) if spec.code is not None else None
            if kind == "classification" and code in TB_CODES:
                out.append((TB_LABEL, kind))
            elif kind == "detection" and code in NODULE_CODES:
                out.append((NODULE_LABEL, kind))
            else:
                out.append((spec.label, kind))
    return out
