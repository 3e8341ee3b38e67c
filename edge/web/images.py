"""Thumbnails and annotated images for the status page, cached on disk.

Rendered on request from the stored source file (decoded by ``edge.imaging`` at about the
output size, so JPEG 2000 decodes at a reduced level), with the findings drawn by
``edge.reporting.annotate``. A cached file is named by a hash of the source bytes' digest,
the findings and the size, so a re-analysis gives a new file and old ones are never stale.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from edge.findings import Findings
from edge.imaging import ImageForModels, ImagingError, load_for_models
from edge.journal import InstanceRow
from edge.reporting.annotate import annotate_image

logger = logging.getLogger(__name__)

SIZES = {"thumb": 512, "full": 1024}
RENDER_VERSION = "2"   # bump when the drawing changes, so cached files are redrawn
MAX_CACHED_FILES = 4000   # about 0.3 GB; the oldest are removed beyond this (and re-rendered if asked)
_PRUNE_EVERY = 50         # renders between two prunes


class ImageUnavailable(Exception):
    """The source image cannot be shown (missing, unreadable, not grayscale)."""


def image_version(row: InstanceRow) -> str:
    """Short hash of what the picture depends on; used in URLs and cache file names."""
    digest = hashlib.sha256()
    for part in (RENDER_VERSION, row.sha256, row.state if row.state == "analyzed" else "",
                 row.findings_json if row.state == "analyzed" else ""):
        digest.update((part or "").encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


class ImageCache:
    """Renders JPEGs of instances into ``<storage>/thumbs/`` and reuses them."""

    def __init__(self, storage_dir: Path, max_files: int = MAX_CACHED_FILES, *,
                 decoder: Callable[..., ImageForModels] | None = None) -> None:
        if max_files < 1:
            raise ValueError(f"max_files: must be >= 1, got {max_files}")
        self.storage_dir = Path(storage_dir)
        self._load = decoder or load_for_models   # untrusted pixels: see edge.decoder
        self.dir = self.storage_dir / "thumbs"
        self.max_files = max_files
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._renders = 0

    def _lock_for(self, key: str) -> threading.Lock:
        with self._locks_guard:
            if len(self._locks) > 256:
                self._locks = {k: v for k, v in self._locks.items() if v.locked()}
            return self._locks.setdefault(key, threading.Lock())

    def path_for(self, row: InstanceRow, kind: str) -> Path:
        """The cached JPEG of ``row`` at size ``kind`` ("thumb" or "full"), rendered if needed."""
        if kind not in SIZES:
            raise ValueError(f"kind: {kind!r} is not one of {', '.join(SIZES)}")
        name = hashlib.sha256(f"{image_version(row)}|{row.sop_instance_uid}|{kind}".encode()).hexdigest()[:32]
        target = self.dir / f"{name}.jpg"
        if _touch(target):   # a hit counts as recent use, so pruning removes unused files first
            return target
        with self._lock_for(name):   # two browsers asking at once render it once
            if target.exists():
                return target
            picture = self.render(row, SIZES[kind])
            self.dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.dir, suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as fh:
                    picture.save(fh, format="JPEG", quality=88)
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        with self._locks_guard:
            self._renders += 1
            due = self._renders % _PRUNE_EVERY == 1
        if due:
            self.prune()
        return target

    def prune(self) -> int:
        """Remove the least recently written files beyond ``max_files``; returns how many."""
        try:
            files = sorted(self.dir.glob("*.jpg"), key=lambda p: p.stat().st_mtime)
        except FileNotFoundError:   # a file vanished while sorting: try again next time
            return 0
        excess = files[:max(0, len(files) - self.max_files)]
        for path in excess:
            path.unlink(missing_ok=True)
        if excess:
            logger.info("image cache: removed %d old file(s) from %s", len(excess), self.dir)
        return len(excess)

    def render(self, row: InstanceRow, max_side: int) -> Image.Image:
        """Decode the stored source image and draw the findings (analyzed instances only)."""
        source = self.storage_dir / row.path
        if not source.is_file():
            raise ImageUnavailable(f"stored image file is missing ({row.path})")
        try:
            image = self._load(source, min_side=max_side)
        except ImagingError as exc:
            raise ImageUnavailable(str(exc)) from None
        unit = image.unit_image
        if row.state == "analyzed" and row.findings:
            findings = Findings.from_dict(row.findings)
            return annotate_image(unit, findings, max_side=max_side, color=True,
                                  full_size=(image.full_rows, image.full_cols))
        return _plain(unit, max_side)


def _touch(path: Path) -> bool:
    try:
        os.utime(path)
        return True
    except FileNotFoundError:
        return False


def _plain(unit_image: np.ndarray, max_side: int) -> Image.Image:
    """The image alone, scaled to fit ``max_side`` (no findings yet, or none to draw)."""
    pixels = np.round(np.clip(np.nan_to_num(unit_image), 0.0, 1.0) * 255.0).astype(np.uint8)
    picture = Image.fromarray(pixels)   # uint8 2-D: mode "L"
    height, width = pixels.shape
    scale = min(max_side / max(height, width), 1.0)
    if scale < 1.0:
        picture = picture.resize((max(1, round(width * scale)), max(1, round(height * scale))),
                                 Image.Resampling.BOX)
    return picture.convert("RGB")
