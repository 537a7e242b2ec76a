"""A real browser for the web UI's tests: Debian's Chromium driven by Playwright, headless.

Playwright's own browser download is not used (nor reachable here): the tests launch the system
Chromium (``apt-get install chromium``, done by ``scripts/test.sh``) through its executable path.
Background networking is switched off so the browser talks to nothing but the server under test.
"""

from __future__ import annotations

import io
import os
import shutil
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.support.paths import REPO

__all__ = [
    "CANVAS_SPREAD",
    "CHROMIUM",
    "SCREENSHOTS",
    "accessibility_problems",
    "browser",
    "pixel_spread",
    "save_screenshot",
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

#: Where the screenshots of the main pages go when SAFEPACS_UPDATE_SCREENSHOTS=1 (README, docs).
SCREENSHOTS = REPO / "docs" / "screenshots"


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """A headless Chromium for the whole session."""
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


def save_screenshot(page: Any, name: str, tmp_path: Path) -> Path:
    """A full-page screenshot under ``tmp_path``; also into docs/screenshots when
    SAFEPACS_UPDATE_SCREENSHOTS=1 (how the README's pictures are made)."""
    target = tmp_path / f"{name}.png"
    page.screenshot(path=str(target), full_page=False)
    if os.environ.get("SAFEPACS_UPDATE_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(target, SCREENSHOTS / f"{name}.png")
    return target
