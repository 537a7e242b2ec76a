"""The web UI's sign-in, study search and study pages, in-process over the real application and index."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from safepacs.app import Archive
from safepacs.audit.events import EventID
from tests.support.audit_capture import AuditCapture
from tests.support.corpus import make_ct
from tests.support.ui import COOKIE, form_token, post_form, sign_in
from tests.support.ui import ORIGIN as SAME_ORIGIN
from tests.support.webapp import PASSWORD, AppClient, add_user, inprocess, store

Client = tuple[AppClient, Archive]


@pytest.fixture
def app(data_dir: Path) -> Iterator[Client]:
    with inprocess(data_dir) as pair:
        yield pair


def _studies(html: str) -> list[str]:
    return re.findall(r'<a href="/studies/([0-9.]+)">', html)


def test_pages_send_a_stranger_to_sign_in_and_back(app: Client) -> None:
    client, archive = app
    add_user(archive, "rad", "radiologist")
    r = client.get("/studies?modality=CT")
    assert r.status_code == 303 and r.headers["location"] == "/login?next=/studies%3Fmodality%3DCT"
    assert client.get("/").headers["location"] == "/login?next=/"
    page = client.get("/login?next=/studies%3Fmodality%3DCT")
    assert page.status_code == 200 and 'value="/studies?modality=CT"' in page.text
    assert page.headers["content-security-policy"].startswith("default-src 'none'; script-src 'self';")
    assert "unsafe-inline" not in page.headers["content-security-policy"]
    assert page.headers["strict-transport-security"].startswith("max-age=")
    assert "<script>" not in page.text and " style=" not in page.text  # nothing the CSP would block
    r = client.post(
        "/login",
        data={"username": "rad", "password": PASSWORD, "next": "/studies?modality=CT"},
        headers=SAME_ORIGIN,
    )
    assert r.status_code == 303 and r.headers["location"] == "/studies?modality=CT"
    cookie = r.headers["set-cookie"]
    assert cookie.startswith(COOKIE + "=") and "Secure" in cookie and "HttpOnly" in cookie
    assert "SameSite=Strict" in cookie and "Domain" not in cookie and "Path=/" in cookie
    # Another site is never the destination, however `next` is written.
    for foreign in ("https://evil.example/", "//evil.example/", "/\\evil.example"):
        r = client.post(
            "/login",
            data={"username": "rad", "password": PASSWORD, "next": foreign},
            headers=SAME_ORIGIN,
        )
        assert r.headers["location"] == "/", foreign


def test_a_failed_sign_in_says_the_same_whatever_was_wrong_and_is_recorded(app: Client) -> None:
    client, archive = app
    add_user(archive, "rad", "radiologist")
    capture = AuditCapture(archive.audit_log)
    wrong = client.post("/login", data={"username": "rad", "password": "not it at all"}, headers=SAME_ORIGIN)
    nobody = client.post(
        "/login", data={"username": "nobody", "password": "not it at all"}, headers=SAME_ORIGIN
    )
    assert wrong.status_code == nobody.status_code == 401
    assert "set-cookie" not in wrong.headers
    message = re.search(r'<p class="error" role="alert">(.*?)</p>', wrong.text)
    assert message is not None and message.group(1) in nobody.text
    failures = [e for e in capture.events(EventID.USER_AUTHENTICATION) if e.outcome.value != 0]
    assert {p.user_id for e in failures for p in e.participants if p.requestor} == {"rad", "nobody"}
    assert {p.address for e in failures for p in e.participants if p.requestor} == {"127.0.0.1"}


def test_a_sign_in_form_from_another_site_is_refused(app: Client) -> None:
    client, archive = app
    add_user(archive, "rad", "radiologist")
    for headers in ({"Origin": "https://evil.example"}, {}, {"Origin": "null"}):
        r = client.post("/login", data={"username": "rad", "password": PASSWORD}, headers=headers)
        assert r.status_code == 403 and "set-cookie" not in r.headers, headers
    r = client.post("/login", json={"username": "rad", "password": PASSWORD}, headers=SAME_ORIGIN)
    assert r.status_code == 415 and "set-cookie" not in r.headers


def test_first_sign_in_changes_the_one_time_password(app: Client) -> None:
    client, archive = app
    add_user(archive, "tech", "technologist", must_change=True)
    r = client.post("/login", data={"username": "tech", "password": PASSWORD}, headers=SAME_ORIGIN)
    assert r.status_code == 200 and 'action="/login/password"' in r.text and "set-cookie" not in r.headers
    change = {"username": "tech", "password": PASSWORD, "new_password": "a much better phrase"}
    r = client.post("/login/password", data={**change, "new_password_again": "a different phrase!"},
                    headers=SAME_ORIGIN)  # fmt: skip
    assert r.status_code == 400 and "differ" in r.text
    r = client.post("/login/password", data={**change, "new_password_again": change["new_password"]},
                    headers=SAME_ORIGIN)  # fmt: skip
    assert r.status_code == 303
    assert (
        client.get("/studies", headers={"Cookie": r.headers["set-cookie"].split(";")[0]}).status_code == 200
    )
    assert sign_in(client, "tech", password="a much better phrase")


def test_an_admin_without_totp_is_told_to_enrol(app: Client, data_dir: Path) -> None:
    client, archive = app
    add_user(archive, "boss", "admin")
    r = client.post("/login", data={"username": "boss", "password": PASSWORD}, headers=SAME_ORIGIN)
    assert r.status_code == 403 and "totp-enroll" in r.text and "set-cookie" not in r.headers


def test_studies_show_only_what_the_person_may_see(app: Client) -> None:
    client, archive = app
    add_user(archive, "rad", "radiologist")
    add_user(archive, "ref", "referrer")  # no grants, and refers none of these studies
    uids = []
    for n in range(3):
        ds = make_ct(patient_id=f"PID-{n}", patient_name=f"Smith{n}^Ann")
        store(archive, ds)
        uids.append(str(ds.StudyInstanceUID))
    rad = sign_in(client, "rad")
    assert sorted(_studies(client.get("/studies", headers=rad).text)) == sorted(uids)
    study = client.get(f"/studies/{uids[0]}", headers=rad)
    assert study.status_code == 200 and "PID-0" in study.text and "/thumbnail" in study.text
    assert "Instances (1)" in study.text and "64x64" in study.text  # the series' instances
    ref = sign_in(client, "ref")
    listing = client.get("/studies", headers=ref)
    assert listing.status_code == 200 and _studies(listing.text) == [] and "No studies found" in listing.text
    hidden = client.get(f"/studies/{uids[0]}", headers=ref)
    missing = client.get("/studies/1.2.3.4.5", headers=ref)
    assert hidden.status_code == missing.status_code == 404
    assert "PID-0" not in hidden.text and hidden.text == missing.text  # 404, not 403: nothing confirmed
    view = client.get(f"/studies/{uids[0]}/series/1.2.3/view", headers=ref)
    assert view.status_code == 404
    assert client.get("/", headers=ref).headers["location"] == "/studies"  # a referrer searches studies


def test_people_land_where_their_role_works_and_error_pages_keep_the_navigation(app: Client) -> None:
    client, archive = app
    add_user(archive, "aud", "auditor")
    add_user(archive, "rad", "radiologist")
    aud = sign_in(client, "aud")
    assert client.get("/", headers=aud).headers["location"] == "/audit"
    listing = client.get("/studies", headers=aud)  # an auditor searches no studies: said, not hidden
    assert listing.status_code == 403 and "Your role does not search studies" in listing.text
    assert 'href="/studies"' not in listing.text and 'href="/audit"' in listing.text  # navigation
    assert 'action="/logout"' in listing.text
    rad = sign_in(client, "rad")
    assert client.get("/", headers=rad).headers["location"] == "/studies"
    missing = client.get("/studies/1.2.3.4", headers=rad)
    assert missing.status_code == 404 and 'href="/activity"' in missing.text


def test_search_fields_and_paging(app: Client) -> None:
    client, archive = app
    add_user(archive, "rad", "radiologist")
    store(archive, make_ct(patient_id="MR-1", patient_name="Jones^Bob", Modality="MR", StudyDate="20240301",
                           AccessionNumber="A-77", ReferringPhysicianName="House^Greg"))  # fmt: skip
    for n in range(27):
        store(archive, make_ct(patient_id=f"CT-{n}", patient_name="Brown^Cy", StudyDate="20240105"))
    rad = sign_in(client, "rad")

    token = form_token(client.get("/studies", headers=rad).text)

    def search(**fields: str) -> httpx.Response:
        return post_form(client, "/studies", rad, **{"form_token": token, **fields})

    def found(**fields: str) -> list[str]:
        r = search(**fields)
        assert r.status_code == 200, r.text
        return re.findall(r"<td>((?:MR|CT)-\d+)</td>", r.text)

    assert found(name="Jon") == ["MR-1"]
    assert found(name="jon") == ["MR-1"]  # people type names in any case
    assert found(patient_id="MR-1") == ["MR-1"]
    assert found(modality="mr") == ["MR-1"]
    assert found(accession="A-77") == ["MR-1"]
    assert found(referring="House") == ["MR-1"]
    assert found(date_from="2024-03-01", date_to="2024-03-31") == ["MR-1"]
    first = search(name="Brown").text
    assert len(re.findall(r"<td>CT-\d+</td>", first)) == 25 and 'data-rel="next"' in first
    # The next page is a form carrying the criteria, never a URL holding the patient's name.
    assert 'name="name" value="Brown"' in first and "?name=" not in first
    second = search(name="Brown", page="2").text
    assert len(re.findall(r"<td>CT-\d+</td>", second)) == 2 and 'data-rel="next"' not in second
    assert 'data-rel="prev"' in second
    for bad in ({"date_from": "2024-13-45"}, {"modality": "C;T"}):
        r = search(**bad)
        assert r.status_code == 400 and "<h1>Search not understood</h1>" in r.text, bad
    assert search(page="abc").status_code == 200
    # Criteria in a URL are not used (the page never makes such URLs): the plain first page.
    assert (
        len(re.findall(r"<td>(?:MR|CT)-\d+</td>", client.get("/studies?patient_id=MR-1", headers=rad).text))
        == 25
    )
    assert search(patient_id="MR-1", form_token="0" * 64).status_code == 403  # not this session's form


def test_viewing_a_study_is_recorded_with_person_address_and_browser(app: Client) -> None:
    client, archive = app
    add_user(archive, "rad", "radiologist")
    ds = make_ct(patient_id="AUD-1")
    store(archive, ds)
    rad = sign_in(client, "rad")
    capture = AuditCapture(archive.audit_log)
    agent = "Mozilla/5.0 (ward-3 workstation)"
    r = client.get(f"/studies/{ds.StudyInstanceUID}", headers={**rad, "User-Agent": agent})
    assert r.status_code == 200
    queries = capture.events(EventID.QUERY)
    assert queries, "the study page's queries are on the trail"
    people = [p for e in queries for p in e.participants if p.requestor]
    assert {p.user_id for p in people} == {"rad"}
    assert {p.address for p in people} == {"127.0.0.1"} and {p.user_agent for p in people} == {agent}


def test_sign_out_needs_the_form_token_and_ends_the_session(app: Client) -> None:
    client, archive = app
    add_user(archive, "rad", "radiologist")
    rad = sign_in(client, "rad")
    page = client.get("/studies", headers=rad)
    token = form_token(page.text)
    forged = post_form(client, "/logout", rad, go="1")
    assert forged.status_code == 403
    foreign = client.post(
        "/logout", data={"form_token": token}, headers={**rad, "Origin": "https://x.example"}
    )
    assert foreign.status_code == 403
    assert client.get("/studies", headers=rad).status_code == 200  # still signed in
    wrong = sign_in(client, "rad")  # another session's token is not this one's
    assert (
        post_form(
            client, "/logout", rad, form_token=form_token(client.get("/studies", headers=wrong).text)
        ).status_code
        == 403
    )
    r = post_form(client, "/logout", rad, form_token=token)
    assert r.status_code == 303 and "Max-Age=0" in r.headers["set-cookie"]
    assert client.get("/studies", headers=rad).status_code == 303  # the session is over
    assert client.get("/dicomweb/studies", headers=rad).status_code == 401
