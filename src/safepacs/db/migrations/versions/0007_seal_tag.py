"""The AES-GCM tag of each stored object, kept with its instance (and in the trash).

A read checks that the object is exactly the ciphertext the index recorded (then GCM authenticates
it) instead of hashing the plaintext again.  Rows indexed before this revision have no tag and are
still checked against their SHA-256, which every row keeps.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07 03:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    for table in ("instances", "trash"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("seal_tag", sa.String(length=32), nullable=True))


def downgrade() -> None:
    for table in ("instances", "trash"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("seal_tag")
