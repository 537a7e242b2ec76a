"""Access scopes, groups and grants; peers acting for a user; the trash of deleted instances.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22 13:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("peers") as batch:
        batch.add_column(sa.Column("user_name", sa.String(), nullable=True))
    op.create_table(
        "user_scopes",
        sa.Column("user_name", sa.String(), nullable=False),
        sa.Column("scope", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_name"], ["users.name"], name=op.f("fk_user_scopes_user_name"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("user_name", name=op.f("pk_user_scopes")),
    )
    op.create_table(
        "study_groups",
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("group_name", sa.String(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("study_instance_uid", "group_name", name=op.f("pk_study_groups")),
    )
    op.create_index(
        op.f("ix_study_groups_group_name_study_instance_uid"),
        "study_groups",
        ["group_name", "study_instance_uid"],
        unique=False,
    )
    op.create_table(
        "study_grants",
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("user_name", sa.String(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["user_name"], ["users.name"], name=op.f("fk_study_grants_user_name"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("study_instance_uid", "user_name", name=op.f("pk_study_grants")),
    )
    op.create_index(
        op.f("ix_study_grants_user_name_study_instance_uid"),
        "study_grants",
        ["user_name", "study_instance_uid"],
        unique=False,
    )
    op.create_table(
        "trash",
        sa.Column("pk", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("series_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("sop_class_uid", sa.String(length=64), nullable=False),
        sa.Column("transfer_syntax_uid", sa.String(length=64), nullable=False),
        sa.Column("blob_id", sa.String(), nullable=False),
        sa.Column("key_id", sa.String(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("deleted_by", sa.String(), nullable=False),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("purge_after", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("pk", name=op.f("pk_trash")),
    )
    op.create_index(op.f("ix_trash_purge_after"), "trash", ["purge_after"], unique=False)
    op.create_index(op.f("ix_trash_study_instance_uid"), "trash", ["study_instance_uid"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_trash_study_instance_uid"), table_name="trash")
    op.drop_index(op.f("ix_trash_purge_after"), table_name="trash")
    op.drop_table("trash")
    op.drop_index(op.f("ix_study_grants_user_name_study_instance_uid"), table_name="study_grants")
    op.drop_table("study_grants")
    op.drop_index(op.f("ix_study_groups_group_name_study_instance_uid"), table_name="study_groups")
    op.drop_table("study_groups")
    op.drop_table("user_scopes")
    with op.batch_alter_table("peers") as batch:
        batch.drop_column("user_name")
