"""What to change, per check and per product: each remediation names the product's own setting.

DCMTK answers for Orthanc as well (Orthanc does its DICOM networking with DCMTK and keeps DCMTK's
Implementation Class UID), so the DCMTK texts name both unless an HTTP answer told Orthanc apart.
"""

from __future__ import annotations

__all__ = ["remedy"]

_ORTHANC_PEERS = (
    "list the modalities allowed in 'DicomModalities', set 'DicomCheckCalledAet': true and "
    "'DicomCheckModalityHost': true"
)
_ORTHANC_DIMSE = f"Orthanc: {_ORTHANC_PEERS}"
_DCMQRSCP_PEERS = (
    "dcmqrscp: replace 'ANY' in the AETable of dcmqrscp.cfg with the symbolic names of the HostTable "
    "peers allowed"
)

_REMEDIES: dict[str, dict[str, str]] = {
    "dicom.associate-open": {
        "orthanc": f"{_ORTHANC_DIMSE}, and 'DicomAlwaysAllowEcho': false, 'DicomAlwaysAllowStore': false.",
        "dcmtk": f"{_DCMQRSCP_PEERS}. {_ORTHANC_DIMSE}, 'DicomAlwaysAllowEcho' and 'DicomAlwaysAllowStore' "
        "false (Orthanc answers as DCMTK).",
        "dcm4chee": "dcm4chee-arc: set 'dcmAcceptedCallingAETitle' (Accepted Calling AE Titles) on the "
        "archive AE, or restrict it to TLS connections with client certificates.",
        "safepacs": "SafePACS admits registered peers only: review them with 'safepacs peer list' and "
        "remove unknown ones with 'safepacs peer remove AE'.",
        "generic": "Accept associations only from known calling AE titles on known addresses, and "
        "preferably only over TLS with client certificates.",
    },
    "dicom.find-open": {
        "orthanc": "Orthanc: set 'DicomAlwaysAllowFind': false (and 'DicomAlwaysAllowFindWorklist': false), "
        f"{_ORTHANC_PEERS}; 'LimitFindResults' caps what one query returns.",
        "dcmtk": f"{_DCMQRSCP_PEERS}. Orthanc: 'DicomAlwaysAllowFind': false.",
        "dcm4chee": "dcm4chee-arc: restrict 'dcmAcceptedCallingAETitle' and use a secured (Keycloak) "
        "archive build; never expose the archive AE to untrusted networks.",
        "safepacs": "SafePACS: remove 'find' from peers that need not query ('safepacs peer add AE --host "
        "ADDR --allow echo,store' replaces the entry) and keep 'query.max_results' above 0.",
        "generic": "Allow C-FIND only to registered peers; limit the results a query may return.",
    },
    "dicom.worklist-open": {
        "orthanc": "Orthanc: set 'DicomAlwaysAllowFindWorklist': false and list the modalities in "
        "'DicomModalities'.",
        "generic": "Answer Modality Worklist queries only for registered modalities.",
    },
    "dicom.get-open": {
        "orthanc": f"Orthanc: set 'DicomAlwaysAllowGet': false and {_ORTHANC_PEERS}.",
        "dcmtk": f"{_DCMQRSCP_PEERS}, or start dcmqrscp with --disable-get. Orthanc: 'DicomAlwaysAllowGet': "
        "false.",
        "safepacs": "SafePACS: remove 'get' from peers that need not retrieve ('safepacs peer add' "
        "replaces the entry).",
        "generic": "Allow C-GET only to registered peers.",
    },
    "dicom.move-open": {
        "orthanc": "Orthanc: set 'DicomAlwaysAllowMove': false and list the move destinations in "
        "'DicomModalities'.",
        "dcmtk": "dcmqrscp: restrict move destinations (--move-aetitle or --move-host) and list only known "
        "peers in the HostTable. Orthanc: 'DicomAlwaysAllowMove': false.",
        "safepacs": "SafePACS: remove 'move' from peers that need not retrieve; destinations come only "
        "from the peer table ('safepacs peer add AE --port N').",
        "generic": "Check the move destination against the registered peer table before matching, and "
        "allow C-MOVE only to registered peers.",
    },
    "dicom.store-open": {
        "orthanc": f"Orthanc: set 'DicomAlwaysAllowStore': false and {_ORTHANC_PEERS}.",
        "dcmtk": f"{_DCMQRSCP_PEERS}; make the storage area read-only ('R' instead of 'RW') where nothing "
        "should be stored. Orthanc: 'DicomAlwaysAllowStore': false.",
        "safepacs": "SafePACS: remove 'store' from peers that only read ('safepacs peer add' replaces the "
        "entry).",
        "generic": "Accept C-STORE only from registered modalities and archives.",
    },
    "dicom.identity-not-enforced": {
        "safepacs": "SafePACS: bind the peer to a user ('safepacs peer add AE --user NAME').",
        "generic": "Verify User Identity Negotiation (PS3.7 D.3.3.7) credentials, or do not advertise "
        "that they are required.",
    },
    "dicom.no-tls": {
        "orthanc": "Orthanc: set 'DicomTlsEnabled': true with 'DicomTlsCertificate', 'DicomTlsPrivateKey', "
        "'DicomTlsTrustedCertificates' and 'DicomTlsRemoteCertificateRequired': true; then close the "
        "plain port to other networks.",
        "dcmtk": "dcmqrscp has no TLS: reach it only through a TLS tunnel (stunnel) or keep it on a "
        "closed network. Orthanc: 'DicomTlsEnabled': true.",
        "dcm4chee": "dcm4chee-arc: add a TLS connection (dicomTLSCipherSuite) to the archive AE on port "
        "2762 and remove the plain one.",
        "safepacs": "SafePACS: keep 'server.bind' on loopback or name each plain peer explicitly; "
        "prefer TLS peers.",
        "generic": "Offer DICOM over TLS (PS3.15 B.12 profile, port 2762) with client certificates and "
        "close the plain port to other networks.",
    },
    "dicom.access-control": {
        "generic": "AE titles travel in clear and can be spoofed: also restrict by address, or better, "
        "require TLS client certificates.",
    },
    "tls.old-version": {
        "orthanc": "Orthanc: set 'SslMinimumProtocolVersion' to TLS 1.2 (value 4) or newer.",
        "safepacs": "SafePACS accepts TLS 1.2 and 1.3 only: update it.",
        "generic": "Accept TLS 1.2 and 1.3 only (PS3.15 B.12, RFC 8996).",
    },
    "tls.weak-cipher": {
        "orthanc": "Orthanc: set 'SslCiphersAccepted' to the ECDHE AES-GCM suites only.",
        "safepacs": "SafePACS: restrict the HTTPS listener to ECDHE AES-GCM suites (report it).",
        "generic": "Offer only the PS3.15 B.12 suites for TLS 1.2: ECDHE-{RSA,ECDSA}-AES{128,256}-GCM "
        "(and DHE-RSA-AES-GCM); TLS 1.3 suites are all fine.",
    },
    "tls.certificate": {
        "safepacs": "SafePACS: distribute the CA of 'safepacs init' (keys/ca.pem) to clients, or scan "
        "with --ca-file; reissue the server certificate before it expires.",
        "generic": "Use a certificate issued by a CA the clients trust, valid now, naming the host.",
    },
    "tls.no-client-cert": {
        "orthanc": "Orthanc: set 'DicomTlsRemoteCertificateRequired': true and list the trusted peer "
        "certificates in 'DicomTlsTrustedCertificates'.",
        "generic": "Require client certificates of known peers on the DICOM TLS port.",
    },
    "tls.plain-beside-tls": {
        "orthanc": "Orthanc: once 'DicomTlsEnabled' is on, keep the plain DICOM port off untrusted "
        "networks (firewall).",
        "generic": "Close the plain DICOM port, or restrict it to the few legacy peers that need it.",
    },
    "http.orthanc-rest-open": {
        "orthanc": "Orthanc: set 'AuthenticationEnabled': true with 'RegisteredUsers' (or an "
        "authorization plugin), 'RemoteAccessAllowed': false unless needed, and 'SslEnabled': true.",
        "generic": "Require authentication on the REST API.",
    },
    "http.default-credentials": {
        "orthanc": "Orthanc: replace the 'orthanc' user in 'RegisteredUsers' with personal accounts and "
        "long random passwords.",
        "generic": "Change the default password.",
    },
    "http.dicomweb-open": {
        "orthanc": "Orthanc: 'AuthenticationEnabled': true (the DICOMweb plugin uses the REST API's "
        "authentication) or an authorization plugin.",
        "dcm4chee": "dcm4chee-arc: use the secured build (Keycloak) and protect the /rs endpoints.",
        "safepacs": "SafePACS always requires a token or session on DICOMweb: update it.",
        "generic": "Require authentication (OAuth 2 bearer tokens, IHE IUA) on QIDO, WADO and STOW.",
    },
    "http.wado-uri-open": {
        "orthanc": "Orthanc: 'AuthenticationEnabled': true.",
        "generic": "Require authentication on WADO-URI.",
    },
    "http.viewer-open": {
        "orthanc": "Orthanc: 'AuthenticationEnabled': true; do not expose Orthanc Explorer to untrusted "
        "networks.",
        "generic": "Put the web viewer behind a login.",
    },
    "http.plain": {
        "orthanc": "Orthanc: set 'SslEnabled': true with 'SslCertificate', or put a TLS reverse proxy "
        "in front and bind Orthanc to loopback.",
        "generic": "Serve the API over HTTPS only; redirect or close plain HTTP.",
    },
    "http.dir-listing": {
        "generic": "Turn off directory listings on the web server and move DICOM files out of its "
        "document root.",
    },
    "http.cors-credentials": {
        "orthanc": "Orthanc: remove the permissive CORS headers (reverse proxy or 'HttpHeaders' plugin "
        "settings).",
        "generic": "Allow cross-origin requests with credentials only for an explicit list of origins.",
    },
    "http.headers-missing": {
        "orthanc": "Orthanc: add the headers at a reverse proxy in front of it.",
        "generic": "Send Strict-Transport-Security (HTTPS), Content-Security-Policy, "
        "X-Content-Type-Options: nosniff and X-Frame-Options (or frame-ancestors).",
    },
    "vuln.cve": {
        "orthanc": "Upgrade Orthanc to a release that fixes these.",
        "dcmtk": "Upgrade DCMTK (or the product built on it, e.g. Orthanc) to a release that fixes these.",
        "generic": "Upgrade to a release that fixes these.",
    },
}


def family(product: str) -> str:
    low = product.lower()
    for key in ("orthanc", "safepacs", "dcm4che", "dcmtk"):
        if key in low:
            return "dcm4chee" if key == "dcm4che" else key
    return "generic"


def remedy(check: str, product: str = "") -> str:
    """The remediation of ``check`` for ``product`` (its own setting when known, else the generic one)."""
    texts = _REMEDIES.get(check, {})
    return texts.get(family(product)) or texts.get("generic", "")
