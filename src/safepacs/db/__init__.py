"""The database: patients, studies, series, instances, peers, users and the audit trail in one SQL database.

:mod:`safepacs.db.database` holds :class:`~safepacs.db.database.Database` (engines, the writers' turns,
retried and synced transactions, the audit head hook) and :func:`~safepacs.db.database.migrate`; the
repositories built on it are :mod:`safepacs.db.instances` (instance rows, queries, the trash),
:mod:`safepacs.db.directory` (peers, users, tokens, logins, certificates, access rules) and
:mod:`safepacs.db.auditlog` (the audit trail's tables).  What consumers may call is in
:mod:`safepacs.db.ports`, as protocols; the SQL of queries is in :mod:`safepacs.db.sql`, of indexing
an instance in :mod:`safepacs.db.write`, the tables in :mod:`safepacs.db.schema`.
"""
