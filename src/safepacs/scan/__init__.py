"""``safepacs scan`` and ``safepacs doctor``: see a PACS the way an attacker does, without leaking PHI.

The scanner connects to address ranges the user owns, tells DICOM, DICOMweb/HTTP and TLS apart, and reports
what a stranger could do (associate, list, retrieve, store) with a severity and the setting to change.
Reports hold counts, never names, IDs, dates or UIDs of patients.

Adapters never import each other: this package talks DICOM with pynetdicom directly, not through
``safepacs.protocols.dimse`` (the server).
"""

from safepacs.scan._model import SEVERITIES, Endpoint, Finding, ScanError, ScanReport, Severity
from safepacs.scan.engine import ProgressHook, ScanOptions, run_scan
from safepacs.scan.targets import (
    DEFAULT_DICOM_PORTS,
    DEFAULT_HTTP_PORTS,
    DEFAULT_PORTS,
    Target,
    parse_ports,
    parse_target,
    read_targets_file,
)

__all__ = [
    "DEFAULT_DICOM_PORTS",
    "DEFAULT_HTTP_PORTS",
    "DEFAULT_PORTS",
    "SEVERITIES",
    "Endpoint",
    "Finding",
    "ProgressHook",
    "ScanError",
    "ScanOptions",
    "ScanReport",
    "Severity",
    "Target",
    "parse_ports",
    "parse_target",
    "read_targets_file",
    "run_scan",
]
