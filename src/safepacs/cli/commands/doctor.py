"""``safepacs doctor [--data DIR]``: the local SafePACS (settings, files, peers, accounts) and its
listeners, reported like ``safepacs scan`` (:mod:`safepacs.cli.commands.scan`).  It changes nothing:
the index is opened read-only."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from safepacs.cli._common import UsageError, add_data_option
from safepacs.cli.commands.scan import emit, output_options

if TYPE_CHECKING:
    from safepacs.app import Repositories
    from safepacs.cli._common import Subparsers

__all__ = ["register", "run"]


def register(sub: Subparsers) -> None:
    sp = sub.add_parser(
        "doctor", help="review this SafePACS: settings, file permissions, peers, accounts, and its listeners"
    )
    add_data_option(sp)
    sp.add_argument(
        "--dicom-port", type=int, metavar="N", help="check this DICOM port (default: the setting)"
    )
    sp.add_argument("--http-port", type=int, metavar="N", help="check this HTTPS port (default: the setting)")
    sp.add_argument("--no-network", action="store_true", help="review the configuration only")
    sp.add_argument(
        "--timeout", type=float, default=3.0, metavar="S", help="seconds per probe step (default 3)"
    )
    output_options(sp)
    sp.set_defaults(handler=run)


def _read_only_repositories(url: str) -> Repositories:
    """The index opened for reading only: its schema is checked, never created or upgraded (the doctor
    changes nothing, and runs on a read-only data directory).  SQLite is opened with ``mode=ro``,
    PostgreSQL sessions with ``default_transaction_read_only``."""
    from urllib.parse import quote

    import sqlalchemy as sa
    from alembic.script import ScriptDirectory

    import safepacs.db
    from safepacs.app import open_repositories
    from safepacs.errors import DatabaseError

    parsed = sa.make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database:
        path = Path(parsed.database).resolve()
        if not path.is_file():
            raise DatabaseError(f"the index {path} does not exist; 'safepacs doctor' does not create it")
        query = {**parsed.query, "mode": "ro", "uri": "true"}
        parsed = parsed.set(database=f"file:{quote(str(path))}", query=query)
    elif parsed.get_backend_name() == "postgresql":
        # Every transaction of this connection read-only: the server refuses a write, whatever runs.
        options = parsed.query.get("options", "")
        options = " ".join(options) if isinstance(options, tuple) else options
        read_only = f"{options} -c default_transaction_read_only=on".strip()
        parsed = parsed.update_query_dict({"options": read_only})
    url = parsed.render_as_string(hide_password=False)
    head = ScriptDirectory(str(Path(safepacs.db.__file__).parent / "migrations")).get_current_head()
    engine = sa.create_engine(url, hide_parameters=True)
    try:
        with engine.connect() as conn:
            version = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
    except sa.exc.SQLAlchemyError as exc:
        raise DatabaseError(
            f"the index cannot be read ({type(exc).__name__}): no schema, or index.url is wrong; "
            "'safepacs doctor' does not create or change it"
        ) from exc
    finally:
        engine.dispose()
    if version != head:
        raise DatabaseError(
            f"the index schema is at revision {version}, this SafePACS expects {head}; 'safepacs doctor' "
            "does not change it: upgrade it with 'safepacs serve' (run once), then run the doctor again"
        )
    return open_repositories(url)


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from safepacs.app import audit_reserve, check_index_choice, free_space
    from safepacs.config import data_dir_from, load_settings
    from safepacs.errors import DataDirError
    from safepacs.scan.doctor import AccountInfo, DiskInfo, DoctorInput, run_doctor

    data = data_dir_from(args.data)
    if not (data / "safepacs.toml").is_file():
        raise DataDirError(
            f"{data} is not a SafePACS data directory; create it with 'safepacs init --data {data}'"
        )
    for port in (args.dicom_port, args.http_port):
        if port is not None and not 0 < port < 65536:
            raise UsageError("--dicom-port and --http-port must be between 1 and 65535")
    settings = load_settings(data)
    check_index_choice(settings, record=False)  # the doctor writes nothing
    repos = _read_only_repositories(settings.index_url)
    directory = repos.directory
    try:
        peers = directory.list_peers()
        accounts = []
        for user in directory.list_users():
            state = directory.get_login_state(user.name)
            accounts.append(
                AccountInfo(
                    user.name,
                    frozenset(user.roles),
                    user.disabled,
                    user.must_change_password,
                    state is not None and state.totp_secret is not None,
                )
            )
    finally:
        repos.close()
    reserve = audit_reserve(settings)
    disk = DiskInfo(
        [(str(path), free, needed) for path, free, needed in free_space(settings, reserve).below()],
        str(reserve.path) if reserve is not None else None,
        reserve.held() if reserve is not None else None,
    )
    report = run_doctor(
        DoctorInput(settings, peers, accounts, disk),
        dicom_port=args.dicom_port,
        http_port=args.http_port,
        network=not args.no_network,
        timeout=args.timeout,
    )
    return emit(args, report)
