"""Deployment scripts (firmware_scripts/): lint, unit file, install/update on a temp root,
health check against real listeners, power-mode script.

Everything runs the real tools (bash, shellcheck, systemd-analyze, systemctl --root,
DCMTK storescp/echoscu, sqlite3, logrotate); only nvpmodel/jetson_clocks, which exist on
a Jetson alone, are replaced by small scripts on PATH.
"""
from __future__ import annotations

import configparser
import hashlib
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import free_port, wait_for_port

REPO = Path(__file__).resolve().parents[1]
FW = REPO / "firmware_scripts"
SCRIPTS = sorted(FW.glob("*.sh"))
VERSION = re.search(r"^version\s*=\s*(\S+)", (REPO / "setup.cfg").read_text(), re.M).group(1)
L4T_R36 = "# R36 (release), REVISION: 3.0, GCID: 36191598, BOARD: generic, EABI: aarch64, DATE: Mon May  6 17:34:21 UTC 2024\n"


def run(*args: str | Path, check: bool = False, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under root with type, mode, owner, mtime and content hash or link target."""
    out = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        if path.is_symlink():
            what = ("link", os.readlink(path))
        elif path.is_file():
            what = ("file", hashlib.sha256(path.read_bytes()).hexdigest())
        else:
            what = ("dir", "")
        out[str(path.relative_to(root))] = (*what, st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns)
    return out


def make_root(tmp_path: Path, l4t: str | None = L4T_R36, cuda: bool = True, tensorrt: bool = True) -> Path:
    """A target tree like a JetPack image: passwd/group files, L4T release, CUDA, TensorRT."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    users = "root:x:0:0:root:/root:/bin/bash\n"
    groups = "root:x:0:\n"
    if os.geteuid() != 0:
        # useradd/chown need root: provision the service user as ourselves instead.
        uid, gid = os.geteuid(), os.getegid()
        users += f"edge:x:{uid}:{gid}::/var/lib/edge:/usr/sbin/nologin\n"
        groups += f"edge:x:{gid}:\nvideo:x:44:edge\n"
    else:
        groups += "video:x:44:\n"
    (root / "etc/passwd").write_text(users)
    (root / "etc/group").write_text(groups)
    (root / "etc/shadow").write_text("root:*:19000:0:99999:7:::\n")
    (root / "etc/gshadow").write_text("root:*::\n" + "".join(f"{line.split(':')[0]}:!::\n" for line in groups.splitlines()[1:]))
    if l4t:
        (root / "etc/nv_tegra_release").write_text(l4t)
    if cuda:
        (root / "usr/local/cuda").mkdir(parents=True)
    if tensorrt:
        trt = root / "usr/lib/python3.10/dist-packages/tensorrt"
        trt.mkdir(parents=True)
        (trt / "__init__.py").write_text("")
    return root


def install(root: Path, *extra: str) -> subprocess.CompletedProcess:
    flags = ["--no-pip", "--no-engines"]
    if not shutil.which("systemctl"):
        flags.append("--no-systemctl")
    return run(FW / "install.sh", "--root", root, *flags, *extra)


# ---------------------------------------------------------------- static checks

@pytest.mark.skipif(not Path("/usr/bin/shellcheck").exists(), reason="/usr/bin/shellcheck not installed")
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck_passes(script):
    # from firmware_scripts/, so `source lib.sh` directives resolve (-x follows them)
    proc = subprocess.run(["/usr/bin/shellcheck", "-x", script.name], cwd=FW, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert script.read_text().startswith("#!/usr/bin/env bash\n")
    if script.name != "lib.sh":
        assert "set -euo pipefail" in script.read_text()
        assert os.access(script, os.X_OK), f"{script.name} is not executable"


def _systemd_analyze_usable(tmp_path: Path) -> str | None:
    if not shutil.which("systemd-analyze"):
        return "systemd-analyze is not installed"
    probe = tmp_path / "probe.service"
    probe.write_text("[Service]\nType=oneshot\nExecStart=/bin/true\n")
    proc = run("systemd-analyze", "verify", probe)
    if proc.returncode != 0:
        return f"systemd-analyze verify fails even on a trivial unit here: {proc.stderr.strip()}"
    return None


@pytest.mark.parametrize("unit", ["edge.service", "edge-performance.service"])
def test_unit_files_verify(tmp_path, unit):
    reason = _systemd_analyze_usable(tmp_path)
    if reason:
        pytest.skip(reason)
    # verify checks that ExecStart's binary exists: point it at one under tmp_path.
    fake_bin = tmp_path / "edge"
    fake_bin.write_text("#!/bin/sh\nexit 0\n")
    fake_bin.chmod(0o755)
    text = (FW / unit).read_text()
    text = re.sub(r"^ExecStart=\S+", f"ExecStart={fake_bin}", text, flags=re.M)
    copy = tmp_path / unit
    copy.write_text(text)
    proc = run("systemd-analyze", "verify", "--man=no", copy)
    assert proc.returncode == 0, proc.stderr
    # verify only warns (exit 0) about unknown keys or bad values: treat those as failures.
    assert unit not in proc.stderr, proc.stderr


def test_unit_file_contract():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read(FW / "edge.service")
    svc = unit["Service"]
    assert svc["Type"] == "notify" and svc["NotifyAccess"] == "main"
    assert svc["ExecStart"] == "/opt/edge/current/venv/bin/edge serve --config /etc/edge/edge.toml"
    assert svc["User"] == "edge" and svc["Restart"] == "on-failure"
    assert svc["ReadWritePaths"] == "/var/lib/edge"
    for key in ("ProtectSystem", "ProtectHome", "NoNewPrivileges", "PrivateTmp"):
        assert key in svc
    active = [line.split("=")[0] for line in (FW / "edge.service").read_text().splitlines()
              if line and not line.startswith("#")]
    # These hide or lock the Jetson GPU (/dev/nvhost-*) or break CUDA's JIT.
    for forbidden in ("PrivateDevices", "MemoryDenyWriteExecute", "ProtectClock", "DevicePolicy", "DeviceAllow"):
        assert forbidden not in active
    assert "network-online.target" in unit["Unit"]["After"] and "network-online.target" in unit["Unit"]["Wants"]


def test_journald_dropin_values():
    conf = configparser.ConfigParser()
    conf.optionxform = str
    conf.read(FW / "journald-edge.conf")
    journal = conf["Journal"]
    for key in ("SystemMaxUse", "SystemKeepFree"):
        assert re.fullmatch(r"\d+[KMGT]?", journal[key]), f"{key}={journal[key]}"
    if shutil.which("systemd-analyze"):
        proc = run("systemd-analyze", "timespan", journal["MaxRetentionSec"], check=True)
        micros = int(re.search(r"μs: (\d+)", proc.stdout).group(1))
        assert 86400e6 <= micros <= 366 * 86400e6


@pytest.mark.skipif(not shutil.which("logrotate"), reason="logrotate is not installed")
def test_logrotate_rotates_with_copytruncate(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "edge.log").write_text("line\n" * 100)
    me = subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
    group = subprocess.run(["id", "-gn"], capture_output=True, text=True).stdout.strip()
    conf = (FW / "logrotate.edge").read_text().replace("/var/log/edge", str(logs)).replace("su edge edge", f"su {me} {group}")
    (tmp_path / "edge.conf").write_text(conf)
    proc = run("logrotate", "--force", "--state", tmp_path / "state", tmp_path / "edge.conf")
    assert proc.returncode == 0 and "error" not in proc.stderr, proc.stderr
    assert (logs / "edge.log.1").read_text() == "line\n" * 100
    assert (logs / "edge.log").stat().st_size == 0   # truncated in place, file kept open by the service


def test_config_template_loads_with_the_appliance_loader():
    config = pytest.importorskip("edge.config")
    cfg = config.load_config(FW / "edge.toml")
    assert cfg.journal_path == Path("/var/lib/edge/journal.sqlite3")
    assert (cfg.node.port, cfg.web.port, cfg.node.ae_title) == (11112, 8080, "EDGE_AI")


# ---------------------------------------------------------------- install.sh

def test_install_dry_run_on_unsupported_machine(tmp_path):
    root = tmp_path / "empty"
    refused = run(FW / "install.sh", "--dry-run", "--root", root)
    assert refused.returncode == 2
    assert "not a Jetson" in refused.stderr and "--allow-unsupported" in refused.stderr
    proc = run(FW / "install.sh", "--dry-run", "--root", root, "--allow-unsupported")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for line in ("would: create service user edge",
                 f"would: create virtualenv {root}/opt/edge/{VERSION}/venv (--system-site-packages)",
                 f"would: pip install {REPO}[tensorrt] into {root}/opt/edge/{VERSION}/venv",
                 f"would: write default config {root}/etc/edge/edge.toml",
                 f"would: point {root}/opt/edge/current -> {VERSION}",
                 f"would: install {root}/etc/systemd/system/edge.service",
                 "would: enable edge.service",
                 f"would: install {root}/etc/logrotate.d/edge",
                 f"would: install {root}/etc/systemd/journald.conf.d/50-edge.conf"):
        assert line in out, out
    assert "done:" not in out
    assert list(root.rglob("*")) == []   # a dry run writes nothing


@pytest.mark.parametrize("case, expect_rc, message", [
    ("r36", 0, "ok: L4T R36.3.0 (JetPack 6)"),
    ("r35", 2, "JetPack 6 (L4T R36) is required, this is L4T R35.4.1"),
    ("no-trt", 2, "TensorRT Python bindings missing"),
    ("no-cuda", 2, "CUDA not found at /usr/local/cuda"),
])
def test_install_platform_check_reads_the_target(tmp_path, case, expect_rc, message):
    l4t = L4T_R36.replace("R36", "R35").replace("REVISION: 3.0", "REVISION: 4.1") if case == "r35" else L4T_R36
    root = make_root(tmp_path, l4t=l4t, tensorrt=case != "no-trt", cuda=case != "no-cuda")
    proc = run(FW / "install.sh", "--dry-run", "--root", root)
    assert proc.returncode == expect_rc, proc.stdout + proc.stderr
    assert message in proc.stdout + proc.stderr


def test_install_twice_changes_nothing_the_second_time(tmp_path):
    root = make_root(tmp_path)
    first = install(root)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "done: install" in first.stdout
    edge = next(line for line in (root / "etc/passwd").read_text().splitlines() if line.startswith("edge:"))
    uid, gid = int(edge.split(":")[2]), int(edge.split(":")[3])
    data = (root / "var/lib/edge").stat()
    assert (data.st_uid, data.st_gid, data.st_mode & 0o777) == (uid, gid, 0o750)
    assert os.readlink(root / "opt/edge/current") == VERSION
    assert (root / "etc/edge/edge.toml").read_text() == (FW / "edge.toml").read_text()
    assert (root / f"opt/edge/{VERSION}/firmware_scripts/healthcheck.sh").exists()
    if shutil.which("systemctl"):
        assert (root / "etc/systemd/system/multi-user.target.wants/edge.service").is_symlink()

    before = snapshot(root)
    second = install(root)
    assert second.returncode == 0, second.stderr
    assert snapshot(root) == before
    assert "done:" not in second.stdout and "would:" not in second.stdout, second.stdout
    assert f"ok: {root}/etc/systemd/system/edge.service up to date" in second.stdout

    # A site's config is never overwritten; a tampered unit file is put back.
    (root / "etc/edge/edge.toml").write_text("[node]\nae_title = \"SITE_AI\"\n")
    (root / "etc/systemd/system/edge.service").write_text("[Service]\n")
    third = install(root)
    assert "SITE_AI" in (root / "etc/edge/edge.toml").read_text()
    assert f"done: install {root}/etc/systemd/system/edge.service" in third.stdout
    assert (root / "etc/systemd/system/edge.service").read_text() == (FW / "edge.service").read_text()


def test_install_refuses_to_switch_versions(tmp_path):
    root = make_root(tmp_path)
    assert install(root).returncode == 0
    proc = install(root, "--release", "9.9.9")
    assert proc.returncode == 1 and "use update.sh" in proc.stderr
    assert os.readlink(root / "opt/edge/current") == VERSION


# ---------------------------------------------------------------- update.sh

def test_update_dry_run_prints_the_plan(tmp_path):
    root = make_root(tmp_path)
    missing = run(FW / "update.sh", "--dry-run", "--root", root)
    assert missing.returncode == 1 and "run install.sh first" in missing.stderr
    assert install(root).returncode == 0
    before = snapshot(root)
    proc = run(FW / "update.sh", "--dry-run", "--root", root, "--release", "0.2.0")
    assert proc.returncode == 0, proc.stderr
    for line in (f"would: create virtualenv {root}/opt/edge/0.2.0/venv (--system-site-packages)",
                 f"would: remember {VERSION} as the previous release",
                 f"would: switch {root}/opt/edge/current -> 0.2.0",
                 "would: run the health check until it passes, for up to 60 s",
                 f"would: on a failed health check, switch back to {VERSION} and restart (rollback)"):
        assert line in proc.stdout, proc.stdout
    assert snapshot(root) == before
    same = run(FW / "update.sh", "--dry-run", "--root", root)
    assert same.returncode == 0 and f"ok: release {VERSION} is already current" in same.stdout


def test_update_switches_and_rolls_back(tmp_path):
    root = make_root(tmp_path)
    assert install(root).returncode == 0
    update = [FW / "update.sh", "--root", root, "--no-pip", "--health-timeout", "1"]
    good = run(*update, "--release", "0.2.0", "--health-cmd", "true")
    assert good.returncode == 0, good.stdout + good.stderr
    assert os.readlink(root / "opt/edge/current") == "0.2.0"
    assert os.readlink(root / "opt/edge/previous") == VERSION

    # 0.3.0 is unhealthy (the check passes only while 0.2.0 is current): automatic rollback.
    check = f'test "$(readlink {root}/opt/edge/current)" = 0.2.0'
    bad = run(*update, "--release", "0.3.0", "--health-cmd", check)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "rolled back: 0.2.0 is running" in bad.stderr
    assert os.readlink(root / "opt/edge/current") == "0.2.0"
    assert os.readlink(root / "opt/edge/previous") == VERSION
    assert (root / "opt/edge/0.3.0/firmware_scripts").is_dir()   # kept for inspection

    manual = run(FW / "update.sh", "--root", root, "--rollback", "--health-cmd", "true")
    assert manual.returncode == 0, manual.stderr
    assert os.readlink(root / "opt/edge/current") == VERSION


# ---------------------------------------------------------------- jetson_performance.sh

def test_performance_skips_without_jetson_tools(tmp_path):
    proc = run(FW / "jetson_performance.sh", "--dry-run", env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0
    assert "skip: nvpmodel not found" in proc.stdout and "skip: jetson_clocks not found" in proc.stdout


@pytest.mark.parametrize("current, expect", [("2", "would: set power mode 2 -> 0 (nvpmodel -m 0)"),
                                             ("0", "ok: power mode 0 already set")])
def test_performance_reads_the_current_mode(tmp_path, current, expect):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvpmodel").write_text(f"#!/bin/sh\n[ \"$1\" = -q ] && printf 'NV Power Mode: X\\n{current}\\n'\n")
    (bin_dir / "jetson_clocks").write_text("#!/bin/sh\nexit 0\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    proc = run(FW / "jetson_performance.sh", "--dry-run", "--mode", "0",
               env={"PATH": f"{bin_dir}:/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert expect in proc.stdout and "would: pin CPU/GPU/EMC clocks" in proc.stdout


# ---------------------------------------------------------------- healthcheck.sh

class _Healthz(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802 (http.server API)
        code = self.status if self.path == "/healthz" else 404
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"healthy": %s}' % (b"true" if code == 200 else b"false"))

    def log_message(self, *args):
        pass


@pytest.fixture
def peers(tmp_path):
    """A real DICOM SCP (DCMTK storescp), an HTTP server and a WAL journal on free ports."""
    if not shutil.which("storescp"):
        pytest.skip("DCMTK storescp not installed")
    dicom_port, data = free_port(), tmp_path / "data"
    data.mkdir()
    scp = subprocess.Popen(["storescp", "-od", str(tmp_path), str(dicom_port)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    handler = type("Handler", (_Healthz,), {"status": 200})
    web = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    con = sqlite3.connect(data / "journal.sqlite3")
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("CREATE TABLE instances (uid TEXT PRIMARY KEY, state TEXT)")
    con.commit()
    config = tmp_path / "edge.toml"
    config.write_text(f'[node]\nport = {dicom_port}\nae_title = "EDGE_AI"\n[web]\nport = {web.server_address[1]}\n'
                      f'[storage]\ndir = "{data}"\n')
    try:
        wait_for_port(dicom_port, 10, scp)
        yield {"config": config, "handler": handler, "scp": scp, "data": data, "dicom_port": dicom_port}
    finally:
        con.close()
        web.shutdown()
        scp.terminate()
        scp.wait(timeout=10)


def healthcheck(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    return run(FW / "healthcheck.sh", "--timeout", "3", *args, env=env)


def without_client_tools(tmp_path: Path) -> dict:
    """A PATH without echoscu, curl and sqlite3, so the bash/python fallbacks run."""
    bin_dir = tmp_path / "fallback-bin"
    bin_dir.mkdir()
    for tool in ("bash", "timeout", "tr", "cut", "tail", "stat", "id", "runuser"):
        if shutil.which(tool):
            (bin_dir / tool).symlink_to(shutil.which(tool))
    (bin_dir / "python3").symlink_to(sys.executable)
    return {"PATH": str(bin_dir)}


def test_healthcheck_healthy_peers(peers, tmp_path):
    for extra, env in (([], None), (["--tcp-only"], None), ([], without_client_tools(tmp_path))):
        proc = healthcheck("--config", peers["config"], *extra, env=env)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        lines = proc.stdout.splitlines()
        assert len(lines) == 3 and all(line.startswith("ok: ") for line in lines), lines
    assert "C-ECHO to EDGE_AI@127.0.0.1:" in healthcheck("--config", peers["config"]).stdout
    assert "(TCP only)" in proc.stdout   # the last run had no echoscu


def test_healthcheck_reports_each_failure(peers, tmp_path):
    peers["handler"].status = 503
    proc = healthcheck("--config", peers["config"])
    assert proc.returncode == 1
    assert re.search(r"^FAIL: web: .*503", proc.stdout, re.M), proc.stdout
    assert re.search(r"^ok: dicom: ", proc.stdout, re.M)

    peers["scp"].terminate()
    peers["scp"].wait(timeout=10)
    (peers["data"] / "journal.sqlite3").write_bytes(b"not a database" * 100)
    for f in peers["data"].glob("journal.sqlite3-*"):
        f.unlink()
    for env in (None, without_client_tools(tmp_path)):
        proc = healthcheck("--config", peers["config"], env=env)
        assert proc.returncode == 1
        assert [line.split(":")[0] for line in proc.stdout.splitlines()] == ["FAIL", "FAIL", "FAIL"], proc.stdout
    # explicit options win over the config file
    other = healthcheck("--config", peers["config"], "--data-dir", str(peers["data"] / "nowhere"))
    assert "FAIL: journal: " + str(peers["data"] / "nowhere") in other.stdout


def _edge_serve_available() -> str | None:
    edge = Path(sys.executable).with_name("edge")
    if not edge.exists():
        return None
    proc = run(edge, "serve", "--help")
    return str(edge) if proc.returncode == 0 else None


def test_healthcheck_against_edge_serve(tmp_path):
    edge = _edge_serve_available()
    if edge is None:
        pytest.skip("`edge serve` is not available yet (edge serve --help fails)")
    dicom_port, web_port, data = free_port(), free_port(), tmp_path / "data"
    template = (FW / "edge.toml").read_text()
    if not list((REPO / "engines/models").glob("*/manifest.toml")):
        # No demonstration models shipped in this checkout: use the small ONNX models that
        # the engines tests build, so the unit's ExecStart command still runs for real.
        try:
            from test_engines import make_classifier, make_detector
        except ImportError as exc:
            pytest.skip(f"no models in engines/models and no test models to build: {exc}")
        make_classifier(tmp_path / "models")
        make_detector(tmp_path / "models")
        template = template.replace('# dir = "/var/lib/edge/models"', f'dir = "{tmp_path}/models"')
    config = tmp_path / "edge.toml"
    config.write_text(template
                      .replace("port = 11112", f"port = {dicom_port}")
                      .replace("port = 8080", f"port = {web_port}")
                      .replace('host = "0.0.0.0"', 'host = "127.0.0.1"')
                      .replace('"/var/lib/edge/engines"', f'"{data}/engines"')
                      .replace('dir = "/var/lib/edge"', f'dir = "{data}"')
                      .replace('backend = "auto"', 'backend = "onnxruntime"'))
    log = tmp_path / "serve.log"
    with open(log, "w") as log_file:
        serve = subprocess.Popen([edge, "serve", "--config", str(config)], stdout=log_file,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    try:
        try:
            wait_for_port(web_port, 60, serve)
            wait_for_port(dicom_port, 30, serve)
        except (RuntimeError, TimeoutError):
            raise AssertionError(log.read_text()) from None
        deadline = time.monotonic() + 30
        while (proc := healthcheck("--config", config)).returncode != 0 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert proc.returncode == 0, proc.stdout + log.read_text()
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGTERM)
            try:
                serve.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(serve.pid, signal.SIGKILL)
                serve.wait()
    down = healthcheck("--config", config)
    assert down.returncode != 0
    assert re.search(r"^FAIL: dicom: ", down.stdout, re.M) and re.search(r"^FAIL: web: ", down.stdout, re.M)
