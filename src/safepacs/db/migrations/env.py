"""Alembic environment of the index.

:func:`safepacs.db.migrate` runs it with an open connection in ``config.attributes["connection"]``
(the package needs no ``alembic.ini``).  For development (``alembic revision --autogenerate``) an ini
file with ``script_location`` pointing here and ``sqlalchemy.url`` works as usual.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context

from safepacs.db.schema import metadata

config = context.config


def _run(connection: sa.Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite cannot ALTER most things
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = sa.create_engine(config.get_main_option("sqlalchemy.url") or "", poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        _run(conn)


if context.is_offline_mode():
    raise RuntimeError("offline (--sql) migrations are not supported; run safepacs.db.migrate(url)")
run_migrations_online()
