"""Personal access tokens (DICOMweb bearer tokens), stored as the SHA-256 of their secret part.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 08:15:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "tokens",
        sa.Column("token_id", sa.String(length=32), nullable=False),
        sa.Column("user_name", sa.String(), nullable=False),
        sa.Column("secret_sha256", sa.String(length=64), nullable=False),
        sa.Column("scopes", sa.String(), server_default="", nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["user_name"], ["users.name"], name=op.f("fk_tokens_user_name"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("token_id", name=op.f("pk_tokens")),
    )
    op.create_index(op.f("ix_tokens_user_name"), "tokens", ["user_name"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_tokens_user_name"), table_name="tokens")
    op.drop_table("tokens")
