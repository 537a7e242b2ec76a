"""The web UI's audit pages and My activity, in-process on a real data directory: an auditor finds a
radiologist's DICOMweb retrieval (user, address, user agent, patient), reports on the patient as
HTML, CSV and PDF, sees the trail verify and then break when a record is changed; nobody else reads
the trail; everyone reads their own activity, and only theirs.  The search and the report are POST
forms (origin and form token checked): no patient ID, user name or address is ever in a URL."""

from __future__ import annotations

import csv
import html
import io
import re
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from safepacs.app import Archive
from safepacs.audit.events import AuditFilter, EventID, Outcome, from_canonical
from tests.support.corpus import make_ct
from tests.support.server import run_cli
from tests.support.ui import ORIGIN, form_token, post_form, sign_in, text_of
from tests.support.webapp import AppClient, add_user, execute, inprocess, store

PATIENT = "P-AUDIT-7"
AGENT = "RadStation/9.1 (audit-ui-test)"
WADO = {"Accept": 'multipart/related; type="application/dicom"', "User-Agent": AGENT}


@pytest.fixture
def app(data_dir: Path) -> Iterator[tuple[AppClient, Archive, str]]:
    """The site with an auditor (carol), a radiologist (rad) and one study of :data:`PATIENT`."""
    with inprocess(data_dir) as (client, archive):
        add_user(archive, "carol", "auditor")
        add_user(archive, "rad", "radiologist")
        ct = make_ct(patient_id=PATIENT, patient_name="Audit^Alice")
        store(archive, ct)
        yield client, archive, str(ct.StudyInstanceUID)


def _raw_rows(page: str) -> list[str]:
    """The HTML of each body row of the page's table."""
    body = page.split("<tbody>", 1)[1].split("</tbody>", 1)[0] if "<tbody>" in page else ""
    return body.split("<tr")[1:]


def _rows(page: str) -> list[str]:
    """The text of each body row of the page's table."""
    return [text_of(row) for row in _raw_rows(page)]


def _form(page: str, button: str) -> tuple[str, dict[str, str]]:
    """The action and fields a click on ``button`` posts: the hidden fields of the form holding it,
    and the button's own name and value."""
    for found in re.finditer(r'<form [^>]*action="([^"]+)"[^>]*>(.*?)</form>', page, re.S):
        pressed = re.search(rf"<button [^>]*>{re.escape(button)}</button>", found.group(2))
        if pressed is None:
            continue
        assert 'method="post"' in found.group(0)
        fields = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)">', found.group(2)))
        fields.update(re.findall(r'name="([^"]+)" value="([^"]*)"', pressed.group(0)))
        return found.group(1), {k: html.unescape(v) for k, v in fields.items()}
    raise AssertionError(f"no form with a {button!r} button on the page")


def _urls(page: str) -> list[str]:
    """Every address the page's links and forms lead to."""
    return [html.unescape(u) for u in re.findall(r'(?:href|action)="([^"]*)"', page)]


def _token(client: AppClient, browser: dict[str, str]) -> str:
    """The form token of a browser's session, from a page that reads nothing of the trail."""
    return form_token(client.get("/audit/report", headers=browser).text)


def _search(client: AppClient, browser: dict[str, str], /, **fields: str) -> httpx.Response:
    """The audit search form posted with ``fields`` (as the page's Search button does)."""
    return post_form(client, "/audit", browser, form_token=_token(client, browser), **fields)


def _report(client: AppClient, browser: dict[str, str], /, **fields: str) -> httpx.Response:
    """The report form posted with ``fields``."""
    return post_form(client, "/audit/report", browser, form_token=_token(client, browser), **fields)


def _trail(archive: Archive) -> int:
    """How many records the trail holds."""
    return len(archive.audit_log.search_audit(AuditFilter()))


def _retrieve(client: AppClient, rad: dict[str, str], study: str) -> None:
    r = client.get(f"/dicomweb/studies/{study}", headers={**rad, **WADO})
    assert r.status_code == 200 and len(r.content) > 1000


def _pdf_text(pdf: bytes) -> str:
    """The text-drawing operators of every (Flate-compressed or plain) content stream of a PDF."""
    out = []
    for raw in re.findall(rb"stream\r?\n(.*?)\r?\nendstream", pdf, re.S):
        try:
            out.append(zlib.decompress(raw).decode("latin-1"))
        except zlib.error:
            out.append(raw.decode("latin-1"))
    return "\n".join(out)


def test_the_auditor_finds_a_retrieval_and_reports_it_as_html_csv_and_pdf(
    app: tuple[AppClient, Archive, str],
) -> None:
    client, archive, study = app
    carol, rad = sign_in(client, "carol"), sign_in(client, "rad")
    _retrieve(client, rad, study)

    page = _search(client, carol, patient=PATIENT)
    assert page.status_code == 200, page.text
    assert not any(PATIENT in url for url in _urls(page.text))  # nor in the answer's links and forms
    (row,) = [r for r in _rows(page.text) if AGENT in r and "110104" in r]
    assert all(part in row for part in ("rad", "127.0.0.1", PATIENT, study, "success", "read"))
    assert "Intact." in text_of(page.text)
    # The search is itself on the trail, as the auditor typed it.
    (used,) = [
        e
        for e in map(
            from_canonical, (r.body for r in archive.audit_log.search_audit(AuditFilter(user="carol")))
        )
        if e.event_id is EventID.AUDIT_LOG_USED and e.objects[0].query and PATIENT in e.objects[0].query
    ]
    assert used.participants[0].user_id == "carol"
    # Each row links to its record, which shows every field.
    (raw,) = [r for r in _raw_rows(page.text) if AGENT in r and "110104" in r]
    seq = re.search(r'href="/audit/records/(\d+)"', raw)
    assert seq is not None
    detail = client.get(f"/audit/records/{seq.group(1)}", headers=carol)
    assert detail.status_code == 200
    shown = text_of(detail.text)
    assert all(part in shown for part in (AGENT, "127.0.0.1", PATIENT, study, "rad", "Previous hash"))
    assert _form(detail.text, "Access report for this patient")[1]["patient"] == PATIENT
    assert not any(PATIENT in url for url in _urls(detail.text))
    assert client.get("/audit/records/999999", headers=carol).status_code == 404

    # Narrowing: by outcome, address and who.
    failures = _rows(_search(client, carol, patient=PATIENT, outcome="failure").text)
    assert not any(AGENT in r for r in failures)
    assert any(AGENT in r for r in _rows(_search(client, carol, address="127.0.0.1", who="rad").text))
    assert _rows(_search(client, carol, address="10.9.9.9").text) == []
    refused = _search(client, carol, **{"from": "yesterday"})
    assert refused.status_code == 400 and "From must be a date" in text_of(refused.text)

    # The report, from the search page's button for the searched patient.
    action, fields = _form(page.text, "Access report for this patient")
    assert (action, fields["patient"]) == ("/audit/report", PATIENT)
    report = post_form(client, action, carol, **fields)
    assert report.status_code == 200
    assert any(AGENT in r and "rad" in r and "127.0.0.1" in r for r in _rows(report.text))
    assert f"patient {PATIENT}" in text_of(report.text)
    assert not any(PATIENT in url for url in _urls(report.text))

    # Its downloads are the report page's buttons, which post the report's fields again.
    action, fields = _form(report.text, "Download CSV")
    assert (action, fields["patient"], fields["format"]) == ("/audit/report", PATIENT, "csv")
    as_csv = post_form(client, action, carol, **fields)
    assert as_csv.status_code == 200 and as_csv.headers["content-type"].startswith("text/csv")
    disposition = as_csv.headers["content-disposition"]
    assert disposition.startswith("attachment;") and ".csv" in disposition and PATIENT not in disposition
    records = list(csv.DictReader(io.StringIO(as_csv.text)))
    (transfer,) = [r for r in records if AGENT in r["device"] and r["event"].startswith("110104")]
    assert (transfer["who"], transfer["from"], transfer["patients"], transfer["studies"]) == (
        "rad", "127.0.0.1", PATIENT, study
    )  # fmt: skip

    action, fields = _form(report.text, "Download PDF")
    as_pdf = post_form(client, action, carol, **fields)
    assert as_pdf.status_code == 200 and as_pdf.headers["content-type"] == "application/pdf"
    assert as_pdf.content.startswith(b"%PDF") and PATIENT not in as_pdf.headers["content-disposition"]
    drawn = _pdf_text(as_pdf.content)
    assert f"(Patient access report: patient {PATIENT})" in drawn and "by carol" in drawn
    assert "(rad)" in drawn and "(127.0.0.1)" in drawn

    # Each report was recorded with its format.
    asked = [
        e.objects[0].query or ""
        for e in map(
            from_canonical, (r.body for r in archive.audit_log.search_audit(AuditFilter(user="carol")))
        )
        if e.event_id is EventID.AUDIT_LOG_USED
    ]
    assert {q.split()[1] for q in asked if q.startswith("report")} == {
        "format=html",
        "format=csv",
        "format=pdf",
    }
    assert _report(client, carol, patient=PATIENT, format="xls").status_code == 400
    # A study UID narrows the report (posted with the patient ID, never in a URL).
    narrowed = _report(client, carol, patient=PATIENT, study="1.2.3.999")
    assert narrowed.status_code == 200 and "in this study or time range" in text_of(narrowed.text)


def test_the_verification_says_intact_then_broken_where_a_record_was_changed(
    app: tuple[AppClient, Archive, str], data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    client, archive, study = app
    carol, rad = sign_in(client, "carol"), sign_in(client, "rad")
    _retrieve(client, rad, study)
    page = text_of(client.get("/audit", headers=carol).text)
    assert "Intact. Audit trail intact:" in page
    (record,) = [
        r
        for r in archive.audit_log.search_audit(AuditFilter(user="rad"))
        if AGENT in r.body and from_canonical(r.body).event_id is EventID.INSTANCES_TRANSFERRED
    ]
    execute(  # someone with write access to the index hides who retrieved the study
        data_dir,
        sa.text("UPDATE audit_log SET body = :b WHERE seq = :s").bindparams(
            b=record.body.replace('"rad"', '"someone"'), s=record.seq
        ),
    )
    now = text_of(client.get("/audit/verify", headers=carol).text)
    assert f"Audit trail TAMPERED at record {record.seq}" in now
    assert run_cli("audit", "verify", "--data", str(data_dir)) == 1  # the page says what the CLI says
    said = capsys.readouterr().err.strip()
    assert said.startswith("Audit trail TAMPERED") and said in now
    assert f"Audit trail TAMPERED at record {record.seq}" in text_of(client.get("/audit", headers=carol).text)
    # Each verification is on the trail.
    verifications = [
        e
        for e in map(
            from_canonical, (r.body for r in archive.audit_log.search_audit(AuditFilter(user="carol")))
        )
        if e.event_id is EventID.AUDIT_LOG_USED and e.objects[0].query == "verify"
    ]
    assert len(verifications) >= 2


def test_only_those_the_policy_lets_read_the_trail_see_the_audit_pages(
    app: tuple[AppClient, Archive, str],
) -> None:
    client, archive, _ = app
    rad = sign_in(client, "rad")
    token = form_token(client.get("/activity", headers=rad).text)
    for url in ("/audit", "/audit/report", "/audit/verify", "/audit/records/1"):
        r = client.get(url, headers=rad)
        assert r.status_code == 403 and "auditor role" in text_of(r.text), url
        assert AGENT not in r.text and "110104" not in r.text
    for url, fields in (
        ("/audit", {"patient": PATIENT}),
        ("/audit/report", {"patient": PATIENT, "format": "csv"}),
    ):
        r = post_form(client, url, rad, form_token=token, **fields)  # a good form, from the wrong person
        assert r.status_code == 403 and "auditor role" in text_of(r.text), url
        assert AGENT not in r.text and "110104" not in r.text
    alerts = [
        e
        for e in map(
            from_canonical, (r.body for r in archive.audit_log.search_audit(AuditFilter(user="rad")))
        )
        if e.event_id is EventID.SECURITY_ALERT
    ]
    assert len(alerts) == 6 and all(e.outcome is Outcome.MINOR_FAILURE for e in alerts)
    # Without a session: to the sign-in page, and back afterwards - without an old bookmark's patient ID.
    r = client.get(f"/audit?patient={PATIENT}")
    assert r.status_code == 303 and r.headers["location"] == "/login?next=/audit"
    r = post_form(client, "/audit", {}, form_token=token, patient=PATIENT)
    assert r.status_code == 303 and PATIENT not in r.headers["location"]


def test_a_search_posted_without_the_form_token_or_from_another_site_is_refused_unrecorded(
    app: tuple[AppClient, Archive, str],
) -> None:
    client, archive, _ = app
    carol = sign_in(client, "carol")
    token = _token(client, carol)
    before = _trail(archive)
    for url in ("/audit", "/audit/report"):
        fields = {"patient": PATIENT}
        for sent in (fields, {**fields, "form_token": "forged"}):
            r = post_form(client, url, carol, **sent)
            assert r.status_code == 403 and "Reload the page" in text_of(r.text), url
        r = client.post(url, data={**fields, "form_token": token},
                        headers={**carol, "Origin": "https://elsewhere.example"})  # fmt: skip
        assert r.status_code == 403 and "not sent from this site" in text_of(r.text), url
        r = client.post(url, data={**fields, "form_token": token}, headers=carol)  # no Origin at all
        assert r.status_code == 403, url
        assert PATIENT not in r.text and AGENT not in r.text
    assert _trail(archive) == before  # nothing searched, nothing recorded
    # The same form with the token and from this site is answered (and recorded).
    assert _search(client, carol, patient=PATIENT).status_code == 200
    assert _trail(archive) > before


def test_the_audit_pages_ignore_search_parameters_in_a_url(app: tuple[AppClient, Archive, str]) -> None:
    client, archive, study = app
    carol, rad = sign_in(client, "carol"), sign_in(client, "rad")
    _retrieve(client, rad, study)
    page = client.get(f"/audit?patient=NOBODY&who=nobody&address=10.9.9.9&study={study}", headers=carol)
    assert page.status_code == 200
    assert 'name="patient" value=""' in page.text and "NOBODY" not in page.text  # the empty form
    assert any(AGENT in r for r in _rows(page.text))  # the newest records, unfiltered
    (latest, *_) = [
        e.objects[0].query
        for e in map(
            from_canonical,
            (r.body for r in archive.audit_log.search_audit(AuditFilter(user="carol"), newest_first=True)),
        )
        if e.event_id is EventID.AUDIT_LOG_USED and e.objects[0].query != "verify"
    ]
    assert latest == "web search"  # recorded as the search it was: without criteria
    before = _trail(archive)
    report = client.get(f"/audit/report?patient={PATIENT}&format=csv", headers=carol)
    assert report.status_code == 200 and report.headers["content-type"].startswith("text/html")
    assert 'name="patient" required value=""' in report.text and _rows(report.text) == []
    assert _trail(archive) == before  # the empty form reads nothing of the trail


def test_my_activity_lists_my_own_records_only_and_is_itself_recorded(
    app: tuple[AppClient, Archive, str],
) -> None:
    client, archive, study = app
    carol, rad = sign_in(client, "carol"), sign_in(client, "rad")
    _retrieve(client, rad, study)
    assert _search(client, carol, patient=PATIENT).status_code == 200
    # Someone tries rad's user name with a wrong password: rad should see it.
    wrong = client.post("/login", data={"username": "rad", "password": "not it at all"}, headers=ORIGIN)
    assert wrong.status_code == 401

    page = client.get("/activity", headers=rad)
    assert page.status_code == 200
    rows = _rows(page.text)
    assert any(AGENT in r and "110104" in r and PATIENT in r for r in rows)
    assert any("110114" in r and "refused" in r for r in rows)  # the failed sign-in with rad's name
    assert all(" rad " in f" {r} " for r in rows)  # every row is rad's
    assert not any("carol" in r for r in rows)  # not the auditor's search of rad's patient
    # The look at one's own activity is recorded first, so it is the newest row.
    assert "110101 Audit Log Used" in rows[0]
    (looked, *_) = [
        e
        for e in map(
            from_canonical,
            (r.body for r in archive.audit_log.search_audit(AuditFilter(user="rad"), newest_first=True)),
        )
        if e.event_id is EventID.AUDIT_LOG_USED
    ]
    assert looked.objects[0].query == "own activity"
    # The auditor's own activity holds their search, and none of rad's records.
    mine = _rows(client.get("/activity", headers=carol).text)
    assert any("110101" in r for r in mine) and not any(AGENT in r for r in mine)


def test_pages_of_the_trail_go_back_in_time_without_repeating(app: tuple[AppClient, Archive, str]) -> None:
    client, _, _ = app
    carol, rad = sign_in(client, "carol"), sign_in(client, "rad")
    for _ in range(60):  # each query is a record of rad's (and each page of carol's): two pages and more
        assert client.get(f"/dicomweb/studies?PatientID={PATIENT}", headers=rad).status_code == 200
    seen: list[int] = []
    pages = 1
    page = _search(client, carol, who="rad").text
    while True:
        seen += [int(s) for s in re.findall(r'href="/audit/records/(\d+)"', page)]
        if ">Older records</button>" not in page:
            break
        action, fields = _form(page, "Older records")  # the criteria and the cursor, posted
        assert fields["who"] == "rad" and fields["before"] == str(seen[-1])
        page = post_form(client, action, carol, **fields).text
        pages += 1
        assert "rad" not in "".join(_urls(page))
    assert pages >= 2 and len(seen) == len(set(seen)) >= 61 and seen == sorted(seen, reverse=True)
    # Back to the newest page, with the same criteria.
    action, fields = _form(page, "Newest records")
    assert "before" not in fields and fields["who"] == "rad"
    newest = post_form(client, action, carol, **fields).text
    assert int(re.findall(r'href="/audit/records/(\d+)"', newest)[0]) >= seen[0]
