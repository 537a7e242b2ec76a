"""What every DICOMweb route reads from a request: Accept media ranges and UIDs in the path."""

from __future__ import annotations

import re

from safepacs.protocols.dicomweb.problems import Problem
from safepacs.services.ingest import valid_uid

__all__ = ["DICOM_JSON", "acceptable", "checked_uid", "frame_numbers", "media_ranges"]

DICOM_JSON = "application/dicom+json"
_FRAME_LIST_RE = re.compile(r"^[0-9]{1,9}(,[0-9]{1,9})*$")
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


def acceptable(params: dict[str, str]) -> bool:
    """Whether a media range is acceptable at all: not weighted ``q=0`` (RFC 9110 12.4.2)."""
    try:
        return float(params.get("q", "1")) > 0
    except ValueError:
        return True


def frame_numbers(text: str) -> list[int]:
    """The frame list of a path (``1,3,5``, PS3.18 10.4.1), in the order asked; 400 unless well formed."""
    if not _FRAME_LIST_RE.match(text.replace(" ", "")):
        raise Problem(
            400, "Bad Request", "frames must be a comma-separated list of frame numbers, e.g. frames/1,3,5"
        )
    numbers = [int(t) for t in text.replace(" ", "").split(",")]
    if 0 in numbers:
        raise Problem(400, "Bad Request", "frame numbers start at 1")
    if len(set(numbers)) != len(numbers):
        raise Problem(400, "Bad Request", "the frame list names a frame more than once")
    return numbers
