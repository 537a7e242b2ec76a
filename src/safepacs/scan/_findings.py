"""From what the probes saw to findings: severity, one-line title, detail with counts, remediation.

Severity, as the issue defines it: critical when a stranger can list (C-FIND, QIDO, REST) or retrieve
(C-GET, C-MOVE, WADO accepted) patient data, whether anything is listed now or not; high when a stranger
can associate or store, or a port that serves patient data (plain DICOM, even one that refuses
strangers: it serves its peers) or credentials has no TLS.  Transport findings on loopback addresses are
lowered: that traffic never leaves the machine.
"""

from __future__ import annotations

from dataclasses import replace

from safepacs.scan._dicom import DicomResult
from safepacs.scan._http import HttpResult
from safepacs.scan._model import Endpoint, Finding, Severity
from safepacs.scan._remedies import remedy
from safepacs.scan._tls import TlsResult, is_broken_cipher, is_weak_cipher
from safepacs.scan._wire import DicomAnswer
from safepacs.scan.fingerprint import Product, known_cves

__all__ = ["cve_findings", "dicom_findings", "http_findings", "rejection_text", "tls_findings"]

_RESULT = {1: "rejected-permanent", 2: "rejected-transient"}
_REASONS = {
    1: {
        1: "no reason given",
        2: "application context name not supported",
        3: "calling AE title not recognized",
        7: "called AE title not recognized",
    },
    2: {1: "no reason given", 2: "protocol version not supported"},
    3: {1: "temporary congestion", 2: "local limit exceeded"},
}
_SOURCES = {1: "service-user", 2: "service-provider (ACSE)", 3: "service-provider (presentation)"}


def rejection_text(a: DicomAnswer) -> str:
    """PS3.8 9.3.4 in words: ``rejected-permanent by service-user: called AE title not recognized``."""
    if a.pdu == 7:
        return "aborted (A-ABORT)"
    if a.pdu != 3:
        return "no DICOM answer"
    reason = _REASONS.get(a.source, {}).get(a.reason, f"reason {a.reason}")
    source = _SOURCES.get(a.source, f"source {a.source}")
    return f"{_RESULT.get(a.result, f'result {a.result}')} by {source}: {reason}"


def _finding(
    ep: Endpoint, check: str, severity: Severity, title: str, detail: str, **evidence: object
) -> Finding:
    rem_check = check.split(":", 1)[0]
    return Finding(
        check=rem_check,
        severity=severity,
        target=ep.label,
        title=title,
        detail=detail,
        remediation=remedy(rem_check, ep.product),
        service=ep.service,
        product=ep.display_product,
        evidence={k: v for k, v in evidence.items() if isinstance(v, int | str | bool) or v is None},
    )


def _count(n: int | None, capped: bool = False, noun: str = "studies") -> str:
    if n is None:
        return f"an unknown number of {noun}"
    return f"{'at least ' if capped else ''}{n} {noun}"


def dicom_findings(
    ep: Endpoint, r: DicomResult, *, loopback: bool, intrusive: bool, tls: bool = False
) -> list[Finding]:
    out: list[Finding] = []
    tried = len(r.attempts)
    if r.accepted_called is None:
        last = r.attempts[-1][1] if r.attempts else DicomAnswer(0)
        if last.pdu == 3 and last.source == 1 and last.reason == 3:
            text = (
                f"Called AE title {r.attempts[-1][0]!r} is right, but the random calling AE title was "
                "rejected: the calling AE title is checked."
            )
        elif all(a.pdu == 3 and a.source == 1 and a.reason == 7 for _, a in r.attempts) and tried:
            text = f"None of the {tried} called AE titles tried was accepted: the called AE title is checked."
        else:
            text = f"Association refused: {rejection_text(last)}."
        out.append(
            _finding(
                ep,
                "dicom.access-control",
                Severity.INFO,
                "DICOM associations from strangers are refused",
                text,
                called_ae_titles_tried=tried,
                rejection=rejection_text(last),
            )
        )
        if r.bogus_identity_accepted:
            out.append(
                _finding(
                    ep,
                    "dicom.identity-not-enforced",
                    Severity.HIGH,
                    "An association with a bogus username and password is accepted",
                    "Associations without User Identity were refused, but one carrying a made-up "
                    "username and passcode (PS3.7 D.3.3.7) was accepted: the credentials are not checked.",
                    called_ae=r.identity_called,
                )
            )
            if r.identity_called is not None:
                out += _access_findings(
                    ep,
                    r,
                    intrusive=intrusive,
                    through="(Through an association carrying a made-up username and passcode.)",
                )
        # High: the port serves patient data to its legitimate peers, in clear (off loopback).
        sev = Severity.INFO if loopback else Severity.HIGH
        if tls:
            return out
        out.append(
            _finding(
                ep,
                "dicom.no-tls",
                sev,
                "DICOM without TLS",
                "The port speaks plain DICOM: AE titles, identifiers and images of legitimate peers travel "
                "in clear, and AE-title checks can be spoofed from the network.",
                loopback=loopback,
            )
        )
        return out

    called = r.accepted_called
    echo = "C-ECHO answered" if r.echo else "C-ECHO not answered"
    out.append(
        _finding(
            ep,
            "dicom.associate-open",
            Severity.HIGH,
            "Any calling AE title may associate",
            f"An association from a random calling AE title to called AE {called!r} was accepted ({echo}).",
            called_ae=called,
            echo=r.echo,
        )
    )
    out += _access_findings(ep, r, intrusive=intrusive)
    if tls:
        return out
    sev = Severity.LOW if loopback else Severity.HIGH
    out.append(
        _finding(
            ep,
            "dicom.no-tls",
            sev,
            "DICOM without TLS on a port that serves strangers",
            "Associations, identifiers and images travel in clear.",
            loopback=loopback,
        )
    )
    return out


def _access_findings(ep: Endpoint, r: DicomResult, *, intrusive: bool, through: str = "") -> list[Finding]:
    """What a stranger could do on an accepted association: list, read the worklist, retrieve, store.

    ``through`` is said after each detail (how the association was had, when not by any AE title)."""
    out: list[Finding] = []
    listed = bool(r.studies or r.patients)
    if r.studies is not None or r.patients is not None:
        images = (
            f", {_count(r.images, r.studies_capped or not r.images_complete, 'images')}"
            if r.images is not None
            else ", image count not reported"
        )
        detail = (
            "Study Root C-FIND at study level with universal matching returned "
            f"{_count(r.studies, r.studies_capped)}{images}"
        )
        if r.patients is not None:
            detail += (
                "; Patient Root C-FIND at patient level returned "
                f"{_count(r.patients, r.patients_capped, 'patients')}"
            )
        detail += "."
        if r.find_incomplete:
            detail += " The peer stopped answering partway: the counts are minimums."
        if listed:
            out.append(
                _finding(
                    ep,
                    "dicom.find-open",
                    Severity.CRITICAL,
                    "A stranger can list patient data (C-FIND)",
                    detail,
                    studies=r.studies,
                    images=r.images,
                    patients=r.patients,
                    capped=r.studies_capped,
                    patients_capped=r.patients_capped,
                    incomplete=r.find_incomplete,
                )
            )
        else:
            out.append(
                _finding(
                    ep,
                    "dicom.find-open",
                    Severity.HIGH,
                    "A stranger may query (C-FIND), no matches now",
                    detail,
                    studies=r.studies,
                    patients=r.patients,
                )
            )
    if r.worklist:
        out.append(
            _finding(
                ep,
                "dicom.worklist-open",
                Severity.CRITICAL,
                "A stranger can read the Modality Worklist",
                "Modality Worklist C-FIND returned "
                f"{_count(r.worklist, r.worklist_capped, 'scheduled steps')}.",
                worklist_items=r.worklist,
                capped=r.worklist_capped,
            )
        )
    elif r.worklist == 0:
        out.append(
            _finding(
                ep,
                "dicom.worklist-open",
                Severity.MEDIUM,
                "A stranger may query the Modality Worklist",
                "Modality Worklist C-FIND is answered (no items now).",
                worklist_items=0,
            )
        )
    # Retrieval a stranger may ask for is critical, listed or not: the UIDs are easy to come by.
    if r.get == "processed":
        out.append(
            _finding(
                ep,
                "dicom.get-open",
                Severity.CRITICAL,
                "A stranger can retrieve images (C-GET)",
                "The C-GET context was accepted and a C-GET (of a study that does not exist, so nothing "
                "was retrieved) was processed rather than refused.",
                get="processed",
            )
        )
    if r.move == "processed":
        out.append(
            _finding(
                ep,
                "dicom.move-open",
                Severity.CRITICAL,
                "A stranger can retrieve images (C-MOVE), to an unknown destination too",
                "A C-MOVE naming a destination AE title that no one registered was processed (for a "
                "study that does not exist, so nothing was sent); the destination is not checked before "
                "matching.",
                move="processed",
            )
        )
    elif r.move == "destination-refused":
        out.append(
            _finding(
                ep,
                "dicom.move-open",
                Severity.LOW,
                "C-MOVE accepted; unknown destinations refused",
                "The C-MOVE context was accepted for a stranger; a move to an unregistered destination was "
                "refused (0xA801).",
                move="destination-refused",
            )
        )
    for kind, state, label in (("get", r.get, "C-GET"), ("move", r.move, "C-MOVE")):
        if state == "refused":
            out.append(
                _finding(
                    ep,
                    f"dicom.{kind}-open",
                    Severity.INFO,
                    f"{label} context accepted; requests refused",
                    f"A stranger may propose {label} (the presentation context was accepted), but a {label} "
                    "of something that does not exist was refused: retrieval is checked per request.",
                    **{kind: "refused"},
                )
            )
        elif state == "unknown":
            out.append(
                _finding(
                    ep,
                    f"dicom.{kind}-open",
                    Severity.MEDIUM,
                    f"{label} context accepted; request not answered",
                    f"A stranger's {label} context was accepted, and a {label} of something that does not "
                    "exist got no final answer in time: whether retrieval is open could not be told.",
                    **{kind: "unknown"},
                )
            )
    if r.store == "stored":
        out.append(
            _finding(
                ep,
                "dicom.store-open",
                Severity.HIGH,
                "A stranger can store objects (C-STORE)",
                "A synthetic Secondary Capture test object (patient 'SAFEPACS^SCAN TEST OBJECT', "
                "PatientIdentityRemoved YES) was stored: delete it from the archive.",
                stored=True,
            )
        )
    elif r.storage_contexts and r.store != "refused":
        note = "" if intrusive else " (not confirmed by a C-STORE: run with --intrusive to try one)"
        out.append(
            _finding(
                ep,
                "dicom.store-open",
                Severity.HIGH,
                "A stranger may store objects (C-STORE)",
                f"{r.storage_contexts} Storage presentation contexts were accepted for a stranger{note}.",
                storage_contexts=r.storage_contexts,
            )
        )
    if through:
        out = [replace(f, detail=f"{f.detail} {through}") for f in out]
    return out


def tls_findings(
    ep: Endpoint, t: TlsResult, *, loopback: bool, client_cert_required: bool | None
) -> list[Finding]:
    out: list[Finding] = []
    if t.error:
        return out
    if t.old_versions:
        out.append(
            _finding(
                ep,
                "tls.old-version",
                Severity.HIGH,
                f"{' and '.join(t.old_versions)} accepted",
                "PS3.15 B.12 (RFC 8996) allows TLS 1.2 and 1.3 only.",
                versions=", ".join(t.old_versions),
            )
        )
    if t.outside_profile:
        weak = [c for c in t.outside_profile if is_weak_cipher(c)]
        broken = [c for c in weak if is_broken_cipher(c)]
        sev = Severity.HIGH if broken else Severity.MEDIUM if weak else Severity.LOW
        title = (
            "Anonymous, unencrypted or broken TLS cipher suites accepted"
            if broken
            else "Weak TLS cipher suites accepted"
            if weak
            else "TLS cipher suites outside the PS3.15 B.12 profile"
        )
        out.append(
            _finding(
                ep,
                "tls.weak-cipher",
                sev,
                title,
                f"Accepted with TLS 1.2: {', '.join(t.outside_profile)}"
                f"{' (weak: ' + ', '.join(weak) + ')' if weak else ''}.",
                ciphers=", ".join(t.outside_profile),
            )
        )
    problems = []
    if t.expired:
        problems.append("expired")
    if t.not_yet_valid:
        problems.append("not yet valid")
    if t.self_signed:
        problems.append("self-signed")
    if t.weak_key:
        problems.append(f"weak key ({t.weak_key})")
    if t.weak_signature:
        problems.append(f"{t.weak_signature} signature")
    if t.untrusted and not problems:
        problems.append(f"not trusted ({t.untrusted})")
    if problems:
        sev = Severity.HIGH if t.expired or t.weak_key else Severity.MEDIUM
        if loopback and not t.expired:
            sev = Severity.LOW
        out.append(
            _finding(
                ep,
                "tls.certificate",
                sev,
                f"Certificate {', '.join(problems)}",
                "Clients cannot tell this server from an impostor without pinning its certificate.",
                days_left=t.days_left,
                untrusted=t.untrusted or None,
            )
        )
    if client_cert_required is False:
        out.append(
            _finding(
                ep,
                "tls.no-client-cert",
                Severity.LOW if loopback else Severity.MEDIUM,
                "DICOM TLS without client certificates",
                "A DICOM association was answered over TLS without a client certificate: any host may "
                "try AE titles.",
            )
        )
    return out


def http_findings(ep: Endpoint, h: HttpResult, *, loopback: bool) -> list[Finding]:
    out: list[Finding] = []
    if h.orthanc_rest == "open" or h.default_credentials:
        how = "with the default login orthanc:orthanc" if h.default_credentials else "without authentication"
        counts = (
            f"{_count(h.orthanc_studies)}, {_count(h.orthanc_instances, noun='instances')}, "
            f"{_count(h.orthanc_patients, noun='patients')}"
        )
        check = "http.default-credentials" if h.default_credentials else "http.orthanc-rest-open"
        sev = Severity.CRITICAL if h.orthanc_studies or h.orthanc_studies is None else Severity.HIGH
        out.append(
            _finding(
                ep,
                check,
                sev,
                f"Orthanc REST API open {how}",
                f"/system and /statistics answered {how}: {counts} can be listed, downloaded, changed "
                "and deleted.",
                studies=h.orthanc_studies,
                instances=h.orthanc_instances,
                patients=h.orthanc_patients,
            )
        )
    for q in h.qido:
        if q.state != "open":
            continue
        if q.studies:
            images = f", {_count(q.images, q.capped, 'images')}" if q.images is not None else ""
            out.append(
                _finding(
                    ep,
                    f"http.dicomweb-open:{q.path}",
                    Severity.CRITICAL,
                    "A stranger can list patient data (QIDO-RS)",
                    f"{q.path}/studies answered without authentication: {_count(q.studies, q.capped)}"
                    f"{images}; WADO-RS {'answers' if q.wado_rs == 'open' else 'asks for a login'}.",
                    root=q.path,
                    studies=q.studies,
                    images=q.images,
                    wado_rs=q.wado_rs,
                )
            )
        else:
            sev = Severity.CRITICAL if q.wado_rs == "open" else Severity.HIGH
            out.append(
                _finding(
                    ep,
                    f"http.dicomweb-open:{q.path}",
                    sev,
                    "DICOMweb answers without authentication",
                    f"{q.path}/studies answered without authentication (no matches now).",
                    root=q.path,
                    studies=q.studies,
                    wado_rs=q.wado_rs,
                )
            )
    if h.wado_uri == "open":
        out.append(
            _finding(
                ep,
                "http.wado-uri-open",
                Severity.CRITICAL,
                "WADO-URI answers without authentication",
                f"{h.wado_uri_path} answered a request without a login (an image needs its UIDs, which "
                "open query services give away).",
                path=h.wado_uri_path,
            )
        )
    if h.viewers:
        out.append(
            _finding(
                ep,
                "http.viewer-open",
                Severity.MEDIUM,
                "Web viewer reachable without a login",
                f"Reachable: {', '.join(h.viewers)}.",
                viewers=", ".join(h.viewers),
            )
        )
    if h.dir_listing:
        sev = Severity.HIGH if h.dcm_listed else Severity.LOW
        what = "lists .dcm files" if h.dcm_listed else "is on"
        out.append(
            _finding(ep, "http.dir-listing", sev, f"Directory listing {what}", "GET / returned a listing.")
        )
    if h.cors == "reflect-credentials":
        out.append(
            _finding(
                ep,
                "http.cors-credentials",
                Severity.HIGH if h.data_api else Severity.MEDIUM,
                "CORS reflects any origin with credentials",
                "Access-Control-Allow-Origin echoed a foreign origin with Access-Control-Allow-Credentials: "
                "true: any web page a user visits can read the API with the user's login.",
            )
        )
    elif h.cors == "wildcard" and h.data_api:
        out.append(
            _finding(
                ep,
                "http.cors-credentials",
                Severity.LOW,
                "CORS allows any origin",
                "Access-Control-Allow-Origin: * on an API (no credentials).",
            )
        )
    if h.scheme == "http":
        if h.redirects_to_https and not h.data_api:
            pass
        elif h.data_api or h.login_everywhere:
            # A service that asks for credentials on every path guards something: over plain HTTP
            # those credentials (and whatever they open) travel in clear.
            sev = Severity.LOW if loopback else Severity.HIGH
            what = "Patient data API" if h.data_api else "Login-protected service"
            out.append(
                _finding(
                    ep,
                    "http.plain",
                    sev,
                    f"{what} over plain HTTP",
                    "The service answers over HTTP: logins, tokens and patient data travel in clear.",
                    loopback=loopback,
                )
            )
        else:
            out.append(
                _finding(
                    ep,
                    "http.plain",
                    Severity.INFO if loopback else Severity.LOW,
                    "Plain HTTP",
                    "The port serves plain HTTP without redirecting to HTTPS.",
                    loopback=loopback,
                )
            )
    if h.missing_headers and h.answered:
        out.append(
            _finding(
                ep,
                "http.headers-missing",
                Severity.LOW,
                "Security headers missing",
                f"Missing on GET /: {', '.join(h.missing_headers)}.",
                headers=", ".join(h.missing_headers),
            )
        )
    return out


def cve_findings(ep: Endpoint, product: Product) -> list[Finding]:
    cves = known_cves(product)
    if not cves:
        return []
    listed = "; ".join(f"{c.id} ({c.summary}; fixed in {c.fixed})" for c in cves)
    return [
        _finding(
            ep,
            "vuln.cve",
            Severity.MEDIUM,
            f"{product} has known vulnerabilities",
            f"By version number: {listed}. A distribution package may carry back-ported fixes.",
            cves=", ".join(c.id for c in cves),
            product_version=str(product),
        )
    ]
