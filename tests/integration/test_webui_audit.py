"""The web UI's audit pages and My activity, in-process on a real data directory: an auditor finds a
radiologist's DICOMweb retrieval (user, address, user agent, patient), reports on the patient as
HTML, CSV and PDF, sees the trail verify and then break when a record is changed; nobody else reads
the trail; everyone reads their own activity, and only theirs."""

from __future__ import annotations

import csv
import io
import re
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from safepacs.app import Archive
from safepacs.audit.events import AuditFilter, EventID, Outcome, from_canonical
from tests.support.corpus import make_ct
from tests.support.server import run_cli
from tests.support.ui import ORIGIN, sign_in, text_of
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

    page = client.get(f"/audit?patient={PATIENT}", headers=carol)
    assert page.status_code == 200, page.text
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
    assert client.get("/audit/records/999999", headers=carol).status_code == 404

    # Narrowing: by outcome, address and who.
    failures = _rows(client.get(f"/audit?patient={PATIENT}&outcome=failure", headers=carol).text)
    assert not any(AGENT in r for r in failures)
    assert any(AGENT in r for r in _rows(client.get("/audit?address=127.0.0.1&who=rad", headers=carol).text))
    assert _rows(client.get("/audit?address=10.9.9.9", headers=carol).text) == []
    assert client.get("/audit?from=yesterday", headers=carol).status_code == 400

    report = client.get(f"/audit/report?patient={PATIENT}", headers=carol)
    assert report.status_code == 200
    assert any(AGENT in r and "rad" in r and "127.0.0.1" in r for r in _rows(report.text))
    assert f"patient {PATIENT}" in text_of(report.text)

    as_csv = client.get(f"/audit/report?patient={PATIENT}&format=csv", headers=carol)
    assert as_csv.status_code == 200 and as_csv.headers["content-type"].startswith("text/csv")
    disposition = as_csv.headers["content-disposition"]
    assert disposition.startswith("attachment;") and ".csv" in disposition and PATIENT not in disposition
    records = list(csv.DictReader(io.StringIO(as_csv.text)))
    (transfer,) = [r for r in records if AGENT in r["device"] and r["event"].startswith("110104")]
    assert (transfer["who"], transfer["from"], transfer["patients"], transfer["studies"]) == (
        "rad", "127.0.0.1", PATIENT, study
    )  # fmt: skip

    as_pdf = client.get(f"/audit/report?patient={PATIENT}&format=pdf", headers=carol)
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
    assert client.get(f"/audit/report?patient={PATIENT}&format=xls", headers=carol).status_code == 400


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
    for url in ("/audit", f"/audit/report?patient={PATIENT}", f"/audit/report?patient={PATIENT}&format=csv",
                "/audit/verify", "/audit/records/1"):  # fmt: skip
        r = client.get(url, headers=rad)
        assert r.status_code == 403 and "auditor role" in text_of(r.text), url
        assert AGENT not in r.text and "110104" not in r.text
    alerts = [
        e
        for e in map(
            from_canonical, (r.body for r in archive.audit_log.search_audit(AuditFilter(user="rad")))
        )
        if e.event_id is EventID.SECURITY_ALERT
    ]
    assert len(alerts) == 5 and all(e.outcome is Outcome.MINOR_FAILURE for e in alerts)
    # Without a session: to the sign-in page, and back afterwards.
    r = client.get(f"/audit?patient={PATIENT}")
    assert r.status_code == 303 and r.headers["location"].startswith("/login?next=/audit")


def test_my_activity_lists_my_own_records_only_and_is_itself_recorded(
    app: tuple[AppClient, Archive, str],
) -> None:
    client, archive, study = app
    carol, rad = sign_in(client, "carol"), sign_in(client, "rad")
    _retrieve(client, rad, study)
    assert client.get(f"/audit?patient={PATIENT}", headers=carol).status_code == 200
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
    for _ in range(30):  # each query is a record of rad's (and each page of carol's)
        assert client.get(f"/dicomweb/studies?PatientID={PATIENT}", headers=rad).status_code == 200
    seen: list[int] = []
    url: str | None = "/audit?who=rad"
    while url is not None:
        page = client.get(url, headers=carol).text
        seen += [int(s) for s in re.findall(r'href="/audit/records/(\d+)"', page)]
        older = re.search(r'href="(/audit\?[^"]*before=\d+)" rel="next"', page)
        url = older.group(1).replace("&amp;", "&") if older else None
    assert len(seen) == len(set(seen)) >= 31 and seen == sorted(seen, reverse=True)
