"""End-to-end benchmark against real DICOM peers: storescu -> ``edge serve`` -> Orthanc or storescp.

    python -m benchmarks.e2e [--quick] [--backend auto|onnxruntime|tensorrt] [--models-dir DIR]
                             [--pacs orthanc|storescp] [--json PATH] [--write-results] [--profile FILE]

The modality (DCMTK ``storescu``) sends phantom chest X-rays (2k and 3k wide; uncompressed,
JPEG lossless SV1, JPEG 2000 lossless) to the appliance, started with a temporary config on
loopback ports, which sends SR, GSPS and SC to a PACS on loopback. Every image is timed the
way the site sees it, from its ``storescu`` start (the modality's first byte) to the last of
its 3 results at the PACS (polled every 10 ms): latency runs send one image at a time,
throughput runs have 1 and 4 senders each sending its images one after the other. Before
each latency image the floor is sampled in the same run: one ``storescu`` hop of a copy of
the same file straight to the same PACS plus the bare inference of both models in this
process; the report gives first-byte p50/p95/p99/max, the floor and their ratio, each
image's path cut into segments (``benchmarks.e2e_trace``) and every image slower than twice
its run's median with the segment that grew. Per-stage timings come from the appliance's
journal, peak memory from VmHWM of the ``edge serve`` process (reset before each run),
CPU per image from ``/proc`` for each process on the machine (``CpuMeter``); for runs with
several senders, the first-byte times an ideal machine with that CPU work would give for
the same arrivals (``cpu_bound_ms``) tell the machine's limit from the appliance's waste.
Every run checks that no image is lost and no result duplicated, at the PACS and in the
journal: exit status 1 if any is, 2 if the benchmark could not run, else 0 (missed targets
are only reported, with the stage they miss by). The DCMTK peers run with ``TCP_NODELAY=1``
unless ``--peer-nagle``: with Nagle's algorithm on, their small PDUs wait for the
receiver's delayed ACK (the appliance acknowledges every read at once, so that costs it
little; the floor's hop between two DCMTK peers pays it). ``--profile FILE`` samples
``edge serve`` with py-spy (collapsed stacks).
"""
from __future__ import annotations

import argparse
import datetime
import http.client
import json
import logging
import os
import platform
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pydicom
from pydicom.uid import generate_uid

from benchmarks.e2e_trace import (ANALYSIS_PARTS, RESULT_CLASSES, TARGET_E2E_MS, TARGET_RATIO,  # noqa: F401
                                  TRACE_SEGMENTS, cpu_bound_ms, evaluate_targets, image_trace,
                                  outlier_traces)
from dicom_node import dcmtk

logger = logging.getLogger(__name__)

RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"
STAGES = ("store", "read", "decode", "preprocess", "tb", "nodule", "report", "untimed", "deliver",
          "queue", "to_pacs", "analysis_total")
#: stages that are parts of the path (totals and waits excluded) for "slowest stage"
PART_STAGES = ("store", "read", "decode", "preprocess", "tb", "nodule", "report", "deliver")
POLL_S = 0.01


def pct(values: list[float], *qs: float) -> dict[str, float]:
    """Percentiles (linear interpolation) as {"p50": ..}; NaN-free: empty gives {}."""
    if not values:
        return {}
    arr = np.asarray(values, dtype=np.float64)
    return {f"p{q:g}": round(float(np.percentile(arr, q)), 3) for q in qs}


FORMS = {"raw": "Explicit VR Little Endian", "jpeg-ll": "JPEG Lossless SV1 (dcmcjpeg +e1)",
         "j2k": "JPEG 2000 Lossless (pydicom + OpenJPEG)"}
#: storescu proposes only the file's own transfer syntax (and uncompressed), as a modality does
STORESCU_TS = {"raw": ["-R"], "jpeg-ll": ["-R", "-xs"], "j2k": ["-R", "-xv"]}


class Arrival(NamedTuple):
    t: float            # epoch seconds when the poll first saw the object
    sop_class: str
    sop: str
    key: str            # Orthanc ID or storescp file name


# ---------------------------------------------------------------- inputs

def base_image(size: int, path: Path) -> str:
    """Write one uncompressed chest image ``size`` columns wide; returns its origin and size.

    The project's phantom (``engines.train.phantom``, its aspect ratio) when it imports,
    else the square synthetic image of ``benchmarks.analyze_bench``."""
    origin, ds = "synthetic", None
    try:
        from engines.train.phantom import generate_case, write_dicom
        write_dicom(generate_case(0, size=size), path)
        ds, origin = pydicom.dcmread(path), "phantom"
    except ImportError:
        pass
    except Exception as exc:  # noqa: BLE001 - the benchmark still runs on a synthetic image
        logger.warning("phantom generator failed (%s: %s); using a synthetic image", type(exc).__name__, exc)
    if ds is None:
        from benchmarks.analyze_bench import synthetic_chest
        ds = synthetic_chest(size)
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.decompress()
    defaults = {"PatientName": "BENCH^PHANTOM", "PatientID": "BENCH0001", "PatientBirthDate": "",
                "PatientSex": "O", "PatientAge": "040Y", "StudyDate": "20260101", "StudyTime": "090000",
                "AccessionNumber": "", "ReferringPhysicianName": "", "StudyID": "1", "SeriesNumber": 1,
                "InstanceNumber": 1, "Manufacturer": "edge-bench", "Modality": "DX",
                "BodyPartExamined": "CHEST", "ViewPosition": "PA", "PresentationIntentType": "FOR PRESENTATION"}
    for keyword, value in defaults.items():
        if keyword not in ds:
            setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)
    return f"{origin} {ds.Columns}x{ds.Rows}"


def make_inputs(folder: Path, sizes: list[int], forms: list[str]) -> dict[str, dict[str, Any]]:
    """One template file per (size, form), keyed by label such as "2k-j2k"."""
    from pydicom.uid import JPEG2000Lossless

    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, dict[str, Any]] = {}
    for size in sizes:
        raw = folder / f"{size}-raw.dcm"
        origin = base_image(size, raw)
        tag = f"{size // 1024}k" if size % 1024 == 0 else str(size)
        for form in forms:
            path = folder / f"{size}-{form}.dcm"
            if form == "jpeg-ll":
                subprocess.run(["dcmcjpeg", "+e1", str(raw), str(path)], check=True, timeout=300)
            elif form == "j2k":
                ds = pydicom.dcmread(raw)
                ds.compress(JPEG2000Lossless, generate_instance_uid=False)
                ds.save_as(path, enforce_file_format=True)
            out[f"{tag}-{form}"] = {"path": raw if form == "raw" else path, "syntax": FORMS[form],
                                    "storescu": STORESCU_TS[form],
                                    "origin": origin,
                                    "mb": round((raw if form == "raw" else path).stat().st_size / 1e6, 2)}
    return out


def stamp_copies(template: Path, folder: Path, n: int) -> list[dict[str, Any]]:
    """``n`` copies of ``template``, each its own study, series and SOP instance (pixels untouched)."""
    folder.mkdir(parents=True, exist_ok=True)
    ds = pydicom.dcmread(template)
    out = []
    for i in range(n):
        sop, study = generate_uid(), generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, generate_uid()
        path = folder / f"{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append({"path": path, "sop": sop, "study": study})
    return out


# ---------------------------------------------------------------- peers

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} before port {port} opened")
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"{what}: port {port} did not open within {timeout:.0f} s")


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


class _PACS:
    """A PACS on loopback; ``collect()`` polls for new result objects and files them by study."""

    aet = "PACS"

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.dicom_port = free_port()
        self.proc: subprocess.Popen | None = None
        self.arrivals: dict[str, list[Arrival]] = {}
        self._pending: list[tuple[float, str]] = []

    def destination(self) -> dict[str, Any]:
        return {"ae_title": self.aet, "port": self.dicom_port}

    def collect(self) -> None:
        keys = self._new_keys()
        now = time.time()          # the time is taken before identifying, which takes a while
        self._pending += [(now, k) for k in keys]
        waiting = []
        for t, key in self._pending:
            info = self._identify(key)
            if info is None:
                waiting.append((t, key))
            else:
                self.arrivals.setdefault(info[0], []).append(Arrival(t, info[1], info[2], key))
        self._pending = waiting

    def stop(self) -> None:
        _stop(self.proc)

    def _new_keys(self) -> list[str]:
        raise NotImplementedError

    def _identify(self, key: str) -> tuple[str, str, str] | None:
        raise NotImplementedError


class OrthancPeer(_PACS):
    """The Debian Orthanc with a temp config; new instances come from ``/changes``."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        super().__init__(env)
        self.dir = workdir / "orthanc"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.http_port = free_port()
        self._since = 0
        config = {"Name": "bench-pacs", "StorageDirectory": str(self.dir / "db"),
                  "IndexDirectory": str(self.dir / "db"), "StorageCompression": False,
                  "HttpPort": self.http_port, "HttpServerEnabled": True, "RemoteAccessAllowed": False,
                  "AuthenticationEnabled": False, "DicomAet": self.aet, "DicomPort": self.dicom_port,
                  "DicomCheckCalledAet": False, "DicomAlwaysAllowStore": True, "Plugins": [],
                  "DicomServerEnabled": True, "StableAge": 60}
        self.config = self.dir / "orthanc.json"
        self.config.write_text(json.dumps(config))

    def start(self) -> None:
        exe = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
        if not Path(exe).exists():
            raise RuntimeError("Orthanc is not installed (apt-get install orthanc), or use --pacs storescp")
        with open(self.dir / "orthanc.log", "ab") as log:
            self.proc = subprocess.Popen([exe, str(self.config)], stdout=log, stderr=subprocess.STDOUT,
                                         cwd=self.dir, env=self.env)
        wait_for_port(self.http_port, 60, self.proc, "Orthanc")
        wait_for_port(self.dicom_port, 60, self.proc, "Orthanc")
        self._conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=10)
        self._since = self._get("/changes?last")["Last"]

    def _get(self, path: str) -> Any:
        """GET over one kept-alive connection: the poll runs every 10 ms while the appliance
        works on the same 2 cores, so it must cost little (requests' Session took ~19 % of a
        core at this rate, http.client a fraction of that)."""
        for attempt in (1, 2):
            try:
                self._conn.request("GET", path)
                r = self._conn.getresponse()
                body = r.read()
            except (http.client.HTTPException, OSError):
                self._conn.close()
                if attempt == 2:
                    raise
                continue
            if r.status != 200:
                raise RuntimeError(f"Orthanc answered {r.status} to GET {path}")
            return json.loads(body)

    def _new_keys(self) -> list[str]:
        keys: list[str] = []
        while True:
            data = self._get(f"/changes?since={self._since}&limit=1000")
            keys += [c["ID"] for c in data["Changes"] if c["ChangeType"] == "NewInstance"]
            self._since = data["Last"]
            if data["Done"]:
                return keys

    def _identify(self, key: str) -> tuple[str, str, str] | None:
        tags = self._get(f"/instances/{key}/simplified-tags")
        return tags.get("StudyInstanceUID", ""), tags.get("SOPClassUID", ""), tags.get("SOPInstanceUID", "")


class StorescpPeer(_PACS):
    """DCMTK ``storescp`` writing every received object to its own file (``+uf``)."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        super().__init__(env)
        self.dir = workdir / "storescp"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._seen: set[str] = set()

    def start(self) -> None:
        with open(self.dir.parent / "storescp.log", "ab") as log:
            self.proc = subprocess.Popen(["storescp", "-aet", self.aet, "+xa", "-od", str(self.dir), "+uf",
                                          "-fe", ".dcm", str(self.dicom_port)],
                                         stdout=log, stderr=subprocess.STDOUT, env=self.env)
        wait_for_port(self.dicom_port, 30, self.proc, "storescp")

    def _new_keys(self) -> list[str]:
        new = [n for n in os.listdir(self.dir) if n not in self._seen]
        self._seen.update(new)
        return new

    def _identify(self, key: str) -> tuple[str, str, str] | None:
        try:
            ds = pydicom.dcmread(self.dir / key, stop_before_pixels=True,
                                 specific_tags=["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID"])
            return str(ds.StudyInstanceUID), str(ds.SOPClassUID), str(ds.SOPInstanceUID)
        except Exception:  # noqa: BLE001 - still being written: try at the next poll
            return None


class EdgeProcess:
    """``edge serve`` with a temp config on loopback ports, sending to one PACS."""

    ae_title = "EDGE_AI"

    def __init__(self, workdir: Path, *, models_dir: Path, backend: str, cache_dir: Path,
                 destination: dict[str, Any]) -> None:
        self.dir = workdir / "edge"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port, self.web_port = free_port(), free_port()
        storage = self.dir / "data"
        self.journal_path = storage / "journal.sqlite3"
        self.log = self.dir / "serve.log"
        self.proc: subprocess.Popen | None = None
        self._reset_ok = True
        q = json.dumps   # a JSON string is a valid TOML basic string
        self.config = self.dir / "edge.toml"
        self.config.write_text("\n".join([
            "[node]", f"ae_title = {q(self.ae_title)}", 'host = "127.0.0.1"', f"port = {self.port}",
            "[storage]", f"dir = {q(str(storage))}", "min_free_mb = 0",
            "[web]", 'host = "127.0.0.1"', f"port = {self.web_port}",
            "[models]", f"dir = {q(str(models_dir))}", f"backend = {q(backend)}",
            f"engine_cache_dir = {q(str(cache_dir))}",
            "[logging]", 'level = "INFO"',
            "[[destinations]]", 'name = "pacs"', f"ae_title = {q(destination['ae_title'])}",
            'host = "127.0.0.1"', f"port = {destination['port']}", ""]))

    def start(self, timeout: float = 300.0) -> None:
        """Start and wait until the models and reporting are warm (the log says so)."""
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "edge.cli", "serve", "--config", str(self.config)],
                                         cwd=self.dir, stdout=log, stderr=subprocess.STDOUT, env=env)
        wait_for_port(self.port, timeout, self.proc, "edge serve")
        deadline = time.monotonic() + timeout
        while "warmed up" not in self.log.read_text(errors="replace"):
            if "warm-up run failed" in self.log.read_text(errors="replace"):
                logger.warning("the appliance's warm-up failed; see %s", self.log)
                break
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"edge serve did not warm up within {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.1)

    def reset_peak_rss(self) -> None:
        """Reset VmHWM (``clear_refs`` 5), so each run reports its own peak."""
        if self.proc is None or not self._reset_ok:
            return
        try:
            Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")
        except OSError as exc:
            self._reset_ok = False
            logger.warning("cannot reset the peak RSS (%s): peaks are since the start", exc)

    def peak_rss_mb(self) -> float | None:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024.0, 1)
        except (OSError, AttributeError, ValueError):
            pass
        return None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        _stop(self.proc)


def start_profiler(edge: EdgeProcess, out: Path) -> subprocess.Popen | None:
    """Sample ``edge serve`` with py-spy (all threads, idle ones too) until it stops; the
    collapsed stacks go to ``out`` (flamegraph.pl / speedscope read them)."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(exe).exists():
        logger.warning("py-spy is not installed (pip install py-spy): no profile")
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    log = open(out.with_suffix(".log"), "ab")
    proc = subprocess.Popen([exe, "record", "--pid", str(edge.proc.pid), "--rate", "200", "--nonblocking", "--idle",
                             "--threads", "--format", "raw", "--output", str(out)],
                            stdout=log, stderr=subprocess.STDOUT)
    time.sleep(1.0)      # attached before the first image
    return proc


def stop_profiler(proc: subprocess.Popen, out: Path) -> None:
    """py-spy stops and writes when the process it samples has exited."""
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.send_signal(2)
        proc.wait(30)
    logger.info("profile of edge serve: %s", out)


# ---------------------------------------------------------------- journal

def journal_records(db_path: Path, uids: list[str]) -> dict[str, dict[str, Any]]:
    """Instance state, attempts, times and deliveries for ``uids``, read-only."""
    if not uids:
        return {}
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
    try:
        marks = ",".join("?" * len(uids))
        out: dict[str, dict[str, Any]] = {}
        for row in con.execute("SELECT sop_instance_uid, state, attempts, received_at, analyzed_at,"
                               f" timings_json, findings_json FROM instances WHERE sop_instance_uid IN ({marks})",
                               uids):
            out[row[0]] = {"state": row[1], "attempts": row[2], "received_at": row[3],
                           "analyzed_at": row[4], "timings": json.loads(row[5] or "{}"),
                           "findings": json.loads(row[6]) if row[6] else None, "deliveries": []}
        for row in con.execute("SELECT sop_instance_uid, object_type, state, attempts, sent_at"
                               f" FROM deliveries WHERE sop_instance_uid IN ({marks})", uids):
            if row[0] in out:
                out[row[0]]["deliveries"].append({"type": row[1], "state": row[2], "attempts": row[3],
                                                  "sent_at": row[4]})
        return out
    finally:
        con.close()


def _settled(rec: dict[str, Any] | None) -> bool:
    """Analysis final and every delivery sent with its timing recorded (or given up)."""
    if rec is None or rec["state"] in ("received", "analyzing"):
        return False
    if rec["state"] != "analyzed":
        return True
    ds = rec["deliveries"]
    if any(d["state"] in ("pending", "retrying") for d in ds):
        return False
    return "deliver" in rec["timings"] or any(d["state"] == "gave_up" for d in ds)


def wait_journal(db_path: Path, uids: list[str], timeout: float = 15.0) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        recs = journal_records(db_path, uids)
        if all(_settled(recs.get(u)) for u in uids) or time.monotonic() > deadline:
            return recs
        time.sleep(0.05)


# ---------------------------------------------------------------- checks and one run

def check_images(images: list[dict], pacs, recs: dict[str, dict]) -> tuple[int, int, list[str]]:
    """(lost, duplicated, problems) over ``images`` ({"sop", "study", "sent_ok"})."""
    lost = dup = 0
    problems: list[str] = []
    for img in images:
        got = pacs.arrivals.get(img["study"], [])
        per_class = Counter(a.sop_class for a in got)
        rec = recs.get(img["sop"])
        dels = rec["deliveries"] if rec else []
        missing = [RESULT_CLASSES[c] for c in RESULT_CLASSES if per_class[c] == 0]
        is_lost = (not img["sent_ok"] or rec is None or rec["state"] != "analyzed" or bool(missing)
                   or sorted(d["type"] for d in dels) != ["gsps", "sc", "sr"]
                   or any(d["state"] != "sent" for d in dels))
        is_dup = (any(n > 1 for n in per_class.values()) or len(got) != len({a.sop for a in got})
                  or (rec is not None and rec["attempts"] != 1)
                  or len(dels) > 3 or any(d["attempts"] != 1 for d in dels))
        if is_lost:
            lost += 1
            problems.append(f"{img['sop']}: lost (sent ok: {img['sent_ok']}, journal: "
                            f"{rec and rec['state']}, missing at PACS: {missing or 'none'})")
        if is_dup:
            dup += 1
            problems.append(f"{img['sop']}: duplicated (PACS {dict(per_class)}, journal attempts "
                            f"{rec and rec['attempts']}, deliveries {[(d['type'], d['attempts']) for d in dels]})")
    return lost, dup, problems


def _storescu(edge: EdgeProcess, files: list[Path], options: list[str], env: dict[str, str]) -> bool:
    return _storescu_to(edge.ae_title, edge.port, files, options, env)


def _storescu_to(called_ae: str, port: int, files: list[Path], options: list[str], env: dict[str, str]) -> bool:
    proc = subprocess.run([dcmtk.require("storescu"), *options, "-aet", "MODALITY", "-aec", called_ae, "127.0.0.1",
                           str(port), *map(str, files)], capture_output=True, text=True, timeout=600,
                          env=env)
    if proc.returncode != 0:
        logger.error("storescu failed (%d): %s", proc.returncode, proc.stderr.strip()[-500:])
    return proc.returncode == 0


class Floor:
    """What the hardware allows, measured between the images of a run: one ``storescu`` hop
    of a copy of the same file straight to the same PACS (process start -> exit, i.e. the
    PACS stored it and answered), plus the bare inference of both models in this process.
    Floor copies get their own studies and are not result objects, so the loss and
    duplicate checks ignore them."""

    def __init__(self, pacs, bench: "BareInference | None", inference_runs: int = 3) -> None:
        self.pacs = pacs
        self.bench = bench
        self.inference_runs = inference_runs

    def measure(self, template: Path, folder: Path, storescu: list[str]) -> tuple[float | None, float | None]:
        """(hop ms, bare inference p50 ms) of one floor sample."""
        copy = stamp_copies(template, folder, 1)[0]
        t0 = time.time()
        ok = _storescu_to(self.pacs.aet, self.pacs.dicom_port, [copy["path"]], storescu, self.pacs.env)
        hop = (time.time() - t0) * 1000.0 if ok else None
        copy["path"].unlink(missing_ok=True)
        inference = None
        if self.bench is not None:
            inference = self.bench.measure(self.inference_runs, warmup=1).get("p50")
        return hop, inference


def _complete(pacs, study: str) -> bool:
    return {a.sop_class for a in pacs.arrivals.get(study, [])} >= set(RESULT_CLASSES)


def _last_arrival(pacs, study: str) -> float:
    first: dict[str, float] = {}
    for a in pacs.arrivals.get(study, []):
        first[a.sop_class] = min(first.get(a.sop_class, a.t), a.t)
    return max(first.values())


def tree_cpu_s(pid: int | None) -> float:
    """CPU seconds (user + system) used so far by a process and its descendants: those
    running now, and those they have waited for (``/proc/<pid>/stat`` utime..cstime)."""
    if pid is None:
        return 0.0
    stats: dict[int, list[str]] = {}
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue        # gone meanwhile
        fields = raw[raw.rindex(")") + 2:].split()   # from the state on; the name may hold spaces
        stats[int(entry.name)] = fields
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    ticks, todo = 0, [pid]
    while todo:
        p = todo.pop()
        if p in stats:
            ticks += sum(int(x) for x in stats[p][11:15])
            todo += children.get(p, [])
    return ticks / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds spent during a run by the appliance (with its decoder and SR children),
    the PACS, the modalities (the ``storescu`` runs this process waited for) and this
    process (polls, floor inference): on a 2-core machine they all share the cores."""

    def __init__(self, edge: "EdgeProcess", pacs) -> None:
        self._pids = {"edge": edge.proc.pid if edge.proc else None,
                      "pacs": pacs.proc.pid if pacs.proc else None}
        self._start = self._read()

    def _read(self) -> dict[str, float]:
        import resource
        own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return {**{name: tree_cpu_s(pid) for name, pid in self._pids.items()},
                "modality": kids.ru_utime + kids.ru_stime, "benchmark": own.ru_utime + own.ru_stime}

    def per_image_ms(self, images: int) -> dict[str, float]:
        end = self._read()
        out = {k: round((end[k] - self._start[k]) * 1000.0 / max(1, images), 1) for k in end}
        out["total"] = round(sum(out.values()), 1)
        return out


def run_one(label: str, mode: str, senders: int, copies: list[dict], edge: EdgeProcess, pacs,
            timeout: float, storescu: list[str], floor: Floor | None = None,
            template: Path | None = None) -> dict[str, Any]:
    """Send ``copies`` (latency: one at a time; throughput: ``senders`` in parallel, each
    sending its images one after the other, one ``storescu`` per image, as modalities do)
    and measure. Each image's clock starts when its ``storescu`` starts (the modality's
    first byte). With ``floor``, a floor sample is taken before each latency image."""
    edge.reset_peak_rss()
    cpu = CpuMeter(edge, pacs)
    t_start = time.time()
    hops: list[float] = []
    inference: list[float] = []
    if mode == "latency":
        for img in copies:
            if floor is not None and template is not None:
                hop, inf = floor.measure(template, img["path"].parent / "floor", storescu)
                if hop is not None:
                    hops.append(hop)
                if inf is not None:
                    inference.append(inf)
                time.sleep(0.05)        # the PACS settles; the next image starts on a quiet box
                pacs.collect()
            img["t_first_byte"] = time.time()
            img["sent_ok"] = _storescu(edge, [img["path"]], storescu, pacs.env)
            img["t_sent"] = time.time()
            deadline = img["t_sent"] + timeout
            while img["sent_ok"] and not _complete(pacs, img["study"]) and time.time() < deadline:
                time.sleep(POLL_S)
                pacs.collect()
    else:
        groups = [copies[i::senders] for i in range(senders)]

        def send(group: list[dict]) -> None:
            for g in group:
                g["t_first_byte"] = time.time()
                g["sent_ok"] = _storescu(edge, [g["path"]], storescu, pacs.env)
                g["t_sent"] = time.time()
        threads = [threading.Thread(target=send, args=(g,)) for g in groups if g]
        for t in threads:
            t.start()
        last_new, seen = time.time(), 0
        while time.time() - last_new < timeout:
            pacs.collect()
            done = sum(_complete(pacs, c["study"]) for c in copies)
            if done > seen:
                last_new, seen = time.time(), done
            if not any(t.is_alive() for t in threads) and \
                    all(_complete(pacs, c["study"]) for c in copies if c.get("sent_ok")):
                break
            time.sleep(POLL_S)
        for t in threads:
            t.join()
    pacs.collect()
    cpu_ms = cpu.per_image_ms(len(copies))
    peak_mb = edge.peak_rss_mb()
    complete = [c for c in copies if c.get("sent_ok") and _complete(pacs, c["study"])]
    t_end = max((_last_arrival(pacs, c["study"]) for c in complete), default=time.time())
    recs = wait_journal(edge.journal_path, [c["sop"] for c in copies])
    for c in copies:
        c.setdefault("sent_ok", False)
    lost, dup, problems = check_images(copies, pacs, recs)
    e2e, first_byte, stages = [], [], {s: [] for s in STAGES}
    traces: list[dict[str, Any]] = []
    for c in complete:
        rec = recs.get(c["sop"])
        if rec is None:
            continue
        start = c["t_sent"] if mode == "latency" else rec["received_at"]
        last = _last_arrival(pacs, c["study"])
        e2e.append((last - start) * 1000.0)
        first_byte.append((last - c["t_first_byte"]) * 1000.0)
        t = dict(rec["timings"])
        sent = [d["sent_at"] for d in rec["deliveries"] if d["sent_at"]]
        if rec["analyzed_at"] and "analysis_total" in t:
            t["untimed"] = t["analysis_total"] - sum(t.get(k, 0.0) for k in ANALYSIS_PARTS)
            t["queue"] = (rec["analyzed_at"] - rec["received_at"]) * 1000.0 - t["analysis_total"]
            if sent:
                t["to_pacs"] = (max(sent) - rec["analyzed_at"]) * 1000.0
        for s in STAGES:
            if s in t:
                stages[s].append(float(t[s]))
        traces.append(image_trace(c, rec, pacs))
    backends = sorted({m["backend"] for r in recs.values() if r["findings"]
                       for m in r["findings"].get("models", [])})
    wall = max(t_end - t_start, 1e-6)
    out = {"input": label, "mode": mode, "senders": senders, "images": len(copies),
           "e2e_ms": {**pct(e2e, 50, 95, 99), **({"max": round(max(e2e), 2)} if e2e else {})},
           "first_byte_ms": {**pct(first_byte, 50, 95, 99),
                             **({"max": round(max(first_byte), 2)} if first_byte else {})},
           "stages_ms": {s: pct(v, 50, 95) for s, v in stages.items() if v},
           "throughput_per_min": round(len(complete) / wall * 60.0, 1), "wall_s": round(wall, 2),
           "peak_rss_mb": peak_mb, "lost": lost, "duplicated": dup, "problems": problems[:20],
           "runner": backends, "cpu_ms_per_image": cpu_ms}
    if hops:
        hop50 = pct(hops, 50)["p50"]
        inf50 = pct(inference, 50).get("p50", 0.0)
        out["floor_ms"] = {"p50": round(hop50 + inf50, 3), "hop_p50": hop50, "hop_p95": pct(hops, 95)["p95"],
                           "inference_p50": inf50, "samples": len(hops)}
        if first_byte:
            out["floor_ratio"] = round(out["first_byte_ms"]["p50"] / out["floor_ms"]["p50"], 3)
    out["segments_p50_ms"] = {k: round(float(np.median([tr["segments_ms"].get(k, 0.0) for tr in traces])), 1)
                              for k in TRACE_SEGMENTS} if traces else {}
    detail_keys = sorted({k for tr in traces for k in tr["detail_ms"]})
    out["detail_p50_ms"] = {k: round(float(np.median([tr["detail_ms"][k] for tr in traces if k in tr["detail_ms"]])), 1)
                            for k in detail_keys}
    out["outliers"] = outlier_traces(traces)
    if mode == "throughput":   # what the CPU work alone allows with these arrivals
        starts, cores = [c["t_first_byte"] for c in copies if "t_first_byte" in c], os.cpu_count() or 1
        out["cores"] = cores
        out["cpu_bound_first_byte_ms"] = {who: pct(cpu_bound_ms(starts, cpu_ms[key] / 1000.0 / cores), 50, 95)
                                          for who, key in (("edge", "edge"), ("all", "total"))}
    return out


# ---------------------------------------------------------------- bare inference, machine

class BareInference:
    """Both models loaded in this process, timed on one preprocessed tensor of a benchmark image.

    ``measure`` is called before and after the appliance runs (half the repetitions each), so
    other load on a shared machine weighs on both sides of the ratio alike.
    """

    def __init__(self, models_dir: Path, backend: str, cache_dir: Path, sample: Path) -> None:
        from edge.analysis import Analyzer
        from engines.store import load_models

        self.models = load_models(models_dir, backend, cache_dir=cache_dir)
        self.totals: list[float] = []
        self.per: dict[str, list[float]] = {n: [] for n in self.models}
        self.passes: list[dict[str, float]] = []
        prepared = Analyzer(self.models).prepare(sample)
        if prepared.findings_if_skipped is not None:
            self.close()
            raise RuntimeError(f"{sample.name}: the benchmark image is not analyzed by the appliance "
                               f"({prepared.findings_if_skipped.reason}); choose other --sizes")
        self.tensors = prepared.tensors

    def measure(self, runs: int, warmup: int = 3) -> dict[str, float]:
        totals = []
        for i in range(runs + warmup):
            t0 = time.perf_counter()
            for name, model in self.models.items():
                t = time.perf_counter()
                model.run(self.tensors[name])
                if i >= warmup:
                    self.per[name].append((time.perf_counter() - t) * 1000.0)
            if i >= warmup:
                totals.append((time.perf_counter() - t0) * 1000.0)
        self.totals += totals
        self.passes.append(pct(totals, 50))
        return self.passes[-1]

    def summary(self) -> dict[str, Any]:
        return {**pct(self.totals, 50, 95), "runs": len(self.totals), "passes_p50": self.passes,
                "per_model": {n: pct(v, 50, 95) for n, v in self.per.items()},
                "models": [{"name": m.manifest.name, "version": m.manifest.version, "backend": m.backend,
                            "input": [m.manifest.input.height, m.manifest.input.width]}
                           for m in self.models.values()]}

    def close(self) -> None:
        for model in self.models.values():
            model.close()


def machine_info(runner: str) -> dict[str, Any]:
    """CPU model, cores, RAM, GPU (nvidia-smi or Jetson device tree) and the runner used."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware")):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram_gb = 0.0
    try:
        kb = next(int(l.split()[1]) for l in Path("/proc/meminfo").read_text().splitlines()
                  if l.startswith("MemTotal:"))
        ram_gb = round(kb / 1024 / 1024, 1)
    except (OSError, StopIteration, ValueError):
        pass
    gpu = "none"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            gpu = ", ".join(out.stdout.strip().splitlines())
    except (OSError, subprocess.TimeoutExpired):
        model = Path("/proc/device-tree/model")
        if model.is_file():
            gpu = model.read_text(errors="replace").strip("\x00 \n")
    try:
        import onnxruntime
        ort = onnxruntime.__version__
    except ImportError:
        ort = "not installed"
    cores = os.cpu_count() or 0
    return {"cpu": cpu, "cores": cores, "ram_gb": ram_gb, "gpu": gpu, "runner": runner,
            "python": platform.python_version(), "onnxruntime": ort, "os": platform.platform(),
            "summary": f"{cpu}, {cores} cores, {ram_gb:g} GiB RAM, GPU: {gpu}, runner: {runner}"}


# ---------------------------------------------------------------- the whole benchmark

def run_benchmark(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Start the peers, run every input kind, and return the report (see module doc)."""
    from engines import DEFAULT_MODELS_DIR

    models_dir = Path(args.models_dir or DEFAULT_MODELS_DIR)
    load_before = os.getloadavg()
    inputs = make_inputs(workdir / "inputs", args.sizes, args.inputs)
    cache_dir = workdir / "engines"
    bench = BareInference(models_dir, args.backend, cache_dir, next(iter(inputs.values()))["path"])
    try:
        bench.measure(max(1, args.bare_runs // 2))
        logger.info("bare inference of both models: p50 %.1f ms", bench.passes[0].get("p50", float("nan")))
        runs, final, log_tail = _run_all(args, workdir, inputs, models_dir, cache_dir, bench)
        bench.measure(max(1, args.bare_runs - args.bare_runs // 2))
        bare = bench.summary()
    finally:
        bench.close()
    for run in runs:
        p50 = run["e2e_ms"].get("p50")
        run["bare_inference_ms"] = pct_subset(bare)
        run["ratio"] = round(p50 / bare["p50"], 3) if p50 and bare.get("p50") else None
    runner = ", ".join(sorted({b for r in runs for b in r["runner"]})) or "unknown"
    info = machine_info(runner)
    report = {"machine": info["summary"], "machine_details": info,
              "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": "python -m benchmarks.e2e " + " ".join(args.argv), "quick": args.quick,
              "pacs": args.pacs, "peer_tcp_nodelay": not args.peer_nagle, "backend_requested": args.backend,
              "models_dir": str(models_dir), "models": bare["models"], "bare_inference_ms": bare, "runs": runs,
              "lost": sum(r["lost"] for r in runs), "duplicated": sum(r["duplicated"] for r in runs),
              "final_check": final, "load_average": {"before": [round(x, 2) for x in load_before],
                                                     "after": [round(x, 2) for x in os.getloadavg()]}}
    if report["lost"] or report["duplicated"] or final["problems"]:
        report["edge_log_tail"] = log_tail
    report["targets"] = evaluate_targets(report)
    return report


def _run_all(args: argparse.Namespace, workdir: Path, inputs: dict[str, dict[str, Any]], models_dir: Path,
             cache_dir: Path, bench: "BareInference | None" = None,
             ) -> tuple[list[dict[str, Any]], dict[str, Any], str]:
    """Peers up, every (input, mode, senders) run, peers down: (runs, final check, edge log tail)."""
    # DCMTK (storescu, storescp, and Orthanc's network layer) leaves Nagle's algorithm on unless
    # TCP_NODELAY=1: its small PDUs then wait for the receiver's delayed ACK. The appliance
    # acknowledges at once (dicom_node.scu.quick_ack); the floor's DCMTK-to-Orthanc hop does
    # not, so --peer-nagle measures what a site with Nagle-on peers sees
    env = dict(os.environ, TCP_NODELAY="0" if args.peer_nagle else "1")
    pacs = OrthancPeer(workdir, env) if args.pacs == "orthanc" else StorescpPeer(workdir, env)
    edge = EdgeProcess(workdir, models_dir=models_dir, backend=args.backend, cache_dir=cache_dir,
                       destination=pacs.destination())
    runs: list[dict[str, Any]] = []
    floor = Floor(pacs, bench)
    profiler = None
    try:
        pacs.start()
        edge.start()
        if args.profile:
            profiler = start_profiler(edge, args.profile)
        for label, spec in inputs.items():
            plan = [("latency", 1, args.images)] + [("throughput", s, args.throughput_images)
                                                   for s in args.senders if args.throughput_images]
            for mode, senders, n in plan:
                folder = workdir / "send" / f"{label}-{mode}-{senders}"
                warm = stamp_copies(spec["path"], folder / "warm", 1) if mode == "latency" else []
                if warm:   # first image of a kind pays for lazy decoder set-up: not measured
                    run_one(label, "latency", 1, warm, edge, pacs, args.timeout, spec["storescu"])
                copies = stamp_copies(spec["path"], folder, n)
                run = run_one(label, mode, senders, copies, edge, pacs, args.timeout, spec["storescu"],
                              floor=floor if mode == "latency" and not args.no_floor else None,
                              template=spec["path"])
                run.update(transfer_syntax=spec["syntax"], file_mb=spec["mb"], source=spec["origin"],
                           warmup_images=len(warm))
                if warm:   # the warm-up image must not be lost or duplicated either
                    lost, dup, problems = check_images(warm, pacs, wait_journal(edge.journal_path,
                                                                                [warm[0]["sop"]]))
                    run["lost"] += lost
                    run["duplicated"] += dup
                    run["problems"] += problems
                runs.append(run)
                logger.info("%s %s x%d: %d images, first byte p50 %s p99 %s ms, floor %s ms, lost %d, "
                            "duplicated %d", label, mode, senders, n, run["first_byte_ms"].get("p50"),
                            run["first_byte_ms"].get("p99"), run.get("floor_ms", {}).get("p50"), run["lost"],
                            run["duplicated"])
                for p in folder.rglob("*.dcm"):
                    p.unlink()
        time.sleep(1.0)          # a late duplicate would arrive now
        pacs.collect()
        return runs, final_check(runs, pacs), edge.log_tail()
    finally:
        edge.stop()
        pacs.stop()
        if profiler is not None:
            stop_profiler(profiler, args.profile)


def pct_subset(bare: dict[str, Any]) -> dict[str, float]:
    return {k: bare[k] for k in ("p50", "p95") if k in bare}


def final_check(runs: list[dict], pacs) -> dict[str, Any]:
    """After every run: no result object at the PACS twice, nothing unexpected."""
    counts = Counter(a.sop for arr in pacs.arrivals.values() for a in arr if a.sop_class in RESULT_CLASSES)
    twice = [s for s, n in counts.items() if n > 1]
    expected = 3 * sum(r["images"] + r.get("warmup_images", 0) for r in runs)
    problems = [f"result {s} arrived {counts[s]} times" for s in twice[:20]]
    if len(counts) != expected:
        problems.append(f"{len(counts)} distinct result objects at the PACS, expected {expected}")
    return {"result_objects": len(counts), "expected": expected, "problems": problems}


# ---------------------------------------------------------------- output

def _fmt(v: Any, nd: int = 1) -> str:
    return "-" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def _tables(report: dict[str, Any]) -> tuple[list[str], list[list[str]], list[str], list[list[str]]]:
    """(header, rows) of the main table and of the per-stage p50 table (latency runs)."""
    head = ["input", "mode", "senders", "images", "first byte p50", "p95", "p99", "max", "floor p50",
            "(hop + inference)", "floor ratio", "after ack p50", "img/min", "peak RSS MB", "lost", "dup"]
    rows = []
    for r in report["runs"]:
        fb, fl = r.get("first_byte_ms") or {}, r.get("floor_ms") or {}
        rows.append([r["input"], r["mode"], str(r["senders"]), str(r["images"]), _fmt(fb.get("p50")),
                     _fmt(fb.get("p95")), _fmt(fb.get("p99")), _fmt(fb.get("max")), _fmt(fl.get("p50")),
                     f"{_fmt(fl.get('hop_p50'))} + {_fmt(fl.get('inference_p50'))}" if fl else "-",
                     _fmt(r.get("floor_ratio"), 2), _fmt(r["e2e_ms"].get("p50")), _fmt(r["throughput_per_min"]),
                     _fmt(r["peak_rss_mb"]), str(r["lost"]), str(r["duplicated"])])
    shead = ["input", *STAGES[:-1], "slowest"]
    srows = []
    for r in report["runs"]:
        if r["mode"] != "latency":
            continue
        st = r["stages_ms"]
        srows.append([r["input"], *[_fmt(st.get(s, {}).get("p50")) for s in STAGES[:-1]], slowest_stage(r)])
    return head, rows, shead, srows


def _segment_table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """p50 of each segment of the path from the first byte (``image_trace``), every run."""
    head = ["input", "mode", "senders", *TRACE_SEGMENTS]
    rows = [[r["input"], r["mode"], str(r["senders"]),
             *[_fmt((r.get("segments_p50_ms") or {}).get(k)) for k in TRACE_SEGMENTS]] for r in report["runs"]]
    return head, rows


def _cpu_table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """CPU per image by process in the throughput runs, the images/min that CPU allows on
    this machine's cores, and the p95 an ideal machine would give with the run's arrivals."""
    head = ["input", "senders", "edge", "PACS", "modality", "benchmark", "total", "CPU-bound img/min",
            "ideal p95 (edge alone)", "ideal p95 (all)", "measured p95"]
    rows = []
    for r in report["runs"]:
        cpu, bound = r.get("cpu_ms_per_image") or {}, r.get("cpu_bound_first_byte_ms")
        if r["mode"] != "throughput" or not bound or not cpu.get("total"):
            continue
        rows.append([r["input"], str(r["senders"]), *[_fmt(cpu.get(k)) for k in
                                                       ("edge", "pacs", "modality", "benchmark", "total")],
                     _fmt(r["cores"] * 60000.0 / cpu["total"]), _fmt(bound["edge"].get("p95")),
                     _fmt(bound["all"].get("p95")), _fmt((r.get("first_byte_ms") or {}).get("p95"))])
    return head, rows


def _outlier_table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Every image slower than 2x its run's median, its cause and its whole trace."""
    head = ["run", "image", "first byte", "run median", "cause", "excess", *TRACE_SEGMENTS, "detail"]
    rows = []
    for r in report["runs"]:
        for o in r.get("outliers", []):
            detail = ", ".join(f"{k} {v:g}" for k, v in sorted(o.get("detail_ms", {}).items()))
            rows.append([f"{r['input']} {r['mode']} x{r['senders']}", "…" + o["sop"][-6:],
                         _fmt(o["first_byte_ms"]), _fmt(o["median_ms"]), f"**{o['cause']}**",
                         f"+{o['cause_excess_ms']:.0f}", *[_fmt(o["segments_ms"].get(k)) for k in TRACE_SEGMENTS],
                         detail or "-"])
    return head, rows


def slowest_stage(run: dict[str, Any]) -> str:
    st = {s: run["stages_ms"][s]["p50"] for s in PART_STAGES if s in run["stages_ms"]}
    return max(st, key=st.get) if st else "-"


def _text_table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(head), "-" * len(line(head)), *map(line, rows)])


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|",
                      *["| " + " | ".join(r) + " |" for r in rows]])


def _summary_lines(report: dict[str, Any]) -> list[str]:
    bare = report["bare_inference_ms"]
    models = ", ".join(f"{m['name']} {m['version']} ({m['backend']}, input {m['input'][0]}x{m['input'][1]})"
                       for m in report["models"])
    return [f"machine: {report['machine']}", f"models: {models} from {report['models_dir']}",
            f"bare inference of both models: p50 {_fmt(bare.get('p50'), 2)} ms, p95 {_fmt(bare.get('p95'), 2)} ms"
            f" ({bare['runs']} runs)", f"PACS: {report['pacs']} (DCMTK peers with "
            f"{'TCP_NODELAY=1' if report['peer_tcp_nodelay'] else 'Nagle on, their default'}); "
            f"date: {report['date']}; load average "
            f"(1 min) {report['load_average']['before'][0]} before, {report['load_average']['after'][0]} after"
            + ("; OTHER PROCESSES WERE BUSY before the start: timings are pessimistic"
               if report["load_average"]["before"][0] > 0.5 * report["machine_details"]["cores"] else ""),
            f"command: {report['command']}"]


def _target_lines(report: dict[str, Any]) -> list[str]:
    return [f"{'PASS' if t['pass'] else 'MISS'}  {t['target']}: {t['value']} (margin {t['margin']})"
            + (f"; stage: {t['stage']}" if t.get("stage") else "") for t in report["targets"]]


def render_text(report: dict[str, Any]) -> str:
    head, rows, shead, srows = _tables(report)
    out = ["", *_summary_lines(report), "", "end to end (ms), throughput (images/min), peak RSS of edge serve",
           _text_table(head, rows), "", "per-stage p50 (ms), latency runs", _text_table(shead, srows), "",
           "path from the first byte, p50 per segment (ms)", _text_table(*_segment_table(report))]
    chead, crows = _cpu_table(report)
    if crows:
        out += ["", "CPU ms per image, throughput runs", _text_table(chead, crows)]
    ohead, orows = _outlier_table(report)
    if orows:
        out += ["", "outliers (first byte > 2x the run's median)", _text_table(ohead, orows)]
    out += ["", "targets", *_target_lines(report)]
    problems = [p for r in report["runs"] for p in r["problems"]] + report["final_check"]["problems"]
    if problems:
        out += ["", "PROBLEMS", *problems]
    return "\n".join(out) + "\n"


def _detail_section(report: dict[str, Any]) -> list[str]:
    """The appliance's finer timings, p50 per run."""
    lines = ["Finer timings from the appliance, p50 (ms): `store_checks` parse and DICOM checks, "
             "`store_digest` SHA-256 (and any wait for the same UID), `store_write` write + fsync of "
             "the spool file, `store_gc`/`gc` garbage collection during the store/analysis, "
             "`report_cpu` CPU time of the analysis thread while reporting, `report_sr_wait` wait for "
             "the SR from its child process, `report_write` durable write of the results, "
             "`deliver_associate`/`deliver_stores` association and C-STOREs of the image's objects "
             "(`deliver_sr`/`_gsps`/`_sc` each C-STORE's round trip, the PACS's work included), "
             "`to_pacs_other` the rest of `to_pacs` (outbox wake-up, journal):", ""]
    for r in report["runs"]:
        d = r.get("detail_p50_ms") or {}
        if d:
            lines.append(f"- {r['input']} {r['mode']} x{r['senders']}: "
                         + ", ".join(f"{k} {v:g}" for k, v in sorted(d.items())))
    return lines + [""] if len(lines) > 2 else []


def _cpu_section(report: dict[str, Any]) -> list[str]:
    head, rows = _cpu_table(report)
    if not rows:
        return []
    return ["CPU per image (ms, user + system) in the throughput runs: `edge` the appliance with its "
            "decoder and SR child processes, `PACS` Orthanc, `modality` the `storescu` runs, `benchmark` "
            "this process (polls); all share this machine's cores. `CPU-bound img/min`: what that CPU "
            "allows with every core busy. `ideal p95`: the first-byte p95 of a machine that needs only "
            "that CPU per image, perfectly parallel, with the run's own arrival times "
            "(`benchmarks.e2e_trace.cpu_bound_ms`): the appliance's work alone (the PACS and the "
            "modality elsewhere, as at a site), and everything on this machine.", "", _md_table(head, rows), ""]


def _outlier_section(report: dict[str, Any]) -> list[str]:
    head, rows = _outlier_table(report)
    intro = ("Outliers: every image slower than 2x its run's median first-byte time, with its whole "
             "trace (ms); `cause` is the segment that exceeds its own run median by the most, "
             "`detail` the appliance's finer timings of that image.")
    if not rows:
        return [intro + " None in this run.", ""]
    return [intro, "", _md_table(head, rows), ""]


def render_markdown(report: dict[str, Any]) -> str:
    """RESULTS.md: generated by ``--write-results``; do not edit by hand."""
    head, rows, shead, srows = _tables(report)
    slow = Counter(r[-1] for r in srows)
    note = ", ".join(f"`{s}` in {n} of {len(srows)} latency runs" for s, n in slow.most_common())
    return "\n".join([
        "# End-to-end benchmark results", "",
        "Generated by `python -m benchmarks.e2e --write-results`; do not edit by hand.", "",
        *[f"- {line}" for line in _summary_lines(report)], "",
        "First byte: the modality's `storescu` started -> last of the image's SR, GSPS and SC seen at the "
        "PACS (polled every 10 ms); latency runs send one image at a time, throughput runs have "
        "`senders` modalities each sending its images one after the other (one association per image). "
        "Floor, measured in the same run before each latency image: one `storescu` hop of a copy of the "
        "same file straight to the same PACS (start -> exit) + bare inference of both models in the "
        "benchmark process; `floor ratio` = first-byte p50 / floor p50. `after ack`: `storescu` "
        "returned (latency) or journal `received_at` (throughput) -> last result at the PACS.", "",
        _md_table(head, rows), "", "Path from the first byte, p50 per segment (ms): `connect` storescu start, "
        "association and command, `transfer` the data set on the wire (first data byte at the box -> "
        "handler), `store` the box's C-STORE handler (parse and checks, digest, durable write), `ack` "
        "journal commit of the instance -> storescu exited, `queue` -> analysis start, the analysis "
        "stages, `to_pacs` analysis journaled -> last result answered by the PACS, `seen` -> the poll "
        "saw it:", "", _md_table(*_segment_table(report)), "", *_detail_section(report),
        *_cpu_section(report), *_outlier_section(report),
        "Per-stage p50 (ms) from the appliance journal, latency runs "
        "(`untimed`: analysis total minus its timed parts, mostly reading the stored file; `queue`: received -> "
        "analysis start, plus the journal commit; `to_pacs`: analyzed -> last result sent):", "",
        _md_table(shead, srows), "", f"Slowest stage: {note or 'not measured'}.", "", "Targets:", "",
        *[f"- {line}" for line in _target_lines(report)], ""])


#: sections of RESULTS.md that other benchmarks maintain (benchmarks.model_eval), kept as they are
_OTHER_SECTIONS = re.compile(r"<!-- (\w+):begin -->.*?<!-- \1:end -->", re.S)


def write_results(report: dict[str, Any], path: Path = RESULTS_MD) -> None:
    """Rewrite the end-to-end part of RESULTS.md; sections other benchmarks own stay."""
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    kept = [m.group(0) for m in _OTHER_SECTIONS.finditer(old)]
    text = render_markdown(report).rstrip() + "\n"
    if kept:
        text += "\n" + "\n\n".join(kept) + "\n"
    path.write_text(text, encoding="utf-8")


def _parse_list(text: str, kind=str) -> list:
    try:
        return [kind(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"bad list {text!r}: {exc}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.e2e", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="2k only, uncompressed and JPEG 2000, a few images each (under a minute)")
    p.add_argument("--backend", choices=("auto", "onnxruntime", "tensorrt"), default="auto",
                   help="models.backend of the appliance and of the bare-inference comparison")
    p.add_argument("--models-dir", type=Path, default=None,
                   help="model folders (default: the shipped engines/models)")
    p.add_argument("--pacs", choices=("orthanc", "storescp"), default="orthanc")
    p.add_argument("--json", type=Path, default=None, help="write the report as JSON here")
    p.add_argument("--write-results", action="store_true", help=f"regenerate {RESULTS_MD.name} (full runs only)")
    p.add_argument("--sizes", type=lambda s: _parse_list(s, int), default=None, help="image sides, e.g. 2048,3072")
    p.add_argument("--inputs", type=_parse_list, default=None, help="forms: raw,jpeg-ll,j2k")
    p.add_argument("--images", type=int, default=None, help="images per latency run")
    p.add_argument("--throughput-images", type=int, default=None, help="images per throughput run (0: none)")
    p.add_argument("--senders", type=lambda s: _parse_list(s, int), default=[1, 4])
    p.add_argument("--bare-runs", type=int, default=None, help="bare inference repetitions")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for an image's results")
    p.add_argument("--peer-nagle", action="store_true",
                   help="leave Nagle's algorithm on in the DCMTK peers (their default): slower delivery")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, storage)")
    p.add_argument("--profile", type=Path, default=None,
                   help="sample edge serve with py-spy during the runs; collapsed stacks to this file")
    p.add_argument("--no-floor", action="store_true",
                   help="skip the floor samples (one storescu hop to the PACS before each latency image)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    quick = args.quick
    args.sizes = args.sizes or ([2048] if quick else [2048, 3072])
    args.inputs = args.inputs or (["raw", "j2k"] if quick else ["raw", "jpeg-ll", "j2k"])
    args.images = args.images if args.images is not None else (5 if quick else 20)
    args.throughput_images = args.throughput_images if args.throughput_images is not None else (6 if quick else 16)
    args.bare_runs = args.bare_runs or (15 if quick else 40)
    if args.images < 1 or args.throughput_images < 0 or min(args.senders) < 1 or min(args.sizes) < 64:
        parser.error("--images must be >= 1, --throughput-images >= 0, --senders >= 1, --sizes >= 64")
    if args.write_results and quick:
        parser.error("--write-results records full runs only; drop --quick")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("openjpeg").setLevel(logging.WARNING)     # "tile number 1 / 1"
    from engines.manifest import ManifestError

    tmp = Path(tempfile.mkdtemp(prefix="edge-bench-"))
    try:
        report = run_benchmark(args, tmp)
    except (ManifestError, RuntimeError, TimeoutError, OSError, subprocess.CalledProcessError) as exc:
        print(f"error: the benchmark could not run: {exc}\n(models: --models-dir; logs: rerun with --keep)",
              file=sys.stderr)
        return 2
    finally:
        if args.keep:
            logger.info("kept %s", tmp)
        else:
            subprocess.run(["rm", "-rf", str(tmp)], check=False)
    print(render_text(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    failed = bool(report["lost"] or report["duplicated"] or report["final_check"]["problems"])
    if args.write_results and failed:
        logger.error("not writing %s: this run lost or duplicated images (see above)", RESULTS_MD)
    elif args.write_results:
        write_results(report)
        logger.info("wrote %s", RESULTS_MD)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
