"""Find DCMTK's command-line programs (storescu, echoscu, dcmp2pgm, ...) on PATH.

pynetdicom installs Python apps named like DCMTK's (``storescu``, ``echoscu``, ...) into
the virtual environment's bin folder. Once that environment is activated they come first
on PATH, and they take other options, so a bare ``shutil.which("storescu")`` may find the
wrong program. The benchmarks, the test set-up and the health check use this lookup.
"""
from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path


@functools.lru_cache(maxsize=None)
def find(name: str) -> str | None:
    """Path of DCMTK's program ``name`` (the first on PATH whose ``--version`` says DCMTK)."""
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        candidate = Path(folder or ".") / name
        if not (candidate.is_file() and os.access(candidate, os.X_OK)):
            continue
        try:
            version = subprocess.run([str(candidate), "--version"], capture_output=True, text=True,
                                     timeout=10).stdout
        except (OSError, subprocess.TimeoutExpired):
            continue
        if "dcmtk" in version.lower():
            return str(candidate)
    return None


def require(name: str) -> str:
    """Like :func:`find`, but raise when DCMTK's ``name`` is not installed."""
    path = find(name)
    if path is None:
        raise RuntimeError(f"DCMTK's {name} not found on PATH (apt-get install dcmtk)")
    return path


#: the apps pynetdicom installs under the same names as DCMTK's programs
PYNETDICOM_APPS = ("echoscp", "echoscu", "findscu", "getscu", "movescu", "storescp", "storescu")


def link_shadowed(folder: Path) -> list[str]:
    """Link into ``folder`` every DCMTK program that another program of the same name (a
    pynetdicom app) hides on PATH; put ``folder`` first on PATH and DCMTK's programs are
    found by their bare names again. Returns the names linked (none when nothing is hidden)."""
    import shutil

    linked = []
    for name in PYNETDICOM_APPS:
        first, dcmtk = shutil.which(name), find(name)
        if first and dcmtk and Path(first).resolve() != Path(dcmtk).resolve():
            folder.mkdir(parents=True, exist_ok=True)
            staged = folder / f".{name}.{os.getpid()}"
            staged.unlink(missing_ok=True)
            staged.symlink_to(dcmtk)
            os.replace(staged, folder / name)      # atomic: parallel test workers may race
            linked.append(name)
    return linked
