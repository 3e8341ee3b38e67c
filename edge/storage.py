"""Durable files: the spool of received instances and the result objects.

A file is durable when it was written under a temporary name, fsynced, atomically renamed
into place and its directory fsynced. Only then may the SCP acknowledge it.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)

MIB = 1024 * 1024


def fsync_dir(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that after return it survives a power cut."""
    write_all_durably({path: data})


def write_all_durably(files: dict[Path, bytes]) -> None:
    """Like ``write_durably`` for several files: each file fsynced and renamed, then each
    distinct directory fsynced once (the result objects of one image share a folder)."""
    dirs: set[Path] = set()
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        dirs.add(path.parent)
    for d in dirs:
        fsync_dir(d)


def free_mb(path: Path) -> float:
    path.mkdir(parents=True, exist_ok=True)
    return shutil.disk_usage(path).free / MIB


class Spool:
    """Received instances under ``<storage>/spool/<StudyInstanceUID>/<SOPInstanceUID>.dcm``."""

    def __init__(self, storage_dir: Path, min_free_mb: int):
        self.root = Path(storage_dir)
        self.spool_dir = self.root / "spool"
        self.min_free_mb = min_free_mb
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        self._clean_temp_files()

    def _clean_temp_files(self) -> None:
        """Temp files left by a crash were never acknowledged: remove them."""
        for tmp in self.spool_dir.glob("*/.*.tmp"):
            logger.info("removing unfinished temporary file from an interrupted transfer")
            tmp.unlink(missing_ok=True)

    def has_room_for(self, n_bytes: int) -> bool:
        return free_mb(self.root) - n_bytes / MIB >= self.min_free_mb

    def relative_path(self, study_uid: str, sop_instance_uid: str) -> str:
        # UIDs are checked by the SCP (digits and dots only), so they are safe path parts.
        return f"spool/{study_uid}/{sop_instance_uid}.dcm"

    def store(self, study_uid: str, sop_instance_uid: str, data: bytes) -> str:
        rel = self.relative_path(study_uid, sop_instance_uid)
        write_durably(self.root / rel, data)
        return rel

    def absolute(self, rel: str) -> Path:
        return self.root / rel

    @staticmethod
    def digest(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()
