"""Server-side logins for the status page, in a small SQLite file of their own.

The browser's signed cookie carries only a random session id; this store decides whether
that id is still a login. Logout deletes the row, so a copied cookie stops working at once,
and a row older than ``web.session_hours`` is refused and purged. The file lives in the
storage dir so that logins survive a restart (a power cut should not log the technician
out). It holds no patient data: a hash of each id (so the file cannot be replayed as
cookies), the user name and the login time.
"""
from __future__ import annotations

import hashlib
import logging
import os
import secrets
import sqlite3
import threading
import time
from contextlib import closing
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["SESSIONS_FILE", "SessionStore"]

SESSIONS_FILE = "web_sessions.sqlite3"
_CLOCK_SKEW_S = 60.0   # a login "from the future" means the clock went back: its age is unknown

_SCHEMA = """
CREATE TABLE IF NOT EXISTS web_sessions (
    id_sha256  TEXT PRIMARY KEY,
    user       TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS web_sessions_created ON web_sessions (created_at);
"""


def _key(session_id: str) -> str:
    return hashlib.sha256(session_id.encode("utf-8")).hexdigest()


class SessionStore:
    """Logins by session id, each valid for ``lifetime_s`` seconds after it started.

    Opens a short-lived connection per call, so it is safe from any thread. The file is
    created (mode 0600) on first use, not when the store is built.
    """

    def __init__(self, path: Path | str, lifetime_s: float) -> None:
        if not lifetime_s > 0:
            raise ValueError(f"lifetime_s: must be > 0 seconds, got {lifetime_s!r}")
        self.path = Path(path)
        self.lifetime_s = float(lifetime_s)
        self._lock = threading.Lock()
        self._ready = False

    def start(self, user: str, *, now: float | None = None) -> str:
        """Record a new login for ``user``; returns its random session id for the cookie."""
        now = time.time() if now is None else now
        session_id = secrets.token_urlsafe(32)
        with self._connect() as conn:
            self._purge(conn, now)
            conn.execute("INSERT INTO web_sessions (id_sha256, user, created_at) VALUES (?, ?, ?)",
                         (_key(session_id), user, now))
        return session_id

    def user_for(self, session_id: str | None, *, now: float | None = None) -> str | None:
        """The user of a live login, or None if the id is unknown, ended or expired."""
        if not session_id or not isinstance(session_id, str):
            return None
        now = time.time() if now is None else now
        with self._connect() as conn:
            row = conn.execute("SELECT user, created_at FROM web_sessions WHERE id_sha256 = ?",
                               (_key(session_id),)).fetchone()
        if row is None:
            return None
        user, created_at = row
        if not (now - self.lifetime_s < created_at <= now + _CLOCK_SKEW_S):
            return None
        return user

    def end(self, session_id: str | None) -> None:
        """Forget a login (logout); unknown ids are ignored."""
        if not session_id or not isinstance(session_id, str):
            return
        with self._connect() as conn:
            conn.execute("DELETE FROM web_sessions WHERE id_sha256 = ?", (_key(session_id),))

    def purge_expired(self, *, now: float | None = None) -> int:
        """Delete expired logins; returns how many went. ``start`` does this too."""
        with self._connect() as conn:
            return self._purge(conn, time.time() if now is None else now)

    def count(self) -> int:
        """How many logins are stored (expired ones included until purged)."""
        with self._connect() as conn:
            return conn.execute("SELECT COUNT(*) FROM web_sessions").fetchone()[0]

    # ------------------------------------------------------------------ internals

    def _purge(self, conn: sqlite3.Connection, now: float) -> int:
        cur = conn.execute("DELETE FROM web_sessions WHERE created_at <= ? OR created_at > ?",
                           (now - self.lifetime_s, now + _CLOCK_SKEW_S))
        return cur.rowcount

    def _connect(self) -> "_Transaction":
        if not self._ready:
            with self._lock:
                if not self._ready:
                    self._create()
                    self._ready = True
        return _Transaction(self._open())

    def _open(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=5.0, isolation_level=None)

    def _create(self) -> None:
        """Create the file 0600 with its table; a file that is not a database is moved aside.

        Losing the logins only means logging in again, so a damaged file must not lock the
        technicians out.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
        try:
            with closing(self._open()) as conn:
                conn.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            aside = self.path.with_name(f"{self.path.name}.damaged-{int(time.time())}")
            logger.warning("%s is not a usable session store (%s); moved it to %s and started "
                           "an empty one: technicians need to log in again", self.path, exc, aside)
            os.replace(self.path, aside)
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
            with closing(self._open()) as conn:
                conn.executescript(_SCHEMA)


class _Transaction:
    """``with``: one connection, one transaction (committed, or rolled back on error), closed."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self._conn.execute("BEGIN")
        return self._conn

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._conn.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self._conn.close()
