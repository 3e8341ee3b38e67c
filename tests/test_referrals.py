"""Referral follow-up, daily figures and drift: pages and JSON through Flask's test client,
the referral list, CSV export and a Vietnamese referral slip printed to PDF in Chromium, the
metrics, and the Prometheus alert rules checked by promtool and loaded by a real Prometheus.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import re
import shutil
import subprocess
import time
import unicodedata
from datetime import date, timedelta
from pathlib import Path

import pytest
import requests

from edge.config import Config
from edge.findings import Other
from edge.journal import Journal
from edge.metrics import Metrics
from edge.web import create_app, ensure_password, serve_web

from test_web import findings_for, login, make_config, write_dicom

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "firmware_scripts" / "edge-alerts.yml"
RULES_TEST = ROOT / "firmware_scripts" / "edge-alerts.test.yml"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
ARTIFACTS = ROOT / "test-artifacts"
MASS = Other(label="mass", display="Mass", kind="detection", score=0.8, threshold=0.5, positive=True,
             refer=True, box=[10.0, 10.0, 60.0, 60.0], diameter_px=50.0)


def add(journal: Journal, storage: Path, state: str, *, ae: str, name: str = "NGUYỄN^VĂN AN",
        pid: str = "VN-0001", score: float = 0.2, nodules: int = 0, reason: str | None = None,
        when: float | None = None, others=()) -> str:
    """A stored image from calling AE ``ae``, journaled and moved to ``state``."""
    ascii_name = unicodedata.normalize("NFKD", name.replace("Đ", "D")).encode("ascii", "ignore").decode()
    new = write_dicom(storage, f"spool/{time.time_ns()}.dcm", patient_name=ascii_name, patient_id=pid)
    new = dataclasses.replace(new, calling_ae=ae, patient_name=name)   # as the receiver decodes it
    journal.record_received(new, now=when)
    if state != "received":
        findings = findings_for(new, score=score, nodules=nodules, others=others) if state == "analyzed" else None
        journal.finish_instance(new.sop_instance_uid, state, reason=reason, findings=findings)
    return new.sop_instance_uid


def fill(journal: Journal, storage: Path) -> dict[str, str]:
    """Today: a van and a room; yesterday: one referral in the room."""
    now = time.time()
    yesterday = now - 86400
    return {
        "an": add(journal, storage, "analyzed", ae="VAN-02", score=0.91, nodules=1, when=now - 300),
        "binh": add(journal, storage, "analyzed", ae="VAN-02", name="TRẦN^THỊ BÌNH", pid="VN-0002",
                    score=0.12, others=(MASS,), when=now - 200),
        "cuong": add(journal, storage, "analyzed", ae="VAN-02", name="LÊ^VĂN CƯỜNG", pid="VN-0003",
                     score=0.05, when=now - 100),
        "lateral": add(journal, storage, "skipped", ae="VAN-02", pid="VN-0004", reason="lateral view", when=now - 90),
        "child": add(journal, storage, "skipped", ae="ROOM-1", pid="VN-0005",
                     reason="patient under 15 years", when=now - 80),
        "dung": add(journal, storage, "analyzed", ae="ROOM-1", name="PHẠM^THỊ DUNG", pid="VN-0006",
                    score=0.77, when=now - 60),
        "yesterday": add(journal, storage, "analyzed", ae="ROOM-1", name="VŨ^THỊ HOA", pid="VN-0007",
                         score=0.66, when=yesterday),
    }


@pytest.fixture()
def site(tmp_path):
    config = make_config(tmp_path / "data", metrics_token="scrape-secret")
    journal = Journal(config.journal_path)
    uids = fill(journal, config.storage_dir)
    password = ensure_password(config)
    metrics = Metrics()
    app = create_app(config, journal, metrics)
    app.config["TESTING"] = True
    client = app.test_client()
    assert login(client, password).status_code == 302
    yield {"app": app, "client": client, "journal": journal, "uids": uids, "config": config,
           "metrics": metrics, "password": password}
    journal.close()


def test_screening_pages_and_api_need_login(tmp_path):
    config = make_config(tmp_path)
    journal = Journal(config.journal_path)
    client = create_app(config, journal, Metrics()).test_client()
    for url in ("/referrals", "/referrals.csv", "/referrals/1.2.3/slip", "/figures"):
        assert client.get(url).status_code == 302, url
    for url in ("/api/referrals", "/api/figures", "/api/threshold"):
        assert client.get(url).status_code == 401, url
    journal.close()


def test_referral_list_csv_and_slips(site):
    client, uids = site["client"], site["uids"]
    page = client.get("/referrals").get_data(as_text=True)
    assert "NGUYỄN VĂN AN" in page and "TRẦN THỊ BÌNH" in page and "PHẠM THỊ DUNG" in page
    assert "LÊ VĂN CƯỜNG" not in page and "VŨ THỊ HOA" not in page   # not referred / not today
    assert "VN-0001" in page and "0.91" in page and "Mass" in page
    api = client.get("/api/referrals").get_json()
    assert [p["sop_instance_uid"] for p in api["referrals"]] == [uids["an"], uids["binh"], uids["dung"]]
    assert api["referrals"][1]["reasons"] == ["Mass"] and api["referrals"][0]["reasons"] == ["Tuberculosis"]

    yesterday = (date.today() - timedelta(days=1)).isoformat()
    ranged = client.get(f"/api/referrals?from={yesterday}&to={date.today().isoformat()}").get_json()
    assert len(ranged["referrals"]) == 4 and ranged["referrals"][0]["patient_name"] == "VŨ THỊ HOA"
    assert client.get("/api/referrals?from=28/11/2026").status_code == 400
    assert client.get(f"/api/referrals?from={date.today()}&to={yesterday}").status_code == 400

    response = client.get("/referrals.csv")
    assert response.status_code == 200 and response.mimetype == "text/csv"
    assert f"referrals-{date.today().isoformat()}.csv" in response.headers["Content-Disposition"]
    body = response.get_data(as_text=True)
    assert body.startswith("\ufeff")
    rows = list(csv.DictReader(io.StringIO(body[1:])))
    assert [r["patient_name"] for r in rows] == ["NGUYỄN VĂN AN", "TRẦN THỊ BÌNH", "PHẠM THỊ DUNG"]
    assert rows[0]["tb_score"] == "0.9100" and rows[0]["calling_ae"] == "VAN-02" and rows[0]["result"] == ""

    slip_vi = client.get(f"/referrals/{uids['an']}/slip?lang=vi").get_data(as_text=True)
    assert "PHIẾU CHUYỂN XÉT NGHIỆM LAO" in slip_vi and "CHUYỂN XÉT NGHIỆM LAO" in slip_vi
    assert "NGUYỄN VĂN AN" in slip_vi and "xét nghiệm đờm" in slip_vi
    slip_en = client.get(f"/referrals/{uids['binh']}/slip?lang=en").get_data(as_text=True)
    assert "REFERRAL FOR TB TESTING" in slip_en and "REFER: Mass" in slip_en
    detail = client.get(f"/instances/{uids['an']}").get_data(as_text=True)
    assert f"/referrals/{uids['an']}/slip?lang=vi" in detail           # from the technician's detail page
    assert "slip-links" not in client.get(f"/instances/{uids['cuong']}").get_data(as_text=True)
    assert client.get(f"/referrals/{uids['cuong']}/slip").status_code == 404   # not referred
    assert client.get(f"/referrals/{uids['an']}/slip?lang=fr").status_code == 404


def test_daily_figures_per_day_and_calling_ae(site):
    client = site["client"]
    yesterday = (date.today() - timedelta(days=1)).isoformat()
    data = client.get(f"/api/figures?from={yesterday}").get_json()
    assert data["total"]["received"] == 7 and data["total"]["referred"] == 4
    by_ae = {f["calling_ae"]: f for f in data["by_calling_ae"]}
    van, room = by_ae["VAN-02"], by_ae["ROOM-1"]
    assert (van["received"], van["analyzed"], van["skipped"], van["referred"], van["nodules_flagged"]) == (4, 3, 1, 2, 1)
    assert van["referral_rate"] == pytest.approx(2 / 3) and van["skipped_by_reason"] == {"lateral_view": 1}
    assert room["skipped_by_reason"] == {"patient_age": 1} and room["referred"] == 2
    assert [d["day"] for d in data["by_day"]] == [yesterday, date.today().isoformat()]
    today = data["by_day"][1]
    assert (today["received"], today["analyzed"], today["referred"]) == (6, 4, 3)
    cells = {(c["day"], c["calling_ae"]): c for c in data["by_day_and_calling_ae"]}
    assert cells[(yesterday, "ROOM-1")]["referred"] == 1 and len(cells) == 3

    page = client.get(f"/figures?from={yesterday}").get_data(as_text=True)
    assert "VAN-02" in page and "67%" in page and "lateral view" in page
    assert "Invalid dates" in client.get("/figures?from=yesterday").get_data(as_text=True)
    vi = client.get("/figures", headers={"Accept-Language": "vi"}).get_data(as_text=True)
    assert "Số liệu sàng lọc" in vi and "Tỷ lệ chuyển tuyến" in vi


def _calibrated(site, threshold: float, band=(0.1, 0.2, 0.3)) -> tuple:
    """The site's journal with an applied calibration, and a config running its threshold."""
    journal = site["journal"]
    calibration_id = journal.record_calibration(
        threshold=threshold, previous_threshold=None, rule="target_sensitivity", rule_value=0.9,
        data_sha256="ab" * 32, data_name="outcomes.csv", people=312, positives=41, negatives=271,
        config_path="/etc/edge/edge.toml",
        summary={"expected_referral_band": {"lower": band[0], "rate": band[1], "upper": band[2]}})
    config: Config = site["config"]
    config = dataclasses.replace(config, models=dataclasses.replace(config.models, tb_threshold=threshold))
    return calibration_id, config


def test_threshold_in_force_and_where_it_came_from(site):
    client, metrics = site["client"], site["metrics"]
    page = client.get("/").get_data(as_text=True)
    assert "TB threshold in force" in page and "0.50" in page and "the model&#39;s default" in page
    assert client.get("/api/threshold").get_json()["source"] == "manifest"
    assert metrics.registry.get_sample_value("edge_tb_threshold") == 0.5
    assert metrics.registry.get_sample_value("edge_tb_threshold_calibrated") == 0.0

    calibration_id, config = _calibrated(site, 0.42)
    app = create_app(config, site["journal"], Metrics())
    app.config["TESTING"] = True
    other = app.test_client()
    assert login(other, site["password"]).status_code == 302
    page = other.get("/", headers={"Accept-Language": "vi"}).get_data(as_text=True)
    assert "Ngưỡng lao đang dùng" in page and "0.42" in page
    assert f"hiệu chỉnh ngày {date.today().isoformat()} trên 312 người (41 người mắc lao)" in page
    assert "độ nhạy mục tiêu 90%" in page and "tỷ lệ dương tính lao dự kiến 20% (10%–30%)" in page
    info = other.get("/api/threshold").get_json()
    assert info["source"] == "calibration" and info["calibration"]["id"] == calibration_id
    registry = app.extensions["edge"].metrics.registry
    assert registry.get_sample_value("edge_tb_threshold") == 0.42
    assert registry.get_sample_value("edge_tb_threshold_calibrated") == 1.0
    assert registry.get_sample_value("edge_tb_expected_referral_rate_upper") == 0.3
    # today's TB-positive rate (2 of 4) is outside the expected 10-30%: the figures page says so
    assert "outside the rate the calibration expects (10%–30%)" in other.get("/figures").get_data(as_text=True)
    # a box still running the manifest's 0.5, its config file since calibrated: restart needed
    config_file = site["config"].storage_dir.parent / "edge.toml"
    config_file.write_text("[models]\ntb_threshold = 0.42\n")
    old_app = create_app(dataclasses.replace(site["config"], source=str(config_file)), site["journal"], Metrics())
    pending = old_app.extensions["screening"]["threshold"]
    assert pending.source == "manifest" and pending.pending.id == calibration_id
    old = old_app.test_client()
    assert login(old, site["password"]).status_code == 302
    assert "A newer calibration (" in old.get("/").get_data(as_text=True)


def test_metrics_per_calling_ae_and_tb_score_histogram(site):
    from edge.findings import Findings, Nodule, TBResult

    metrics = site["metrics"]
    referred = Findings("1.2.3", True, tb=TBResult(0.83, 0.5, True),
                        nodules=[Nodule([1, 1, 5, 5], 0.9)])
    metrics.instance_finished("analyzed", calling_ae="VAN-02")
    metrics.findings_observed(referred, calling_ae="VAN-02")
    metrics.instance_finished("analyzed", calling_ae="ROOM-1")
    metrics.findings_observed(Findings("1.2.4", True, tb=TBResult(0.07, 0.5, False)), calling_ae="ROOM-1")
    metrics.instance_finished("skipped", "lateral view", calling_ae="ROOM-1")
    metrics.instance_finished("failed", "pixel data", calling_ae="VAN-02")
    value = metrics.registry.get_sample_value
    assert value("edge_screening_analyzed_total", {"calling_ae": "VAN-02"}) == 1
    assert value("edge_screening_referred_total", {"calling_ae": "VAN-02"}) == 1
    assert value("edge_screening_nodules_flagged_total", {"calling_ae": "VAN-02"}) == 1
    assert value("edge_screening_referred_total", {"calling_ae": "ROOM-1"}) is None
    assert value("edge_screening_skipped_total", {"calling_ae": "ROOM-1", "reason": "lateral_view"}) == 1
    assert value("edge_screening_failed_total", {"calling_ae": "VAN-02"}) == 1
    assert value("edge_tb_score_count") == 2 and value("edge_tb_score_bucket", {"le": "0.1"}) == 1
    assert value("edge_tb_score_bucket", {"le": "0.85"}) == 2 and value("edge_tb_score_sum") == pytest.approx(0.9)
    text = site["client"].get("/metrics", headers={"Authorization": "Bearer scrape-secret"}).get_data(as_text=True)
    assert "edge_screening_referred_total" in text
    for person in ("NGUYỄN", "NGUYEN", "VN-0001"):   # no patient data in metric labels
        assert person not in text


@pytest.mark.skipif(not Path(PROMTOOL).exists(), reason="promtool is not installed")
def test_alert_rules_pass_promtool_check_and_unit_tests():
    check = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and "SUCCESS: 5 rules found" in check.stdout, check.stdout + check.stderr
    test = subprocess.run([PROMTOOL, "test", "rules", RULES_TEST.name], capture_output=True, text=True,
                          timeout=120, cwd=RULES_TEST.parent)
    assert test.returncode == 0 and "SUCCESS" in test.stdout, test.stdout + test.stderr


@pytest.mark.skipif(not Path(PROMETHEUS).exists(), reason="prometheus is not installed")
def test_real_prometheus_loads_the_rules_and_scrapes_the_band(site, tmp_path):
    from test_prometheus import free_port, query

    calibration_id, config = _calibrated(site, 0.42)
    server = serve_web(create_app(config, site["journal"], Metrics()), "127.0.0.1", 0)
    port = free_port()
    (tmp_path / "prometheus.yml").write_text(f"""
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files: ["{RULES}"]
scrape_configs:
  - job_name: edge
    authorization:
      credentials: scrape-secret
    static_configs:
      - targets: ["127.0.0.1:{server.port}"]
""")
    prom = subprocess.Popen([PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "wb"))
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        upper: list = []
        while time.monotonic() < deadline and not upper:
            assert prom.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
            try:
                upper = query(base, "edge_tb_expected_referral_rate_upper")
            except requests.RequestException:
                pass
            time.sleep(0.5)
        assert upper and float(upper[0]["value"][1]) == 0.3
        groups = requests.get(f"{base}/api/v1/rules", timeout=5).json()["data"]["groups"]
        (group,) = [g for g in groups if g["name"] == "edge-tb-screening"]
        assert len(group["rules"]) == 5
        assert all(r["health"] in ("ok", "unknown") for r in group["rules"]), group["rules"]
        alert = next(r for r in group["rules"] if r["type"] == "alerting")
        assert alert["name"] == "EdgeTBPositiveRateOutsideExpectedBand" and alert["duration"] == 6 * 3600
    finally:
        prom.terminate()
        try:
            prom.wait(timeout=10)
        except subprocess.TimeoutExpired:
            prom.kill()
        server.stop()


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
POPPLER = [shutil.which(t) for t in ("pdftoppm", "pdftotext", "pdffonts", "pdfinfo")]


def _nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="chromium is not installed")
@pytest.mark.skipif(not all(POPPLER), reason="poppler-utils (pdftoppm, pdftotext, pdffonts) are not installed")
def test_browser_referral_list_csv_and_vietnamese_slip_printed_to_pdf(site, tmp_path):
    from PIL import Image

    from test_web_browser import StatusPage

    server = serve_web(site["app"], "127.0.0.1", 0)
    try:
        with StatusPage(server.url, site["password"], tmp_path / "profile", locale="vi-VN") as browser:
            page = browser.page
            browser.login()
            assert "Ngưỡng lao đang dùng" in page.inner_text("#tb-threshold")
            browser.screenshot("status-page-threshold-vi.png")
            page.click("#nav-referrals")
            page.wait_for_selector("#referrals tbody tr")
            rows = page.locator("#referrals tbody tr")
            assert rows.count() == 3
            table = page.inner_text("#referrals")
            for expected in ("NGUYỄN VĂN AN", "TRẦN THỊ BÌNH", "PHẠM THỊ DUNG", "VN-0001", "0.91", "Mass"):
                assert expected in table, expected
            assert "3 người được chuyển tuyến" in page.inner_text("#referral-count")
            browser.screenshot("referrals-vi.png", full_page=True)

            assert "Lao" in table and "Tuberculosis" not in table   # the TB screen in Vietnamese
            with page.expect_download() as download:
                page.click("#export-csv")
            data = Path(download.value.path()).read_bytes()
            assert data.startswith(b"\xef\xbb\xbf")   # UTF-8 with BOM for spreadsheets
            people = list(csv.DictReader(io.StringIO(data.decode("utf-8-sig"))))
            assert [p["patient_name"] for p in people] == ["NGUYỄN VĂN AN", "TRẦN THỊ BÌNH", "PHẠM THỊ DUNG"]
            assert download.value.suggested_filename == f"referrals-{date.today().isoformat()}.csv"

            page.click("#nav-figures")
            page.wait_for_selector("#figures-by-ae")
            assert "VAN-02" in page.inner_text("#figures-by-ae") and "Số liệu sàng lọc" in page.inner_text("h1")
            browser.screenshot("figures-vi.png", full_page=True)
            page.go_back()
            page.wait_for_selector("#referrals tbody tr")
            page.locator("#referrals tbody tr").first.locator("a.slip-vi").click()
            page.wait_for_selector("#slip-title")
            assert page.inner_text("#slip-title") == "PHIẾU CHUYỂN XÉT NGHIỆM LAO"
            browser.screenshot("referral-slip-vi-screen.png", full_page=True)
            ARTIFACTS.mkdir(exist_ok=True)
            pdf = ARTIFACTS / "referral-slip-vi.pdf"
            page.pdf(path=str(pdf), format="A4", print_background=True)
            assert not browser.console_errors, browser.console_errors
    finally:
        server.stop()

    pdftoppm, pdftotext, pdffonts, pdfinfo = POPPLER
    info = subprocess.run([pdfinfo, str(pdf)], capture_output=True, text=True, check=True).stdout
    assert re.search(r"^Pages:\s+1$", info, re.M), info       # one slip, one page
    text = " ".join(_nfc(subprocess.run([pdftotext, str(pdf), "-"], capture_output=True, text=True,
                                        check=True).stdout).split())   # lines joined again
    for expected in ("PHIẾU CHUYỂN XÉT NGHIỆM LAO", "NGUYỄN VĂN AN", "VN-0001", "CHUYỂN XÉT NGHIỆM LAO",
                     "xét nghiệm đờm", "Kỹ thuật viên X-quang", "Đây là kết quả sàng lọc, không phải chẩn đoán."):
        assert expected in text, f"{expected!r} not in the PDF's text:\n{text}"
    assert "In / lưu thành PDF" not in text                       # the toolbar is not printed
    fonts = subprocess.run([pdffonts, str(pdf)], capture_output=True, text=True, check=True).stdout.splitlines()[2:]
    assert fonts and all(" yes " in f for f in fonts), fonts     # every font embedded
    vietnamese = subprocess.run(["fc-list", ":lang=vi", "family"], capture_output=True, text=True).stdout
    families = {name.strip() for line in vietnamese.splitlines() for name in line.split(",")}
    assert all(any(fam.replace(" ", "") in f.replace(" ", "") for fam in families) for f in fonts), (fonts, families)

    png = ARTIFACTS / "referral-slip-vi"
    subprocess.run([pdftoppm, "-png", "-r", "80", "-singlefile", str(pdf), str(png)], check=True)
    image = Image.open(f"{png}.png").convert("RGB")
    width, height = image.size
    assert abs(width / height - 210 / 297) < 0.01                # A4 portrait
    pixels = image.load()
    top = [pixels[x, y] for x in range(0, width, 4) for y in range(0, int(height * 0.04))]
    assert sum(1 for p in top if sum(p) < 200) < len(top) * 0.01   # no dark toolbar on paper
    red = sum(1 for x in range(0, width, 2) for y in range(0, height // 2, 2)
              if pixels[x, y][0] > 150 and pixels[x, y][1] < 80 and pixels[x, y][2] < 80)
    assert red > 100, "the red refer line and instruction box are missing"
    dark = sum(1 for x in range(0, width, 2) for y in range(0, height, 2) if sum(pixels[x, y]) < 200)
    assert dark > 2000, "the slip's text is missing from the rendered page"
