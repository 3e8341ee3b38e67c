"""Local ONNX Runtime vs a shared Triton Inference Server, end to end, in one run.

    python -m benchmarks.triton_bench [--triton-url HOST:PORT] [--images N] [--json PATH]

Scenarios, each with real peers (storescu -> ``edge serve`` -> Orthanc, as benchmarks.e2e):

1. one box on local ONNX Runtime;
2. one box on Triton (gRPC);
3. two boxes sharing the Triton server, flooded at the same time.

Each box is timed one image at a time (latency: storescu returned -> last of its 3 results
at the PACS) and flooded (throughput). The round-trip cost per image is measured twice:
in the pipeline (the journal's per-model stage times on Triton minus those on ONNX
Runtime) and on the wire (each model's tensors to Triton and back, from the box's
``edge_triton_round_trip_seconds``, minus the server's own compute time from Triton's
``nv_inference_compute_infer_duration_us``). Without ``--triton-url`` the test server of
tests/support/triton.py is started (the nvidia-pytriton build, Python-backend wrappers of the
ONNX models on the CPU, ``make triton-server``): on one machine the server and the boxes
share the cores, so these numbers show the cost of the path, not a GPU hub's speed.
Exit status 1 if any image is lost or duplicated, 2 if the benchmark could not run.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import logging
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import requests

from benchmarks.e2e import (EdgeProcess, OrthancPeer, free_port, machine_info, make_inputs, run_one,
                            stamp_copies)

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]


def _test_server_module():
    """tests/support/triton.py, loaded by path (the benchmark does not import the test tree)."""
    spec = importlib.util.spec_from_file_location("edge_test_triton", ROOT / "tests" / "support" / "triton.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Box(EdgeProcess):
    """``edge serve`` on local ONNX Runtime or on Triton."""

    def __init__(self, workdir: Path, name: str, *, models_dir: Path, triton_url: str | None,
                 destination: dict[str, Any]) -> None:
        super().__init__(workdir / name, models_dir=models_dir,
                         backend="triton" if triton_url else "onnxruntime",
                         cache_dir=workdir / "engines", destination=destination)
        if triton_url:
            text = self.config.read_text().replace(
                'backend = "triton"', f'backend = "triton"\ntriton_url = "{triton_url}"\n'
                                      'triton_protocol = "grpc"\ntriton_timeout_s = 30.0')
            self.config.write_text(text)

    def scrape(self) -> str:
        return requests.get(f"http://127.0.0.1:{self.web_port}/metrics", timeout=5).text


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _scenario(name: str, boxes: list[Box], pacs: list[OrthancPeer], template: Path, images: int,
              flood: int, senders: int, workdir: Path) -> dict[str, Any]:
    """Latency (one box at a time) and throughput (all boxes flooded at once)."""
    out: dict[str, Any] = {"scenario": name, "boxes": len(boxes), "latency": [], "throughput": []}
    for i, (box, peer) in enumerate(zip(boxes, pacs)):
        warm = stamp_copies(template, workdir / name / f"warm{i}", 1)
        run_one(name, "latency", 1, warm, box, peer, 120, ["-R"])
        copies = stamp_copies(template, workdir / name / f"lat{i}", images)
        out["latency"].append(run_one(name, "latency", 1, copies, box, peer, 120, ["-R"]))
    results: list[dict[str, Any]] = [{} for _ in boxes]
    started = time.time()

    def flood_box(i: int) -> None:
        copies = stamp_copies(template, workdir / name / f"flood{i}", flood)
        results[i] = run_one(name, "throughput", senders, copies, boxes[i], pacs[i], 120, ["-R"])
    threads = [threading.Thread(target=flood_box, args=(i,)) for i in range(len(boxes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = max(r.get("wall_s", 0.0) for r in results) or (time.time() - started)
    out["throughput"] = results
    out["aggregate_per_min"] = round(sum(r["images"] for r in results) / wall * 60.0, 1)
    out["lost"] = sum(r["lost"] for r in out["latency"] + results)
    out["duplicated"] = sum(r["duplicated"] for r in out["latency"] + results)
    return out


def _stage_p50(run: dict[str, Any], stage: str) -> float | None:
    return run.get("stages_ms", {}).get(stage, {}).get("p50")


def _server_metrics(url: str | None) -> str:
    return requests.get(url, timeout=5).text if url else ""


def _wire_cost(boxes: list[Box], server: str, before: str) -> dict[str, Any]:
    """Mean client round trip per model (all boxes of the scenario) and the server's compute
    and queue time per request during the scenario (``server`` minus ``before``)."""
    out: dict[str, Any] = {}
    texts = [b.scrape() for b in boxes]
    for model in ("tb_classifier", "nodule_detector"):
        rtt_sum = sum(_metric(t, "edge_triton_round_trip_seconds_sum", model=model) for t in texts)
        rtt_n = sum(_metric(t, "edge_triton_round_trip_seconds_count", model=model) for t in texts)
        entry: dict[str, Any] = {"requests": int(rtt_n),
                                 "client_round_trip_ms": round(rtt_sum / rtt_n * 1000.0, 2) if rtt_n else None}
        if server:
            def delta(name: str) -> float:
                return _metric(server, name, model=model) - _metric(before, name, model=model)
            n = delta("nv_inference_request_success")
            compute = delta("nv_inference_compute_infer_duration_us")
            queue = delta("nv_inference_queue_duration_us")
            execs = delta("nv_inference_exec_count")
            inferences = delta("nv_inference_count")
            if n:
                entry["server_compute_ms"] = round(compute / n / 1000.0, 2)
                entry["server_queue_ms"] = round(queue / n / 1000.0, 2)
                entry["mean_batch_size"] = round(inferences / execs, 2) if execs else None
                if entry["client_round_trip_ms"] is not None:
                    entry["transport_ms"] = round(entry["client_round_trip_ms"] - entry["server_compute_ms"]
                                                  - entry["server_queue_ms"], 2)
        out[model] = entry
    return out


def run_benchmark(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from engines import DEFAULT_MODELS_DIR

    models_dir = Path(DEFAULT_MODELS_DIR)
    template = next(iter(make_inputs(workdir / "inputs", [args.size], ["raw"]).values()))["path"]
    env = dict(os.environ, TCP_NODELAY="1")
    server = None
    url, metrics_url, server_kind = args.triton_url, args.triton_metrics_url, "given"
    if url is None:
        support = _test_server_module()
        missing = support.server_missing()
        if missing:
            raise RuntimeError(missing)
        repo = support.write_python_repository(models_dir, workdir / "triton-repo")
        server = support.TritonServer(repo, workdir / "tritonserver.log", http_port=free_port(),
                                      grpc_port=free_port(), metrics_port=free_port()).start()
        url, metrics_url = server.grpc_url, f"http://127.0.0.1:{server.metrics_port}/metrics"
        server_kind = "tests/support/triton.py: nvidia-pytriton tritonserver, Python backend wrapping onnxruntime (CPU)"
    scenarios = []
    peers: list[OrthancPeer] = []
    boxes: list[Box] = []
    try:
        for i in range(2):
            peer = OrthancPeer(workdir / f"pacs{i}", env)
            peer.start()
            peers.append(peer)
        plan = [("local onnxruntime, 1 box", [None]), ("triton, 1 box", [url]),
                ("triton, 2 boxes sharing it", [url, url])]
        for name, urls in plan:
            boxes = [Box(workdir / re.sub(r"\W+", "_", name), f"box{i}", models_dir=models_dir,
                         triton_url=u, destination=peers[i].destination()) for i, u in enumerate(urls)]
            for box in boxes:
                box.start()
            logger.info("scenario %s", name)
            before = _server_metrics(metrics_url)
            result = _scenario(re.sub(r"\W+", "_", name), boxes, peers, template, args.images,
                               args.flood, args.senders, workdir)
            result["name"] = name
            result["backends"] = sorted({b for r in result["latency"] + result["throughput"]
                                         for b in r["runner"]})
            if urls[0]:
                result["round_trip"] = _wire_cost(boxes, _server_metrics(metrics_url), before)
            scenarios.append(result)
            for box in boxes:
                box.stop()
            boxes = []
    finally:
        for box in boxes:
            box.stop()
        for peer in peers:
            peer.stop()
        if server is not None:
            server.stop()
    local = scenarios[0]["latency"][0]
    remote = scenarios[1]["latency"][0]
    pipeline_cost = {}
    for stage in ("tb", "nodule"):
        a, b = _stage_p50(remote, stage), _stage_p50(local, stage)
        pipeline_cost[stage] = {"local_p50_ms": b, "triton_p50_ms": a,
                                "extra_ms": round(a - b, 2) if a is not None and b is not None else None}
    info = machine_info(", ".join(sorted({b for s in scenarios for b in s["backends"]})))
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": "python -m benchmarks.triton_bench " + " ".join(args.argv),
            "machine": info["summary"], "triton_server": server_kind, "image": f"{args.size} px wide, uncompressed",
            "scenarios": scenarios, "pipeline_round_trip_cost_ms": pipeline_cost,
            "lost": sum(s["lost"] for s in scenarios), "duplicated": sum(s["duplicated"] for s in scenarios)}


def render_text(report: dict[str, Any]) -> str:
    lines = [f"{report['date']}  {report['machine']}", f"Triton: {report['triton_server']}",
             f"image: {report['image']}", "",
             f"{'scenario':30} {'e2e p50 ms':>10} {'e2e p95 ms':>10} {'flood /min':>10}  backends"]
    for s in report["scenarios"]:
        lat = s["latency"]
        p50 = "/".join(str(r["e2e_ms"].get("p50", "-")) for r in lat)
        p95 = "/".join(str(r["e2e_ms"].get("p95", "-")) for r in lat)
        lines.append(f"{s['name']:30} {p50:>10} {p95:>10} {s['aggregate_per_min']:>10}  {', '.join(s['backends'])}")
    lines.append("")
    lines.append("round trip per image, in the pipeline (p50 of the model stage, Triton minus local):")
    for stage, c in report["pipeline_round_trip_cost_ms"].items():
        lines.append(f"  {stage}: local {c['local_p50_ms']} ms, Triton {c['triton_p50_ms']} ms, extra {c['extra_ms']} ms")
    for s in report["scenarios"]:
        for model, c in (s.get("round_trip") or {}).items():
            lines.append(f"  {s['name']}: {model}: client round trip {c.get('client_round_trip_ms')} ms = server "
                         f"compute {c.get('server_compute_ms')} + queue {c.get('server_queue_ms')} + transport "
                         f"{c.get('transport_ms')} ms (mean batch {c.get('mean_batch_size')}, {c['requests']} requests)")
    lines.append(f"lost {report['lost']}, duplicated {report['duplicated']}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.triton_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--triton-url", help="a running Triton server (gRPC host:port) serving the exported "
                   "models; default: start the test server")
    p.add_argument("--triton-metrics-url", help="its metrics, e.g. http://host:8002/metrics")
    p.add_argument("--images", type=int, default=8, help="latency images per box (default 8)")
    p.add_argument("--flood", type=int, default=12, help="throughput images per box (default 12)")
    p.add_argument("--senders", type=int, default=2, help="concurrent storescu per box when flooding")
    p.add_argument("--size", type=int, default=2048, help="image width in pixels (default 2048)")
    p.add_argument("--json", type=Path, help="write the report as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    with tempfile.TemporaryDirectory(prefix="triton-bench-") as tmp:
        try:
            report = run_benchmark(args, Path(tmp))
        except (RuntimeError, OSError) as exc:
            print(f"triton_bench: cannot run: {exc}", file=sys.stderr)
            return 2
    print(render_text(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 1 if report["lost"] or report["duplicated"] else 0


if __name__ == "__main__":
    sys.exit(main())
