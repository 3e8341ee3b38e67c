"""Lossless conversion of a stored object for a peer that does not accept its transfer
syntax: compressed pixel data decompressed by pydicom into Explicit VR Little Endian.

Nothing is ever compressed, and the SOP Instance UID is kept (the pixel values do not
change). Codecs are native code fed by whoever sent the image, so the work runs in a child
process (``python -m dicom_node.transcode SRC DST MEMORY_MB``) with an address-space limit
and a timeout: a codec that panics, crashes, hangs or asks for gigabytes costs that one
conversion, never the caller.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from pydicom.uid import JPEGBaseline8Bit, JPEGExtended12Bit

#: Syntaxes that are always lossy: the decompressed copy keeps saying so.
_LOSSY = (JPEGBaseline8Bit, JPEGExtended12Bit)


class TranscodeError(RuntimeError):
    """The object could not be converted; the message says why."""


def native_copy(src: Path, *, timeout_s: float = 60.0, memory_mb: int = 4096,
                work_dir: Path | None = None) -> Path:
    """Write a decompressed (Explicit VR Little Endian) copy of ``src`` and return its path
    (a temporary file the caller removes); raises ``TranscodeError``."""
    folder = Path(work_dir) if work_dir is not None else Path(src).parent
    folder.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".native-", suffix=".dcm", dir=str(folder))
    os.close(fd)
    dst = Path(name)
    try:
        proc = subprocess.run([sys.executable, "-m", "dicom_node.transcode", str(src), str(dst),
                               str(int(memory_mb))], capture_output=True, text=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        dst.unlink(missing_ok=True)
        raise TranscodeError(f"decompression took longer than {timeout_s:.0f} s") from None
    if proc.returncode != 0:
        dst.unlink(missing_ok=True)
        why = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise TranscodeError(f"decompression failed: {why[:200]}")
    return dst


def decompress_file(src: str | Path, dst: str | Path) -> None:
    """In this process: read ``src``, decompress its pixel data, write ``dst``."""
    from pydicom import dcmread

    ds = dcmread(str(src))
    syntax = ds.file_meta.TransferSyntaxUID
    if syntax.is_encapsulated:
        ds.decompress(generate_instance_uid=False)
        if syntax in _LOSSY and "LossyImageCompression" not in ds:
            ds.LossyImageCompression = "01"
    ds.save_as(str(dst), enforce_file_format=True)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3:
        print("usage: python -m dicom_node.transcode SRC DST MEMORY_MB", file=sys.stderr)
        return 2
    src, dst, memory_mb = args
    try:
        import resource
        limit = int(memory_mb) * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ImportError, ValueError, OSError):   # pragma: no cover - non-Linux
        pass
    try:
        decompress_file(src, dst)
    except BaseException as exc:  # noqa: BLE001 - a codec's panic is a BaseException
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":   # pragma: no cover
    sys.exit(main())
