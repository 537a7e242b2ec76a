"""C-FIND and QIDO-RS conformance against a running server, with DCMTK's findscu/getscu and dicomweb-client:
zero-length Required Keys and Empty Value Matching (PS3.4 C.2.2.1.2, C.2.2.2.7), patients without a
Patient ID (C.2.2.1.1), queries within one study or series and their own bound, Retrieve URL (0008,1190)
in QIDO-RS and STOW-RS answers (PS3.18 Tables 10.6.3-3 to 10.6.3-5, Table I.1-1)."""

from __future__ import annotations

import contextlib
import io
import itertools
import re
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from pynetdicom import build_context
from pynetdicom.sop_class import CTImageStorage

from safepacs.app import initialize
from tests.support.corpus import make_ct
from tests.support.dicom_client import associate
from tests.support.server import Server, dcmtk, run_cli, start_server

_counter = itertools.count()


@dataclass
class Site:
    """A running server with a few studies stored, a find/get peer and a radiologist's token."""

    srv: Server
    token: str
    tmp: Path
    studies: dict[str, Dataset]  # name -> the first instance stored of that study

    def uid(self, name: str) -> str:
        return str(self.studies[name].StudyInstanceUID)

    def findscu(self, level: str, *keys: str, patient_root: bool = False) -> tuple[list[Dataset], str]:
        """DCMTK findscu: the responses (extracted to files) and the final status as findscu names it."""
        out = self.tmp / f"find{next(_counter)}"
        out.mkdir()
        args = [a for key in keys for a in ("-k", key)]
        model = "-P" if patient_root else "-S"
        r = dcmtk(
            "findscu", "-v", model, "-X", "-od", str(out), "-aet", "VIEWER", "-aec", "SAFEPACS",
            "-k", f"QueryRetrieveLevel={level}", *args, self.srv.host, str(self.srv.port),
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        final = re.search(r"Received Final Find Response \((.*)\)", r.stderr)
        assert final is not None, r.stderr
        return [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))], final.group(1)

    def study_uids(self, *keys: str) -> set[str]:
        found, status = self.findscu("STUDY", "StudyInstanceUID", *keys)
        assert status == "Success", status
        return {str(ds.StudyInstanceUID) for ds in found}

    def dicomweb(self) -> DICOMwebClient:
        session = requests.Session()
        session.trust_env = False  # REQUESTS_CA_BUNDLE in the environment would replace our CA
        session.verify = str(self.srv.ca_file)
        return DICOMwebClient(
            url=f"{self.srv.base_url}/dicomweb",
            session=session,
            headers={"Authorization": f"Bearer {self.token}"},
        )

    def http(self) -> httpx.Client:
        verify = ssl.create_default_context(cafile=str(self.srv.ca_file))
        headers = {"Authorization": f"Bearer {self.token}"}
        return httpx.Client(base_url=self.srv.base_url, verify=verify, headers=headers, timeout=20)


def _cli_out(*args: str) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert run_cli(*args) == 0
    return buf.getvalue().strip()


def _store(srv: Server, datasets: list[Dataset]) -> None:
    with associate(srv.port, [build_context(CTImageStorage)], calling="CT1") as assoc:
        for ds in datasets:
            assert assoc.send_c_store(ds).Status == 0x0000


def _study(n: int, **keys: object) -> list[Dataset]:
    first = make_ct(rows=4, cols=4, instance_number=1, **keys)  # type: ignore[arg-type]
    rest = [
        make_ct(
            rows=4,
            cols=4,
            study_uid=first.StudyInstanceUID,
            series_uid=first.SeriesInstanceUID,
            instance_number=i + 2,
            **keys,  # type: ignore[arg-type]
        )
        for i in range(n - 1)
    ]
    return [first, *rest]


def _site(tmp: Path, env: dict[str, str], studies: dict[str, list[Dataset]]) -> Iterator[Site]:
    data = tmp / "data"
    initialize(data)
    srv = start_server(data, env={"SAFEPACS_SERVER__WORKERS": "1", **env})
    try:
        srv.add_peer("CT1", "store")
        srv.add_peer("VIEWER", "find,get")
        _store(srv, [ds for group in studies.values() for ds in group])
        _cli_out("user", "add", "rad", "--role", "radiologist", "--data", str(data))
        token = _cli_out("token", "create", "--user", "rad", "--data", str(data))
        yield Site(srv, token, tmp, {name: group[0] for name, group in studies.items()})
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """Default limits.  K has every key; U lacks StudyDate, StudyTime, AccessionNumber and
    StudyDescription; N1 and N2 are two patients without a Patient ID."""
    studies = {
        "K": _study(2, patient_id="CQ-K", AccessionNumber="ACC-K", StudyDate="20240102"),
        "U": _study(
            1, patient_id="CQ-U", StudyDate=None, StudyTime=None, AccessionNumber=None, StudyDescription=None
        ),
        "N1": _study(
            1, patient_id="", patient_name="Nobody^One", AccessionNumber="ACC-N1", StudyDate="20230101"
        ),
        "N2": _study(
            1, patient_id="", patient_name="Nobody^Two", AccessionNumber="ACC-N2", StudyDate="20230102"
        ),
    }
    yield from _site(tmp_path_factory.mktemp("cq"), {}, studies)


@pytest.fixture(scope="module")
def bounded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """query.max_results 3, query.max_scoped_results 5: S has 4 instances, L 6, two more studies 1."""
    studies = {
        "S": _study(4, patient_id="CQ-S"),
        "L": _study(6, patient_id="CQ-L"),
        "A": _study(1, patient_id="CQ-A"),
        "B": _study(1, patient_id="CQ-B"),
    }
    env = {"SAFEPACS_QUERY__MAX_RESULTS": "3", "SAFEPACS_QUERY__MAX_SCOPED_RESULTS": "5"}
    yield from _site(tmp_path_factory.mktemp("cq-bounded"), env, studies)


# Zero-length Required Keys, Empty Value Matching (PS3.4 C.2.2.1.2, C.2.2.2.7) ----------------------------
@pytest.mark.dcmtk
def test_a_study_without_required_keys_matches_every_query_on_them(site: Site) -> None:
    k, u = site.uid("K"), site.uid("U")
    assert site.study_uids("AccessionNumber=ACC-K") == {k, u}
    assert site.study_uids("StudyDate=20240101-20240131") == {k, u}
    assert site.study_uids("StudyTime=0000-2359") == {k, u, site.uid("N1"), site.uid("N2")}
    assert site.study_uids("AccessionNumber=NO-SUCH-ONE") == {u}
    # StudyDescription is an Optional Key: an empty value matches only an empty (or universal) key
    assert site.study_uids("StudyDescription=CT*") == {k, site.uid("N1"), site.uid("N2")}
    # Empty Value Matching: '""' finds exactly the entities without a value
    assert site.study_uids('AccessionNumber=""') == {u}
    assert site.study_uids('StudyDescription=""') == {u}
    assert site.study_uids('StudyDate=""', "PatientID=CQ-*") == {u}
    found, status = site.findscu("SERIES", "StudyInstanceUID", "SeriesInstanceUID", 'SeriesNumber=""')
    assert (found, status) == ([], "Success")  # every series has a number
    # what is answered for the unknown values is empty
    found, _ = site.findscu("STUDY", f"StudyInstanceUID={u}", "AccessionNumber", "StudyDate")
    assert [(str(ds.AccessionNumber), str(ds.StudyDate)) for ds in found] == [("", "")]


def test_qido_rs_matches_empty_values_like_c_find(site: Site) -> None:
    client = site.dicomweb()

    def studies(**filters: str) -> set[str]:
        return {s["0020000D"]["Value"][0] for s in client.search_for_studies(search_filters=filters)}

    k, u = site.uid("K"), site.uid("U")
    assert studies(AccessionNumber="ACC-K") == {k, u}
    assert studies(StudyDate="20240101-20240131") == {k, u}
    assert studies(AccessionNumber='""') == {u}
    assert studies(AccessionNumber='""', emptyvaluematching="true") == {u}
    with site.http() as http:  # a number key with '""' and a bad number: an answer, not a failure
        r = http.get("/dicomweb/series", params={"SeriesNumber": '""'})
        assert (r.status_code, r.json()) == (200, [])
        r = http.get("/dicomweb/series", params={"SeriesNumber": "seven"})
        assert r.status_code == 400 and "SeriesNumber" in r.json()["detail"]
        r = http.get("/dicomweb/studies", params={"emptyvaluematching": "maybe"})
        assert r.status_code == 400


# Patients without a Patient ID (PS3.4 C.2.2.1.1) ----------------------------------------------------------
@pytest.mark.dcmtk
def test_patients_without_a_patient_id_have_a_unique_key(site: Site) -> None:
    n1, n2 = site.uid("N1"), site.uid("N2")
    found, status = site.findscu("PATIENT", "PatientID", "PatientName", patient_root=True)
    assert status == "Success"
    ids = [str(ds.PatientID) for ds in found]
    assert len(ids) == len(set(ids)) == 4  # one answer per patient, each with its own key
    names = {str(ds.PatientID): str(ds.PatientName) for ds in found}
    assert names[n1] == "Nobody^One" and names[n2] == "Nobody^Two"  # never merged
    assert "" not in ids
    # The key leads to that patient's studies, and only to them, at every level and in retrieval.
    found, _ = site.findscu("PATIENT", f"PatientID={n1}", "PatientName", patient_root=True)
    assert [str(ds.PatientName) for ds in found] == ["Nobody^One"]
    found, _ = site.findscu("STUDY", f"PatientID={n2}", "StudyInstanceUID", patient_root=True)
    assert [str(ds.StudyInstanceUID) for ds in found] == [n2]
    assert site.study_uids(f"PatientID={n1}") == {n1}  # Study Root
    found, _ = site.findscu("STUDY", f"StudyInstanceUID={n1}", "PatientID")
    assert [str(ds.PatientID) for ds in found] == [n1]
    assert site.study_uids("PatientID=1.2*") >= {n1, n2}
    assert site.study_uids('PatientID=""') == set()  # no patient is answered without a Patient ID
    out = site.tmp / f"get{next(_counter)}"
    out.mkdir()
    got = dcmtk(
        "getscu", "-P", "-aet", "VIEWER", "-aec", "SAFEPACS", "-k", "QueryRetrieveLevel=STUDY",
        "-k", f"PatientID={n1}", "-k", f"StudyInstanceUID={n1}", "-od", str(out),
        site.srv.host, str(site.srv.port),
    )  # fmt: skip
    assert got.returncode == 0, got.stderr
    assert [str(pydicom.dcmread(p).StudyInstanceUID) for p in out.iterdir()] == [n1]


def test_qido_rs_answers_patients_without_an_id_under_the_same_key(site: Site) -> None:
    client = site.dicomweb()
    n1 = site.uid("N1")
    found = client.search_for_studies(search_filters={"PatientID": n1})
    assert [s["0020000D"]["Value"][0] for s in found] == [n1]
    assert found[0]["00100020"]["Value"] == [n1]
    everything = client.search_for_studies()
    ids = [s["00100020"]["Value"][0] for s in everything]
    assert len(ids) == len(set(ids)) == 4


# Retrieve URL (PS3.18 Tables 10.6.3-3 to 10.6.3-5, Table I.1-1) -------------------------------------------
def _path(url: str) -> str:
    return urlsplit(url).path


def test_qido_rs_results_carry_their_retrieve_url(site: Site) -> None:
    # dicomweb-client sends its Host header without the port; the URLs are built from the Host header
    # (as a reverse proxy in front would want), so compare its answers' paths, httpx's whole URLs.
    client = site.dicomweb()
    k = site.studies["K"]
    study_url = f"/dicomweb/studies/{k.StudyInstanceUID}"
    series_url = f"{study_url}/series/{k.SeriesInstanceUID}"
    (study,) = client.search_for_studies(search_filters={"StudyInstanceUID": k.StudyInstanceUID})
    assert study["00081190"]["vr"] == "UR" and _path(study["00081190"]["Value"][0]) == study_url
    (series,) = client.search_for_series(study_instance_uid=k.StudyInstanceUID)
    assert [_path(u) for u in series["00081190"]["Value"]] == [series_url]
    instances = client.search_for_instances(
        study_instance_uid=k.StudyInstanceUID, fields=["00081190"]
    )  # asked for with includefield too
    urls = sorted(_path(i["00081190"]["Value"][0]) for i in instances)
    assert urls == sorted(f"{series_url}/instances/{i['00080018']['Value'][0]}" for i in instances)
    assert len(urls) == 2
    with site.http() as http:
        (found,) = http.get(
            f"{study_url}/instances", params={"SOPInstanceUID": urls[0].rsplit("/", 1)[1]}
        ).json()
        assert found["00081190"]["Value"] == [f"{site.srv.base_url}{urls[0]}"]
        # the URL is a working WADO-RS resource
        r = http.get(urls[0], headers={"Accept": 'multipart/related; type="application/dicom"'})
        assert r.status_code == 200


def test_stow_rs_answers_carry_the_study_retrieve_url(site: Site) -> None:
    _cli_out("user", "add", "tech", "--role", "technologist", "--data", str(site.srv.data))
    token = _cli_out("token", "create", "--user", "tech", "--data", str(site.srv.data))
    client = site.dicomweb()
    client._session.headers["Authorization"] = f"Bearer {token}"  # the storing user
    one, two, other = make_ct(rows=4, cols=4), make_ct(rows=4, cols=4), make_ct(rows=4, cols=4)
    two.StudyInstanceUID = one.StudyInstanceUID
    answer = client.store_instances([one, two])  # 200: all stored
    assert _path(answer.RetrieveURL) == f"/dicomweb/studies/{one.StudyInstanceUID}"
    assert len(answer.ReferencedSOPSequence) == 2
    # Instances of several studies: no one study URL, the attribute is present and empty (Type 2).
    answer = client.store_instances([make_ct(rows=4, cols=4), other])
    assert "RetrieveURL" in answer and not answer.RetrieveURL


# Queries within one study or series, query.max_scoped_results ---------------------------------------------
@pytest.mark.dcmtk
def test_c_find_within_one_study_or_series_has_its_own_bound(bounded: Site) -> None:
    s, large = bounded.studies["S"], bounded.studies["L"]
    found, status = bounded.findscu("IMAGE", f"StudyInstanceUID={s.StudyInstanceUID}", "SOPInstanceUID")
    assert (len(found), status) == (4, "Success")  # more than query.max_results (3)
    found, status = bounded.findscu(
        "IMAGE", f"SeriesInstanceUID={s.SeriesInstanceUID}", "StudyInstanceUID", "SOPInstanceUID"
    )
    assert (len(found), status) == (4, "Success")
    # more than query.max_scoped_results (5) within one study: refused, nothing sent
    found, status = bounded.findscu("IMAGE", f"StudyInstanceUID={large.StudyInstanceUID}", "SOPInstanceUID")
    assert (found, status) == ([], "Refused: OutOfResources")
    # Not within one study: the archive-wide bound (query.max_results) holds.
    for keys in (
        ("StudyInstanceUID", "SOPInstanceUID"),
        (f"StudyInstanceUID={s.StudyInstanceUID}\\{bounded.uid('A')}", "SOPInstanceUID"),
        ("StudyInstanceUID=*", "SOPInstanceUID"),
    ):
        found, status = bounded.findscu("IMAGE", *keys)
        assert (found, status) == ([], "Refused: OutOfResources"), keys
    found, status = bounded.findscu("STUDY", "StudyInstanceUID")
    assert (found, status) == ([], "Refused: OutOfResources")


def test_qido_rs_within_one_study_pages_up_to_its_own_bound(bounded: Site) -> None:
    s, large = bounded.uid("S"), bounded.uid("L")
    with bounded.http() as http:
        r = http.get(f"/dicomweb/studies/{s}/instances")
        assert (r.status_code, len(r.json()), "warning" in r.headers) == (200, 4, False)
        r = http.get("/dicomweb/instances", params={"StudyInstanceUID": s})
        assert (len(r.json()), "warning" in r.headers) == (4, False)
        r = http.get(f"/dicomweb/studies/{large}/instances")
        assert (len(r.json()), "additional results" in r.headers["warning"]) == (5, True)
        r = http.get(f"/dicomweb/studies/{large}/instances", params={"offset": 5})
        assert (len(r.json()), "warning" in r.headers) == (1, False)
        # limit still pages within the study
        r = http.get(f"/dicomweb/studies/{s}/instances", params={"limit": 2})
        assert (len(r.json()), "warning" in r.headers) == (2, True)
        r = http.get(f"/dicomweb/studies/{s}/instances", params={"limit": 2, "offset": 2})
        assert (len(r.json()), "warning" in r.headers) == (2, False)
        # across studies: query.max_results
        r = http.get("/dicomweb/instances")
        assert (len(r.json()), "warning" in r.headers) == (3, True)
    found = bounded.dicomweb().search_for_instances(study_instance_uid=s)
    assert len(found) == 4


def test_the_scoped_bound_is_a_validated_setting(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from safepacs.config import load_settings
    from safepacs.config._settings import render_default_toml
    from safepacs.errors import ConfigError

    assert load_settings(data_dir).query.max_scoped_results == 20_000
    assert "\nmax_scoped_results = 20000\n" in render_default_toml()
    monkeypatch.setenv("SAFEPACS_QUERY__MAX_SCOPED_RESULTS", "499")
    with pytest.raises(ConfigError, match=r"query\.max_scoped_results.*query\.max_results"):
        load_settings(data_dir)
    monkeypatch.setenv("SAFEPACS_QUERY__MAX_RESULTS", "0")  # no limit at all: anything goes
    assert load_settings(data_dir).query.max_scoped_results == 499
