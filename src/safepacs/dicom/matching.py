"""C-FIND (and later QIDO-RS) attribute matching, PS3.4 C.2.2.2, as pure functions.

:func:`parse_identifier` turns a query identifier into a :class:`Query`: one :class:`Condition` per key
(attribute keyword, :class:`MatchKind`, values).  :mod:`safepacs.db.sql` translates conditions into
SQL; :func:`matches` is the reference implementation the tests hold the SQL against.  Nothing here does
I/O or knows about DIMSE, so QIDO-RS can build the same conditions from its query parameters.

Choices where the standard leaves room (to be stated in the conformance statement):

* PN values match case-insensitively (Unicode case folding), single value and wild card alike
  (PS3.4 C.2.2.2.1, C.2.2.2.4 leave PN to the implementation); the whole value is compared, components
  are not matched separately.  Every other VR matches exactly and case-sensitively.
* A key whose value is a lone ``*`` is universal (C.2.2.2.4 Note), for every VR.
* Several values (``\\``-separated) mean "any of them" for every VR, not only UI (C.2.2.2.2); each
  value may itself be a wild card or a range.
* DA/TM/DT: single values and ranges compare at the precision given: a TM upper bound ``1030`` includes
  10:30:59.999999, a single value ``1030`` means the whole minute.  DT time zone offsets are ignored.
  Date and time ranges are matched independently; the combined StudyDate/StudyTime range of
  C.2.2.2.5.1 is not offered.
* Empty values: an entity whose Required Key (:data:`~safepacs.dicom.attributes.REQUIRED_KEYS`) is zero
  length matches every query on that key (C.2.2.1.2: its value is unknown); on any other key an empty
  stored value matches only Universal Matching and Empty Value Matching.  A date, time or number that
  cannot be read counts as empty.  Empty Value Matching (C.2.2.2.7): a key value of two QUOTATION MARK
  characters (``""``) matches only entities whose value is empty, on every key; ``""`` among several
  values adds the empty value to the alternatives.  No Extended Negotiation is needed (a stored value of
  ``""`` itself is not expected).
* A patient stored without a Patient ID is answered and matched under the Study Instance UID of its one
  study (:func:`answered_patient_id`, C.2.2.1.1: every entity has a non-zero length Unique Key).
* Sequence Matching (C.2.2.2.6): the key holds at most one item; a stored sequence matches when at least
  one of its items matches every key of that item.  A zero-length sequence or an empty item is universal.
* Hierarchical queries (C.4.1.3.1): keys of the query level and of the levels above it are matched
  (a missing higher-level unique key is universal, not an error); keys of lower levels and keys the
  index does not keep are returned empty and not matched (C.2.2.1.3).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag

from safepacs.dicom.attributes import (
    BY_KEYWORD,
    INTEGER_VRS,
    LEVEL_RANK,
    REQUIRED_KEYS,
    SEQUENCE_BY_KEYWORD,
    TEMPORAL_VRS,
    UNIQUE_KEYS,
    WILDCARD_VRS,
    Attribute,
    Derived,
    Sequence,
    usable_at,
)
from safepacs.errors import QueryError
from safepacs.types import QueryLevel, QueryModel, Scope

__all__ = [
    "EMPTY_VALUE",
    "MAX_VALUES",
    "Condition",
    "MatchKind",
    "Query",
    "answered_patient_id",
    "check_level",
    "fold",
    "make_condition",
    "matches",
    "normalize_stored",
    "parse_identifier",
    "retrieve_keys",
    "to_int",
]

#: The key value of Empty Value Matching (PS3.4 C.2.2.2.7): two QUOTATION MARK characters.
EMPTY_VALUE = '""'
#: At most this many values (a UID list, say) in one key; more is refused rather than sent to the database.
MAX_VALUES = 1000
_MAX_VALUE_CHARS = 4096
_MAX_RETRIEVE_UIDS = 100_000
_MAX_STARS = 16
_SKIPPED = frozenset({"SpecificCharacterSet", "QueryRetrieveLevel"})
_MODEL_LEVELS: dict[QueryModel, tuple[QueryLevel, ...]] = {
    QueryModel.PATIENT_ROOT: (QueryLevel.PATIENT, QueryLevel.STUDY, QueryLevel.SERIES, QueryLevel.IMAGE),
    QueryModel.STUDY_ROOT: (QueryLevel.STUDY, QueryLevel.SERIES, QueryLevel.IMAGE),
}


class MatchKind(enum.StrEnum):
    """The matching types of PS3.4 C.2.2.2 (C.2.2.2.1-6)."""

    UNIVERSAL = "universal"  # C.2.2.2.3: empty value (or a lone "*")
    SINGLE = "single"  # C.2.2.2.1
    LIST = "list"  # C.2.2.2.2 list of UIDs (any of several values, here for every VR)
    WILDCARD = "wildcard"  # C.2.2.2.4
    RANGE = "range"  # C.2.2.2.5
    SEQUENCE = "sequence"  # C.2.2.2.6
    EMPTY = "empty"  # C.2.2.2.7 Empty Value Matching: the value '""'


@dataclass(frozen=True)
class Condition:
    """One key of an identifier.

    ``values`` are the alternatives (any may match): exact values for SINGLE/LIST, patterns with ``*``/``?``
    for WILDCARD; for PN they are case-folded already.  For DA/TM/DT, ``ranges`` holds the normalized
    inclusive ``(low, high)`` bounds of each alternative ("" = open), whatever the kind.  A SEQUENCE
    condition holds the item's conditions in ``items``.  ``unsupported`` lists (tag, VR) of keys asked
    for that are returned empty.  ``empty``: an empty stored value matches too (a zero-length Required
    Key, PS3.4 C.2.2.1.2, or ``""`` among the values); an EMPTY condition matches empty values only.
    """

    keyword: str
    vr: str
    kind: MatchKind
    values: tuple[str, ...] = ()
    ranges: tuple[tuple[str, str], ...] = ()
    items: tuple[Condition, ...] = ()
    unsupported: tuple[tuple[int, str], ...] = ()
    empty: bool = False

    @property
    def is_universal(self) -> bool:
        if self.kind is MatchKind.SEQUENCE:
            return all(item.is_universal for item in self.items)
        return self.kind is MatchKind.UNIVERSAL


@dataclass(frozen=True)
class Query:
    """A parsed identifier: every supported key as a condition (universal ones say what to return)."""

    model: QueryModel
    level: QueryLevel
    conditions: tuple[Condition, ...]
    unsupported: tuple[tuple[int, str], ...] = ()
    scope: Scope | None = None  # the asking principal's; None = every study

    @property
    def filters(self) -> tuple[Condition, ...]:
        """The conditions that actually restrict the result."""
        return tuple(c for c in self.conditions if not c.is_universal)

    def condition(self, keyword: str) -> Condition | None:
        for cond in self.conditions:
            if cond.keyword == keyword:
                return cond
        return None

    @property
    def scoped(self) -> bool:
        """Whether the query names one study or one series by Single Value Matching of its Unique Key
        (PS3.4 C.2.2.2.1): all it can answer lies within that study or series."""
        return any(
            cond.keyword in _SCOPE_KEYS and cond.kind is MatchKind.SINGLE and not cond.empty
            for cond in self.conditions
        )


_SCOPE_KEYS = frozenset({"StudyInstanceUID", "SeriesInstanceUID"})


def answered_patient_id(patient_id: str, study_uid: str) -> str:
    """The Patient ID a patient is answered and matched under: its own, or for a patient stored without
    one, the Study Instance UID of its one study.

    An empty Patient ID identifies nobody, so such a patient is kept apart for each study (never merged
    with another patient); PS3.4 C.2.2.1.1 wants every entity to have a specific non-zero length Unique
    Key, unique at its level, and a UID is unique and fits LO.  Stored objects keep their empty value.
    """
    return patient_id or study_uid


# Normalization ---------------------------------------------------------------------------------------
def fold(value: str) -> str:
    """Case folding for PN matching (PS3.4 C.2.2.2.1: PN may be matched case-insensitively)."""
    return value.casefold()


def to_int(value: object) -> int | None:
    """An IS/US value as an integer, ``None`` when empty or not a number."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = int(str(value).strip()) if not isinstance(value, int) else int(value)
    except ValueError:
        return None
    return number if -(2**63) < number < 2**63 else None


_DA_RE = re.compile(r"^(\d{4})(\d{2})(\d{2})$")
_TM_RE = re.compile(r"^(\d{2})(\d{2})?(\d{2})?(?:\.(\d{1,6}))?$")
_DT_RE = re.compile(r"^(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.(\d{1,6}))?([+-]\d{4})?$")


def _date(value: str, upper: bool) -> str:
    text = value.replace(".", "") if len(value) == 10 else value  # ACR-NEMA "YYYY.MM.DD"
    m = _DA_RE.match(text)
    if not m or not (1 <= int(m[2]) <= 12 and 1 <= int(m[3]) <= 31):
        raise ValueError(value)
    return text


def _time(value: str, upper: bool) -> str:
    text = value.replace(":", "")  # ACR-NEMA "HH:MM:SS"
    m = _TM_RE.match(text)
    if not m or (m[4] is not None and m[3] is None):
        raise ValueError(value)
    hh, mm, ss, frac = m[1], m[2], m[3], m[4]
    if int(hh) > 23 or (mm is not None and int(mm) > 59) or (ss is not None and int(ss) > 60):
        raise ValueError(value)
    fill = "59" if upper else "00"
    return f"{hh}{mm or fill}{ss or fill}.{(frac or '').ljust(6, '9' if upper else '0')}"


def _datetime(value: str, upper: bool) -> str:
    m = _DT_RE.match(value)
    if not m:
        raise ValueError(value)
    yyyy, mo, dd, hh, mi, ss, frac = m[1], m[2], m[3], m[4], m[5], m[6], m[7]
    if frac is not None and ss is None:
        raise ValueError(value)
    parts = [
        (mo, "12", "01", 1, 12),
        (dd, "31", "01", 1, 31),
        (hh, "23", "00", 0, 23),
        (mi, "59", "00", 0, 59),
        (ss, "59", "00", 0, 60),
    ]
    out = yyyy
    for given, high, low, lo_ok, hi_ok in parts:
        if given is not None and not lo_ok <= int(given) <= hi_ok:
            raise ValueError(value)
        out += given if given is not None else (high if upper else low)
    return f"{out}.{(frac or '').ljust(6, '9' if upper else '0')}"


_NORMALIZERS = {"DA": _date, "TM": _time, "DT": _datetime}


def normalize_stored(vr: str, value: str) -> str:
    """The comparable key the index keeps for a stored DA/TM/DT value ("" when empty or invalid).

    DA becomes ``YYYYMMDD``, TM ``HHMMSS.FFFFFF`` and DT ``YYYYMMDDHHMMSS.FFFFFF`` (offset dropped), the
    missing components filled with their lowest value (PS3.5 6.2: reduced precision is allowed).
    """
    text = value.strip()
    if not text:
        return ""
    try:
        return _NORMALIZERS[vr](text, False)
    except ValueError:
        return ""


def _is_offset_value(value: str) -> bool:
    m = _DT_RE.match(value)
    return m is not None and m[8] is not None and int(m[8][1:3]) <= 14 and int(m[8][3:]) <= 59


def _range(vr: str, keyword: str, value: str) -> tuple[tuple[str, str], bool]:
    """The normalized bounds of a DA/TM/DT key value and whether it was a range (PS3.4 C.2.2.2.5)."""
    norm = _NORMALIZERS[vr]
    try:
        if vr == "DT" and _is_offset_value(value):  # "20200101-0500" is one value with an offset
            return (norm(value, False), norm(value, True)), False
        if value.count("-") == 1:
            low, high = (part.strip() for part in value.split("-"))
            if not low and not high:
                raise ValueError(value)
            bounds = (norm(low, False) if low else "", norm(high, True) if high else "")
            return bounds, True
        return (norm(value, False), norm(value, True)), False
    except ValueError:
        raise QueryError(
            f"the value of {keyword} is not a valid {vr} or {vr} range (PS3.4 C.2.2.2.5)"
        ) from None


# Parsing ---------------------------------------------------------------------------------------------
def check_level(model: QueryModel, level: QueryLevel, identifier: Dataset | None = None) -> None:
    """Refuse a level the model lacks (PS3.4 C.6.2: Study Root has no PATIENT level) or an identifier
    whose Query/Retrieve Level (0008,0052) is missing or differs (PS3.4 C.4.1.1.3.1)."""
    if level not in _MODEL_LEVELS[model]:
        raise QueryError(f"the {model.name} information model has no {level.value} level (PS3.4 C.6)")
    if identifier is None:
        return
    try:
        given = identifier.get("QueryRetrieveLevel")
    except Exception:  # noqa: BLE001 - any decoding failure is a malformed identifier
        given = None
    text = str(given or "").strip().upper()
    if not text:
        raise QueryError("the identifier has no Query/Retrieve Level (0008,0052); add it (PS3.4 C.4.1.1.3.1)")
    if text != level.value:
        raise QueryError(f"the identifier's Query/Retrieve Level is not {level.value} (PS3.4 C.4.1.1.3.1)")


def parse_identifier(
    model: QueryModel, level: QueryLevel, identifier: Dataset, *, require_level: bool = True
) -> Query:
    """The conditions of a C-FIND identifier at ``level`` (PS3.4 C.4.1.1.3.1, C.2.2.2).

    ``require_level=False`` skips the Query/Retrieve Level check (QIDO-RS has none).  Raises
    :class:`~safepacs.errors.QueryError` for a malformed identifier (wrong VR, undecodable value,
    a level the model lacks).
    """
    check_level(model, level, identifier if require_level else None)
    conditions: list[Condition] = []
    unsupported: list[tuple[int, str]] = []
    for elem in _elements(identifier):
        keyword = elem.keyword
        if elem.tag.element == 0 or keyword in _SKIPPED:
            continue
        attr = BY_KEYWORD.get(keyword)
        seq = SEQUENCE_BY_KEYWORD.get(keyword)
        if attr is not None and usable_at(level, attr.level):
            conditions.append(_condition(attr, elem, required=keyword in REQUIRED_KEYS))
        elif seq is not None and usable_at(level, seq.level):
            conditions.append(_sequence_condition(seq, elem))
        else:
            unsupported.append((int(elem.tag), elem.VR))
    return Query(model, level, tuple(conditions), tuple(unsupported))


def _elements(ds: Dataset) -> list[DataElement]:
    out: list[DataElement] = []
    for tag in list(ds.keys()):
        try:
            out.append(ds[tag])
        except Exception as exc:
            raise QueryError(
                f"the key {_tag_name(tag)} of the identifier cannot be decoded; correct its value"
            ) from exc
    return out


def _tag_name(tag: BaseTag) -> str:
    return f"({tag.group:04X},{tag.element:04X})"


def _raw_values(elem: DataElement, limit: int = MAX_VALUES) -> list[str]:
    value: Any = elem.value
    if value is None:
        return []
    items = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    out = []
    for item in items:
        text = item.decode("ascii", "replace") if isinstance(item, bytes) else str(item)
        text = text.strip(" \x00")
        if len(text) > _MAX_VALUE_CHARS:
            raise QueryError(f"a value of {elem.keyword} is longer than {_MAX_VALUE_CHARS} characters")
        if text:
            out.append(text)
    if len(out) > limit:
        raise QueryError(f"{elem.keyword} has more than {limit} values; split the request")
    return out


def _condition(attr: Attribute, elem: DataElement, *, required: bool = False) -> Condition:
    if elem.VR != attr.vr:
        raise QueryError(f"the key {attr.keyword} has VR {elem.VR}, not {attr.vr} (PS3.6 Table 6-1)")
    values = _raw_values(elem)
    return make_condition(attr.keyword, attr.vr, values, required=required)


def make_condition(keyword: str, vr: str, values: list[str], *, required: bool = False) -> Condition:
    """The condition for ``values`` (already split and stripped) of a key with VR ``vr``; ``required``:
    the key is a Required Key, which an empty stored value always matches (PS3.4 C.2.2.1.2)."""
    if not values or "*" in values:
        return Condition(keyword, vr, MatchKind.UNIVERSAL)
    if EMPTY_VALUE in values:  # Empty Value Matching (C.2.2.2.7)
        others = [v for v in values if v != EMPTY_VALUE]
        if not others:
            return Condition(keyword, vr, MatchKind.EMPTY)
        cond = _make_condition(keyword, vr, others)
        return cond if cond.is_universal else replace(cond, empty=True)
    cond = _make_condition(keyword, vr, values)
    return replace(cond, empty=True) if required and not cond.is_universal else cond


def _make_condition(keyword: str, vr: str, values: list[str]) -> Condition:
    if vr in TEMPORAL_VRS:
        parsed = [_range(vr, keyword, v) for v in values]
        is_range = any(r for _, r in parsed)
        kind = MatchKind.RANGE if is_range else MatchKind.LIST if len(values) > 1 else MatchKind.SINGLE
        return Condition(keyword, vr, kind, tuple(values), tuple(b for b, _ in parsed))
    if vr in INTEGER_VRS:
        numbers = [to_int(v) for v in values]
        if any(n is None for n in numbers):
            raise QueryError(f"the value of {keyword} is not a valid {vr} (PS3.5 6.2)")
        kind = MatchKind.LIST if len(values) > 1 else MatchKind.SINGLE
        return Condition(keyword, vr, kind, tuple(str(n) for n in numbers))
    if vr == "PN":
        values = [fold(v) for v in values]
    if vr in WILDCARD_VRS and any("*" in v or "?" in v for v in values):
        patterns = tuple(re.sub(r"\*+", "*", v) for v in values)  # "**" is "*"
        if "*" in patterns:
            return Condition(keyword, vr, MatchKind.UNIVERSAL)
        if any(p.count("*") > _MAX_STARS for p in patterns):
            raise QueryError(f"the value of {keyword} has more than {_MAX_STARS} '*' wild cards")
        return Condition(keyword, vr, MatchKind.WILDCARD, patterns)
    kind = MatchKind.LIST if len(values) > 1 else MatchKind.SINGLE
    return Condition(keyword, vr, kind, tuple(values))


def _sequence_condition(seq: Sequence, elem: DataElement) -> Condition:
    if elem.VR != "SQ":
        raise QueryError(f"the key {seq.keyword} has VR {elem.VR}, not SQ (PS3.6 Table 6-1)")
    items = list(elem.value or [])
    if len(items) > 1:
        raise QueryError(f"the sequence key {seq.keyword} has more than one item (PS3.4 C.2.2.2.6)")
    conditions: list[Condition] = []
    unsupported: list[tuple[int, str]] = []
    for sub in _elements(items[0]) if items else []:
        attr = seq.item(sub.keyword)
        if sub.tag.element == 0 or sub.keyword in _SKIPPED:
            continue
        if attr is None:
            unsupported.append((int(sub.tag), sub.VR))
        else:
            conditions.append(_condition(attr, sub))
    return Condition(
        seq.keyword, "SQ", MatchKind.SEQUENCE, items=tuple(conditions), unsupported=tuple(unsupported)
    )


def retrieve_keys(model: QueryModel, level: QueryLevel, identifier: Dataset) -> dict[str, tuple[str, ...]]:
    """The unique keys of a C-GET/C-MOVE identifier (PS3.4 C.4.2.2.1, C.4.3.2.1), keyword -> values.

    The key of the retrieve level must have a value (one value, or a list of UIDs); unique keys of the
    levels above restrict the result when given.  Values are matched literally: retrieval has neither
    wild cards nor universal matching.  A Patient Root identifier may add IssuerOfPatientID.
    """
    check_level(model, level, identifier)
    keys: dict[str, tuple[str, ...]] = {}
    wanted = [UNIQUE_KEYS[lv] for lv in _MODEL_LEVELS[model] if LEVEL_RANK[lv] <= LEVEL_RANK[level]]
    if model is QueryModel.PATIENT_ROOT:
        wanted.append("IssuerOfPatientID")
    elements = {elem.keyword: elem for elem in _elements(identifier)}
    for keyword in wanted:
        elem = elements.get(keyword)
        if elem is None:
            continue
        expected = BY_KEYWORD[keyword].vr
        if elem.VR != expected:
            raise QueryError(f"the key {keyword} has VR {elem.VR}, not {expected} (PS3.6 Table 6-1)")
        values = _raw_values(elem, limit=_MAX_RETRIEVE_UIDS)
        if values:
            keys[keyword] = tuple(values)
    main = UNIQUE_KEYS[level]
    if main not in keys:
        raise QueryError(
            f"a retrieve at the {level.value} level needs a value for {main} (PS3.4 C.4.2.2.1); add it"
        )
    return keys


# The reference matcher -------------------------------------------------------------------------------
def matches(conditions: Iterable[Condition], record: Mapping[str, object]) -> bool:
    """Whether a stored record matches every condition (PS3.4 C.2.2.2), in plain Python.

    ``record`` maps keywords to values as stored: ``str`` for text, date and time VRs (as in the data
    set), ``int`` for IS/US, a list of ``str`` for multi-valued attributes (ModalitiesInStudy) and a list
    of such mappings for sequences; PatientID as answered (:func:`answered_patient_id`).  Absent keys
    are empty.
    """
    return all(_match(cond, _stored(cond.keyword, record)) for cond in conditions)


def _stored(keyword: str, record: Mapping[str, object]) -> object:
    attr = BY_KEYWORD.get(keyword)
    if attr is not None and attr.derived is Derived.ONLINE:
        return "ONLINE"
    return record.get(keyword)


def _match(cond: Condition, stored: object) -> bool:
    if cond.is_universal:
        return True
    if cond.kind is MatchKind.SEQUENCE:
        items = stored if isinstance(stored, list | tuple) else []
        return any(isinstance(item, Mapping) and matches(cond.items, item) for item in items)
    values = list(stored) if isinstance(stored, list | tuple) else [stored]
    if cond.kind is MatchKind.EMPTY or cond.empty:
        if all(_is_empty(cond, value) for value in values):
            return True
        if cond.kind is MatchKind.EMPTY:
            return False
    return any(_match_value(cond, value) for value in values)


def _is_empty(cond: Condition, stored: object) -> bool:
    """Whether a stored value is zero length (or, for numbers, dates and times, unreadable)."""
    if cond.vr in INTEGER_VRS:
        return to_int(stored) is None
    text = "" if stored is None else str(stored)
    return not (normalize_stored(cond.vr, text) if cond.vr in TEMPORAL_VRS else text)


def _match_value(cond: Condition, stored: object) -> bool:
    if cond.vr in INTEGER_VRS:
        number = to_int(stored)
        return number is not None and number in {int(v) for v in cond.values}
    text = "" if stored is None else str(stored)
    if cond.vr in TEMPORAL_VRS:
        key = normalize_stored(cond.vr, text)
        return bool(key) and any((not lo or lo <= key) and (not hi or key <= hi) for lo, hi in cond.ranges)
    if cond.vr == "PN":
        text = fold(text)
    if cond.kind is MatchKind.WILDCARD:
        return any(_wildcard_regex(p).fullmatch(text) is not None for p in cond.values)
    return text in cond.values


@lru_cache(maxsize=256)
def _wildcard_regex(pattern: str) -> re.Pattern[str]:
    """``*`` is any run of characters, ``?`` one character (PS3.4 C.2.2.2.4)."""
    parts = (".*" if ch == "*" else "." if ch == "?" else re.escape(ch) for ch in pattern)
    return re.compile("".join(parts), re.DOTALL)
