"""Prometheus metrics of the appliance, in a ``CollectorRegistry`` that is passed around.

Event counters and histograms are updated by the pipeline and the outbox through
``Metrics``; queue depths, delivery states and disk space are read from the journal and
the file system at scrape time (``JournalCollector``), so they are never stale.

No label carries patient data or UIDs: labels are calling AE titles, destination names,
stage names, fixed skip-reason categories, model names/versions and the finding labels
the models declare in their manifests.
"""
from __future__ import annotations

import logging
import re
import shutil
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:  # pragma: no cover
    from edge.findings import Findings
    from edge.journal import Journal

logger = logging.getLogger(__name__)

# 10 ms .. 10 s, plus a tail for slow deliveries and cold starts.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0,
                   10.0, 30.0, 60.0)
STAGES = ("store", "decode", "preprocess", "tb", "nodule", "report", "deliver")
DELIVERY_OUTCOMES = ("sent", "retry", "gave_up")
#: What a delivery row carries: the received image itself (router mode) or a result object.
OBJECT_TYPES = ("source", "sr", "gsps", "sc", "fhir")
FINISHED_STATES = ("analyzed", "skipped", "failed")
COMMITMENT_OUTCOMES = ("requested", "committed", "failures", "undeliverable")
#: Kinds of findings (``edge.findings.Other.kind``).
FINDING_KINDS = ("classification", "detection")
#: Labels of the two findings the appliance keeps apart (``Findings.tb``, ``Findings.nodules``).
TB_LABEL, NODULE_LABEL = "tuberculosis", "nodule"
#: Distinct finding labels kept; labels come from installed manifests, so this is generous.
MAX_FINDING_LABELS = 64
#: TB screen scores (drift: their distribution against the calibration's), in steps of 0.05.
TB_SCORE_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 21))

# Skip reasons are free text written by triage; metrics and the status page use these
# categories. Order matters: the first pattern that matches wins.
SKIP_REASON_PATTERNS: tuple[tuple[str, str], ...] = (
    ("lateral_view", r"\blateral\b|\bLL\b|\bLAT\b"),
    ("wrong_modality", r"modality|not an x-?ray"),
    ("not_chest", r"body ?part|not (a )?chest|chest"),
    ("view_position", r"\bview\b|position"),
    ("patient_age", r"\bage\b|young|child|paediatric|pediatric|years"),
    ("image_too_small", r"too small|smaller|min_side|minimum size"),
    ("image_too_large", r"too large|larger|max_side|maximum size"),
    ("multi_frame", r"frame"),
    ("unsupported_pixels", r"photometric|colou?r|rgb|bits|pixel"),
    ("not_an_image", r"sop class|not an image|no pixel"),
    ("duplicate", r"duplicate"),
)
SKIP_REASONS = tuple(name for name, _ in SKIP_REASON_PATTERNS) + ("other",)
_SKIP_RES = tuple((name, re.compile(pattern, re.IGNORECASE)) for name, pattern in SKIP_REASON_PATTERNS)
_LABEL_RE = re.compile(r"^[A-Za-z0-9_.\- ]{1,64}$")


def skip_reason_category(reason: str | None) -> str:
    """Map a free-text skip reason to a short fixed category (``"other"`` if unknown)."""
    if not reason:
        return "other"
    text = str(reason).strip()
    if text in SKIP_REASONS:
        return text
    for name, pattern in _SKIP_RES:
        if pattern.search(text):
            return name
    return "other"


def _safe_label(value: str, what: str) -> str:
    """A bounded, printable label value; anything odd becomes "invalid" (never raises)."""
    value = (value or "").strip()
    if not value:
        return "unknown"
    if not _LABEL_RE.fullmatch(value):
        logger.warning("metrics: %s label %r is not a plain name; recorded as 'invalid'", what, value[:20])
        return "invalid"
    return value


#: Distinct calling AE titles kept as label values; later ones are counted as "other", so
#: that a flood of made-up AE titles cannot grow /metrics without bound.
MAX_CALLING_AE_LABELS = 32


class BoundedLabel:
    """Label values from the outside world, at most ``limit`` distinct ones (then "other")."""

    def __init__(self, what: str, limit: int, known: Iterable[str] = ()) -> None:
        self.what = what
        self.limit = int(limit)
        self._lock = threading.Lock()
        self._seen: set[str] = set()
        self._warned = False
        for value in known:
            self.value(value)

    def value(self, raw: str) -> str:
        label = _safe_label(raw, self.what)
        with self._lock:
            if label in self._seen:
                return label
            if len(self._seen) < self.limit:
                self._seen.add(label)
                return label
            if not self._warned:
                self._warned = True
                logger.warning("metrics: more than %d distinct %s values; further ones are "
                               "counted as 'other'", self.limit, self.what)
        return "other"


class Metrics:
    """Counters and histograms of one appliance process (no multiprocess mode)."""

    def __init__(self, registry: CollectorRegistry | None = None, *,
                 known_calling_aes: Iterable[str] = ()) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._lock = threading.Lock()
        self._calling_ae = BoundedLabel("calling_ae", MAX_CALLING_AE_LABELS, known_calling_aes)
        self._journal_collector: JournalCollector | None = None
        self.received = Counter("edge_instances_received", "DICOM instances stored and journaled",
                                ["calling_ae"], registry=self.registry)
        self.analyzed = Counter("edge_instances_analyzed", "Instances analyzed by the models",
                                registry=self.registry)
        self.skipped = Counter("edge_instances_skipped", "Instances not analyzed, by reason category",
                               ["reason"], registry=self.registry)
        self.failed = Counter("edge_instances_failed", "Instances whose analysis failed",
                              registry=self.registry)
        self.stage_seconds = Histogram("edge_stage_seconds", "Time spent per pipeline stage",
                                       ["stage"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.end_to_end_seconds = Histogram(
            "edge_end_to_end_seconds", "From instance received to its last result delivered",
            buckets=LATENCY_BUCKETS, registry=self.registry)
        self.deliveries = Counter("edge_deliveries", "Delivery attempts by outcome, of result objects"
                                  " and forwarded images (object_type source)",
                                  ["destination", "outcome", "object_type"], registry=self.registry)
        self.commitments = Counter("edge_storage_commitments", "Storage commitment requests by"
                                   " outcome: requested, committed (all instances), failures"
                                   " (some not committed), undeliverable (result never accepted)",
                                   ["outcome"], registry=self.registry)
        self.findings = Counter("edge_findings", "Analysed images with a positive finding, by the"
                                " label its model declares and its kind (classification,"
                                " detection); an image counts once per label",
                                ["label", "kind"], registry=self.registry)
        self.referred = Counter("edge_instances_referred", "Analysed images the technician is told"
                                " to refer: TB screen positive or any referring finding",
                                registry=self.registry)
        self._finding_label = BoundedLabel("finding label", MAX_FINDING_LABELS)
        # TB screening programme: figures per calling AE (room or van), score drift, threshold
        self.tb_score = Histogram("edge_tb_score", "TB screen scores of analysed images",
                                  buckets=TB_SCORE_BUCKETS, registry=self.registry)
        self.ae_analyzed = Counter("edge_screening_analyzed", "Images analysed, by calling AE",
                                   ["calling_ae"], registry=self.registry)
        self.ae_skipped = Counter("edge_screening_skipped", "Images not analysed, by calling AE"
                                  " and reason category", ["calling_ae", "reason"], registry=self.registry)
        self.ae_failed = Counter("edge_screening_failed", "Images whose analysis failed, by calling AE",
                                 ["calling_ae"], registry=self.registry)
        self.ae_referred = Counter("edge_screening_referred", "Analysed images the technician is told"
                                   " to refer, by calling AE", ["calling_ae"], registry=self.registry)
        self.ae_nodules = Counter("edge_screening_nodules_flagged", "Analysed images with at least one"
                                  " nodule, by calling AE", ["calling_ae"], registry=self.registry)
        self.tb_threshold = Gauge("edge_tb_threshold", "TB screen threshold in force (score >= it"
                                  " refers)", registry=self.registry)
        self.tb_threshold_calibrated = Gauge("edge_tb_threshold_calibrated", "1 when the threshold in"
                                             " force was set by an applied local calibration",
                                             registry=self.registry)
        self.tb_expected = {bound: Gauge(f"edge_tb_expected_referral_rate{suffix}", f"{what} of the TB"
                                         " positive rate the applied calibration expects at this"
                                         " threshold (NaN when not calibrated: no alert)", registry=self.registry)
                            for bound, suffix, what in (("rate", "", "Point estimate"),
                                                        ("lower", "_lower", "Lower bound (95%)"),
                                                        ("upper", "_upper", "Upper bound (95%)"))}
        self.set_tb_screen(None)   # NaN until the app says: no band, so no drift alert
        for ae in sorted(self._calling_ae._seen):   # the configured rooms and vans, from the start
            for counter in (self.ae_analyzed, self.ae_failed, self.ae_referred, self.ae_nodules):
                counter.labels(calling_ae=ae)
        self.model_info = Gauge("edge_model_info", "Loaded models (value is always 1)",
                                ["name", "version", "backend"], registry=self.registry)
        for stage in STAGES:   # series exist from the start, so rate() and p95 work at once
            self.stage_seconds.labels(stage=stage)
        for outcome in COMMITMENT_OUTCOMES:
            self.commitments.labels(outcome=outcome)

    def instance_received(self, calling_ae: str) -> None:
        self.received.labels(calling_ae=self._calling_ae.value(calling_ae)).inc()

    def instance_finished(self, state: str, reason: str | None = None, *,
                          calling_ae: str | None = None) -> None:
        """Count a final state; ``reason`` (free text) is used only for skipped instances;
        with ``calling_ae``, the per-room figures (``edge_screening_*``) count it too."""
        ae = self._calling_ae.value(calling_ae) if calling_ae is not None else None
        if state == "analyzed":
            self.analyzed.inc()
            if ae is not None:
                self.ae_analyzed.labels(calling_ae=ae).inc()
        elif state == "skipped":
            self.skipped.labels(reason=skip_reason_category(reason)).inc()
            if ae is not None:
                self.ae_skipped.labels(calling_ae=ae, reason=skip_reason_category(reason)).inc()
        elif state == "failed":
            self.failed.inc()
            if ae is not None:
                self.ae_failed.labels(calling_ae=ae).inc()
        else:
            raise ValueError(f"state: {state!r} is not one of {', '.join(FINISHED_STATES)}")

    def declare_findings(self, declared: Iterable[tuple[str, str]]) -> None:
        """Create the ``edge_findings`` series of (label, kind) pairs the installed models
        declare, so that rate() works from the first scrape."""
        for label, kind in declared:
            self._finding_series(label, kind)

    def findings_observed(self, findings: "Findings", *, calling_ae: str | None = None) -> None:
        """Count an analysed image's positive findings (once per label), its refer and its
        TB score; with ``calling_ae``, its refer and nodules per room as well."""
        if findings.tb is not None:
            self.tb_score.observe(min(1.0, max(0.0, float(findings.tb.score))))
        if calling_ae is not None:
            ae = self._calling_ae.value(calling_ae)
            if findings.refer:
                self.ae_referred.labels(calling_ae=ae).inc()
            if findings.nodules:
                self.ae_nodules.labels(calling_ae=ae).inc()
        positive: set[tuple[str, str]] = set()
        if findings.tb is not None and findings.tb.positive:
            positive.add((TB_LABEL, "classification"))
        if findings.nodules:
            positive.add((NODULE_LABEL, "detection"))
        positive.update((o.label, o.kind) for o in findings.others if o.positive)
        for label, kind in sorted(positive):
            self._finding_series(label, kind).inc()
        if findings.refer:
            self.referred.inc()

    def set_tb_screen(self, threshold: float | None, *, calibrated: bool = False,
                      expected: dict[str, float] | None = None) -> None:
        """The TB threshold in force and, when a calibration set it, the positive rate it
        expects (``{"rate", "lower", "upper"}``): what the drift alert compares with."""
        self.tb_threshold.set(float("nan") if threshold is None else threshold)
        self.tb_threshold_calibrated.set(1.0 if calibrated else 0.0)
        for bound, gauge in self.tb_expected.items():
            value = (expected or {}).get(bound)
            if value is None:
                gauge.set(float("nan"))
            else:
                gauge.set(value)

    def _finding_series(self, label: str, kind: str):
        return self.findings.labels(label=self._finding_label.value(label),
                                    kind=kind if kind in FINDING_KINDS else "other")

    def observe_stage(self, stage: str, seconds: float) -> None:
        """Record one stage duration (store, decode, preprocess, tb, nodule, report, deliver)."""
        if stage not in STAGES:
            stage = _safe_label(stage, "stage").lower()
        self.stage_seconds.labels(stage=stage).observe(max(0.0, float(seconds)))

    def observe_end_to_end(self, seconds: float) -> None:
        self.end_to_end_seconds.observe(max(0.0, float(seconds)))

    def delivery_outcome(self, destination: str, outcome: str, *, object_type: str = "other") -> None:
        """Count one delivery attempt of an object (``object_type``: source, sr, gsps, sc)."""
        if outcome not in DELIVERY_OUTCOMES:
            raise ValueError(f"outcome: {outcome!r} is not one of {', '.join(DELIVERY_OUTCOMES)}")
        kind = object_type if object_type in OBJECT_TYPES else "other"
        self.deliveries.labels(destination=_safe_label(destination, "destination"), outcome=outcome,
                               object_type=kind).inc()

    def commitment_outcome(self, outcome: str) -> None:
        if outcome not in COMMITMENT_OUTCOMES:
            raise ValueError(f"outcome: {outcome!r} is not one of {', '.join(COMMITMENT_OUTCOMES)}")
        self.commitments.labels(outcome=outcome).inc()

    def set_model_info(self, models: list[dict]) -> None:
        """Replace the model info series with one per model dict {name, version, backend}."""
        with self._lock:
            self.model_info.clear()
            for i, model in enumerate(models):
                try:
                    labels = {k: _safe_label(str(model[k]), k) for k in ("name", "version", "backend")}
                except KeyError as exc:
                    raise ValueError(f"models[{i}]: missing key {exc.args[0]!r}") from None
                self.model_info.labels(**labels).set(1)

    def watch_triton(self, stats: Callable[[], dict[str, Any]]) -> None:
        """Export each model's Triton runs, fallbacks and round trips at scrape time
        (``stats()``: model name -> ``engines.runners.triton_runner.TritonStats``)."""
        self.registry.register(TritonCollector(stats))

    def watch_journal(self, journal: "Journal", storage_dir: str | Path, *,
                      destinations: Iterable[str] = (),
                      health: Callable[[], dict[str, Any]] | None = None) -> None:
        """Export journal queue depths, disk space and (optionally) health at scrape time.

        Calling it again replaces what is watched (one collector per registry).
        """
        with self._lock:
            if self._journal_collector is None:
                self._journal_collector = JournalCollector(journal, storage_dir, destinations, health)
                self.registry.register(self._journal_collector)
            else:
                self._journal_collector.retarget(journal, storage_dir, destinations, health)


class JournalCollector(Collector):
    """Gauges read from the journal and the disk when Prometheus scrapes."""

    def __init__(self, journal: "Journal", storage_dir: str | Path, destinations: Iterable[str],
                 health: Callable[[], dict[str, Any]] | None) -> None:
        self.retarget(journal, storage_dir, destinations, health)

    def retarget(self, journal: "Journal", storage_dir: str | Path, destinations: Iterable[str],
                 health: Callable[[], dict[str, Any]] | None) -> None:
        self._journal = journal
        self._storage_dir = Path(storage_dir)
        self._destinations = tuple(destinations)
        self._health = health

    def describe(self):   # no describe at registration: collect() reads the journal
        return []

    def collect(self):
        from edge.health import delivery_counts_by_destination   # edge.health imports no metrics

        try:
            by_state = self._journal.count_instances_by_state()
            per_dest = delivery_counts_by_destination(self._journal, self._destinations)
            by_type = self._journal.count_deliveries_by_type()
            commitments = self._journal.count_commitments_by_state()
            oldest = self._journal.oldest_pending_delivery_age()
        except Exception:   # a scrape must not fail because the journal is busy or gone
            logger.exception("metrics: could not read the journal")
            by_state, per_dest, by_type, commitments, oldest = None, None, None, None, None
        if by_state is not None and per_dest is not None:
            depth = GaugeMetricFamily("edge_queue_depth", "Work waiting: analysis (received+analyzing),"
                                      " delivery (pending+retrying) per destination",
                                      labels=["queue", "destination"])
            depth.add_metric(["analysis", ""], by_state.get("received", 0) + by_state.get("analyzing", 0))
            for dest, counts in sorted(per_dest.items()):
                depth.add_metric(["delivery", dest], counts.get("pending", 0) + counts.get("retrying", 0))
            yield depth
            inst = GaugeMetricFamily("edge_instances_in_state", "Journal instances by state",
                                     labels=["state"])
            for state, n in by_state.items():
                inst.add_metric([state], n)
            yield inst
            dl = GaugeMetricFamily("edge_deliveries_in_state", "Journal delivery rows by destination"
                                   " and state", labels=["destination", "state"])
            for dest, counts in sorted(per_dest.items()):
                for state, n in counts.items():
                    dl.add_metric([dest, state], n)
            yield dl
            typed = GaugeMetricFamily("edge_deliveries_by_type_in_state", "Journal delivery rows by"
                                      " destination, object type (source: the forwarded image;"
                                      " sr, gsps, sc: results) and state",
                                      labels=["destination", "object_type", "state"])
            for (dest, kind, state), n in sorted((by_type or {}).items()):
                typed.add_metric([dest, kind if kind in OBJECT_TYPES else "other", state], n)
            yield typed
            sc = GaugeMetricFamily("edge_storage_commitments_in_state", "Storage commitment requests"
                                   " by state (waiting: result not reported yet)", labels=["state"])
            for state, n in (commitments or {}).items():
                sc.add_metric([state], n)
            yield sc
            yield GaugeMetricFamily("edge_oldest_pending_delivery_age_seconds",
                                    "Age of the oldest result not yet delivered (0 when none)",
                                    value=oldest or 0.0)
        try:
            usage = shutil.disk_usage(self._storage_dir)
        except OSError as exc:
            logger.warning("metrics: disk usage of the storage dir unavailable: %s", exc)
        else:
            yield GaugeMetricFamily("edge_disk_free_bytes", "Free bytes on the storage volume",
                                    value=usage.free)
            yield GaugeMetricFamily("edge_disk_total_bytes", "Size of the storage volume in bytes",
                                    value=usage.total)
        if self._health is not None:
            yield from _health_families(self._health())


class TritonCollector(Collector):
    """Runs by backend, fallbacks by reason and Triton round trips of each model."""

    def __init__(self, stats: Callable[[], dict[str, Any]]) -> None:
        self._stats = stats

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, SummaryMetricFamily

        try:
            stats = dict(self._stats())
        except Exception:   # a scrape must not fail
            logger.exception("metrics: could not read the Triton statistics")
            return
        runs = CounterMetricFamily("edge_model_runs", "Model runs by the backend that produced the"
                                   " outputs (triton, or onnxruntime: the local fallback)",
                                   labels=["model", "backend"])
        fallbacks = CounterMetricFamily("edge_triton_fallbacks", "Runs Triton did not serve, by"
                                        " reason (unreachable, timeout, error, mismatch): run on"
                                        " local onnxruntime, or (triton_fallback = false) the"
                                        " image waits", labels=["model", "reason"])
        rtt = SummaryMetricFamily("edge_triton_round_trip_seconds", "Round trip of one model's"
                                  " tensors to Triton and back", labels=["model"])
        for name, st in sorted(stats.items()):
            model = _safe_label(name, "model")
            for backend, n in sorted(st.runs.items()):
                runs.add_metric([model, _safe_label(backend, "backend")], n)
            for reason, n in sorted(st.fallbacks.items()):
                fallbacks.add_metric([model, _safe_label(reason, "reason")], n)
            rtt.add_metric([model], st.round_trip_count, st.round_trip_sum_s)
        yield runs
        yield fallbacks
        yield rtt


def _triton_families(triton: dict[str, Any]):
    """Triton reachability, model readiness and probe round trip from the health check."""
    yield GaugeMetricFamily("edge_triton_up", "The Triton server answered the last health check"
                            " (1) or not (0)", value=1.0 if triton.get("reachable") else 0.0)
    if triton.get("round_trip_ms") is not None:
        yield GaugeMetricFamily("edge_triton_probe_round_trip_seconds", "Round trip of the last"
                                " Triton liveness check", value=float(triton["round_trip_ms"]) / 1000.0)
    ready = GaugeMetricFamily("edge_triton_model_ready", "The model is ready on Triton and matches"
                              " the manifest (1), else 0", labels=["model"])
    for m in triton.get("models", []):
        ready.add_metric([_safe_label(str(m.get("name", "")), "model")], 1.0 if m.get("ready") else 0.0)
    yield ready


def _health_families(snap: dict[str, Any]):
    """Listener, destination reachability and temperatures from a HealthMonitor snapshot."""
    up = snap.get("listener_up")
    if up is not None:
        yield GaugeMetricFamily("edge_listener_up", "DICOM listener accepting associations",
                                value=1.0 if up else 0.0)
    if "critical" in snap:
        yield GaugeMetricFamily("edge_healthy", "No critical problem: listener accepting, workers"
                                " alive, analysis not stalled (1), else 0",
                                value=0.0 if snap["critical"] else 1.0)
    if "problems" in snap:
        problem = GaugeMetricFamily("edge_health_problem", "A problem the box reports now (1); see"
                                    " /healthz for which ones are critical", labels=["problem"])
        for code in sorted(set(snap["problems"])):
            problem.add_metric([_safe_label(code.replace(":", "_"), "problem")], 1.0)
        yield problem
    if "oldest_waiting_analysis_s" in snap:
        yield GaugeMetricFamily("edge_oldest_waiting_analysis_seconds", "How long the oldest image"
                                " waiting for analysis has waited (0 when none)",
                                value=snap["oldest_waiting_analysis_s"] or 0.0)
    reach = GaugeMetricFamily("edge_destination_reachable", "Last C-ECHO to the destination"
                              " succeeded (1) or failed (0)", labels=["destination"])
    for dest in snap.get("destinations", []):
        if dest.get("reachable") is not None:
            reach.add_metric([dest["name"]], 1.0 if dest["reachable"] else 0.0)
    yield reach
    temps = GaugeMetricFamily("edge_temperature_celsius", "Platform temperatures", labels=["sensor"])
    for sensor in snap.get("platform", {}).get("temperatures", []):
        temps.add_metric([sensor["name"]], sensor["celsius"])
    yield temps
    if snap.get("triton"):
        yield from _triton_families(snap["triton"])
    util = snap.get("platform", {}).get("gpu_utilization_percent")
    if util is not None:
        yield GaugeMetricFamily("edge_gpu_utilization_percent", "GPU utilization", value=util)
