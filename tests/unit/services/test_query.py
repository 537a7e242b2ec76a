"""The one query path (services/query.py) over a fake index: who may query, the result limits the
index is given, the Retrieve AE Title, and the audit record of every query, refused or failed ones too."""

from __future__ import annotations

import json

import pytest
from pydicom.dataset import Dataset

from safepacs.audit import EventID, ObjectKind, Outcome
from safepacs.errors import AccessDenied, AuditError, QueryError, QueryLimitError
from safepacs.services.query import QIDO_RS, QueryService
from safepacs.types import QueryLevel, QueryModel, Scope, Service
from tests.support.fakes import ARCHIVE_AE, Archive, archive, peer, user

STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"


def service(a: Archive, max_results: int = 100, max_scoped_results: int | None = None) -> QueryService:
    return QueryService(
        a.index,  # type: ignore[arg-type]
        a.audit,
        a.gate,
        max_results=max_results,
        ae_title=ARCHIVE_AE,
        max_scoped_results=max_scoped_results,
    )


def ident(**keys: object) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    for k, v in keys.items():
        setattr(ds, k, v)
    return ds


def answer(uid: str) -> Dataset:
    ds = Dataset()
    ds.StudyInstanceUID = uid
    return ds


def test_a_find_is_answered_and_recorded_with_its_keys_and_count() -> None:
    a = archive()
    a.index.answers = [answer("1.2.1"), answer("1.2.2")]
    identifier = ident(PatientID="P1", StudyInstanceUID="")
    out = service(a).find(peer(Service.FIND), QueryModel.STUDY_ROOT, QueryLevel.STUDY, identifier)
    assert [ds.StudyInstanceUID for ds in out] == ["1.2.1", "1.2.2"]
    (event,) = a.events
    assert (event.event_id, event.outcome) == (EventID.QUERY, Outcome.SUCCESS)
    query, patient = event.objects
    assert (query.kind, query.id) == (ObjectKind.QUERY, STUDY_ROOT_FIND)
    assert query.detail == (("Results", "2"),)
    assert json.loads(query.query or "")["00100020"] == {"vr": "LO", "Value": ["P1"]}
    assert (patient.kind, patient.id) == (ObjectKind.PATIENT, "P1")
    assert event.participants[0].user_id == "MODALITY1" and event.participants[0].requestor


@pytest.mark.parametrize(
    "patient_id",
    [
        "P*",
        "P?",
        "P1\\P2",  # a list of IDs: before the fix the record named the patient "['P1', 'P2']"
        "",
        "  ",
    ],
)
def test_only_a_single_patient_id_names_the_patient_in_the_record(patient_id: str) -> None:
    a = archive()
    service(a).find(
        peer(Service.FIND), QueryModel.PATIENT_ROOT, QueryLevel.STUDY, ident(PatientID=patient_id)
    )
    (event,) = a.events
    assert [o.kind for o in event.objects] == [ObjectKind.QUERY]
    assert event.objects[0].id == PATIENT_ROOT_FIND


def test_a_peer_not_allowed_to_find_is_refused_and_the_refusal_recorded() -> None:
    a = archive()
    with pytest.raises(AccessDenied, match="this peer is not allowed to use find"):
        service(a).find(peer(Service.STORE), QueryModel.STUDY_ROOT, QueryLevel.STUDY, ident())
    assert a.index.calls == []  # nothing was asked of the index
    (event,) = a.events
    assert (event.event_id, event.outcome) == (EventID.SECURITY_ALERT, Outcome.MINOR_FAILURE)
    assert (event.outcome_description or "").startswith("find: this peer is not allowed")


def test_the_limits_given_to_the_index() -> None:
    a = archive()
    service(a, max_results=50, max_scoped_results=5000).find(
        peer(Service.FIND), QueryModel.STUDY_ROOT, QueryLevel.STUDY, ident()
    )
    service(a, max_results=50, max_scoped_results=10).find(
        peer(Service.FIND), QueryModel.STUDY_ROOT, QueryLevel.STUDY, ident()
    )
    service(a, max_results=0, max_scoped_results=10).find(
        peer(Service.FIND), QueryModel.STUDY_ROOT, QueryLevel.STUDY, ident()
    )
    limits = [(c["limit"], c["scoped_limit"]) for c in a.index.called("find")]
    # a scoped query never gets less than an unscoped one; 0 lifts both limits
    assert limits == [(50, 5000), (50, 50), (None, None)]


def test_the_principals_scope_goes_to_the_index() -> None:
    a = archive()
    scope = Scope(modalities=frozenset({"CT"}))
    service(a).find(peer(Service.FIND, scope=scope), QueryModel.STUDY_ROOT, QueryLevel.STUDY, ident())
    assert a.index.called("find")[0]["scope"] == scope


def test_too_many_matches_is_raised_and_recorded_as_a_failure() -> None:
    a = archive()
    a.index.error = QueryLimitError("more than 100 matches; narrow the query")
    with pytest.raises(QueryLimitError):
        service(a).find(peer(Service.FIND), QueryModel.STUDY_ROOT, QueryLevel.STUDY, ident(PatientID="P1"))
    (event,) = a.events
    assert (event.event_id, event.outcome) == (EventID.QUERY, Outcome.MINOR_FAILURE)
    assert event.outcome_description == "more than 100 matches; narrow the query"
    assert event.objects[0].detail == ()  # no result count for a failed query


def test_an_audit_failure_of_the_index_is_not_recorded_again() -> None:
    a = archive()
    a.index.error = AuditError("the audit trail cannot be written")
    with pytest.raises(AuditError):
        service(a).find(peer(Service.FIND), QueryModel.STUDY_ROOT, QueryLevel.STUDY, ident())
    assert a.events == []


def test_no_answer_is_returned_when_the_query_cannot_be_recorded() -> None:
    a = archive()
    a.index.answers = [answer("1.2.1")]
    a.sink.fail = True
    with pytest.raises(AuditError):
        service(a).find(peer(Service.FIND), QueryModel.STUDY_ROOT, QueryLevel.STUDY, ident())


def test_retrieve_ae_title_is_answered_with_the_archives_own_when_asked() -> None:
    a = archive()
    a.index.answers = [answer("1.2.1")]
    asked = service(a).find(
        peer(Service.FIND), QueryModel.STUDY_ROOT, QueryLevel.STUDY, ident(RetrieveAETitle="")
    )
    assert asked[0].RetrieveAETitle == ARCHIVE_AE
    a.index.answers = [answer("1.2.1")]
    not_asked = service(a).find(peer(Service.FIND), QueryModel.STUDY_ROOT, QueryLevel.STUDY, ident())
    assert "RetrieveAETitle" not in not_asked[0]


def test_find_encoded_fills_retrieve_ae_title_by_tag_and_passes_the_encoding() -> None:
    a = archive()
    a.index.answers = [b"\x08\x00\x54\x00", None]
    out = service(a).find_encoded(
        peer(Service.FIND),
        QueryModel.PATIENT_ROOT,
        QueryLevel.STUDY,
        ident(RetrieveAETitle=""),
        implicit_vr=True,
    )
    assert out == [b"\x08\x00\x54\x00", None]
    (call,) = a.index.called("find_encoded")
    assert call["fill"] == {0x00080054: ARCHIVE_AE} and call["implicit_vr"] is True
    (event,) = a.events
    assert event.objects[0].detail == (("Results", "2"),) and event.objects[0].id == PATIENT_ROOT_FIND
    service(a).find_encoded(
        peer(Service.FIND), QueryModel.PATIENT_ROOT, QueryLevel.STUDY, ident(), implicit_vr=False
    )
    assert a.index.called("find_encoded")[1]["fill"] == {}


def test_find_encoded_is_refused_like_find() -> None:
    a = archive()
    with pytest.raises(AccessDenied):
        service(a).find_encoded(
            user(Service.STORE), QueryModel.STUDY_ROOT, QueryLevel.STUDY, ident(), implicit_vr=False
        )
    assert a.index.calls == []


# QIDO-RS ---------------------------------------------------------------------------------------------
def test_a_search_page_is_capped_by_the_limits() -> None:
    a = archive()
    a.index.answers = [{"n": i} for i in range(10)]
    a.index.more = True
    found, more = service(a, max_results=3, max_scoped_results=8).search(
        user(Service.FIND), QueryLevel.STUDY, ident(), limit=None, offset=2, as_json=True
    )
    assert found == [{"n": 2}, {"n": 3}, {"n": 4}] and more is True
    (call,) = a.index.called("search")
    assert (call["limit"], call["scoped_limit"], call["offset"], call["as_json"]) == (3, 8, 2, True)
    (event,) = a.events
    assert event.objects[0].id == QIDO_RS and event.objects[0].detail == (("Results", "3"),)


@pytest.mark.parametrize(
    ("limit", "page", "scoped_page"),
    [(None, 3, 8), (2, 2, 2), (5, 3, 5), (100, 3, 8), (-4, 0, 0)],
)
def test_the_limit_asked_for_is_capped(limit: int | None, page: int, scoped_page: int) -> None:
    a = archive()
    service(a, max_results=3, max_scoped_results=8).search(
        user(Service.FIND), QueryLevel.STUDY, ident(), limit=limit, offset=0
    )
    calls = a.index.called("search")
    if scoped_page == 0:
        assert calls == []  # a page of nothing is answered without asking the index
    else:
        assert (calls[0]["limit"], calls[0]["scoped_limit"]) == (page, scoped_page)
    (event,) = a.events
    assert event.event_id == EventID.QUERY and event.outcome == Outcome.SUCCESS


def test_limit_zero_is_an_empty_page_still_recorded() -> None:
    a = archive()
    a.index.answers = [{"n": 1}]
    assert service(a).search(user(Service.FIND), QueryLevel.SERIES, ident(), limit=0, offset=0) == ([], False)
    (event,) = a.events
    assert event.objects[0].detail == (("Results", "0"),)


def test_without_a_configured_limit_a_page_is_at_most_10000() -> None:
    a = archive()
    service(a, max_results=0).search(user(Service.FIND), QueryLevel.STUDY, ident(), limit=None, offset=0)
    assert a.index.called("search")[0]["limit"] == 10_000


def test_a_malformed_search_is_recorded_with_its_reason() -> None:
    a = archive()
    a.index.error = QueryError("the value of StudyDate is not a valid DA or DA range (PS3.4 C.2.2.2.5)")
    with pytest.raises(QueryError):
        service(a).search(user(Service.FIND), QueryLevel.STUDY, ident(StudyDate="2024"), limit=None, offset=0)
    (event,) = a.events
    assert event.outcome == Outcome.MINOR_FAILURE and "StudyDate" in (event.outcome_description or "")


def test_a_user_without_find_cannot_search() -> None:
    a = archive()
    with pytest.raises(AccessDenied, match="this user is not allowed to use find"):
        service(a).search(user(), QueryLevel.STUDY, ident(), limit=None, offset=0)
    assert a.index.calls == [] and a.events[0].event_id == EventID.SECURITY_ALERT
