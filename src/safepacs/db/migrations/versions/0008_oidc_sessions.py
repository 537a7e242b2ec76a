"""Browser sessions of people who signed in through OpenID Connect (the web UI's "Sign in with").

They live beside ``sessions`` rather than in it: the person may have no local account, and
``sessions.user_name`` is a foreign key to ``users``.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-08 00:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "oidc_sessions",
        sa.Column("id_sha256", sa.String(length=64), nullable=False),
        sa.Column("user_name", sa.String(), nullable=False),
        sa.Column("issuer", sa.String(), nullable=False),
        sa.Column("roles", sa.String(), nullable=False),
        sa.Column("csrf_sha256", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id_sha256", name=op.f("pk_oidc_sessions")),
    )
    op.create_index(op.f("ix_oidc_sessions_user_name"), "oidc_sessions", ["user_name"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_oidc_sessions_user_name"), table_name="oidc_sessions")
    op.drop_table("oidc_sessions")
