"""A real browser for the web UI's tests: Debian's Chromium driven by Playwright, headless.

Playwright's own browser download is not used (nor reachable here): the tests launch the system
Chromium (``apt-get install chromium``, done by ``scripts/test.sh``) through its executable path.
Background networking is switched off so the browser talks to nothing but the server under test.

The ``site`` fixture is the server the browser tests share: one CT series and a person of each role.
"""

from __future__ import annotations

import io
import os
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from pydicom.uid import generate_uid

from safepacs.app import Repositories
from safepacs.auth.passwords import hash_password
from tests.support.corpus import make_ct, phantom_pixels
from tests.support.paths import REPO
from tests.support.server import Server, run_cli, start_server
from tests.support.webapp import PASSWORD

__all__ = [
    "CANVAS_SPREAD",
    "CHROMIUM",
    "PATIENT_ID",
    "PEOPLE",
    "SCREENSHOTS",
    "SLICES",
    "accessibility_problems",
    "assert_accessible",
    "browser",
    "new_page",
    "pixel_spread",
    "save_screenshot",
    "sign_in_on",
    "site",
]

CHROMIUM = Path("/usr/lib/chromium/chromium")  # the /usr/bin/chromium wrapper script fails here
_ARGS = [
    "--no-sandbox",  # the tests run as root
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
]
#: The standard deviation of a canvas's grey levels, read from the canvas itself (overlays and tooltips
#: are not in it): 0 for a blank viewport, large when an image is drawn.  ``locator.evaluate(...)``.
CANVAS_SPREAD = """c => {
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let n = 0, sum = 0, squares = 0;
  for (let i = 0; i < d.length; i += 4) {
    const g = (d[i] + d[i + 1] + d[i + 2]) / 3;
    n++; sum += g; squares += g * g;
  }
  const mean = sum / n;
  return Math.sqrt(Math.max(squares / n - mean * mean, 0));
}"""

#: The site's one series: its slices and its patient (Doe^Jane).
SLICES = 12
PATIENT_ID = "UI-0001"
#: The site's people (password :data:`tests.support.webapp.PASSWORD`) and their roles.
PEOPLE = (("rad", "radiologist"), ("ref", "referrer"), ("boss", "admin"), ("aud", "auditor"))

#: Where the screenshots of the main pages go when SAFEPACS_UPDATE_SCREENSHOTS=1 (README, docs).
SCREENSHOTS = REPO / "docs" / "screenshots"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """A headless Chromium for one test module.  Not for the session: Playwright's synchronous API
    runs an event loop in the main thread while it is open, and a later test calling
    ``asyncio.run`` would find it running."""
    if not CHROMIUM.exists():
        pytest.skip(f"Chromium is not installed at {CHROMIUM} (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=_ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


def pixel_spread(png: bytes) -> float:
    """The standard deviation of the grey levels of a screenshot: near 0 for a blank or uniform area,
    large when an image is shown."""
    grey = Image.open(io.BytesIO(png)).convert("L")
    return statistics.pstdev(grey.tobytes())


def accessibility_problems(page: Any) -> list[str]:
    """axe-core's serious and critical violations on ``page`` (WCAG 2.x A and AA rules), one line each."""
    from axe_playwright_python.sync_playwright import Axe

    results = Axe().run(page)
    return [
        f"{v['id']} ({v['impact']}): {v['help']} - {[n['target'] for n in v['nodes']][:3]}"
        for v in results.response["violations"]
        if v.get("impact") in ("serious", "critical")
    ]


def save_screenshot(page: Any, name: str, tmp_path: Path, *, publish: bool = True) -> Path:
    """A screenshot of the viewport under ``tmp_path``; also into docs/screenshots when
    SAFEPACS_UPDATE_SCREENSHOTS=1 and ``publish`` (how the README's pictures are made), reduced to
    a 128-colour palette to keep the repository small.  A page that shows a secret, even a test
    one, is not published."""
    target = tmp_path / f"{name}.png"
    page.screenshot(path=str(target), full_page=False)
    if publish and os.environ.get("SAFEPACS_UPDATE_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        with Image.open(target) as shot:
            shot.convert("RGB").quantize(colors=128).save(SCREENSHOTS / f"{name}.png", optimize=True)
    return target


@pytest.fixture
def site(data_dir: Path, repos: Repositories, tmp_path: Path) -> Iterator[tuple[Server, dict[str, str]]]:
    """A running server with one CT series of :data:`SLICES` slices of patient :data:`PATIENT_ID`
    and the people of :data:`PEOPLE`; the study's and series' UIDs."""
    study, series = generate_uid(), generate_uid()
    files = tmp_path / "series"
    files.mkdir()
    for n in range(SLICES):
        ds = make_ct(256, 256, patient_id=PATIENT_ID, patient_name="Doe^Jane", study_uid=study,
                     series_uid=series, instance_number=n + 1, seed=n)  # fmt: skip
        ds.PixelData = phantom_pixels(256, 256, n / (SLICES - 1))
        ds.save_as(files / f"{n}.dcm", enforce_file_format=True)
    assert run_cli("import", str(files), "--data", str(data_dir)) == 0
    for name, role in PEOPLE:
        repos.directory.add_user(name, hash_password(PASSWORD), frozenset({role}), must_change_password=False)
    srv = start_server(data_dir, env={"SAFEPACS_SERVER__WORKERS": "1"})
    try:
        yield srv, {"study": study, "series": series}
    finally:
        srv.stop()


def new_page(browser: Any) -> Any:
    """A page in a browser context of its own (its own cookies: one person), with a desktop viewport."""
    context = browser.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 860})
    page = context.new_page()
    page.set_default_timeout(20_000)
    return page


def sign_in_on(
    page: Any,
    srv: Server,
    user: str,
    totp: str | None = None,
    path: str = "/studies",
    password: str = PASSWORD,
) -> None:
    """Go to ``path``, be sent to the sign-in page, and sign in there as ``user`` as a person would."""
    page.goto(srv.base_url + path)
    assert page.url.startswith(srv.base_url + "/login?next=")
    page.get_by_label("User name").fill(user)
    page.get_by_label("Password").fill(password)
    if totp:
        page.get_by_label("One-time code").fill(totp)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_load_state()


def assert_accessible(page: Any) -> None:
    """No serious or critical axe-core violation on the page as it is now."""
    problems = accessibility_problems(page)
    assert not problems, f"{page.url}: {problems}"
