"""The index tables (SQLAlchemy Core), built from :mod:`safepacs.dicom.attributes`.

Migrations in ``migrations/versions`` are the frozen history of this schema; a test checks that the
migrated database and this metadata agree.  Column layout per VR:

* text VRs (AE, AS, CS, LO, LT, SH, ST, UC, UR, UT, UI): ``NOT NULL`` text, ``''`` when empty;
* PN: the value as stored plus ``<column>_ci``, its case-folded copy for matching (PS3.4 C.2.2.2.1);
* DA: ``YYYYMMDD``; TM and DT: the value as stored plus ``<column>_key``, the normalized comparable
  form used by Range Matching (PS3.4 C.2.2.2.5);
* IS/US: integers, ``NULL`` when empty.

Counts (NumberOfStudyRelatedInstances...), ModalitiesInStudy and SOPClassesInStudy are not stored:
they are computed in the query from the rows below, through the indexes declared here.
"""

from __future__ import annotations

import sqlalchemy as sa

from safepacs.dicom.attributes import (
    ATTRIBUTES,
    INTEGER_VRS,
    SEQUENCES,
    STRING_VRS,
    TEMPORAL_VRS,
    Attribute,
    Sequence,
)
from safepacs.types import QueryLevel

__all__ = [
    "LEVEL_TABLES",
    "SEQUENCE_TABLES",
    "attribute_columns",
    "audit_checkpoints",
    "audit_cursors",
    "audit_log",
    "audit_refs",
    "instances",
    "metadata",
    "oidc_sessions",
    "patients",
    "peer_certificates",
    "peers",
    "series",
    "sessions",
    "studies",
    "study_grants",
    "study_groups",
    "tokens",
    "trash",
    "user_scopes",
    "users",
]

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s",
        "pk": "pk_%(table_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
    }
)

_TS = sa.DateTime(timezone=True)


def attribute_columns(attr: Attribute) -> list[sa.Column[object]]:
    """The column(s) that keep one attribute (see the module docstring)."""
    assert attr.column is not None
    if attr.vr in INTEGER_VRS:
        return [sa.Column(attr.column, sa.BigInteger, nullable=True)]
    if attr.vr not in STRING_VRS | TEMPORAL_VRS | {"PN"}:
        raise ValueError(f"no column layout for VR {attr.vr}")
    columns: list[sa.Column[object]] = [sa.Column(attr.column, sa.String, nullable=False, server_default="")]
    if attr.vr == "PN":
        columns.append(sa.Column(attr.fold_column, sa.String, nullable=False, server_default=""))
    elif attr.vr in {"TM", "DT"}:
        columns.append(sa.Column(attr.key_column, sa.String, nullable=False, server_default=""))
    return columns


def _stored(level: QueryLevel) -> list[sa.Column[object]]:
    out: list[sa.Column[object]] = []
    for attr in ATTRIBUTES:
        if attr.level is level and attr.column is not None:
            out.extend(attribute_columns(attr))
    return out


def _timestamps() -> list[sa.Column[object]]:
    return [sa.Column("created_at", _TS, nullable=False), sa.Column("updated_at", _TS, nullable=False)]


patients = sa.Table(
    "patients",
    metadata,
    sa.Column("pk", sa.Integer, primary_key=True, autoincrement=True),
    # Patients are keyed by (PatientID, IssuerOfPatientID).  An empty PatientID identifies nobody: such a
    # patient is private to one study, whose Study Instance UID is then kept in anon_key ('' otherwise).
    sa.Column("anon_key", sa.String, nullable=False, server_default=""),
    *_stored(QueryLevel.PATIENT),
    *_timestamps(),
    sa.UniqueConstraint("patient_id", "issuer_of_patient_id", "anon_key"),
    sa.Index(None, "patient_name_ci"),
)

studies = sa.Table(
    "studies",
    metadata,
    sa.Column("pk", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("patient_pk", sa.Integer, sa.ForeignKey("patients.pk"), nullable=False),
    *_stored(QueryLevel.STUDY),
    *_timestamps(),
    sa.UniqueConstraint("study_instance_uid"),
    sa.Index(None, "patient_pk"),
    sa.Index(None, "study_date"),
    sa.Index(None, "accession_number"),
)

series = sa.Table(
    "series",
    metadata,
    sa.Column("pk", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("study_pk", sa.Integer, sa.ForeignKey("studies.pk"), nullable=False),
    *_stored(QueryLevel.SERIES),
    *_timestamps(),
    sa.UniqueConstraint("series_instance_uid"),
    sa.Index(None, "study_pk", "modality"),
)

instances = sa.Table(
    "instances",
    metadata,
    sa.Column("pk", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("series_pk", sa.Integer, sa.ForeignKey("series.pk"), nullable=False),
    sa.Column("study_pk", sa.Integer, sa.ForeignKey("studies.pk"), nullable=False),
    *_stored(QueryLevel.IMAGE),
    sa.Column("transfer_syntax_uid", sa.String, nullable=False),
    sa.Column("blob_id", sa.String, nullable=False),
    sa.Column("key_id", sa.String, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("seal_tag", sa.String(32), nullable=True),  # GCM tag of the sealed object (0007)
    *_timestamps(),
    sa.UniqueConstraint("sop_instance_uid"),
    sa.Index(None, "series_pk", "instance_number"),
    sa.Index(None, "study_pk", "sop_class_uid"),
)

LEVEL_TABLES: dict[QueryLevel, sa.Table] = {
    QueryLevel.PATIENT: patients,
    QueryLevel.STUDY: studies,
    QueryLevel.SERIES: series,
    QueryLevel.IMAGE: instances,
}


def _sequence_table(seq: Sequence) -> sa.Table:
    owner = LEVEL_TABLES[seq.level]
    columns: list[sa.Column[object]] = []
    for attr in seq.items:
        columns.extend(attribute_columns(attr))
    return sa.Table(
        seq.table,
        metadata,
        sa.Column("pk", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("owner_pk", sa.Integer, sa.ForeignKey(owner.c.pk, ondelete="CASCADE"), nullable=False),
        sa.Column("position", sa.Integer, nullable=False),
        *columns,
        sa.Index(None, "owner_pk"),
    )


#: One table per sequence key, one row per item (PS3.4 C.2.2.2.6 Sequence Matching).
SEQUENCE_TABLES: dict[str, sa.Table] = {seq.keyword: _sequence_table(seq) for seq in SEQUENCES}

peers = sa.Table(
    "peers",
    metadata,
    sa.Column("ae_title", sa.String(16), primary_key=True),
    sa.Column("host", sa.String, nullable=False),
    sa.Column("port", sa.Integer, nullable=True),
    sa.Column("allow", sa.String, nullable=False, server_default=""),  # comma-separated Service values
    sa.Column("created_at", _TS, nullable=False),
    # The user this AE acts for (migration 0004): its C-FIND/C-GET/C-MOVE see what that user sees.
    sa.Column("user_name", sa.String, nullable=True),
    # DICOM TLS and user identity (migration 0006; peers registered before it were set to 'off'):
    # 'required' or 'off'; a pinned client certificate's SHA-256; 'none', 'optional' or 'required'.
    sa.Column("tls", sa.String(8), nullable=False, server_default="required"),
    sa.Column("cert_sha256", sa.String(64), nullable=True),
    sa.Column("user_identity", sa.String(8), nullable=False, server_default="none"),
)

# Client certificates of peers (migration 0006): those 'safepacs peer cert' issued, those pinned with
# 'peer add --cert' (kept with their PEM: they are trust anchors of the DICOM TLS listener), and the
# revoked ones ('peer revoke-cert').  Not tied to the peers table: a revocation outlives the peer.
peer_certificates = sa.Table(
    "peer_certificates",
    metadata,
    sa.Column("sha256", sa.String(64), primary_key=True),
    sa.Column("ae_title", sa.String(16), nullable=False, index=True),
    sa.Column("source", sa.String(8), nullable=False),  # 'issued' or 'pinned'
    sa.Column("serial", sa.String(40), nullable=False, server_default=""),  # hex
    sa.Column("not_after", _TS, nullable=True),
    sa.Column("pem", sa.Text, nullable=True),  # pinned certificates only
    sa.Column("created_at", _TS, nullable=False),
    sa.Column("revoked_at", _TS, nullable=True),
)

users = sa.Table(
    "users",
    metadata,
    sa.Column("name", sa.String, primary_key=True),
    sa.Column("password_hash", sa.String, nullable=False),
    sa.Column("roles", sa.String, nullable=False, server_default=""),  # comma-separated
    sa.Column("disabled", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("must_change_password", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("created_at", _TS, nullable=False),
    # Local login (migration 0003): consecutive failures, lockout end, TOTP (RFC 6238) secret sealed with
    # the server's key, and the last accepted TOTP time step (a code is accepted once: replay protection).
    sa.Column("failed_logins", sa.Integer, nullable=False, server_default="0"),
    sa.Column("locked_until", _TS, nullable=True),
    sa.Column("totp_secret", sa.String, nullable=True),
    sa.Column("totp_last_step", sa.BigInteger, nullable=True),
)

tokens = sa.Table(
    "tokens",
    metadata,
    sa.Column("token_id", sa.String(32), primary_key=True),  # the public part of the token
    sa.Column(
        "user_name", sa.String, sa.ForeignKey("users.name", ondelete="CASCADE"), nullable=False, index=True
    ),
    sa.Column("secret_sha256", sa.String(64), nullable=False),  # of the secret part; never the token
    sa.Column(
        "scopes", sa.String, nullable=False, server_default=""
    ),  # comma-separated; "" = the user's roles
    sa.Column("created_at", _TS, nullable=False),
    sa.Column("expires_at", _TS, nullable=False),
    sa.Column("revoked_at", _TS, nullable=True),
)

sessions = sa.Table(
    "sessions",
    metadata,
    sa.Column("id_sha256", sa.String(64), primary_key=True),  # of the cookie value; never the cookie
    sa.Column(
        "user_name", sa.String, sa.ForeignKey("users.name", ondelete="CASCADE"), nullable=False, index=True
    ),
    sa.Column("csrf_sha256", sa.String(64), nullable=False),  # of the X-CSRF-Token bound to this session
    sa.Column("created_at", _TS, nullable=False),
    sa.Column("last_seen_at", _TS, nullable=False),  # idle expiry counts from here
    sa.Column("expires_at", _TS, nullable=False),  # absolute expiry
    sa.Column("revoked_at", _TS, nullable=True),
)

# Sessions of people signed in through OpenID Connect (migration 0008).  Apart from ``sessions``: the
# person may have no local account, so ``user_name`` (as the issuer names them) has no foreign key.
oidc_sessions = sa.Table(
    "oidc_sessions",
    metadata,
    sa.Column("id_sha256", sa.String(64), primary_key=True),  # of the cookie value; never the cookie
    sa.Column("user_name", sa.String, nullable=False, index=True),
    sa.Column("issuer", sa.String, nullable=False),  # the configured issuer that vouched for them
    sa.Column("roles", sa.String, nullable=False),  # comma-separated SafePACS roles from the ID token
    sa.Column("csrf_sha256", sa.String(64), nullable=False),
    sa.Column("created_at", _TS, nullable=False),
    sa.Column("last_seen_at", _TS, nullable=False),
    sa.Column("expires_at", _TS, nullable=False),
    sa.Column("revoked_at", _TS, nullable=True),
)

# Access scopes (migration 0004) ------------------------------------------------------------------------
# What a restricted user sees (see safepacs.types.Scope): JSON {"referring_physician": str,
# "institutions": [...], "modalities": [...], "groups": [...]}.  Without a row: restricted only by role.
user_scopes = sa.Table(
    "user_scopes",
    metadata,
    sa.Column("user_name", sa.String, sa.ForeignKey("users.name", ondelete="CASCADE"), primary_key=True),
    sa.Column("scope", sa.JSON, nullable=False),
)

# Access groups attached to studies, by Study Instance UID so that a study can be put in a group before
# its images arrive and stays in it when they are re-sent.
study_groups = sa.Table(
    "study_groups",
    metadata,
    sa.Column("study_instance_uid", sa.String(64), primary_key=True),
    sa.Column("group_name", sa.String, primary_key=True),
    sa.Column("created_at", _TS, nullable=False),
    sa.Index(None, "group_name", "study_instance_uid"),
)

# Explicit per-study grants to one user, optionally until a time.
study_grants = sa.Table(
    "study_grants",
    metadata,
    sa.Column("study_instance_uid", sa.String(64), primary_key=True),
    sa.Column("user_name", sa.String, sa.ForeignKey("users.name", ondelete="CASCADE"), primary_key=True),
    sa.Column("created_at", _TS, nullable=False),
    sa.Column("expires_at", _TS, nullable=True),
    sa.Index(None, "user_name", "study_instance_uid"),
)

# Deleted instances (soft delete): out of the index at once, their bytes kept until purge_after
# (the retention period), then destroyed by `safepacs purge` (or the server's daily purge).
trash = sa.Table(
    "trash",
    metadata,
    sa.Column("pk", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("sop_instance_uid", sa.String(64), nullable=False),
    sa.Column("series_instance_uid", sa.String(64), nullable=False),
    sa.Column("study_instance_uid", sa.String(64), nullable=False),
    sa.Column("sop_class_uid", sa.String(64), nullable=False),
    sa.Column("transfer_syntax_uid", sa.String(64), nullable=False),
    sa.Column("blob_id", sa.String, nullable=False),
    sa.Column("key_id", sa.String, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("seal_tag", sa.String(32), nullable=True),
    sa.Column("deleted_by", sa.String, nullable=False),
    sa.Column("deleted_at", _TS, nullable=False),
    sa.Column("purge_after", _TS, nullable=False),
    sa.Index(None, "purge_after"),
    sa.Index(None, "study_instance_uid"),
)

# The audit trail (migration 0005) ------------------------------------------------------------------------
# Append-only, hash-chained (safepacs.audit.chain); the body is the event's canonical JSON.
audit_log = sa.Table(
    "audit_log",
    metadata,
    sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("recorded_at", _TS, nullable=False),
    sa.Column("event_id", sa.String(6), nullable=False),
    sa.Column("outcome", sa.Integer, nullable=False),
    sa.Column("body", sa.Text, nullable=False),
    sa.Column("prev_hash", sa.String(64), nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
    sa.Index(None, "recorded_at"),
)

# What a privacy officer searches by: patient IDs, study UIDs and acting users of each record.
audit_refs = sa.Table(
    "audit_refs",
    metadata,
    sa.Column("seq", sa.BigInteger, sa.ForeignKey("audit_log.seq"), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),  # patient | study | user
    sa.Column("value", sa.String, nullable=False),
    sa.Index(None, "kind", "value", "seq"),
)

# Ed25519-signed (seq, hash) checkpoints of the chain.
audit_checkpoints = sa.Table(
    "audit_checkpoints",
    metadata,
    sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("hash", sa.String(64), nullable=False),
    sa.Column("signature", sa.String, nullable=False),
    sa.Column("created_at", _TS, nullable=False),
)

# How far each syslog collector has received the trail (the trail itself is the durable spool).
audit_cursors = sa.Table(
    "audit_cursors",
    metadata,
    sa.Column("collector", sa.String, primary_key=True),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("updated_at", _TS, nullable=False),
)
