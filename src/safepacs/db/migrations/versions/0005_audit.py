"""The audit trail: hash-chained records, their search keys, signed checkpoints, collector cursors.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-22 10:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "audit_log",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("event_id", sa.String(length=6), nullable=False),
        sa.Column("outcome", sa.Integer(), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("prev_hash", sa.String(length=64), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_audit_log")),
    )
    op.create_index(op.f("ix_audit_log_recorded_at"), "audit_log", ["recorded_at"], unique=False)
    op.create_table(
        "audit_refs",
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("value", sa.String(), nullable=False),
        sa.ForeignKeyConstraint(["seq"], ["audit_log.seq"], name=op.f("fk_audit_refs_seq")),
    )
    op.create_index(
        op.f("ix_audit_refs_kind_value_seq"), "audit_refs", ["kind", "value", "seq"], unique=False
    )
    op.create_table(
        "audit_checkpoints",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.Column("signature", sa.String(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_audit_checkpoints")),
    )
    op.create_table(
        "audit_cursors",
        sa.Column("collector", sa.String(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("collector", name=op.f("pk_audit_cursors")),
    )


def downgrade() -> None:
    op.drop_table("audit_cursors")
    op.drop_table("audit_checkpoints")
    op.drop_index(op.f("ix_audit_refs_kind_value_seq"), table_name="audit_refs")
    op.drop_table("audit_refs")
    op.drop_index(op.f("ix_audit_log_recorded_at"), table_name="audit_log")
    op.drop_table("audit_log")
