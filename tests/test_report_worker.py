"""The SR built in a child process (edge.report_worker): the same bytes as in the analysis
thread, and the analysis thread takes over whenever the child cannot."""
from __future__ import annotations

import time

import pydicom

from edge.pipeline import encode_results
from edge.report_worker import SRWorker
from edge.reporting import Equipment, PredecessorDocument
from test_reporting import make_findings, make_source, unit_image

OUTPUTS = ("sr", "gsps", "sc")


def _warm_worker(source, findings) -> SRWorker:
    worker = SRWorker().start(source, findings, dict(equipment=Equipment()))
    deadline = time.monotonic() + 120
    while not worker.ready and time.monotonic() < deadline:
        time.sleep(0.05)
    assert worker.ready
    return worker


def test_sr_from_the_child_is_byte_identical_and_the_thread_takes_over(tmp_path):
    full = make_source(tmp_path)
    unit = unit_image(full)
    source = pydicom.dcmread(tmp_path / f"source_{full.SOPInstanceUID}.dcm", stop_before_pixels=True)
    findings = make_findings(source)
    kwargs = dict(received_at=1_700_000_000.0, source_digest="ab" * 32, equipment=Equipment())
    worker = _warm_worker(source, make_findings(source, positive=False))
    try:
        here = encode_results(source, findings, unit, OUTPUTS, **kwargs)
        assert [k for k, *_ in here] == list(OUTPUTS)
        early = []   # the GSPS and SC are handed over (to be written) before the SR is back
        assert encode_results(source, findings, unit, OUTPUTS, sr_worker=worker, on_built=early.extend,
                              **kwargs) == here
        assert early == here[1:]
        # an amended SR names the one sent before, in the child as here
        sr_uid = here[0][1]
        earlier = [PredecessorDocument(str(source.StudyInstanceUID), "1.2.3.4", pydicom.uid.UID(
            "1.2.840.10008.5.1.4.1.1.88.34"), "1.2.826.0.1.3680043.8.498.99")]
        amended = encode_results(source, findings, unit, OUTPUTS, sent_srs=earlier, **kwargs)
        assert amended[0][1] != sr_uid
        assert encode_results(source, findings, unit, OUTPUTS, sent_srs=earlier, sr_worker=worker,
                              **kwargs) == amended
        # a source with its pixels loaded is not shipped to the child
        assert worker.submit(full, findings, {}, []) is None
    finally:
        worker.close()
    # the child is gone: the SR is built here, same bytes
    assert not worker.ready
    assert encode_results(source, findings, unit, OUTPUTS, sr_worker=worker, **kwargs) == here


def test_the_child_leaves_when_the_service_is_killed(tmp_path):
    """SIGKILL (or the OOM killer) never shuts the pool down: the child must not stay behind."""
    import os
    import subprocess
    import sys
    code = f"""
import sys, time, pydicom
from pathlib import Path
sys.path[:0] = {sys.path!r}
from test_reporting import make_findings, make_source
from edge.report_worker import SRWorker
from edge.reporting import Equipment
full = make_source(Path({str(tmp_path)!r}))
src = pydicom.dcmread(Path({str(tmp_path)!r}) / f"source_{{full.SOPInstanceUID}}.dcm", stop_before_pixels=True)
w = SRWorker().start(src, make_findings(src), dict(equipment=Equipment()))
while not w.ready:
    time.sleep(0.05)
print("READY", flush=True)
time.sleep(120)
"""
    service = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert service.stdout.readline().strip() == "READY"
        children = [int(p) for p in subprocess.run(["pgrep", "-P", str(service.pid)], capture_output=True,
                                                    text=True).stdout.split()]
        workers = [p for p in children if b"spawn_main" in open(f"/proc/{p}/cmdline", "rb").read()]
        assert workers
    finally:
        service.kill()
        service.wait()
    deadline = time.monotonic() + 10
    while any(os.path.exists(f"/proc/{p}") for p in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(os.path.exists(f"/proc/{p}") for p in workers)
