"""``edge demo``: the appliance on its embedded defaults, fed a sample worklist.

The worklist (``WORKLIST``) is what a district hospital's X-ray room sends in a morning:
frontal PA images and a portable AP image, which are analysed, and a lateral view and a
child's image, which triage skips with the reason; names in Vietnamese (ISO_IR 192).
The images are procedural phantoms (see engines/train/phantom.py), generated on first use
into ``<storage>/demo-samples``, and sent over the DICOM network like an X-ray machine
would: with DCMTK's ``storescu`` when it is installed, else with the built-in SCU.
"""
from __future__ import annotations

import io
import logging
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .config import Config
from .patient import display_name

if TYPE_CHECKING:  # pragma: no cover
    from .service import Appliance

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class SamplePatient:
    """One entry of the demo's worklist: who, and what the X-ray machine sends."""

    name: str          # DICOM PN, Vietnamese with diacritics (sent as ISO_IR 192, UTF-8)
    sex: str           # DICOM CS: M or F
    age: str           # DICOM AS
    view: str          # ViewPosition: PA, AP or LL (lateral)
    tb: bool
    nodules: bool
    lesions: str | None = None   # the phantom's lesion pattern (engines.train.phantom_masses)
    style: str | None = None     # the phantom's reader and processing (None: drawn from the seed)


#: A morning's worklist in a district hospital: frontal PA and a portable AP image that are
#: analysed, a lateral and a child that triage skips with the reason, every name in
#: Vietnamese with its diacritics.
WORKLIST: tuple[SamplePatient, ...] = (
    SamplePatient("NGUYỄN^VĂN AN", "M", "045Y", "PA", tb=True, nodules=True,      # refer, nodules
                  lesions="multiple", style="dr_plain"),
    SamplePatient("HOÀNG^VĂN EM", "M", "052Y", "LL", tb=False, nodules=False),    # skipped: lateral
    SamplePatient("TRẦN^THỊ BÌNH", "F", "032Y", "PA", tb=False, nodules=False),   # no TB signs
    SamplePatient("VŨ^THỊ HOA", "F", "009Y", "PA", tb=False, nodules=False),      # skipped: a child
    SamplePatient("PHẠM^THỊ DUNG", "F", "027Y", "PA", tb=False, nodules=True,     # a mass, a nodule
                  lesions="mass"),
    SamplePatient("LÊ^VĂN CƯỜNG", "M", "061Y", "AP", tb=True, nodules=False),     # portable AP, refer
)
SAMPLES_VERSION = "3"   # bump when the worklist changes: samples are cached per version

_LATERAL_VIEW_CODE = ("399173006", "SCT", "left lateral")   # ViewPosition LL
_VIEW_CODES = {"PA": ("399348003", "SCT", "postero-anterior"),
               "AP": ("399198009", "SCT", "antero-posterior")}


def sample_dataset(index: int, patient: SamplePatient):
    """The DX or CR image (with file meta) the X-ray machine sends for worklist entry ``index``;
    the same index gives the same bytes."""
    from engines.train.phantom import generate_case
    from engines.train.phantom_dicom import add_file_meta, build_dataset

    case = generate_case(1000 + index, size=2048, tb=patient.tb, nodules=patient.nodules,
                         lesions=patient.lesions, style=patient.style)
    case.view = "AP" if patient.view == "AP" else "PA"
    ds = build_dataset(case, patient_name=patient.name, patient_id=f"DEMO{index + 1:04d}",
                       patient_age=patient.age)
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientSex = patient.sex
    ds.InstitutionName = "Bệnh viện đa khoa huyện (demo)"
    ds.StudyDescription = "X-quang ngực thẳng (phantom, không phải bệnh nhân)"
    ds.ViewPosition = patient.view
    value, scheme, meaning = _VIEW_CODES.get(patient.view, _LATERAL_VIEW_CODE)
    ds.ViewCodeSequence[0].CodeValue = value
    ds.ViewCodeSequence[0].CodingSchemeDesignator = scheme
    ds.ViewCodeSequence[0].CodeMeaning = meaning
    ds.SeriesDescription = f"Chest {patient.view}"
    return add_file_meta(ds, case.pixels)


def make_samples(out_dir: Path, count: int) -> list[Path]:
    """Write ``count`` sample chest X-rays (the worklist, repeated if longer) and return
    their paths; files already written are reused."""
    from .storage import write_durably

    out_dir = out_dir / f"v{SAMPLES_VERSION}"
    paths = []
    for i in range(count):
        path = out_dir / f"sample_{i + 1:02d}.dcm"
        if not path.exists():
            ds = sample_dataset(i, WORKLIST[i % len(WORKLIST)])
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            write_durably(path, buf.getvalue())   # never a half-written sample after Ctrl-C
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


def print_summary(app: "Appliance", uids: list[str]) -> None:
    """What happened to each sample, as the technician's page shows it."""
    journal = app.journal
    assert journal is not None
    print()
    print(f"{'patient':18} {'state':9} {'result':46} {'nodules':7} results")
    for uid in uids:
        row = journal.find_instance(uid)
        if row is None:
            print(f"{'?':18} not received")
            continue
        f = row.findings or {}
        tb = f.get("tb")
        if row.state == "analyzed" and tb:
            result = (f"REFER for TB testing (score {tb['score']:.2f})" if tb["positive"]
                      else f"No TB signs (score {tb['score']:.2f})")
            nod = str(len(f.get("nodules", [])))
        else:
            result, nod = row.reason or "-", "-"
        per_dest: dict[str, list[str]] = {}
        for d in journal.deliveries_for(uid):
            per_dest.setdefault(d.destination, []).append(d.state)
        where = ", ".join(f"{dest}: {states.count('sent')}/{len(states)} sent"
                          for dest, states in sorted(per_dest.items())) or "-"
        print(f"{display_name(row.patient_name)[:18]:18} {row.state:9} {result[:46]:46} {nod:7} {where}")
    if not app.config.destinations:
        print(f"\nresult objects (SR, presentation state, secondary capture) are written to "
              f"{app.config.results_dir}")


def run_demo(config: Config, *, count: int = len(WORKLIST), exit_after: float | None = None) -> int:
    from .service import Appliance

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
        print(f"\nstatus page: {app.web.url}/ (log in with the password printed at the first start)"
              f"\nDICOM listener: {config.node.ae_title} on port {app.scp.port}")
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
