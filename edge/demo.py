"""``edge demo``: the appliance on its embedded defaults, fed sample chest X-rays.

Sample images are procedural phantoms (see engines/train/phantom.py), generated on first
use into ``<storage>/demo-samples``, and sent over the DICOM network like an X-ray machine
would: with DCMTK's ``storescu`` when it is installed, else with the built-in SCU.
"""
from __future__ import annotations

import logging
import shutil
import subprocess
import time
from pathlib import Path

from .config import Config
from .service import Appliance

logger = logging.getLogger(__name__)

SAMPLE_PATIENTS = [
    ("NGUYEN^VAN AN", "045Y", "PA"),
    ("TRAN^THI BINH", "032Y", "PA"),
    ("LE^VAN CUONG", "061Y", "AP"),
    ("PHAM^THI DUNG", "027Y", "PA"),
    ("HOANG^VAN EM", "052Y", "LL"),     # a lateral view: shows how triage skips it
    ("VU^THI HOA", "039Y", "PA"),
]


def make_samples(out_dir: Path, count: int) -> list[Path]:
    """Write ``count`` sample chest X-rays (deterministic) and return their paths."""
    from engines.train.phantom import generate_case, write_dicom

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = out_dir / f"sample_{i + 1:02d}.dcm"
        if not path.exists():
            name, age, view = SAMPLE_PATIENTS[i % len(SAMPLE_PATIENTS)]
            case = generate_case(1000 + i, size=2048, tb=(i % 2 == 0), nodules=(i % 3 != 1))
            if view == "AP":
                case.view = "AP"
            ds = write_dicom(case, path, patient_name=name, patient_id=f"DEMO{i + 1:04d}",
                             patient_age=age)
            if view == "LL":
                ds.ViewPosition = "LL"
                ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def send_samples(config: Config, port: int, paths: list[Path]) -> None:
    host = "127.0.0.1"
    storescu = shutil.which("storescu")
    if storescu:
        print(f"sending {len(paths)} sample images with DCMTK storescu to "
              f"{config.node.ae_title}@{host}:{port} ...")
        res = subprocess.run([storescu, "-aet", "DEMO_XRAY", "-aec", config.node.ae_title,
                              host, str(port), *map(str, paths)], capture_output=True, text=True)
        if res.returncode != 0:
            print(f"storescu reported a problem: {res.stderr.strip()[:500]}")
        return
    from dicom_node.scu import Peer, send_files
    print(f"sending {len(paths)} sample images with the built-in SCU ...")
    for path, outcome in zip(paths, send_files(Peer(config.node.ae_title, host, port, "DEMO_XRAY"), paths)):
        if not outcome.delivered:
            print(f"  {path.name}: {outcome.message}")


def print_summary(app: Appliance, uids: list[str]) -> None:
    journal = app.journal
    assert journal is not None
    print()
    print(f"{'patient':18} {'state':9} {'TB':26} {'nodules':8} results")
    for uid in uids:
        row = journal.find_instance(uid)
        if row is None:
            print(f"{'?':18} not received")
            continue
        f = row.findings or {}
        tb = f.get("tb")
        if row.state == "analyzed" and tb:
            tb_text = (f"REFER for TB testing {tb['score']:.2f}" if tb["positive"]
                       else f"No TB signs {tb['score']:.2f}")
            nod = str(len(f.get("nodules", [])))
        else:
            tb_text, nod = (row.reason or "-")[:26], "-"
        where = ", ".join(sorted({f"{d.object_type}->{d.destination}:{d.state}"
                                  for d in journal.deliveries_for(uid)})) or "-"
        print(f"{row.patient_name[:18]:18} {row.state:9} {tb_text:26} {nod:8} {where}")
    if not app.config.destinations:
        print(f"\nresult objects (SR, presentation state, secondary capture) are written to "
              f"{app.config.results_dir.resolve()}")


def run_demo(config: Config, *, count: int = 4, exit_after: float | None = None) -> int:
    app = Appliance(config).start()
    try:
        paths = make_samples(config.storage_dir / "demo-samples", count)
        from pydicom import dcmread
        uids = [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths]
        send_samples(config, app.scp.port, paths)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            rows = [app.journal.find_instance(u) for u in uids]
            if all(r is not None and r.state in ("analyzed", "skipped", "failed") for r in rows) \
                    and app.journal.next_delivery_time() is None:
                break
            time.sleep(0.5)
        print_summary(app, uids)
        web = f"http://127.0.0.1:{config.web.port}/"
        print(f"\nstatus page: {web}   DICOM listener: {config.node.ae_title} on port {app.scp.port}")
        if exit_after is not None:
            app._stopping.wait(exit_after)
            app.stop()
            return 0
        print("serving until Ctrl-C")
        app.serve_forever()
        return 0
    except BaseException:
        app.stop()
        raise
