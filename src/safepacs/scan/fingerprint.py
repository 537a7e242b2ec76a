"""Which product answers: DICOM Implementation Class UID / Version Name, HTTP banners; known CVEs by version.

The mapping is data (``fingerprints.json`` beside this module), read once when first needed.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

from safepacs.scan._model import safe_text

__all__ = ["Cve", "Product", "known_cves", "match_http", "match_implementation", "parse_version"]


@dataclass(frozen=True)
class Product:
    name: str
    version: str = ""

    def __str__(self) -> str:
        return f"{self.name} {self.version}".strip()


@dataclass(frozen=True)
class Cve:
    id: str
    summary: str
    fixed: str


@functools.cache
def _data() -> dict[str, Any]:
    text = resources.files("safepacs.scan").joinpath("fingerprints.json").read_text(encoding="utf-8")
    data: dict[str, Any] = json.loads(text)
    return data


def parse_version(text: str) -> tuple[int, ...]:
    """``1.10.1`` -> (1, 10, 1); non-numeric parts stop the parse (``3.6.7-rc1`` -> (3, 6, 7))."""
    parts: list[int] = []
    for piece in text.split("."):
        m = re.match(r"\d+", piece)
        if not m:
            break
        parts.append(int(m.group()))
        if m.end() != len(piece):
            break
    return tuple(parts)


def match_implementation(class_uid: str, version_name: str) -> Product | None:
    """The product of an A-ASSOCIATE-AC's Implementation Class UID and Version Name (PS3.7 D.3.3.2)."""
    for entry in _data()["implementations"]:
        prefix = entry["uid_prefix"]
        if class_uid == prefix or class_uid.startswith(prefix + "."):
            version = ""
            if entry["version_regex"]:
                m = re.match(entry["version_regex"], version_name.strip())
                if m:
                    version = ".".join(str(int(g)) if g.isdigit() else g for g in m.groups())
            return Product(entry["product"], safe_text(version, 24))
    return None


def match_http(headers: dict[str, str], body: str) -> str | None:
    """The product an HTTP answer names in its headers (lower-case keys) or body, if any."""
    for entry in _data()["http"]:
        where = entry["where"]
        haystack = body if where == "body" else headers.get(where, "")
        if entry["contains"] in haystack:
            return str(entry["product"])
    return None


def known_cves(product: Product) -> list[Cve]:
    """CVEs of the data file that affect this version of ``product`` (by version number only: a
    distribution may have back-ported the fix)."""
    version = parse_version(product.version)
    if not version:
        return []
    out = []
    for entry in _data()["cves"].get(product.name, []):
        if parse_version(entry["from"]) <= version < parse_version(entry["fixed"]):
            out.append(Cve(entry["id"], entry["summary"], entry["fixed"]))
    return out
