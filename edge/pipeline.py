"""Analysis workers: claim received instances, analyze them warm, write and queue results.

Two threads per pipeline: one *prepares* (reads the stored file, triage, decode,
preprocess) while the other *infers* (models, reporting), so decoding the next image
overlaps with inference of the current one. Inference itself is serialized per model by
the analyzer. Every instance ends ``analyzed``, ``skipped`` or ``failed`` with a reason;
a crash or SIGKILL leaves it ``analyzing`` and it is resumed at the next start.
"""
from __future__ import annotations

import datetime
import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .config import OUTPUT_TYPES, Config
from .findings import Findings
from .journal import InstanceRow, Journal
from .storage import write_all_durably

logger = logging.getLogger(__name__)

LOCAL_DESTINATION = "local-folder"
MAX_ATTEMPTS = 3   # an image that crashed the process this often is marked failed


@dataclass
class _Job:
    row: InstanceRow
    source: Any            # pydicom Dataset
    prepared: Any          # analysis.Prepared
    started: float


class Pipeline:
    """Prepare and infer threads working from the journal."""

    def __init__(self, config: Config, journal: Journal, analyzer, *,
                 work_available: threading.Event, metrics=None,
                 on_results: Callable[[], None] | None = None,
                 equipment=None):
        self.config = config
        self.journal = journal
        self.analyzer = analyzer
        self.work_available = work_available
        self.metrics = metrics
        self._on_results = on_results or (lambda: None)
        self._equipment = equipment
        self._stop = threading.Event()
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=1)
        self._threads: list[threading.Thread] = []
        dests = config.destinations
        self.outputs = tuple(o for o in OUTPUT_TYPES if not dests or any(o in d.outputs for d in dests))

    def start(self) -> "Pipeline":
        for name, target in (("prepare", self._prepare_loop), ("infer", self._infer_loop)):
            t = threading.Thread(target=target, name=f"pipeline-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        self.work_available.set()
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass
        for t in self._threads:
            t.join(timeout=30)

    # ------------------------------------------------------------------ prepare
    def _prepare_loop(self) -> None:
        while not self._stop.is_set():
            row = self.journal.claim_next_instance()
            if row is None:
                self.work_available.wait(1.0)
                self.work_available.clear()
                continue
            job = self._prepare(row)
            if job is not None:
                while not self._stop.is_set():
                    try:
                        self._queue.put(job, timeout=0.5)
                        break
                    except queue.Full:
                        continue

    def _prepare(self, row: InstanceRow) -> _Job | None:
        from .imaging import ImagingError
        started = time.perf_counter()
        if row.attempts > MAX_ATTEMPTS:
            self._finish(row, "failed", f"analysis was interrupted {row.attempts - 1} times; "
                         "the image may be damaged. Stored, not analyzed")
            return None
        path = self.config.storage_dir / row.path
        try:
            prepared = self.analyzer.prepare(path)    # reads the stored file (timed as "read")
        except ImagingError as exc:
            self._finish(row, "failed", str(exc))
            return None
        except Exception as exc:  # noqa: BLE001 - one bad image must not stop the box
            logger.exception("unexpected error preparing an image")
            self._finish(row, "failed", f"internal error while reading the image ({type(exc).__name__})")
            return None
        source = prepared.dataset
        skipped = getattr(prepared, "findings_if_skipped", None)
        if skipped is not None:
            self._finish(row, "skipped", skipped.reason, findings=skipped)
            return None
        return _Job(row=row, source=source, prepared=prepared, started=started)

    # ------------------------------------------------------------------ infer + report
    def warm_up(self) -> None:
        """Run one synthetic image through models and reporting, so the first patient's
        image does not pay for lazy initialisation (ONNX Runtime arenas, SR templates)."""
        from .reporting import build_results
        started = time.perf_counter()
        try:
            source = synthetic_chest_dataset()
            prepared = self.analyzer.prepare(source)
            if getattr(prepared, "findings_if_skipped", None) is None:
                findings = self.analyzer.infer(prepared)
                for ds in build_results(source, findings, prepared.image.unit_image, self.outputs).values():
                    _encode(ds)
        except Exception:  # noqa: BLE001 - a warm-up problem must not stop the service
            logger.warning("warm-up run failed; the first image may be slower", exc_info=True)
            return
        logger.info("models and reporting warmed up in %.0f ms", (time.perf_counter() - started) * 1000)

    def _infer_loop(self) -> None:
        self.warm_up()
        while not self._stop.is_set():
            job = self._queue.get()
            if job is None:
                return
            try:
                self._infer(job)
            except Exception as exc:  # noqa: BLE001
                logger.exception("unexpected error analyzing an image")
                self._finish(job.row, "failed", f"internal error during analysis ({type(exc).__name__})")

    def _infer(self, job: _Job) -> None:
        from .reporting import build_results
        findings: Findings = self.analyzer.infer(job.prepared)
        findings.timings_ms.pop("total", None)
        t0 = time.perf_counter()
        kwargs = {"equipment": self._equipment} if self._equipment is not None else {}
        # Content dates come from the journal's receive time: a rerun gives identical objects.
        received = datetime.datetime.fromtimestamp(job.row.received_at).replace(microsecond=0)
        results = build_results(job.source, findings, job.prepared.image.unit_image,
                                self.outputs, analysis_time=received, **kwargs)
        objects, files = [], {}
        for kind, ds in results.items():
            rel = f"results/{ds.StudyInstanceUID}/{kind}_{ds.SOPInstanceUID}.dcm"
            files[self.config.storage_dir / rel] = _encode(ds)
            objects.append((kind, str(ds.SOPInstanceUID), rel))
        write_all_durably(files)
        report_ms = (time.perf_counter() - t0) * 1000.0
        timings = dict(findings.timings_ms)
        timings["report"] = report_ms
        timings["analysis_total"] = (time.perf_counter() - job.started) * 1000.0
        findings.timings_ms = timings
        if self.config.destinations:
            plan = [(o, d.name) for o in objects for d in self.config.destinations if o[0] in d.outputs]
        else:
            plan = [(o, LOCAL_DESTINATION) for o in objects]
        self._complete(job.row, findings, timings, plan)
        if self.metrics is not None:
            for stage, ms in timings.items():
                if stage in ("decode", "preprocess", "tb", "nodule", "report"):
                    self.metrics.observe_stage(stage, ms / 1000.0)
            self.metrics.instance_finished("analyzed")
        tb = findings.tb
        logger.info("analyzed %s: TB %s, %d nodule(s), %.0f ms", job.row.sop_instance_uid,
                    "refer" if tb and tb.positive else "no signs", len(findings.nodules),
                    timings["analysis_total"])
        self._on_results()

    def _complete(self, row: InstanceRow, findings: Findings, timings: dict, plan: list) -> None:
        self.journal.complete_analysis(
            row.sop_instance_uid, findings=findings.to_dict(), timings_ms=timings,
            plan=[(kind, uid, rel, dest) for (kind, uid, rel), dest in plan],
            local_destination=LOCAL_DESTINATION)

    def _finish(self, row: InstanceRow, state: str, reason: str | None,
                findings: Findings | None = None) -> None:
        logger.info("%s %s: %s", state, row.sop_instance_uid, reason)
        self.journal.finish_instance(row.sop_instance_uid, state, reason=reason,
                                     findings=findings.to_dict() if findings else None,
                                     timings_ms=findings.timings_ms if findings else None)
        if self.metrics is not None:
            self.metrics.instance_finished(state, reason)


def _encode(ds) -> bytes:
    from io import BytesIO
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def synthetic_chest_dataset(side: int = 1024):
    """A plain, valid DX dataset used only to warm up the pipeline (never stored or sent)."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "2.25.1"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "2.25.2", "2.25.3"
    ds.PatientName, ds.PatientID, ds.PatientAge = "WARMUP", "WARMUP", "040Y"
    ds.PatientBirthDate, ds.PatientSex, ds.AccessionNumber, ds.StudyID = "", "", "", ""
    ds.ReferringPhysicianName = ""
    ds.StudyDate, ds.StudyTime, ds.Modality = "20260101", "000000", "DX"
    ds.BodyPartExamined, ds.ViewPosition = "CHEST", "PA"
    ds.ImagerPixelSpacing = [0.2, 0.2]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = side
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    y, x = np.mgrid[0:side, 0:side]
    ds.PixelData = (2048 + 1000 * np.sin(x / 40.0) * np.cos(y / 50.0)).astype(np.uint16).tobytes()
    return ds
