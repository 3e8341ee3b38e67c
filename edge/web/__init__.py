"""The technician's status page, the JSON API, /healthz and /metrics (Flask + waitress).

``create_app`` builds the app from what it is given (config, journal, metrics, health);
nothing lives in module globals. ``serve_web`` runs it with waitress in a thread.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Callable

from flask import Flask, g, request
from prometheus_client import make_wsgi_app
from werkzeug.middleware.dispatcher import DispatcherMiddleware

from . import api, auth, pages
from .i18n import LANGUAGE_NAMES, LANGUAGES, choose_language, translator
from .images import ImageCache

if TYPE_CHECKING:  # pragma: no cover
    from edge.config import Config
    from edge.health import HealthMonitor
    from edge.journal import Journal
    from edge.metrics import Metrics

logger = logging.getLogger(__name__)

__all__ = ["create_app", "serve_web", "WebServer", "ensure_password"]
ensure_password = auth.ensure_password


@dataclass
class WebState:
    """Everything the views need, kept in ``app.extensions["edge"]``."""
    config: "Config"
    journal: "Journal"
    metrics: "Metrics"
    health: "HealthMonitor"
    owns_health: bool
    models: list[dict]
    listener_up: Callable[[], bool]
    wake: Callable[[], None]
    images: ImageCache
    login_limiter: Any = field(default_factory=auth._FailureLimiter)

    def health_snapshot(self) -> dict[str, Any]:
        if self.owns_health:
            self.health.start()   # idempotent; the first page view starts the checks
        return self.health.snapshot()


def create_app(config: "Config", journal: "Journal", metrics: "Metrics", *,
               health: "HealthMonitor | None" = None, models: list[dict] | None = None,
               listener_up: Callable[[], bool] = lambda: True,
               wake: Callable[[], None] = lambda: None) -> Flask:
    """The status page app, with ``/metrics`` mounted (optionally behind a bearer token).

    ``health``: a HealthMonitor the caller starts and stops; when None, one is made here
    and started on the first status request. ``wake`` is called after a technician
    re-queued work (resend, analyze again, retry) so the workers need not wait to poll.
    If no password exists yet, one is generated and printed once (see ``ensure_password``).
    """
    from edge.health import HealthMonitor

    new_password = ensure_password(config)
    if new_password:
        print(f"Status page password (shown only once, keep it): {new_password}", flush=True)
        logger.warning("generated the status page password; it was printed to stdout once")
    models = list(models or [])
    owns_health = health is None
    if health is None:
        health = HealthMonitor(config, journal, models=models, listener_up=listener_up)

    app = Flask(__name__)
    app.config.update(
        SECRET_KEY=auth.session_secret(config),
        SESSION_COOKIE_NAME="edge_session",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        PERMANENT_SESSION_LIFETIME=timedelta(days=30),
        MAX_CONTENT_LENGTH=64 * 1024,
    )
    app.json.ensure_ascii = False   # type: ignore[attr-defined]  # Vietnamese stays readable
    app.json.sort_keys = False      # type: ignore[attr-defined]
    app.extensions["edge"] = WebState(
        config=config, journal=journal, metrics=metrics, health=health, owns_health=owns_health,
        models=models, listener_up=listener_up, wake=wake, images=ImageCache(config.storage_dir))

    metrics.watch_journal(journal, config.storage_dir, destinations=[d.name for d in config.destinations],
                          health=health.snapshot)
    if models:
        metrics.set_model_info(models)

    @app.before_request
    def _language() -> None:
        g.lang = choose_language(config.web.language, request)
        g.t = translator(g.lang)

    @app.context_processor
    def _template_globals() -> dict[str, Any]:
        return {"t": g.t, "lang": g.lang, "languages": LANGUAGE_NAMES,
                "language_forced": config.web.language in LANGUAGES,
                "logged_in": auth.logged_in()}

    @app.after_request
    def _headers(response):
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        response.headers.setdefault(
            "Content-Security-Policy",
            "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self';"
            " frame-ancestors 'none'; form-action 'self'")
        if not request.path.startswith("/static/") and "Cache-Control" not in response.headers:
            response.headers["Cache-Control"] = "no-store"   # patient data: keep out of caches
        return response

    auth.init_app(app)
    app.register_blueprint(pages.bp)
    app.register_blueprint(api.bp)

    metrics_app = auth.bearer_protected(make_wsgi_app(metrics.registry), config.web.metrics_token)
    app.wsgi_app = DispatcherMiddleware(app.wsgi_app, {"/metrics": metrics_app})   # type: ignore[method-assign]
    return app


class WebServer:
    """waitress serving one app in a background thread; ``stop()`` closes it."""

    def __init__(self, app: Any, host: str, port: int, threads: int = 6) -> None:
        from waitress.server import create_server

        self._app = app
        self._server = create_server(app, host=host, port=port, threads=threads, ident="edge",
                                     channel_timeout=30, clear_untrusted_proxy_headers=True)
        self.host = host
        self.port = int(self._server.effective_port)
        self._thread = threading.Thread(target=self._server.run, name="edge-web", daemon=True)

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"

    def start(self) -> "WebServer":
        self._thread.start()
        logger.info("status page on %s", self.url)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, close open connections, and end the worker threads.

        The sockets are closed by the server's own loop thread (through waitress' trigger):
        closing them from this thread while the loop sits in select() on them makes it fail
        with EBADF.
        """
        from waitress import wasyncore

        server = self._server
        if self._thread.is_alive():
            server.trigger.pull_trigger(lambda: wasyncore.close_all(server._map))
        else:
            wasyncore.close_all(server._map)
        server.task_dispatcher.shutdown(timeout=timeout)
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning("web server thread did not stop within %.0f s", timeout)
        state = getattr(self._app, "extensions", {}).get("edge")
        if state is not None and state.owns_health:   # the monitor create_app made for itself
            state.health.stop()


def serve_web(app: Any, host: str, port: int) -> WebServer:
    """Serve ``app`` with waitress on host:port (0: any free port) in a thread."""
    return WebServer(app, host, port).start()
