"""Edit one key of the TOML config file in place, keeping everything else as written.

The standard library reads TOML but does not write it, and a TOML writer would drop the
comments that explain the box's settings. So the change is made on the text: the key's line
in its table is replaced (its comment after the value is replaced too), or added after the
commented example (``# tb_threshold = 0.5`` and its indented comment lines) or the table
header, or the table is appended.
The result must parse to the same document with only that key changed, and must pass the
config validation, before it replaces the file (temp file, fsync, rename: never half-written).
"""
from __future__ import annotations

import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 (JetPack 6)
    import tomli as tomllib

from .config import ConfigError, config_from_dict

__all__ = ["set_table_key", "write_config_text"]

_HEADER = re.compile(r"^\s*\[\s*([A-Za-z0-9_.-]+)\s*\]\s*(#.*)?$")
_ANY_HEADER = re.compile(r"^\s*\[")


def set_table_key(text: str, table: str, key: str, value: float, comment: str = "") -> tuple[str, Any]:
    """``text`` with ``[table] key = value``; returns (new text, the previous value or None).

    Raises ConfigError when the file defines the table in a way this cannot edit safely
    (dotted keys, an inline table) or the result would not be the same config otherwise.
    """
    try:
        before = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML, not changed: {exc}") from None
    section = before.get(table, {})
    if not isinstance(section, dict):
        raise ConfigError(f"[{table}] is not a table; set {table}.{key} by hand")
    previous = section.get(key)
    line_text = f"{key} = {value!r}" + (f"   # {comment}" if comment else "")
    lines = text.splitlines(keepends=True)
    newline = "\r\n" if lines and lines[0].endswith("\r\n") else "\n"
    start = next((i for i, ln in enumerate(lines) if (m := _HEADER.match(ln)) and m.group(1) == table), None)
    if start is None:
        if table in before:
            raise ConfigError(f"[{table}] is written with dotted keys or as an inline table; "
                              f"set {table}.{key} = {value!r} by hand")
        tail = "" if not text or text.endswith(("\n", "\r\n")) else newline
        new_text = f"{text}{tail}{newline}[{table}]{newline}{line_text}{newline}"
    else:
        end = next((i for i in range(start + 1, len(lines)) if _ANY_HEADER.match(lines[i])), len(lines))
        key_re = re.compile(rf"^(\s*){re.escape(key)}\s*=")
        example_re = re.compile(rf"^\s*#\s*{re.escape(key)}\s*=")
        at = next((i for i in range(start + 1, end) if key_re.match(lines[i])), None)
        if at is not None:
            indent = key_re.match(lines[at]).group(1)
            lines[at] = indent + line_text + newline
        else:
            example = next((i for i in range(start + 1, end) if example_re.match(lines[i])), None)
            insert = (example if example is not None else start) + 1
            while example is not None and insert < end and re.match(r"^\s+#", lines[insert]):
                insert += 1   # the example's comment goes on on indented lines: keep them together
            if not lines[insert - 1].endswith(("\n", "\r")):
                lines[insert - 1] += newline
            lines.insert(insert, line_text + newline)
        new_text = "".join(lines)
    try:
        after = tomllib.loads(new_text)
    except tomllib.TOMLDecodeError as exc:   # e.g. a multi-line value this cannot follow
        raise ConfigError(f"the edited file would not be valid TOML ({exc}); set {table}.{key} "
                          f"= {value!r} by hand") from None
    expected = dict(before)
    expected[table] = {**section, key: value}
    if after != expected:
        raise ConfigError(f"editing the file would change more than {table}.{key}; set it by hand")
    config_from_dict(after)   # raises ConfigError naming the key if the value is not allowed
    return new_text, previous


def write_config_text(path: str | Path, text: str) -> None:
    """Replace the file with ``text`` atomically (same folder, fsync, rename), keeping its mode."""
    path = Path(path)
    mode = path.stat().st_mode & 0o7777 if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        if path.exists():
            st = path.stat()
            try:
                os.chown(tmp, st.st_uid, st.st_gid)
            except PermissionError:
                pass
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
