"""Inference on a shared Triton Inference Server (a real ``tritonserver``), with local fallback.

The server comes from the ``nvidia-pytriton`` wheel in its own venv (``make triton-server``);
it has no ONNX Runtime backend, so its repository wraps the ONNX models in Python-backend
models (tests/support/triton.py). The tests skip, saying why, when it is not installed.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from conftest import EdgeServer, OrthancPACS, free_port, make_dx, require_tool, wait_until
from support.triton import TritonServer, server_missing, write_python_repository

from edge.config import ConfigError, config_from_dict
from engines import DEFAULT_MODELS_DIR
from engines.manifest import load_manifest
from engines.runners.triton_runner import (TritonModelMismatch, TritonSettings, TritonUnavailable,
                                           check_server)
from engines.store import load_model, model_folders
from engines.triton_export import triton_version

MODELS = Path(DEFAULT_MODELS_DIR)
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
DASHBOARD = Path(__file__).resolve().parent.parent / "firmware_scripts" / "grafana-dashboard.json"
SR, GSPS, SC = "1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.11.1", "1.2.840.10008.5.1.4.1.1.7"

needs_server = pytest.mark.skipif(server_missing() is not None, reason=server_missing() or "")


def _start_server(tmp: Path, repo: Path) -> TritonServer:
    return TritonServer(repo, tmp / "tritonserver.log", http_port=free_port(), grpc_port=free_port(),
                        metrics_port=free_port()).start()


@pytest.fixture(scope="module")
def triton(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("triton")
    server = _start_server(tmp, write_python_repository(MODELS, tmp / "repo"))
    yield server
    server.kill()   # the test is over: no need to wait for a graceful unload


# ------------------------------------------------------------------ no server needed

def test_export_triton_writes_onnxruntime_and_tensorrt_repositories(tmp_path):
    out = tmp_path / "repo"
    proc = subprocess.run([sys.executable, "-m", "edge.cli", "engines", "export-triton", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for folder in model_folders(MODELS):
        manifest = load_manifest(folder)
        for platform in ("onnxruntime_onnx", "tensorrt_plan"):
            config = (out / platform / manifest.name / "config.pbtxt").read_text()
            assert f'platform: "{platform}"' in config
            number = triton_version(manifest.version)     # 0.2.0 is 2000
            assert f"version_policy: {{ specific: {{ versions: [ {number} ] }} }}" in config
            assert "dynamic_batching" in config and "max_batch_size: 8" in config
            assert f'string_value: "{manifest.sha256}"' in config
            assert (out / platform / manifest.name / str(number) / "model.onnx").is_file()
    assert "trtexec --onnx=" in (out / "README.txt").read_text()


def test_triton_config_errors_name_the_key():
    cases = {"models.triton_url": {"backend": "triton"},
             "models.triton_protocol": {"triton_url": "hub:8001", "triton_protocol": "udp"},
             "models.triton_timeout_s": {"triton_url": "hub:8001", "triton_timeout_s": -1}}
    for key, models in cases.items():
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            config_from_dict({"models": models})
    with pytest.raises(ConfigError, match="without a scheme"):
        config_from_dict({"models": {"triton_url": "grpc://hub:8001"}})
    cfg = config_from_dict({"models": {"backend": "triton", "triton_url": "hub:8001",
                                       "triton_headers": {"Authorization": "Bearer t"}}})
    settings = TritonSettings.from_config(cfg.models)
    assert settings.protocol == "grpc" and settings.fallback and settings.headers == (("authorization", "Bearer t"),)


def test_unreachable_triton_falls_back_or_refuses():
    settings = TritonSettings(url=f"127.0.0.1:{free_port()}", timeout_s=1.0, connect_timeout_s=1.0)
    folder = model_folders(MODELS)[0]
    model = load_model(folder, "triton", triton=settings)
    try:
        assert model.backend == "onnxruntime" and "unreachable" in model.runner.problem
        tensor = np.zeros(model.manifest.input.shape, np.float32)
        model.run(tensor)
        assert model.last_backend == "onnxruntime"
    finally:
        model.close()
    with pytest.raises(TritonUnavailable, match="triton_fallback is off"):
        load_model(folder, "triton", triton=dataclasses.replace(settings, fallback=False))


class _BadAnswers:
    """A Triton client stand-in that serves the manifest's model but answers wrong shapes."""

    def __init__(self, manifest) -> None:
        from engines.triton_export import triton_version
        self.manifest, self.version = manifest, str(triton_version(manifest.version))

    def server_live(self):
        return True

    def model_ready(self, name, version=""):
        return True

    def metadata(self, name):
        m = self.manifest
        return {"versions": [self.version], "inputs": [{"name": m.input.name}],
                "outputs": [{"name": o, "shape": [-1, 1]} for o in m.output_names]}

    def config(self, name):
        return {"max_batch_size": 8, "parameters": {"manifest_sha256": {"string_value": self.manifest.sha256}}}

    def infer(self, name, version, inputs, outputs):
        return {o: np.zeros((1, 7, 7, 7), np.float32) for o in outputs}

    def close(self):
        pass


def test_bad_triton_answer_is_not_decoded_but_analysed_locally():
    from engines.runners.onnxruntime_runner import OnnxRuntimeRunner
    from engines.manifest import read_verified_model
    from engines.runners.triton_runner import TritonWithFallback

    manifest = load_manifest(MODELS / "tb_classifier")
    settings = TritonSettings(url="hub:8001", retry_s=60.0)
    runner = TritonWithFallback(manifest, settings, lambda: OnnxRuntimeRunner(read_verified_model(manifest)),
                                client=_BadAnswers(manifest))
    try:
        assert runner.name == "triton"
        out = runner.run({manifest.input.name: np.zeros(manifest.input.shape, np.float32)})
        assert runner.last_backend == "onnxruntime" and out["tb_score"].shape == (1, 1)
        assert runner.stats.fallbacks["error"] == 1 and "of shape [1, 7, 7, 7]" in runner.problem
    finally:
        runner.close()


def test_triton_health_in_snapshot_and_metrics(tmp_path):
    """The health monitor's Triton check becomes warnings (not critical) and gauges."""
    from edge.config import Config, StorageConfig
    from edge.health import HealthMonitor
    from edge.journal import Journal
    from edge.metrics import Metrics

    config = Config(storage=StorageConfig(dir=str(tmp_path), min_free_mb=0))
    journal = Journal(config.journal_path)
    answer = {"url": "hub:8001", "reachable": True, "round_trip_ms": 4.0, "error": "",
              "models": [{"name": "tb_classifier", "ready": True},
                         {"name": "nodule_detector", "ready": False, "mismatch": True}]}
    monitor = HealthMonitor(config, journal, triton=lambda: answer)
    try:
        monitor.refresh()
        snap = monitor.snapshot()
        assert "triton_model_mismatch:nodule_detector" in snap["problems"] and not snap["critical"]
        metrics = Metrics()
        metrics.watch_journal(journal, config.storage_dir, health=monitor.snapshot)
        value = metrics.registry.get_sample_value
        assert value("edge_triton_up") == 1.0
        assert value("edge_triton_model_ready", {"model": "nodule_detector"}) == 0.0
        assert value("edge_triton_probe_round_trip_seconds") == pytest.approx(0.004)
        answer.update(reachable=False, models=[])
        monitor.refresh()
        assert "triton_unreachable" in monitor.snapshot()["problems"]
        assert value("edge_triton_up") == 0.0

        def broken():
            raise ValueError("bad answer")
        monitor.triton = broken   # a bad answer never crashes the checks
        monitor.refresh()
        assert "triton_unreachable" in monitor.snapshot()["problems"]
    finally:
        journal.close()


# ------------------------------------------------------------------ with a real tritonserver

@needs_server
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_triton_outputs_equal_onnxruntime(triton, protocol):
    url = triton.grpc_url if protocol == "grpc" else triton.http_url
    settings = TritonSettings(url=url, protocol=protocol, timeout_s=10.0)
    rng = np.random.default_rng(1)
    for folder in model_folders(MODELS):
        remote = load_model(folder, "triton", triton=settings)
        local = load_model(folder, "onnxruntime")
        try:
            assert remote.backend == "triton", remote.backend_reason
            tensor = rng.normal(size=remote.manifest.input.shape).astype(np.float32)
            got, want = remote.run(tensor), local.run(tensor)
            assert remote.last_backend == "triton"
            assert set(got) >= set(remote.manifest.output_names)
            for name in remote.manifest.output_names:
                np.testing.assert_allclose(got[name], want[name], atol=1e-5, rtol=1e-5)
            assert remote.runner.stats.runs["triton"] == 1 and remote.runner.stats.round_trip_count == 1
        finally:
            remote.close()
            local.close()


@needs_server
def test_echo_triton(triton, tmp_path):
    srv = EdgeServer(tmp_path, extra={"models": {"backend": "triton", "triton_url": triton.grpc_url}})
    proc = srv.edge("echo", "triton", check=False)
    assert proc.returncode == 0, proc.stderr
    version = load_manifest(MODELS / "tb_classifier").version
    assert "OK" in proc.stdout and f"tb_classifier {version}: ready, matches the manifest" in proc.stdout
    image = make_dx(tmp_path / "one.dcm", rows=1024, cols=1024, seed=3)
    analysed = json.loads(srv.edge("analyze", "--json", str(tmp_path / "one.dcm")).stdout)
    assert analysed["sop_instance_uid"] == image.SOPInstanceUID
    assert {m["backend"] for m in analysed["models"]} == {"triton"}


@needs_server
def test_model_not_matching_the_manifest_is_refused(tmp_path):
    """Triton serves tb_classifier with another sha256 and nodule_detector with another
    version: both refused with a clear error, the box analyses locally (or refuses to start)."""
    repo = write_python_repository(MODELS, tmp_path / "repo")
    tb = load_manifest(MODELS / "tb_classifier")
    config = repo / "tb_classifier" / "config.pbtxt"
    config.write_text(config.read_text().replace(tb.sha256, "0" * 64))
    shutil.rmtree(repo / "nodule_detector")
    det = load_manifest(MODELS / "nodule_detector")
    write_python_repository(MODELS, tmp_path / "other", version_override="9.2.0")
    shutil.move(str(tmp_path / "other" / "nodule_detector"), str(repo / "nodule_detector"))
    server = _start_server(tmp_path, repo)
    try:
        settings = TritonSettings(url=server.grpc_url, timeout_s=5.0)
        result = check_server(settings, [load_manifest(f) for f in model_folders(MODELS)])
        assert result["reachable"]
        errors = {m["name"]: m["error"] for m in result["models"]}
        assert all(not m["ready"] and m["mismatch"] for m in result["models"])
        assert "manifest_sha256 000000000000... on Triton" in errors["tb_classifier"]
        assert (f"version 9002000 on Triton, manifest version {det.version} is Triton version "
                f"{triton_version(det.version)}") in errors["nodule_detector"]
        (tmp_path / "box").mkdir(exist_ok=True)
        srv = EdgeServer(tmp_path / "box", extra={"models": {"backend": "triton",
                                                            "triton_url": server.grpc_url}})
        proc = srv.edge("echo", "triton", check=False)
        assert proc.returncode == 1 and "REFUSED" in proc.stderr and "export-triton" in proc.stderr
        model = load_model(MODELS / "tb_classifier", "triton", triton=settings)
        try:
            assert model.backend == "onnxruntime" and model.runner.mismatch
            model.run(np.zeros(model.manifest.input.shape, np.float32))
            assert model.runner.stats.fallbacks["mismatch"] == 1
        finally:
            model.close()
        with pytest.raises(TritonModelMismatch, match="not the installed one"):
            load_model(MODELS / "tb_classifier", "triton",
                       triton=dataclasses.replace(settings, fallback=False))
    finally:
        server.kill()


@needs_server
def test_too_slow_triton_falls_back_then_is_tried_again(tmp_path):
    """An answer slower than triton_timeout_s is not waited for: the image runs locally."""
    server = _start_server(tmp_path, write_python_repository(MODELS, tmp_path / "repo", delay_ms=1500))
    try:
        settings = TritonSettings(url=server.grpc_url, timeout_s=0.5, retry_s=0.0)
        model = load_model(MODELS / "tb_classifier", "triton", triton=settings)
        try:
            assert model.backend == "triton"
            tensor = np.zeros(model.manifest.input.shape, np.float32)
            started = time.perf_counter()
            model.run(tensor)
            assert time.perf_counter() - started < 1.4
            assert model.last_backend == "onnxruntime"
            assert model.runner.stats.fallbacks["timeout"] == 1
            assert "Deadline" in model.runner.problem or "deadline" in model.runner.problem.lower()
            model.run(tensor)             # retry_s = 0: Triton is tried again (and is slow again)
            assert model.runner.stats.fallbacks["timeout"] == 2
        finally:
            model.close()
    finally:
        server.kill()


# ------------------------------------------------------------------ two boxes, one server

def _images(tmp: Path, n: int, seed0: int) -> list[Path]:
    files = []
    for i in range(n):
        f = tmp / f"img{seed0 + i}.dcm"
        make_dx(f, rows=1024, cols=1024, seed=seed0 + i)
        files.append(f)
    return files


def _analyzed(box: EdgeServer, n: int) -> list[dict] | None:
    jobs = box.jobs()
    done = [j for j in jobs if j["state"] == "analyzed"]
    return done if len(done) >= n and len(jobs) == len(done) else None


def _backends(job: dict) -> set[str]:
    return {m["backend"] for m in job["findings"]["models"]}


@pytest.fixture(scope="module")
def fleet(triton, tmp_path_factory):
    """Orthanc and two boxes sharing the Triton server: one over gRPC with local fallback,
    one over HTTP without (its images wait for Triton)."""
    require_tool("storescu")
    tmp = tmp_path_factory.mktemp("fleet")
    pacs = OrthancPACS(tmp, count_stores=True).start()
    boxes = []
    try:
        for i, (protocol, url) in enumerate((("grpc", triton.grpc_url), ("http", triton.http_url))):
            (tmp / f"box{i}").mkdir()
            boxes.append(EdgeServer(tmp / f"box{i}", node={"ae_title": f"EDGE_{i}"}, extra={
                "models": {"backend": "triton", "triton_url": url, "triton_protocol": protocol,
                           "triton_timeout_s": 3.0, "triton_retry_s": 1.0,
                           "triton_fallback": protocol == "grpc"}},
                destinations=[pacs.destination()]))
        for box in boxes:
            box.start()
        yield pacs, boxes, tmp
    finally:
        for box in boxes:   # both stop at once
            if box.proc is not None and box.proc.poll() is None:
                box.proc.terminate()
        for box in boxes:
            box.stop()
        pacs.stop()


def _reference(files: list[Path]) -> dict[str, dict]:
    """Findings of the same images on local ONNX Runtime, the way the service decodes."""
    from pydicom import dcmread

    from edge.analysis import Analyzer, model_input_side
    from edge.config import Config
    from edge.pipeline import decode_side
    from engines.store import load_models

    models = load_models(MODELS, "onnxruntime")
    try:
        analyzer = Analyzer(models, decode_min_side=decode_side(Config(), model_input_side(models)))
        return {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID): analyzer.analyze(f).to_dict()
                for f in files}
    finally:
        for m in models.values():
            m.close()


def _assert_same_findings(got: dict, want: dict) -> None:
    assert got["tb"]["score"] == pytest.approx(want["tb"]["score"], abs=1e-4)
    assert got["tb"]["positive"] == want["tb"]["positive"]
    assert len(got["nodules"]) == len(want["nodules"])
    for a, b in zip(got["nodules"], want["nodules"]):
        assert a["box"] == pytest.approx(b["box"], abs=0.5)
        assert a["score"] == pytest.approx(b["score"], abs=1e-4)


@needs_server
def test_two_boxes_share_triton_fall_back_when_it_dies_and_return(triton, fleet):
    pacs, boxes, tmp = fleet
    files = {i: _images(tmp, 6, seed0=100 * (i + 1)) for i in range(2)}
    reference = _reference(files[0] + files[1])
    # 1. both boxes on Triton
    for i, box in enumerate(boxes):
        assert box.storescu(*files[i][:2], called=f"EDGE_{i}").returncode == 0
    for box in boxes:
        jobs = wait_until(lambda: _analyzed(box, 2), 90, what="2 images analysed on Triton")
        assert all(_backends(j) == {"triton"} for j in jobs), [j["findings"]["models"] for j in jobs]
    # 2. Triton killed while images arrive: box 0 analyses every image locally, box 1
    #    (triton_fallback = false) keeps them waiting, failing none
    for i, box in enumerate(boxes):
        assert box.storescu(*files[i][2:4], called=f"EDGE_{i}").returncode == 0
    triton.kill()
    for i, box in enumerate(boxes):
        assert box.storescu(files[i][4], called=f"EDGE_{i}").returncode == 0
    jobs = wait_until(lambda: _analyzed(boxes[0], 5), 90, what="5 images analysed")
    last = next(j for j in jobs if j["sop_instance_uid"] == _uid(files[0][4]))
    assert _backends(last) == {"onnxruntime"}
    status = requests.get(f"http://127.0.0.1:{boxes[0].web_port}/metrics", timeout=5).text
    assert 'edge_model_runs_total{backend="onnxruntime",model="tb_classifier"}' in status
    health = requests.get(f"http://127.0.0.1:{boxes[0].web_port}/healthz", timeout=5)
    assert health.status_code == 200    # analysing locally is not a failure of the box
    assert any("Triton not used" in n and "analysing locally" in n for n in health.json()["notices"])

    def waiting() -> list[dict] | None:
        jobs = boxes[1].jobs()
        assert not [j for j in jobs if j["state"] == "failed"], jobs
        held = [j for j in jobs if j["state"] == "received" and "Triton" in (j["reason"] or "")]
        return held if any(j["sop_instance_uid"] == _uid(files[1][4]) for j in held) else None
    wait_until(waiting, 60, what="box 1 holding its image for Triton")
    # 3. Triton back: the boxes return to it (triton_retry_s = 1), box 1's images are analysed
    triton.start()
    time.sleep(1.5)
    for i, box in enumerate(boxes):
        assert box.storescu(files[i][5], called=f"EDGE_{i}").returncode == 0
    for i, box in enumerate(boxes):
        jobs = wait_until(lambda: _analyzed(box, 6), 90, what="6 images analysed")
        last = next(j for j in jobs if j["sop_instance_uid"] == _uid(files[i][5]))
        assert _backends(last) == {"triton"}, last["findings"]["models"]
        if i == 1:
            assert all(_backends(j) == {"triton"} for j in jobs)
        # findings equal local ONNX Runtime whichever backend produced them
        for job in jobs:
            _assert_same_findings(job["findings"], reference[job["sop_instance_uid"]])
    # nothing lost, nothing duplicated at the PACS: 12 images x (SR, GSPS, SC), each stored once
    wait_until(lambda: len(pacs.stores()) >= 36, 90, what="36 results at the PACS")
    time.sleep(1.0)
    stores = pacs.stores()
    assert len(stores) == 36 and len(set(stores)) == 36
    classes = [t["SOPClassUID"] for t in pacs.instances()]
    assert sorted(classes) == sorted([SR] * 12 + [GSPS] * 12 + [SC] * 12)


def _uid(path: Path) -> str:
    from pydicom import dcmread
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


@needs_server
@pytest.mark.skipif(not shutil.which(PROMETHEUS), reason="prometheus is not installed")
def test_prometheus_scrapes_two_boxes_and_triton(triton, fleet):
    """One Prometheus scrapes both boxes and the Triton server; every dashboard query parses
    and the Triton panels find their series."""
    pacs, boxes, tmp = fleet
    if triton.proc is None:
        triton.start()
    files = {i: _images(tmp, 1, seed0=900 + i) for i in range(2)}
    for i, box in enumerate(boxes):
        assert box.storescu(*files[i], called=f"EDGE_{i}").returncode == 0
    port = free_port()
    config = tmp / "prometheus.yml"
    targets = ", ".join(f'"127.0.0.1:{b.web_port}"' for b in boxes)
    config.write_text(f"""
global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: edge
    static_configs:
      - targets: [{targets}]
  - job_name: triton
    static_configs:
      - targets: ["127.0.0.1:{triton.metrics_port}"]
""")
    prom = subprocess.Popen([PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=open(tmp / "prometheus.log", "wb"))
    base = f"http://127.0.0.1:{port}"

    def query(expr: str) -> list[dict]:
        r = requests.get(f"{base}/api/v1/query", params={"query": expr}, timeout=5)
        assert r.status_code == 200, (expr, r.text)
        return r.json()["data"]["result"]

    try:
        def scraped():
            try:
                up = query("up")
            except (requests.RequestException, AssertionError):
                return None
            return len(up) == 3 and all(u["value"][1] == "1" for u in up) and up
        wait_until(scraped, 30, what="Prometheus scraping two boxes and Triton")
        wait_until(lambda: len(query('edge_model_runs_total{backend="triton"}')) >= 4, 30,
                   what="triton runs of both boxes")
        assert len({r["metric"]["instance"] for r in query("edge_triton_up")}) == 2
        assert query('nv_inference_count{job="triton",model="tb_classifier"}')
        time.sleep(3)   # a few samples for rate()
        dashboard = json.loads(DASHBOARD.read_text())
        assert {"instance"} <= {v["name"] for v in dashboard["templating"]["list"]}   # box selector
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                expr = target["expr"].replace("$instance", ".*").replace("$__rate_interval", "1m")
                result = query(expr)
                if panel["id"] >= 12 and "fallbacks" not in expr:
                    assert result, (panel["title"], expr)
        one_box = query('edge_triton_up{instance="127.0.0.1:%d"}' % boxes[0].web_port)
        assert len(one_box) == 1   # the box selector narrows to one box
    finally:
        prom.terminate()
        try:
            prom.wait(timeout=10)
        except subprocess.TimeoutExpired:
            prom.kill()
