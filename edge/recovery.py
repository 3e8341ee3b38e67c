"""The journal is the box's memory: open it whatever state it is in, and rebuild what it lost.

Every acknowledged image is a file in the spool before the modality hears "success"; the
journal only indexes them. So a journal that was deleted, emptied, or damaged is not the
end of the images: ``open_journal`` moves a damaged journal file aside (kept for analysis)
and starts a new one, and ``recover_spool`` puts every spool file the journal does not know
back into it as a received image, to be analysed again. Re-analysis gives the same result
objects (deterministic UIDs), so a PACS that already holds them keeps one copy.

Recovery reads only file metadata (no pixels) and runs after the DICOM listener is up, so
the X-ray machine can keep sending while it works.
"""
from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from .journal import Journal, NewInstance, check_integrity

logger = logging.getLogger(__name__)


@dataclass
class RecoveryReport:
    """What ``open_journal`` and ``recover_spool`` found and did."""
    journal_moved_to: str | None = None     # a damaged journal, kept under this name
    journal_problem: str | None = None
    recovered: int = 0                      # spool files put back into the journal
    conflicts: int = 0                      # of those, other versions of a known UID
    unreadable: list[str] = field(default_factory=list)   # spool files that are not DICOM
    finished_at: float | None = None

    def summary(self) -> str | None:
        """One line for the log and the status page, None when there was nothing to do."""
        parts = []
        if self.journal_moved_to:
            parts.append(f"the journal was damaged ({self.journal_problem}) and was replaced; "
                         f"the damaged file is kept as {Path(self.journal_moved_to).name}")
        if self.recovered:
            parts.append(f"{self.recovered} stored image(s) missing from the journal were "
                         "recovered from the spool and are analysed again")
        if self.unreadable:
            parts.append(f"{len(self.unreadable)} spool file(s) could not be read and were left "
                         "in place")
        return "; ".join(parts) or None


def open_journal(path: Path, report: RecoveryReport | None = None) -> Journal:
    """Open the journal at ``path``; a damaged one is moved aside and a new one started."""
    problem = None
    if path.exists():
        if path.stat().st_size and not check_integrity(path):
            problem = "it failed SQLite's integrity check"
        else:
            try:
                return Journal(path)
            except sqlite3.DatabaseError as exc:
                problem = f"it cannot be opened: {exc}"
    else:
        return Journal(path)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    moved = path.with_name(f"{path.name}.damaged-{stamp}")
    for suffix in ("", "-wal", "-shm"):
        src = Path(f"{path}{suffix}")
        if src.exists():
            shutil.move(str(src), f"{moved}{suffix}")
    logger.error("the journal %s is damaged (%s): moved to %s, starting a new one and recovering "
                 "the stored images from the spool", path, problem, moved.name)
    if report is not None:
        report.journal_moved_to = str(moved)
        report.journal_problem = problem
    return Journal(path)


def recover_spool(journal: Journal, storage_dir: Path, report: RecoveryReport | None = None, *,
                  older_than: float | None = None, forward_to: tuple[str, ...] = ()) -> RecoveryReport:
    """Put every spool file the journal does not know back into it as ``received``.

    ``forward_to`` (router mode): the recovered images are queued for forwarding again,
    marked as possibly delivered already, so the outbox asks the PACS before sending.

    Files are taken oldest first, so when several versions of one SOP Instance UID are
    found, the newest becomes the current one and the others its earlier versions. Files
    modified after ``older_than`` (epoch seconds; default: now) are left alone: they may
    belong to a C-STORE still being written and journaled.
    """
    from pydicom import dcmread

    from .storage import Spool

    report = report if report is not None else RecoveryReport()
    older_than = time.time() if older_than is None else older_than
    spool = Path(storage_dir) / "spool"
    known = journal.known_paths()
    candidates = []
    for path in spool.glob("*/*.dcm"):
        rel = path.relative_to(storage_dir).as_posix()
        if rel in known or path.name.startswith("."):
            continue
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            continue
        if mtime < older_than:
            candidates.append((mtime, rel, path))
    for mtime, rel, path in sorted(candidates):
        try:
            ds = dcmread(path, stop_before_pixels=True)
            meta = getattr(ds, "file_meta", None)
            new = NewInstance(
                sop_instance_uid=str(ds.SOPInstanceUID),
                sop_class_uid=str(ds.SOPClassUID),
                study_instance_uid=str(ds.StudyInstanceUID),
                series_instance_uid=str(ds.SeriesInstanceUID),
                transfer_syntax=str(meta.TransferSyntaxUID) if meta is not None and "TransferSyntaxUID" in meta else "",
                calling_ae="",
                path=rel,
                sha256=Spool.file_digest(path),
                size_bytes=os.path.getsize(path),
                patient_name=str(ds.get("PatientName", "") or ""),
                patient_id=str(ds.get("PatientID", "") or ""),
                modality=str(ds.get("Modality", "") or ""),
            )
        except Exception as exc:   # noqa: BLE001 - a foreign or damaged file: leave it, say so
            logger.warning("spool file %s could not be read (%s); left in place", rel, type(exc).__name__)
            report.unreadable.append(rel)
            continue
        current = journal.find_instance(new.sop_instance_uid)
        if current is not None and current.sha256 != new.sha256 and current.received_at > mtime:
            journal.record_earlier_version(new, mtime)   # the journal holds a newer version
            report.recovered += 1
            report.conflicts += 1
            continue
        outcome = journal.record_received(new, now=mtime, forward_to=forward_to, unconfirmed=True)
        if outcome != "duplicate":
            journal.mark_recovered(new.sop_instance_uid)
            report.recovered += 1
            report.conflicts += outcome == "conflict"
    report.finished_at = time.time()
    text = report.summary()
    if text:
        logger.warning("journal recovery: %s", text)
    return report
