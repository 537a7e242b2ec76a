"""DICOM TLS and user identity per peer; client certificates issued, pinned and revoked.

Peers registered before this revision keep working as they did (plain DICOM): their ``tls`` is set
to ``'off'``.  Peers registered afterwards default to ``'required'``.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23 09:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Existing rows get 'off' (they were plain DICOM peers); then new rows default to 'required'.
    with op.batch_alter_table("peers") as batch:
        batch.add_column(sa.Column("tls", sa.String(length=8), nullable=False, server_default="off"))
        batch.add_column(sa.Column("cert_sha256", sa.String(length=64), nullable=True))
        batch.add_column(
            sa.Column("user_identity", sa.String(length=8), nullable=False, server_default="none")
        )
    with op.batch_alter_table("peers") as batch:
        batch.alter_column(
            "tls",
            existing_type=sa.String(length=8),
            existing_nullable=False,
            server_default="required",
        )
    op.create_table(
        "peer_certificates",
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("ae_title", sa.String(length=16), nullable=False),
        sa.Column("source", sa.String(length=8), nullable=False),
        sa.Column("serial", sa.String(length=40), nullable=False, server_default=""),
        sa.Column("not_after", sa.DateTime(timezone=True), nullable=True),
        sa.Column("pem", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("sha256", name=op.f("pk_peer_certificates")),
    )
    op.create_index(op.f("ix_peer_certificates_ae_title"), "peer_certificates", ["ae_title"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_peer_certificates_ae_title"), table_name="peer_certificates")
    op.drop_table("peer_certificates")
    with op.batch_alter_table("peers") as batch:
        batch.drop_column("user_identity")
        batch.drop_column("cert_sha256")
        batch.drop_column("tls")
