"""The administration and audit pages in a real browser (Chromium via Playwright) against a real
``safepacs serve``.

An administrator registers a peer through the form, downloads its certificate bundle and the peer
then associates over DICOM TLS with it; removing the peer asks first, and only an accepted prompt
removes it.  The administrator's other pages (users with a second factor's QR code and a one-time
password, tokens, access, posture, the trash) and the first-login password change are used as a
person would.  An auditor finds a radiologist's viewing of a study in the trail, with who, from
where and which patient, and downloads the patient access report; the patient ID never shows in the
address bar (the forms post).  axe-core checks every page on
the way (no serious or critical violation), error pages included.
"""

from __future__ import annotations

import base64
import csv
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.browser import (
    PATIENT_ID,
    SLICES,
    assert_accessible,
    browser,
    new_page,
    save_screenshot,
    sign_in_on,
    site,
)
from tests.support.dicom_client import echo
from tests.support.server import Server
from tests.support.tls import bundle_context, tls
from tests.support.ui import enrol_totp, totp_now

__all__ = ["browser", "site"]  # the fixtures, imported for pytest

NEW_PASSWORD = "tulip harbour quartz 58"


def _answer(prompts: list[str], accept: bool) -> Callable[[Any], None]:
    """A handler of the page's next ``confirm()`` prompt: keeps its question, then accepts or dismisses it."""

    def handle(dialog: Any) -> None:
        prompts.append(dialog.message)
        if accept:
            dialog.accept()
        else:
            dialog.dismiss()

    return handle


def _heading(page: Any) -> str:
    return str(page.get_by_role("heading", level=1).inner_text())


def _row(page: Any, header: str) -> Any:
    """The table row whose row header is ``header``."""
    return page.get_by_role("row").filter(has=page.get_by_role("rowheader", name=header, exact=True))


def _table(page: Any, selector: str) -> list[dict[str, str]]:
    """A table's rows as its column headers name their cells."""
    table = page.locator(selector)
    headers = table.locator("thead th").all_inner_texts()
    rows = table.locator("tbody tr").all()
    return [dict(zip(headers, row.locator("th, td").all_inner_texts(), strict=True)) for row in rows]


def test_an_admin_adds_a_peer_whose_downloaded_certificate_associates_over_dicom_tls(
    browser: Any, site: tuple[Server, dict[str, str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    srv, _ = site
    page = new_page(browser)
    sign_in_on(page, srv, "boss", totp_now(enrol_totp(srv.data, "boss", capsys)), path="/admin")
    assert page.url == srv.base_url + "/admin" and _heading(page) == "Administration"
    assert_accessible(page)
    save_screenshot(page, "admin", tmp_path)

    page.get_by_role("navigation", name="Administration").get_by_role("link", name="Peers").click()
    page.wait_for_load_state()
    assert page.url == srv.base_url + "/admin/peers"
    assert "No peers are registered" in page.locator("main").inner_text()
    assert_accessible(page)
    page.get_by_label("AE title").fill("WEBPEER")
    page.get_by_label("Host or network").fill("not a host!")
    page.get_by_role("button", name="Add peer").click()
    page.wait_for_load_state()
    assert "neither an IP address" in page.get_by_role("alert").inner_text()  # refused, said why
    assert page.get_by_label("AE title").input_value() == "WEBPEER"  # what was typed is kept
    assert_accessible(page)
    page.get_by_label("Host or network").fill("127.0.0.1")
    for service in ("echo", "find"):
        page.get_by_role("checkbox", name=service, exact=True).check()
    page.get_by_label("DICOM TLS").select_option("required")
    page.get_by_role("button", name="Add peer").click()
    page.wait_for_load_state()
    assert page.url == srv.base_url + "/admin/peers?done=peer-added"
    assert page.get_by_role("status").inner_text() == "The peer was registered."
    row = _row(page, "WEBPEER")
    assert row.get_by_role("cell").all_inner_texts()[:4] == ["127.0.0.1/32", "", "echo, find", "required"]

    row.get_by_label("Valid for (days)").fill("30")
    with page.expect_download() as downloading:
        row.get_by_role("button", name="Issue and download certificate").click()
    download = downloading.value
    assert download.suggested_filename == "WEBPEER-certificate.zip"
    saved = tmp_path / download.suggested_filename
    download.save_as(saved)
    ctx = bundle_context(saved.read_bytes(), srv.ca_file, "WEBPEER", tmp_path / "bundle")
    admitted = echo(srv.tls_port, calling="WEBPEER", tls_args=tls(ctx))
    assert getattr(admitted, "Status", None) == 0x0000, "the running server admits the bundle's peer"

    page.reload()
    assert "issued, until" in row.inner_text()
    assert_accessible(page)
    save_screenshot(page, "peers", tmp_path)

    # Removing asks first: dismissed, nothing is posted and the peer still connects.
    prompts: list[str] = []
    page.once("dialog", _answer(prompts, accept=False))
    row.get_by_role("button", name="Remove", exact=True).click()
    assert prompts == ["Remove the peer WEBPEER? It can no longer connect."]
    assert page.url == srv.base_url + "/admin/peers?done=peer-added"
    page.reload()
    assert row.count() == 1
    assert getattr(echo(srv.tls_port, calling="WEBPEER", tls_args=tls(ctx)), "Status", None) == 0x0000

    page.once("dialog", _answer(prompts, accept=True))
    row.get_by_role("button", name="Remove", exact=True).click()
    page.wait_for_url(srv.base_url + "/admin/peers?done=peer-removed")
    assert len(prompts) == 2 and row.count() == 0
    assert page.get_by_role("status").inner_text() == "The peer was removed."
    refused = echo(srv.tls_port, calling="WEBPEER", tls_args=tls(ctx))
    assert not hasattr(refused, "Status"), "a removed peer is refused, certificate or not"


def test_an_admin_s_pages_users_tokens_access_posture_and_trash(
    browser: Any, site: tuple[Server, dict[str, str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    srv, uids = site
    page = new_page(browser)
    sign_in_on(page, srv, "boss", totp_now(enrol_totp(srv.data, "boss", capsys)), path="/admin/users")
    assert page.url == srv.base_url + "/admin/users"
    assert_accessible(page)

    # A second factor for the radiologist: a QR code and its secret, which then signs them in.
    _row(page, "rad").get_by_role("button", name="Enrol TOTP").click()
    page.wait_for_load_state()
    assert _heading(page) == "Second factor for rad"
    page.wait_for_function("() => document.querySelector('img.qr').naturalWidth > 0")
    assert page.get_by_role("img", name=re.compile("QR code")).count() == 1
    typed = page.locator("#shown-once").inner_text().replace(" ", "")
    assert_accessible(page)
    save_screenshot(page, "users-totp", tmp_path, publish=False)  # a (test) TOTP secret
    secret = base64.b32decode(typed + "=" * (-len(typed) % 8))
    radiologist = new_page(browser)
    sign_in_on(radiologist, srv, "rad", totp_now(secret))
    assert radiologist.url == srv.base_url + "/studies"

    # A new user's one-time password, shown once, then their own password at the first sign-in.
    page.get_by_role("link", name="Back to the users").click()
    page.wait_for_load_state()
    assert "TOTP enrolled" in _row(page, "rad").inner_text()
    page.get_by_label("User name").fill("newrad")
    page.get_by_role("checkbox", name="radiologist", exact=True).check()
    page.get_by_role("button", name="Add user").click()
    page.wait_for_load_state()
    assert _heading(page) == "User newrad added"
    one_time = page.locator("#shown-once").inner_text()
    assert_accessible(page)
    newcomer = new_page(browser)
    sign_in_on(newcomer, srv, "newrad", password=one_time)
    assert _heading(newcomer) == "Choose a new password"
    assert_accessible(newcomer)
    newcomer.get_by_label("Current password").fill(one_time)
    newcomer.locator("#new_password").fill(NEW_PASSWORD)
    newcomer.locator("#new_password_again").fill(NEW_PASSWORD)
    newcomer.get_by_role("button", name="Change password and sign in").click()
    newcomer.wait_for_load_state()
    assert newcomer.url == srv.base_url + "/studies"

    # Tokens: the empty list, a token shown once, the list with it.
    page.get_by_role("link", name="Back to the users").click()
    page.wait_for_load_state()
    subnav = page.get_by_role("navigation", name="Administration")
    subnav.get_by_role("link", name="Tokens").click()
    page.wait_for_load_state()
    assert "No tokens have been issued." in page.locator("main").inner_text()
    assert_accessible(page)
    page.get_by_label("For user").select_option("aud")
    page.get_by_role("button", name="Issue token").click()
    page.wait_for_load_state()
    assert _heading(page).startswith("Token ") and _heading(page).endswith(" for aud")
    assert_accessible(page)
    page.get_by_role("link", name="Back to the tokens").click()
    page.wait_for_load_state()
    assert _table(page, "table.list")[0]["State"] == "active"
    assert_accessible(page)

    # Access: a grant to the referrer, listed.
    subnav.get_by_role("link", name="Access").click()
    page.wait_for_load_state()
    assert_accessible(page)
    page.locator("#grant-study").fill(uids["study"])
    page.locator("#grant-user").select_option("ref")
    page.get_by_role("button", name="Grant", exact=True).click()
    page.wait_for_load_state()
    assert page.get_by_role("status").inner_text() == "The study was granted to the user."
    assert uids["study"] in _row(page, "ref").last.inner_text()
    assert_accessible(page)

    page.get_by_role("navigation", name="Main").get_by_role("link", name="Posture").click()
    page.wait_for_load_state()
    assert _heading(page) == "Security posture"
    assert_accessible(page)
    save_screenshot(page, "posture", tmp_path)

    # The trash: empty, then the study deleted from its page (after the prompt), restored from there.
    page.goto(srv.base_url + "/studies/trash")
    assert "The trash is empty." in page.locator("main").inner_text()
    assert_accessible(page)
    page.goto(f"{srv.base_url}/studies/{uids['study']}")
    page.get_by_label("Reason").fill("duplicate of another study")
    prompts: list[str] = []
    page.once("dialog", _answer(prompts, accept=True))
    page.get_by_role("button", name="Delete study").click()
    page.wait_for_url(f"{srv.base_url}/studies/trash?deleted={uids['study']}")
    assert prompts == ["Move this study to the trash? It can be restored until its retention ends."]
    assert _table(page, "table.trash")[0]["Instances"] == str(SLICES)
    assert_accessible(page)
    page.get_by_label("Reason").fill("deleted by mistake")
    page.once("dialog", _answer(prompts, accept=True))
    page.get_by_role("button", name="Restore").click()
    page.wait_for_url(f"{srv.base_url}/studies/trash?restored={uids['study']}")
    assert "The trash is empty." in page.locator("main").inner_text()


def test_an_auditor_finds_a_radiologist_s_viewing_and_reports_the_patient_s_accesses(
    browser: Any, site: tuple[Server, dict[str, str]], tmp_path: Path
) -> None:
    srv, uids = site
    rad = new_page(browser)
    sign_in_on(rad, srv, "rad", path=f"/studies/{uids['study']}/series/{uids['series']}/view")
    shown = "document.getElementById('frame').complete && document.getElementById('frame').naturalWidth > 0"
    rad.wait_for_function(f"() => {shown}")
    for n in (SLICES // 2 + 2, SLICES // 2 + 3):  # two more images, each waited for
        rad.locator("#viewer").press("ArrowDown")
        rad.wait_for_function(
            f"() => document.getElementById('viewer-status').textContent.startsWith('Image {n} ') && {shown}"
        )

    # What a radiologist may not see: the error pages, themselves accessible.
    for path, status, title in ((
        "/admin", 403, "Administrators only"), ("/audit", 403, "Not allowed"), ("/posture", 403, "Refused"),
        ("/studies/trash", 403, "Refused"), ("/audit/records/99999999", 403, "Not allowed"),
    ):  # fmt: skip
        answer = rad.goto(srv.base_url + path)
        assert answer is not None and answer.status == status and _heading(rad) == title, path
        assert_accessible(rad)
    rad.goto(srv.base_url + "/activity")  # an error page has no navigation: it knows no visitor
    mine = _table(rad, "table.audit")
    assert any(r["Event"].startswith("110103") and r["Patient"] == PATIENT_ID for r in mine)
    assert_accessible(rad)
    save_screenshot(rad, "activity", tmp_path)

    # The auditor searches the trail by the patient.
    aud = new_page(browser)
    visited: list[str] = []  # every address the auditor's browser asks for, pages and downloads alike
    aud.on("request", lambda request: visited.append(request.url))
    sign_in_on(aud, srv, "aud", path="/audit")
    assert aud.url == srv.base_url + "/audit" and _heading(aud) == "Audit trail"
    aud.get_by_label("Patient ID").fill(PATIENT_ID)
    aud.get_by_role("button", name="Search").click()
    aud.wait_for_load_state()
    assert aud.url == srv.base_url + "/audit" and PATIENT_ID not in aud.url  # posted, answered in place
    assert aud.get_by_label("Patient ID").input_value() == PATIENT_ID  # the search is kept in the form
    viewed = [r for r in _table(aud, "table.audit") if r["Event"].startswith("110103") and r["Who"] == "rad"]
    assert len(viewed) >= 3, "each image the radiologist looked at is recorded"
    for r in viewed:
        assert r["Address"] == "127.0.0.1" and r["Patient"] == PATIENT_ID and r["Study"] == uids["study"], r
        assert "HeadlessChrome" in r["Device / user agent"], r
    assert_accessible(aud)
    save_screenshot(aud, "audit", tmp_path)

    aud.locator("table.audit").get_by_role("link", name=viewed[0]["Record"], exact=True).click()
    aud.wait_for_load_state()
    assert _heading(aud) == f"Audit record {viewed[0]['Record']}"
    requestor = aud.get_by_role("region").filter(has_text="(requestor)")
    assert requestor.get_by_role("heading").inner_text() == "rad (requestor)"
    assert requestor.locator("xpath=.//dt[.='Address']/following-sibling::dd[1]").inner_text() == "127.0.0.1"
    assert_accessible(aud)

    aud.get_by_role("button", name="Access report for this patient").click()
    aud.wait_for_load_state()
    assert _heading(aud) == f"Patient access report: patient {PATIENT_ID}"
    assert aud.url == srv.base_url + "/audit/report"
    reported = _table(aud, "table.audit")
    assert sum(1 for r in reported if r["Event"].startswith("110103") and r["Who"] == "rad") == len(viewed)
    assert_accessible(aud)
    save_screenshot(aud, "audit-report", tmp_path)

    with aud.expect_download() as downloading:
        aud.get_by_role("button", name="Download CSV").click()
    download = downloading.value
    assert re.fullmatch(r"patient-access-report-\d{8}T\d{6}Z\.csv", download.suggested_filename)
    with Path(download.path()).open(newline="", encoding="utf-8") as fh:
        lines = list(csv.DictReader(fh))
    rows = [r for r in lines if r["event"].startswith("110103") and r["who"] == "rad"]
    assert len(rows) == len(viewed)
    assert all(r["from"] == "127.0.0.1" and r["patients"] == PATIENT_ID for r in rows)
    with aud.expect_download() as downloading:
        aud.get_by_role("button", name="Download PDF").click()
    assert re.fullmatch(r"patient-access-report-\d{8}T\d{6}Z\.pdf", downloading.value.suggested_filename)
    assert Path(downloading.value.path()).read_bytes().startswith(b"%PDF-")
    assert aud.url == srv.base_url + "/audit/report" and _heading(aud).endswith(PATIENT_ID)  # still there

    # No address the browser asked for on the way holds the patient ID (nor its history, nor a log).
    assert len(visited) > 10 and not [url for url in visited if PATIENT_ID in url]
    # An old bookmark's search is not run: the empty form, and the newest records.
    aud.goto(f"{srv.base_url}/audit?patient={PATIENT_ID}&who=rad")
    assert aud.get_by_label("Patient ID").input_value() == ""
    assert aud.get_by_label("Who (user or AE title)").input_value() == ""
    assert_accessible(aud)

    aud.goto(srv.base_url + "/audit/report")  # the form alone
    assert_accessible(aud)
    aud.goto(srv.base_url + "/audit/verify")
    assert _heading(aud) == "Audit trail intact"
    assert_accessible(aud)
