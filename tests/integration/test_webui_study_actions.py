"""The study page's actions in-process: the DICOM ZIP download (a retrieval like WADO-RS: policy,
scope, audit with the browser's user agent), and for administrators deleting with a reason, the trash
and restoring; refusals for the roles without them and for posts without the form token."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from safepacs.app import Archive
from safepacs.audit.events import EventID, Outcome
from safepacs.protocols.dicomweb.retrieval import IncompleteAnswer
from safepacs.protocols.webui.study_actions import zip_stream
from safepacs.types import Principal, PrincipalKind, QueryLevel, QueryModel, Service
from tests.support.audit_capture import AuditCapture
from tests.support.corpus import make_ct
from tests.support.ui import add_admin, form_token, post_form, sign_in
from tests.support.webapp import AppClient, add_user, inprocess, part10

AGENT = "Mozilla/5.0 (X11; Linux x86_64) SafePACS-UI-test"


@pytest.fixture
def app(data_dir: Path) -> Iterator[tuple[AppClient, Archive]]:
    with inprocess(data_dir) as pair:
        yield pair


@pytest.fixture
def study(app: tuple[AppClient, Archive]) -> tuple[str, dict[str, bytes]]:
    """A stored study of two series (three instances): its UID and each instance's Part 10 bytes."""
    _, archive = app
    uid = generate_uid()
    stored: dict[str, bytes] = {}
    for series, count in ((generate_uid(), 2), (generate_uid(), 1)):
        for n in range(1, count + 1):
            ds = make_ct(study_uid=uid, series_uid=series, instance_number=n, seed=n,
                         patient_name="Quokkafield^Zebediah")  # fmt: skip
            body = part10(ds)
            archive.ingest.ingest_file(Principal(kind=PrincipalKind.SYSTEM, name="test"), body)
            stored[f"{uid}/{series}/{ds.SOPInstanceUID}.dcm"] = body
    return uid, stored


def data_set(part10_file: bytes) -> bytes:
    """The data set of a Part 10 file: what follows its file meta group (its length is the group's first
    element, (0002,0000) UL, right after the preamble and 'DICM')."""
    meta_length = int.from_bytes(part10_file[140:144], "little")
    return part10_file[144 + meta_length :]


def _qido(client: AppClient, headers: dict[str, str], uid: str) -> list[object]:
    r = client.get(f"/dicomweb/studies?StudyInstanceUID={uid}", headers=headers)
    assert r.status_code in (200, 204), r.text
    return r.json() if r.status_code == 200 else []


def test_download_is_every_stored_instance_as_stored_and_audited(
    app: tuple[AppClient, Archive], study: tuple[str, dict[str, bytes]]
) -> None:
    client, archive = app
    uid, stored = study
    add_user(archive, "rita", "radiologist")
    headers = sign_in(client, "rita", agent=AGENT)
    page = client.get(f"/studies/{uid}", headers=headers)
    assert page.status_code == 200
    assert f'href="/studies/{uid}/download"' in page.text and "Download (DICOM ZIP)" in page.text
    assert "Delete study" not in page.text  # a radiologist deletes nothing

    capture = AuditCapture(archive.audit_log)
    r = client.get(f"/studies/{uid}/download", headers=headers)
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/zip"
    assert r.headers["content-disposition"] == f'attachment; filename="{uid}.zip"'
    assert r.headers["cache-control"] == "no-store"
    with zipfile.ZipFile(io.BytesIO(r.content)) as zipped:
        assert zipped.testzip() is None
        assert sorted(zipped.namelist()) == sorted(stored)  # UIDs only: no patient name in a path
        entries = {name: zipped.read(name) for name in zipped.namelist()}
        assert {zipped.getinfo(name).compress_type for name in entries} == {zipfile.ZIP_STORED}
    # Each file is the stored object exactly as WADO-RS hands it out as stored (SafePACS's own file
    # meta), and its data set is byte for byte the one ingested.
    wado = client.get(
        f"/dicomweb/studies/{uid}",
        headers={**headers, "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
    )
    assert wado.status_code == 200
    for name, body in entries.items():
        assert body in wado.content
        assert body[128:132] == b"DICM" and body.endswith(data_set(stored[name]))

    (sent, _wado) = capture.events(EventID.INSTANCES_TRANSFERRED)
    assert sent.study_uids == (uid,)
    (person,) = [p for p in sent.participants if p.requestor]
    assert person.user_id == "rita" and person.user_agent == AGENT and person.address == "127.0.0.1"


def test_download_refused_to_those_who_may_not_retrieve_the_study(
    app: tuple[AppClient, Archive], study: tuple[str, dict[str, bytes]]
) -> None:
    client, archive = app
    uid, _ = study
    # A referrer sees only the studies granted to them: this one does not exist for them.
    add_user(archive, "rex", "referrer")
    referrer = sign_in(client, "rex")
    for url in (f"/studies/{uid}", f"/studies/{uid}/download"):
        r = client.get(url, headers=referrer)
        assert r.status_code == 404 and "Study not found" in r.text
        assert "PK" not in r.text[:2]
    # A technologist finds the study but may not retrieve it: no button, and the address is refused.
    add_user(archive, "tess", "technologist")
    tech = sign_in(client, "tess")
    capture = AuditCapture(archive.audit_log)
    page = client.get(f"/studies/{uid}", headers=tech)
    assert page.status_code == 200 and "Download (DICOM ZIP)" not in page.text
    r = client.get(f"/studies/{uid}/download", headers=tech)
    assert r.status_code == 403 and "does not allow downloading" in r.text
    assert r.headers["content-type"].startswith("text/html")
    assert capture.events(EventID.INSTANCES_TRANSFERRED) == []
    (refusal,) = capture.events(EventID.SECURITY_ALERT)
    assert refusal.user_ids == ("tess",) and "get" in (refusal.outcome_description or "")
    # Nobody signed in: the sign-in page, nothing else.
    r = client.get(f"/studies/{uid}/download")
    assert r.status_code == 303 and r.headers["location"].startswith("/login?next=/studies/")


def test_admin_deletes_with_a_reason_and_restores_from_the_trash(
    app: tuple[AppClient, Archive],
    study: tuple[str, dict[str, bytes]],
    data_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    client, archive = app
    uid, stored = study
    admin = add_admin(client, archive, data_dir, capsys)
    page = client.get(f"/studies/{uid}", headers=admin)
    assert page.status_code == 200 and "Delete study" in page.text and 'id="delete-reason"' in page.text
    token = form_token(page.text)
    capture = AuditCapture(archive.audit_log)

    # Without the form token, from another origin, or without a reason: refused, nothing changes.
    r = post_form(client, f"/studies/{uid}/delete", admin, reason="duplicate upload")
    assert r.status_code == 403
    r = client.post(f"/studies/{uid}/delete", data={"form_token": token, "reason": "duplicate upload"},
                    headers={**admin, "Origin": "https://evil.example"})  # fmt: skip
    assert r.status_code == 403
    r = post_form(client, f"/studies/{uid}/delete", admin, form_token=token, reason="   ")
    assert r.status_code == 400 and "Reason required" in r.text
    assert len(_qido(client, admin, uid)) == 1
    assert capture.events(EventID.STUDY_DELETED) == []

    reason = "wrong patient,\n re-sent"  # kept on one line
    r = post_form(client, f"/studies/{uid}/delete", admin, form_token=token, reason=reason)
    assert r.status_code == 303 and r.headers["location"] == f"/studies/trash?deleted={uid}"
    assert _qido(client, admin, uid) == []  # QIDO no longer finds it
    assert client.get(f"/studies/{uid}", headers=admin).status_code == 404
    (deleted,) = capture.events(EventID.STUDY_DELETED)
    assert deleted.study_uids == (uid,)
    assert (deleted.outcome_description or "").endswith("reason: wrong patient, re-sent")
    assert [p.user_id for p in deleted.participants if p.requestor] == ["root"]

    trash = client.get(r.headers["location"], headers=admin)
    assert trash.status_code == 200
    assert f"Study {uid} was moved to the trash." in trash.text
    assert f'action="/studies/{uid}/restore"' in trash.text and ">3</td>" in trash.text

    r = post_form(client, f"/studies/{uid}/restore", admin, form_token=token)
    assert r.status_code == 400  # a restore needs its reason too
    r = post_form(client, f"/studies/{uid}/restore", admin, form_token=token, reason="deleted by mistake")
    assert r.status_code == 303 and r.headers["location"] == f"/studies/trash?restored={uid}"
    assert len(_qido(client, admin, uid)) == 1
    (restored,) = [e for e in capture.events(EventID.INSTANCES_ACCESSED) if e.study_uids == (uid,)]
    assert restored.outcome_description == "restored from the trash; reason: deleted by mistake"
    trash = client.get("/studies/trash", headers=admin)
    assert "The trash is empty." in trash.text
    # Restored as stored: the download is byte for byte what was ingested.
    with zipfile.ZipFile(io.BytesIO(client.get(f"/studies/{uid}/download", headers=admin).content)) as z:
        assert sorted(z.namelist()) == sorted(stored)
        assert all(z.read(name).endswith(data_set(body)) for name, body in stored.items())
    r = post_form(client, f"/studies/{uid}/restore", admin, form_token=token, reason="again")
    assert r.status_code == 404 and "Not in the trash" in r.text


def test_a_radiologist_cannot_delete_or_see_the_trash(
    app: tuple[AppClient, Archive], study: tuple[str, dict[str, bytes]]
) -> None:
    client, archive = app
    uid, _ = study
    add_user(archive, "rita", "radiologist")
    headers = sign_in(client, "rita")
    token = form_token(client.get(f"/studies/{uid}", headers=headers).text)  # the sign-out form's
    capture = AuditCapture(archive.audit_log)
    r = post_form(client, f"/studies/{uid}/delete", headers, form_token=token, reason="tidying up")
    assert r.status_code == 403 and "Only administrators" in r.text
    assert len(_qido(client, headers, uid)) == 1
    assert capture.events(EventID.STUDY_DELETED) == []
    (refusal,) = capture.events(EventID.SECURITY_ALERT)
    assert refusal.user_ids == ("rita",) and "delete" in (refusal.outcome_description or "")
    assert client.get("/studies/trash", headers=headers).status_code == 403
    r = post_form(client, f"/studies/{uid}/restore", headers, form_token=token, reason="x")
    assert r.status_code == 403


def test_a_damaged_object_is_never_downloaded(
    app: tuple[AppClient, Archive], study: tuple[str, dict[str, bytes]], data_dir: Path
) -> None:
    """An object swapped in the store: as the first of the study, the download is a 500 page before
    anything is sent; further on, the others are sent and the ZIP ends without its central directory
    (the answer is cut short), so no archive program takes it for the whole study.  Both recorded."""
    client, archive = app
    uid, _ = study
    add_user(archive, "rita", "radiologist")
    headers = sign_in(client, "rita")
    identifier = Dataset()
    identifier.QueryRetrieveLevel, identifier.StudyInstanceUID = "STUDY", uid
    refs = archive.instances.instances_for(QueryModel.STUDY_ROOT, QueryLevel.STUDY, identifier)
    first, second, third = (data_dir / "objects" / r.blob.blob_id[:2] / r.blob.blob_id for r in refs)
    intact = first.read_bytes()
    first.write_bytes(third.read_bytes())  # an intact object of another instance in its place
    capture = AuditCapture(archive.audit_log)
    r = client.get(f"/studies/{uid}/download", headers=headers)
    assert r.status_code == 500 and "Download failed" in r.text
    assert r.headers["content-type"].startswith("text/html")
    (alert,) = capture.events(EventID.SECURITY_ALERT)
    assert refs[0].sop_instance_uid in str(alert)
    assert capture.events(EventID.INSTANCES_TRANSFERRED)[-1].outcome is not Outcome.SUCCESS  # its failure

    # Further on: what the route streams (the in-process client refuses an answer cut short).
    first.write_bytes(intact)
    second.write_bytes(third.read_bytes())
    capture.reset()
    principal = Principal(kind=PrincipalKind.USER, name="rita", allow=frozenset({Service.GET}))
    retrieval = archive.retrieve.begin(principal, refs, EventID.INSTANCES_TRANSFERRED)
    sent: list[bytes] = []
    with pytest.raises(IncompleteAnswer):
        sent.extend(zip_stream(refs, retrieval.read))
    with pytest.raises(zipfile.BadZipFile):
        zipfile.ZipFile(io.BytesIO(b"".join(sent)))
    body = b"".join(sent)
    assert refs[0].sop_instance_uid.encode() in body and refs[2].sop_instance_uid.encode() in body
    assert f"{refs[1].sop_instance_uid}.dcm".encode() not in body
    (alert,) = capture.events(EventID.SECURITY_ALERT)
    assert refs[1].sop_instance_uid in str(alert)
