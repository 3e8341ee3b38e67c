"""Shared fixtures: free ports, temp configs, a running ``edge serve``, small DX images."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicom_node import dcmtk

ROOT = Path(__file__).resolve().parents[1]
EDGE = [sys.executable, "-m", "edge.cli"]


def _dcmtk_first_on_path() -> None:
    """With the virtual environment activated, pynetdicom's storescu/echoscu apps come first
    on PATH and take other options: put DCMTK's programs ahead of them for every test."""
    import tempfile

    folder = Path(tempfile.gettempdir()) / f"xray-edge-tests-dcmtk-{os.getuid()}"
    if dcmtk.link_shadowed(folder):
        os.environ["PATH"] = f"{folder}{os.pathsep}{os.environ.get('PATH', '')}"


_dcmtk_first_on_path()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before port {port} opened")
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"port {port} did not open within {timeout} s")


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_config(path: Path, sections: dict, destinations: list[dict] | None = None) -> Path:
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
        lines.append("")
    for d in destinations or []:
        lines.append("[[destinations]]")
        lines += [f"{k} = {toml_value(v)}" for k, v in d.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def make_dx(path: Path | None = None, *, rows: int = 256, cols: int = 256, seed: int = 0,
            patient_name: str = "TEST^PATIENT", study_uid: str | None = None,
            sop_uid: str | None = None, modality: str = "DX", view: str = "PA",
            body_part: str = "CHEST", photometric: str = "MONOCHROME2",
            charset: str | None = None) -> Dataset:
    """A small, valid DX For Presentation image with a smooth pattern."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:cols]
    img = (2000 + 800 * np.sin(x / 17.0) * np.cos(y / 23.0) + rng.normal(0, 20, (rows, cols)))
    pixels = np.clip(img, 0, 4095).astype(np.uint16)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    sop_uid = sop_uid or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    if charset:
        ds.SpecificCharacterSet = charset
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = patient_name
    ds.PatientID = f"PID{seed:05d}"
    ds.PatientBirthDate = "19800101"
    ds.PatientSex = "F"
    ds.PatientAge = "045Y"
    ds.StudyDate = ds.ContentDate = "20261125"
    ds.StudyTime = ds.ContentTime = "101010"
    ds.AccessionNumber = f"ACC{seed}"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Modality = modality
    ds.BodyPartExamined = body_part
    ds.ViewPosition = view
    ds.Manufacturer = "TEST"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImagerPixelSpacing = [0.15, 0.15]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    ds.WindowCenter, ds.WindowWidth = 2000, 2000
    ds.PresentationLUTShape = "IDENTITY" if photometric == "MONOCHROME2" else "INVERSE"
    ds.PixelData = pixels.tobytes()
    if path is not None:
        ds.save_as(path, enforce_file_format=True)
    return ds


class EdgeServer:
    """``edge serve`` as a subprocess on free loopback ports."""

    def __init__(self, tmp: Path, *, node: dict | None = None, storage: dict | None = None,
                 extra: dict | None = None, destinations: list[dict] | None = None):
        self.tmp = Path(tmp)
        self.port = free_port()
        self.web_port = free_port()
        self.data_dir = self.tmp / "edge-data"
        sections = {
            "node": {"ae_title": "EDGE_AI", "host": "127.0.0.1", "port": self.port, **(node or {})},
            "storage": {"dir": str(self.data_dir), "min_free_mb": 0, **(storage or {})},
            "web": {"host": "127.0.0.1", "port": self.web_port},
            "logging": {"level": "INFO"},
        }
        if os.environ.get("EDGE_TEST_MODELS_DIR"):   # stand-in models for quick local runs
            sections["models"] = {"dir": os.environ["EDGE_TEST_MODELS_DIR"]}
        for k, v in (extra or {}).items():
            sections.setdefault(k, {}).update(v)
        self.config = write_config(self.tmp / "edge.toml", sections, destinations)
        self.proc: subprocess.Popen | None = None
        self.log = self.tmp / "serve.log"

    def start(self, timeout: float = 60.0) -> "EdgeServer":
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self._log_fh = open(self.log, "ab")
        self.proc = subprocess.Popen(EDGE + ["serve", "--config", str(self.config)], cwd=self.tmp,
                                     stdout=self._log_fh, stderr=subprocess.STDOUT, env=env)
        wait_for_port(self.port, timeout, self.proc)
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        if getattr(self, "_log_fh", None):
            self._log_fh.close()

    def edge(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(EDGE + ["--config", str(self.config), *args], cwd=self.tmp,
                              capture_output=True, text=True, check=check, timeout=120)

    def jobs(self) -> list[dict]:
        import json
        return json.loads(self.edge("jobs", "--json", "--limit", "1000").stdout)

    def storescu(self, *files: Path, calling: str = "MODALITY", called: str = "EDGE_AI",
                 extra: list[str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(["storescu", "-aet", calling, "-aec", called, *(extra or []),
                               "127.0.0.1", str(self.port), *map(str, files)],
                              capture_output=True, text=True, timeout=120)


def require_tool(name: str) -> str:
    path = (dcmtk.find(name) if name in dcmtk.PYNETDICOM_APPS else None) or shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (run `make test`, which installs it)")
    return path


@pytest.fixture
def edge_server(tmp_path):
    servers: list[EdgeServer] = []

    def factory(**kw) -> EdgeServer:
        srv = EdgeServer(tmp_path, **kw)
        servers.append(srv)
        return srv

    yield factory
    for srv in servers:
        srv.stop()


# Orthanc plugins the tests can load: name -> (library, Debian package).
ORTHANC_PLUGIN_DIR = Path(os.environ.get("EDGE_TEST_ORTHANC_PLUGINS", "/usr/share/orthanc/plugins"))
ORTHANC_PLUGINS = {
    "dicomweb": ("libOrthancDicomWeb.so", "orthanc-dicomweb"),
    "webviewer": ("libOrthancWebViewer.so", "orthanc-webviewer"),
}


class OrthancPACS:
    """A real Orthanc (Debian package) on loopback with its own temp storage."""

    def __init__(self, tmp: Path, *, aet: str = "PACS", count_stores: bool = False,
                 plugins: tuple[str, ...] = ()):
        """``plugins``: Orthanc plugins to load, by name: ``"dicomweb"`` (DICOMweb under
        ``/dicom-web/`` and WADO-URI under ``/wado``), ``"webviewer"`` (Orthanc's web viewer
        under ``/web-viewer/``). ``start()`` skips the test when one is not installed."""
        unknown = [p for p in plugins if p not in ORTHANC_PLUGINS]
        if unknown:
            raise ValueError(f"plugins has unknown names {unknown}; known: {list(ORTHANC_PLUGINS)}")
        self.plugins = tuple(plugins)
        self.tmp = Path(tmp) / "orthanc"
        self.tmp.mkdir(parents=True, exist_ok=True)
        # Every C-STORE Orthanc receives, duplicates included (Orthanc keeps one copy of an
        # instance, so its own instance list hides them): a Lua filter appends the UID.
        self.store_log = self.tmp / "stores.log"
        self.aet = aet
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.proc: subprocess.Popen | None = None
        import json
        config = {
            "Name": "test-pacs", "StorageDirectory": str(self.tmp / "db"),
            "IndexDirectory": str(self.tmp / "db"), "StorageCompression": False,
            "HttpPort": self.http_port, "HttpServerEnabled": True, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "DicomAet": aet, "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False, "DicomAlwaysAllowStore": True, "DicomAlwaysAllowFind": True,
            "Plugins": [str(ORTHANC_PLUGIN_DIR / ORTHANC_PLUGINS[p][0]) for p in self.plugins],
            "DicomServerEnabled": True, "HttpDescribeErrors": True, "StableAge": 1,
        }
        if count_stores:
            lua = self.tmp / "count_stores.lua"
            lua.write_text('function ReceivedInstanceFilter(dicom, origin, info)\n'
                           f'  local f = io.open("{self.store_log}", "a")\n'
                           '  f:write(dicom.SOPInstanceUID .. "\\n")\n'
                           '  f:close()\n'
                           '  return true\n'
                           'end\n')
            config["LuaScripts"] = [str(lua)]
        if "dicomweb" in self.plugins:
            config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/", "EnableWado": True,
                                  "WadoRoot": "/wado", "Ssl": False}
        if "webviewer" in self.plugins:
            config["WebViewer"] = {"CachePath": str(self.tmp / "webviewer-cache"),
                                   "Threads": 2}
        self.config = self.tmp / "orthanc.json"
        self.config.write_text(json.dumps(config))

    def start(self) -> "OrthancPACS":
        orthanc = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
        if not Path(orthanc).exists():
            pytest.skip("Orthanc is not installed (run `make test`, which installs it)")
        for name in self.plugins:
            library, package = ORTHANC_PLUGINS[name]
            if not (ORTHANC_PLUGIN_DIR / library).exists():
                pytest.skip(f"the Orthanc {name} plugin is not installed (Debian package "
                            f"{package}; run `make test`, which installs it)")
        self._log = open(self.tmp / "orthanc.log", "ab")
        self.proc = subprocess.Popen([orthanc, str(self.config)], stdout=self._log,
                                     stderr=subprocess.STDOUT, cwd=self.tmp)
        wait_for_port(self.http_port, 60, self.proc)
        wait_for_port(self.dicom_port, 60, self.proc)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None

    def stores(self) -> list[str]:
        """SOP Instance UIDs of every C-STORE received, in order, duplicates included
        (needs ``count_stores=True``)."""
        if not self.store_log.exists():
            return []
        return self.store_log.read_text().split()

    def get(self, path: str):
        import requests
        r = requests.get(f"http://127.0.0.1:{self.http_port}{path}", timeout=10)
        r.raise_for_status()
        return r.json()

    def instances(self) -> list[dict]:
        """Every stored instance with its main tags (simplified)."""
        out = []
        for oid in self.get("/instances"):
            tags = self.get(f"/instances/{oid}/simplified-tags")
            out.append(tags)
        return out

    def destination(self, name: str = "pacs", **extra) -> dict:
        return {"name": name, "ae_title": self.aet, "host": "127.0.0.1",
                "port": self.dicom_port, **extra}


@pytest.fixture
def orthanc(tmp_path):
    pacs = OrthancPACS(tmp_path)
    yield pacs
    pacs.stop()


def wait_until(predicate, timeout: float = 60.0, interval: float = 0.25, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")
