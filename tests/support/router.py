"""Real peers for router mode: Orthanc as the X-ray machine (storage commitment SCU) and as
the PACS, and ``edge serve`` in the path between them.

``RouterOrthanc`` extends the shared ``OrthancPACS`` (tests/conftest.py) with what these
tests need: ``DicomModalities`` (Orthanc sends only to, and accepts storage commitment
results only from, modalities it knows by AE title), a name of its own per instance, and
the REST calls for C-STORE with storage commitment. ``RouterEdge`` is ``EdgeServer`` with
``[[modalities]]`` in its config.
"""
from __future__ import annotations

import collections
import json
import subprocess
import time
from pathlib import Path

import requests
from pydicom import dcmread

from conftest import EdgeServer, OrthancPACS, free_port, require_tool, toml_value, wait_for_port

SR, GSPS, SC = "1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.11.1", "1.2.840.10008.5.1.4.1.1.7"
DX = "1.2.840.10008.5.1.4.1.1.1.1"
RESULT_KIND = {SR: "sr", GSPS: "gsps", SC: "sc"}


class RouterOrthanc(OrthancPACS):
    """An Orthanc in its own folder under ``tmp``, knowing ``modalities`` {name: (AE, port)}."""

    def __init__(self, tmp: Path, name: str, *, aet: str, count_stores: bool = False,
                 modalities: dict[str, tuple[str, int]] | None = None):
        super().__init__(Path(tmp) / name, aet=aet, count_stores=count_stores)
        config = json.loads(self.config.read_text())
        config["Name"] = name
        config["DicomModalities"] = {key: [ae, "127.0.0.1", port]
                                     for key, (ae, port) in (modalities or {}).items()}
        config["DicomScuTimeout"] = 10
        config["SynchronousCMove"] = True
        self.config.write_text(json.dumps(config))

    def _url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"

    def post(self, path: str, body, timeout: float = 60.0):
        data = body if isinstance(body, bytes) else json.dumps(body)
        r = requests.post(self._url(path), data=data, timeout=timeout)
        r.raise_for_status()
        return r.json()

    def upload(self, path: Path) -> str:
        """Put a DICOM file into this Orthanc; returns its Orthanc instance id."""
        return self.post("/instances", Path(path).read_bytes())["ID"]

    def store_with_commitment(self, modality: str, instance_ids: list[str]) -> str:
        """C-STORE the instances to ``modality``, then request storage commitment for them
        (N-ACTION); returns the transaction UID."""
        answer = self.post(f"/modalities/{modality}/store",
                           {"Resources": instance_ids, "StorageCommitment": True, "Synchronous": True})
        return answer["StorageCommitmentTransactionUID"]

    def request_commitment(self, modality: str, items: list[tuple[str, str]]) -> str:
        """Storage commitment for arbitrary (SOP Class, SOP Instance) pairs, no C-STORE."""
        answer = self.post(f"/modalities/{modality}/storage-commitment",
                           {"DicomInstances": [{"SOPClassUID": c, "SOPInstanceUID": i} for c, i in items]})
        return answer["ID"]

    def commitment(self, transaction_uid: str) -> dict:
        return self.get(f"/storage-commitment/{transaction_uid}")

    def wait_commitment(self, transaction_uid: str, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        report = self.commitment(transaction_uid)
        while report.get("Status") == "Pending" and time.monotonic() < deadline:
            time.sleep(0.2)
            report = self.commitment(transaction_uid)
        return report


class RouterEdge(EdgeServer):
    """``edge serve`` whose config also lists ``modalities`` ([[modalities]] tables)."""

    def add_modalities(self, modalities: list[dict]) -> "RouterEdge":
        lines = [self.config.read_text()]
        for m in modalities:
            lines.append("[[modalities]]")
            lines += [f"{k} = {toml_value(v)}" for k, v in m.items()]
            lines.append("")
        self.config.write_text("\n".join(lines))
        return self


def store_counts(pacs: OrthancPACS) -> collections.Counter:
    """How many C-STOREs the PACS received per SOP Instance UID (duplicates counted)."""
    return collections.Counter(pacs.stores())


def pacs_objects(pacs: OrthancPACS) -> dict[str, dict]:
    """SOP Instance UID -> simplified tags of everything the PACS holds."""
    return {t["SOPInstanceUID"]: t for t in pacs.instances()}


def delivery_rows(edge: EdgeServer) -> list[dict]:
    """Every current delivery row of every instance, from ``edge jobs --json``."""
    return [d for job in edge.jobs() for d in job["deliveries"]]


class ArchiveSCP:
    """DCMTK ``storescp`` in bit-preserving mode (``+B``: each data set written exactly as
    received) that accepts uncompressed transfer syntaxes only (its default): a PACS that
    takes neither JPEG 2000 nor JPEG-LS."""

    def __init__(self, tmp: Path, *, aet: str = "ARCHIVE"):
        self.aet = aet
        self.port = free_port()
        self.out = Path(tmp) / "archive"
        self.out.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None

    def start(self) -> "ArchiveSCP":
        storescp = require_tool("storescp")
        self._log = open(self.out.with_suffix(".log"), "ab")
        self.proc = subprocess.Popen([storescp, "-aet", self.aet, "+B", "-od", str(self.out), str(self.port)],
                                     stdout=self._log, stderr=subprocess.STDOUT)
        wait_for_port(self.port, 20, self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def received(self) -> dict[str, Path]:
        """SOP Instance UID -> file, for every object received."""
        out = {}
        for path in self.out.iterdir():
            if path.is_file() and not path.name.startswith("."):
                try:
                    out[str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)] = path
                except Exception:   # noqa: BLE001 - still being written
                    continue
        return out

    def destination(self, name: str = "archive", **extra) -> dict:
        return {"name": name, "ae_title": self.aet, "host": "127.0.0.1", "port": self.port, **extra}


def dataset_bytes(path: Path) -> bytes:
    """The encoded data set of a DICOM file, without its preamble and file meta."""
    from pynetdicom.dsutils import split_dataset
    _, offset = split_dataset(Path(path))
    return Path(path).read_bytes()[offset:]
