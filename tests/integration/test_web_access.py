"""One policy for DIMSE and DICOMweb against a running server: scopes, grants, peers acting for a
user, DELETE, the trash and purge."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pynetdicom.sop_class import CTImageStorage

from safepacs.app import open_repositories
from tests.support import web as support_web
from tests.support.corpus import make_ct
from tests.support.dicom_client import FIND_CONTEXTS, associate, c_find, c_get
from tests.support.server import Server, run_cli
from tests.support.web import _client, _store, _token, _user

ELE = "1.2.840.10008.1.2.1"


web = support_web.web  # one DICOM worker and the HTTPS listener, on a fresh data directory


def _cli(data: Path, *args: str) -> None:
    assert run_cli(*args, "--data", str(data)) == 0


def _three_studies() -> list[Dataset]:
    return [
        make_ct(patient_id="P1", ReferringPhysicianName="House^Gregory", InstitutionName="North"),
        make_ct(patient_id="P2", ReferringPhysicianName="Wilson^James", InstitutionName="North"),
        make_ct(
            patient_id="P3", ReferringPhysicianName="house^gregory", InstitutionName="South", Modality="MR"
        ),
    ]


def _qido(srv: Server, token: str) -> set[str]:
    with _client(srv, token) as client:
        r = client.get("/dicomweb/studies")
        assert r.status_code == 200, r.text
        return {item["0020000D"]["Value"][0] for item in r.json()}


def _cfind(srv: Server, calling: str) -> set[str]:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = ""
    found, final = c_find(srv.port, identifier, calling=calling)
    assert final.Status == 0x0000
    return {str(ds.StudyInstanceUID) for ds in found}


def test_a_referrer_sees_the_same_studies_over_qido_and_c_find(
    web: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    house, wilson, house_mr = _three_studies()
    _store(web, [house, wilson, house_mr])
    _user(web.data, "house", "referrer", capsys)
    _user(web.data, "rad", "radiologist", capsys)
    _user(web.data, "cuddy", "radiologist", capsys)
    house_token = _token(web.data, "house", capsys)
    rad_token = _token(web.data, "rad", capsys)
    cuddy_token = _token(web.data, "cuddy", capsys)
    web.add_peer("HOUSEVIEW", "find,get", extra=("--user", "house"))
    everything = {house.StudyInstanceUID, wilson.StudyInstanceUID, house_mr.StudyInstanceUID}

    # A referrer without a scope sees nothing - by QIDO-RS and by C-FIND from the AE that acts for them.
    assert _qido(web, house_token) == set() == _cfind(web, "HOUSEVIEW")
    assert _qido(web, rad_token) == everything

    _cli(web.data, "access", "scope", "house", "--referring-physician", "House^Gregory")
    mine = {house.StudyInstanceUID, house_mr.StudyInstanceUID}
    assert _qido(web, house_token) == mine == _cfind(web, "HOUSEVIEW")

    # A grant adds one study, for both protocols.
    _cli(web.data, "access", "grant", wilson.StudyInstanceUID, "--user", "house", "--expires", "1d")
    assert _qido(web, house_token) == everything == _cfind(web, "HOUSEVIEW")
    _cli(web.data, "access", "revoke", wilson.StudyInstanceUID, "--user", "house")

    # Scoping a radiologist to an institution and a modality.
    _cli(web.data, "access", "scope", "cuddy", "--institution", "North", "--modality", "CT")
    assert _qido(web, cuddy_token) == {house.StudyInstanceUID, wilson.StudyInstanceUID}
    _cli(web.data, "access", "scope", "cuddy", "--group", "teaching")
    assert _qido(web, cuddy_token) == set()
    _cli(web.data, "access", "group", "add", wilson.StudyInstanceUID, "teaching")
    assert _qido(web, cuddy_token) == {wilson.StudyInstanceUID}
    _cli(web.data, "access", "scope", "cuddy", "--clear")
    assert _qido(web, cuddy_token) == everything

    # What is not visible cannot be retrieved, and looks exactly like what does not exist.
    with _client(web, house_token) as client:
        hidden = client.get(f"/dicomweb/studies/{wilson.StudyInstanceUID}")
        absent = client.get("/dicomweb/studies/1.2.3.4.5.6.7")
        assert hidden.status_code == absent.status_code == 404
        assert hidden.json() == absent.json()
        shown = client.get(f"/dicomweb/studies/{house.StudyInstanceUID}/metadata")
        assert shown.status_code == 200
        hidden_series = client.get(f"/dicomweb/studies/{wilson.StudyInstanceUID}/series")
        assert hidden_series.status_code == 200 and hidden_series.text in ("", "[]")
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = [wilson.StudyInstanceUID, house.StudyInstanceUID]
    received, final = c_get(web.port, identifier, [(CTImageStorage, [ELE])], calling="HOUSEVIEW")
    assert final.Status == 0x0000
    assert set(received) == {house.SOPInstanceUID}

    # A disabled user's AE is refused like a stranger.
    _cli(web.data, "user", "disable", "house")
    with associate(web.port, FIND_CONTEXTS, calling="HOUSEVIEW") as assoc:
        assert assoc.is_rejected


def _objects(data: Path) -> int:
    return sum(1 for p in (data / "objects").rglob("*") if p.is_file())


def test_delete_is_soft_until_purged_and_only_for_those_allowed(
    web: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    first = make_ct(patient_id="P1")
    second_a = make_ct(patient_id="P2")
    second_b = make_ct(
        patient_id="P2",
        study_uid=second_a.StudyInstanceUID,
        series_uid=second_a.SeriesInstanceUID,
        instance_number=2,
    )
    _store(web, [first, second_a, second_b])
    _user(web.data, "rad", "radiologist", capsys)
    _user(web.data, "boss", "admin", capsys)
    rad_token = _token(web.data, "rad", capsys)
    admin_token = _token(web.data, "boss", capsys)
    stored = _objects(web.data)
    assert stored >= 3

    with _client(web, rad_token) as client:  # a radiologist may not delete: nothing happens, 404
        r = client.delete(f"/dicomweb/studies/{first.StudyInstanceUID}")
        assert r.status_code == 404
        assert r.headers["content-type"] == "application/problem+json"
    assert _qido(web, rad_token) == {first.StudyInstanceUID, second_a.StudyInstanceUID}

    with _client(web, admin_token) as client:
        assert client.delete("/dicomweb/studies/1.2.3.4.404").status_code == 404
        assert client.delete("/dicomweb/studies/not-a-uid").status_code == 400
        base = f"/dicomweb/studies/{second_a.StudyInstanceUID}/series/{second_a.SeriesInstanceUID}"
        r = client.delete(f"{base}/instances/{second_b.SOPInstanceUID}")
        assert r.status_code == 204 and r.content == b""
        r = client.get(f"{base}/instances")
        assert [i["00080018"]["Value"][0] for i in r.json()] == [second_a.SOPInstanceUID]
        assert client.delete(f"/dicomweb/studies/{first.StudyInstanceUID}").status_code == 204
        assert client.delete(f"/dicomweb/studies/{first.StudyInstanceUID}").status_code == 404
        assert client.get(f"/dicomweb/studies/{first.StudyInstanceUID}").status_code == 404
    assert _qido(web, rad_token) == {second_a.StudyInstanceUID}
    web.add_peer("VIEWER", "find")
    assert _cfind(web, "VIEWER") == {second_a.StudyInstanceUID}

    # The bytes stay, listed in the trash, until the retention ends or an administrator purges.
    assert _objects(web.data) == stored
    _cli(web.data, "trash")
    listed = capsys.readouterr().out
    assert first.SOPInstanceUID in listed and second_b.SOPInstanceUID in listed
    assert second_a.SOPInstanceUID not in listed
    # While the retention lasts, an administrator can undo a deletion.
    _cli(web.data, "restore", first.StudyInstanceUID)
    assert "Restored 1 instances" in capsys.readouterr().err
    assert _qido(web, rad_token) == {first.StudyInstanceUID, second_a.StudyInstanceUID}
    assert run_cli("restore", first.StudyInstanceUID, "--data", str(web.data)) == 2  # nothing left to restore
    assert "no deleted instance" in capsys.readouterr().err
    with _client(web, admin_token) as client:
        assert client.delete(f"/dicomweb/studies/{first.StudyInstanceUID}").status_code == 204
    _cli(web.data, "purge")
    assert "Purged 0 " in capsys.readouterr().err
    assert _objects(web.data) == stored
    _cli(web.data, "purge", "--now")
    assert "Purged 2 " in capsys.readouterr().err
    assert _objects(web.data) == stored - 2
    repos = open_repositories(f"sqlite:///{web.data / 'index.sqlite3'}")
    try:
        assert repos.instances.list_trash() == []
        assert repos.instances.count_instances() == 1
    finally:
        repos.close()


def test_peers_cannot_be_allowed_to_delete(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["peer", "add", "X", "--host", "127.0.0.1", "--allow", "find,delete", "--data", str(data_dir)]
    assert run_cli(*args) == 2
    assert "unknown service 'delete'" in capsys.readouterr().err
    args = [
        "peer",
        "add",
        "X",
        "--host",
        "127.0.0.1",
        "--allow",
        "find",
        "--user",
        "ghost",
        "--data",
        str(data_dir),
    ]
    assert run_cli(*args) == 2
    assert "no user named 'ghost'" in capsys.readouterr().err


def test_options_answers_the_capabilities_as_wadl(web: Server, capsys: pytest.CaptureFixture[str]) -> None:
    import xml.etree.ElementTree as ET

    _user(web.data, "rad", "radiologist", capsys)
    token = _token(web.data, "rad", capsys)
    with _client(web) as anonymous:
        assert anonymous.options("/dicomweb").status_code == 401
    with _client(web, token) as client:
        r = client.options("/dicomweb")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/vnd.sun.wadl+xml")
        ns = {"w": "http://wadl.dev.java.net/2009/02"}
        root = ET.fromstring(r.content)  # noqa: S314 - our own server's answer
        paths = {res.get("path"): res for res in root.iterfind("w:resources/w:resource", ns)}
        assert {"studies", "studies/{study}", "studies/{study}/metadata"} <= set(paths)
        methods = {m.get("name") for m in paths["studies"].iterfind("w:method", ns)}
        assert methods == {"GET", "POST"}  # QIDO-RS search and STOW-RS store
        params = {p.get("name") for p in paths["studies"].iterfind("w:method/w:request/w:param", ns)}
        assert {"limit", "offset", "includefield"} <= params
        r = client.options("/dicomweb/studies/1.2.3")
        assert r.status_code == 200
        assert r.headers["allow"] == "DELETE, GET, OPTIONS, POST"  # delete, retrieve, store into
        assert client.options("/dicomweb/no/such/thing").status_code == 404
