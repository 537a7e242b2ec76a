"""The real OHIF viewer (``npm pack @ohif/app``, pinned) installed by ``safepacs viewer install`` and loaded
in Chromium (Debian's, driven by Playwright) from uvicorn on 127.0.0.1, mounted at ``/viewer``.

* Beside a stub ``/dicomweb/studies`` answering ``[]``: the study list renders with no 404, no request
  to another host and no Content-Security-Policy violation (the viewer's serving alone).
* Beside the real DICOMweb app of an archive holding a JPEG-LS series: the image is decoded in OHIF's
  worker and drawn (what needs the workers' ``'unsafe-eval'``), still without a violation.

The download is made once per session; without npm these tests are skipped.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import uvicorn
from playwright.sync_api import Page, sync_playwright
from playwright.sync_api import Request as PwRequest
from pydicom.uid import JPEGLSLossless, generate_uid
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route
from starlette.types import ASGIApp

from safepacs.app import open_archive
from safepacs.config import load_settings
from safepacs.protocols.dicomweb.app import create_app
from safepacs.protocols.dicomweb.security import SecurityHeaders
from safepacs.protocols.webui.ohif import MOUNT, OHIF_VERSION, installed_version, npm_pack, viewer_app
from tests.support.browser import CANVAS_SPREAD
from tests.support.corpus import make_ct
from tests.support.server import run_cli
from tests.support.webapp import store

CHROMIUM = Path("/usr/lib/chromium/chromium")  # Debian's; the /usr/bin wrapper does not start here
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
#: Caught in the page before any script of it runs (Playwright's init scripts are not subject to the CSP).
RECORD_VIOLATIONS = (
    "window.__violations = [];"
    "document.addEventListener('securitypolicyviolation', e => window.__violations.push("
    "e.effectiveDirective + ' ' + e.blockedURI + ' ' + e.sourceFile + ':' + e.lineNumber));"
)


@pytest.fixture(scope="session")
def ohif_tarball(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``npm pack @ohif/app`` once per session (50 MB)."""
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed (apt-get install npm): the OHIF viewer cannot be downloaded")
    started = time.monotonic()
    tarball = npm_pack(tmp_path_factory.mktemp("npm"))
    print(f"npm pack @ohif/app@{OHIF_VERSION}: {time.monotonic() - started:.1f} s")
    return tarball


@pytest.fixture(scope="session")
def viewer_dir(ohif_tarball: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("share") / "ohif"
    started = time.monotonic()
    assert run_cli("viewer", "install", "--tarball", str(ohif_tarball), "--to", str(target)) == 0
    print(f"safepacs viewer install: {time.monotonic() - started:.1f} s")
    return target


@contextlib.contextmanager
def serving(app: ASGIApp) -> Iterator[str]:
    """``app`` under uvicorn on 127.0.0.1 (plain HTTP, an ephemeral port), in a thread: its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()


@dataclass
class Visit:
    """What the browser did while a page was open."""

    requests: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # answers >= 400 and requests that failed
    console: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)

    def other_hosts(self) -> list[str]:
        return [
            u
            for u in self.requests
            if urlsplit(u).scheme in ("http", "https", "ws", "wss") and urlsplit(u).hostname != "127.0.0.1"
        ]

    def csp_messages(self) -> list[str]:
        return [m for m in self.console if "content security policy" in m.lower() or "EvalError" in m]


def record_failed(visit: Visit, request: PwRequest) -> None:
    """A request that got no answer, unless the page cancelled it itself (OHIF drops prefetches)."""
    if request.failure != "net::ERR_ABORTED":
        visit.failures.append(f"failed {request.url}: {request.failure}")


def browse(url: str, ready: Callable[[Page], None], headers: dict[str, str] | None = None) -> Visit:
    """Open ``url`` in headless Chromium, wait for ``ready(page)``, and tell what happened."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium")
    visit = Visit()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(extra_http_headers=headers or {})
            context.on("request", lambda r: visit.requests.append(r.url))
            context.on("requestfailed", lambda r: record_failed(visit, r))
            context.on("response", lambda r: r.status >= 400 and visit.failures.append(f"{r.status} {r.url}"))
            page = context.new_page()
            page.add_init_script(RECORD_VIOLATIONS)
            page.on("console", lambda m: visit.console.append(f"{m.type}: {m.text}"))
            page.on("pageerror", lambda e: visit.console.append(f"pageerror: {e}"))
            page.goto(url)
            ready(page)
            page.wait_for_timeout(1000)  # late requests and reports
            visit.violations = page.evaluate("window.__violations")
        finally:
            browser.close()
    return visit


def assert_clean(visit: Visit) -> None:
    assert visit.failures == [], visit.failures
    assert visit.other_hosts() == [], visit.other_hosts()
    assert visit.violations == [], visit.violations
    assert visit.csp_messages() == [], visit.csp_messages()


def test_the_study_list_renders_with_no_404_no_other_host_and_no_csp_violation(viewer_dir: Path) -> None:
    asked: list[str] = []

    async def studies(request: Request) -> JSONResponse:
        asked.append(str(request.url))
        return JSONResponse([], media_type="application/dicom+json")

    shown: list[bool] = []

    def study_list(page: Page) -> None:
        page.get_by_text("No studies available").wait_for(timeout=60_000)
        shown.append(page.get_by_text("Study List").is_visible())
        shown.append(page.get_by_text("for investigational use only").is_visible())

    app = Starlette(routes=[Route("/dicomweb/studies", studies), Mount(MOUNT, app=viewer_app(viewer_dir))])
    with serving(SecurityHeaders(app)) as base:  # the DICOMweb app's middleware: the viewer's CSP wins
        visit = browse(f"{base}{MOUNT}/", study_list)
    assert_clean(visit)
    assert shown == [True, True]
    assert asked and all(u.startswith(f"{base}/dicomweb/studies?") for u in asked)
    assert f"{base}{MOUNT}/safepacs-inline-1.js" in visit.requests


def test_a_jpeg_ls_series_is_decoded_in_the_worker_and_drawn(viewer_dir: Path, data_dir: Path) -> None:
    assert run_cli("user", "add", "rad", "--role", "radiologist", "--data", str(data_dir)) == 0
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert run_cli("token", "create", "--user", "rad", "--data", str(data_dir)) == 0
    token = out.getvalue().strip().splitlines()[-1]
    archive = open_archive(load_settings(data_dir))
    try:
        study, series = generate_uid(), generate_uid()
        for i in range(4):
            ds = make_ct(128, 128, study_uid=study, series_uid=series, instance_number=i + 1, seed=i)
            ds.compress(JPEGLSLossless)
            store(archive, ds)
        app = create_app(archive)
        app.mount(MOUNT, viewer_app(viewer_dir))
        drawn: list[float] = []

        def image_drawn(page: Page) -> None:
            canvas = page.locator("canvas.cornerstone-canvas").first
            canvas.wait_for(timeout=60_000)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # the canvas's own pixels: overlays and tooltips are not in it
                drawn.append(canvas.evaluate(CANVAS_SPREAD))
                if drawn[-1] > 20:
                    return
                page.wait_for_timeout(500)

        with serving(app) as base:
            visit = browse(
                f"{base}{MOUNT}/viewer?StudyInstanceUIDs={study}",
                image_drawn,
                headers={"Authorization": f"Bearer {token}"},
            )
    finally:
        archive.close()
    assert drawn and drawn[-1] > 20, f"the viewport stayed blank ({drawn[-3:]}); {visit.console[-5:]}"
    assert_clean(visit)
    assert any("/frames/" in u for u in visit.requests)


def test_install_again_status_and_refusals(
    viewer_dir: Path,
    ohif_tarball: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    capsys.readouterr()
    assert installed_version(viewer_dir) == OHIF_VERSION
    assert run_cli("viewer", "install", "--tarball", str(ohif_tarball), "--to", str(viewer_dir)) == 0
    assert "already" in capsys.readouterr().out
    assert run_cli("viewer", "status", "--to", str(viewer_dir)) == 0
    assert OHIF_VERSION in capsys.readouterr().out
    assert run_cli("viewer", "status", "--to", str(tmp_path / "none")) == 1
    assert "safepacs viewer install" in capsys.readouterr().out

    altered = tmp_path / "altered.tgz"
    data = bytearray(ohif_tarball.read_bytes())
    data[len(data) // 2] ^= 1
    altered.write_bytes(bytes(data))
    assert run_cli("viewer", "install", "--tarball", str(altered), "--to", str(tmp_path / "v")) == 2
    assert "refusing to install it" in capsys.readouterr().err
    assert not (tmp_path / "v").exists()

    monkeypatch.chdir(tmp_path)  # no data directory: the setting's default and the environment hold
    monkeypatch.delenv("SAFEPACS_DATA", raising=False)
    monkeypatch.setenv("SAFEPACS_UI__VIEWER_DIR", str(viewer_dir))
    assert run_cli("viewer", "status") == 0
    assert str(viewer_dir) in capsys.readouterr().out

    monkeypatch.setenv("PATH", str(tmp_path))  # no npm on it
    assert run_cli("viewer", "install", "--to", str(tmp_path / "v")) == 2
    assert "npm is not installed" in capsys.readouterr().err
