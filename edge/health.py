"""System health for the status page and /metrics: cached, refreshed in a background thread.

Slow checks (C-ECHO to each destination, temperatures, nvidia-smi) run every
``interval_s`` seconds in a daemon thread, so a page or a scrape never waits on the
network. Cheap facts (listener up, queue depths, disk free) are read at each snapshot.
"""
from __future__ import annotations

import logging
import shutil
import sqlite3
import subprocess
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

if TYPE_CHECKING:  # pragma: no cover
    from edge.config import Config, Destination
    from edge.journal import Journal

logger = logging.getLogger(__name__)

_THERMAL_ROOT = Path("/sys/devices/virtual/thermal")
_JETSON_GPU_LOAD = Path("/sys/devices/gpu.0/load")


def delivery_counts_by_destination(journal: "Journal", destinations: Iterable[str] = ()) -> dict[str, dict[str, int]]:
    """Delivery rows per destination and state, read with our own read-only connection.

    Every configured destination appears (with zeros), as does any destination that still
    has rows in the journal after it was removed from the config.
    """
    from edge.journal import DELIVERY_STATES

    out = {d: {s: 0 for s in DELIVERY_STATES} for d in destinations}
    uri = f"file:{Path(journal.path).resolve()}?mode=ro"
    db = sqlite3.connect(uri, uri=True, timeout=5.0)
    try:
        rows = db.execute("SELECT destination, state, COUNT(*) FROM deliveries"
                          " GROUP BY destination, state").fetchall()
    finally:
        db.close()
    for dest, state, n in rows:
        out.setdefault(dest, {s: 0 for s in DELIVERY_STATES})[state] = n
    return out


def echo_destination(config: "Config", dest: "Destination", timeout_s: float) -> bool:
    """C-ECHO one configured destination (with DICOM TLS when it is set for it)."""
    from dicom_node.scu import echo

    from .outbox import destination_peer

    peer = destination_peer(config, dest, timeout_s=timeout_s)
    outcome = echo(peer)
    if not outcome.delivered:
        logger.info("C-ECHO to destination %s failed: %s", dest.name, outcome.message)
    return outcome.delivered


def read_platform(thermal_root: Path = _THERMAL_ROOT, gpu_load: Path = _JETSON_GPU_LOAD, *,
                  use_jtop: bool = True) -> dict[str, Any]:
    """Temperatures and GPU utilization where the platform exposes them; empty elsewhere.

    Tried in order: jetson-stats (``jtop``), Jetson sysfs (thermal zones, GPU load in
    per mille), ``nvidia-smi`` on dGPU machines.
    """
    temps: list[dict[str, Any]] = []
    util: float | None = None
    source = None
    try:   # Jetson with jetson-stats installed and its service running
        if not use_jtop:
            raise ImportError("jtop not wanted")
        from jtop import jtop   # type: ignore[import-not-found]
        with jtop(interval=0.5) as jetson:
            if jetson.ok():
                stats = jetson.stats
                for key, value in stats.items():
                    if key.startswith("Temp") and isinstance(value, (int, float)) and value > -100:
                        temps.append({"name": key.replace("Temp ", "").strip(), "celsius": float(value)})
                if isinstance(stats.get("GPU"), (int, float)):
                    util = float(stats["GPU"])
                source = "jtop"
    except Exception:   # not installed, or jtop.service not running
        pass
    if source is None and thermal_root.is_dir():
        for zone in sorted(thermal_root.glob("thermal_zone*")):
            try:
                milli = int((zone / "temp").read_text().strip())
                name = (zone / "type").read_text().strip() or zone.name
            except (OSError, ValueError):
                continue
            if milli > -40000:
                temps.append({"name": name, "celsius": milli / 1000.0})
        if temps:
            source = "sysfs"
        if gpu_load.is_file():
            try:   # per mille
                util = int(gpu_load.read_text().strip()) / 10.0
                source = "sysfs"
            except (OSError, ValueError):
                pass
    if source is None and shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=index,temperature.gpu,utilization.gpu",
                                  "--format=csv,noheader,nounits"], capture_output=True, text=True,
                                 timeout=5, check=True).stdout
            for line in out.strip().splitlines():
                idx, temp, load = (x.strip() for x in line.split(","))
                temps.append({"name": f"gpu{idx}", "celsius": float(temp)})
                util = float(load) if util is None else max(util, float(load))
            source = "nvidia-smi"
        except (OSError, subprocess.SubprocessError, ValueError):
            logger.debug("nvidia-smi present but unreadable", exc_info=True)
    return {"source": source, "temperatures": temps, "gpu_utilization_percent": util}


#: Problems that mean the box is not doing its job: /healthz answers 503 and the systemd
#: watchdog is not petted (so systemd restarts the service). Others (a PACS unreachable,
#: a full results disk) are shown and alerted on, but a restart would not fix them.
CRITICAL_PROBLEMS = ("listener_down", "worker_dead", "analysis_stalled", "journal_unreadable",
                     "journal_integrity", "health_check_failed")


def is_critical(problem: str) -> bool:
    return problem.split(":", 1)[0] in CRITICAL_PROBLEMS


class HealthMonitor:
    """Cached health of the box: listener, destinations, queues, disk, models, platform."""

    def __init__(self, config: "Config", journal: "Journal", *,
                 models: list[dict] | Callable[[], list[dict]] | None = None,
                 listener_up: Callable[[], bool] = lambda: True,
                 service_problems: Callable[[], list[str]] = lambda: [],
                 notices: Callable[[], list[str]] = lambda: [],
                 last_progress: Callable[[], float | None] = lambda: None,
                 triton: Callable[[], dict[str, Any] | None] | None = None,
                 interval_s: float = 30.0, echo_timeout_s: float = 5.0) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s: must be > 0, got {interval_s}")
        self.config = config
        self.journal = journal
        # the models and their backends: a list, or a callable when they can change (a
        # TensorRT engine finished building in the background)
        self._models = models if callable(models) else list(models or [])
        self.listener_up = listener_up
        self.service_problems = service_problems
        self.notices = notices
        self.last_progress = last_progress
        self.triton = triton          # backend "triton": the server check (slow, cached)
        self._triton: dict[str, Any] | None = None
        self.interval_s = float(interval_s)
        self.echo_timeout_s = float(echo_timeout_s)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._destinations: dict[str, dict[str, Any]] = {
            d.name: self._dest_entry(d, None, None) for d in config.destinations}
        self._platform: dict[str, Any] = {"source": None, "temperatures": [], "gpu_utilization_percent": None}
        self._checked_at: float | None = None

    @property
    def models(self) -> list[dict]:
        return list(self._models() if callable(self._models) else self._models)

    @staticmethod
    def _dest_entry(dest: "Destination", reachable: bool | None, checked_at: float | None) -> dict[str, Any]:
        return {"name": dest.name, "ae_title": dest.ae_title, "host": dest.host, "port": dest.port,
                "reachable": reachable, "checked_at": checked_at}

    # ------------------------------------------------------------------ thread
    def start(self) -> "HealthMonitor":
        """Start the background refresh (first check at once); idempotent."""
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="edge-health", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def request_refresh(self) -> None:
        """Ask the background thread to check again now (the page never waits for it)."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh()
            except Exception:   # keep the thread alive whatever one check does
                logger.exception("health check failed")
            self._wake.wait(self.interval_s)
            self._wake.clear()

    # ------------------------------------------------------------------ checks
    def refresh(self) -> None:
        """Run the slow checks now, in the calling thread (the background thread uses it)."""
        for dest in self.config.destinations:
            try:
                ok = echo_destination(self.config, dest, self.echo_timeout_s)
            except Exception as exc:
                logger.info("C-ECHO to destination %s failed: %s", dest.name, exc)
                ok = False
            with self._lock:
                self._destinations[dest.name] = self._dest_entry(dest, ok, time.time())
        triton = None
        if self.triton is not None:
            try:
                triton = self.triton()
            except Exception as exc:   # noqa: BLE001 - a bad answer never stops the checks
                logger.info("Triton check failed: %s", exc)
                triton = {"reachable": False, "error": str(exc), "models": [], "round_trip_ms": None}
        platform = read_platform()
        with self._lock:
            self._triton = triton
            self._platform = platform
            self._checked_at = time.time()

    def snapshot(self) -> dict[str, Any]:
        """Health now: cached slow checks plus fresh queue depths, disk and listener."""
        with self._lock:
            destinations = [dict(d) for d in self._destinations.values()]
            platform = dict(self._platform)
            triton = None if self._triton is None else dict(self._triton)
            checked_at = self._checked_at
        problems: list[str] = []
        try:
            listener = bool(self.listener_up())
        except Exception:
            logger.exception("listener_up() raised")
            listener = False
        if not listener:
            problems.append("listener_down")
        try:
            problems.extend(self.service_problems())
        except Exception:
            logger.exception("service_problems() raised")
            problems.append("health_check_failed")
        queues: dict[str, Any] = {}
        oldest = waiting = None
        try:
            by_state = self.journal.count_instances_by_state()
            per_dest = delivery_counts_by_destination(self.journal, (d.name for d in self.config.destinations))
            oldest = self.journal.oldest_pending_delivery_age()
            waiting = self.journal.oldest_waiting_age()
            if self._stalled(waiting):
                problems.append("analysis_stalled")
            queues = {"analysis": by_state.get("received", 0) + by_state.get("analyzing", 0),
                      "instances": by_state,
                      "delivery": {d: c.get("pending", 0) + c.get("retrying", 0) for d, c in per_dest.items()},
                      "gave_up": sum(c.get("gave_up", 0) for c in per_dest.values()),
                      "commitments": self.journal.count_commitments_by_state()}
        except Exception:
            logger.exception("journal unreadable for the health snapshot")
            problems.append("journal_unreadable")
        if queues.get("gave_up"):
            problems.append("deliveries_gave_up")
        if queues.get("commitments", {}).get("gave_up"):
            problems.append("commitments_gave_up")
        for d in destinations:
            if d["reachable"] is False:
                problems.append(f"destination_unreachable:{d['name']}")
        if triton is not None:
            if not triton.get("reachable"):
                problems.append("triton_unreachable")
            for m in triton.get("models", []):
                if m.get("mismatch"):
                    problems.append(f"triton_model_mismatch:{m.get('name')}")
                elif triton.get("reachable") and not m.get("ready"):
                    problems.append(f"triton_model_not_ready:{m.get('name')}")
        disk = self._disk()
        if disk.get("low"):
            problems.append("disk_low")
        try:
            notices = list(self.notices())
        except Exception:
            logger.exception("notices() raised")
            notices = []
        return {"listener_up": listener, "destinations": destinations, "queues": queues,
                "oldest_pending_delivery_s": oldest, "oldest_waiting_analysis_s": waiting,
                "disk": disk, "models": self.models,
                "platform": platform, "triton": triton, "checked_at": checked_at, "now": time.time(),
                "ok": not problems, "problems": problems,
                "critical": [p for p in problems if is_critical(p)], "notices": notices}

    def _stalled(self, waiting: float | None) -> bool:
        """Images wait and none has been finished for ``stalled_after_s``. A long backlog
        that is being worked through (or images recovered with their old receive times)
        is progress, not a stall: only the time since the last finished image counts."""
        limit = self.config.analysis.stalled_after_s
        if waiting is None or waiting <= limit:
            return False
        last = self.last_progress()
        return last is None or time.time() - last > limit

    def _disk(self) -> dict[str, Any]:
        reserve = self.config.storage.min_free_mb * 1024 * 1024
        try:
            usage = shutil.disk_usage(self.config.storage_dir)
        except OSError as exc:
            return {"error": str(exc), "low": True}
        return {"free_bytes": usage.free, "total_bytes": usage.total, "reserve_bytes": reserve,
                "low": usage.free < reserve}
