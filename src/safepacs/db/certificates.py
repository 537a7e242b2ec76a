"""Client certificates of DICOM peers: issued by ``safepacs peer cert``, pinned with ``peer add --cert``,
revoked with ``peer revoke-cert``.

Part of the directory repository (:class:`safepacs.db.directory.SqlDirectory`).  Rows are keyed by
the certificate's SHA-256 (of its DER encoding, lowercase hex) and are not tied to the peers table,
so a revocation outlives the peer it was issued to and a certificate revoked once stays refused.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from safepacs.db.database import Database
from safepacs.db.schema import peer_certificates, peers
from safepacs.records import CertificateRecord

__all__ = ["CertificateMixin", "write_certificate"]


def _aware(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _record(row: Any) -> CertificateRecord:
    return CertificateRecord(
        row["sha256"],
        row["ae_title"],
        row["source"],
        row["serial"],
        _aware(row["not_after"]),
        _aware(row["created_at"]) or datetime.now(UTC),
        _aware(row["revoked_at"]),
    )


class CertificateMixin:
    """Issued, pinned and revoked peer certificates (see the module docstring)."""

    _db: Database

    def record_certificate(
        self,
        sha256: str,
        ae_title: str,
        *,
        source: str,
        serial: str = "",
        not_after: datetime | None = None,
        pem: bytes | None = None,
        also: Callable[[sa.Connection], object] | None = None,
    ) -> None:
        """Remember a certificate issued to or pinned for ``ae_title``; a revoked one stays revoked.
        ``also`` runs in the same transaction once the row is written (the change's audit record)."""

        def work(conn: sa.Connection) -> None:
            write_certificate(
                conn, sha256, ae_title, source=source, serial=serial, not_after=not_after, pem=pem
            )
            if also is not None:
                also(conn)

        self._db.run(work, write=True)

    def revoke_certificates(
        self,
        ae_title: str,
        sha256: str | None = None,
        *,
        pinned: str | None = None,
        also: Callable[[sa.Connection], object] | None = None,
    ) -> int:
        """Revoke the certificates of ``ae_title`` (all, or the one ``sha256`` names, which is recorded
        as revoked even when it was never seen); how many were newly revoked.  ``pinned``: first revoke
        this one too, the same way (the peer's pin).  ``also`` runs in the same transaction when a
        certificate was newly revoked (the change's audit record: both commit or neither)."""
        now = datetime.now(UTC)

        def work(conn: sa.Connection) -> int:
            count = revoke(conn, pinned) if pinned is not None else 0
            count += revoke(conn, sha256)
            if count and also is not None:
                also(conn)
            return count

        def revoke(conn: sa.Connection, sha256: str | None) -> int:
            t = peer_certificates
            if (
                sha256 is not None
                and conn.execute(sa.select(t.c.sha256).where(t.c.sha256 == sha256)).first() is None
            ):
                conn.execute(
                    sa.insert(t).values(
                        sha256=sha256, ae_title=ae_title, source="pinned", created_at=now, revoked_at=now
                    )
                )
                return 1
            stmt = sa.update(t).where(t.c.revoked_at.is_(None))
            # one certificate is revoked whoever it was recorded for; otherwise all of the AE's
            stmt = (
                stmt.where(t.c.sha256 == sha256)
                if sha256 is not None
                else stmt.where(t.c.ae_title == ae_title)
            )
            return int(conn.execute(stmt.values(revoked_at=now)).rowcount or 0)

        return self._db.run(work, write=True)

    def certificate_revoked(self, sha256: str) -> bool:
        """Whether the certificate with this SHA-256 was revoked."""

        def work(conn: sa.Connection) -> bool:
            t = peer_certificates
            revoked_at = conn.execute(sa.select(t.c.revoked_at).where(t.c.sha256 == sha256)).scalar()
            return revoked_at is not None

        return self._db.run(work, write=False)

    def pinned_certificates(self) -> list[bytes]:
        """The PEM of every unrevoked certificate pinned for a registered peer (``peer add --cert``):
        the trust anchors of the DICOM TLS listener beside the SafePACS CA."""

        def work(conn: sa.Connection) -> list[bytes]:
            t = peer_certificates
            stmt = (
                sa.select(t.c.pem)
                .select_from(t.join(peers, peers.c.cert_sha256 == t.c.sha256))
                .where(t.c.source == "pinned", t.c.pem.is_not(None), t.c.revoked_at.is_(None))
                .distinct()
                .order_by(t.c.pem)
            )
            return [str(pem).encode("ascii") for pem in conn.execute(stmt).scalars()]

        return self._db.run(work, write=False)

    def list_certificates(self, ae_title: str | None = None) -> list[CertificateRecord]:
        def work(conn: sa.Connection) -> list[CertificateRecord]:
            t = peer_certificates
            stmt = sa.select(t).order_by(t.c.ae_title, t.c.created_at)
            if ae_title is not None:
                stmt = stmt.where(t.c.ae_title == ae_title)
            return [_record(r) for r in conn.execute(stmt).mappings()]

        return self._db.run(work, write=False)


def write_certificate(
    conn: sa.Connection,
    sha256: str,
    ae_title: str,
    *,
    source: str,
    serial: str = "",
    not_after: datetime | None = None,
    pem: bytes | None = None,
) -> None:
    """:meth:`CertificateMixin.record_certificate` in the transaction of ``conn``."""
    found = conn.execute(
        sa.select(peer_certificates.c.revoked_at).where(peer_certificates.c.sha256 == sha256)
    ).first()
    values = {
        "ae_title": ae_title,
        "source": source,
        "serial": serial,
        "not_after": not_after,
        "pem": pem.decode("ascii") if pem is not None else None,
    }
    if found is None:
        conn.execute(
            sa.insert(peer_certificates).values(
                sha256=sha256, created_at=datetime.now(UTC), revoked_at=None, **values
            )
        )
    else:
        conn.execute(
            sa.update(peer_certificates).where(peer_certificates.c.sha256 == sha256).values(**values)
        )
