"""The ``edge`` command as a field engineer uses it."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import EDGE, free_port, make_dx, require_tool, wait_for_port, wait_until, write_config


def _edge(*args, cwd=None, timeout=180):
    return subprocess.run(EDGE + list(args), capture_output=True, text=True, cwd=cwd, timeout=timeout)


def test_help_lists_every_command():
    out = _edge("--help")
    assert out.returncode == 0
    for command in ("serve", "demo", "analyze", "jobs", "journal", "echo", "engines"):
        assert command in out.stdout


def test_echo_a_destination_against_dcmtk_storescp(tmp_path):
    storescp = require_tool("storescp")
    port = free_port()
    cfg = write_config(tmp_path / "edge.toml", {"storage": {"dir": str(tmp_path / "d")}},
                       destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": port}])
    proc = subprocess.Popen([storescp, "-aet", "PACS", str(port)], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, 20, proc)
        ok = _edge("--config", str(cfg), "echo", "pacs")
        assert ok.returncode == 0, ok.stderr
        assert "pacs: OK" in ok.stdout
    finally:
        proc.terminate()
        proc.wait(10)
    down = _edge("--config", str(cfg), "echo", "pacs")
    assert down.returncode == 1
    assert "FAILED" in down.stderr and "cannot connect" in down.stderr
    unknown = _edge("--config", str(cfg), "echo", "nowhere")
    assert unknown.returncode == 2
    assert "no destination named 'nowhere'" in unknown.stderr


def test_jobs_lists_newest_first_in_text_and_json(tmp_path, edge_server):
    require_tool("storescu")
    srv = edge_server().start()
    for i in range(3):
        make_dx(tmp_path / f"j{i}.dcm", seed=200 + i, rows=1024, cols=1024,
                view="LL" if i == 1 else "PA")
        assert srv.storescu(tmp_path / f"j{i}.dcm").returncode == 0
    rows = wait_until(lambda: (lambda j: len(j) == 3 and all(r["state"] in ("analyzed", "skipped", "failed")
                                                             for r in j) and j)(srv.jobs()),
                      90, what="three finished jobs")
    assert [r["received_at"] for r in rows] == sorted((r["received_at"] for r in rows), reverse=True)
    lateral = [r for r in rows if r["state"] == "skipped"]
    assert len(lateral) == 1 and lateral[0]["reason"] == "lateral view"
    text = srv.edge("jobs").stdout
    assert "lateral view" in text and "skipped" in text
    assert text.count("\n") == 4   # header + 3 rows


def test_demo_sends_samples_and_reports_where_results_went(tmp_path):
    env = dict(os.environ)
    cfg = write_config(tmp_path / "edge.toml", {
        "node": {"host": "127.0.0.1", "port": free_port()},
        "web": {"host": "127.0.0.1", "port": free_port()},
        "storage": {"dir": str(tmp_path / "data"), "min_free_mb": 0},
        **({"models": {"dir": env["EDGE_TEST_MODELS_DIR"]}} if env.get("EDGE_TEST_MODELS_DIR") else {}),
    })
    out = _edge("--config", str(cfg), "demo", "--count", "4", "--exit-after", "0.5", cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = out.stdout[out.stdout.index("patient "):]
    # the worklist's first four: PA refer, a lateral (skipped), PA negative, a child (skipped)
    assert "NGUYỄN VĂN AN" in summary and "HOÀNG VĂN EM" in summary
    assert summary.count(" analyzed ") == 2 and summary.count(" skipped ") == 2, summary
    assert "lateral view" in summary and "patient under 15 years" in summary
    assert "result objects" in out.stdout
    results = list((tmp_path / "data" / "results").rglob("*.dcm"))
    assert len(results) == 3 * 2
    # the names went over the wire in UTF-8 (ISO_IR 192) and are kept as sent
    jobs = json.loads(_edge("--config", str(cfg), "jobs", "--json", cwd=tmp_path).stdout)
    assert {j["patient_name"] for j in jobs} >= {"NGUYỄN^VĂN AN", "VŨ^THỊ HOA"}


@pytest.mark.parametrize("problem", ["dicom_port_in_use", "web_port_in_use", "storage_unusable",
                                     "not_utf8", "plaintext_password"])
def test_start_problems_name_the_key_without_a_traceback(tmp_path, problem):
    import socket
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    sections = {"node": {"host": "127.0.0.1", "port": free_port()},
                "web": {"host": "127.0.0.1", "port": free_port()},
                "storage": {"dir": str(tmp_path / "data"), "min_free_mb": 0}}
    expected = {"dicom_port_in_use": "node.port", "web_port_in_use": "web.port",
                "storage_unusable": "storage.dir", "not_utf8": "not UTF-8",
                "plaintext_password": "web.password_hash"}[problem]
    if problem == "dicom_port_in_use":
        sections["node"]["port"] = busy.getsockname()[1]
    elif problem == "web_port_in_use":
        sections["web"]["port"] = busy.getsockname()[1]
    elif problem == "storage_unusable":
        (tmp_path / "a-file").write_text("not a directory")
        sections["storage"]["dir"] = str(tmp_path / "a-file" / "data")
    elif problem == "plaintext_password":
        sections["web"]["password_hash"] = "secret123"
    cfg = write_config(tmp_path / "edge.toml", sections)
    if problem == "not_utf8":
        cfg.write_bytes(cfg.read_bytes() + b"\n# caf\xe9 latin-1 comment\n")
    try:
        out = _edge("--config", str(cfg), "serve", cwd=tmp_path, timeout=120)
    finally:
        busy.close()
    assert out.returncode == 2, out.stdout[-1000:] + out.stderr[-2000:]
    assert expected in out.stderr and "configuration error" in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    if problem == "plaintext_password":
        assert "secret123" not in out.stderr   # the password itself is never echoed
