"""Audit forwarding: RFC 5424 syslog over TLS (RFC 5425) to a real TLS receiver on 127.0.0.1.

The receiver parses the octet-counted frames and the RFC 5424 header itself.  The trail is a real
index (SQLite) with the real hash chain; the forwarder sends what is after its cursor, in order, and
survives the collector going away: nothing lost, nothing twice.
"""

from __future__ import annotations

import re
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from lxml import etree

from safepacs.app import Repositories, open_repositories
from safepacs.audit import (
    Action,
    AuditEvent,
    AuditObject,
    EventID,
    ObjectKind,
    Outcome,
    Participant,
    SignedHead,
    Signer,
)
from safepacs.audit.xml import AuditSource
from safepacs.auth.pki import create_ca, issue_certificate
from safepacs.config import AuditCollectorSettings, Settings
from safepacs.db.database import migrate
from safepacs.errors import ConfigError
from safepacs.runtime.audit_export import Forwarder, check_collectors
from safepacs.services.audittrail import AuditTrail
from tests.support.paths import DATA
from tests.support.syslog import Receiver

SCHEMA_FILE = DATA / "audit-message.rng"
T0 = datetime(2026, 11, 22, 8, 0, tzinfo=UTC)


def structured_data(sd: str) -> dict[str, str]:
    """The parameters of the one SD-ELEMENT SafePACS sends (RFC 5424 6.3)."""
    m = re.fullmatch(r'\[safepacs-head@32473((?: [a-z]+="(?:[^"\\\]]|\\.)*")+)\]', sd)
    assert m, sd
    return dict(re.findall(r' ([a-z]+)="((?:[^"\\\]]|\\.)*)"', m[1]))


@dataclass(frozen=True)
class Pki:
    ca_file: Path
    server_context: ssl.SSLContext
    other_ca_file: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca_cert, ca_key = create_ca("Audit Test CA")
    cert, key = issue_certificate(ca_cert, ca_key, "collector", server_names=["127.0.0.1", "localhost"])
    (d / "ca.pem").write_bytes(ca_cert)
    (d / "collector.pem").write_bytes(cert)
    (d / "collector.key").write_bytes(key)
    (d / "other-ca.pem").write_bytes(create_ca("Somebody Else's CA")[0])
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(d / "collector.pem", d / "collector.key")
    return Pki(d / "ca.pem", context, d / "other-ca.pem")


@pytest.fixture
def receiver(pki: Pki) -> Iterator[Receiver]:
    r = Receiver(pki.server_context)
    r.start()
    yield r
    r.stop()


@pytest.fixture
def repos(tmp_path: Path) -> Iterator[Repositories]:
    url = f"sqlite:///{tmp_path / 'index.sqlite3'}"
    migrate(url)
    repos = open_repositories(url)
    yield repos
    repos.close()


@pytest.fixture
def trail(repos: Repositories, tmp_path: Path) -> AuditTrail:
    return AuditTrail(repos.audit_log, Signer.load_or_create(tmp_path), tmp_path / "audit-head")


def event(n: int, outcome: Outcome = Outcome.SUCCESS) -> AuditEvent:
    return AuditEvent(
        EventID.INSTANCES_TRANSFERRED,
        Action.READ,
        outcome,
        (
            Participant("VIEWER", True, "Destination Role ID", address="10.0.0.7", ae_title="VIEWER"),
            Participant("SAFEPACS", False, "Source Role ID", ae_title="SAFEPACS"),
        ),
        (
            AuditObject(ObjectKind.PATIENT, f"P{n}", name="Doe^Jane"),
            AuditObject(ObjectKind.STUDY, f"1.2.3.{n}", sop_classes=(("1.2.840.10008.5.1.4.1.1.2", n),)),
        ),
        time=T0 + timedelta(seconds=n),
    )


def collector(port: int, ca_file: Path, name: str = "siem") -> AuditCollectorSettings:
    return AuditCollectorSettings(name=name, host="127.0.0.1", port=port, ca_file=str(ca_file))


def forwarder(
    repos: Repositories, port: int, ca_file: Path, name: str = "siem", signer: Signer | None = None
) -> Forwarder:
    return Forwarder(
        repos.audit_log,
        collector(port, ca_file, name),
        AuditSource("SAFEPACS", "Hospital"),
        signer=signer or Signer(Ed25519PrivateKey.generate()),
        timeout=2.0,
        ack_timeout=2.0,
        hostname="pacs.example.org",
    )


def _eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_every_record_arrives_in_order_as_rfc5424_over_tls(
    trail: AuditTrail, repos: Repositories, receiver: Receiver, pki: Pki
) -> None:
    trail.record(*(event(n) for n in range(1, 6)))
    trail.record(event(6, Outcome.MINOR_FAILURE))
    fwd = forwarder(repos, receiver.port, pki.ca_file, signer=trail.signer)
    try:
        assert fwd.forward() == 6
        assert fwd.forward() == 0  # nothing new: nothing sent again
    finally:
        fwd.close()
    got = receiver.wait_for(6)
    assert [m.patient for m in got] == [f"P{n}" for n in range(1, 7)]
    assert repos.audit_log.get_audit_cursor("siem") == 6
    for n, m in enumerate(got, start=1):
        assert m.pri == (10 * 8 + 5 if n < 6 else 10 * 8 + 4)  # authpriv.notice; authpriv.warning on failure
        assert m.timestamp == (T0 + timedelta(seconds=n)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        assert (m.hostname, m.app, m.msgid) == ("pacs.example.org", "safepacs", "IHE+RFC-3881")
        assert m.procid.isdigit()
        assert m.xml.tag == "AuditMessage"
    schema = etree.RelaxNG(etree.parse(str(SCHEMA_FILE)))
    assert all(schema.validate(m.xml) for m in got), schema.error_log
    # Each message names its record in the chain; the last of the batch carries the signed head.
    hashes = [r.hash for r in repos.audit_log.audit_records()]
    params = [structured_data(m.sd) for m in got]
    assert [(p["seq"], p["hash"]) for p in params] == [(str(n), hashes[n - 1]) for n in range(1, 7)]
    assert [("sig" in p) for p in params] == [False] * 5 + [True]
    head = SignedHead(6, params[-1]["hash"], params[-1]["time"], params[-1]["sig"])
    assert head.signed_by(trail.signer.public_key)
    time.sleep(0.1)
    assert len(receiver.messages) == 6 and receiver.connections == 1


def test_collector_outage_loses_nothing_and_sends_nothing_twice(
    trail: AuditTrail, repos: Repositories, receiver: Receiver, pki: Pki
) -> None:
    fwd = forwarder(repos, receiver.port, pki.ca_file)
    stop = threading.Event()
    thread = threading.Thread(target=fwd.run, args=(stop, 0.02, 0.1), daemon=True)
    thread.start()
    try:
        trail.record(*(event(n) for n in range(1, 6)))
        receiver.wait_for(5)
        _eventually(lambda: repos.audit_log.get_audit_cursor("siem") == 5)

        receiver.stop()  # the collector goes away; the trail goes on
        for n in range(6, 11):
            trail.record(event(n))
        time.sleep(0.4)  # several attempts fail meanwhile
        assert repos.audit_log.get_audit_cursor("siem") == 5

        receiver.start()  # same port
        receiver.wait_for(10)
        _eventually(lambda: repos.audit_log.get_audit_cursor("siem") == 10)
        trail.record(event(11))  # and forwarding goes on on the new connection
        receiver.wait_for(11)
    finally:
        stop.set()
        thread.join(5)
    assert not thread.is_alive()
    time.sleep(0.1)
    assert [m.patient for m in receiver.messages] == [f"P{n}" for n in range(1, 12)]
    assert receiver.connections == 2


def test_cursor_is_per_collector_and_resumes_where_it_stopped(
    trail: AuditTrail, repos: Repositories, receiver: Receiver, pki: Pki
) -> None:
    trail.record(*(event(n) for n in range(1, 4)))
    repos.audit_log.set_audit_cursor("siem", 2)  # as a previous run left it
    fwd, other = (
        forwarder(repos, receiver.port, pki.ca_file),
        forwarder(repos, receiver.port, pki.ca_file, "other"),
    )
    try:
        assert fwd.forward() == 1
        assert other.forward() == 3  # a new collector gets the whole trail
    finally:
        fwd.close()
        other.close()
    got = receiver.wait_for(4)
    assert sorted(m.patient for m in got) == ["P1", "P2", "P3", "P3"]


def test_collector_with_a_certificate_from_another_ca_gets_nothing(
    trail: AuditTrail, repos: Repositories, receiver: Receiver, pki: Pki
) -> None:
    trail.record(event(1))
    fwd = forwarder(repos, receiver.port, pki.other_ca_file)
    with pytest.raises(ssl.SSLCertVerificationError):
        fwd.forward()
    assert repos.audit_log.get_audit_cursor("siem") == 0
    time.sleep(0.1)
    assert receiver.messages == []


def test_unreadable_record_is_forwarded_as_a_security_alert(
    trail: AuditTrail, repos: Repositories, receiver: Receiver, pki: Pki
) -> None:
    trail.record(*(event(n) for n in range(1, 4)))
    with repos.db.engine.connect() as c:  # somebody edits the trail behind our back
        c.execute(sa.text("UPDATE audit_log SET body = 'not json' WHERE seq = 2"))
        c.commit()
    fwd = forwarder(repos, receiver.port, pki.ca_file)
    try:
        assert fwd.forward() == 3
    finally:
        fwd.close()
    got = receiver.wait_for(3)
    assert [m.patient for m in got] == ["P1", "safepacs-audit-trail#2", "P3"]
    alert = got[1].xml.find("EventIdentification/EventID")
    assert alert is not None and alert.get("csd-code") == "110113"
    assert got[1].pri == 10 * 8 + 4


def test_collectors_are_checked_at_start_up(tmp_path: Path, pki: Pki) -> None:
    ok = collector(6514, pki.ca_file)
    check_collectors(Settings(data_dir=tmp_path, audit={"collectors": [ok]}))  # type: ignore[arg-type]
    missing = collector(6514, tmp_path / "nope.pem")
    with pytest.raises(ConfigError, match=r"audit\.collectors\[1\]\.ca_file"):
        check_collectors(
            Settings(data_dir=tmp_path, audit={"collectors": [ok, missing.model_copy(update={"name": "b"})]})
        )  # type: ignore[arg-type]
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    with pytest.raises(ConfigError, match="no usable PEM"):
        check_collectors(Settings(data_dir=tmp_path, audit={"collectors": [collector(1, garbage)]}))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="used twice"):
        Settings(data_dir=tmp_path, audit={"collectors": [ok, ok]})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="together"):
        Settings(data_dir=tmp_path, audit={"collectors": [ok.model_copy(update={"client_cert": "c.pem"})]})  # type: ignore[arg-type]
    assert Settings(data_dir=tmp_path).audit.collectors == ()
    assert (
        collector(1, pki.ca_file).port == 1
        and AuditCollectorSettings(name="a", host="h", ca_file="f").port == 6514
    )
