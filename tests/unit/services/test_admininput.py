"""services/admininput: the values the CLI and the administration pages accept and refuse alike, with
messages that name the field the caller's way."""

from __future__ import annotations

from datetime import timedelta

import pytest

from safepacs.auth.pki import certificate_fingerprint, create_ca, issue_certificate
from safepacs.errors import InputError
from safepacs.services import admininput
from safepacs.services.admininput import CLI_PEER_FIELDS, PeerEntry, new_peer
from safepacs.types import Service, TlsMode, UserIdentityMode

PAGE = {**CLI_PEER_FIELDS, "host": "Host", "allow": "Allowed services", "tls_off": "TLS off", "user": "User"}


def test_a_peer_is_normalised() -> None:
    peer, pin = new_peer(PeerEntry(" CT1 ", "10.1.2.3/24", ["Echo", " store", ""], 104, "alice"))
    assert (peer.ae_title, peer.host, peer.port, peer.user) == ("CT1", "10.1.2.0/24", 104, "alice")
    assert peer.allow == {Service.ECHO, Service.STORE} and peer.tls is TlsMode.REQUIRED and pin is None
    assert new_peer(PeerEntry("MR", "PACS.Example.org", ["find"]))[0].host == "pacs.example.org"


@pytest.mark.parametrize(
    ("entry", "cli", "page"),
    [
        (
            PeerEntry("CT", "not a host!", ["echo"]),
            "--host 'not a host!' is neither",
            "Host 'not a host!' is neither",
        ),
        (
            PeerEntry("CT", "10.0.0.1", []),
            "--allow needs at least one",
            "Allowed services needs at least one",
        ),
        (
            PeerEntry("CT", "10.0.0.1", ["delete"]),
            "unknown service 'delete' in --allow",
            "in Allowed services",
        ),
        (PeerEntry("CT", "10.0.0.1", ["echo"], 0), "--port must be between 1 and 65535", "--port"),
        (PeerEntry("", "10.0.0.1", ["echo"]), "is not a valid AE title", "is not a valid AE title"),
        (
            PeerEntry("CT", "10.0.0.1", ["echo"], tls="off", cert_fingerprint="ab" * 32),
            "drop --tls off or the pin",
            "drop TLS off or the pin",
        ),
        (
            PeerEntry("CT", "10.0.0.1", ["echo"], user="bob", user_identity="required"),
            "drop --user",
            "drop User",
        ),
        (PeerEntry("CT", "10.0.0.1", ["echo"], tls="maybe"), "--tls is one of", "--tls is one of"),
        (PeerEntry("CT", "10.0.0.1", ["echo"], cert_fingerprint="xyz"), "--cert-fingerprint:", "fingerprint"),
        (PeerEntry("CT", "10.0.0.1", ["echo"], cert_pem=b"junk"), "--cert is not a PEM", "not a PEM"),
    ],
)
def test_a_bad_peer_is_refused_naming_the_field(entry: PeerEntry, cli: str, page: str) -> None:
    with pytest.raises(InputError) as refused:
        new_peer(entry)
    assert cli in str(refused.value)
    with pytest.raises(InputError) as refused:
        new_peer(entry, PAGE)
    assert page in str(refused.value)


def test_a_pinned_certificate_gives_its_fingerprint() -> None:
    ca_cert, ca_key = create_ca()
    cert, _ = issue_certificate(ca_cert, ca_key, "DEVICE", client=True)
    digest = certificate_fingerprint(cert)
    peer, pin = new_peer(PeerEntry("CT", "10.0.0.1", ["store"], cert_pem=cert + ca_cert))
    assert pin is not None and pin.pem == cert and peer.cert_sha256 == digest
    with pytest.raises(InputError, match="name different certificates"):
        new_peer(PeerEntry("CT", "10.0.0.1", ["store"], cert_pem=cert, cert_fingerprint="ab" * 32))
    identity = new_peer(PeerEntry("CT", "10.0.0.1", ["store"], user_identity="optional"))[0].user_identity
    assert identity is UserIdentityMode.OPTIONAL


def test_users_tokens_and_access_values() -> None:
    assert admininput.user_name("a.b@c-d_e") == "a.b@c-d_e"
    for bad in ("", "-x", "a b", "x" * 65):
        with pytest.raises(InputError, match="a user name is 1-64"):
            admininput.user_name(bad)
    assert admininput.roles([" Admin", "auditor", ""], "--role") == {"admin", "auditor"}
    with pytest.raises(InputError, match="unknown role 'root'"):
        admininput.roles(["root"], "--role")
    with pytest.raises(InputError, match="Roles needs a role"):
        admininput.roles([], "Roles")
    assert admininput.token_scopes(None, "--scope") == frozenset()
    assert admininput.token_scopes(["find", "GET"], "--scope") == {"find", "get"}
    with pytest.raises(InputError, match="--scope is empty"):
        admininput.token_scopes([""], "--scope")
    assert admininput.lifetime("2w", "--expires") == timedelta(weeks=2)
    with pytest.raises(InputError, match=r"^Expires after: "):
        admininput.lifetime("forever", "Expires after")
    assert admininput.study_uid("1.2.840.1") == "1.2.840.1"
    with pytest.raises(InputError, match="not a valid Study Instance UID"):
        admininput.study_uid("1.2.x")
    seen = admininput.scope(["Main"], ["ct"], "Doe^Jane", ["trial"])
    assert (
        admininput.describe_scope(seen)
        == "institutions Main; modalities CT; referred by Doe^Jane; groups trial"
    )
    with pytest.raises(InputError, match="a group must be 1-64"):
        admininput.scope([], [], None, ["tri*"])
    with pytest.raises(InputError, match="give at least one"):
        admininput.scope([], [], None, [])
