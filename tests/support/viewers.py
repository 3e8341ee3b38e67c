"""Real viewers as test peers: OHIF 3.x (prebuilt) and Orthanc's web viewer, in Chromium.

``OHIFServer`` serves the prebuilt OHIF viewer (``npm pack @ohif/app``, untarred by
``make test`` into ``.cache/``) the way a site deploys it: static files with an SPA
fallback, a same-origin proxy of ``/dicom-web`` and ``/wado`` to Orthanc's DICOMweb
plugin, the COOP/COEP headers the viewer's workers need, and an ``app-config.js`` with
one DICOMweb data source. ``Browser`` is a headless Chromium (Playwright) with the flags
that let OHIF's WebGL rendering run on a machine without a GPU. Nothing here downloads
anything: what is missing makes the test skip with what ``make test`` installs.
"""
from __future__ import annotations

import http.client
import io
import json
import mimetypes
import os
import shutil
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
from PIL import Image
from pydicom import Dataset

ROOT = Path(__file__).resolve().parents[2]
OHIF_VERSION = "3.13.2"
#: Filled once by `make test` (Makefile target `ohif-dist`); gitignored.
OHIF_DIST = Path(os.environ.get("EDGE_TEST_OHIF_DIST",
                                ROOT / ".cache" / f"ohif-{OHIF_VERSION}" / "dist"))
CHROMIUM = os.environ.get("EDGE_TEST_CHROMIUM", "/usr/bin/chromium")
#: Headless Chromium without a GPU: WebGL through SwiftShader (OHIF renders with WebGL).
CHROMIUM_ARGS = ["--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
                 "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]

#: Console errors OHIF 3.13 logs whatever it is shown: its handler for a failed image
#: load is broken ("handler is not a function") and runs when a pending load is cancelled,
#: e.g. when a viewport is replaced. A load that really failed leaves the viewport black,
#: which the tests check separately.
VIEWER_NOISE = ("IMAGE_LOAD_ERROR TypeError: handler is not a function",)

_PROXIED = ("/dicom-web", "/wado")
_ISOLATION_HEADERS = {
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "require-corp",
    "Cross-Origin-Resource-Policy": "same-origin",
}
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
               "trailers", "transfer-encoding", "upgrade", "content-length"}

APP_CONFIG = """window.config = {
  routerBasename: null,
  extensions: [],
  modes: [],
  showStudyList: true,
  showErrorDetails: 'always',
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  maxNumberOfWebWorkers: 2,
  defaultDataSourceName: 'orthanc',
  investigationalUseDialog: { option: 'never' },
  dataSources: [{
    namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
    sourceName: 'orthanc',
    configuration: {
      friendlyName: 'Orthanc (test PACS)',
      name: 'orthanc',
      qidoRoot: '/dicom-web',
      wadoRoot: '/dicom-web',
      wadoUriRoot: '/wado',
      qidoSupportsIncludeField: false,
      supportsFuzzyMatching: false,
      supportsWildcard: true,
      imageRendering: 'wadors',
      thumbnailRendering: 'wadors',
      omitQuotationForMultipartRequest: true,
      bulkDataURI: { enabled: true },
    },
  }],
};
"""


def require_chromium() -> str:
    """The Chromium binary, or skip naming what installs it."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"Chromium is not installed at {CHROMIUM} (Debian package chromium; "
                    "run `make test`, which installs it)")
    return CHROMIUM


def require_ohif_dist() -> Path:
    """The prebuilt OHIF viewer, or skip naming what installs it."""
    if not (OHIF_DIST / "index.html").exists():
        pytest.skip(f"the OHIF {OHIF_VERSION} viewer is not installed at {OHIF_DIST} (run "
                    "`make test`, which packs @ohif/app from npm into .cache/ once)")
    return OHIF_DIST


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OHIFServer:
    """The OHIF dist plus a same-origin DICOMweb proxy to Orthanc, on a loopback port."""

    def __init__(self, dist: Path, orthanc_http_port: int) -> None:
        self.dist = Path(dist).resolve()
        self.orthanc_port = int(orthanc_http_port)
        self.port = _free_port()
        self.requests: list[tuple[str, int]] = []     # (path, status) of every request
        self.proxy_errors: list[str] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "OHIFServer":
        server = ThreadingHTTPServer(("127.0.0.1", self.port), _handler_for(self))
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="ohif-server",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "OHIFServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _handler_for(owner: OHIFServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args) -> None:   # noqa: A002 - quiet
            pass

        def do_GET(self) -> None:   # noqa: N802 - http.server's name
            self._route(body=None)

        def do_HEAD(self) -> None:   # noqa: N802
            self._route(body=None, head=True)

        def do_POST(self) -> None:   # noqa: N802
            length = int(self.headers.get("Content-Length") or 0)
            self._route(body=self.rfile.read(length) if length else b"")

        def _route(self, body: bytes | None, head: bool = False) -> None:
            path = urlsplit(self.path).path
            if any(path == p or path.startswith(p + "/") or path.startswith(p + "?")
                   for p in _PROXIED):
                self._proxy(body)
            elif path == "/app-config.js":
                self._send(200, APP_CONFIG.encode(), "application/javascript", head=head)
            else:
                self._static(path, head)

        def _static(self, path: str, head: bool) -> None:
            target = (owner.dist / path.lstrip("/")).resolve()
            if owner.dist not in target.parents or not target.is_file():
                target = owner.dist / "index.html"     # SPA fallback: the app routes
            ctype = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
            if target.suffix == ".wasm":
                ctype = "application/wasm"
            elif target.suffix in (".js", ".mjs"):
                ctype = "application/javascript"
            size = target.stat().st_size
            self.send_response(200)
            self._common_headers(ctype, size)
            # The bundles are content-hashed; index.html is not, but never changes here.
            self.send_header("Cache-Control", "max-age=3600")
            self.end_headers()
            if not head:
                with target.open("rb") as fh:
                    shutil.copyfileobj(fh, self.wfile, 1 << 20)
            owner.requests.append((path, 200))

        def _proxy(self, body: bytes | None) -> None:
            conn = http.client.HTTPConnection("127.0.0.1", owner.orthanc_port, timeout=60)
            headers = {k: v for k, v in self.headers.items()
                       if k.lower() not in _HOP_BY_HOP and k.lower() != "accept-encoding"}
            try:
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
            except OSError as exc:
                owner.proxy_errors.append(f"{self.command} {self.path}: {exc}")
                self._send(502, str(exc).encode(), "text/plain")
                return
            finally:
                conn.close()
            self.send_response(response.status)
            for key, value in response.getheaders():
                if key.lower() not in _HOP_BY_HOP and key.lower() not in (
                        h.lower() for h in _ISOLATION_HEADERS):
                    self.send_header(key, value)
            self._common_headers(None, len(data))
            self.end_headers()
            self.wfile.write(data)
            owner.requests.append((urlsplit(self.path).path, response.status))

        def _send(self, status: int, data: bytes, ctype: str, head: bool = False) -> None:
            self.send_response(status)
            self._common_headers(ctype, len(data))
            self.end_headers()
            if not head:
                self.wfile.write(data)
            owner.requests.append((urlsplit(self.path).path, status))

        def _common_headers(self, ctype: str | None, length: int) -> None:
            if ctype:
                self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(length))
            for key, value in _ISOLATION_HEADERS.items():
                self.send_header(key, value)

    return Handler


class Browser:
    """A headless Chromium (Playwright) for the viewers; use as a context manager.

    ``messages`` keeps every console message and page error; ``errors()`` picks what
    shows a viewer failing: uncaught errors, console errors and OHIF's error boundary
    (which logs "Error Boundary" at debug level behind its "Something went wrong").
    """

    def __init__(self, *, viewport: tuple[int, int] = (1600, 1000),
                 local_storage: dict[str, str] | None = None) -> None:
        """``local_storage`` is set in every page before its scripts run. The pages share
        one browser context, so the viewers' scripts are fetched once."""
        playwright_api = pytest.importorskip("playwright.sync_api")
        executable = require_chromium()
        self._pw = playwright_api.sync_playwright().start()
        try:
            self._browser = self._pw.chromium.launch(executable_path=executable, headless=True,
                                                     args=CHROMIUM_ARGS)
            self._context = self._browser.new_context(
                viewport={"width": viewport[0], "height": viewport[1]})
        except Exception:
            self._pw.stop()
            raise
        if local_storage:
            self._context.add_init_script(
                "(() => { const items = " + json.dumps(local_storage) + ";"
                " for (const [k, v] of Object.entries(items)) localStorage.setItem(k, v); })()")
        self.messages: list[str] = []

    def new_page(self):
        """A new tab; close it with ``page.close()``."""
        page = self._context.new_page()
        page.on("pageerror", lambda e: self.messages.append(f"pageerror: {e}"))
        page.on("console", lambda m: self.messages.append(f"{m.type}: {m.text}"))
        page.on("requestfailed", lambda r: self.messages.append(
            f"requestfailed: {r.method} {r.url} {r.failure}"))
        return page

    def errors(self) -> list[str]:
        """Uncaught errors, console errors (but ``VIEWER_NOISE``) and OHIF's error
        boundary."""
        return [m for m in self.messages
                if (m.startswith(("pageerror:", "error:")) or "Error Boundary" in m
                    or "Something went wrong" in m)
                and not any(noise in m for noise in VIEWER_NOISE)]

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._browser.close()
        finally:
            self._pw.stop()


def canvas_pixels(page) -> np.ndarray:
    """The largest canvas on the page (a viewer's viewport) as shown, 8-bit gray."""
    boxes = page.evaluate("""() => Array.from(document.querySelectorAll('canvas'))
        .map(c => { const r = c.getBoundingClientRect(); return [r.x, r.y, r.width, r.height]; })""")
    x, y, w, h = max(boxes, key=lambda b: b[2] * b[3])
    png = page.screenshot(clip={"x": x, "y": y, "width": w, "height": h})
    return np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float64)


def shown_like(shown: np.ndarray, pixels: np.ndarray) -> tuple[float, float]:
    """How closely a viewport shows ``pixels`` fitted into it and centred, as viewers do
    by default: (mean absolute difference in gray levels, correlation) over the middle
    of the image, away from the viewer's corner texts. A wrong window (saturated lungs)
    differs by tens of gray levels."""
    height, width = shown.shape
    rows, cols = pixels.shape
    scale = min(width / cols, height / rows)
    fit_w, fit_h = round(cols * scale), round(rows * scale)
    left, top = (width - fit_w) // 2, (height - fit_h) // 2
    expected = np.asarray(Image.fromarray(np.asarray(pixels, dtype=np.uint8)).resize(
        (fit_w, fit_h), Image.Resampling.BILINEAR), dtype=np.float64)
    crop = shown[top:top + fit_h, left:left + fit_w]
    middle = (slice(fit_h // 5, fit_h - fit_h // 5), slice(fit_w // 5, fit_w - fit_w // 5))
    a, b = crop[middle], expected[middle]
    return float(np.abs(a - b).mean()), float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def ohif_labels(sr: Dataset) -> dict[str, tuple[str, list[str]]]:
    """What OHIF 3.13 draws for each measurement group of a TID 1500 SR, composed the way
    its SR hydration does (extensions/cornerstone-dicom-sr): tracking identifier ->
    (tracking UID, label lines). A line per NUM, ``<concept meaning>: <value with two
    decimals> <unit code value>``, then ``363698007: <meaning>`` for a group-level finding
    site. A group without a SCOORD is what crashes OHIF's SR viewport."""
    imaging = [item for item in sr.ContentSequence
               if item.ConceptNameCodeSequence[0].CodeValue == "126010"]   # Imaging Measurements
    labels: dict[str, tuple[str, list[str]]] = {}
    for group in (imaging[0].ContentSequence if imaging else []):
        items = group.ContentSequence
        if not any(item.ValueType in ("SCOORD", "SCOORD3D") for item in items):
            raise AssertionError("a measurement group without a SCOORD (OHIF 3.13 crashes)")
        tracking = {item.ConceptNameCodeSequence[0].CodeValue: item for item in items
                    if item.ValueType in ("TEXT", "UIDREF")}
        lines, sites = [], []
        for item in items:
            name = item.ConceptNameCodeSequence[0]
            if item.ValueType == "NUM":
                value = item.MeasuredValueSequence[0]
                lines.append(f"{name.CodeMeaning}: {float(value.NumericValue):.2f} "
                             f"{value.MeasurementUnitsCodeSequence[0].CodeValue}")
            elif (name.CodeValue, name.CodingSchemeDesignator) == ("363698007", "SCT"):
                sites.append(f"363698007: {item.ConceptCodeSequence[0].CodeMeaning}")
        labels[tracking["112039"].TextValue] = (tracking["112040"].UID, lines + sites[:1])
    return labels
