"""What every DICOMweb route reads from a request: Accept media ranges and UIDs in the path."""

from __future__ import annotations

import re

from safepacs.services.ingest import valid_uid
from safepacs.web.problems import Problem

__all__ = ["DICOM_JSON", "checked_uid", "media_ranges"]

DICOM_JSON = "application/dicom+json"
_PARAM_RE = re.compile(r';\s*([A-Za-z-]+)\s*=\s*("([^"]*)"|[^;,\s]*)')


def media_ranges(accept: str) -> list[tuple[str, dict[str, str]]]:
    """The media ranges of an Accept header, lower-cased, each with its parameters (quotes removed)."""
    out = []
    for part in accept.split(","):
        media = part.split(";")[0].strip().lower()
        params = {
            m.group(1).lower(): (m.group(3) if m.group(3) is not None else m.group(2))
            for m in _PARAM_RE.finditer(part)
        }
        out.append((media, params))
    return out


def checked_uid(value: str) -> str:
    """A UID from the path, or 400: never a string that could be a path or a wildcard."""
    if not valid_uid(value):
        raise Problem(
            400, "Bad Request", "a UID in the path is not a valid UID (digits and dots, 64 at most)"
        )
    return value
