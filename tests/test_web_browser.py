"""The status page in a real headless Chromium (Playwright driving /usr/bin/chromium).

``StatusPage`` is the reusable part: give it the page's base URL and the password (of an
app started here, or of a running ``edge serve``), then ``login()``, ``wait_for_latest()``
and ``screenshot()``. Screenshots go to ``test-artifacts/`` (gitignored).
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge.journal import Journal
from edge.metrics import Metrics
from edge.web import create_app, ensure_password, serve_web

from test_web import add_instance, fill_journal, findings_for, make_config, write_dicom

playwright_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = os.environ.get("EDGE_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


class StatusPage:
    """A logged-in headless Chromium tab on the status page (use as a context manager)."""

    def __init__(self, base_url: str, password: str, profile_dir: Path, *, locale: str = "en-US",
                 viewport: tuple[int, int] = (1600, 1000)) -> None:
        self.base_url = base_url.rstrip("/")
        self.password = password
        self._pw = playwright_api.sync_playwright().start()
        self.context = self._pw.chromium.launch_persistent_context(
            str(profile_dir), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            locale=locale, viewport={"width": viewport[0], "height": viewport[1]})
        self.page = self.context.pages[0] if self.context.pages else self.context.new_page()
        self.console_errors: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.console_errors.append(m.text))
        self.page.on("pageerror", lambda e: self.console_errors.append(str(e)))
        self.page.on("response", lambda r: r.status >= 400 and self.console_errors.append(f"{r.status} {r.url}"))

    def __enter__(self) -> "StatusPage":
        return self

    def __exit__(self, *exc) -> None:
        self.context.close()
        self._pw.stop()

    def login(self) -> None:
        self.page.goto(self.base_url + "/")
        assert "/login" in self.page.url, f"expected the login form, got {self.page.url}"
        self.page.fill("#password", self.password)
        self.page.click("#login-button")
        self.page.wait_for_selector("#latest .card[data-uid]", timeout=10_000)

    def latest(self) -> dict[str, str]:
        """What the big card shows now: uid, flag text, patient name."""
        return self.page.evaluate("""() => {
            const card = document.querySelector('#latest .card');
            return {uid: card ? (card.dataset.uid || '') : '',
                    flag: (document.querySelector('#latest-flag') || {}).textContent || '',
                    patient: (document.querySelector('#latest-patient') || {}).textContent || ''};
        }""")

    def wait_for_latest(self, uid: str, flag: str, timeout_s: float = 5.0) -> float:
        """Seconds until the card shows instance ``uid`` with ``flag`` in its flag text."""
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            shown = self.latest()
            if shown["uid"] == uid and flag in shown["flag"]:
                return time.monotonic() - start
            time.sleep(0.05)
        raise AssertionError(f"card did not show {flag!r} for the new instance within {timeout_s} s;"
                             f" it shows {self.latest()}")

    def screenshot(self, name: str, full_page: bool = False) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / name
        self.page.screenshot(path=str(path), full_page=full_page)
        return path


@pytest.fixture()
def live_app(tmp_path):
    """The app over a filled journal, served by waitress on a free loopback port."""
    config = make_config(tmp_path / "data")
    journal = Journal(config.journal_path)
    uids = fill_journal(journal, config.storage_dir)
    password = ensure_password(config)
    app = create_app(config, journal, Metrics(),
                     models=[{"name": "tb_classifier", "version": "0.1.0", "backend": "onnxruntime"}])
    server = serve_web(app, "127.0.0.1", 0)
    yield {"url": server.url, "password": password, "journal": journal, "config": config, "uids": uids}
    server.stop()
    journal.close()


@pytest.mark.skipif(not shutil.which(CHROMIUM), reason=f"{CHROMIUM} is not installed")
def test_status_page_live_update_and_vietnamese(live_app, tmp_path):
    journal, storage = live_app["journal"], live_app["config"].storage_dir
    with StatusPage(live_app["url"], live_app["password"], tmp_path / "profile") as browser:
        browser.login()
        browser.wait_for_latest(live_app["uids"]["analyzed"], "REFER for TB testing", timeout_s=3)
        assert browser.latest()["patient"] == "NGUYEN VAN AN"
        thumb_ok = browser.page.wait_for_function(
            "() => { const i = document.querySelector('#latest img.thumb'); return i && i.complete && i.naturalWidth > 0; }",
            timeout=10_000)
        assert thumb_ok
        assert browser.page.locator("#health h2").count() == 1

        # a new image arrives and is analyzed: the card follows without a reload
        new = write_dicom(storage, "spool/new.dcm", patient_name="TRAN^THI BINH", patient_id="P-2")
        journal.record_received(new)
        browser.wait_for_latest(new.sop_instance_uid, "Waiting for analysis", timeout_s=3)
        journal.finish_instance(new.sop_instance_uid, "analyzed", findings=findings_for(new, score=0.12))
        elapsed = browser.wait_for_latest(new.sop_instance_uid, "No TB signs", timeout_s=5)
        assert elapsed < 2.0, f"the result took {elapsed:.2f} s to appear"
        assert browser.latest()["patient"] == "TRAN THI BINH"
        browser.screenshot("status-page-en.png")

        # the latest is refer again, then switch to Vietnamese
        uid = add_instance(journal, storage, "analyzed", name="LE^VAN CUONG", pid="P-3", score=0.88,
                           nodules=2, deliveries=("pacs",))
        browser.wait_for_latest(uid, "REFER for TB testing", timeout_s=3)
        browser.page.click("#lang-vi")
        browser.wait_for_latest(uid, "CHUYỂN XÉT NGHIỆM LAO", timeout_s=5)
        browser.page.wait_for_function(
            "() => { const i = document.querySelector('#latest img.thumb'); return i && i.complete && i.naturalWidth > 0; }",
            timeout=10_000)
        assert "Ảnh gần đây" in browser.page.inner_text("main")
        shot = browser.screenshot("status-page-vi.png")
        assert shot.stat().st_size > 10_000
        # the card is the largest thing on the page: the flag's letters are big
        size = browser.page.evaluate("parseFloat(getComputedStyle(document.querySelector('#latest-flag')).fontSize)")
        assert size >= 40

        # the detail view: large annotated image, and "resend" through the real form (CSRF token)
        browser.page.click("#latest a.button")
        browser.page.wait_for_selector("img.large")
        browser.page.wait_for_function("() => document.querySelector('img.large').naturalWidth > 0")
        browser.page.click("#resend")
        browser.page.wait_for_selector(".flash-info")
        assert "Đã xếp hàng gửi lại kết quả (2" in browser.page.inner_text(".flash-info")
        assert {d.state for d in journal.deliveries_for(uid)} == {"pending"}
        browser.screenshot("instance-detail-vi.png")
        assert not browser.console_errors, browser.console_errors


EDGE_SCRIPT = Path(sys.executable).parent / "edge"   # the console script `make demo` runs
ALL_IMAGES_LOADED = """() => { const imgs = Array.from(document.querySelectorAll('img'));
    return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0); }"""


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as the servers do
        try:
            s.bind(("0.0.0.0", port))
            return True
        except OSError:
            return False


@pytest.mark.skipif(not shutil.which(CHROMIUM), reason=f"{CHROMIUM} is not installed")
def test_make_demo_on_builtin_defaults_shows_every_image(tmp_path):
    """`make demo` exactly as a new user runs it: the `edge demo` console script in a fresh
    directory, no config file, the relative default storage dir ./edge-data and the default
    ports; then the printed password in a real browser. Every image on the status page and
    on each detail page must load, and the worklist shows analysed and skipped images with
    Vietnamese names."""
    assert EDGE_SCRIPT.exists(), f"{EDGE_SCRIPT} missing: install the project (make install)"
    for port in (8080, 11112):
        assert _port_free(port), f"port {port} is in use: this test runs `edge demo` on its default ports"
    workdir = tmp_path / "new-user"
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_")}
    env["PYTHONUNBUFFERED"] = "1"
    log = open(tmp_path / "demo.log", "w+")
    proc = subprocess.Popen([str(EDGE_SCRIPT), "demo", "--exit-after", "120"], cwd=workdir,
                            stdout=log, stderr=subprocess.STDOUT, env=env, text=True)
    try:
        def output() -> str:
            log.flush()
            return (tmp_path / "demo.log").read_text()
        deadline = time.monotonic() + 240
        while "status page:" not in output():
            assert proc.poll() is None, f"edge demo exited early:\n{output()[-3000:]}"
            assert time.monotonic() < deadline, f"edge demo did not finish its worklist:\n{output()[-3000:]}"
            time.sleep(0.5)
        text = output()
        match = re.search(r"Status page password \(shown only once, keep it\): (\S+)", text)
        assert match, text[-3000:]
        summary = text[text.index("patient "):]
        for name, state in (("NGUYỄN VĂN AN", "analyzed"), ("TRẦN THỊ BÌNH", "analyzed"),
                            ("LÊ VĂN CƯỜNG", "analyzed"), ("HOÀNG VĂN EM", "skipped"),
                            ("VŨ THỊ HOA", "skipped")):
            assert re.search(rf"{name}\s+{state}", summary), summary
        assert "lateral view" in summary and "under 15 years" in summary
        assert (workdir / "edge-data" / "journal.sqlite3").exists()   # relative to where it ran
        assert list((workdir / "edge-data" / "results").rglob("*.dcm"))

        with StatusPage("http://127.0.0.1:8080", match.group(1), tmp_path / "profile") as browser:
            browser.login()
            browser.page.wait_for_function(ALL_IMAGES_LOADED, timeout=15_000)
            board = browser.page.inner_text("main")
            for expected in ("NGUYỄN VĂN AN", "TRẦN THỊ BÌNH", "LÊ VĂN CƯỜNG", "PHẠM THỊ DUNG",
                             "HOÀNG VĂN EM", "VŨ THỊ HOA", "lateral view",
                             "patient below the minimum age", "REFER for TB testing"):
                assert expected in board, f"{expected!r} not on the status page"
            browser.screenshot("demo-defaults-status-page.png", full_page=True)
            links = browser.page.eval_on_selector_all(
                "#recent tbody a", "els => els.map(e => e.getAttribute('href'))")
            assert len(links) == 6, links
            for number, href in enumerate(links, 1):
                browser.page.goto("http://127.0.0.1:8080" + href)
                browser.page.wait_for_function(ALL_IMAGES_LOADED, timeout=15_000)
                if number in (1, 3):
                    browser.screenshot(f"demo-defaults-detail-{number}.png")
            browser.page.goto("http://127.0.0.1:8080/")
            browser.page.click("#lang-vi")
            browser.page.wait_for_function(ALL_IMAGES_LOADED, timeout=15_000)
            assert "phim chụp nghiêng" in browser.page.inner_text("main")
            browser.screenshot("demo-defaults-status-page-vi.png", full_page=True)
            assert not browser.console_errors, browser.console_errors
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        text = (tmp_path / "demo.log").read_text()
        log.close()
    assert proc.returncode in (0, 130), text[-3000:]
    assert "Traceback" not in text and "Bad file descriptor" not in text, text[-3000:]
