"""Each repository satisfies the Protocols consumers are typed against (``safepacs.db.ports``).

The assignments below are what mypy checks (``mypy tests/unit/db/test_ports.py``): a method missing or with
another signature fails there.  At run time, ``isinstance`` with the ``runtime_checkable`` Protocols
checks the methods are there, and the parameters (names, kinds, defaults) are compared one by one, so a
change to a repository that its Protocol does not follow fails here too.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from pathlib import Path

import pytest

from safepacs.audit.events import AuditFilter
from safepacs.db import ports
from safepacs.db.auditlog import SqlAuditLog
from safepacs.db.database import Database, migrate
from safepacs.db.directory import SqlDirectory
from safepacs.db.instances import SqlInstances


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    url = f"sqlite:///{tmp_path / 'index.sqlite3'}"
    migrate(url)
    database = Database(url)
    try:
        yield database
    finally:
        database.close()


def test_the_repositories_satisfy_their_protocols_for_mypy(db: Database) -> None:
    instances: ports.Instances = SqlInstances(db)
    directory: ports.Directory = SqlDirectory(db)
    peers: ports.Peers = SqlDirectory(db)
    accounts: ports.Accounts = SqlDirectory(db)
    holders: ports.TokenHolders = SqlDirectory(db)
    identities: ports.Identities = SqlDirectory(db)
    logins: ports.Logins = SqlDirectory(db)
    certificates: ports.Certificates = SqlDirectory(db)
    rules: ports.AccessRules = SqlDirectory(db)
    audit_log: ports.AuditLog = SqlAuditLog(db)
    records: ports.AuditRecords = SqlAuditLog(db)
    cursors: ports.AuditCursors = SqlAuditLog(db)
    search: ports.AuditSearch = SqlAuditLog(db)
    assert instances.count_instances() == 0
    assert directory.list_peers() == peers.list_peers() == []
    assert accounts.list_users() == [] and holders.get_user("nobody") is None
    assert identities.get_peer("NOBODY") is None and identities.pinned_certificates() == []
    assert logins.get_login_state("nobody") is None
    assert certificates.list_certificates() == [] and rules.list_grants() == []
    assert audit_log.audit_head() is None and records.audit_records() == []
    assert cursors.get_audit_cursor("siem") == 0 and search.search_audit(AuditFilter()) == []


# Each repository class and the Protocols it must satisfy.
SATISFIES: list[tuple[type, type]] = [
    (SqlInstances, ports.Instances),
    (SqlDirectory, ports.Directory),
    (SqlDirectory, ports.Peers),
    (SqlDirectory, ports.Accounts),
    (SqlDirectory, ports.TokenHolders),
    (SqlDirectory, ports.Identities),
    (SqlDirectory, ports.Logins),
    (SqlDirectory, ports.Certificates),
    (SqlDirectory, ports.AccessRules),
    (SqlAuditLog, ports.AuditLog),
    (SqlAuditLog, ports.AuditRecords),
    (SqlAuditLog, ports.AuditCursors),
    (SqlAuditLog, ports.AuditSearch),
]


def _protocol_methods(protocol: type) -> list[str]:
    names: set[str] = set()
    for klass in protocol.__mro__:
        if klass is object or klass.__module__ != ports.__name__:
            continue
        names |= {n for n, v in vars(klass).items() if not n.startswith("_") and inspect.isfunction(v)}
    return sorted(names)


@pytest.mark.parametrize(("repository", "protocol"), SATISFIES, ids=lambda t: t.__name__)
def test_the_repositories_satisfy_their_protocols_at_run_time(
    db: Database, repository: type, protocol: type
) -> None:
    assert isinstance(repository(db), protocol)
    methods = _protocol_methods(protocol)
    assert methods, protocol
    for name in methods:
        wanted = inspect.signature(getattr(protocol, name)).parameters.values()
        offered = inspect.signature(getattr(repository, name)).parameters.values()
        assert [(p.name, p.kind, p.default) for p in offered] == [
            (p.name, p.kind, p.default) for p in wanted
        ], (protocol, name)


@pytest.mark.parametrize(
    ("repository", "protocol"),
    [(SqlInstances, ports.Instances), (SqlDirectory, ports.Directory), (SqlAuditLog, ports.AuditLog)],
    ids=lambda t: t.__name__,
)
def test_the_large_protocols_list_every_public_method_of_their_repository(
    repository: type, protocol: type
) -> None:
    """Nothing a repository offers is left out of its Protocol: whatever a consumer may call is in it."""
    public = sorted(n for n, v in inspect.getmembers(repository, inspect.isfunction) if not n.startswith("_"))
    assert public == _protocol_methods(protocol)


def test_a_class_missing_a_method_does_not_satisfy_the_protocol() -> None:
    class Partial:
        def get_peer(self, ae_title: str) -> None:
            return None

    assert not isinstance(Partial(), ports.Peers)
