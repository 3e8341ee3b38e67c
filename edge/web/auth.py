"""Login for the status page, CSRF protection, and the bearer token of /metrics.

The password hash comes from ``web.password_hash`` in the config or, when that is unset,
from ``<storage.dir>/web_password.hash``, which ``ensure_password`` creates (mode 0600)
with a random password at the first start.

A login is a row in the server-side ``SessionStore`` (see ``sessions.py``); the signed
cookie carries only its random id (and the CSRF token), so logout and expiry take effect
on the server, whatever copies of the cookie exist.
"""
from __future__ import annotations

import functools
import hmac
import logging
import os
import secrets
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable
from urllib.parse import urlsplit

from flask import (Blueprint, Flask, abort, current_app, flash, g, jsonify, redirect,
                   render_template, request, session, url_for)
from flask.sessions import SecureCookieSessionInterface
from werkzeug.security import check_password_hash, generate_password_hash

if TYPE_CHECKING:  # pragma: no cover
    from edge.config import Config

logger = logging.getLogger(__name__)

PASSWORD_FILE = "web_password.hash"
SECRET_FILE = "web_secret.key"
_ALPHABET = "abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789"   # no 0/O, 1/l/I
_MAX_FAILURES = 10          # per client address ...
_FAILURE_WINDOW_S = 300.0   # ... within this many seconds, then 429 until the window passes

bp = Blueprint("auth", __name__)


def password_file(config: "Config") -> Path:
    return config.storage_dir / PASSWORD_FILE


def _write_private(path: Path, data: bytes) -> bool:
    """Create ``path`` with mode 0600; False if it already exists (never overwrites)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return True


def ensure_password(config: "Config") -> str | None:
    """Make sure a login password exists; return the plaintext only when just generated.

    With ``web.password_hash`` configured, or a hash file already present, nothing is done.
    Otherwise a random 12-character password is generated, its hash written to
    ``<storage.dir>/web_password.hash`` (0600), and the password returned so that the
    caller prints it once.
    """
    if config.web.password_hash:
        return None
    path = password_file(config)
    if path.exists():
        return None
    password = "".join(secrets.choice(_ALPHABET) for _ in range(12))
    if not _write_private(path, generate_password_hash(password).encode("ascii") + b"\n"):
        return None   # another process won the race; its password stands
    logger.info("generated a web password; its hash is in %s", path)
    return password


def load_password_hash(config: "Config") -> str | None:
    """The configured hash, else the one in the storage dir, else None."""
    if config.web.password_hash:
        return config.web.password_hash
    try:
        return password_file(config).read_text(encoding="ascii").strip() or None
    except FileNotFoundError:
        return None


def session_secret(config: "Config") -> bytes:
    """A persistent secret for session cookies, so a restart does not log everyone out."""
    path = config.storage_dir / SECRET_FILE
    if not path.exists():
        _write_private(path, secrets.token_bytes(32))
    data = path.read_bytes()
    if len(data) < 16:
        raise ValueError(f"{path}: session secret is too short; delete the file to make a new one")
    return data


# ---------------------------------------------------------------------- CSRF

def csrf_token() -> str:
    """The session's CSRF token (created on first use); templates put it in forms."""
    token = session.get("csrf")
    if not token:
        token = secrets.token_urlsafe(32)
        session["csrf"] = token
    return token


def check_csrf() -> None:
    """Abort with 403 unless the POST carries the session's token (form field or header)."""
    expected = session.get("csrf")
    sent = request.form.get("csrf_token") or request.headers.get("X-CSRF-Token") or ""
    if not expected or not hmac.compare_digest(str(expected), str(sent)):
        logger.warning("rejected a %s %s without a valid CSRF token", request.method, request.path)
        if request.path.startswith("/api/"):
            abort(_json_error(403, "missing or invalid CSRF token (X-CSRF-Token header)"))
        abort(403, description="missing or invalid CSRF token; reload the page and try again")


def _json_error(status: int, message: str):
    response = jsonify({"error": message})
    response.status_code = status
    return response


# ---------------------------------------------------------------------- login

def current_user() -> str | None:
    """Who is logged in on this request, checked once against the server-side store.

    A cookie whose login has ended (logout, expiry) loses its session id here, so the
    browser stops sending it; the CSRF token stays.
    """
    if "edge_user" not in g:
        session_id = session.get("sid")
        user = current_app.extensions["edge"].sessions.user_for(session_id)
        if session_id and user is None:
            session.pop("sid", None)
        g.edge_user = user
    return g.edge_user


def logged_in() -> bool:
    return current_user() is not None


def login_required(view: Callable[..., Any]) -> Callable[..., Any]:
    """Pages redirect to the login form; /api/* answers 401 JSON."""
    @functools.wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if not logged_in():
            if request.path.startswith("/api/"):
                return _json_error(401, "login required")
            return redirect(url_for("auth.login", next=request.full_path.rstrip("?")))
        return view(*args, **kwargs)
    return wrapped


class _FailureLimiter:
    """Counts failed logins per client address to slow down password guessing."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._failures: dict[str, list[float]] = {}

    def blocked(self, addr: str) -> bool:
        now = time.monotonic()
        with self._lock:
            recent = [t for t in self._failures.get(addr, []) if now - t < _FAILURE_WINDOW_S]
            self._failures[addr] = recent
            return len(recent) >= _MAX_FAILURES

    def failed(self, addr: str) -> None:
        with self._lock:
            self._failures.setdefault(addr, []).append(time.monotonic())

    def reset(self, addr: str) -> None:
        with self._lock:
            self._failures.pop(addr, None)


def _safe_next(target: str | None) -> str:
    """Only local paths, so the login form cannot be used to redirect elsewhere."""
    if not target:
        return url_for("pages.index")
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//"):
        return url_for("pages.index")
    return target


@bp.route("/login", methods=["GET", "POST"])
def login():
    config = current_app.extensions["edge"].config
    limiter: _FailureLimiter = current_app.extensions["edge"].login_limiter
    addr = request.remote_addr or "?"
    status = 200
    if request.method == "POST":
        check_csrf()
        if limiter.blocked(addr):
            flash(g.t("login_blocked"), "error")
            status = 429
        else:
            stored = load_password_hash(config)
            password = request.form.get("password", "")
            if stored and password and check_password_hash(stored, password):
                limiter.reset(addr)
                session.clear()
                session.permanent = True
                session["sid"] = current_app.extensions["edge"].sessions.start("technician")
                g.pop("edge_user", None)
                logger.info("web login from %s", addr)
                return redirect(_safe_next(request.form.get("next")))
            limiter.failed(addr)
            logger.warning("failed web login from %s", addr)
            flash(g.t("login_failed"), "error")
            status = 401
    return render_template("login.html", next=request.values.get("next", "")), status


@bp.route("/logout", methods=["POST"])
def logout():
    check_csrf()
    current_app.extensions["edge"].sessions.end(session.get("sid"))
    session.clear()
    g.pop("edge_user", None)
    return redirect(url_for("auth.login"))


# ---------------------------------------------------------------------- /metrics token

def bearer_protected(app: Callable, token: str | None) -> Callable:
    """Wrap a WSGI app so it needs ``Authorization: Bearer <token>`` when a token is set."""
    if not token:
        return app
    expected = f"Bearer {token}".encode()

    def wrapped(environ: dict, start_response: Callable) -> Any:
        sent = environ.get("HTTP_AUTHORIZATION", "").encode("latin-1", "replace")
        if not hmac.compare_digest(sent, expected):
            body = b'{"error": "bearer token required (Authorization: Bearer <web.metrics_token>)"}'
            start_response("401 Unauthorized", [("Content-Type", "application/json"),
                                                ("WWW-Authenticate", 'Bearer realm="metrics"'),
                                                ("Content-Length", str(len(body)))])
            return [body]
        return app(environ, start_response)

    return wrapped


class CookieSessionInterface(SecureCookieSessionInterface):
    """Flask's signed cookie, marked ``Secure`` whenever the request came over HTTPS.

    ``WebServer`` sets ``wsgi.url_scheme`` to the scheme it really serves, so a client
    cannot talk it out of the flag; over plain HTTP the cookie must not be Secure, or the
    browser would drop it and the login would never stick.
    """

    def get_cookie_secure(self, app: Flask) -> bool:
        return bool(app.config["SESSION_COOKIE_SECURE"]) or request.is_secure


def init_app(app: Flask) -> None:
    app.session_interface = CookieSessionInterface()
    app.register_blueprint(bp)
    app.jinja_env.globals["csrf_token"] = csrf_token
