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
    """Like ``write_durably`` for several files, all or nothing.

    Every file is first written and fsynced under a temporary name; only when all of them
    are on disk are they renamed into place, then each distinct directory is fsynced once
    (the result objects of one image share a folder). If anything fails (disk full,
    read-only file system), the temporary files and any file this call already renamed
    into place are removed and the error is raised: no half-written set is left behind.
    """
    staged = StagedFiles()
    try:
        staged.stage(files)
        staged.place()
    except BaseException:
        staged.discard()
        raise


class StagedFiles:
    """``write_all_durably`` in two steps, so that some files can be written (and their
    fsync waited for) while the others are still being made: ``stage`` any number of
    times, then ``place`` once; ``discard`` on any failure removes everything this set
    wrote. Nothing is in place before ``place``."""

    def __init__(self) -> None:
        self._temps: dict[Path, Path] = {}
        self._placed: list[Path] = []

    def __contains__(self, path: Path) -> bool:
        return path in self._temps

    def stage(self, files: dict[Path, bytes]) -> None:
        """Write and fsync ``files`` under temporary names."""
        for path, data in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            self._temps[path] = tmp
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())

    def place(self) -> None:
        """Rename every staged file into place, then fsync each distinct directory."""
        for path, tmp in self._temps.items():
            existed = path.exists()
            os.replace(tmp, path)
            if not existed:
                self._placed.append(path)
        for d in {path.parent for path in self._temps}:
            fsync_dir(d)
        self._temps, self._placed = {}, []

    def discard(self) -> None:
        """Remove the temporary files and whatever ``place`` had already put in place."""
        for tmp in self._temps.values():
            tmp.unlink(missing_ok=True)
        for path in self._placed:
            path.unlink(missing_ok=True)
        self._temps, self._placed = {}, []


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
        """Temp files left by a crash were never acknowledged (spool) or never recorded
        (results): remove them."""
        for folder in (self.spool_dir, self.root / "results"):
            for tmp in folder.glob("*/.*.tmp"):
                logger.info("removing an unfinished temporary file left by an interruption")
                tmp.unlink(missing_ok=True)

    def has_room_for(self, n_bytes: int) -> bool:
        return free_mb(self.root) - n_bytes / MIB >= self.min_free_mb

    def relative_path(self, study_uid: str, sop_instance_uid: str) -> str:
        # UIDs are checked by the SCP (digits and dots only), so they are safe path parts.
        return f"spool/{study_uid}/{sop_instance_uid}.dcm"

    def store(self, study_uid: str, sop_instance_uid: str, data: bytes,
              digest: str | None = None) -> tuple[str, bool]:
        """Write the instance durably; returns its path relative to the storage dir and
        whether this call wrote it (False: the same bytes were already there).

        A file is never overwritten with other bytes: when the usual name holds a different
        version of this instance (same UID, other content), the new one is stored beside it
        under ``<SOPInstanceUID>.<digest>.dcm`` and both are kept.
        """
        digest = digest or self.digest(data)
        rel = self.relative_path(study_uid, sop_instance_uid)
        path = self.root / rel
        if path.exists():
            if path.stat().st_size == len(data) and self.file_digest(path) == digest:
                return rel, False   # already here, durable since it was acknowledged
            rel = f"spool/{study_uid}/{sop_instance_uid}.{digest[:16]}.dcm"
        write_durably(self.root / rel, data)
        return rel, True

    def absolute(self, rel: str) -> Path:
        return self.root / rel

    @staticmethod
    def digest(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    @staticmethod
    def file_digest(path: Path) -> str:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()
