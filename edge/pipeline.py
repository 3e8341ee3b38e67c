"""Analysis workers: claim received instances, analyze them warm, write and queue results.

Two threads per pipeline: one *prepares* (reads the stored file, triage, decode,
preprocess) while the other *infers* (models, reporting), so decoding the next image
overlaps with inference of the current one. Inference itself is serialized per model by
the analyzer. Every instance ends ``analyzed``, ``skipped`` or ``failed`` with a reason;
a crash or SIGKILL leaves it ``analyzing`` and it is resumed at the next start.

Nothing one image does may stop the workers: pixel decoding runs in a separate process
(``edge.decoder``), every job is guarded against any exception (a codec's Rust panic is a
``BaseException``), and ``alive()`` tells the health checks when a worker thread has died
anyway. Only the image whose *inference* was under way when the service died is suspect,
not those queued behind it; before it is analysed again it is analysed once in a separate
process (``edge.rehearsal``), and failed only if that crashes too, so power cuts never fail
a healthy image. Results that cannot be written (disk full, read-only) are not a failure of
the image: it waits and is analysed again.
"""
from __future__ import annotations

import datetime
import gc
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from . import gc_timer
from .config import OUTPUT_TYPES, Config
from .findings import Findings
from .journal import SOURCE, InstanceRow, Journal
from .storage import StagedFiles

logger = logging.getLogger(__name__)

LOCAL_DESTINATION = "local-folder"
DISK_RETRY_S = (5.0, 300.0)   # first and longest wait before results are written again


@dataclass
class _Job:
    row: InstanceRow
    source: Any            # pydicom Dataset
    prepared: Any          # analysis.Prepared
    started: float
    gc_ms: float = 0.0     # gc_timer.gc_ms() when it started


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
        if equipment is None:
            from .reporting import equipment_from_identity
            equipment = equipment_from_identity(config.identity)
        self._equipment = equipment
        self._stop = threading.Event()
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=1)
        self._threads: list[threading.Thread] = []
        self._sr_worker = None     # edge.report_worker.SRWorker once warm_up started it
        self._disk_failures = 0
        #: (when, message) of the last failure to write results, None once writing works
        self.results_write_error: tuple[float, str] | None = None
        #: when an image last reached a final state (or the pipeline started): stall checks
        self.last_progress = time.time()
        self.outputs = result_outputs(config)

    def start(self) -> "Pipeline":
        gc_timer.install()
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
        if self._sr_worker is not None:
            self._sr_worker.close()

    def dead_workers(self) -> list[str]:
        """Names of worker threads that have stopped although the pipeline was not stopped."""
        if self._stop.is_set():
            return []
        return [t.name for t in self._threads if not t.is_alive()]

    # ------------------------------------------------------------------ prepare
    def _prepare_loop(self) -> None:
        while not self._stop.is_set():
            row = self.journal.claim_next_instance()
            if row is None:
                self.work_available.wait(1.0)
                self.work_available.clear()
                continue
            try:
                job = self._prepare(row)
            except BaseException as exc:   # noqa: BLE001 - one image must not stop the box
                job = None
                self._fail_unexpected(row, "reading the image", exc)
            if job is not None:
                while not self._stop.is_set():
                    try:
                        self._queue.put(job, timeout=0.5)
                        break
                    except queue.Full:
                        continue

    def _fail_unexpected(self, row: InstanceRow, stage: str, exc: BaseException) -> None:
        logger.error("unexpected %s while %s (%s)", type(exc).__name__, stage, row.sop_instance_uid,
                     exc_info=(type(exc), exc, exc.__traceback__))
        try:
            self._finish(row, "failed", f"internal error while {stage} ({type(exc).__name__}); "
                         "stored, not analyzed")
        except Exception:  # noqa: BLE001 - the journal itself failed: the image stays queued
            logger.exception("could not record the failure of %s", row.sop_instance_uid)

    def _prepare(self, row: InstanceRow) -> _Job | None:
        from .imaging import ImagingError
        started, gc_started = time.perf_counter(), gc_timer.gc_ms()
        path = self.config.storage_dir / row.path
        if row.attempts:   # the service stopped while analysing it: was it the image?
            from .rehearsal import rehearse
            logger.info("the analysis of %s was interrupted; analysing it once in isolation first",
                        row.sop_instance_uid)
            problem = rehearse(self.config, path)
            if problem:
                self._finish(row, "failed", f"{problem}; the image may be damaged. Stored, not analyzed")
                return None
            self.journal.clear_attempts(row.sop_instance_uid)
        try:
            prepared = self.analyzer.prepare(path)    # reads the stored file (timed as "read")
        except ImagingError as exc:
            self._finish(row, "failed", str(exc))
            return None
        source = prepared.dataset
        skipped = getattr(prepared, "findings_if_skipped", None)
        if skipped is not None:
            self._finish(row, "skipped", skipped.reason, findings=skipped)
            return None
        return _Job(row=row, source=source, prepared=prepared, started=started, gc_ms=gc_started)

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
                for ds in build_results(source, findings, prepared.image.unit_image, self.outputs,
                                        equipment=self._equipment).values():
                    _encode(ds)
                self._start_sr_worker(findings)
        except Exception:  # noqa: BLE001 - a warm-up problem must not stop the service
            logger.warning("warm-up run failed; the first image may be slower", exc_info=True)
            return
        # Everything loaded so far (models, codecs, highdicom's tables) lives as long as the
        # service: out of the collector's sight, so no full collection walks it mid-image.
        gc.collect()
        gc.freeze()
        logger.info("models and reporting warmed up in %.0f ms", (time.perf_counter() - started) * 1000)

    def _start_sr_worker(self, warm_findings: Findings) -> None:
        """With cores to spare, SRs are built in a child process while this thread builds the
        GSPS and SC (``edge.report_worker``); it warms up on the synthetic image."""
        from .report_worker import SRWorker
        if self._sr_worker is not None or "sr" not in self.outputs or self._stop.is_set() \
                or not SRWorker.useful():
            return
        bare = synthetic_chest_dataset()
        del bare.PixelData
        self._sr_worker = SRWorker().start(bare, warm_findings, dict(equipment=self._equipment))

    def _infer_loop(self) -> None:
        self.warm_up()
        while not self._stop.is_set():
            job = self._queue.get()
            if job is None:
                return
            try:
                self._infer(job)
            except BaseException as exc:  # noqa: BLE001 - one image must not stop the box
                self._fail_unexpected(job.row, "analyzing the image", exc)

    def _infer(self, job: _Job) -> None:
        from engines.runners.triton_runner import TritonUnavailable

        self.journal.begin_inference(job.row.sop_instance_uid)
        try:
            findings: Findings = self.analyzer.infer(job.prepared)
        except TritonUnavailable as exc:
            # [models] triton_fallback = false: the image waits for Triton, it is not failed
            logger.warning("Triton unavailable, %s waits: %s", job.row.sop_instance_uid, exc)
            self.journal.defer_instance(job.row.sop_instance_uid,
                                        "waiting for the Triton inference server",
                                        retry_at=time.time() + max(TRITON_RETRY_S,
                                                                   self.config.models.triton_retry_s))
            return
        findings.timings_ms.pop("total", None)
        t0, cpu0 = time.perf_counter(), time.thread_time()
        objects, files = [], {}
        staged, early_error = StagedFiles(), []
        placed_early: set = set()

        def deliver_early(entries: list) -> None:
            """The GSPS and SC written durably and queued while the SR child is still at
            work, so that the outbox sends them meanwhile: on the 2-core benchmark machine
            to_pacs p50 went from 67 to 41-50 ms, but the sending then shares the cores
            with the SR child (report +8-16 ms), so first-byte p50 did not change beyond
            the noise; boxes with more cores keep the difference."""
            early, paths = StagedFiles(), {self.config.storage_dir / rel: data for _, _, rel, data in entries}
            try:
                early.stage(paths)
                early.place()
            except OSError as exc:
                early.discard()
                early_error.append(exc)
                return
            placed_early.update(paths)
            self._queue_early(job.row, findings, entries)

        try:
            for kind, uid, rel, data in encode_results(
                    job.source, findings, job.prepared.image.unit_image, self.outputs,
                    received_at=job.row.received_at, source_digest=job.row.sha256,
                    equipment=self._equipment, sent_srs=self._sent_srs(job.row),
                    sr_worker=self._sr_worker, on_built=deliver_early):
                files[self.config.storage_dir / rel] = data
                objects.append((kind, uid, rel))
            if self.config.fhir is not None:   # the EMR's transaction, durable with the rest
                kind, uid, rel, data = fhir_result(job.source, findings, self.config.fhir,
                                                   equipment=self._equipment, received_at=job.row.received_at)
                files[self.config.storage_dir / rel] = data
                objects.append((kind, uid, rel))
        except BaseException:
            staged.discard()
            raise
        t_built = time.perf_counter()
        try:
            if early_error:
                raise early_error[0]
            staged.stage({path: data for path, data in files.items() if path not in placed_early})
            staged.place()
        except OSError as exc:
            staged.discard()
            self._defer_for_disk(job.row, exc)
            return
        except BaseException:
            staged.discard()
            raise
        self._disk_failures = 0
        self.results_write_error = None
        report_ms = (time.perf_counter() - t0) * 1000.0
        timings = dict(findings.timings_ms)
        timings["report"] = report_ms
        timings["report_write"] = (time.perf_counter() - t_built) * 1000.0   # durable, fsynced
        timings["report_cpu"] = (time.thread_time() - cpu0) * 1000.0   # well below "report": waits
        timings["gc"] = gc_timer.gc_ms() - job.gc_ms   # collections while it was analysed
        if self._sr_worker is not None and self._sr_worker.last_wait_ms is not None:
            timings["report_sr_wait"] = self._sr_worker.last_wait_ms   # SR built by the child
        timings["analysis_total"] = (time.perf_counter() - job.started) * 1000.0
        findings.timings_ms = timings
        plan = delivery_plan(self.config, job.row, findings, objects)
        self._complete(job.row, findings, timings, plan)
        self.last_progress = time.time()
        if self.metrics is not None:
            for stage, ms in timings.items():
                if stage in ("decode", "preprocess", "tb", "nodule", "report"):
                    self.metrics.observe_stage(stage, ms / 1000.0)
            self.metrics.instance_finished("analyzed", calling_ae=job.row.calling_ae)
            self.metrics.findings_observed(findings, calling_ae=job.row.calling_ae)
        tb = findings.tb
        # refer reasons are the models' display names, never patient data
        logger.info("analyzed %s: %s, TB %s, %d nodule(s), %d other positive finding(s), %.0f ms",
                    job.row.sop_instance_uid,
                    f"refer ({', '.join(findings.refer_reasons())})" if findings.refer else "no refer",
                    "none" if tb is None else ("positive" if tb.positive else "negative"),
                    len(findings.nodules), sum(o.positive for o in findings.others),
                    timings["analysis_total"])
        self._on_results()

    def _defer_for_disk(self, row: InstanceRow, exc: OSError) -> None:
        """The results could not be written: keep the image queued and try again later."""
        self._disk_failures += 1
        first, longest = DISK_RETRY_S
        delay = min(longest, first * 2 ** (self._disk_failures - 1))
        problem = exc.strerror or type(exc).__name__
        message = (f"results could not be written to disk ({problem}); analysed again "
                   "automatically when the disk is usable")
        if self.results_write_error is None:
            logger.error("results could not be written to %s (%s): images wait and are analysed "
                         "again when the disk is usable", self.config.results_dir, problem)
        self.results_write_error = (time.time(), message)
        self.journal.defer_instance(row.sop_instance_uid, message, retry_at=time.time() + delay)

    def _sent_srs(self, row: InstanceRow) -> list:
        """SRs of earlier analyses of this image that reached a destination: a new SR with
        other content names them as the documents it replaces."""
        from pydicom import dcmread

        from .reporting import PredecessorDocument

        out = []
        for delivery in self.journal.sent_results(row.sop_instance_uid, "sr"):
            try:
                ds = dcmread(self.config.storage_dir / delivery.path, stop_before_pixels=True,
                             specific_tags=["StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID"])
                out.append(PredecessorDocument(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                                               str(ds.SOPClassUID), delivery.result_uid))
            except (OSError, AttributeError, ValueError):
                logger.warning("the earlier SR %s of %s cannot be read; the new SR does not name it",
                               delivery.result_uid, row.sop_instance_uid)
        return out

    def _queue_early(self, row: InstanceRow, findings: Findings, entries: list) -> None:
        """Queue the delivery of result objects already written while the analysis goes on.
        Not to the results folder (nothing to send), nor where a [[forward]] rule sends the
        image, which goes there first."""
        if not self.config.destinations:
            return
        plan = delivery_plan(self.config, row, findings, [(kind, uid, rel) for kind, uid, rel, _ in entries])
        routed = {p[3] for p in plan if p[0] == SOURCE}
        early = [p for p in plan if p[0] != SOURCE and p[3] not in routed]
        if early:
            self.journal.queue_early_results(row.sop_instance_uid, early)
            self._on_results()

    def _complete(self, row: InstanceRow, findings: Findings, timings: dict, plan: list) -> None:
        self.journal.complete_analysis(
            row.sop_instance_uid, findings=findings.to_dict(), timings_ms=timings,
            plan=plan, local_destination=LOCAL_DESTINATION)

    def _finish(self, row: InstanceRow, state: str, reason: str | None,
                findings: Findings | None = None) -> None:
        logger.info("%s %s: %s", state, row.sop_instance_uid, reason)
        self.last_progress = time.time()
        self.journal.finish_instance(row.sop_instance_uid, state, reason=reason,
                                     findings=findings.to_dict() if findings else None,
                                     timings_ms=findings.timings_ms if findings else None)
        if self.metrics is not None:
            self.metrics.instance_finished(state, reason, calling_ae=row.calling_ae)


#: Without local fallback, an image that Triton could not analyse is tried again this late
#: at the earliest ([models] triton_retry_s when longer).
TRITON_RETRY_S = 1.0


#: The secondary capture is drawn from the decoded image at this size at least (its shorter
#: side, when the source is that large): readable on a workstation, boxes of small nodules
#: visible. The models' input is taken from the same decode.
SC_MIN_SIDE = 1024


def result_outputs(config: Config) -> tuple[str, ...]:
    """The result object types some destination takes (all of them with no destination)."""
    dests = config.destinations
    return tuple(o for o in OUTPUT_TYPES if not dests or any(o in d.outputs for d in dests))


def decode_side(config: Config, model_side: int) -> int:
    """How far images are decoded: the models' input side, or the SC's when one is made."""
    return max(model_side, SC_MIN_SIDE) if "sc" in result_outputs(config) else model_side


def encode_results(source, findings: Findings, unit_image, outputs, *, received_at: float,
                   source_digest: str, equipment, sent_srs=(), sr_worker=None,
                   on_built=None) -> list[tuple[str, str, str, bytes]]:
    """The result objects of one analysed image, encoded: (type, SOP Instance UID, path
    relative to the storage dir, bytes).

    Content dates come from the journal's receive time and UIDs from the content (source
    bytes, findings, equipment), so a rerun after a crash gives identical objects. When an
    earlier SR of the image was sent and the new one says something else, the new SR names
    it as a predecessor; an SR identical to one already sent is sent under its UID again.
    ``sr_worker`` (``edge.report_worker.SRWorker``): the SR is built there meanwhile, with
    the same bytes; ``on_built(entries)`` is then given the other objects (same tuples) as
    soon as they are encoded, before the wait for the SR.
    """
    from .report_worker import encoded_sr
    from .reporting import build_results

    received = datetime.datetime.fromtimestamp(received_at).replace(microsecond=0)
    kwargs = dict(equipment=equipment, analysis_time=received, source_digest=source_digest)
    pending = None
    if sr_worker is not None and "sr" in outputs:
        pending = sr_worker.submit(source, findings, kwargs, list(sent_srs))
    here = tuple(o for o in outputs if o != "sr") if pending is not None else tuple(outputs)
    results = build_results(source, findings, unit_image, here, **kwargs) if here else {}
    sent_uids = {p.sop_instance_uid for p in sent_srs}
    if "sr" in results and sent_srs and str(results["sr"].SOPInstanceUID) not in sent_uids:
        results["sr"] = build_results(source, findings, unit_image, ("sr",),
                                      predecessors=list(sent_srs), **kwargs)["sr"]
    encoded = {kind: (str(ds.SOPInstanceUID), str(ds.StudyInstanceUID), _encode(ds))
               for kind, ds in results.items()}
    if pending is not None:
        if on_built is not None and encoded:
            on_built([(kind, uid, f"results/{study}/{kind}_{uid}.dcm", data)
                      for kind, (uid, study, data) in encoded.items()])
        encoded["sr"] = sr_worker.result(pending) or encoded_sr(source, findings, kwargs, list(sent_srs))
    out = []
    for kind in outputs:
        uid, study, data = encoded[kind]
        out.append((kind, uid, f"results/{study}/{kind}_{uid}.dcm", data))
    return out


def fhir_result(source, findings: Findings, fhir, *, equipment, received_at: float,
                ) -> tuple[str, str, str, bytes]:
    """The EMR's FHIR transaction for one analysed image: (type, bundle id, path relative
    to the storage dir, bytes); the same result gives the same bytes (issued = the time
    the image was received, as the DICOM objects' content time)."""
    from .fhir import BUNDLE_KIND, build_bundle

    issued = datetime.datetime.fromtimestamp(received_at)
    bundle_id, data = build_bundle(source, findings, config=fhir, equipment=equipment, issued=issued)
    study = str(source.get("StudyInstanceUID", "") or "unknown-study")
    return BUNDLE_KIND, bundle_id, f"results/{study}/fhir_{bundle_id}.json", data


def delivery_plan(config, row: InstanceRow, findings: Findings, objects: list) -> list[tuple]:
    """(object_type, result_uid, path, destination[, rule]) for the journal: each result to
    every destination that takes it, except those only [[forward]] rules feed; the FHIR
    transaction to the EMR; and, when a rule matches, the image itself and its results to
    the rule's destination (with the rule's name). Without any destination, the results
    folder."""
    from .fhir import BUNDLE_KIND

    dicom = [o for o in objects if o[0] != BUNDLE_KIND]
    plan: list[tuple] = []
    if config.fhir is not None:
        plan += [(*o, config.fhir.name) for o in objects if o[0] == BUNDLE_KIND]
    if not config.destinations:
        return plan + [(*o, LOCAL_DESTINATION) for o in dicom]
    forward_only = config.forward_only
    plan += [(*o, d.name) for o in dicom for d in config.destinations
             if o[0] in d.outputs and d.name not in forward_only]
    routed: set[str] = set()
    for rule in config.forward:
        if rule.destination in routed or not rule.matches(findings):
            continue
        routed.add(rule.destination)
        dest = config.destination(rule.destination)
        plan.append((SOURCE, row.sop_instance_uid, row.path, dest.name, rule.name))
        plan += [(*o, dest.name, rule.name) for o in dicom if o[0] in dest.outputs]
    return plan


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
