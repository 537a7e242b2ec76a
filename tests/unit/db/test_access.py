"""Scopes, access groups and grants inside the index query; soft delete and the trash.

On SQLite and (with SAFEPACS_TEST_POSTGRES) PostgreSQL, over the small archive of test_index.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pydicom.uid import generate_uid

from safepacs.app import Repositories
from safepacs.auth.policy import peer_principal, scope_of, user_principal
from safepacs.errors import QueryLimitError
from safepacs.records import UserRecord
from safepacs.types import Peer, QueryLevel, Scope, Service
from tests.support import index as ti
from tests.support.index import IMAGE, PATIENT, PR, SERIES, SR_, STUDY, Archive, query, uids

# The index fixtures of test_index: SQLite, and PostgreSQL when SAFEPACS_TEST_POSTGRES is set.
db_url, repos, archive = ti.db_url, ti.repos, ti.archive


def studies_seen(a: Archive, scope: Scope | None, **keys: str) -> set[str]:
    found = a.repos.instances.find(SR_, STUDY, query(STUDY, StudyInstanceUID="", **keys), None, scope)
    return uids(found, "StudyInstanceUID")


def test_attribute_constraints_narrow_every_level(archive: Archive) -> None:
    a = archive
    mr = Scope(modalities=frozenset({"MR"}))
    assert studies_seen(a, mr) == {a.a2}
    assert studies_seen(a, Scope(modalities=frozenset({"CT", "OT"}))) == {a.a1, a.b1, a.c1, a.c2}
    assert studies_seen(a, Scope(referring_physician="HOUSE^greg")) == {a.a1}  # PN: case-insensitive
    assert studies_seen(a, Scope(referring_physician="House^*")) == set()  # never a wild card
    # Every constraint must hold.
    assert studies_seen(a, Scope(modalities=frozenset({"MR"}), referring_physician="House^Greg")) == set()
    # Series and instances of invisible studies do not exist either.
    series = a.repos.instances.find(SR_, SERIES, query(SERIES, SeriesInstanceUID="", Modality="CT"), None, mr)
    assert series == []
    inst = a.repos.instances.find(
        SR_, IMAGE, query(IMAGE, StudyInstanceUID=a.a1, SOPInstanceUID=""), None, mr
    )
    assert inst == []
    # The patient level shows only patients with a visible study, and counts only visible studies.
    patients = a.repos.instances.find(
        PR,
        PATIENT,
        query(PATIENT, PatientID="", NumberOfPatientRelatedStudies="", NumberOfPatientRelatedInstances=""),
        None,
        mr,
    )
    assert [
        (p.PatientID, p.NumberOfPatientRelatedStudies, p.NumberOfPatientRelatedInstances) for p in patients
    ] == [("PA", 1, 2)]


def test_an_empty_scope_sees_nothing_and_unrestricted_sees_all(archive: Archive) -> None:
    a = archive
    assert studies_seen(a, Scope()) == set()
    assert studies_seen(a, None) == {a.a1, a.a2, a.b1, a.c1, a.c2}


def test_groups_and_grants_widen_a_scope(archive: Archive) -> None:
    a = archive
    a.repos.directory.add_user("ref", "x", frozenset({"referrer"}))
    a.repos.directory.add_user("other", "x", frozenset({"referrer"}))
    assert a.repos.directory.add_study_group(a.c1, "trial-7") is True
    assert a.repos.directory.add_study_group(a.c1, "trial-7") is False
    scope = Scope(referring_physician="House^Greg", groups=frozenset({"trial-7"}), grantee="ref")
    assert studies_seen(a, scope) == {a.a1, a.c1}
    a.repos.directory.grant_study(a.b1, "ref", None)
    a.repos.directory.grant_study(a.c2, "ref", datetime.now(UTC) - timedelta(minutes=1))  # expired already
    a.repos.directory.grant_study(a.a2, "other", None)  # someone else's grant
    assert studies_seen(a, scope) == {a.a1, a.b1, a.c1}
    a.repos.directory.revoke_grant(a.b1, "ref")
    a.repos.directory.remove_study_group(a.c1, "trial-7")
    assert studies_seen(a, scope) == {a.a1}
    assert [(g.study_instance_uid, g.user_name) for g in a.repos.directory.list_grants("ref")] == [
        (a.c2, "ref")
    ]


def test_limits_and_pages_count_only_visible_studies(archive: Archive) -> None:
    a = archive
    ct = Scope(modalities=frozenset({"CT"}))
    assert len(a.repos.instances.find(SR_, STUDY, query(STUDY, StudyInstanceUID=""), 2, ct)) == 2
    with pytest.raises(QueryLimitError):
        a.repos.instances.find(SR_, STUDY, query(STUDY, StudyInstanceUID=""), 1, ct)
    page, more = a.repos.instances.search(STUDY, query(STUDY, StudyInstanceUID=""), 1, 0, ct)
    assert len(page) == 1 and more
    page2, more2 = a.repos.instances.search(STUDY, query(STUDY, StudyInstanceUID=""), 1, 1, ct)
    assert len(page2) == 1 and not more2
    assert uids(page + page2, "StudyInstanceUID") == {a.a1, a.b1}


def test_retrieve_finds_only_visible_instances(archive: Archive) -> None:
    a = archive
    mr = Scope(modalities=frozenset({"MR"}))
    ident = query(STUDY, StudyInstanceUID=[a.a1, a.a2])
    refs = a.repos.instances.instances_for(SR_, STUDY, ident, mr)
    assert {r.study_uid for r in refs} == {a.a2}
    assert len(a.repos.instances.instances_for(SR_, STUDY, ident, None)) == 6


def test_user_scopes_make_principals(repos: Repositories) -> None:
    repos.directory.add_user("rad", "x", frozenset({"radiologist"}))
    repos.directory.add_user("ref", "x", frozenset({"referrer"}))
    repos.directory.add_user("both", "x", frozenset({"referrer", "radiologist"}))
    rad, ref, both = (repos.directory.get_user(n) for n in ("rad", "ref", "both"))
    assert rad is not None and ref is not None and both is not None
    assert scope_of(rad) is None
    assert scope_of(both) is None  # a radiologist role sees the archive
    assert scope_of(ref) == Scope(grantee="ref")  # a referrer with no scope sees only grants
    repos.directory.set_user_scope("rad", Scope(institutions=frozenset({"North"})))
    rad = repos.directory.get_user("rad")
    assert rad is not None
    assert user_principal(rad, address=None).scope == Scope(institutions=frozenset({"North"}), grantee="rad")
    assert [u.scope for u in repos.directory.list_users() if u.name == "rad"] == [rad.scope]
    repos.directory.set_user_scope("rad", None)
    assert repos.directory.get_user("rad") == UserRecord("rad", "x", frozenset({"radiologist"}), False, False)


def test_a_peer_acting_for_a_user_gets_no_more_than_the_user() -> None:
    ref = UserRecord("ref", "x", frozenset({"referrer"}), False, False, Scope(referring_physician="A^B"))
    peer = Peer("VIEWER", "127.0.0.1", None, frozenset({Service.FIND, Service.GET, Service.STORE}), "ref")
    p = peer_principal(peer, ref, "127.0.0.1")
    assert p is not None
    assert (p.kind, p.name, p.user) == ("peer", "VIEWER", "ref")
    assert p.allow == frozenset({Service.FIND, Service.GET})  # referrers may not store
    assert p.scope == Scope(referring_physician="A^B", grantee="ref")
    disabled = UserRecord("ref", "x", frozenset({"referrer"}), True, False)
    assert peer_principal(peer, disabled, "127.0.0.1") is None
    assert peer_principal(peer, None, "127.0.0.1") is None
    plain = Peer("CT1", "127.0.0.1", None, frozenset({Service.STORE}))
    q = peer_principal(plain, None, "127.0.0.1")
    assert q is not None and q.scope is None and q.allow == frozenset({Service.STORE})


def test_trash_takes_instances_out_of_the_index_and_keeps_their_blobs(archive: Archive) -> None:
    a = archive
    before = a.repos.instances.count_instances()
    due = datetime.now(UTC) + timedelta(days=30)
    sops = a.sops[a.a1_ct] + a.sops[a.a1_sr]
    assert a.repos.instances.trash_instances([*sops, "1.2.3.4.404"], "admin", due) == 4
    assert a.repos.instances.count_instances() == before - 4
    assert a.a1 not in studies_seen(a, None)
    assert studies_seen(a, None) >= {a.a2}  # the patient keeps its other study
    trash = a.repos.instances.list_trash()
    assert sorted(t.sop_instance_uid for t in trash) == sorted(sops)
    assert {t.study_instance_uid for t in trash} == {a.a1}
    assert all(t.deleted_by == "admin" and t.blob.blob_id.startswith("blob-") for t in trash)
    assert a.repos.instances.list_trash(due_before=datetime.now(UTC)) == []
    assert len(a.repos.instances.list_trash(due_before=due + timedelta(seconds=1))) == 4
    a.repos.instances.forget_trash(trash[0].pk)
    assert len(a.repos.instances.list_trash()) == 3


def test_restore_puts_instances_back_unless_stored_again(archive: Archive) -> None:
    from pydicom.dataset import Dataset

    a = archive
    due = datetime.now(UTC) + timedelta(days=30)
    sops = a.sops[a.a2_mr]
    a.repos.instances.trash_instances(sops, "admin", due)
    assert a.a2 not in studies_seen(a, None)
    first, second = sorted(a.repos.instances.list_trash(), key=lambda t: t.sop_instance_uid)
    # The second instance is stored again (new bytes) after its deletion.
    again = ti.instance(
        a.a2, a.a2_mr, sop=second.sop_instance_uid, sop_class=ti.MR, Modality="MR", PatientID="PA"
    )
    a.repos.instances.add_instance(again, ti.blob("new"), ti.ELE)

    def header(uid: str) -> Dataset:
        return ti.instance(a.a2, a.a2_mr, sop=uid, sop_class=ti.MR, Modality="MR", PatientID="PA")

    assert a.repos.instances.restore_from_trash(first.pk, header(first.sop_instance_uid)) is True
    assert a.repos.instances.restore_from_trash(second.pk, header(second.sop_instance_uid)) is False
    assert [t.sop_instance_uid for t in a.repos.instances.list_trash()] == [second.sop_instance_uid]
    restored = a.repos.instances.get_instance(first.sop_instance_uid)
    assert restored is not None and restored.blob == first.blob
    assert a.repos.instances.blob_in_use(first.blob.blob_id) and not a.repos.instances.blob_in_use(
        second.blob.blob_id
    )
    assert a.a2 in studies_seen(a, None)


@pytest.mark.parametrize("level", [STUDY, SERIES, IMAGE])
def test_qido_json_is_what_pydicom_would_write(archive: Archive, level: QueryLevel) -> None:
    """The direct row -> DICOM JSON path answers exactly what converting the data sets gives, by the
    reference of PS3.18 F.2 (pydicom's conversion with F.2.2 and F.2.5 applied:
    tests/support/dicom_json.py)."""
    from safepacs.dicom import attributes as A
    from tests.support.dicom_json import reference_json

    a = archive
    a._add(
        dict(
            PatientID="PX",
            PatientName="Yamada^Tarou=山田^太郎=やまだ^たろう",
            StudyDescription="two\\parts",
            AccessionNumber="",
            ReferringPhysicianName="A^B\\C^D",
            Occupation="Nurse\\\\Clerk",  # an empty value between two: null (PS3.18 F.2.5)
        ),
        generate_uid(),
        generate_uid(),
        Modality="CT",
        SeriesNumber=3,
        ContentCreatorName="Doe^Jane\\\\=Roe^Jane",  # the same for PN; no alphabetic group (F.2.2)
    )
    keys = {
        attr.keyword: ""
        for attr in A.ATTRIBUTES
        if A.usable_at(level, attr.level) and (attr.column is not None or attr.derived is not None)
    }
    ident = query(level, **keys)
    ident.ProcedureCodeSequence = []
    as_json, more = a.repos.instances.search(level, ident, 50, 0, None, as_json=True)
    datasets, more2 = a.repos.instances.search(level, ident, 50, 0, None)
    expected = []
    for ds in datasets:
        del ds.QueryRetrieveLevel
        expected.append(reference_json(ds))
    assert (as_json, more) == (expected, more2)
    assert len(as_json) >= 3
    ours = [r for r in as_json if r.get("00100020", {}).get("Value") == ["PX"]]
    assert len(ours) == 1
    if level is STUDY:
        assert ours[0]["00102180"]["Value"] == ["Nurse", None, "Clerk"]
    if level is IMAGE:
        assert ours[0]["00700084"]["Value"] == [{"Alphabetic": "Doe^Jane"}, None, {"Ideographic": "Roe^Jane"}]
