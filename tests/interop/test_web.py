"""DICOMweb over HTTPS against a running ``safepacs serve``: tokens, QIDO-RS, one policy with C-FIND."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import warnings
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import httpx
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset

from safepacs.app import open_repositories
from safepacs.auth.tokens import issue_token
from tests.support import web as support_web
from tests.support.corpus import make_ct
from tests.support.dicom_client import c_find
from tests.support.server import Server, run_cli, start_server
from tests.support.web import _client, _multipart_body, _parts, _store, _token, _user

SECURITY_HEADERS = {
    "strict-transport-security",
    "content-security-policy",
    "x-content-type-options",
    "cache-control",
}


web = support_web.web  # one DICOM worker and the HTTPS listener, on a fresh data directory


def _studies(n: int) -> list[Dataset]:
    out = []
    for i in range(n):
        out.append(
            make_ct(
                patient_id=f"P{i:03d}",
                patient_name=f"Doe^{'Jane' if i % 2 else 'John'}{i}",
                StudyDate=f"2024010{i + 1}",
                Modality="CT" if i % 3 else "MR",
            )
        )
    return out


def test_no_or_bad_credentials_answer_401_with_www_authenticate(
    web: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    _user(web.data, "alice", "radiologist", capsys)
    good = _token(web.data, "alice", capsys)
    token_id = good.split("_")[1]
    repos = open_repositories(f"sqlite:///{web.data / 'index.sqlite3'}")
    try:
        expired = issue_token(
            "alice", dt.timedelta(hours=1), now=dt.datetime.now(dt.UTC) - dt.timedelta(hours=2)
        )
        repos.directory.add_token(expired.record)
    finally:
        repos.close()
    revoked = _token(web.data, "alice", capsys)
    assert run_cli("token", "revoke", revoked.split("_")[1], "--data", str(web.data)) == 0
    with _client(web) as client:
        r = client.get("/dicomweb/studies")
        assert r.status_code == 401
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert r.headers["content-type"] == "application/problem+json"
        assert SECURITY_HEADERS <= set(r.headers)
        for bad in (
            "garbage",
            f"spat_{token_id}_{'A' * 43}",  # the right id, the wrong secret
            expired.token,
            revoked,
        ):
            r = client.get("/dicomweb/studies", headers={"Authorization": f"Bearer {bad}"})
            assert r.status_code == 401, bad
            assert 'error="invalid_token"' in r.headers["www-authenticate"]
        r = client.get("/dicomweb/studies", headers={"Authorization": f"Basic {good}"})
        assert r.status_code == 401
        assert client.get("/dicomweb/studies", headers={"Authorization": f"Bearer {good}"}).status_code == 200
    # A disabled user's tokens stop working at once.
    assert run_cli("user", "disable", "alice", "--data", str(web.data)) == 0
    with _client(web, good) as client:
        assert client.get("/dicomweb/studies").status_code == 401


def test_qido_and_c_find_give_the_same_studies(web: Server, capsys: pytest.CaptureFixture[str]) -> None:
    studies = _studies(6)
    _store(web, studies)
    web.add_peer("VIEWER", "find")
    _user(web.data, "rad", "radiologist", capsys)
    token = _token(web.data, "rad", capsys)
    queries: list[dict[str, str]] = [
        {},
        {"PatientName": "Doe^Jane*"},
        {"StudyDate": "20240102-20240104"},
        {"ModalitiesInStudy": "MR"},
        {"PatientID": "P00?"},
    ]
    with _client(web, token) as client:
        for params in queries:
            r = client.get("/dicomweb/studies", params=params)
            assert r.status_code == 200, r.text
            assert r.headers["content-type"] == "application/dicom+json"
            qido = sorted(item["0020000D"]["Value"][0] for item in r.json())
            identifier = Dataset()
            identifier.QueryRetrieveLevel = "STUDY"
            identifier.StudyInstanceUID = ""
            for key, value in params.items():
                setattr(identifier, key, value)
            found, final = c_find(web.port, identifier)
            assert final.Status == 0x0000
            assert qido == sorted(str(ds.StudyInstanceUID) for ds in found), params
            assert qido, params


def test_qido_levels_paging_and_includefield(web: Server, capsys: pytest.CaptureFixture[str]) -> None:
    first = make_ct(patient_name="Roe^Richard", instance_number=1)
    second = make_ct(
        patient_name="Roe^Richard",
        study_uid=first.StudyInstanceUID,
        series_uid=first.SeriesInstanceUID,
        instance_number=2,
    )
    _store(web, [first, second, *_studies(3)])
    _user(web.data, "rad", "radiologist", capsys)
    token = _token(web.data, "rad", capsys)
    study, series = first.StudyInstanceUID, first.SeriesInstanceUID
    with _client(web, token) as client:
        r = client.get(f"/dicomweb/studies/{study}/series")
        assert [s["0020000E"]["Value"][0] for s in r.json()] == [series]
        r = client.get(f"/dicomweb/studies/{study}/series/{series}/instances")
        assert sorted(i["00080018"]["Value"][0] for i in r.json()) == sorted(
            [first.SOPInstanceUID, second.SOPInstanceUID]
        )
        assert all("00080052" not in i for i in r.json())  # no Query/Retrieve Level in QIDO answers
        page1 = client.get("/dicomweb/instances", params={"limit": 2})
        page2 = client.get("/dicomweb/instances", params={"limit": 2, "offset": 2})
        page3 = client.get("/dicomweb/instances", params={"limit": 2, "offset": 4})
        assert "additional results" in page1.headers["warning"]
        assert "warning" not in page3.headers
        uids = [i["00080018"]["Value"][0] for p in (page1, page2, page3) for i in p.json()]
        assert len(uids) == len(set(uids)) == 5
        r = client.get(
            "/dicomweb/studies", params={"StudyInstanceUID": study, "includefield": "PatientComments"}
        )
        assert "00104000" in r.json()[0]
        r = client.get("/dicomweb/studies", params={"00100010": "Roe^*"})
        assert [s["0020000D"]["Value"][0] for s in r.json()] == [study]


@pytest.mark.parametrize(
    ("path", "params", "status"),
    [
        ("/dicomweb/studies", {"NoSuchKeyword": "x"}, 400),
        ("/dicomweb/studies", {"fuzzymatching": "true"}, 400),
        ("/dicomweb/studies", {"limit": "lots"}, 400),
        ("/dicomweb/studies/1.2.3..4/series", {}, 400),
        ("/dicomweb/studies/not-a-uid/series", {}, 400),
        ("/dicomweb/nothing-here", {}, 404),
    ],
)
def test_bad_requests_get_problem_details(
    web: Server, capsys: pytest.CaptureFixture[str], path: str, params: dict[str, str], status: int
) -> None:
    _user(web.data, "rad", "radiologist", capsys)
    with _client(web, _token(web.data, "rad", capsys)) as client:
        r = client.get(path, params=params)
        assert r.status_code == status
        body = r.json()
        assert body["status"] == status and body["detail"]
        assert "Traceback" not in r.text
        assert client.get("/dicomweb/studies", headers={"Accept": "application/xml"}).status_code == 406


def test_a_principal_without_search_rights_sees_404(web: Server, capsys: pytest.CaptureFixture[str]) -> None:
    _store(web, _studies(1))
    _user(web.data, "aud", "auditor", capsys)
    _user(web.data, "rad", "radiologist", capsys)
    for token in (_token(web.data, "aud", capsys), _token(web.data, "rad", capsys, "--scope", "store")):
        with _client(web, token) as client:
            r = client.get("/dicomweb/studies")
            assert r.status_code == 404
            assert r.json()["detail"] == "no such resource"


def test_tls_is_1_2_or_newer_and_verifies_with_the_local_ca(web: Server) -> None:
    ctx = ssl.create_default_context(cafile=str(web.ca_file))
    with socket.create_connection((web.host, web.https_port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.load_verify_locations(str(web.ca_file))
    with warnings.catch_warnings():  # a client stuck at TLS 1.1 is the point of the test
        warnings.simplefilter("ignore", DeprecationWarning)
        old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("ALL:@SECLEVEL=0")
    with socket.create_connection((web.host, web.https_port), timeout=10) as raw:
        with pytest.raises(ssl.SSLError):
            old.wrap_socket(raw, server_hostname="localhost").do_handshake()


def test_dicomweb_client_searches(web: Server, capsys: pytest.CaptureFixture[str]) -> None:
    studies = _studies(2)
    _store(web, studies)
    _user(web.data, "rad", "radiologist", capsys)
    session = requests.Session()
    session.trust_env = False  # REQUESTS_CA_BUNDLE in the environment would replace our CA
    session.verify = str(web.ca_file)
    client = DICOMwebClient(
        url=f"{web.base_url}/dicomweb",
        session=session,
        headers={"Authorization": f"Bearer {_token(web.data, 'rad', capsys)}"},
    )
    found = client.search_for_studies(search_filters={"PatientID": "P001"})
    assert [s["0020000D"]["Value"][0] for s in found] == [studies[1].StudyInstanceUID]
    series = client.search_for_series(study_instance_uid=studies[0].StudyInstanceUID)
    assert [s["0020000E"]["Value"][0] for s in series] == [studies[0].SeriesInstanceUID]


def test_the_https_port_in_use_is_explained(data_dir: Path) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        with pytest.raises(AssertionError, match="http-port"):
            start_server(data_dir, "--http-port", str(busy.getsockname()[1]))
    finally:
        busy.close()


def test_wado_rs_retrieves_studies_series_instances_and_metadata(
    web: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    import pydicom
    from pydicom.uid import JPEG2000Lossless

    first = make_ct(rows=32, cols=32)
    second = make_ct(study_uid=first.StudyInstanceUID, series_uid=first.SeriesInstanceUID, instance_number=2)
    other = make_ct()
    _store(web, [first, second, other])
    _user(web.data, "rad", "radiologist", capsys)
    _user(web.data, "aud", "auditor", capsys)
    study, series = first.StudyInstanceUID, first.SeriesInstanceUID
    with _client(web, _token(web.data, "rad", capsys)) as client:
        r = client.get(
            f"/dicomweb/studies/{study}",
            headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
        )
        assert r.status_code == 200
        # Sent as stored: the length is known from the index before the parts are read.
        assert r.headers["content-length"] == str(len(r.content)) and "transfer-encoding" not in r.headers
        parts = _parts(r)
        got = {str(pydicom.dcmread(BytesIO(body)).SOPInstanceUID) for _, body in parts}
        assert got == {first.SOPInstanceUID, second.SOPInstanceUID}
        for ctype, body in parts:  # as stored, and labelled with the syntax it is in
            assert ctype.endswith(
                f"transfer-syntax={pydicom.dcmread(BytesIO(body)).file_meta.TransferSyntaxUID}"
            )
        one = _parts(
            client.get(f"/dicomweb/studies/{study}/series/{series}/instances/{first.SOPInstanceUID}")
        )
        assert len(one) == 1
        ds = pydicom.dcmread(BytesIO(one[0][1]))
        assert ds.PixelData == first.PixelData and ds.PatientName == first.PatientName
        assert len(_parts(client.get(f"/dicomweb/studies/{study}/series/{series}"))) == 2
        meta = client.get(f"/dicomweb/studies/{study}/series/{series}/metadata")
        assert meta.headers["content-type"] == "application/dicom+json"
        items = meta.json()
        assert {i["00080018"]["Value"][0] for i in items} == {first.SOPInstanceUID, second.SOPInstanceUID}
        uri = items[0]["7FE00010"]["BulkDataURI"]
        assert "InlineBinary" not in items[0]["7FE00010"]
        bulk = client.get(uri)
        assert bulk.status_code == 200
        pixels = _parts(bulk)[0][1]
        assert pixels in (first.PixelData, second.PixelData)
        # Refusals: a syntax SafePACS cannot convert to, a non-multipart Accept, unknown and malformed UIDs.
        r = client.get(
            f"/dicomweb/studies/{study}",
            headers={
                "Accept": f'multipart/related; type="application/dicom"; transfer-syntax={JPEG2000Lossless}'
            },
        )
        assert r.status_code == 406
        assert (
            client.get(f"/dicomweb/studies/{study}", headers={"Accept": "application/json"}).status_code
            == 406
        )
        assert client.get("/dicomweb/studies/1.2.3.4.5").status_code == 404
        assert client.get("/dicomweb/studies/1.2.3/../4").status_code in (400, 404)
    # A principal who may not retrieve sees the same 404 as for a study that does not exist.
    with _client(web, _token(web.data, "aud", capsys)) as client:
        r = client.get(f"/dicomweb/studies/{study}")
        assert r.status_code == 404 and r.json()["detail"] == "no such resource"
        assert client.get(f"/dicomweb/studies/{study}/metadata").status_code == 404


def test_wado_rs_decodes_compressed_instances_by_default(
    web: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    import pydicom
    from pydicom.data import get_testdata_file

    path = Path(str(get_testdata_file("JPEG2000.dcm")))
    original = pydicom.dcmread(path)
    web.add_peer("CT1", "store")
    from tests.support.dicom_client import store_files

    assert set(store_files(web.port, [path], calling="CT1").values()) == {0}
    _user(web.data, "rad", "radiologist", capsys)
    with _client(web, _token(web.data, "rad", capsys)) as client:
        url = f"/dicomweb/studies/{original.StudyInstanceUID}"
        r = client.get(url)
        # Converted: its length is not known before, so the answer is chunked.
        assert r.headers.get("transfer-encoding") == "chunked" and "content-length" not in r.headers
        decoded = _parts(r)
        assert "transfer-syntax=1.2.840.10008.1.2.1" in decoded[0][0]
        ds = pydicom.dcmread(BytesIO(decoded[0][1]))
        assert (ds.pixel_array == original.pixel_array).all()
        as_stored = _parts(
            client.get(
                url, headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
            )
        )
        assert f"transfer-syntax={original.file_meta.TransferSyntaxUID}" in as_stored[0][0]
        assert pydicom.dcmread(BytesIO(as_stored[0][1])).PixelData == original.PixelData


def _file(ds: Dataset) -> bytes:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_stow_rs_stores_through_the_ingest_path(web: Server, capsys: pytest.CaptureFixture[str]) -> None:
    import pydicom

    _user(web.data, "tech", "technologist", capsys)
    _user(web.data, "ref", "referrer", capsys)
    a, b = make_ct(), make_ct()
    with _client(web, _token(web.data, "tech", capsys)) as client:
        body, ctype = _multipart_body([_file(a), _file(b)])
        r = client.post("/dicomweb/studies", content=body, headers={"Content-Type": ctype})
        assert r.status_code == 200, r.text
        stored = r.json()["00081199"]["Value"]
        assert {i["00081155"]["Value"][0] for i in stored} == {a.SOPInstanceUID, b.SOPInstanceUID}
        # One good part, one garbage part: 202 with a Failure Reason; all garbage: 409.
        c = make_ct()
        body, ctype = _multipart_body([_file(c), b"\x00" * 128 + b"DICMgarbage"])
        r = client.post("/dicomweb/studies", content=body, headers={"Content-Type": ctype})
        assert r.status_code == 202
        assert r.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xC000]
        body, ctype = _multipart_body([b"not dicom at all"])
        assert (
            client.post("/dicomweb/studies", content=body, headers={"Content-Type": ctype}).status_code == 409
        )
        # The study in the path must be the instances' study.
        body, ctype = _multipart_body([_file(make_ct())])
        r = client.post(
            f"/dicomweb/studies/{a.StudyInstanceUID}", content=body, headers={"Content-Type": ctype}
        )
        assert r.status_code == 409
        # Not multipart, no boundary, a broken body.
        assert (
            client.post(
                "/dicomweb/studies", content=_file(a), headers={"Content-Type": "application/dicom"}
            ).status_code
            == 415
        )
        assert (
            client.post(
                "/dicomweb/studies",
                content=b"x",
                headers={"Content-Type": 'multipart/related; type="application/dicom"'},
            ).status_code
            == 400
        )
        assert (
            client.post("/dicomweb/studies", content=b"--nope", headers={"Content-Type": ctype}).status_code
            == 400
        )
    # The instances are there, byte for byte, for WADO-RS - here for a referrer granted the study.
    assert run_cli("access", "grant", a.StudyInstanceUID, "--user", "ref", "--data", str(web.data)) == 0
    with _client(web, _token(web.data, "ref", capsys)) as client:
        parts = _parts(
            client.get(
                f"/dicomweb/studies/{a.StudyInstanceUID}",
                headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
            )
        )
        assert pydicom.dcmread(BytesIO(parts[0][1])).PixelData == a.PixelData
        # A referrer may not store: the endpoint answers as if it did not exist.
        body, ctype = _multipart_body([_file(make_ct())])
        assert (
            client.post("/dicomweb/studies", content=body, headers={"Content-Type": ctype}).status_code == 404
        )


def test_stow_rs_refuses_a_body_over_the_limit(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    srv = start_server(
        data_dir, env={"SAFEPACS_SERVER__WORKERS": "1", "SAFEPACS_SERVER__MAX_REQUEST_BYTES": "100000"}
    )
    try:
        _user(srv.data, "tech", "technologist", capsys)
        with _client(srv, _token(srv.data, "tech", capsys)) as client:
            body, ctype = _multipart_body([_file(make_ct(rows=512, cols=512))])
            r = client.post("/dicomweb/studies", content=body, headers={"Content-Type": ctype})
            assert r.status_code == 413
            assert r.json()["title"] == "Content Too Large"
    finally:
        srv.stop()


def _stow_client_token(archive: object) -> str:
    from tests.support.webapp import add_user

    add_user(archive, "tech", "technologist")  # type: ignore[arg-type]
    token = issue_token("tech", dt.timedelta(hours=1))
    archive.directory.add_token(token.record)  # type: ignore[attr-defined]
    return token.token


def _mixed_body(parts: list[tuple[str, bytes]], boundary: str = "mixed-boundary") -> tuple[bytes, str]:
    """A multipart body of (Content-Type, content) parts."""
    body = b"".join(
        f"--{boundary}\r\nContent-Type: {ctype}\r\n\r\n".encode() + content + b"\r\n"
        for ctype, content in parts
    )
    return (
        body + f"--{boundary}--\r\n".encode(),
        f'multipart/related; type="application/dicom"; boundary={boundary}',
    )


def test_stow_rs_refuses_more_parts_than_allowed_whole_with_one_record(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request over ``server.max_stow_parts`` (or ``server.max_request_bytes``) is refused before any
    part is looked at: 413 with a problem body, nothing stored, one audit record whatever it carried."""
    from safepacs.audit.events import Action, EventID, Outcome
    from tests.support.audit_capture import AuditCapture
    from tests.support.webapp import inprocess

    monkeypatch.setenv("SAFEPACS_SERVER__MAX_STOW_PARTS", "4")
    monkeypatch.setenv("SAFEPACS_SERVER__MAX_REQUEST_BYTES", "300000")
    with inprocess(data_dir) as (client, archive):
        headers = {"Authorization": f"Bearer {_stow_client_token(archive)}"}
        capture = AuditCapture(archive.audit_log)
        body, ctype = _multipart_body([_file(make_ct()) for _ in range(5)])
        r = client.post("/dicomweb/studies", content=body, headers={**headers, "Content-Type": ctype})
        assert r.status_code == 413, r.text
        assert r.headers["content-type"] == "application/problem+json"
        assert "at most 4 instances" in r.json()["detail"]
        assert archive.instances.count_instances() == 0
        assert [p for p in (data_dir / "objects").rglob("*") if p.is_file()] == []
        (event,) = capture.events()
        assert (event.event_id, event.action, event.outcome) == (
            EventID.INSTANCES_ACCESSED,
            Action.CREATE,
            Outcome.MINOR_FAILURE,
        )
        assert "at most 4 instances" in (event.outcome_description or "") and event.objects == ()
        # A body over the byte limit: the same single record.
        capture.reset()
        body, ctype = _multipart_body([_file(make_ct(rows=512, cols=512))])
        r = client.post("/dicomweb/studies", content=body, headers={**headers, "Content-Type": ctype})
        assert r.status_code == 413 and r.json()["title"] == "Content Too Large"
        assert len(capture.events()) == 1
        # At the limit, the request is served.
        capture.reset()
        body, ctype = _multipart_body([_file(make_ct(rows=16, cols=16)) for _ in range(4)])
        r = client.post("/dicomweb/studies", content=body, headers={**headers, "Content-Type": ctype})
        assert r.status_code == 200, r.text
        assert archive.instances.count_instances() == 4


def test_the_stow_part_limit_is_a_validated_setting(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from safepacs.config import load_settings
    from safepacs.config._settings import render_default_toml
    from safepacs.errors import ConfigError

    assert load_settings(data_dir).server.max_stow_parts == 2000
    assert "\nmax_stow_parts = 2000\n" in render_default_toml()
    monkeypatch.setenv("SAFEPACS_SERVER__MAX_STOW_PARTS", "0")
    with pytest.raises(ConfigError, match=r"server\.max_stow_parts"):
        load_settings(data_dir)


def test_stow_rs_refuses_non_dicom_parts_cheaply_with_one_record_per_request(data_dir: Path) -> None:
    """Parts that are not application/dicom or not DICOM Part 10 are refused without being parsed, and,
    like every refused part, are summed up in the request's one summary record, not recorded one by one."""
    from safepacs.audit.events import Action, EventID, Outcome
    from tests.support.audit_capture import AuditCapture
    from tests.support.webapp import inprocess

    good = make_ct(rows=16, cols=16, patient_id="STOW-1")
    with inprocess(data_dir) as (client, archive):
        headers = {"Authorization": f"Bearer {_stow_client_token(archive)}"}
        capture = AuditCapture(archive.audit_log)
        parts = (
            [("text/plain", b"hello %d" % i) for i in range(10)]
            + [("application/dicom", b"\x00" * 200) for _ in range(10)]  # no "DICM" after the preamble
            + [("application/dicom", b"\x00" * 128 + b"DICMgarbage") for _ in range(5)]  # unreadable meta
            + [("application/octet-stream", _file(make_ct(rows=16, cols=16)))]  # DICOM, wrong type
            + [("application/dicom", _file(good))]
        )
        body, ctype = _mixed_body(parts)
        r = client.post("/dicomweb/studies", content=body, headers={**headers, "Content-Type": ctype})
        assert r.status_code == 202, r.text
        failed = r.json()["00081198"]["Value"]
        assert len(failed) == 26 and {f["00081197"]["Value"][0] for f in failed} == {0xC000}
        assert len(r.json()["00081199"]["Value"]) == 1
        assert archive.instances.count_instances() == 1
        events = capture.events()
        # The stored instance's own record, then the request's summary: nothing per refused part.
        assert [e.event_id for e in events] == [EventID.INSTANCES_ACCESSED, EventID.INSTANCES_TRANSFERRED]
        summary = events[1]
        assert (summary.action, summary.outcome) == (Action.CREATE, Outcome.MINOR_FAILURE)
        why = summary.outcome_description or ""
        assert why.startswith("instances received: 1 stored, 26 refused (")
        assert "not application/dicom: 11" in why and "not a DICOM Part 10 file" in why
        assert summary.study_uids == (str(good.StudyInstanceUID),)
        # Nothing stored at all: 409, and still one record.
        capture.reset()
        body, ctype = _mixed_body([("text/plain", b"x")] * 3 + [("application/dicom", b"nope")])
        r = client.post("/dicomweb/studies", content=body, headers={**headers, "Content-Type": ctype})
        assert r.status_code == 409
        (only,) = capture.events()
        assert only.event_id is EventID.INSTANCES_TRANSFERRED and only.outcome is Outcome.MINOR_FAILURE
        assert (only.outcome_description or "").startswith("instances received: 4 refused (")


def test_stow_rs_answers_an_instance_with_other_content_as_a_failure(data_dir: Path) -> None:
    """A part whose SOP Instance UID is stored with other content is not stored: FailedSOPSequence with
    FailureReason 0xC111 (as C-STORE answers), 409 when nothing else was stored, 202 beside a stored
    part; recorded on its own, naming the instance; the stored object is unchanged."""
    import pydicom

    from safepacs.audit.events import EventID, ObjectKind, Outcome
    from tests.support.audit_capture import AuditCapture
    from tests.support.webapp import inprocess

    original = make_ct(rows=16, cols=16, patient_id="STOW-DUP")
    changed = pydicom.dcmread(BytesIO(_file(original)))
    changed.PatientName = "Someone^Else"
    with inprocess(data_dir) as (client, archive):
        headers = {"Authorization": f"Bearer {_stow_client_token(archive)}"}

        def stow(*datasets: Dataset) -> httpx.Response:
            body, ctype = _multipart_body([_file(ds) for ds in datasets])
            return client.post("/dicomweb/studies", content=body, headers={**headers, "Content-Type": ctype})

        assert stow(original).status_code == 200
        assert stow(original).status_code == 200  # the same bytes again: stored already, success
        before = archive.instances.get_instance(str(original.SOPInstanceUID))
        capture = AuditCapture(archive.audit_log)
        r = stow(changed)
        assert r.status_code == 409, r.text
        (failed,) = r.json()["00081198"]["Value"]
        assert failed["00081155"]["Value"] == [original.SOPInstanceUID]
        assert failed["00081197"]["Value"] == [0xC111]
        assert "00081199" not in r.json()
        conflict = capture.events(EventID.INSTANCES_ACCESSED)[0]
        assert conflict.outcome is Outcome.MINOR_FAILURE
        (study,) = [o for o in conflict.objects if o.kind is ObjectKind.STUDY]
        assert dict(study.detail)["SOP Instance UID"] == original.SOPInstanceUID
        other = make_ct(rows=16, cols=16)
        r = stow(changed, other)
        assert r.status_code == 202, r.text
        assert [i["00081155"]["Value"] for i in r.json()["00081199"]["Value"]] == [[other.SOPInstanceUID]]
        assert r.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xC111]
        assert archive.instances.get_instance(str(original.SOPInstanceUID)) == before


def test_multipart_stream_sends_what_multipart_makes_in_batches() -> None:
    import asyncio

    from safepacs.protocols.dicomweb.retrieval import Part, multipart, multipart_stream

    def parts(fail_after: int | None = None) -> Iterator[Part]:
        for n in range(7):
            if n == fail_after:
                raise RuntimeError("read failed")
            size = 200_000 if n % 2 else 100
            yield f"application/dicom; n={n}", bytes([n]) * size
        yield "application/octet-stream", iter([b"a" * 70_000, b"b", b"c"])  # streamed, no length

    async def collect(fail_after: int | None, batch: int) -> tuple[list[bytes], Exception | None]:
        got: list[bytes] = []
        try:
            async for chunk in multipart_stream(parts(fail_after), "mark", batch):
                got.append(chunk)
        except RuntimeError as exc:
            return got, exc
        return got, None

    expected = b"".join(multipart(parts(), "mark"))
    for batch in (1, 300_000, 10_000_000):
        got, failure = asyncio.run(collect(None, batch))
        assert failure is None and b"".join(got) == expected
    # Contents of 64 KiB or more go as they are; what lies between them goes joined, one chunk each.
    got, _ = asyncio.run(collect(None, 10_000_000))
    assert sorted(len(chunk) for chunk in got if len(chunk) >= 64 * 1024) == [70_000, *[200_000] * 3]
    assert len(got) == 9
    # A failure ends the body where it happened: what came before it is sent, then the error.
    before: list[bytes] = []
    with pytest.raises(RuntimeError):
        for chunk in multipart(parts(3), "mark"):
            before.append(chunk)
    got, failure = asyncio.run(collect(3, 10_000_000))
    assert isinstance(failure, RuntimeError) and b"".join(got) == b"".join(before)


def test_multipart_length_is_the_length_of_what_multipart_makes() -> None:
    from safepacs.protocols.dicomweb.retrieval import multipart, multipart_length

    for sizes in ([], [0], [1], [9, 10, 99, 100, 100_000], [526_000] * 3):
        parts = [(f"application/dicom; transfer-syntax=1.2.{n}", b"x" * size) for n, size in enumerate(sizes)]
        for mark in ("m", "0123456789abcdef" * 2):
            expected = len(b"".join(multipart(parts, mark)))
            assert multipart_length([(ctype, len(body)) for ctype, body in parts], mark) == expected


def test_wado_rs_sized_answers_leave_out_an_instance_of_another_size() -> None:
    """An answer sent with a Content-Length from the index's sizes: an instance whose bytes are not of
    the recorded size would not fit, so it is left out and the answer cut short (never a wrong length)."""
    from dataclasses import replace

    from safepacs.protocols.dicomweb.retrieval import AS_STORED, IncompleteAnswer, multipart
    from safepacs.protocols.dicomweb.wado import _instances, _sized_length
    from safepacs.types import InstanceRef, StoredBlob

    ts = "1.2.840.10008.1.2.1"
    stored = {f"1.2.{n}": bytes([n]) * (1000 + n) for n in range(4)}
    refs = [
        InstanceRef(
            "1.1", "1.1.1", "1.2.840.10008.5.1.4.1.1.2", uid, ts, StoredBlob(f"{n:032x}", "k", "", len(b))
        )
        for n, (uid, b) in enumerate(stored.items())
    ]
    first = (f"application/dicom; transfer-syntax={ts}", stored["1.2.0"])

    def read(ref: InstanceRef) -> bytes:
        return stored[ref.sop_instance_uid]

    for target in (AS_STORED, ts):
        length = _sized_length(refs, first, target, "mark")
        parts = _instances(refs[1:], read, target, first=first, sized=True)
        assert length == len(b"".join(multipart(parts, "mark")))
    # Converting: the length is not known before.
    assert _sized_length(refs, first, "1.2.840.10008.1.2", "mark") is None
    # An index record that names another size (of the first: chunked; of another: left out, cut short).
    wrong_first = replace(refs[0], blob=replace(refs[0].blob, size=1))
    assert _sized_length([wrong_first, *refs[1:]], first, AS_STORED, "mark") is None
    stored["1.2.2"] += b"!"
    got = []
    with pytest.raises(IncompleteAnswer):
        for _ctype, body in _instances(refs[1:], read, AS_STORED, first=first, sized=True):
            got.append(body)
    assert got == [stored["1.2.0"], stored["1.2.1"], stored["1.2.3"]]


def test_security_headers_are_added_unless_the_answer_set_them() -> None:
    import asyncio

    from starlette.types import Message, Receive, Scope, Send

    from safepacs.protocols.dicomweb.security import SecurityHeaders

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        start = {"type": "http.response.start", "status": 200, "headers": [(b"cache-control", b"private")]}
        await send(start)
        await send({"type": "http.response.body", "body": b"x", "more_body": False})

    async def call() -> list[Message]:
        sent: list[Message] = []

        async def receive() -> Message:
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            sent.append(message)

        await SecurityHeaders(app)({"type": "http", "method": "GET", "path": "/"}, receive, send)
        return sent

    start, body = asyncio.run(call())
    headers = dict(start["headers"])
    assert headers[b"cache-control"] == b"private"  # the answer's own value is kept
    assert {name.encode() for name in SECURITY_HEADERS} <= set(headers)
    assert headers[b"x-frame-options"] == b"DENY"
    assert body == {"type": "http.response.body", "body": b"x", "more_body": False}


def test_an_object_swapped_in_the_store_is_refused_not_served(
    web: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    """Someone who can write the object store (not the keys) puts one intact object in another's place:
    SafePACS refuses to serve it, whether the index recorded the object's GCM tag (rows written since
    migration 0007) or only its SHA-256 (rows from before)."""
    import sqlite3

    first, other = make_ct(rows=32, cols=32), make_ct(rows=32, cols=32)
    _store(web, [first, other])
    _user(web.data, "rad", "radiologist", capsys)
    db = sqlite3.connect(web.data / "index.sqlite3")
    rows = dict(db.execute("SELECT sop_instance_uid, blob_id FROM instances").fetchall())
    tags = [t for (t,) in db.execute("SELECT seal_tag FROM instances")]
    assert len(tags) == 2 and all(t and len(t) == 32 for t in tags)
    path = {uid: web.data / "objects" / b[:2] / b for uid, b in rows.items()}
    original = path[first.SOPInstanceUID].read_bytes()
    path[first.SOPInstanceUID].write_bytes(path[other.SOPInstanceUID].read_bytes())
    url = f"/dicomweb/studies/{first.StudyInstanceUID}/series/{first.SeriesInstanceUID}/instances/"
    with _client(web, _token(web.data, "rad", capsys)) as client:
        for legacy in (False, True):
            if legacy:
                db.execute("UPDATE instances SET seal_tag = NULL")
                db.commit()
            # Read and refused before the answer begins: a 500 problem, nothing of it sent.
            assert served(client.get(url + first.SOPInstanceUID)) == [], legacy
        path[first.SOPInstanceUID].write_bytes(original)  # put back: served again (SHA-256 path)
        assert served(client.get(url + first.SOPInstanceUID)) == [first.SOPInstanceUID]
    db.close()


def served(r: httpx.Response) -> list[str]:
    """The SOP Instance UIDs of the parts of a WADO-RS answer (none when it failed)."""
    import pydicom

    if not r.is_success:
        return []
    return [str(pydicom.dcmread(BytesIO(body)).SOPInstanceUID) for _, body in _parts(r)]


def test_an_unexpected_failure_is_a_500_problem_with_the_security_headers(data_dir: Path) -> None:
    """Starlette answers an unexpected exception from its outermost middleware, past ours: the
    answer must still carry the security headers, and no traceback or exception text."""
    import asyncio

    from safepacs.app import open_archive
    from safepacs.config import load_settings
    from safepacs.protocols.dicomweb.app import create_app
    from tests.support.webapp import add_user

    archive = open_archive(load_settings(data_dir))
    try:
        add_user(archive, "rad", "radiologist")
        token = issue_token("rad", dt.timedelta(hours=1))
        archive.directory.add_token(token.record)

        def broken_search(*_: object, **__: object) -> None:
            raise RuntimeError("secret internal state Doe^Jane")

        archive.query.search = broken_search  # type: ignore[method-assign]
        transport = httpx.ASGITransport(app=create_app(archive), raise_app_exceptions=False)

        async def get() -> httpx.Response:
            async with httpx.AsyncClient(transport=transport, base_url="https://testserver") as client:
                return await client.get(
                    "/dicomweb/studies", headers={"Authorization": f"Bearer {token.token}"}
                )

        r = asyncio.run(get())
    finally:
        archive.close()
    assert r.status_code == 500
    assert r.headers["content-type"] == "application/problem+json"
    assert SECURITY_HEADERS <= set(r.headers)
    assert "Doe" not in r.text and "RuntimeError" not in r.text and "Traceback" not in r.text
