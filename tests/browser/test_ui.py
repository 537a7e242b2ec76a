"""The web UI in a real browser (Chromium via Playwright) against a real ``safepacs serve``.

Each test signs in through the sign-in page as a person would, and checks what that person sees:
the study list, a study, the built-in viewer's pixels, the not-found page, the administration
pages, and what the audit trail recorded about it.  axe-core checks every page it visits.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from safepacs.config import load_settings
from safepacs.protocols.webui.ohif import viewer_installed
from tests.support.browser import (
    CANVAS_SPREAD,
    SLICES,
    assert_accessible,
    browser,
    new_page,
    pixel_spread,
    save_screenshot,
    sign_in_on,
    site,
)
from tests.support.server import Server
from tests.support.ui import enrol_totp, totp_now

__all__ = ["browser", "site"]  # the fixtures, imported for pytest


def test_a_radiologist_finds_a_study_and_scrolls_its_series(
    browser: Any, site: tuple[Server, dict[str, str]], tmp_path: Path
) -> None:
    srv, uids = site
    page = new_page(browser)
    page.goto(srv.base_url + "/login")
    assert_accessible(page)
    save_screenshot(page, "sign-in", tmp_path)
    sign_in_on(page, srv, "rad")
    assert page.url == srv.base_url + "/studies", page.locator("main").inner_text()
    page.get_by_label("Patient ID").fill("UI-0001")
    page.get_by_role("button", name="Search").click()
    page.wait_for_load_state()
    assert page.url == srv.base_url + "/studies" and "UI-0001" not in page.url  # no patient data in URLs
    assert page.locator("table.list tbody tr").count() == 1
    assert_accessible(page)
    save_screenshot(page, "studies", tmp_path)
    page.get_by_role("link", name="Doe Jane").click()
    page.wait_for_load_state()
    assert page.url == f"{srv.base_url}/studies/{uids['study']}"
    thumbnail = page.locator("ul.series img").first
    thumbnail.wait_for()
    page.wait_for_function("() => document.querySelector('ul.series img').naturalWidth > 0")
    assert_accessible(page)
    save_screenshot(page, "study", tmp_path)

    thumbnail.click()
    page.wait_for_load_state()
    frame = page.locator("#frame")
    page.wait_for_function(
        "() => document.getElementById('frame').complete && document.getElementById('frame').naturalWidth > 0"
    )
    status = page.locator("#viewer-status")
    assert status.inner_text() == f"Image {SLICES // 2 + 1} of {SLICES}"
    assert pixel_spread(page.locator("#viewer").screenshot()) > 20, "the viewer shows an image, not a blank"
    first = frame.get_attribute("src")
    page.locator("#viewer").hover()
    page.mouse.wheel(0, 120)
    page.wait_for_function(
        f"() => document.getElementById('viewer-status').textContent.startsWith('Image {SLICES // 2 + 2} ')"
    )
    assert frame.get_attribute("src") != first
    page.keyboard.press("End")  # nothing: only arrows and page keys move
    for _ in range(SLICES):
        page.locator("#viewer").press("ArrowDown")
    assert status.inner_text().startswith(f"Image {SLICES} of {SLICES}")
    assert_accessible(page)
    save_screenshot(page, "viewer", tmp_path)


def test_a_referrer_without_grants_sees_no_study_and_gets_not_found(
    browser: Any, site: tuple[Server, dict[str, str]]
) -> None:
    srv, uids = site
    page = new_page(browser)
    sign_in_on(page, srv, "ref")
    assert page.locator("table.list").count() == 0
    assert "No studies found" in page.locator("main").inner_text()
    answer = page.goto(f"{srv.base_url}/studies/{uids['study']}")
    assert answer is not None and answer.status == 404
    assert page.get_by_role("heading", level=1).inner_text() == "Study not found"
    assert "Doe" not in page.content() and "UI-0001" not in page.content()
    assert_accessible(page)


def test_an_admin_signs_in_with_totp(
    browser: Any, site: tuple[Server, dict[str, str]], capsys: pytest.CaptureFixture[str]
) -> None:
    srv, _ = site
    page = new_page(browser)
    sign_in_on(page, srv, "boss")
    assert page.url.startswith(srv.base_url + "/login")  # no second factor yet: refused, told why
    assert "totp-enroll" in page.locator("main").inner_text()
    sign_in_on(page, srv, "boss", totp_now(enrol_totp(srv.data, "boss", capsys)))
    assert page.url == srv.base_url + "/studies"
    assert page.get_by_role("link", name="Administration").count() == 1
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_load_state()
    assert "/login" in page.url
    page.goto(srv.base_url + "/studies")
    assert "/login?next=" in page.url  # the session ended on the server


def test_open_in_viewer_shows_the_study_in_ohif_with_the_session(
    browser: Any, site: tuple[Server, dict[str, str]], tmp_path: Path
) -> None:
    srv, uids = site
    if not viewer_installed(load_settings(srv.data).viewer_dir):
        pytest.skip("the OHIF viewer is not installed (safepacs viewer install; scripts/install.sh does it)")
    page = new_page(browser)
    answer = page.goto(f"{srv.base_url}/viewer/viewer?StudyInstanceUIDs={uids['study']}")
    assert answer is not None and "/login?next=/viewer/viewer" in page.url  # no session, no viewer
    hosts: set[str] = set()
    failures: list[str] = []
    page.on("request", lambda r: hosts.add(r.url.split("/")[2]) if r.url.startswith("http") else None)
    page.on("response", lambda r: failures.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    sign_in_on(page, srv, "rad", path=f"/studies/{uids['study']}")
    page.get_by_role("link", name="Open in viewer").click()
    canvas = page.locator("canvas.cornerstone-canvas").first
    canvas.wait_for(timeout=60_000)
    deadline = time.monotonic() + 60
    spread = 0.0
    while time.monotonic() < deadline and spread <= 20:
        spread = canvas.evaluate(CANVAS_SPREAD)
        page.wait_for_timeout(250)
    assert spread > 20, "the OHIF viewport shows the image"
    assert hosts == {srv.base_url.split("/")[2]}, hosts  # nothing but this server, no second login
    assert not failures, failures
    save_screenshot(page, "ohif", tmp_path)
