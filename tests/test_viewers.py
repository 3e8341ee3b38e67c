"""The result objects in the viewers a radiologist uses: OHIF 3.13 and Orthanc's web viewer.

The set-up is the trial's: phantom chest X-rays go to ``edge serve`` and to the PACS (a
real Orthanc with its DICOMweb and web viewer plugins), ``edge serve`` sends its SR,
GSPS and SC to the same PACS, and headless Chromium opens the study in the prebuilt OHIF
viewer (served with a same-origin DICOMweb proxy, ``support.viewers``) and in Orthanc's
web viewer. Screenshots go to ``test-artifacts/`` (gitignored): look at them.

What each viewer shows is written down in docs/CONFORMANCE.md; these tests are the
evidence. Missing Chromium, Orthanc plugins or the OHIF build make them skip with what
``make test`` installs.
"""
from __future__ import annotations

import io
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom import Dataset

from conftest import EdgeServer, OrthancPACS, require_tool, wait_until
from engines.train.phantom import generate_case, write_dicom
from support.viewers import (Browser, OHIFServer, canvas_pixels, ohif_labels,
                             require_chromium, require_ohif_dist, shown_like)

pytestmark = pytest.mark.slow
pytest.importorskip("playwright.sync_api", reason="the Python package playwright is not "
                    "installed (run `make test`, which installs the test extra)")

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
SR_CLASS, SC_CLASS = "1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.7"
GSPS_CLASS = "1.2.840.10008.5.1.4.1.1.11.1"
# OHIF: the onboarding tour would cover the study browser on a first visit.
OHIF_STORAGE = {"shownTours": '["basicViewerTour"]'}
SOURCE_COLUMNS = 2400   # a typical DR detector: the SC is drawn from a ~1024 px decode


@dataclass
class Study:
    """One phantom image in the PACS with the results edge serve sent for it."""

    study_uid: str
    source: Dataset
    sr: Dataset
    sr_path: Path
    sc: Dataset
    gsps: Dataset
    orthanc_series: dict[str, str]   # SOP Class UID -> Orthanc's series id (web viewer)


@pytest.fixture(scope="module")
def trial(tmp_path_factory):
    """Orthanc (DICOMweb, web viewer) + edge serve in the path, fed a nodule image and a
    negative one: the PACS has the study from edge serve alone (forwarded sources and
    results), as in the box-in-the-path topology."""
    require_tool("storescu")
    require_chromium()
    dist = require_ohif_dist()
    tmp = tmp_path_factory.mktemp("viewers")
    pacs = OrthancPACS(tmp, plugins=("dicomweb", "webviewer")).start()
    # The box in the path (router mode): the PACS gets the images from edge serve only.
    server = EdgeServer(tmp, destinations=[pacs.destination(
        outputs=["source", "sr", "gsps", "sc"])])
    try:
        server.start()
        cases = {"nodules": generate_case(2, size=SOURCE_COLUMNS, tb=True, nodules=True,
                                          lesions="metastatic"),
                 "negative": generate_case(11, size=SOURCE_COLUMNS, tb=False, nodules=False)}
        files = {name: tmp / f"{name}.dcm" for name in cases}
        sources = {name: write_dicom(case, files[name], patient_name=f"PHANTOM^{name.upper()}")
                   for name, case in cases.items()}
        run = server.storescu(*files.values())
        assert run.returncode == 0, run.stderr
        wait_until(lambda: len(pacs.get("/instances")) >= 4 * len(files), 90,
                   what="the sources and their SR, GSPS and SC in Orthanc")
        studies = {name: _study(pacs, source, tmp) for name, source in sources.items()}
        with OHIFServer(dist, pacs.http_port) as ohif, \
                Browser(local_storage=OHIF_STORAGE) as browser:
            yield pacs, ohif, browser, studies
    finally:
        server.stop()
        pacs.stop()


def _study(pacs: OrthancPACS, source: Dataset, tmp: Path) -> Study:
    base = f"http://127.0.0.1:{pacs.http_port}"
    found = requests.post(f"{base}/tools/find", json={
        "Level": "Instance", "Query": {"StudyInstanceUID": str(source.StudyInstanceUID)}},
        timeout=30)
    found.raise_for_status()
    objects = {}
    for instance_id in found.json():
        data = requests.get(f"{base}/instances/{instance_id}/file", timeout=30).content
        series_id = pacs.get(f"/instances/{instance_id}")["ParentSeries"]
        ds = pydicom.dcmread(io.BytesIO(data))
        objects[str(ds.SOPClassUID)] = (ds, data, series_id)
    sr, sr_bytes, _ = objects[SR_CLASS]
    sr_path = tmp / f"sr_{source.SOPInstanceUID}.dcm"
    sr_path.write_bytes(sr_bytes)
    return Study(str(source.StudyInstanceUID), source, sr, sr_path, objects[SC_CLASS][0],
                 objects[GSPS_CLASS][0], {uid: item[2] for uid, item in objects.items()})


def _open_study(ohif: OHIFServer, browser: Browser, study: Study):
    """The study in OHIF, once its first image is on screen: replacing a viewport that is
    still loading makes OHIF 3.13 fail ("The stack viewport has been destroyed"),
    whatever the objects, so a test waits as a reader would, and reloads once when the
    first image stays black."""
    page = browser.new_page()
    for _ in range(2):
        browser.messages.clear()
        page.goto(f"{ohif.url}/viewer?StudyInstanceUIDs={study.study_uid}")
        deadline = time.monotonic() + 45
        while not any("studyToFirstImage" in m for m in browser.messages):
            assert time.monotonic() < deadline, "OHIF showed no image within 45 s"
            page.wait_for_timeout(200)
        # On a loaded machine OHIF 3.13 has reported the first image and left its viewport
        # black, and then ignored every double-click; a reader reloads the page.
        deadline = time.monotonic() + 20
        while canvas_pixels(page).std() <= 20 and time.monotonic() < deadline:
            page.wait_for_timeout(500)
        if canvas_pixels(page).std() > 20:
            break
    return page


_OVERLAY_NAMES = ("d => [...document.querySelectorAll('[data-cy=viewport-overlay-top-left]')]"
                  ".some(e => e.innerText.includes(d))")


def _open_series(page, description: str, *, until_shown: bool = False) -> None:
    """Double-click the series in OHIF's study browser, as a radiologist does.

    ``until_shown`` (image series): until the viewport's overlay names the series. On a
    loaded machine OHIF 3.13 has let a double-click go while it still drew the study's
    first image (the viewport kept the X-ray); a reader then double-clicks again."""
    entry = page.get_by_text(description, exact=True).first
    entry.wait_for(timeout=45_000)
    for _ in range(3):
        entry.dblclick()
        if not until_shown:
            return
        try:
            page.wait_for_function(_OVERLAY_NAMES, arg=description, timeout=10_000)
            return
        except Exception:   # noqa: BLE001 - not shown: double-click again; the test checks the screen
            continue


def _wait_for(page, browser: Browser, script: str, what: str, arg=None,
              timeout_ms: int = 30_000) -> None:
    """``page.wait_for_function``; on a timeout, a screenshot and what the page logged.

    OHIF 3.13 sometimes draws an SR viewport before it has been told which annotations
    belong to it and then waits for the next render; a reader's next action (here a
    resize of the window by one pixel) brings them. So after a third of the time the
    window is resized once."""
    try:
        page.wait_for_function(script, arg=arg, timeout=timeout_ms // 3)
        return
    except Exception:   # noqa: BLE001 - nudged once, then waited for again
        size = page.viewport_size
        page.set_viewport_size({"width": size["width"] - 1, "height": size["height"]})
        page.set_viewport_size(size)
    try:
        page.wait_for_function(script, arg=arg, timeout=timeout_ms - timeout_ms // 3)
    except Exception as exc:   # noqa: BLE001 - re-raised with the evidence
        name = "failed-" + re.sub(r"\W+", "-", what)[:60] + ".png"
        _screenshot(page, name)
        logged = [m[:300] for m in browser.messages if not m.startswith(("log:", "timeEnd:"))]
        raise AssertionError(f"{what}: not within {timeout_ms / 1000:.0f} s (screenshot "
                             f"test-artifacts/{name}); the page logged {logged}") from exc


def _annotations(page) -> dict[str, list[str]]:
    """The SR annotations OHIF drew: tracking UID -> its label lines (SVG text)."""
    return page.evaluate("""() => {
        const out = {};
        for (const g of document.querySelectorAll('svg.svg-layer g[data-annotation-uid]')) {
            out[g.dataset.annotationUid] = Array.from(g.querySelectorAll('tspan'))
                .map(t => t.textContent);
        }
        return out; }""")


def _boxes_drawn(page) -> int:
    return page.evaluate("() => document.querySelectorAll('svg.svg-layer polyline').length")


def _dismiss_tracking_prompt(page) -> None:
    """OHIF asks whether to track the SR's measurements; "No" keeps them displayed."""
    prompt = page.get_by_text("Do you want to continue tracking measurements", exact=False)
    try:
        prompt.wait_for(timeout=5_000)
    except Exception:   # noqa: BLE001 - no prompt, nothing to dismiss
        return
    page.get_by_role("button", name="No").first.click()


def _screenshot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name))


def _no_error_screen(page, browser: Browser, what: str) -> None:
    """No error screen or notification, no error logged, and an image in the viewport."""
    shown = page.evaluate("() => document.body.innerText")
    failed = [m for m in browser.messages if m.startswith("requestfailed:")]
    assert "Something went wrong" not in shown, f"{what}: OHIF shows its error screen"
    assert not browser.errors(), f"{what}: {browser.errors()}; failed requests: {failed}"
    assert canvas_pixels(page).std() > 20, f"{what}: the viewport shows no image"


def test_ohif_draws_every_nodule_of_the_sr_with_its_label(trial):
    pacs, ohif, browser, studies = trial
    study = studies["nodules"]
    expected = ohif_labels(study.sr)
    nodules = {uid: lines for name, (uid, lines) in expected.items() if name.startswith("Nodule ")}
    assert nodules and set(expected) == {f"Nodule {i}" for i in range(1, len(nodules) + 1)}, \
        f"the phantom should give nodule boxes, the SR has {list(expected)}"
    # The image the boxes are drawn on is the source as edge serve forwarded it.
    source_id = pacs.get(f"/series/{study.orthanc_series[str(study.source.SOPClassUID)]}")[
        "Instances"][0]
    sender = requests.get(f"http://127.0.0.1:{pacs.http_port}/instances/{source_id}"
                          "/metadata/RemoteAET", timeout=10)
    assert sender.text == "EDGE_AI", "the source image in the PACS was not sent by edge serve"
    page = _open_study(ohif, browser, study)
    _open_series(page, study.sr.SeriesDescription)
    _wait_for(page, browser,
              "n => document.querySelectorAll('svg.svg-layer g[data-annotation-uid]').length >= n",
              "OHIF drawing the SR's nodules", arg=len(nodules))
    _dismiss_tracking_prompt(page)
    page.wait_for_timeout(500)
    _screenshot(page, "ohif-sr-nodules.png")
    _no_error_screen(page, browser, "OHIF opening the SR")
    assert page.evaluate("() => self.crossOriginIsolated")     # COOP/COEP as deployed
    shown = _annotations(page)
    assert shown == nodules                 # one annotation per nodule, nothing else
    assert _boxes_drawn(page) == len(nodules)
    for lines in shown.values():
        assert re.fullmatch(r"Certainty of Finding: \d{1,3}\.\d\d %", lines[0]), lines
        assert len(lines) == 1 or re.fullmatch(r"Long axis: \d+\.\d\d mm", lines[1]), lines
        assert not any("{" in line or "363698007" in line for line in lines), lines
    page.close()


def test_the_same_sr_keeps_tb_and_nodules_for_dsrdump_and_dciodvfy(trial):
    pacs, ohif, browser, studies = trial
    study = studies["nodules"]
    dump = subprocess.run([require_tool("dsrdump"), str(study.sr_path)], capture_output=True,
                          text=True, timeout=60)
    assert dump.returncode == 0, dump.stderr
    text = dump.stdout
    evaluations = text.split('CONTAINER:(,,"Qualitative Evaluations")')[1]
    assert re.search(r'CODE:\(,,"Tuberculosis"\)=\(52101004,SCT,"Present"\)', evaluations)
    assert re.search(r'inferred from NUM:\(,,"Probability"\)="\d+(\.\d+)?" \(%,UCUM', evaluations)
    assert 'inferred from NUM:(,,"Threshold Value")="50.0" (%,UCUM,"Percent")' in evaluations
    assert 'TEXT:(,,"Algorithm Name")="tb_classifier"' in evaluations
    assert re.search(r'CODE:\(,,"Nodule"\)=\(52101004,SCT,"Present"\)', evaluations)
    groups = text.split('CONTAINER:(,,"Imaging Measurements")')[1].split(
        '"Qualitative Evaluations"')[0]
    count = len(ohif_labels(study.sr))
    # a detection over 30 mm is a "Mass" (4147007), the others "Nodule" (27925004)
    assert groups.count('CODE:(,,"Finding")=(27925004,SCT,"Nodule")') + \
        groups.count('CODE:(,,"Finding")=(4147007,SCT,"Mass")') == count
    assert groups.count('NUM:(,,"Certainty of Finding")') == count
    assert groups.count('NUM:(,,"Long axis")') == count
    assert groups.count('SCOORD:(,,"Image Region")=(POLYLINE,') == count
    run = subprocess.run([require_tool("dciodvfy"), str(study.sr_path)], capture_output=True,
                         text=True, timeout=60)
    assert [line for line in (run.stdout + run.stderr).splitlines() if "Error" in line] == []


def test_ohif_opens_the_sr_of_a_negative_image(trial):
    pacs, ohif, browser, studies = trial
    study = studies["negative"]
    expected = ohif_labels(study.sr)
    assert [name for name in expected] == ["Nodules"], \
        f"the negative phantom should give no nodule box, the SR has {list(expected)}"
    page = _open_study(ohif, browser, study)
    _open_series(page, study.sr.SeriesDescription)
    # the whole-image "Nodules" group: a frame around the image, no label
    _wait_for(page, browser, "() => document.querySelectorAll('svg.svg-layer polyline').length",
              "OHIF drawing the negative SR")
    _dismiss_tracking_prompt(page)
    page.wait_for_timeout(500)
    _screenshot(page, "ohif-sr-negative.png")
    _no_error_screen(page, browser, "OHIF opening the negative SR")
    uid, lines = expected["Nodules"]
    assert _annotations(page) in ({uid: lines}, {})     # a frame, with an empty text box
    assert _boxes_drawn(page) == 1
    page.close()


def _wait_shown_like(page, pixels, timeout_s: float = 20.0) -> tuple[float, float]:
    deadline = time.monotonic() + timeout_s
    while True:
        difference, correlation = shown_like(canvas_pixels(page), pixels)
        if (difference < 12 and correlation > 0.95) or time.monotonic() > deadline:
            return difference, correlation
        page.wait_for_timeout(500)


def test_sc_size_window_and_display_in_ohif_and_orthanc_web_viewer(trial):
    pacs, ohif, browser, studies = trial
    study = studies["nodules"]
    sc, source = study.sc, study.source
    banner = sc.Rows - round(sc.Columns * source.Rows / source.Columns)
    long_side = max(sc.Rows - banner, sc.Columns)
    assert 1024 <= long_side <= max(source.Rows, source.Columns)
    assert abs((sc.Rows - banner) / sc.Columns - source.Rows / source.Columns) < 0.01
    assert 60 < banner < 200                       # three lines of ~29 px text
    assert (float(sc.WindowCenter), float(sc.WindowWidth)) == (128.0, 256.0)
    assert sc.BurnedInAnnotation == "YES"
    pixels = sc.pixel_array

    page = _open_study(ohif, browser, study)
    _open_series(page, sc.SeriesDescription, until_shown=True)
    page.wait_for_timeout(1000)
    close_cine = page.locator("[data-cy=cine-player-close]")   # OHIF plays 'OT' as cine
    if close_cine.count():
        close_cine.first.click()
    difference, correlation = _wait_shown_like(page, pixels)
    _screenshot(page, "ohif-sc.png")
    _no_error_screen(page, browser, "OHIF showing the SC")
    assert difference < 12 and correlation > 0.95, (difference, correlation)
    assert re.search(r"W:\s*256\s+L:\s*128", page.evaluate("() => document.body.innerText"))
    # OHIF does not render presentation states: opening the GSPS draws nothing.
    _open_series(page, study.gsps.SeriesDescription)
    page.wait_for_timeout(1500)
    assert _boxes_drawn(page) == 0 and not browser.errors()
    page.close()

    viewer = f"http://127.0.0.1:{pacs.http_port}/web-viewer/app/viewer.html?series="
    page = browser.new_page()
    page.goto(viewer + study.orthanc_series[SC_CLASS])
    page.wait_for_selector("canvas", timeout=30_000)
    difference, correlation = _wait_shown_like(page, pixels)
    _screenshot(page, "orthanc-webviewer-sc.png")
    assert difference < 12 and correlation > 0.95, (difference, correlation)
    assert "WW/WL:256/128" in page.evaluate("() => document.body.innerText").replace(" ", "")
    # Orthanc's web viewer shows no image for the SR and the GSPS.
    for sop_class in (SR_CLASS, GSPS_CLASS):
        page.goto(viewer + study.orthanc_series[sop_class])
        page.wait_for_selector("canvas", timeout=30_000)
        page.wait_for_timeout(1500)
        shown = canvas_pixels(page)
        height, width = shown.shape
        assert shown[height // 5:-height // 5, width // 5:-width // 5].std() < 5, sop_class
    page.close()




