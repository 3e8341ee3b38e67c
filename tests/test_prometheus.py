"""A real Prometheus server scrapes the app's /metrics (with the bearer token) over loopback."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests

from edge.journal import Journal
from edge.metrics import Metrics
from edge.web import create_app, serve_web

from test_web import add_instance, make_config

DASHBOARD = Path(__file__).resolve().parent.parent / "firmware_scripts" / "grafana-dashboard.json"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
TOKEN = "fleet-scrape-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def query(base: str, promql: str) -> list[dict]:
    response = requests.get(f"{base}/api/v1/query", params={"query": promql}, timeout=5)
    response.raise_for_status()
    return response.json()["data"]["result"]


@pytest.mark.skipif(not shutil.which(PROMETHEUS), reason="prometheus is not installed")
def test_prometheus_scrapes_stage_histogram(tmp_path):
    config = make_config(tmp_path / "data", metrics_token=TOKEN)
    journal = Journal(config.journal_path)
    add_instance(journal, config.storage_dir, "received")
    metrics = Metrics()
    for seconds in (0.012, 0.034, 0.4):
        metrics.observe_stage("tb", seconds)
    metrics.observe_stage("decode", 0.08)
    server = serve_web(create_app(config, journal, metrics), "127.0.0.1", 0)

    prom_port = free_port()
    (tmp_path / "prometheus.yml").write_text(f"""
global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: edge
    authorization:
      credentials: {TOKEN}
    static_configs:
      - targets: ["127.0.0.1:{server.port}"]
""")
    prom = subprocess.Popen(
        [PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prom_port}"],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "wb"))
    base = f"http://127.0.0.1:{prom_port}"
    try:
        deadline = time.monotonic() + 30
        tb_count = None
        while time.monotonic() < deadline:
            assert prom.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
            try:
                results = query(base, 'edge_stage_seconds_count{stage="tb"}')
            except requests.RequestException:
                results = []
            if results:
                tb_count = float(results[0]["value"][1])
                break
            time.sleep(0.5)
        assert tb_count == 3.0, f"no tb stage count through Prometheus within 30 s: {tb_count}"
        up = query(base, 'up{job="edge"}')
        assert up and up[0]["value"][1] == "1"       # the scrape passed the bearer token check
        below_50ms = query(base, 'edge_stage_seconds_bucket{stage="tb",le="0.05"}')
        assert float(below_50ms[0]["value"][1]) == 2.0
        depth = query(base, 'edge_queue_depth{queue="analysis"}')
        assert float(depth[0]["value"][1]) == 1.0
        # every query of the shipped Grafana dashboard parses and finds its series
        dashboard = json.loads(DASHBOARD.read_text())
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                expr = target["expr"].replace("$instance", ".*").replace("$__rate_interval", "1m")
                response = requests.get(f"{base}/api/v1/query", params={"query": expr}, timeout=5)
                assert response.status_code == 200, (panel["title"], expr, response.text)
    finally:
        prom.terminate()
        try:
            prom.wait(timeout=10)
        except subprocess.TimeoutExpired:
            prom.kill()
        server.stop()
        journal.close()
