"""What a scan finds: severities, findings, endpoints and the report that holds them.

Every string that reaches a :class:`Finding` or an :class:`Endpoint` is written by the scanner itself
or passed through :func:`safe_text` (product names, versions, AE titles of servers); values of the
target's data sets are never stored, only counted.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from safepacs.errors import SafePacsError

__all__ = [
    "SEVERITIES",
    "Endpoint",
    "Finding",
    "ScanError",
    "ScanReport",
    "Severity",
    "safe_text",
]


class ScanError(SafePacsError):
    """A scan cannot be run as asked (a bad target, port list or option); one sentence for the user."""


class Severity(enum.IntEnum):
    """How bad a finding is.  Critical: a stranger can list or retrieve patient data; high: a stranger can
    associate or store, or patient data travels in clear; medium, low: weaker posture; info: a fact."""

    INFO = 0
    LOW = 1
    MEDIUM = 2
    HIGH = 3
    CRITICAL = 4

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, text: str) -> Severity:
        try:
            return cls[text.strip().upper()]
        except KeyError:
            names = ", ".join(s.label for s in sorted(cls, reverse=True))
            raise ScanError(f"unknown severity {text!r}; use one of {names}") from None


SEVERITIES = tuple(s.label for s in sorted(Severity, reverse=True))

_UNSAFE = re.compile(r"[^A-Za-z0-9 ._+\-/()#:,]")


def safe_text(value: object, limit: int = 64) -> str:
    """A short, printable rendering of a value a *server* reported about itself (a version, a banner,
    its AE title), with markup and control characters removed.  Never used on data-set values."""
    return _UNSAFE.sub("", str(value))[:limit].strip()


@dataclass(frozen=True)
class Finding:
    """One thing a scan or a configuration review found, with what to do about it.

    ``check`` is a stable identifier (``dicom.find-open``); ``target`` is ``host:port`` (or ``config``);
    ``evidence`` holds counts and facts such as the TLS version, never patient data.
    """

    check: str
    severity: Severity
    target: str
    title: str
    detail: str
    remediation: str
    service: str = ""
    product: str = ""
    evidence: dict[str, int | str | bool | None] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "check": self.check,
            "severity": self.severity.label,
            "target": self.target,
            "service": self.service,
            "product": self.product,
            "title": self.title,
            "detail": self.detail,
            "remediation": self.remediation,
            "evidence": dict(self.evidence),
        }


@dataclass
class Endpoint:
    """An open port and what answers on it."""

    address: str
    port: int
    host: str = ""  # the name the user gave, when it was a host name
    service: str = "unknown"  # dicom, dicom-tls, http, https, unknown
    product: str = ""
    version: str = ""
    facts: dict[str, int | str | bool | None] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    error: str = ""

    @property
    def label(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"

    @property
    def tls(self) -> bool:
        return self.service in ("dicom-tls", "https")

    @property
    def display_product(self) -> str:
        return f"{self.product} {self.version}".strip()

    def as_dict(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "port": self.port,
            "host": self.host,
            "service": self.service,
            "product": self.product,
            "version": self.version,
            "facts": dict(self.facts),
            "error": self.error,
        }


@dataclass
class ScanReport:
    """Everything one run found.  ``kind`` is ``scan`` or ``doctor``."""

    kind: str
    started_at: datetime
    finished_at: datetime
    addresses: int = 0
    probes: int = 0
    endpoints: list[Endpoint] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # targets that could not be scanned (one line each)

    @property
    def duration(self) -> float:
        return (self.finished_at - self.started_at).total_seconds()

    def runtime_errors(self) -> list[str]:
        """What went wrong while scanning, one line each: targets that could not be scanned and probes
        of open endpoints that failed or timed out (a closed or refusing port is no error)."""
        return [*self.errors, *(f"{ep.label}: {ep.error}" for ep in self.endpoints if ep.error)]

    def worst(self) -> Severity | None:
        return max((f.severity for f in self.findings), default=None)

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(SEVERITIES, 0)
        for f in self.findings:
            counts[f.severity.label] += 1
        return counts

    def sorted_findings(self) -> list[Finding]:
        return sorted(self.findings, key=lambda f: (-f.severity, f.target, f.check))
