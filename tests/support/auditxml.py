"""DICOM audit messages checked against the standard's schema (PS3.15 A.5.1.1,
``tests/data/audit-message.rng``): the module-scoped ``schema`` fixture and a parser that resolves no
entities and reaches no network."""

from __future__ import annotations

import pytest
from lxml import etree

from tests.support.paths import DATA

SCHEMA_FILE = DATA / "audit-message.rng"


@pytest.fixture(scope="module")
def schema() -> etree.RelaxNG:
    return etree.RelaxNG(etree.parse(str(SCHEMA_FILE)))


def _parse(data: bytes) -> etree._Element:
    return etree.fromstring(data, etree.XMLParser(resolve_entities=False, no_network=True))


def _assert_valid(schema: etree.RelaxNG, data: bytes) -> etree._Element:
    root = _parse(data)
    assert schema.validate(root), schema.error_log
    return root
