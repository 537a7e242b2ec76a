"""The records the database hands the services (safepacs/records.py): plain immutable values that hold
no secret, compare by value, and default to "unrestricted" only where the docs say so."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import pytest

from safepacs import records
from safepacs.records import (
    CertificateRecord,
    GrantRecord,
    LoginState,
    PinnedCertificate,
    SessionRecord,
    TokenRecord,
    TrashRecord,
    UserRecord,
)
from safepacs.types import Scope, StoredBlob

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def examples() -> list[object]:
    return [
        UserRecord("alice", "$argon2id$v=19$...", frozenset({"viewer"}), False, False),
        TokenRecord("t1", "alice", "ab" * 32, frozenset({"read"}), NOW, NOW + timedelta(days=30), None),
        LoginState(0, None, None),
        SessionRecord("cd" * 32, "alice", "ef" * 32, NOW, NOW, NOW + timedelta(hours=8), None),
        CertificateRecord("01" * 32, "MODALITY1", "issued", "1F", None, NOW, None),
        GrantRecord("1.2.3", "alice", NOW, None),
        TrashRecord(1, "1.2.3.4", "1.2.3.5", "1.2.3", StoredBlob("b", "k", "00" * 32, 10), "alice", NOW, NOW),
        PinnedCertificate(b"-----BEGIN CERTIFICATE-----", "0a1b", NOW),
    ]


def test_every_exported_record_is_covered() -> None:
    assert {type(r).__name__ for r in examples()} == set(records.__all__)


@pytest.mark.parametrize("record", examples(), ids=lambda r: type(r).__name__)
def test_records_cannot_be_changed_after_they_are_read(record: object) -> None:
    field = dataclasses.fields(record)[0].name  # type: ignore[arg-type]
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(record, field, "changed")


@pytest.mark.parametrize("record", examples(), ids=lambda r: type(r).__name__)
def test_records_compare_and_hash_by_value(record: object) -> None:
    copy = dataclasses.replace(record)  # type: ignore[type-var]
    assert copy == record and copy is not record
    assert hash(copy) == hash(record)
    assert len({record, copy}) == 1


def test_a_user_is_unrestricted_unless_an_administrator_scoped_it() -> None:
    user = UserRecord("bob", "h", frozenset(), disabled=False, must_change_password=True)
    assert user.scope is None
    scoped = dataclasses.replace(user, scope=Scope(modalities=frozenset({"CT"})))
    assert scoped != user and scoped.scope is not None and scoped.scope.modalities == {"CT"}


def test_tokens_and_sessions_keep_digests_not_secrets() -> None:
    token_fields = {f.name for f in dataclasses.fields(TokenRecord)}
    session_fields = {f.name for f in dataclasses.fields(SessionRecord)}
    assert "secret_sha256" in token_fields and not {"secret", "token"} & token_fields
    assert {"id_sha256", "csrf_sha256"} <= session_fields and not {"id", "csrf", "cookie"} & session_fields


def test_a_trash_record_names_the_blob_it_keeps() -> None:
    (trash,) = [r for r in examples() if isinstance(r, TrashRecord)]
    assert isinstance(trash, TrashRecord)
    assert trash.blob.blob_id == "b" and trash.blob.seal_tag is None
