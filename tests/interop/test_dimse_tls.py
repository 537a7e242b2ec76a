"""DICOM TLS, mutual authentication and User Identity Negotiation against a running server.

Real peers: DCMTK (``+tls key cert +cf ca``, ``storescu --user/--password/--jwt``), pynetdicom with
``tls_args`` and user identity items, and raw TLS clients for the protocol refusals.
"""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import stat
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography import x509
from pydicom.dataset import Dataset
from pynetdicom import build_context, build_role, evt
from pynetdicom.pdu_primitives import UserIdentityNegotiation
from pynetdicom.sop_class import CTImageStorage, Verification

from safepacs.app import open_repositories
from safepacs.audit import EventID, Outcome
from safepacs.auth.passwords import hash_password
from safepacs.auth.pki import certificate_fingerprint, create_ca, issue_certificate
from safepacs.cli.commands.serve import plain_peer_warning
from safepacs.db.database import migrate
from safepacs.protocols.dimse.admission import Credentials, SecureAdmission
from safepacs.types import Peer, Principal, PrincipalKind, Service, TlsMode, UserIdentityMode
from tests.support import oidc
from tests.support.audit_capture import AuditCapture
from tests.support.corpus import make_ct
from tests.support.dicom_client import FIND_CONTEXTS, associate, rejection
from tests.support.oidc import IdentityProvider
from tests.support.server import Server, dcmtk, run_cli, start_server
from tests.support.tls import context, issue, tls
from tests.support.web import _client, _token

REJECTED_PERMANENT, REJECTED_TRANSIENT, SERVICE_USER = 0x01, 0x02, 0x01
CALLING_AE_NOT_RECOGNIZED, NO_REASON = 0x03, 0x01
STRANGER = (REJECTED_PERMANENT, SERVICE_USER, CALLING_AE_NOT_RECOGNIZED)
IDENTITY_REFUSED = (REJECTED_PERMANENT, SERVICE_USER, NO_REASON)
GCM_TLS12 = {
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES256-GCM-SHA384",
}
PASSWORD = "correct horse battery staple"  # a test user's
idp = oidc.idp  # a JWKS endpoint over TLS on 127.0.0.1, for the JWT user identity


# Helpers -----------------------------------------------------------------------------------------------
def identity(kind: int, primary: bytes, secondary: bytes = b"", *, response: bool = False) -> Any:
    item = UserIdentityNegotiation()
    item.user_identity_type = kind
    item.primary_field = primary
    if secondary:
        item.secondary_field = secondary
    item.positive_response_requested = response
    return item


def echo_status(srv: Server, calling: str, **kwargs: Any) -> tuple[bool, Any]:
    """(established, assoc) of a C-ECHO association on the TLS port."""
    with associate(srv.tls_port, [build_context(Verification)], calling=calling, **kwargs) as assoc:
        if assoc.is_established:
            assert assoc.send_c_echo().Status == 0x0000
        return assoc.is_established, assoc


def handshake_refused(srv: Server, ctx: ssl.SSLContext) -> bool:
    """Whether the TLS port ends the handshake (with TLS 1.3 the client learns it on its first read)."""
    with socket.create_connection(("127.0.0.1", srv.tls_port), timeout=10) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as conn:
                conn.sendall(b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00")  # an A-RELEASE-RQ
                return conn.recv(1) == b""
        except (ssl.SSLError, ConnectionError):
            return True


def add_user(srv: Server, name: str, roles: str) -> None:
    repos = open_repositories(f"sqlite:///{(srv.data / 'index.sqlite3').resolve()}")
    try:
        repos.directory.add_user(name, hash_password(PASSWORD), frozenset(roles.split(",")))
    finally:
        repos.close()


def wait_for_log(srv: Server, text: str, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    while text not in srv.stderr_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    return srv.stderr_text()


def study_uids(srv: Server, calling: str, cert_dir: Path, ext_neg: list[Any] | None = None) -> set[str]:
    """A study-level C-FIND with universal matching over DICOM TLS."""
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = ""
    found: set[str] = set()
    with associate(
        srv.tls_port, FIND_CONTEXTS, calling=calling, tls_args=tls(context(srv, cert_dir)), ext_neg=ext_neg
    ) as assoc:
        assert assoc.is_established, rejection(assoc) if assoc.is_rejected else "aborted"
        for status, ds in assoc.send_c_find(identifier, FIND_CONTEXTS[1].abstract_syntax):
            assert status is not None and "Status" in status
            if status.Status in (0xFF00, 0xFF01):
                found.add(str(ds.StudyInstanceUID))
            else:
                assert status.Status == 0x0000
    return found


def store_over_tls(srv: Server, calling: str, cert_dir: Path, datasets: list[Dataset]) -> None:
    ctx = tls(context(srv, cert_dir))
    with associate(srv.tls_port, [build_context(CTImageStorage)], calling=calling, tls_args=ctx) as assoc:
        assert assoc.is_established
        for ds in datasets:
            assert assoc.send_c_store(ds).Status == 0x0000


# DICOM TLS with DCMTK ----------------------------------------------------------------------------------
@pytest.mark.dcmtk
def test_dcmtk_peers_over_tls(srv: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ct = make_ct(patient_id="TLS-1")
    ct.save_as(tmp_path / "ct.dcm", enforce_file_format=True)
    srv.add_peer("CT1", "echo,store", tls="required")
    srv.add_peer("VIEWER", "find,get", tls="required")
    ct1, viewer = issue(srv, "CT1", tmp_path / "ct1"), issue(srv, "VIEWER", tmp_path / "viewer")
    key_mode = stat.S_IMODE((ct1 / "key.pem").stat().st_mode)
    assert key_mode == 0o600
    assert (ct1 / "ca.pem").read_bytes() == srv.ca_file.read_bytes()
    cert = x509.load_pem_x509_certificate((ct1 / "cert.pem").read_bytes())
    assert cert.subject.rfc4514_string() == "CN=CT1"

    def over_tls(tool: str, creds: Path, *args: str) -> subprocess.CompletedProcess[str]:
        tls_opts = ["+tls", str(creds / "key.pem"), str(creds / "cert.pem"), "+cf", str(creds / "ca.pem")]
        return dcmtk(tool, *tls_opts, "-aec", "SAFEPACS", *args)

    result = over_tls("echoscu", ct1, "-aet", "CT1", srv.host, str(srv.tls_port))
    assert result.returncode == 0, result.stdout + result.stderr
    result = over_tls("storescu", ct1, "-aet", "CT1", srv.host, str(srv.tls_port), str(tmp_path / "ct.dcm"))
    assert result.returncode == 0, result.stdout + result.stderr
    result = over_tls(
        "findscu", viewer, "-aet", "VIEWER", "-S", "-k", "QueryRetrieveLevel=STUDY", "-k", "PatientID=TLS-1",
        "-k", "StudyInstanceUID", srv.host, str(srv.tls_port),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert ct.StudyInstanceUID in result.stdout + result.stderr

    # C-GET over TLS (DCMTK's getscu has no TLS): pynetdicom as the viewer.
    received: list[str] = []

    def on_store(event: Any) -> int:
        received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    get_model = "1.2.840.10008.5.1.4.1.2.2.3"  # Study Root Q/R GET
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = ct.StudyInstanceUID
    with associate(
        srv.tls_port,
        [build_context(get_model), build_context(CTImageStorage)],
        calling="VIEWER",
        tls_args=tls(context(srv, viewer)),
        ext_neg=[build_role(CTImageStorage, scp_role=True)],
        handlers=[(evt.EVT_C_STORE, on_store)],
    ) as assoc:
        assert assoc.is_established
        statuses = [s.Status for s, _ in assoc.send_c_get(identifier, get_model) if s is not None]
    assert statuses[-1] == 0x0000 and received == [ct.SOPInstanceUID]

    # Each association records how it came in, for the audit trail.
    log = wait_for_log(srv, certificate_fingerprint((ct1 / "cert.pem").read_bytes()))
    assert certificate_fingerprint((ct1 / "cert.pem").read_bytes()) in log
    assert "TLSv1.3" in log or "TLSv1.2" in log

    # The same DCMTK peer, plain: refused like a stranger.
    result = dcmtk("echoscu", "-aet", "CT1", "-aec", "SAFEPACS", srv.host, str(srv.port))
    assert result.returncode != 0 and "Calling AE Title Not Recognized" in result.stdout + result.stderr

    capsys.readouterr()
    assert run_cli("peer", "list", "--data", str(srv.data)) == 0
    listing = capsys.readouterr().out
    assert "tls required" in listing


# The TLS profile -----------------------------------------------------------------------------------------
def _raw_handshake(srv: Server, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    sock = socket.create_connection(("127.0.0.1", srv.tls_port), timeout=10)
    return ctx.wrap_socket(sock)


def test_tls_profile_is_bcp195(srv: Server, tmp_path: Path) -> None:
    srv.add_peer("CT1", "echo", tls="required")
    creds = issue(srv, "CT1", tmp_path / "ct1")

    # TLS 1.3, and TLS 1.2 with each AES-GCM suite the ECDSA server certificate can use.
    assert echo_status(srv, "CT1", tls_args=tls(context(srv, creds)))[0]
    for suite in ("ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384"):
        ctx = context(srv, creds, maximum=ssl.TLSVersion.TLSv1_2, ciphers=suite)
        with associate(srv.tls_port, [build_context(Verification)], calling="CT1", tls_args=tls(ctx)) as a:
            assert a.is_established
            conn = a.dul.socket.socket
            assert conn.version() == "TLSv1.2" and conn.cipher()[0] == suite
            assert conn.cipher()[0] in GCM_TLS12

    # TLS 1.2 suites outside the profile: CBC, ChaCha20, no forward secrecy.
    for suite in ("ECDHE-ECDSA-AES128-SHA256", "ECDHE-ECDSA-CHACHA20-POLY1305", "AES128-GCM-SHA256"):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_ciphers(suite)
        with pytest.raises(ssl.SSLError):
            _raw_handshake(srv, ctx).close()

    # TLS 1.1 (and older): the server answers with a protocol_version alert.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        old.set_ciphers("DEFAULT:@SECLEVEL=0")
        old.minimum_version = ssl.TLSVersion.TLSv1_1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises(ssl.SSLError, match=r"PROTOCOL_VERSION|UNSUPPORTED_PROTOCOL|unsupported protocol"):
        _raw_handshake(srv, old).close()
    assert "TLS handshake failed" in wait_for_log(srv, "TLS handshake failed")


# Certificates --------------------------------------------------------------------------------------------
def test_certificates_that_do_not_prove_the_peer_are_refused(srv: Server, tmp_path: Path) -> None:
    srv.add_peer("CT1", "echo", tls="required")
    srv.add_peer("CT2", "echo", tls="required")
    srv.add_peer("LEGACY", "echo")  # --tls off
    ct1, ct2 = issue(srv, "CT1", tmp_path / "ct1"), issue(srv, "CT2", tmp_path / "ct2")
    assert echo_status(srv, "CT1", tls_args=tls(context(srv, ct1)))[0]

    # No client certificate: the handshake completes, the association is refused like a stranger's.
    ok, assoc = echo_status(srv, "CT1", tls_args=tls(context(srv)))
    assert not ok and rejection(assoc) == STRANGER

    # A certificate for CT1 from another CA: the handshake fails.
    other_ca, other_key = create_ca("Another CA")
    cert, key = issue_certificate(other_ca, other_key, "CT1", client=True)
    (tmp_path / "other.pem").write_bytes(cert)
    (tmp_path / "other.key").write_bytes(key)
    assert handshake_refused(srv, context(srv, cert_pair=(tmp_path / "other.pem", tmp_path / "other.key")))
    assert "TLS handshake failed" in wait_for_log(srv, "TLS handshake failed")

    # CT2's certificate presented as CT1.
    ok, assoc = echo_status(srv, "CT1", tls_args=tls(context(srv, ct2)))
    assert not ok and rejection(assoc) == STRANGER

    # A TLS-required peer on the plain port.
    with associate(srv.port, [build_context(Verification)], calling="CT1") as assoc:
        assert assoc.is_rejected and rejection(assoc) == STRANGER
    # A legacy peer registered --tls off still talks plain (and over TLS needs a certificate too).
    with associate(srv.port, [build_context(Verification)], calling="LEGACY") as assoc:
        assert assoc.is_established
    assert not echo_status(srv, "LEGACY", tls_args=tls(context(srv)))[0]

    # Revoked: refused at the next association, without a restart.
    assert run_cli("peer", "revoke-cert", "CT1", "--data", str(srv.data)) == 0
    ok, assoc = echo_status(srv, "CT1", tls_args=tls(context(srv, ct1)))
    assert not ok and rejection(assoc) == STRANGER
    log = wait_for_log(srv, "the client certificate was revoked")
    assert "the client certificate was revoked" in log
    assert "no client certificate presented over DICOM TLS" in log
    assert "issued to another AE title" in log
    assert "a TLS-required peer connected to the plain DICOM port" in log
    # A new certificate works again; the revoked one stays refused.
    new = issue(srv, "CT1", tmp_path / "ct1-new")
    assert echo_status(srv, "CT1", tls_args=tls(context(srv, new)))[0]
    assert not echo_status(srv, "CT1", tls_args=tls(context(srv, ct1)))[0]


def test_pinned_certificates(srv: Server, tmp_path: Path) -> None:
    # A vendor's device brings its own certificate (another CA): pinned with --cert, trusted for it only.
    vendor_ca, vendor_key = create_ca("Vendor CA")
    cert, key = issue_certificate(vendor_ca, vendor_key, "device-0815", client=True)
    (tmp_path / "vendor.pem").write_bytes(cert)
    (tmp_path / "vendor.key").write_bytes(key)
    pair = (tmp_path / "vendor.pem", tmp_path / "vendor.key")
    srv.add_peer("US1", "echo", tls="required", extra=("--cert", str(tmp_path / "vendor.pem")))
    srv.add_peer("US2", "echo", tls="required")
    assert echo_status(srv, "US1", tls_args=tls(context(srv, cert_pair=pair)))[0]
    # ...not for another AE title, whatever its CN says.
    ok, assoc = echo_status(srv, "US2", tls_args=tls(context(srv, cert_pair=pair)))
    assert not ok and rejection(assoc) == STRANGER
    # A SafePACS certificate issued to US1 is not the pinned one.
    ours = issue(srv, "US1", tmp_path / "us1")
    ok, assoc = echo_status(srv, "US1", tls_args=tls(context(srv, ours)))
    assert not ok and rejection(assoc) == STRANGER

    # --cert-fingerprint pins one of two certificates from our CA (colons and upper case accepted).
    first, second = issue(srv, "US2", tmp_path / "a"), issue(srv, "US2", tmp_path / "b")
    digest = certificate_fingerprint((second / "cert.pem").read_bytes())
    colons = ":".join(digest[i : i + 2] for i in range(0, 64, 2)).upper()
    assert run_cli("peer", "remove", "US2", "--data", str(srv.data)) == 0
    srv.add_peer("US2", "echo", tls="required", extra=("--cert-fingerprint", colons))
    assert echo_status(srv, "US2", tls_args=tls(context(srv, second)))[0]
    assert not echo_status(srv, "US2", tls_args=tls(context(srv, first)))[0]

    # Revoking the vendor's pinned certificate.
    assert run_cli("peer", "revoke-cert", "US1", "--data", str(srv.data)) == 0
    assert handshake_refused(srv, context(srv, cert_pair=pair))  # no longer a trust anchor


def test_peer_options_and_cert_command(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = str(data_dir)
    add = ["peer", "add", "X", "--host", "127.0.0.1", "--allow", "echo"]
    assert run_cli("peer", "add", "CT1", "--host", "127.0.0.1", "--allow", "echo", "--data", d) == 0
    assert run_cli("peer", "cert", "CT1", "--out", str(tmp_path / "c"), "--data", d) == 0
    assert run_cli("peer", "cert", "CT1", "--out", str(tmp_path / "c"), "--data", d) == 2  # no overwrite
    assert "exists already" in capsys.readouterr().err
    for args, words in [
        (["peer", "cert", "NOPE", "--out", str(tmp_path / "n")], "no peer with AE title"),
        ([*add, "--cert-fingerprint", "abc"], "64 hex digits"),
        ([*add, "--tls", "off", "--cert-fingerprint", "ab" * 32], "needs DICOM TLS"),
        ([*add, "--cert", str(tmp_path / "c" / "key.pem")], "not a PEM certificate"),
        ([*add, "--user", "admin", "--user-identity", "required"], "drop --user"),
    ]:
        assert run_cli(*args, "--data", d) == 2
        assert words in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_cli(*add, "--tls", "maybe", "--data", d)
    capsys.readouterr()
    assert run_cli("peer", "list", "--data", d) == 0
    assert "tls required" in capsys.readouterr().out
    assert run_cli("peer", "revoke-cert", "CT1", "--data", d) == 0
    assert run_cli("peer", "revoke-cert", "CT1", "--data", d) == 1  # nothing left to revoke


def test_existing_peers_keep_plain_dicom_after_the_migration(tmp_path: Path) -> None:
    from alembic import command
    from alembic.config import Config

    import safepacs.db.database as index_module

    url = f"sqlite:///{tmp_path / 'old.sqlite3'}"
    config = Config()
    config.set_main_option("script_location", str(Path(index_module.__file__).parent / "migrations"))
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "0005")
        conn.execute(
            sa.text(
                "INSERT INTO peers (ae_title, host, port, allow, created_at) "
                "VALUES ('OLDCT', '10.0.0.5/32', NULL, 'store', '2025-01-01 00:00:00')"
            )
        )
    engine.dispose()
    migrate(url)
    repos = open_repositories(url)
    try:
        old = repos.directory.get_peer("OLDCT")
        assert old is not None and old.tls is TlsMode.OFF and old.user_identity is UserIdentityMode.NONE
        repos.directory.add_peer(Peer("NEWCT", "10.0.0.6", None, frozenset({Service.STORE})))
        new = repos.directory.get_peer("NEWCT")
        assert new is not None and new.tls is TlsMode.REQUIRED
        with repos.db.engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO peers (ae_title, host, allow, created_at) "
                    "VALUES ('RAW', '10.0.0.7', 'echo', '2025-01-01 00:00:00')"
                )
            )
        raw = repos.directory.get_peer("RAW")
        assert raw is not None and raw.tls is TlsMode.REQUIRED  # the column's default for new rows
    finally:
        repos.close()


def test_posture_warning_names_the_plain_peers() -> None:
    tls_peer = Peer("CT1", "10.0.0.5", None, frozenset({Service.STORE}))
    legacy = Peer("OLDUS", "10.0.0.6", None, frozenset({Service.STORE}), tls=TlsMode.OFF)
    assert plain_peer_warning([tls_peer]) is None
    warning = plain_peer_warning([tls_peer, legacy])
    assert warning is not None and "OLDUS" in warning and "CT1" not in warning


# C-MOVE to a TLS peer ---------------------------------------------------------------------------------
@pytest.mark.dcmtk
def test_c_move_to_a_tls_peer_uses_tls_and_our_client_certificate(srv: Server, tmp_path: Path) -> None:
    ct = make_ct(patient_id="MOVE-1")
    srv.add_peer("CT1", "store", tls="required")
    store_over_tls(srv, "CT1", issue(srv, "CT1", tmp_path / "ct1"), [ct])
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        scp_port = probe.getsockname()[1]
    srv.add_peer("DEST", "echo", port=scp_port, tls="required")
    dest = issue(srv, "DEST", tmp_path / "dest")  # serverAuth + SAN 127.0.0.1: DEST listens for us
    srv.add_peer("VIEWER", "move", tls="required")
    viewer = issue(srv, "VIEWER", tmp_path / "viewer")
    received = tmp_path / "received"
    received.mkdir()
    scp = subprocess.Popen(
        ["storescp", "+tls", str(dest / "key.pem"), str(dest / "cert.pem"), "+cf", str(dest / "ca.pem"),
         "-aet", "DEST", "-od", str(received), str(scp_port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        time.sleep(0.5)
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        identifier.StudyInstanceUID = ct.StudyInstanceUID
        model = "1.2.840.10008.5.1.4.1.2.2.2"  # Study Root Q/R MOVE
        ctx = tls(context(srv, viewer))
        with associate(srv.tls_port, [build_context(model)], calling="VIEWER", tls_args=ctx) as assoc:
            assert assoc.is_established
            final = [s for s, _ in assoc.send_c_move(identifier, "DEST", model) if s and s.Status != 0xFF00]
        assert final[-1].Status == 0x0000, final
        assert len(list(received.iterdir())) == 1

        # DEST's certificate revoked: the sub-association is refused, nothing is sent.
        assert run_cli("peer", "revoke-cert", "DEST", "--data", str(srv.data)) == 0
        with associate(srv.tls_port, [build_context(model)], calling="VIEWER", tls_args=ctx) as assoc:
            final = [s for s, _ in assoc.send_c_move(identifier, "DEST", model) if s and s.Status != 0xFF00]
        assert final[-1].Status != 0x0000
        assert len(list(received.iterdir())) == 1
        assert "C-MOVE destination refused" in wait_for_log(srv, "C-MOVE destination refused")
    finally:
        scp.terminate()
        scp.wait(10)
        if scp.stdout is not None:
            scp.stdout.close()


# User identity ---------------------------------------------------------------------------------------
@pytest.mark.dcmtk
def test_dcmtk_storescu_with_username_and_password(
    srv: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    add_user(srv, "tech", "technologist")
    srv.add_peer("CT1", "store", tls="required", extra=("--user-identity", "required"))
    ct1 = issue(srv, "CT1", tmp_path / "ct1")
    make_ct(patient_id="UID-1").save_as(tmp_path / "ct.dcm", enforce_file_format=True)
    base = ["storescu", "+tls", str(ct1 / "key.pem"), str(ct1 / "cert.pem"), "+cf", str(ct1 / "ca.pem"),
            "-aet", "CT1", "-aec", "SAFEPACS"]  # fmt: skip
    target = [srv.host, str(srv.tls_port), str(tmp_path / "ct.dcm")]
    ok = dcmtk(*base, "--user", "tech", "--password", PASSWORD, "--pos-response", *target)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    wrong = dcmtk(*base, "--user", "tech", "--password", "not the password", *target)
    assert wrong.returncode != 0 and "Rejected Permanent" in wrong.stdout + wrong.stderr
    none = dcmtk(*base, *target)
    assert none.returncode != 0 and "Rejected Permanent" in none.stdout + none.stderr
    log = wait_for_log(srv, "this peer must send a user identity")
    assert "user_identity=password" in log and "acting_for=tech" in log

    # The audit trail has what the handshake and the user identity proved, for each association.
    fingerprint = certificate_fingerprint((ct1 / "cert.pem").read_bytes())
    repos = open_repositories(f"sqlite:///{(srv.data / 'index.sqlite3').resolve()}")
    try:
        capture = AuditCapture(repos.audit_log)
        capture.start = 0
        nodes = capture.events(EventID.SECURITY_ALERT, "110126")
        stored = capture.events(EventID.INSTANCES_ACCESSED)
    finally:
        repos.close()
    accepted, wrong_password, anonymous = nodes
    assert [e.outcome for e in nodes] == [Outcome.SUCCESS, Outcome.MINOR_FAILURE, Outcome.MINOR_FAILURE]
    for event in nodes:
        (who,) = [p for p in event.participants if p.requestor]
        assert (who.user_id, who.address, who.certificate_sha256) == ("CT1", "127.0.0.1", fingerprint)
    detail = dict(accepted.objects[0].detail)
    assert detail["Transport"].startswith("DICOM TLS TLSv1.") and detail["User Identity"] == "tech (password)"
    assert dict(wrong_password.objects[0].detail)["User Identity"] == "offered, not accepted"
    assert "User Identity" not in dict(anonymous.objects[0].detail)
    (store,) = stored
    assert store.user_ids == ("CT1", "tech")  # the peer, and the person it acted for
    capsys.readouterr()
    assert run_cli("audit", "query", "--user", "tech", "--format", "json", "--data", str(srv.data)) == 0
    (row,) = [r for r in json.loads(capsys.readouterr().out) if r["event"].startswith("110103")]
    assert row["who"] == "CT1 (for tech)" and f"certificate SHA-256 {fingerprint}" in row["device"]


def test_user_identity_refusals_and_lockout(data_dir: Path, tmp_path: Path) -> None:
    srv = start_server(
        data_dir, env={"SAFEPACS_SERVER__WORKERS": "1", "SAFEPACS_AUTH__MAX_FAILED_LOGINS": "2"}
    )
    try:
        add_user(srv, "rad", "radiologist")
        add_user(srv, "tech", "technologist")
        srv.add_peer("VIEWER", "echo,find", tls="required", extra=("--user-identity", "optional"))
        srv.add_peer("LOCAL", "echo", extra=("--user-identity", "required"))  # plain, loopback
        viewer = issue(srv, "VIEWER", tmp_path / "viewer")
        ctx = tls(context(srv, viewer))

        def attempt(item: Any, calling: str = "VIEWER", secure: bool = True) -> Any:
            """ "accepted", or the (result, source, reason) of the rejection."""
            port = srv.tls_port if secure else srv.port
            kwargs: dict[str, Any] = {"tls_args": ctx} if secure else {}
            contexts = [build_context(Verification)]
            with associate(port, contexts, calling=calling, ext_neg=[item], **kwargs) as assoc:
                return "accepted" if assoc.is_established else rejection(assoc)

        # Optional: without an identity the association acts as the peer; with one, as that person.
        assert echo_status(srv, "VIEWER", tls_args=ctx)[0]
        assert attempt(identity(2, b"rad", PASSWORD.encode(), response=True)) == "accepted"
        assert attempt(identity(2, b"rad", b"wrong password!")) == IDENTITY_REFUSED
        assert attempt(identity(1, b"rad")) == IDENTITY_REFUSED  # a name is no proof
        assert attempt(identity(2, b"nobody", b"whatever")) == IDENTITY_REFUSED
        # Credentials over plain DICOM from loopback are accepted; a required identity must be sent.
        assert attempt(identity(2, b"tech", PASSWORD.encode()), "LOCAL", secure=False) == "accepted"
        with associate(srv.port, [build_context(Verification)], calling="LOCAL") as assoc:
            assert rejection(assoc) == IDENTITY_REFUSED
        # Lockout, as for a web login: after 2 failures even the right password is refused.
        assert attempt(identity(2, b"tech", b"wrong password!")) == IDENTITY_REFUSED
        assert attempt(identity(2, b"tech", b"wrong password!")) == IDENTITY_REFUSED
        assert attempt(identity(2, b"tech", PASSWORD.encode())) == IDENTITY_REFUSED
        log = wait_for_log(srv, "locked")
        assert "an account was locked" in log
        assert PASSWORD not in log and "wrong password!" not in log
    finally:
        srv.stop()


def test_c_find_with_user_identity_sees_what_qido_rs_shows_the_same_user(
    srv: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    house = make_ct(patient_id="P1", ReferringPhysicianName="House^Gregory")
    wilson = make_ct(patient_id="P2", ReferringPhysicianName="Wilson^James")
    srv.add_peer("CT1", "store", tls="required")
    store_over_tls(srv, "CT1", issue(srv, "CT1", tmp_path / "ct1"), [house, wilson])
    add_user(srv, "house", "referrer")
    add_user(srv, "rad", "radiologist")
    assert (
        run_cli("access", "scope", "house", "--referring-physician", "House^Gregory", "--data", str(srv.data))
        == 0
    )
    srv.add_peer("VIEWER", "find,get", tls="required", extra=("--user-identity", "required"))
    viewer = issue(srv, "VIEWER", tmp_path / "viewer")

    def qido(user: str) -> set[str]:
        with _client(srv, _token(srv.data, user, capsys)) as client:
            r = client.get("/dicomweb/studies")
            assert r.status_code == 200, r.text
            return {item["0020000D"]["Value"][0] for item in r.json()}

    as_house = [identity(2, b"house", PASSWORD.encode())]
    as_rad = [identity(2, b"rad", PASSWORD.encode())]
    assert study_uids(srv, "VIEWER", viewer, as_house) == qido("house") == {house.StudyInstanceUID}
    everything = {house.StudyInstanceUID, wilson.StudyInstanceUID}
    assert study_uids(srv, "VIEWER", viewer, as_rad) == qido("rad") == everything


def test_jwt_user_identity(data_dir: Path, tmp_path: Path, idp: IdentityProvider) -> None:
    env = {"SAFEPACS_SERVER__WORKERS": "1", "SAFEPACS_AUTH__OIDC": json.dumps([idp.settings()])}
    srv = start_server(data_dir, env=env)
    try:
        srv.add_peer("VIEWER", "echo,find", tls="required", extra=("--user-identity", "required"))
        viewer = issue(srv, "VIEWER", tmp_path / "viewer")
        good = [identity(5, idp.token().encode(), response=True)]
        assert study_uids(srv, "VIEWER", viewer, good) == set()
        expired = [identity(5, idp.token(exp=int(time.time()) - 120).encode())]
        with associate(
            srv.tls_port, FIND_CONTEXTS, calling="VIEWER", tls_args=tls(context(srv, viewer)), ext_neg=expired
        ) as assoc:
            assert rejection(assoc) == IDENTITY_REFUSED
        log = wait_for_log(srv, "the token has expired")
        assert "user_identity=jwt" in log and "acting_for=u-1234" in log
        assert "the token has expired" in log

        if shutil.which("storescu") is not None:
            srv.add_peer("CT1", "echo,store", tls="required", extra=("--user-identity", "required"))
            ct1 = issue(srv, "CT1", tmp_path / "ct1")
            (tmp_path / "token.jwt").write_text(idp.token(realm_access={"roles": ["pacs-tech"]}))
            make_ct(patient_id="JWT-1").save_as(tmp_path / "ct.dcm", enforce_file_format=True)
            result = dcmtk(
                "storescu", "+tls", str(ct1 / "key.pem"), str(ct1 / "cert.pem"), "+cf", str(ct1 / "ca.pem"),
                "-aet", "CT1", "-aec", "SAFEPACS", "--jwt", str(tmp_path / "token.jwt"),
                srv.host, str(srv.tls_port), str(tmp_path / "ct.dcm"),
            )  # fmt: skip
            assert result.returncode == 0, result.stdout + result.stderr
    finally:
        srv.stop()


# Admission rules without a server ---------------------------------------------------------------------
def test_credentials_over_plain_dicom_from_the_network_are_refused() -> None:
    peer = Peer(
        "WS1", "10.0.0.0/24", None, frozenset({Service.FIND}), tls=TlsMode.OFF,
        user_identity=UserIdentityMode.OPTIONAL,
    )  # fmt: skip
    principal = Principal(
        kind=PrincipalKind.PEER, name="WS1", allow=frozenset({Service.FIND}), address="10.0.0.9"
    )
    never = SecureAdmission(authenticate=lambda *_: pytest.fail("must not be checked"))
    creds = Credentials(2, b"rad", b"secret", False)
    verdict = never.admit(peer, principal, "10.0.0.9", None, creds)
    assert verdict[0] is None and verdict[1] == IDENTITY_REFUSED
    assert "plain connection" in verdict[2]
    # Without credentials the legacy peer is admitted as itself.
    assert never.admit(peer, principal, "10.0.0.9", None, None)[0] == principal
    # A TLS-required peer on the plain port, and a TLS session where no TLS is configured: refused.
    required = Peer("WS2", "10.0.0.9", None, frozenset({Service.FIND}))
    assert never.admit(required, principal, "10.0.0.9", None, None)[1] == STRANGER
