"""Telling a poison image from a power cut: re-run an interrupted analysis in a child process.

When the service dies while it analyses an image, the next start cannot tell whether the
image killed it (a crash in native code on this content) or something else did (a power
cut, the OOM killer, a SIGKILL). Counting interruptions fails healthy images whenever
several cuts happen to hit the same image. Instead, an image whose analysis was
interrupted is first analysed once more in a separate process (``python -m
edge.rehearsal``, with the service's config and a memory limit) that does everything the
service would do with it: decode, models, result objects. If that process crashes, hangs
or runs out of memory, the image is failed with the reason; if it completes, the image is
analysed by the service as usual and the interruption is not held against it.

The rehearsal uses ONNX Runtime on the CPU whatever the service's backend: a crash that
depends on the image's content lies in the decoding, pre- and post-processing and
reporting, which are the same for every backend.
"""
from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import time
from pathlib import Path

from .config import Config

logger = logging.getLogger(__name__)


def rehearse(config: Config, path: Path, *, timeout_s: float | None = None,
             command: list[str] | None = None) -> str | None:
    """Analyse ``path`` in a child process; None when it completed, else why it did not.
    ``command`` replaces ``python -m edge.rehearsal`` (tests)."""
    timeout_s = timeout_s or config.analysis.decode_timeout_s + 120.0
    command = [*(command or [sys.executable, "-m", "edge.rehearsal"]), str(path),
               "--memory-mb", str(config.analysis.decode_memory_mb)]
    if config.source:
        command += ["--config", config.source]
    elif config.models.dir:
        command += ["--models-dir", str(config.models_dir)]
    started = time.monotonic()
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return f"the analysis of this image did not finish within {timeout_s:.0f} s"
    took = time.monotonic() - started
    if proc.returncode == 0:
        logger.info("rehearsal of an interrupted analysis completed in %.1f s: not the image's fault", took)
        return None
    if proc.returncode < 0:
        import signal
        try:
            what = signal.Signals(-proc.returncode).name
        except ValueError:
            what = f"signal {-proc.returncode}"
        return f"the analysis of this image crashed ({what})"
    last = (proc.stderr.strip().splitlines() or ["no message"])[-1][:200]
    if proc.returncode == 3:   # MemoryError, reported by main()
        return "the analysis of this image needs more memory than allowed"
    logger.warning("rehearsal of an interrupted analysis failed (exit %d): %s", proc.returncode, last)
    return f"the analysis of this image failed in isolation (exit status {proc.returncode})"


def main(argv: list[str] | None = None) -> int:
    """``python -m edge.rehearsal FILE [--config F] [--models-dir D] [--memory-mb N]``."""
    parser = argparse.ArgumentParser(prog="python -m edge.rehearsal")
    parser.add_argument("file")
    parser.add_argument("--config")
    parser.add_argument("--models-dir")
    parser.add_argument("--memory-mb", type=int, default=4096)
    ns = parser.parse_args(argv)
    try:
        import resource
        limit = ns.memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ImportError, ValueError, OSError):   # pragma: no cover - non-Linux
        pass
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    from .logs import quiet_libraries
    quiet_libraries()
    from dataclasses import replace

    from engines.store import load_models

    from .analysis import Analyzer, model_input_side
    from .config import OUTPUT_TYPES, load_config
    from .pipeline import decode_side, encode_results
    from .reporting import equipment_from_identity
    from .storage import Spool

    config = load_config(ns.config)
    if ns.models_dir:
        config = replace(config, models=replace(config.models, dir=ns.models_dir))
    path = Path(ns.file)
    try:
        models = load_models(config.models_dir, "onnxruntime")
        analyzer = Analyzer(models, tb_threshold=config.models.tb_threshold, triage_rules=config.triage,
                            decode_min_side=decode_side(config, model_input_side(models)))
        prepared = analyzer.prepare(path)
        if prepared.findings_if_skipped is None:
            findings = analyzer.infer(prepared)
            encode_results(prepared.dataset, findings, prepared.image.unit_image, OUTPUT_TYPES,
                           received_at=path.stat().st_mtime, source_digest=Spool.file_digest(path),
                           equipment=equipment_from_identity(config.identity))
    except MemoryError:
        return 3
    except BaseException:   # noqa: BLE001 - the service handles errors with its own reasons;
        logger.debug("rehearsal: the analysis raised", exc_info=True)   # only crashes matter here
    return 0


if __name__ == "__main__":
    sys.exit(main())
