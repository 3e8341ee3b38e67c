"""The technician's status page, the JSON API, /healthz and /metrics (Flask).

``create_app`` builds the app from what it is given (config, journal, metrics, health);
nothing lives in module globals. ``serve_web`` runs it in a thread: waitress over plain
HTTP, cheroot over HTTPS (see ``WebServer``).
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

from . import api, auth, pages, screening
from .i18n import LANGUAGE_NAMES, LANGUAGES, choose_language, translator
from .images import ImageCache
from .sessions import SESSIONS_FILE, SessionStore

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
    sessions: SessionStore
    login_limiter: Any = field(default_factory=auth._FailureLimiter)

    def health_snapshot(self) -> dict[str, Any]:
        if self.owns_health:
            self.health.start()   # idempotent; the first page view starts the checks
        return self.health.snapshot()


def create_app(config: "Config", journal: "Journal", metrics: "Metrics", *,
               health: "HealthMonitor | None" = None, models: list[dict] | None = None,
               listener_up: Callable[[], bool] = lambda: True,
               wake: Callable[[], None] = lambda: None,
               image_decoder: Callable[..., Any] | None = None) -> Flask:
    """The status page app, with ``/metrics`` mounted (optionally behind a bearer token).

    ``health``: a HealthMonitor the caller starts and stops; when None, one is made here
    and started on the first status request. ``wake`` is called after a technician
    re-queued work (resend, analyze again, retry) so the workers need not wait to poll.
    ``image_decoder`` decodes stored images for the thumbnails (the service passes an
    ``edge.decoder.IsolatedDecoder``; by default they are decoded in this process).
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
        # The login itself ends on the server (SessionStore, web.session_hours after login);
        # the cookie lives as long, but at least an hour: before login it carries the login
        # form's CSRF token, which must outlast typing the password.
        PERMANENT_SESSION_LIFETIME=timedelta(hours=max(config.web.session_hours, 1.0)),
        MAX_CONTENT_LENGTH=64 * 1024,
    )
    app.json.ensure_ascii = False   # type: ignore[attr-defined]  # Vietnamese stays readable
    app.json.sort_keys = False      # type: ignore[attr-defined]
    app.extensions["edge"] = WebState(
        config=config, journal=journal, metrics=metrics, health=health, owns_health=owns_health,
        models=models, listener_up=listener_up, wake=wake, images=ImageCache(config.storage_dir, decoder=image_decoder),
        sessions=SessionStore(config.storage_dir / SESSIONS_FILE, config.web.session_hours * 3600.0))

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
    app.register_blueprint(screening.bp)   # referrals, slips, figures, TB threshold

    metrics_app = auth.bearer_protected(make_wsgi_app(metrics.registry), config.web.metrics_token)
    app.wsgi_app = DispatcherMiddleware(app.wsgi_app, {"/metrics": metrics_app})   # type: ignore[method-assign]
    return app


def _with_scheme(app: Any, scheme: str) -> Callable:
    """Set ``wsgi.url_scheme`` to what the server really speaks, whatever the client sent.

    ``request.is_secure``, and so the cookie's Secure flag, then follows the listening
    socket. Both servers already do so today (waitress from its settings; cheroot refuses
    absolute URIs such as ``GET http://...``); this keeps it true whatever they change.
    """
    def wsgi(environ: dict, start_response: Callable) -> Any:
        environ["wsgi.url_scheme"] = scheme
        return app(environ, start_response)
    return wsgi


class WebServer:
    """The app served in a background thread on host:port; ``stop()`` closes it.

    Plain HTTP is served by waitress, as before: it reads requests asynchronously, so an
    idle or slow client costs a buffer, not a worker thread. Waitress has no TLS, so with
    ``tls_cert``/``tls_key`` the same app is served by cheroot (CherryPy's WSGI server:
    maintained, pure Python, TLS through the standard ``ssl`` module) instead. Cheroot does
    the TLS handshake in its accept loop, where one client that connects and says nothing
    would stall every other connection for the socket timeout; our ``TLSConnection`` moves the
    handshake into a worker thread with its own deadline. Cheroot gives each connection
    being read a worker thread, hence twice the threads.
    """

    def __init__(self, app: Any, host: str, port: int, threads: int = 6, *,
                 tls_cert: str | None = None, tls_key: str | None = None) -> None:
        if bool(tls_cert) != bool(tls_key):
            raise ValueError("tls_cert and tls_key: set both to serve HTTPS, or neither")
        self._app = app
        self.host = host
        self.scheme = "https" if tls_cert else "http"
        wsgi = _with_scheme(app, self.scheme)
        if tls_cert and tls_key:
            self._backend: _Waitress | _Cheroot = _Cheroot(wsgi, host, port, threads * 2, tls_cert, tls_key)
        else:
            self._backend = _Waitress(wsgi, host, port, threads)
        self.port = self._backend.port
        self._thread = threading.Thread(target=self._backend.serve, name="edge-web", daemon=True)

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        host = f"[{host}]" if ":" in host else host
        return f"{self.scheme}://{host}:{self.port}"

    def start(self) -> "WebServer":
        self._thread.start()
        logger.info("status page on %s", self.url)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, close open connections, and end the worker threads."""
        self._backend.stop(self._thread, timeout)
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning("web server thread did not stop within %.0f s", timeout)
        state = getattr(self._app, "extensions", {}).get("edge")
        if state is not None and state.owns_health:   # the monitor create_app made for itself
            state.health.stop()


class _Waitress:
    """Plain HTTP; idle connections are closed after 30 s."""

    def __init__(self, app: Callable, host: str, port: int, threads: int) -> None:
        from waitress.server import create_server

        self._server = create_server(app, host=host, port=port, threads=threads, ident="edge",
                                     channel_timeout=30, clear_untrusted_proxy_headers=True)
        self.port = int(self._server.effective_port)

    def serve(self) -> None:
        self._server.run()

    def stop(self, thread: threading.Thread, timeout: float) -> None:
        """The sockets are closed by the server's own loop thread (through waitress' trigger):
        closing them from this thread while the loop sits in select() on them makes it fail
        with EBADF."""
        from waitress import wasyncore

        server = self._server
        if thread.is_alive():
            server.trigger.pull_trigger(lambda: wasyncore.close_all(server._map))
        else:
            wasyncore.close_all(server._map)
        server.task_dispatcher.shutdown(timeout=timeout)


_TLS_SOCKET_TIMEOUT_S = 10     # one read or write; also how long an idle keep-alive connection stays
_TLS_HANDSHAKE_TIMEOUT_S = 5   # the whole handshake (a LAN browser needs milliseconds)
_PLAIN_HTTP_BODY = b"This status page is served over HTTPS only: use https:// in the address.\n"
_PLAIN_HTTP_ANSWER = (b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
                      b"Connection: close\r\nContent-Length: %d\r\n\r\n%s"
                      % (len(_PLAIN_HTTP_BODY), _PLAIN_HTTP_BODY))


def _cheroot_classes() -> tuple[type, type]:
    """The cheroot server and TLS adapter, built on first use (cheroot is imported lazily)."""
    import socket
    import ssl

    from cheroot import errors
    from cheroot.server import HTTPConnection
    from cheroot.ssl.builtin import BuiltinSSLAdapter
    from cheroot.wsgi import Server

    class TLSAdapter(BuiltinSSLAdapter):
        """Wraps accepted sockets without the handshake; ``TLSConnection`` does it."""

        def wrap(self, sock):
            try:
                tls = self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            except OSError as exc:   # the peer is already gone
                raise errors.FatalSSLAlert(*exc.args) from exc
            return tls, {"HTTPS": "on"}

    class TLSConnection(HTTPConnection):
        """Does the TLS handshake in the worker thread, before the first request."""

        handshake_done = False

        def communicate(self):
            if not self.handshake_done:
                if not self._handshake():
                    return False
                self.handshake_done = True
            return super().communicate()

        def _handshake(self) -> bool:
            sock = self.socket
            try:
                sock.settimeout(_TLS_HANDSHAKE_TIMEOUT_S)   # a deadline for the whole handshake
                sock.do_handshake()
                sock.settimeout(self.server.timeout)
                return True
            except ssl.SSLError as exc:
                if getattr(exc, "reason", None) == "HTTP_REQUEST":
                    self._answer_plain_http()
                logger.debug("TLS handshake with %s failed: %s", self.remote_addr, exc)
            except OSError as exc:   # timed out, reset
                logger.debug("TLS handshake with %s failed: %s", self.remote_addr, exc)
            return False

        def _answer_plain_http(self) -> None:
            """Tell a browser pointed at http:// what to do, in plain text on the raw socket."""
            sock = self.socket
            try:
                socket.socket.sendall(sock, _PLAIN_HTTP_ANSWER)
                socket.socket.shutdown(sock, socket.SHUT_WR)
                sock.settimeout(1.0)   # read what the client still sends, so closing does not reset
                while socket.socket.recv(sock, 4096):
                    pass
            except OSError:
                pass

    class TLSServer(Server):
        ConnectionClass = TLSConnection

        def error_log(self, msg: str = "", level: int = logging.INFO, traceback: bool = False) -> None:
            """Into our log; cheroot's notes about single clients go to DEBUG."""
            logger.log(level if level >= logging.WARNING else logging.DEBUG, "cheroot: %s", msg,
                       exc_info=traceback)

    return TLSServer, TLSAdapter


class _Cheroot:
    """HTTPS with cheroot; binds at construction so that ``port`` is known (0: any free port)."""

    def __init__(self, app: Callable, host: str, port: int, threads: int,
                 tls_cert: str, tls_key: str) -> None:
        server_class, adapter_class = _cheroot_classes()
        try:
            adapter = adapter_class(tls_cert, tls_key)
        except (OSError, ValueError) as exc:
            raise ValueError(f"web.tls_cert ({tls_cert}) and web.tls_key ({tls_key}): cannot load "
                             f"them as a PEM certificate and its private key ({exc}); the status "
                             f"page was not started. Fix or replace the files, or unset both to "
                             f"serve plain HTTP") from exc
        self._server = server_class((host, port), app, numthreads=threads, server_name="edge",
                                    timeout=_TLS_SOCKET_TIMEOUT_S, shutdown_timeout=5)
        self._server.ssl_adapter = adapter
        self._server.prepare()
        self.port = int(self._server.bind_addr[1])

    def serve(self) -> None:
        self._server.serve()

    def stop(self, thread: threading.Thread, timeout: float) -> None:
        self._server.shutdown_timeout = timeout
        self._server.stop()


def serve_web(app: Any, host: str, port: int, *, tls_cert: str | None = None,
              tls_key: str | None = None) -> WebServer:
    """Serve ``app`` on host:port (0: any free port) in a thread; HTTPS when cert and key are given."""
    return WebServer(app, host, port, tls_cert=tls_cert, tls_key=tls_key).start()
