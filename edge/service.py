"""The running appliance: listener, analysis workers, delivery, web, systemd watchdog.

``Appliance(config).start()`` wires the parts together; ``stop()`` takes them down in
reverse order. Everything durable lives in the journal and the storage dir, so a stop at
any moment (even SIGKILL) resumes cleanly at the next start.
"""
from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

from dicom_node.scp import SCPSettings, StoreSCP, make_server_ssl_context

from . import systemd
from .config import Config, ConfigError
from .journal import Journal
from .metrics import Metrics
from .outbox import Outbox
from .receiver import Receiver
from .storage import Spool

logger = logging.getLogger(__name__)


class Appliance:
    """All long-running parts of ``edge serve``."""

    def __init__(self, config: Config):
        self.config = config
        self.journal: Journal | None = None
        self.spool: Spool | None = None
        self.scp: StoreSCP | None = None
        self.metrics = Metrics()
        self.models: dict = {}
        self.pipeline = None
        self.outbox = None
        self.health = None
        self.web = None
        self.work_available = threading.Event()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ life cycle
    def start(self) -> "Appliance":
        cfg = self.config
        storage = cfg.storage_dir
        storage.mkdir(parents=True, exist_ok=True)
        self.journal = Journal(cfg.journal_path)
        resumed = self.journal.resume_interrupted()
        if resumed:
            logger.info("resuming %d instance(s) interrupted during analysis", resumed)
        self.spool = Spool(storage, cfg.storage.min_free_mb)
        self._start_analysis()      # models first: a bad model stops the start, loudly
        self.outbox = Outbox(cfg, self.journal, metrics=self.metrics).start()
        self.pipeline.start()
        receiver = Receiver(self.journal, self.spool, on_new=lambda uid: self.work_available.set(),
                            on_received=self.metrics.instance_received,
                            observe_stage=self.metrics.observe_stage)
        self.scp = StoreSCP(self._scp_settings(), receiver).start()
        if self.journal.count_instances_by_state().get("received"):
            self.work_available.set()
        self._start_web()
        self._start_thread("watchdog", self._watchdog_loop)
        systemd.notify("READY=1\nSTATUS=listening for DICOM on port %d" % self.scp.port)
        return self

    def stop(self) -> None:
        self._stopping.set()
        self.work_available.set()
        systemd.notify("STOPPING=1")
        if self.scp is not None:
            self.scp.shutdown()
        if self.web is not None:
            self.web.stop()
        if self.health is not None:
            self.health.stop()
        if self.pipeline is not None:
            self.pipeline.stop()
        if self.outbox is not None:
            self.outbox.stop()
        for model in self.models.values():
            model.close()
        for t in self._threads:
            t.join(timeout=10)
        if self.journal is not None:
            self.journal.close()

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
        from engines.store import ModelIntegrityError, load_models

        from .analysis import Analyzer
        from .pipeline import Pipeline

        cfg = self.config
        try:
            self.models = load_models(cfg.models_dir, cfg.models.backend, cache_dir=cfg.engine_cache_dir)
        except (ManifestError, ModelIntegrityError, OSError) as exc:
            raise ConfigError(f"models could not be loaded from {cfg.models_dir}: {exc}") from exc
        analyzer = Analyzer(self.models, tb_threshold=cfg.models.tb_threshold, triage_rules=cfg.triage)
        self.pipeline = Pipeline(cfg, self.journal, analyzer, work_available=self.work_available,
                                 metrics=self.metrics, on_results=lambda: self.outbox and self.outbox.wake())
        self.metrics.set_model_info(self.model_info())

    def model_info(self) -> list[dict]:
        return [{"name": m.manifest.name, "version": m.manifest.version, "backend": m.backend}
                for m in self.models.values()]

    def _start_web(self) -> None:
        from .health import HealthMonitor
        from .web import create_app, serve_web

        listener_up = lambda: bool(self.scp and self.scp.running)   # noqa: E731
        self.health = HealthMonitor(self.config, self.journal, models=self.model_info(),
                                    listener_up=listener_up).start()
        app = create_app(self.config, self.journal, self.metrics, health=self.health,
                         models=self.model_info(), listener_up=listener_up,
                         wake=self._wake_workers)
        self.web = serve_web(app, self.config.web.host, self.config.web.port)

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
            max_associations=node.max_associations, ssl_context=ssl_context)

    def _start_thread(self, name: str, target) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def healthy(self) -> bool:
        """Listener running and journal readable: what the systemd watchdog vouches for."""
        try:
            return bool(self.scp and self.scp.running and self.journal and self.journal.check_integrity())
        except Exception:  # noqa: BLE001
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
