"""Deployment scripts (firmware_scripts/): lint, unit file, install/update on a temp root,
health check against real listeners, power-mode script.

Everything runs the real tools (bash, shellcheck, systemd-analyze, systemctl --root,
DCMTK storescp/echoscu, sqlite3, logrotate); only nvpmodel/jetson_clocks, which exist on
a Jetson alone, are replaced by small scripts on PATH.
"""
from __future__ import annotations

import configparser
import dataclasses
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

try:
    import tomllib
except ImportError:   # Python 3.10 (JetPack 6)
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
FW = REPO / "firmware_scripts"
SCRIPTS = sorted(FW.glob("*.sh"))
VERSION = re.search(r"^version\s*=\s*(\S+)", (REPO / "setup.cfg").read_text(), re.M).group(1)
# What each JetPack 6 release puts on the box: L4T revision, TensorRT, CUDA.
JETPACK = {
    "6.0": ("36.3.0", "8.6.2", "12.2.140"),
    "6.1": ("36.4.0", "10.3.0", "12.6.68"),
    "6.2": ("36.4.3", "10.3.0", "12.6.68"),
}


def nv_tegra_release(l4t: str) -> str:
    """/etc/nv_tegra_release as Jetson Linux writes it, for L4T version "36.4.3"."""
    major, revision = l4t.split(".", 1)
    return (f"# R{major} (release), REVISION: {revision}, GCID: 38968081, BOARD: generic, "
            "EABI: aarch64, DATE: Tue Jan  7 17:35:12 UTC 2025\n")


def cuda_version_json(version: str) -> str:
    """/usr/local/cuda/version.json; a component listed first, so the "cuda" entry is found by key."""
    return ('{\n   "libcublas" : {\n      "name" : "CUDA cuBLAS",\n      "version" : "12.6.1.4"\n   },\n'
            f'   "cuda" : {{\n      "name" : "CUDA SDK",\n      "version" : "{version}"\n   }},\n'
            '   "cuda_cudart" : {\n      "name" : "CUDA Runtime (cudart)",\n      "version" : "12.6.68"\n   }\n}\n')


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


def make_root(tmp_path: Path, jetpack: str = "6.2", *, l4t: str | None = "", tensorrt: str | None = "",
              cuda: str | None = "") -> Path:
    """A target tree like a JetPack image: passwd/group files, L4T release, CUDA, TensorRT.

    The versions are the given JetPack release's; pass one to change it, None to leave it out.
    """
    jp_l4t, jp_trt, jp_cuda = JETPACK[jetpack]
    l4t, tensorrt, cuda = (jp if v == "" else v for v, jp in ((l4t, jp_l4t), (tensorrt, jp_trt), (cuda, jp_cuda)))
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
        (root / "etc/nv_tegra_release").write_text(nv_tegra_release(l4t))
    if cuda:
        (root / "usr/local/cuda").mkdir(parents=True)
        (root / "usr/local/cuda/version.json").write_text(cuda_version_json(cuda))
    if tensorrt:
        trt = root / "usr/lib/python3.10/dist-packages/tensorrt"
        trt.mkdir(parents=True)
        (trt / "__init__.py").write_text(f'import ctypes\n\n__version__ = "{tensorrt}"\n')
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

def lib_value(name: str) -> str:
    """A setting of firmware_scripts/lib.sh, as the scripts see it."""
    return run("bash", "-c", f'. "{FW}/lib.sh"; printf %s "${name}"', check=True).stdout


def engine_lines(out: str) -> list[str]:
    """The lines of a script's output that run or plan `edge engines build|verify`."""
    return [line for line in out.splitlines() if re.search(r"engines (build|verify)", line)]


def config_body(text: str) -> list[str]:
    """A config's lines without the [models] precision/calibration_dir ones (set or commented)."""
    return [line for line in text.splitlines() if not re.match(r"[#\s]*(precision|calibration_dir)\s*=", line)]


def test_install_dry_run_on_unsupported_machine(tmp_path):
    root = tmp_path / "empty"
    refused = run(FW / "install.sh", "--dry-run", "--root", root)
    assert refused.returncode == 2
    assert "not a Jetson" in refused.stderr and "--allow-unsupported" in refused.stderr
    proc = run(FW / "install.sh", "--dry-run", "--root", root, "--allow-unsupported")
    assert proc.returncode == 0, proc.stderr
    assert "the service will use ONNX Runtime" in proc.stderr
    out = proc.stdout
    for line in ("would: create service user edge",
                 f"would: create virtualenv {root}/opt/edge/{VERSION}/venv (--system-site-packages)",
                 f"would: pip install {REPO}[tensorrt] into {root}/opt/edge/{VERSION}/venv",
                 f'would: write config {root}/etc/edge/edge.toml from the template, with [models] precision = "fp16"',
                 f"would: point {root}/opt/edge/current -> {VERSION}",
                 f"would: install {root}/etc/systemd/system/edge.service",
                 "would: enable edge.service",
                 f"would: install {root}/etc/logrotate.d/edge",
                 f"would: install {root}/etc/systemd/journald.conf.d/50-edge.conf"):
        assert line in out, out
    assert "done:" not in out
    assert list(root.rglob("*")) == []   # a dry run writes nothing


@pytest.mark.parametrize("case, messages", [
    ("jp6.1", ["ok: L4T R36.4.0 (JetPack 6.1)", "ok: TensorRT 10.3.0", "ok: CUDA 12.6.68"]),
    ("jp6.2", ["ok: L4T R36.4.3 (JetPack 6.2)", "ok: TensorRT 10.3.0", "ok: CUDA 12.6.68"]),
    ("r35", ["L4T R35.4.1 is JetPack 5 or older; JetPack 6.1 or newer (L4T R36.4 or newer) is required",
             "reflash with JetPack 6.2"]),
    ("no-trt", ["TensorRT Python bindings missing", "found: L4T R36.4.3 (JetPack 6.2), TensorRT none"]),
    ("trt-no-version", ["TensorRT Python bindings found, but without a readable __version__"]),
    ("trt-9", ["TensorRT 9.3.0 found; TensorRT 10 or newer is required"]),
    ("no-cuda", ["CUDA not found at /usr/local/cuda"]),
    ("cuda-no-version", ["CUDA at /usr/local/cuda has no readable version.json; CUDA 12.x is required"]),
    ("cuda13", ["CUDA 13.0.48 found; CUDA 12.x is required", "cuda-python>=12.2,<13",
                "found: L4T R36.4.3 (JetPack 6.2), TensorRT 10.3.0, CUDA 13.0.48"]),
])
def test_install_platform_check_reads_the_target(tmp_path, case, messages):
    versions = {"jp6.1": {"jetpack": "6.1"}, "r35": {"l4t": "35.4.1"}, "no-trt": {"tensorrt": None},
                "trt-9": {"tensorrt": "9.3.0"}, "no-cuda": {"cuda": None}, "cuda13": {"cuda": "13.0.48"}}
    root = make_root(tmp_path, **versions.get(case, {}))
    if case == "trt-no-version":
        (root / "usr/lib/python3.10/dist-packages/tensorrt/__init__.py").write_text("from .tensorrt import *\n")
    if case == "cuda-no-version":
        (root / "usr/local/cuda/version.json").unlink()
    before = snapshot(root)
    proc = run(FW / "install.sh", "--dry-run", "--root", root)
    out = proc.stdout + proc.stderr
    for message in messages:
        assert message in out, out
    if case.startswith("jp"):
        assert proc.returncode == 0, out
        return
    assert proc.returncode == 2, out
    assert "needed: JetPack 6.1 or newer: L4T R36.4+, TensorRT 10+, CUDA 12.x" in proc.stderr
    assert "Nothing was changed" in proc.stderr and "would:" not in proc.stdout
    assert snapshot(root) == before


def test_install_refuses_jetpack_6_0_with_the_reason(tmp_path):
    root = make_root(tmp_path, "6.0")
    before = snapshot(root)
    proc = run(FW / "install.sh", "--dry-run", "--root", root, "--no-systemctl")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = proc.stderr
    for reason in ("L4T R36.3.0 is JetPack 6.0; JetPack 6.1 or newer (L4T R36.4 or newer) is required",
                   "TensorRT 8.6.2 found; TensorRT 10 or newer is required",
                   "found: L4T R36.3.0 (JetPack 6.0), TensorRT 8.6.2, CUDA 12.2.140",
                   # how to upgrade: the apt source to r36.4, then JetPack's packages; or reflash
                   "r36.4", "/etc/apt/sources.list.d/nvidia-l4t-apt-source.list",
                   "sudo apt-get install nvidia-jetpack", "reflash with JetPack 6.2",
                   "Nothing was changed"):
        assert reason in err, err
    assert "ok: CUDA 12.2.140" in proc.stdout   # CUDA 12.2 itself is fine
    assert "would:" not in proc.stdout
    assert snapshot(root) == before

    # --allow-unsupported goes on, on ONNX Runtime
    anyway = run(FW / "install.sh", "--dry-run", "--root", root, "--no-systemctl", "--allow-unsupported")
    assert anyway.returncode == 0, anyway.stdout + anyway.stderr
    assert "TensorRT 8.6.2 found" in anyway.stderr and "the service will use ONNX Runtime" in anyway.stderr
    assert "would: create service user edge" in anyway.stdout
    assert snapshot(root) == before


@pytest.mark.parametrize("jetpack", ["6.1", "6.2"])
@pytest.mark.parametrize("precision", [None, "fp32", "int8"])
def test_install_dry_run_plan_on_supported_jetpack(tmp_path, jetpack, precision):
    root = make_root(tmp_path, jetpack)
    args, expect, calibration = [], "fp16", ""
    if precision:
        args, expect = ["--precision", precision], precision
    if precision == "int8":
        (root / "var/lib/edge/calibration").mkdir(parents=True)
        (root / "var/lib/edge/calibration/chest-000.npy").write_bytes(b"\x93NUMPY")
        args += ["--calibration", "/var/lib/edge/calibration"]   # the path on the target
        calibration = ' --calibration /var/lib/edge/calibration'
    before = snapshot(root)
    proc = run(FW / "install.sh", "--dry-run", "--root", root, "--no-systemctl", *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    l4t, trt, cuda = JETPACK[jetpack]
    models = f'precision = "{expect}"' + (', calibration_dir = "/var/lib/edge/calibration"' if calibration else "")
    for line in (f"ok: L4T R{l4t} (JetPack {jetpack})", f"ok: TensorRT {trt}", f"ok: CUDA {cuda}",
                 "cuda-python>=12.2,<13",
                 f"would: write config {root}/etc/edge/edge.toml from the template, with [models] {models}",
                 f"would: pip install {REPO}[tensorrt] into {root}/opt/edge/{VERSION}/venv",
                 f"edge engines build --precision {expect}{calibration} && "
                 f"edge engines verify --precision {expect}{calibration}",
                 "dry run: nothing was changed"):
        assert line in out, out
    assert "warning" not in proc.stderr, proc.stderr
    assert snapshot(root) == before


@pytest.mark.skipif(Path("/opt/edge/current").exists(), reason="an appliance is installed on this machine")
@pytest.mark.parametrize("args, expect", [([], "--precision fp16"), (["--precision", "fp32"], "--precision fp32")])
def test_install_dry_run_plans_every_engine_call_with_the_precision(tmp_path, args, expect):
    """On the running system the plan is: probe with verify, build when none, verify."""
    proc = run(FW / "install.sh", "--dry-run", "--allow-unsupported", "--no-performance", "--no-systemctl",
               "--no-pip", *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    venv_edge = f"/opt/edge/{VERSION}/venv/bin/edge --config /etc/edge/edge.toml engines"
    assert engine_lines(proc.stdout) == [
        f"would: check the cached {expect.split()[1]} engines (as edge): {venv_edge} verify {expect}; "
        "exit 0: keep them, 3: build them, other: report",
        f"would: build TensorRT engines when none are cached: {venv_edge} build {expect}",
        f"would: verify the new engines against ONNX Runtime: {venv_edge} verify {expect}",
    ], proc.stdout


@pytest.mark.parametrize("script", ["install.sh", "update.sh"])
@pytest.mark.parametrize("args, message", [
    (["--precision", "int8"], "--precision int8 needs --calibration DIR"),
    (["--precision", "int8", "--calibration", "/var/lib/edge/calibration"],
     "/var/lib/edge/calibration is not a folder"),
    (["--precision", "int8", "--calibration", "/var/lib/edge/empty"], "holds no .npy files"),
    (["--precision", "int8", "--calibration", "relative/dir"], "with --root give the folder's path on the target"),
    (["--calibration", "/var/lib/edge/empty"], "--calibration is only used with precision int8, not fp16"),
    (["--precision", "bf16"], "--precision: 'bf16' is not fp16, fp32 or int8"),
])
def test_engine_options_are_checked_before_anything_changes(tmp_path, script, args, message):
    root = make_root(tmp_path)
    (root / "var/lib/edge/empty").mkdir(parents=True)
    if script == "update.sh":
        assert install(root).returncode == 0
        args = [*args, "--release", "0.2.0", "--no-pip"]
    before = snapshot(root)
    proc = run(FW / script, "--root", root, *args)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert message in proc.stderr
    assert "done:" not in proc.stdout
    assert snapshot(root) == before


def test_cuda_python_pin_matches_setup_cfg():
    """The CUDA line the scripts check is the one the `tensorrt` extra installs bindings for."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    extra = [line.strip() for line in cfg["options.extras_require"]["tensorrt"].splitlines()
             if line.strip() and not line.strip().startswith("#")]
    pin = next(req for req in extra if req.startswith("cuda-python"))
    assert lib_value("CUDA_PYTHON_PIN") == pin
    assert f"<{int(lib_value('CUDA_MAJOR')) + 1}" in pin.split(",")


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
    installed = (root / "etc/edge/edge.toml").read_text()
    assert config_body(installed) == config_body((FW / "edge.toml").read_text())
    assert tomllib.loads(installed)["models"]["precision"] == "fp16"
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


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_install_writes_the_chosen_precision_into_a_new_config_only(tmp_path, precision):
    root = make_root(tmp_path)
    args = ["--precision", precision]
    if precision == "int8":
        (root / "var/lib/edge/calibration").mkdir(parents=True)
        (root / "var/lib/edge/calibration/chest-000.npy").write_bytes(b"\x93NUMPY")
        args += ["--calibration", "/var/lib/edge/calibration"]
    first = install(root, *args)
    assert first.returncode == 0, first.stdout + first.stderr
    assert f'done: write config {root}/etc/edge/edge.toml from the template, with [models] precision = "{precision}"' \
        in first.stdout
    config = root / "etc/edge/edge.toml"
    text = config.read_text()
    models = tomllib.loads(text)["models"]   # valid TOML, no key twice
    assert models["precision"] == precision
    assert models.get("calibration_dir") == ("/var/lib/edge/calibration" if precision == "int8" else None)
    assert config_body(text) == config_body((FW / "edge.toml").read_text())   # the rest is the template
    assert config.stat().st_mode & 0o777 == 0o640

    # Run again without --precision: the config's precision is used, nothing changes.
    before = snapshot(root)
    again = install(root)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"ok: precision {precision}, as {config} sets" in again.stdout
    assert "warning" not in again.stderr and "done:" not in again.stdout
    assert snapshot(root) == before

    # Another --precision: the config is kept, with a warning that says what to do.
    other = install(root, "--precision", "fp16")
    assert other.returncode == 0, other.stdout + other.stderr
    assert f'warning: {config} has [models] precision "{precision}", but --precision is fp16' in other.stderr
    assert f"set precision = \"fp16\" in its [models] table, or run again with --precision {precision}" in other.stderr
    assert config.read_text() == text


@pytest.mark.parametrize("precision", ["fp16", "fp32", "int8"])
def test_installed_config_loads_with_the_appliance_loader(tmp_path, precision):
    config = pytest.importorskip("edge.config")
    if "precision" not in {f.name for f in dataclasses.fields(config.ModelsConfig)}:
        pytest.skip("edge.config does not read [models] precision yet")
    root = make_root(tmp_path)
    args = ["--precision", precision]
    calibration = tmp_path / "calibration"   # a path that exists here and on the target tree
    if precision == "int8":
        for folder in (calibration, root / str(calibration).lstrip("/")):
            folder.mkdir(parents=True)
            (folder / "chest-000.npy").write_bytes(b"\x93NUMPY")
        args += ["--calibration", str(calibration)]
    proc = install(root, *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cfg = config.load_config(root / "etc/edge/edge.toml")
    assert cfg.models.precision == precision
    assert cfg.models.calibration_dir == (str(calibration) if precision == "int8" else None)


@pytest.mark.parametrize("models, expect", [
    # commented-out examples get the value and keep their comments
    ('[models]\n# precision = "fp16"   # fp16, fp32 or int8\n# calibration_dir = "/x"  # int8 only\nbackend = "auto"\n',
     '[models]\nprecision = "int8"   # fp16, fp32 or int8\ncalibration_dir = "/var/lib/edge/calibration"  # int8 only\n'
     'backend = "auto"\n'),
    # a set value is replaced; calibration_dir is added under [models]
    ('[models]\nbackend = "auto"\nprecision = "fp16"\n\n[delivery]\nmax_age_hours = 72\n',
     '[models]\ncalibration_dir = "/var/lib/edge/calibration"\nbackend = "auto"\nprecision = "int8"\n\n'
     '[delivery]\nmax_age_hours = 72\n'),
    # no [models] table: one is added
    ('[node]\nport = 11112\n', '[node]\nport = 11112\n\n[models]\nprecision = "int8"\n'
     'calibration_dir = "/var/lib/edge/calibration"\n'),
])
def test_install_sets_precision_in_any_template_shape(tmp_path, models, expect):
    fw = tmp_path / "firmware_scripts"
    shutil.copytree(FW, fw)
    (fw / "edge.toml").write_text(models)
    root = make_root(tmp_path)
    (root / "var/lib/edge/calibration").mkdir(parents=True)
    (root / "var/lib/edge/calibration/a.npy").write_bytes(b"\x93NUMPY")
    proc = run(fw / "install.sh", "--root", root, "--source", REPO, "--no-pip", "--no-engines", "--no-systemctl",
               "--no-performance", "--precision", "int8", "--calibration", "/var/lib/edge/calibration")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = (root / "etc/edge/edge.toml").read_text()
    assert text == expect
    assert tomllib.loads(text)["models"]["precision"] == "int8"


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


def test_update_passes_the_precision(tmp_path):
    root = make_root(tmp_path)
    (root / "var/lib/edge/calibration").mkdir(parents=True)
    (root / "var/lib/edge/calibration/chest-000.npy").write_bytes(b"\x93NUMPY")
    int8 = ["--precision", "int8", "--calibration", "/var/lib/edge/calibration"]
    assert install(root, *int8).returncode == 0
    update = [FW / "update.sh", "--dry-run", "--root", root, "--release", "0.2.0"]
    int8_engines = ("there run: edge engines build --precision int8 --calibration /var/lib/edge/calibration && "
                    "edge engines verify --precision int8 --calibration /var/lib/edge/calibration")

    # No --precision: the engines the service loads, as the config says.
    proc = run(*update)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"ok: precision int8, as {root}/etc/edge/edge.toml sets" in proc.stdout
    assert int8_engines in proc.stdout, proc.stdout

    # An explicit one is passed to build and verify, and a mismatch with the config is warned about.
    proc = run(*update, "--precision", "fp32")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "edge engines build --precision fp32 && edge engines verify --precision fp32" in proc.stdout
    assert 'has [models] precision "int8", but --precision is fp32' in proc.stderr


def fake_edge(tmp_path: Path, verify_rcs: list[int], build_rc: int = 0) -> tuple[Path, Path]:
    """An `edge` CLI that logs its arguments; each verify exits with the next of verify_rcs."""
    log, rcs = tmp_path / "calls.log", tmp_path / "verify-rcs"
    rcs.write_text("".join(f"{rc}\n" for rc in verify_rcs))
    edge = tmp_path / "edge"
    edge.write_text(f"""#!/usr/bin/env bash
printf '%s\\n' "$*" >> '{log}'
case " $* " in
    *" verify "*) n=$(grep -c ' verify ' '{log}'); echo "verify output $n"; exit "$(sed -n "${{n}}p" '{rcs}')" ;;
    *) exit {build_rc} ;;
esac
""")
    edge.chmod(0o755)
    return edge, log


@pytest.mark.parametrize("verify_rcs, build_rc, expect_rc, expect_calls, message", [
    ([0], 0, 0, ["verify"], "ok: {p} engines built and verified against ONNX Runtime"),
    ([3, 0], 0, 0, ["verify", "build", "verify"], "done: build and verify {p} engines"),
    ([1], 0, 1, ["verify"], "{p} engines differ from ONNX Runtime (edge engines verify exit 1"),
    ([2], 0, 2, ["verify"], "TensorRT or the GPU is not usable here"),
    ([3], 1, 1, ["verify", "build"], "a model failed to build as a {p} engine"),
    ([3, 1], 0, 1, ["verify", "build", "verify"], "{p} engines differ from ONNX Runtime"),
    ([3, 3], 0, 3, ["verify", "build", "verify"], "finds no {p} engine right after the build"),
], ids=["cached", "none-yet", "mismatch", "no-gpu", "build-fails", "new-mismatch", "still-none"])
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_engines_probe_builds_only_when_none_of_that_precision(tmp_path, verify_rcs, build_rc, expect_rc,
                                                               expect_calls, message, precision):
    """install.sh and update.sh share this: verify (never builds) is the probe; every call has the precision."""
    edge, log = fake_edge(tmp_path, verify_rcs, build_rc)
    calibration = ""
    if precision == "int8":
        (tmp_path / "calibration").mkdir()
        (tmp_path / "calibration/chest-000.npy").write_bytes(b"\x93NUMPY")
        calibration = str(tmp_path / "calibration")
    me = run("id", "-un", check=True).stdout.strip()
    script = (f'. "{FW}/lib.sh"; PRECISION={precision}; CALIBRATION="{calibration}"; choose_precision /nonexistent; '
              f'rc=0; ensure_engines_built "{edge}" /etc/edge/edge.toml || rc=$?; '
              'echo "rc=$rc"; echo "problem=$ENGINE_PROBLEM"')
    proc = run("bash", "-euo", "pipefail", "-c", script, env={"SERVICE_USER": me})
    out = proc.stdout + proc.stderr
    assert f"rc={expect_rc}" in proc.stdout, out
    assert message.format(p=precision) in out, out
    calls = log.read_text().splitlines()
    args = f"--precision {precision}" + (f" --calibration {calibration}" if calibration else "")
    assert calls == [f"--config /etc/edge/edge.toml engines {what} {args}" for what in expect_calls]
    if expect_rc not in (0, 3) and expect_calls == ["verify"]:
        assert "verify output 1" in proc.stderr   # the probe's numbers are shown when it fails


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


@pytest.mark.parametrize("web_tls", [False, True], ids=["http", "https"])
def test_healthcheck_against_edge_serve(tmp_path, web_tls):
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
    if web_tls:   # the status page over HTTPS: the check must follow it
        if not shutil.which("openssl"):
            pytest.skip("openssl is not installed: no certificate for the HTTPS status page")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                        "-subj", "/CN=edge-box", "-keyout", str(tmp_path / "web.key"),
                        "-out", str(tmp_path / "web.crt")], check=True, capture_output=True)
        text = config.read_text()
        config.write_text(text.replace("[web]\n", f'[web]\ntls_cert = "{tmp_path}/web.crt"\n'
                                       f'tls_key = "{tmp_path}/web.key"\n', 1))
        assert "tls_cert" in config.read_text()
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
        assert ("https://" if web_tls else "http://") in proc.stdout
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
