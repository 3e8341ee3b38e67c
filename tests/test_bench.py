"""The end-to-end benchmark (benchmarks/e2e.py): its checks, and its core against real peers."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, require_tool

if str(ROOT) not in sys.path:          # benchmarks/ is a folder of the checkout, not installed
    sys.path.insert(0, str(ROOT))

from benchmarks import e2e  # noqa: E402

SR, GSPS, SC = "1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.11.1", "1.2.840.10008.5.1.4.1.1.7"


class Seen:
    """What a PACS peer exposes to the checks: arrivals filed by study."""

    def __init__(self) -> None:
        self.arrivals: dict[str, list[e2e.Arrival]] = {}

    def add(self, study: str, sop_class: str, sop: str, t: float = 1.0) -> None:
        self.arrivals.setdefault(study, []).append(e2e.Arrival(t, sop_class, sop, f"k{len(self.arrivals)}"))


def _journal(state="analyzed", attempts=1, delivery_attempts=(1, 1, 1)) -> dict:
    return {"state": state, "attempts": attempts, "received_at": 0.0, "analyzed_at": 0.5, "timings": {},
            "findings": None, "deliveries": [{"type": t, "state": "sent", "attempts": a, "sent_at": 0.9}
                                             for t, a in zip(("sr", "gsps", "sc"), delivery_attempts)]}


def test_check_images_counts_lost_and_duplicated_results():
    pacs = Seen()
    images = [{"sop": f"1.{i}", "study": f"2.{i}", "sent_ok": True} for i in range(5)]
    for i in range(5):
        for cls, sop in ((SR, f"3.{i}.1"), (GSPS, f"3.{i}.2"), (SC, f"3.{i}.3")):
            if (i, cls) != (1, SC):                 # image 1: its SC never arrived
                pacs.add(f"2.{i}", cls, sop)
    pacs.add("2.2", SR, "3.2.9")                   # image 2: a second SR
    recs = {f"1.{i}": _journal() for i in range(5)}
    recs["1.3"] = _journal(attempts=2)             # image 3: analyzed twice
    recs["1.4"] = _journal(delivery_attempts=(1, 2, 1))   # image 4: GSPS sent twice
    lost, dup, problems = e2e.check_images(images, pacs, recs)
    assert (lost, dup) == (1, 3)
    assert any("1.1: lost" in p and "sc" in p for p in problems)
    images[0]["sent_ok"] = False                   # storescu failed: the image never arrived
    assert e2e.check_images(images, pacs, recs)[:2] == (2, 3)


def test_targets_pass_and_miss_with_margins():
    run = {"input": "2k-j2k", "mode": "latency", "senders": 1, "e2e_ms": {"p50": 150.0},
           "first_byte_ms": {"p50": 260.0, "p95": 700.0, "p99": 900.0}, "floor_ms": {"p50": 200.0},
           "segments_p50_ms": {"report": 40.0, "to_pacs": 30.0, "decode": 10.0}, "outliers": []}
    flood = {"input": "2k-j2k", "mode": "throughput", "senders": 4, "e2e_ms": {"p50": 400.0},
             "first_byte_ms": {"p50": 500.0, "p95": 950.0}, "segments_p50_ms": {"queue": 300.0}}
    report = {"runs": [run, flood], "lost": 0, "duplicated": 0, "final_check": {"problems": []}}
    targets = {t["target"]: t for t in e2e.evaluate_targets(report)}
    assert len(targets) == 4
    ratio = targets["2k-j2k: first-byte p50 <= 1.3 x floor (200 ms)"]
    assert ratio["pass"] and ratio["value"] == pytest.approx(1.3) and ratio["margin"] == "+0.00 x (+0.0 ms)"
    tail = targets["2k-j2k: first-byte p99 < 1000 ms"]
    assert tail["pass"] and tail["margin"] == "+100.0 ms"
    assert targets["2k-j2k: 4 senders, first-byte p95 < 1000 ms"]["pass"]
    assert targets["no image lost, no result duplicated (all runs)"]["pass"]
    run["first_byte_ms"].update(p50=300.0, p99=1100.0)
    run["outliers"] = [{"cause": "to_pacs"}]
    flood["first_byte_ms"]["p95"] = 1200.0
    report["lost"] = 1
    missed = e2e.evaluate_targets(report)
    assert not any(t["pass"] for t in missed)
    stages = {t["target"]: t.get("stage") for t in missed}
    assert stages["2k-j2k: first-byte p50 <= 1.3 x floor (200 ms)"].startswith("beyond the floor: report 40 ms")
    assert stages["2k-j2k: first-byte p99 < 1000 ms"] == "outliers: to_pacs (1x)"
    assert "queue 300 ms" in stages["2k-j2k: 4 senders, first-byte p95 < 1000 ms"]


def test_outlier_traces_name_the_segment_that_grew():
    def trace(total: float, **segments: float) -> dict:
        return {"sop": "1.2", "first_byte_ms": total, "segments_ms": segments, "events_ms": {}, "detail_ms": {}}
    traces = [trace(200.0, store=20.0, report=50.0) for _ in range(5)] + [trace(900.0, store=700.0, report=55.0)]
    out = e2e.outlier_traces(traces)
    assert len(out) == 1 and out[0]["cause"] == "store" and out[0]["cause_excess_ms"] == 680.0
    assert out[0]["median_ms"] == 200.0


def _models_dir(tmp_path: Path) -> Path:
    """The shipped models when present, else the tiny stand-ins of test_engines."""
    from engines import DEFAULT_MODELS_DIR
    if any(Path(DEFAULT_MODELS_DIR).glob("*/manifest.toml")):
        return Path(DEFAULT_MODELS_DIR)
    from test_engines import make_classifier, make_detector
    make_classifier(tmp_path / "models")
    make_detector(tmp_path / "models")
    return tmp_path / "models"


@pytest.mark.slow
@pytest.mark.parametrize("pacs, forms, throughput", [("orthanc", "raw,j2k", "2"), ("storescp", "jpeg-ll", "0")])
def test_benchmark_core_reports_every_run_without_loss(tmp_path, capsys, pacs, forms, throughput):
    require_tool("storescu")
    require_tool("storescp" if pacs == "storescp" else "Orthanc")
    if "jpeg-ll" in forms:
        require_tool("dcmcjpeg")
    out = tmp_path / "bench.json"
    rc = e2e.main(["--sizes", "1152", "--inputs", forms, "--images", "2", "--throughput-images", throughput,
                   "--senders", "2", "--bare-runs", "3", "--pacs", pacs, "--models-dir",
                   str(_models_dir(tmp_path)), "--json", str(out)])
    assert rc == 0, capsys.readouterr().out[-3000:]
    report = json.loads(out.read_text())
    assert "cores" in report["machine"] and "runner: onnxruntime" in report["machine"]
    assert report["lost"] == report["duplicated"] == 0 and not report["final_check"]["problems"]
    expected = [(f"1152-{f}", "latency", 1) for f in forms.split(",")]
    if throughput != "0":
        expected = [x for f in forms.split(",") for x in ((f"1152-{f}", "latency", 1), (f"1152-{f}", "throughput", 2))]
    assert [(r["input"], r["mode"], r["senders"]) for r in report["runs"]] == expected
    for run in report["runs"]:
        assert run["lost"] == run["duplicated"] == 0
        assert run["images"] == (2 if run["mode"] == "latency" else int(throughput))
        e2e_ms = run["e2e_ms"]
        assert 0 < e2e_ms["p50"] <= e2e_ms["p95"] <= e2e_ms["p99"] < 60_000
        first = run["first_byte_ms"]
        assert e2e_ms["p50"] < first["p50"] <= first["p95"] <= first["p99"] <= first["max"] < 60_000
        assert set(run["segments_p50_ms"]) == set(e2e.TRACE_SEGMENTS)
        if run["mode"] == "latency":   # the floor, measured in the same run
            floor = run["floor_ms"]
            assert floor["samples"] == 2 and floor["p50"] == pytest.approx(floor["hop_p50"] + floor["inference_p50"])
            assert run["floor_ratio"] == pytest.approx(first["p50"] / floor["p50"], rel=1e-2)
        for stage in ("store", "decode", "tb", "nodule", "report", "deliver"):
            assert 0 <= run["stages_ms"][stage]["p50"] <= run["stages_ms"][stage]["p95"]
        assert run["bare_inference_ms"]["p50"] > 0
        assert run["ratio"] == pytest.approx(e2e_ms["p50"] / run["bare_inference_ms"]["p50"], rel=1e-2)
        assert run["throughput_per_min"] > 0 and run["peak_rss_mb"] > 50
        assert run["runner"] == ["onnxruntime"]
        cpu = run["cpu_ms_per_image"]   # the appliance analysed every image: it used CPU
        assert cpu["edge"] > 0 and cpu["total"] == pytest.approx(sum(v for k, v in cpu.items() if k != "total"),
                                                                 abs=0.5)
        if run["mode"] == "throughput":
            assert run["cores"] >= 1 and cpu["modality"] > 0 and cpu["pacs"] > 0
            bound = run["cpu_bound_first_byte_ms"]
            assert 0 < bound["edge"]["p95"] <= bound["all"]["p95"]
    # every image's three results reached the PACS: 3 per measured and warm-up image
    assert report["final_check"]["result_objects"] == 3 * sum(r["images"] + r["warmup_images"]
                                                              for r in report["runs"])
    text = capsys.readouterr().out
    assert "PASS  no image lost, no result duplicated" in text
    md = e2e.render_markdown(report)
    assert "| input | mode | senders |" in md and "Slowest stage: `" in md
    assert "floor ratio" in md and "Outliers:" in md
    if throughput != "0":
        assert "CPU per image (ms, user + system)" in md


def test_cpu_bound_latency_queues_the_work_of_images_arriving_together():
    # four images at once, 0.25 s of the whole machine each; a fifth after the queue drained
    assert e2e.cpu_bound_ms([10.0, 10.0, 10.0, 10.0, 12.0], 0.25) == pytest.approx([250, 500, 750, 1000, 250])


def test_cpu_of_a_process_tree_counts_its_children():
    """A parent that only waits, and its child that burns 0.3 s of CPU, then sleeps."""
    child = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\ntime.sleep(30)"
    waits = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}])"
    parent = subprocess.Popen([sys.executable, "-c", waits], start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while e2e.tree_cpu_s(parent.pid) < 0.3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert e2e.tree_cpu_s(parent.pid) >= 0.3
    finally:
        os.killpg(parent.pid, signal.SIGKILL)
        parent.wait()
