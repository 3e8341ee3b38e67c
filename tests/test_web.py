"""Status page, JSON API, login/CSRF and /metrics, through Flask's test client.

The journal is a real SQLite journal filled through its API, the images real DICOM files.
The helpers at the top are reused by test_web_browser.py and test_prometheus.py.
"""
from __future__ import annotations

import io
import json
import logging
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from edge.config import Config, Destination, StorageConfig, WebConfig
from edge.health import HealthMonitor
from edge.findings import Findings, ModelInfo, Nodule, Other, TBResult
from edge.journal import Journal, NewInstance
from edge.metrics import Metrics
from edge.web import create_app, ensure_password

DX_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
PATIENT_NAME = "NGUYEN^VAN AN"        # must never reach /metrics or the logs
PATIENT_ID = "PID-7731-XQ"


# ---------------------------------------------------------------------------- helpers

def make_config(storage: Path, *, dest_port: int = 1, **web) -> Config:
    """A config with its storage in ``storage`` and one PACS destination."""
    return Config(storage=StorageConfig(dir=str(storage), min_free_mb=1), web=WebConfig(**web),
                  destinations=(Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=dest_port),))


def write_dicom(storage: Path, rel: str, *, patient_name: str, patient_id: str,
                rows: int = 320, cols: int = 256, monochrome1: bool = False) -> NewInstance:
    """A small DX image with a bright square at the top left (in display polarity)."""
    stored = np.full((rows, cols), 1000, dtype=np.uint16)
    stored[rows // 8: rows // 4, cols // 8: cols // 4] = 3000
    if monochrome1:
        stored = (4095 - stored).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = DX_IMAGE_STORAGE, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality = patient_name, patient_id, "DX"
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, cols, 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = stored.tobytes()
    path = storage / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return NewInstance(sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=DX_IMAGE_STORAGE,
                       study_instance_uid=ds.StudyInstanceUID, series_instance_uid=ds.SeriesInstanceUID,
                       transfer_syntax=ExplicitVRLittleEndian, calling_ae="MODALITY", path=rel,
                       sha256=f"{hash(ds.SOPInstanceUID):x}", size_bytes=path.stat().st_size,
                       patient_name=patient_name, patient_id=patient_id, modality="DX")


def findings_for(new: NewInstance, *, score: float, nodules: int = 0, rows: int = 320, cols: int = 256,
                 others: tuple[Other, ...] = ()) -> dict:
    """Findings as the pipeline stores them, with ``nodules`` boxes in full-res pixels."""
    return Findings(
        sop_instance_uid=new.sop_instance_uid, eligible=True,
        tb=TBResult(score=score, threshold=0.5, positive=score >= 0.5),
        nodules=[Nodule(box=[40.0 + 60 * i, 150.0, 80.0 + 60 * i, 190.0], score=0.8, diameter_mm=12.0,
                        diameter_px=40.0) for i in range(nodules)],
        others=list(others),
        timings_ms={"decode": 12.0, "tb": 30.0}, rows=rows, columns=cols,
        models=[ModelInfo("tb_classifier", "0.1.0", "onnxruntime"), ModelInfo("nodule_detector", "0.1.0", "onnxruntime")],
    ).to_dict()


def add_instance(journal: Journal, storage: Path, state: str, *, name: str = PATIENT_NAME,
                 pid: str = PATIENT_ID, score: float = 0.9, nodules: int = 1, reason: str | None = None,
                 deliveries: tuple[str, ...] = (), monochrome1: bool = False,
                 received_at: float | None = None, others: tuple[Other, ...] = ()) -> str:
    """Store a real DICOM file and move its journal row to ``state``; returns the SOP UID.

    "analyzing" claims the oldest received instance, which must be this one; final states
    are recorded directly (as the pipeline does after its claim).
    """
    new = write_dicom(storage, f"spool/{time.time_ns()}.dcm", patient_name=name, patient_id=pid,
                      monochrome1=monochrome1)
    journal.record_received(new, now=received_at)
    uid = new.sop_instance_uid
    if state == "received":
        return uid
    if state == "analyzing":
        claimed = journal.claim_next_instance()
        assert claimed is not None and claimed.sop_instance_uid == uid, "another instance was waiting"
        return uid
    findings = findings_for(new, score=score, nodules=nodules, others=others) if state == "analyzed" else None
    journal.finish_instance(uid, state, reason=reason, findings=findings, timings_ms={"store": 8.0})
    if deliveries:
        journal.add_deliveries(uid, [("sr", generate_uid(), "results/sr.dcm"),
                                     ("sc", generate_uid(), "results/sc.dcm")], deliveries)
    return uid


def fill_journal(journal: Journal, storage: Path) -> dict[str, str]:
    """One instance in each state; the analyzed one is the latest, the received one the oldest."""
    uids = {
        "skipped": add_instance(journal, storage, "skipped", name="SKIPPED^ONE", pid="S1", reason="lateral view"),
        "failed": add_instance(journal, storage, "failed", name="FAILED^ONE", pid="F1",
                               reason="pixel data could not be decoded"),
        "negative": add_instance(journal, storage, "analyzed", name="NEGATIVE^ONE", pid="N1", score=0.1,
                                 nodules=0, deliveries=("pacs",)),
        "analyzing": add_instance(journal, storage, "analyzing", name="ANALYZING^ONE", pid="A1"),
    }
    uids["analyzed"] = add_instance(journal, storage, "analyzed", score=0.93, nodules=2, deliveries=("pacs",))
    # still waiting since before the others arrived (claims take the oldest received first)
    uids["received"] = add_instance(journal, storage, "received", name="RECEIVED^ONE", pid="R1",
                                    received_at=time.time() - 60)
    return uids


def csrf_from(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, "no CSRF token in the page"
    return match.group(1)


def login(client, password: str, *, next_url: str = "") -> object:
    token = csrf_from(client.get("/login").get_data(as_text=True))
    return client.post("/login", data={"password": password, "csrf_token": token, "next": next_url})


# ---------------------------------------------------------------------------- fixtures

@pytest.fixture()
def web(tmp_path):
    """An app over a filled journal, with the password generated at first start."""
    config = make_config(tmp_path / "data", metrics_token="scrape-secret")
    journal = Journal(config.journal_path)
    uids = fill_journal(journal, config.storage_dir)
    password = ensure_password(config)
    metrics = Metrics()
    app = create_app(config, journal, metrics, models=[{"name": "tb_classifier", "version": "0.1.0",
                                                        "backend": "onnxruntime"}])
    app.config["TESTING"] = True
    yield {"app": app, "client": app.test_client(), "journal": journal, "uids": uids,
           "password": password, "config": config, "metrics": metrics}
    journal.close()


@pytest.fixture()
def logged_in(web):
    assert login(web["client"], web["password"]).status_code == 302
    return web


# ---------------------------------------------------------------------------- login

def test_password_generated_once_with_private_hash_file(tmp_path):
    config = make_config(tmp_path)
    password = ensure_password(config)
    assert password and len(password) >= 12
    hash_file = tmp_path / "web_password.hash"
    assert hash_file.stat().st_mode & 0o777 == 0o600
    assert password not in hash_file.read_text()
    assert ensure_password(config) is None          # second start: nothing new
    assert ensure_password(make_config(tmp_path / "x", password_hash="pbkdf2:sha256:1$a$b")) is None
    assert not (tmp_path / "x" / "web_password.hash").exists()


def test_pages_and_api_require_login(web):
    client = web["client"]
    page = client.get("/")
    assert page.status_code == 302 and "/login" in page.headers["Location"]
    detail = client.get(f"/instances/{web['uids']['analyzed']}")
    assert detail.status_code == 302
    for url in ("/api/status", "/api/instances", f"/api/instances/{web['uids']['analyzed']}",
                f"/image/{web['uids']['analyzed']}/thumb.jpg"):
        response = client.get(url)
        assert response.status_code in (401, 302), url
        if url.startswith("/api/"):
            assert response.status_code == 401 and response.get_json()["error"]
    assert client.get("/healthz").status_code == 200


def test_login_with_generated_password_and_wrong_one(web):
    client = web["client"]
    wrong = login(client, web["password"] + "x")
    assert wrong.status_code == 401
    assert client.get("/api/instances").status_code == 401
    ok = login(client, web["password"], next_url="/instances/x")
    assert ok.status_code == 302 and ok.headers["Location"].endswith("/instances/x")
    assert client.get("/api/instances").status_code == 200
    offsite = login(client, web["password"], next_url="//evil.example/")
    assert offsite.headers["Location"] == "/"


def test_configured_hash_is_used(tmp_path):
    from werkzeug.security import generate_password_hash
    config = make_config(tmp_path, password_hash=generate_password_hash("room-7-secret"))
    journal = Journal(config.journal_path)
    client = create_app(config, journal, Metrics()).test_client()
    assert login(client, "room-7-secret").status_code == 302
    assert not (tmp_path / "web_password.hash").exists()
    journal.close()


def test_post_without_csrf_token_is_rejected(logged_in):
    client, journal, uid = logged_in["client"], logged_in["journal"], logged_in["uids"]["analyzed"]
    assert client.post(f"/instances/{uid}/resend").status_code == 403
    assert client.post(f"/api/instances/{uid}/resend", headers={"X-CSRF-Token": "forged"}).status_code == 403
    assert client.post("/login", data={"password": logged_in["password"]}).status_code == 403
    assert {d.state for d in journal.deliveries_for(uid)} == {"pending"}   # nothing changed


# ---------------------------------------------------------------------------- actions

def test_resend_and_retry_change_the_journal(logged_in):
    client, journal, uids = logged_in["client"], logged_in["journal"], logged_in["uids"]
    token = csrf_from(client.get(f"/instances/{uids['analyzed']}").get_data(as_text=True))
    first = journal.deliveries_for(uids["analyzed"])[0]
    journal.mark_delivery_failed(first.id, "association rejected", retry_at=None)   # gave up
    assert journal.get_delivery(first.id).state == "gave_up"

    response = client.post(f"/deliveries/{first.id}/retry", data={"csrf_token": token})
    assert response.status_code == 302
    assert journal.get_delivery(first.id).state == "retrying"

    for d in journal.deliveries_for(uids["analyzed"]):
        journal.mark_delivery_sent(d.id)
    response = client.post(f"/api/instances/{uids['analyzed']}/resend", headers={"X-CSRF-Token": token})
    assert response.status_code == 200 and response.get_json() == {"action": "resend", "count": 2, "ok": True}
    assert {d.state for d in journal.deliveries_for(uids["analyzed"])} == {"pending"}

    # no deliveries yet: "resend" analyzes the image again
    response = client.post(f"/instances/{uids['failed']}/resend", data={"csrf_token": token})
    assert response.status_code == 302
    assert journal.find_instance(uids["failed"]).state == "received"
    # still being analyzed: nothing to do
    response = client.post(f"/api/instances/{uids['analyzing']}/resend", headers={"X-CSRF-Token": token})
    assert response.status_code == 409 and journal.find_instance(uids["analyzing"]).state == "analyzing"


# ---------------------------------------------------------------------------- API

def test_api_instances_newest_first_with_page_fields(logged_in):
    client, uids = logged_in["client"], logged_in["uids"]
    data = client.get("/api/instances?limit=10").get_json()
    items = data["instances"]
    assert [i["sop_instance_uid"] for i in items[:2]] == [uids["analyzed"], uids["analyzing"]]
    by_uid = {i["sop_instance_uid"]: i for i in items}
    latest = by_uid[uids["analyzed"]]
    assert latest["result"] == "refer" and latest["tb_score"] == pytest.approx(0.93)
    assert latest["nodule_count"] == 2 and latest["patient_name"] == "NGUYEN VAN AN"
    assert latest["patient_id"] == PATIENT_ID and latest["delivery"] == "pending"
    assert latest["delivery_by_destination"] == {"pacs": "pending"} and latest["demonstration"] is True
    assert by_uid[uids["negative"]]["result"] == "no_signs"
    assert by_uid[uids["skipped"]]["reason_category"] == "lateral_view"
    assert by_uid[uids["failed"]]["result"] == "failed" and "decoded" in by_uid[uids["failed"]]["reason"]
    assert by_uid[uids["received"]]["nodule_count"] is None
    assert data["counts"]["analyzed"] == 2
    assert len(client.get("/api/instances?limit=2").get_json()["instances"]) == 2
    assert "limit" in client.get("/api/instances?limit=abc").get_json()["error"]
    assert client.get("/api/instances?limit=0").status_code == 400


def test_api_instance_detail_and_status(logged_in):
    client, uids = logged_in["client"], logged_in["uids"]
    detail = client.get(f"/api/instances/{uids['analyzed']}").get_json()
    assert len(detail["findings"]["nodules"]) == 2 and detail["timings_ms"]["store"] == 8.0
    assert {d["object_type"] for d in detail["deliveries"]} == {"sr", "sc"}
    assert client.get("/api/instances/1.2.3.4").status_code == 404
    status = client.get("/api/status").get_json()
    assert status["listener_up"] is True and status["queues"]["analysis"] == 2
    assert status["queues"]["delivery"] == {"pacs": 4}
    assert status["disk"]["free_bytes"] > 0
    assert status["models"][0]["name"] == "tb_classifier"
    assert [d["name"] for d in status["destinations"]] == ["pacs"]


def test_healthz_reports_listener_down(tmp_path):
    config = make_config(tmp_path)
    journal = Journal(config.journal_path)
    client = create_app(config, journal, Metrics(), listener_up=lambda: False).test_client()
    response = client.get("/healthz")
    assert response.status_code == 503
    assert response.get_json()["status"] != "ok" and "listener" in " ".join(response.get_json()["problems"])
    journal.close()


# ---------------------------------------------------------------------------- pages

def test_language_from_browser_cookie_and_config(logged_in, tmp_path):
    client, uid = logged_in["client"], logged_in["uids"]["analyzed"]
    english = client.get(f"/instances/{uid}", headers={"Accept-Language": "en-US,en;q=0.9"}).get_data(as_text=True)
    assert "REFER for TB testing" in english
    browser_vi = client.get(f"/instances/{uid}", headers={"Accept-Language": "vi-VN,vi;q=0.9,en;q=0.5"})
    assert "CHUYỂN XÉT NGHIỆM LAO" in browser_vi.get_data(as_text=True)
    switch = client.get(f"/lang/vi?next=/instances/{uid}", headers={"Accept-Language": "en"})
    assert switch.status_code == 302 and "lang=vi" in switch.headers["Set-Cookie"]
    page = client.get(f"/instances/{uid}", headers={"Accept-Language": "en"}).get_data(as_text=True)
    assert "CHUYỂN XÉT NGHIỆM LAO" in page and 'lang="vi"' in page
    negative = client.get(f"/instances/{logged_in['uids']['negative']}").get_data(as_text=True)
    assert "Không có dấu hiệu lao" in negative

    config = make_config(tmp_path / "forced", language="vi")
    journal = Journal(config.journal_path)
    forced = create_app(config, journal, Metrics()).test_client()
    login_page = forced.get("/login", headers={"Accept-Language": "en"}).get_data(as_text=True)
    assert "Mật khẩu" in login_page and "/lang/en" not in login_page
    journal.close()


def test_board_and_detail_pages(logged_in):
    client, uids = logged_in["client"], logged_in["uids"]
    board = client.get("/").get_data(as_text=True)
    assert 'id="latest"' in board and "app.js" in board
    skipped = client.get(f"/instances/{uids['skipped']}", headers={"Accept-Language": "vi"}).get_data(as_text=True)
    assert "phim chụp nghiêng" in skipped
    assert client.get("/instances/1.2.3").status_code == 404


def test_annotated_thumbnail_rendered_and_cached(logged_in):
    client, config, journal = logged_in["client"], logged_in["config"], logged_in["journal"]
    uid = add_instance(journal, config.storage_dir, "analyzed", monochrome1=True, nodules=1)
    url = client.get(f"/api/instances/{uid}").get_json()["thumbnail_url"]
    response = client.get(url)
    assert response.status_code == 200 and response.mimetype == "image/jpeg"
    picture = Image.open(io.BytesIO(response.data))
    assert picture.mode == "RGB" and max(picture.size) <= 512
    cached = list((config.storage_dir / "thumbs").glob("*.jpg"))
    assert len(cached) == 1
    # MONOCHROME1 shown inverted: the square (low stored values) is bright, the rest dark
    gray = np.asarray(picture.convert("L"), dtype=np.float32)
    width = picture.size[0]
    image_h = round(320 * width / 256)
    top = gray.shape[0] - image_h                    # the banner above the image
    square = gray[top + image_h // 8 + 4: top + image_h // 4 - 4, width // 8 + 4: width // 4 - 4]
    background = gray[-20:-5, -40:-5]
    assert square.mean() > background.mean() + 100
    # the nodule box is drawn in colour
    rgb = np.asarray(picture, dtype=np.int16)
    assert (np.abs(rgb[..., 0] - rgb[..., 2]) > 100).sum() > 50
    again = client.get(url)
    assert again.data == response.data and len(list((config.storage_dir / "thumbs").glob("*.jpg"))) == 1
    # unanalyzed instances show the plain image; missing files are a 404, not a crash
    plain_url = client.get(f"/api/instances/{logged_in['uids']['received']}").get_json()["thumbnail_url"]
    assert client.get(plain_url).status_code == 200
    (config.storage_dir / journal.find_instance(uid).path).unlink()
    journal.finish_instance(uid, "failed", reason="gone")
    assert client.get(client.get(f"/api/instances/{uid}").get_json()["thumbnail_url"]).status_code == 404


def test_image_cache_keeps_the_most_recently_used(tmp_path):
    from edge.web.images import ImageCache
    journal = Journal(tmp_path / "journal.sqlite3")
    cache = ImageCache(tmp_path, max_files=2)
    rows = [journal.find_instance(add_instance(journal, tmp_path, "analyzed", nodules=0)) for _ in range(3)]
    first = cache.path_for(rows[0], "thumb")
    cache.path_for(rows[1], "thumb")
    time.sleep(0.02)
    assert cache.path_for(rows[0], "thumb") == first     # a hit: now the most recent
    cache.path_for(rows[2], "thumb")
    assert cache.prune() == 1
    assert first.exists() and len(list((tmp_path / "thumbs").glob("*.jpg"))) == 2
    journal.close()


# ---------------------------------------------------------------------------- metrics

def test_metrics_names_token_and_no_patient_data(logged_in, caplog):
    caplog.set_level(logging.DEBUG)
    client, metrics = logged_in["client"], logged_in["metrics"]
    metrics.instance_received("MODALITY")
    metrics.instance_finished("skipped", "lateral view (ViewPosition LL)")
    metrics.instance_finished("analyzed")
    metrics.observe_stage("tb", 0.031)
    metrics.delivery_outcome("pacs", "sent")
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    response = client.get("/metrics", headers={"Authorization": "Bearer scrape-secret"})
    assert response.status_code == 200
    text = response.get_data(as_text=True)
    for name in ("edge_instances_received_total", "edge_instances_analyzed_total",
                 "edge_instances_skipped_total", "edge_instances_failed_total", "edge_stage_seconds_bucket",
                 "edge_end_to_end_seconds_bucket", "edge_deliveries_total", "edge_model_info",
                 "edge_queue_depth", "edge_oldest_pending_delivery_age_seconds", "edge_disk_free_bytes"):
        assert name in text, name
    assert 'edge_instances_skipped_total{reason="lateral_view"} 1.0' in text
    assert 'edge_queue_depth{destination="",queue="analysis"} 2.0' in text
    assert 'edge_queue_depth{destination="pacs",queue="delivery"} 4.0' in text
    # exercise every page and API once more so their logs are captured too
    client.get("/"), client.get("/api/instances"), client.get("/api/status")
    for uid in logged_in["uids"].values():
        client.get(f"/instances/{uid}")
        client.get(f"/api/instances/{uid}")
    for secret in (PATIENT_NAME, "NGUYEN", PATIENT_ID, "R1\"", *logged_in["uids"].values()):
        assert secret not in text
    for secret in (PATIENT_NAME, "NGUYEN", PATIENT_ID, "SKIPPED^ONE", logged_in["password"]):
        assert secret not in caplog.text


def test_triage_reasons_map_to_fixed_categories(tmp_path):
    """The reasons edge.triage really writes land in named categories, never in "other"."""
    from edge.metrics import SKIP_REASONS, skip_reason_category
    from edge.triage import TriageRules, triage

    ok = TriageRules(min_side_px=64, max_side_px=400)
    new = write_dicom(tmp_path, "a.dcm", patient_name="A^B", patient_id="1")   # 256 x 320 DX
    assert triage(pydicom.dcmread(tmp_path / new.path), ok) is None

    def reason(rules: TriageRules = ok, **changes) -> str:
        ds = pydicom.dcmread(tmp_path / new.path)
        for key, value in changes.items():
            setattr(ds, key, value)
        text = triage(ds, rules)
        assert text, changes
        return text

    expected = {
        "lateral_view": reason(ViewPosition="LL"),
        "wrong_modality": reason(Modality="MR"),
        "not_chest": reason(BodyPartExamined="HAND"),
        "view_position": reason(ViewPosition="OBL"),
        "patient_age": reason(PatientAge="006Y"),
        "image_too_small": reason(TriageRules(min_side_px=300, max_side_px=400)),
        "image_too_large": reason(TriageRules(min_side_px=64, max_side_px=300)),
        "multi_frame": reason(NumberOfFrames=3),
        "unsupported_pixels": reason(PhotometricInterpretation="RGB"),
    }
    for category, text in expected.items():
        assert skip_reason_category(text) == category, text
    assert skip_reason_category("something new") == "other" and "other" in SKIP_REASONS
    metrics = Metrics()
    for text in expected.values():
        metrics.instance_finished("skipped", text)
    labels = {s.labels["reason"] for m in metrics.registry.collect() for s in m.samples
              if s.name == "edge_instances_skipped_total"}
    assert labels == set(expected)


def test_metrics_open_without_token(tmp_path):
    config = make_config(tmp_path)
    journal = Journal(config.journal_path)
    metrics = Metrics()
    metrics.observe_end_to_end(1.2)
    client = create_app(config, journal, metrics).test_client()
    text = client.get("/metrics").get_data(as_text=True)
    assert "edge_end_to_end_seconds_count 1.0" in text
    assert metrics.registry.get_sample_value("edge_end_to_end_seconds_count") == 1.0
    with pytest.raises(ValueError, match="state"):
        metrics.instance_finished("done")
    with pytest.raises(ValueError, match="outcome"):
        metrics.delivery_outcome("pacs", "lost")
    journal.close()


# ---------------------------------------------------------------------------- health

def test_platform_read_from_jetson_style_sysfs(tmp_path):
    from edge.health import read_platform
    for i, (kind, milli) in enumerate((("CPU-therm", "45500"), ("GPU-therm", "51250"), ("PMIC-Die", "-256000"))):
        zone = tmp_path / "thermal" / f"thermal_zone{i}"
        zone.mkdir(parents=True)
        (zone / "type").write_text(kind + "\n")
        (zone / "temp").write_text(milli + "\n")
    (tmp_path / "load").write_text("523\n")
    info = read_platform(tmp_path / "thermal", tmp_path / "load", use_jtop=False)
    assert info["source"] == "sysfs" and info["gpu_utilization_percent"] == pytest.approx(52.3)
    assert info["temperatures"] == [{"name": "CPU-therm", "celsius": 45.5}, {"name": "GPU-therm", "celsius": 51.25}]
    nothing = read_platform(tmp_path / "absent", tmp_path / "absent", use_jtop=False)
    assert nothing["temperatures"] == [] and nothing["gpu_utilization_percent"] is None or nothing["source"] == "nvidia-smi"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not shutil.which("storescp"), reason="DCMTK storescp is not installed")
def test_health_monitor_echoes_in_background(tmp_path):
    """C-ECHO against a real DCMTK storescp, a silent peer and a closed port; never blocks."""
    pacs_port, closed_port = free_port(), free_port()
    scp = subprocess.Popen(["storescp", "-aet", "PACS", "--output-directory", str(tmp_path), str(pacs_port)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)                       # accepts TCP, never answers the association
    config = Config(storage=StorageConfig(dir=str(tmp_path), min_free_mb=1), destinations=(
        Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=pacs_port),
        Destination(name="silent", ae_title="SILENT", host="127.0.0.1", port=silent.getsockname()[1]),
        Destination(name="down", ae_title="DOWN", host="127.0.0.1", port=closed_port)))
    journal = Journal(config.journal_path)
    monitor = HealthMonitor(config, journal, models=[], echo_timeout_s=1.5)
    metrics = Metrics()
    metrics.watch_journal(journal, tmp_path, destinations=["pacs"], health=monitor.snapshot)
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:   # storescp is listening once a TCP connect works
            try:
                socket.create_connection(("127.0.0.1", pacs_port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        monitor.start()
        while True:
            started = time.monotonic()
            snap = {d["name"]: d for d in monitor.snapshot()["destinations"]}
            assert time.monotonic() - started < 0.3, "snapshot waited on a C-ECHO"
            if snap["pacs"]["reachable"] is not None or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert snap["pacs"]["reachable"] is True
        assert snap["silent"]["reachable"] is None        # still waiting for the silent peer
        deadline = time.monotonic() + 10
        while monitor.snapshot()["checked_at"] is None and time.monotonic() < deadline:
            time.sleep(0.1)
        final = monitor.snapshot()
        reach = {d["name"]: d["reachable"] for d in final["destinations"]}
        assert reach == {"pacs": True, "silent": False, "down": False}
        assert "destination_unreachable:silent" in final["problems"] and not final["ok"]
        assert metrics.registry.get_sample_value("edge_destination_reachable", {"destination": "pacs"}) == 1.0
        assert metrics.registry.get_sample_value("edge_destination_reachable", {"destination": "down"}) == 0.0
    finally:
        monitor.stop()
        scp.terminate()
        scp.wait(timeout=10)
        silent.close()
        journal.close()


def test_detail_page_shows_a_conflict_and_replaced_results(logged_in):
    """The same SOP Instance UID received with other bytes, analysed twice: the page says
    so, lists the earlier objects as replaced, and the summary counts only current ones."""
    journal, storage = logged_in["journal"], logged_in["config"].storage_dir
    uid = add_instance(journal, storage, "received")
    row = journal.find_instance(uid)
    first = [("sr", "2.25.1", "results/a.dcm", "pacs"), ("gsps", "2.25.2", "results/b.dcm", "pacs")]
    journal.claim_next_instance()
    journal.complete_analysis(uid, findings={}, timings_ms={}, plan=first)
    journal.mark_delivery_sent(journal.deliveries_for(uid)[0].id)
    new = NewInstance(**{**{f: getattr(row, f) for f in NewInstance.__dataclass_fields__},
                         "sha256": "f" * 64, "path": "spool/other.dcm"})
    assert journal.record_received(new) == "conflict"
    journal.claim_next_instance()
    journal.complete_analysis(uid, findings={}, timings_ms={},
                              plan=[("sr", "2.25.3", "results/c.dcm", "pacs"),
                                    ("gsps", "2.25.4", "results/d.dcm", "pacs")])
    states = {d.result_uid: (d.state, d.current) for d in journal.deliveries_for(uid)}
    assert states == {"2.25.1": ("sent", False), "2.25.2": ("superseded", False),
                      "2.25.3": ("pending", True), "2.25.4": ("pending", True)}
    assert journal.delivery_summary(uid) == "pending"
    assert len(journal.instance_versions(uid)) == 1
    html = logged_in["client"].get(f"/instances/{uid}").get_data(as_text=True)
    assert "received 1 more time(s) with different content" in html
    assert 'id="replaced-deliveries"' in html and "2.25.1" in html and "replaced, not sent" in html
    detail = logged_in["client"].get(f"/api/instances/{uid}").get_json()
    assert detail["conflicts"] == 1 and {d["result_uid"] for d in detail["deliveries"]} == {"2.25.3", "2.25.4"}
    assert journal.resend_instance_results(uid) == 2   # only the current objects are resent


def test_a_forwarded_image_is_a_delivery_of_type_source(logged_in):
    """Router mode: the image itself is shown per destination like its results."""
    client, journal, storage = logged_in["client"], logged_in["journal"], logged_in["config"].storage_dir
    new = write_dicom(storage, "spool/routed.dcm", patient_name="ROUTED^ONE", patient_id="R9")
    journal.record_received(new, forward_to=("pacs",))
    journal.finish_instance(new.sop_instance_uid, "skipped", reason="lateral view")
    source = journal.source_deliveries(new.sop_instance_uid)[0]
    journal.mark_delivery_failed(source.id, "cannot connect to PACS", retry_at=time.time() + 60)
    view = client.get(f"/api/instances/{new.sop_instance_uid}").get_json()
    assert view["forwarding"] == "retrying" and view["delivery"] == "retrying"
    assert [(d["object_type"], d["destination"], d["state"]) for d in view["deliveries"]] == [
        ("source", "pacs", "retrying")]
    page = client.get(f"/instances/{new.sop_instance_uid}").get_data(as_text=True)
    assert 'id="forwarding"' in page and "<td>source</td>" in page and "cannot connect to PACS" in page
    listed = {v["sop_instance_uid"]: v for v in client.get("/api/instances").get_json()["instances"]}
    assert listed[new.sop_instance_uid]["forwarding"] == "retrying"
    analysed = listed[logged_in["uids"]["analyzed"]]
    assert analysed["forwarding"] == "none"      # not routed


def test_emr_and_forwarding_rule_deliveries_are_shown(logged_in):
    """A FHIR transaction to the EMR and an image forwarded by a [[forward]] rule are
    listed per destination with the rule's name (English and Vietnamese)."""
    client, journal, storage = logged_in["client"], logged_in["journal"], logged_in["config"].storage_dir
    uid = add_instance(journal, storage, "received")
    row = journal.find_instance(uid)
    journal.claim_next_instance()
    journal.complete_analysis(uid, findings={}, timings_ms={}, plan=[
        ("fhir", "b1", "results/fhir_b1.json", "emr"),
        ("source", uid, row.path, "centre", "tb-to-province"),
        ("sr", "2.25.7", "results/sr.dcm", "centre", "tb-to-province")])
    emr = [d for d in journal.deliveries_for(uid) if d.destination == "emr"][0]
    journal.mark_delivery_failed(emr.id, "HTTP 422 from the EMR: error: no Patient", retry_at=None)
    page = client.get(f"/instances/{uid}").get_data(as_text=True)
    assert "<td>emr</td><td>fhir</td>" in page and "HTTP 422 from the EMR: error: no Patient" in page
    assert page.count("(rule: tb-to-province)") == 2
    client.get(f"/lang/vi?next=/instances/{uid}")
    vi = client.get(f"/instances/{uid}").get_data(as_text=True)
    client.get(f"/lang/en?next=/instances/{uid}")
    assert "(quy tắc: tb-to-province)" in vi
    # a second analysis does not queue the forwarded image again
    journal.mark_delivery_sent([d for d in journal.deliveries_for(uid) if d.is_source][0].id)
    journal.requeue_instance(uid)
    journal.claim_next_instance()
    journal.complete_analysis(uid, findings={}, timings_ms={}, plan=[
        ("source", uid, row.path, "centre", "tb-to-province")])
    sources = [d for d in journal.deliveries_for(uid) if d.is_source]
    assert [(d.state, d.rule) for d in sources] == [("sent", "tb-to-province")]


# ---------------------------------------------------------------------------- other findings

MASS_CODE = {"value": "4147007", "scheme": "SCT", "meaning": "Mass"}


def other_findings() -> tuple[Other, ...]:
    """A referring mass (detection), a positive consolidation that does not refer, a negative
    effusion, and a display name that must be escaped."""
    return (
        Other(label="effusion", display="Pleural effusion", kind="classification", score=0.12,
              threshold=0.5, positive=False, model="cxr_classifier"),
        Other(label="mass", display="Mass", kind="detection", score=0.81, threshold=0.4, positive=True,
              refer=True, code=MASS_CODE, model="cxr_detector", box=[120.0, 60.0, 176.0, 118.0],
              diameter_mm=23.4, diameter_px=57.0),
        Other(label="consolidation", display="Consolidation <b>", kind="classification", score=0.66,
              threshold=0.5, positive=True, model="cxr_classifier"),
    )


def test_a_refer_raised_by_another_finding_names_it(logged_in):
    """TB negative, a mass refers: the flag is a refer that says why (not the TB words), and
    the page and the API list every other finding with score, result and size."""
    client, journal, storage = logged_in["client"], logged_in["journal"], logged_in["config"].storage_dir
    uid = add_instance(journal, storage, "analyzed", score=0.2, nodules=0, others=other_findings())

    listed = client.get("/api/instances").get_json()["instances"][0]
    assert listed["sop_instance_uid"] == uid
    assert listed["result"] == "refer" and listed["refer"] is True and listed["tb_positive"] is False
    assert listed["refer_reasons"] == ["Mass"]
    assert [(o["label"], o["positive"], o["refer"]) for o in listed["other_findings"]] == [
        ("mass", True, True), ("consolidation", True, False), ("effusion", False, False)]
    assert listed["other_findings"][0]["diameter_mm"] == pytest.approx(23.4)
    detail = client.get(f"/api/instances/{uid}").get_json()
    assert detail["refer_reasons"] == ["Mass"]
    assert {o["label"]: o["code"] for o in detail["findings"]["others"]}["mass"] == MASS_CODE

    english = client.get(f"/instances/{uid}", headers={"Accept-Language": "en"}).get_data(as_text=True)
    flag = re.search(r'<div class="flag" id="flag">([^<]*)</div>', english).group(1)
    assert flag == "REFER: Mass" and "REFER for TB testing" not in english
    assert 'class="card result-refer detail"' in english
    table = english[english.index('id="other-findings"'):]
    table = table[:table.index("</table>")]
    assert "<h2>Other findings</h2>" in english
    for text in ("Mass", "23.4 mm", "120, 60, 176, 118", "positive · refer", "Pleural effusion",
                 "negative", "0.12 (threshold 0.50)", "Consolidation &lt;b&gt;"):
        assert text in table, text
    assert table.index("Mass") < table.index("Pleural effusion")   # positive ones first
    assert "<b>" not in table

    vietnamese = client.get(f"/instances/{uid}", headers={"Accept-Language": "vi"}).get_data(as_text=True)
    flag = re.search(r'<div class="flag" id="flag">([^<]*)</div>', vietnamese).group(1)
    assert flag == "CHUYỂN TUYẾN: Mass" and "CHUYỂN XÉT NGHIỆM LAO" not in vietnamese
    for text in ("Phát hiện khác", "dương tính · chuyển tuyến", "âm tính", "ngưỡng 0.50",
                 "Kết quả"):
        assert text in vietnamese, text

    board = client.get("/", headers={"Accept-Language": "vi"}).get_data(as_text=True)
    assert "<th>Phát hiện khác</th>" in board
    strings = json.loads(re.search(r'<script type="application/json" id="i18n">(.*?)</script>', board, re.S).group(1))
    assert strings["refer_for"] == "CHUYỂN TUYẾN: {reasons}" and strings["other_findings"] == "Phát hiện khác"


def test_tb_refer_keeps_its_words_and_adds_other_reasons(logged_in):
    client, journal, storage = logged_in["client"], logged_in["journal"], logged_in["config"].storage_dir
    uid = add_instance(journal, storage, "analyzed", score=0.9, nodules=1, others=other_findings())
    view = client.get(f"/api/instances/{uid}").get_json()
    assert view["result"] == "refer" and view["tb_positive"] is True
    assert view["refer_reasons"] == ["Tuberculosis", "Mass"]
    english = client.get(f"/instances/{uid}", headers={"Accept-Language": "en"}).get_data(as_text=True)
    assert re.search(r'id="flag">REFER for TB testing</div>', english)
    assert re.search(r'id="refer-also">Also refer for: Mass</div>', english)
    vietnamese = client.get(f"/instances/{uid}", headers={"Accept-Language": "vi"}).get_data(as_text=True)
    assert re.search(r'id="flag">CHUYỂN XÉT NGHIỆM LAO</div>', vietnamese)
    assert re.search(r'id="refer-also">Cũng chuyển tuyến vì: Mass</div>', vietnamese)


def test_other_findings_that_do_not_refer_leave_the_tb_result(logged_in):
    client, journal, storage = logged_in["client"], logged_in["journal"], logged_in["config"].storage_dir
    quiet = tuple(o for o in other_findings() if not o.refer)
    uid = add_instance(journal, storage, "analyzed", score=0.1, nodules=0, others=quiet)
    view = client.get(f"/api/instances/{uid}").get_json()
    assert view["result"] == "no_signs" and view["refer"] is False and view["refer_reasons"] == []
    assert [o["label"] for o in view["other_findings"]] == ["consolidation", "effusion"]
    page = client.get(f"/instances/{uid}", headers={"Accept-Language": "en"}).get_data(as_text=True)
    assert re.search(r'id="flag">No TB signs</div>', page) and "Consolidation &lt;b&gt;" in page
    # rows without others (stored before models declared them) show no such section
    old = client.get(f"/instances/{logged_in['uids']['negative']}").get_data(as_text=True)
    assert 'id="other-findings"' not in old
    assert client.get(f"/api/instances/{logged_in['uids']['negative']}").get_json()["other_findings"] == []


def test_findings_counter_by_label_and_kind(logged_in):
    """Positive findings counted once per image and label; refers from any finding counted."""
    client, metrics = logged_in["client"], logged_in["metrics"]
    registry = metrics.registry
    metrics.declare_findings([("mass", "detection"), ("effusion", "classification")])
    assert registry.get_sample_value("edge_findings_total", {"label": "effusion", "kind": "classification"}) == 0.0
    assert registry.get_sample_value("edge_instances_referred_total") == 0.0

    second_mass = Other(label="mass", display="Mass", kind="detection", score=0.55, threshold=0.4,
                        positive=True, refer=True, box=[10.0, 10.0, 30.0, 30.0], diameter_px=20.0)

    def findings(score: float, *others: Other, nodules: int = 0) -> Findings:
        return Findings(sop_instance_uid="2.25.9", eligible=True,
                        tb=TBResult(score=score, threshold=0.5, positive=score >= 0.5),
                        nodules=[Nodule(box=[1.0, 1.0, 9.0, 9.0], score=0.7)] * nodules, others=list(others))

    metrics.findings_observed(findings(0.2, *other_findings(), second_mass))   # refer by the mass only
    metrics.findings_observed(findings(0.9, nodules=2))                          # refer by TB
    metrics.findings_observed(findings(0.1))                                     # nothing
    odd = Other(label='mass"}\n', display="?", kind="segmentation", score=1.0, threshold=0.5, positive=True)
    metrics.findings_observed(findings(0.1, odd))

    def value(label: str, kind: str) -> float | None:
        return registry.get_sample_value("edge_findings_total", {"label": label, "kind": kind})

    assert value("mass", "detection") == 1.0                # two boxes, one image
    assert value("consolidation", "classification") == 1.0
    assert value("effusion", "classification") == 0.0       # negative: not counted
    assert value("tuberculosis", "classification") == 1.0 and value("nodule", "detection") == 1.0
    assert value("invalid", "other") == 1.0                 # never the raw text
    assert registry.get_sample_value("edge_instances_referred_total") == 2.0
    text = client.get("/metrics", headers={"Authorization": "Bearer scrape-secret"}).get_data(as_text=True)
    assert 'edge_findings_total{kind="detection",label="mass"} 1.0' in text
    assert "edge_instances_referred_total 2.0" in text
    assert 'label="invalid"' in text and 'mass\\"' not in text
