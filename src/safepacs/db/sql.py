"""Matching conditions as SQL (SQLAlchemy Core), the C-FIND and retrieve queries.

Every value reaches the database as a bound parameter; wild cards become ``LIKE ... ESCAPE '!'`` with
``%``, ``_`` and ``!`` of the value escaped (PS3.4 C.2.2.2.4), so a value can neither inject SQL nor act
as an SQL wild card.  SQLite runs with ``PRAGMA case_sensitive_like = ON``, so LIKE is case-sensitive
there as in PostgreSQL; PN is matched on its case-folded column.

Counts, ModalitiesInStudy and SOPClassesInStudy are computed here from the rows below a record:
correlated ``count(*)``/``EXISTS`` subqueries over indexed foreign keys for matching and the counts,
and one batched ``SELECT DISTINCT`` per result page for the multi-valued attributes.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any, TypeVar

import sqlalchemy as sa
from pydicom import config as dicom_config
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence as DicomSequence

from safepacs.db.schema import (
    LEVEL_TABLES,
    SEQUENCE_TABLES,
    instances,
    patients,
    series,
    studies,
    study_grants,
    study_groups,
)
from safepacs.dicom import attributes as A
from safepacs.dicom import dicombytes as B
from safepacs.dicom.dicombytes import Unencodable
from safepacs.dicom.dicomjson import data_element_json, element_json, tag_key
from safepacs.dicom.matching import Condition, MatchKind, Query, fold, matches
from safepacs.errors import QueryLimitError
from safepacs.types import InstanceRef, QueryLevel, Scope, StoredBlob

__all__ = [
    "ESCAPE",
    "RESPONSE_CHARSET",
    "condition_clause",
    "like_pattern",
    "run_find",
    "run_find_encoded",
    "run_retrieve",
    "sequence_items",
    "visible_clause",
]

ESCAPE = "!"
RESPONSE_CHARSET = "ISO_IR 192"  # text is kept and returned as UTF-8 (PS3.3 C.12.1.1.2)
_CHUNK = 500
_NOUNS = {
    QueryLevel.PATIENT: "patients",
    QueryLevel.STUDY: "studies",
    QueryLevel.SERIES: "series",
    QueryLevel.IMAGE: "instances",
}
_HINTS = {
    QueryLevel.PATIENT: "add a PatientName or PatientID",
    QueryLevel.STUDY: "add PatientID or a StudyDate range",
    QueryLevel.SERIES: "add a StudyInstanceUID or Modality",
    QueryLevel.IMAGE: "add a SeriesInstanceUID",
}
_T = TypeVar("_T")


# Conditions -> WHERE -----------------------------------------------------------------------------------
def like_pattern(pattern: str) -> str:
    """A DICOM wild card pattern as a LIKE pattern with escape character ``!`` (PS3.4 C.2.2.2.4)."""
    out = []
    for ch in pattern:
        if ch == "*":
            out.append("%")
        elif ch == "?":
            out.append("_")
        elif ch in "%_" + ESCAPE:
            out.append(ESCAPE + ch)
        else:
            out.append(ch)
    return "".join(out)


def _empty_clause(cond: Condition, column: sa.ColumnElement[Any]) -> sa.ColumnElement[bool]:
    """Whether the matching column holds an empty value: NULL for IS/US, '' for text and for the
    normalized DA/TM/DT keys (an unreadable date or time is kept as '')."""
    return column.is_(None) if cond.vr in A.INTEGER_VRS else column == ""


def condition_clause(cond: Condition, column: sa.ColumnElement[Any]) -> sa.ColumnElement[bool]:
    """The WHERE clause of a non-sequence condition on ``column`` (its matching column): the values'
    clause, or'ed with the empty value when it matches too (PS3.4 C.2.2.1.2, C.2.2.2.7)."""
    if cond.is_universal:
        return sa.true()
    if cond.kind is MatchKind.EMPTY:
        return _empty_clause(cond, column)
    clause = _values_clause(cond, column)
    return sa.or_(clause, _empty_clause(cond, column)) if cond.empty else clause


def _values_clause(cond: Condition, column: sa.ColumnElement[Any]) -> sa.ColumnElement[bool]:
    if cond.vr in A.TEMPORAL_VRS:
        alternatives = []
        for low, high in cond.ranges:
            parts = [column != ""]
            if low:
                parts.append(column >= low)
            if high:
                parts.append(column <= high)
            alternatives.append(sa.and_(*parts))
        return sa.or_(*alternatives)
    if cond.vr in A.INTEGER_VRS:
        numbers = sorted({int(v) for v in cond.values})
        return column == numbers[0] if len(numbers) == 1 else column.in_(numbers)
    if cond.kind is MatchKind.WILDCARD:
        return sa.or_(*(column.like(like_pattern(p), escape=ESCAPE) for p in cond.values))
    return column == cond.values[0] if len(cond.values) == 1 else column.in_(cond.values)


def _match_column(attr: A.Attribute, table: sa.FromClause) -> sa.ColumnElement[Any]:
    assert attr.column is not None
    if attr.vr == "PN":
        return table.c[attr.fold_column]
    if attr.vr in A.TEMPORAL_VRS:
        return table.c[attr.key_column]
    return table.c[attr.column]


# Access scopes ------------------------------------------------------------------------------------------
# Aliases are built once (see _C_ST below for why).
_V_SE = {column: series.alias(f"v_{column}") for column in ("institution_name", "modality")}
_V_ST = studies.alias("v_st")


def visible_clause(scope: Scope | None, st: sa.FromClause = studies) -> sa.ColumnElement[bool]:
    """Whether the study row ``st`` is visible within ``scope`` (None: unrestricted), as SQL.

    Applied inside every query (C-FIND, QIDO-RS, retrieve), so limits, offsets and counts only ever
    see visible studies; an invisible study is indistinguishable from one that does not exist.
    """
    if scope is None:
        return sa.true()
    options: list[sa.ColumnElement[bool]] = []
    if scope.has_attributes:
        parts: list[sa.ColumnElement[bool]] = []
        for values, column in ((scope.institutions, "institution_name"), (scope.modalities, "modality")):
            if values:
                se = _V_SE[column]
                parts.append(
                    sa.exists(
                        sa.select(1)
                        .select_from(se)
                        .where(se.c.study_pk == st.c.pk, se.c[column].in_(sorted(values)))
                    )
                )
        if scope.referring_physician:
            parts.append(st.c.referring_physician_name_ci == fold(scope.referring_physician))
        options.append(sa.and_(*parts))
    if scope.groups:
        options.append(
            sa.exists(
                sa.select(1)
                .select_from(study_groups)
                .where(
                    study_groups.c.study_instance_uid == st.c.study_instance_uid,
                    study_groups.c.group_name.in_(sorted(scope.groups)),
                )
            )
        )
    if scope.grantee:
        options.append(
            sa.exists(
                sa.select(1)
                .select_from(study_grants)
                .where(
                    study_grants.c.study_instance_uid == st.c.study_instance_uid,
                    study_grants.c.user_name == scope.grantee,
                    sa.or_(study_grants.c.expires_at.is_(None), study_grants.c.expires_at > sa.func.now()),
                )
            )
        )
    return sa.or_(*options) if options else sa.false()


def _visible(query: Query) -> sa.ColumnElement[bool]:
    """The scope restriction of a query at its level: the study's, or for patients, some visible study."""
    if query.scope is None:
        return sa.true()
    if query.level is QueryLevel.PATIENT:
        st = _V_ST
        return sa.exists(
            sa.select(1)
            .select_from(st)
            .where(st.c.patient_pk == patients.c.pk, visible_clause(query.scope, st))
        )
    return visible_clause(query.scope)


# Built once, like the aliases of _patient_id_clause below: making an alias of a wide table builds a
# proxy of each of its columns (noticeable for the wide instances table), and a QIDO-RS study search
# asks for two counts.
_C_ST, _C_SE, _C_IM = studies.alias("c_st"), series.alias("c_se"), instances.alias("c_im")
_M_SE, _M_IM = series.alias("m_se"), instances.alias("m_im")


def _count(attr: A.Attribute, scope: Scope | None = None) -> sa.ScalarSelect[int]:
    st, se, im = _C_ST, _C_SE, _C_IM
    count = sa.func.count()
    shown = visible_clause(scope, st)  # the patient-level counts count visible studies only
    match attr.derived:
        case A.Derived.PATIENT_STUDIES:
            stmt = sa.select(count).select_from(st).where(st.c.patient_pk == patients.c.pk, shown)
        case A.Derived.PATIENT_SERIES:
            stmt = (
                sa.select(count)
                .select_from(se.join(st, se.c.study_pk == st.c.pk))
                .where(st.c.patient_pk == patients.c.pk, shown)
            )
        case A.Derived.PATIENT_INSTANCES:
            stmt = (
                sa.select(count)
                .select_from(im.join(st, im.c.study_pk == st.c.pk))
                .where(st.c.patient_pk == patients.c.pk, shown)
            )
        case A.Derived.STUDY_SERIES:
            stmt = sa.select(count).select_from(se).where(se.c.study_pk == studies.c.pk)
        case A.Derived.STUDY_INSTANCES:
            stmt = sa.select(count).select_from(im).where(im.c.study_pk == studies.c.pk)
        case A.Derived.SERIES_INSTANCES:
            stmt = sa.select(count).select_from(im).where(im.c.series_pk == series.c.pk)
        case _:
            raise AssertionError(attr.keyword)
    return stmt.scalar_subquery()


def _answered_patient_id() -> sa.ColumnElement[str]:
    """PatientID as answered (:func:`~safepacs.dicom.matching.answered_patient_id`): a patient stored
    without one keeps its study's UID in ``anon_key``."""
    return sa.case((patients.c.patient_id == "", patients.c.anon_key), else_=patients.c.patient_id)


# Built once: an alias of a wide table costs a millisecond of column proxies each time it is made.
_P_OWN, _P_ANON, _P_STUDY = patients.alias("p_own"), patients.alias("p_anon"), studies.alias("p_st")
#: What a UID is made of (PS3.5 9.1); ingest refuses Study Instance UIDs of anything else.
_UID_CHARS = frozenset("0123456789.")


def _patient_id_clause(cond: Condition) -> sa.ColumnElement[bool]:
    """A condition on PatientID as answered: the stored Patient ID, or for a patient without one the UID
    of its one study (``anon_key``).  Written as the primary keys of the patients each way gives, so
    that SQLite and PostgreSQL both answer it from indexes."""
    if cond.kind is MatchKind.EMPTY:
        return sa.false()  # no patient is answered without a Patient ID
    cond = replace(cond, empty=False)
    uid_chars = _UID_CHARS | ({"*", "?"} if cond.kind is MatchKind.WILDCARD else set())
    if not any(set(value) <= uid_chars for value in cond.values):  # can name no study (PS3.5 9.1)
        return condition_clause(cond, patients.c.patient_id)  # which never matches ''
    own, anon, st = _P_OWN, _P_ANON, _P_STUDY
    named = sa.select(own.c.pk).where(condition_clause(cond, own.c.patient_id))
    if cond.kind is MatchKind.WILDCARD:
        unnamed = sa.select(anon.c.pk).where(anon.c.patient_id == "", condition_clause(cond, anon.c.anon_key))
    else:  # through the studies named: no scan of the patients without an ID
        unnamed = (
            sa.select(st.c.patient_pk)
            .select_from(st.join(anon, anon.c.pk == st.c.patient_pk))
            .where(condition_clause(cond, st.c.study_instance_uid), anon.c.patient_id == "")
        )
    return patients.c.pk.in_(sa.union_all(named, unnamed))


def _attribute_clause(
    cond: Condition, attr: A.Attribute, scope: Scope | None = None
) -> sa.ColumnElement[bool]:
    if attr.keyword == "PatientID":
        return _patient_id_clause(cond)
    if attr.derived is None:
        return condition_clause(cond, _match_column(attr, LEVEL_TABLES[attr.level]))
    if attr.derived in {A.Derived.MODALITIES, A.Derived.SOP_CLASSES}:
        return _distinct_clause(cond, attr.derived)
    if attr.derived is A.Derived.ONLINE:
        return sa.true() if matches([cond], {}) else sa.false()
    if attr.derived is A.Derived.TRANSFER_SYNTAX:
        return condition_clause(cond, instances.c.transfer_syntax_uid)
    return condition_clause(cond, _count(attr, scope))


def _distinct_clause(cond: Condition, derived: A.Derived) -> sa.ColumnElement[bool]:
    """ModalitiesInStudy / SOPClassesInStudy: some value of the study's series or instances matches;
    the attribute is empty when the study has no (non-empty) value."""
    if derived is A.Derived.MODALITIES:
        se = _M_SE
        rows = sa.select(1).select_from(se).where(se.c.study_pk == studies.c.pk, se.c.modality != "")
        column: sa.ColumnElement[Any] = se.c.modality
    else:
        im = _M_IM
        rows = sa.select(1).select_from(im).where(im.c.study_pk == studies.c.pk)
        column = im.c.sop_class_uid
    if cond.kind is MatchKind.EMPTY:
        return ~sa.exists(rows)
    some = sa.exists(rows.where(_values_clause(cond, column)))
    return sa.or_(some, ~sa.exists(rows)) if cond.empty else some


def _sequence_clause(cond: Condition) -> sa.ColumnElement[bool]:
    """PS3.4 C.2.2.2.6: some item of the stored sequence matches every key of the query's item."""
    spec = A.SEQUENCE_BY_KEYWORD[cond.keyword]
    table = SEQUENCE_TABLES[cond.keyword]
    owner = LEVEL_TABLES[spec.level]
    clauses = []
    for item in cond.items:
        attr = spec.item(item.keyword)
        assert attr is not None
        clauses.append(condition_clause(item, _match_column(attr, table)))
    return sa.exists(sa.select(1).select_from(table).where(table.c.owner_pk == owner.c.pk, *clauses))


def where_clauses(query: Query) -> list[sa.ColumnElement[bool]]:
    """The WHERE clauses of every restricting condition of ``query``."""
    out = []
    for cond in query.filters:
        if cond.kind is MatchKind.SEQUENCE:
            out.append(_sequence_clause(cond))
        else:
            out.append(_attribute_clause(cond, A.BY_KEYWORD[cond.keyword], query.scope))
    out.append(_visible(query))
    return out


# C-FIND -------------------------------------------------------------------------------------------------
def _levels_down_to(level: QueryLevel) -> list[QueryLevel]:
    return [lv for lv in A.LEVEL_RANK if A.usable_at(level, lv)]


def _from(level: QueryLevel, top: QueryLevel = QueryLevel.PATIENT) -> sa.FromClause:
    """The tables of ``level`` and the levels above it, up to ``top``, joined."""
    rank = A.LEVEL_RANK
    joined: sa.FromClause = LEVEL_TABLES[level]
    if level is QueryLevel.IMAGE and rank[top] <= rank[QueryLevel.SERIES]:
        joined = joined.join(series, instances.c.series_pk == series.c.pk)
    if rank[level] >= rank[QueryLevel.SERIES] and rank[top] <= rank[QueryLevel.STUDY]:
        joined = joined.join(studies, series.c.study_pk == studies.c.pk)
    if level is not QueryLevel.PATIENT and top is QueryLevel.PATIENT:
        joined = joined.join(patients, studies.c.patient_pk == patients.c.pk)
    return joined


def _top_level(query: Query) -> QueryLevel:
    """The highest level whose table the query's conditions (and scope) refer to."""
    levels = {query.level}
    for cond in query.filters:
        if cond.kind is MatchKind.SEQUENCE:
            levels.add(A.SEQUENCE_BY_KEYWORD[cond.keyword].level)
        else:
            levels.add(A.BY_KEYWORD[cond.keyword].level)
    if query.scope is not None and query.level is not QueryLevel.PATIENT:
        levels.add(QueryLevel.STUDY)
    return min(levels, key=lambda lv: A.LEVEL_RANK[lv])


def _pk_label(level: QueryLevel) -> str:
    return f"_pk_{level.value.lower()}"


@functools.lru_cache(maxsize=256)
def _find_head(level: QueryLevel, keywords: tuple[str, ...], scope: Scope | None) -> sa.Select[Any]:
    """The columns and FROM of a C-FIND at ``level`` returning ``keywords`` (in that order) for
    ``scope``: the same for every query of a shape, whatever its values, so built once per shape.
    Building it (labels, the correlated counts and their scope clauses) cost more per query than the
    SQL took to run.  A Select is immutable (``where`` returns a new one), and nothing in it depends
    on a value of the query or on the time (a grant's expiry is compared with the database's now());
    a principal whose scope changes gets another entry."""
    columns: list[sa.ColumnElement[Any]] = [
        LEVEL_TABLES[lv].c.pk.label(_pk_label(lv)) for lv in _levels_down_to(level)
    ]
    for keyword in keywords:
        attr = A.BY_KEYWORD.get(keyword)
        if attr is None:
            continue
        if attr.keyword == "PatientID":
            columns.append(_answered_patient_id().label(attr.keyword))
        elif attr.column is not None:
            columns.append(LEVEL_TABLES[attr.level].c[attr.column].label(attr.keyword))
        elif attr.derived is A.Derived.TRANSFER_SYNTAX:
            columns.append(instances.c.transfer_syntax_uid.label(attr.keyword))
        elif attr.derived not in {A.Derived.MODALITIES, A.Derived.SOP_CLASSES, A.Derived.ONLINE}:
            columns.append(_count(attr, scope).label(attr.keyword))
    return sa.select(*columns).select_from(_from(level))


def find_select(query: Query, limit: int | None, offset: int = 0) -> sa.Select[Any]:
    """The SELECT of a C-FIND: one row per matching record of the query level, ``limit + 1`` at most
    (the extra row tells that there are more), after skipping ``offset`` rows."""
    stmt = _find_head(query.level, tuple(c.keyword for c in query.conditions), query.scope)
    base = LEVEL_TABLES[query.level]
    if not limit:
        return stmt.where(*where_clauses(query)).order_by(base.c.pk)
    # The page's keys first, from the WHERE alone (an index answers it), then the columns and the
    # correlated counts of those rows only: a deep page costs no counts of the rows before it.
    page = (
        sa.select(base.c.pk)
        .select_from(_from(query.level, _top_level(query)))  # only the tables the WHERE needs
        .where(*where_clauses(query))
        .order_by(base.c.pk)
        .limit(limit + 1)
    )
    if offset:
        page = page.offset(offset)
    return stmt.where(base.c.pk.in_(page)).order_by(base.c.pk)


def _chunks(values: Sequence[_T], size: int = _CHUNK) -> Iterator[Sequence[_T]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def _distinct_below(conn: sa.Connection, keyword: str, study_pks: list[int]) -> dict[int, list[str]]:
    """ModalitiesInStudy / SOPClassesInStudy of each study (PS3.4 C.6.1.1.3)."""
    col = series.c.modality if keyword == "ModalitiesInStudy" else instances.c.sop_class_uid
    owner = series.c.study_pk if keyword == "ModalitiesInStudy" else instances.c.study_pk
    found: dict[int, set[str]] = defaultdict(set)
    for chunk in _chunks(study_pks):
        stmt = sa.select(owner, col).where(owner.in_(chunk), col != "").distinct()
        for pk, value in conn.execute(stmt):
            found[pk].add(value)
    return {pk: sorted(values) for pk, values in found.items()}


def _item_record(spec: A.Sequence, row: sa.RowMapping) -> dict[str, object]:
    return {attr.keyword: row[attr.column] for attr in spec.items if attr.column is not None}


def sequence_items(
    conn: sa.Connection, keyword: str, owner_pks: list[int]
) -> dict[int, list[dict[str, object]]]:
    """The stored items of sequence ``keyword`` per owner, as matching records, in their order."""
    spec = A.SEQUENCE_BY_KEYWORD[keyword]
    table = SEQUENCE_TABLES[keyword]
    found: dict[int, list[dict[str, object]]] = defaultdict(list)
    for chunk in _chunks(owner_pks):
        stmt = (
            sa.select(table).where(table.c.owner_pk.in_(chunk)).order_by(table.c.owner_pk, table.c.position)
        )
        for row in conn.execute(stmt).mappings():
            found[row["owner_pk"]].append(_item_record(spec, row))
    return found


def _element(keyword: str, vr: str, value: object) -> DataElement:
    if value is None or value == "" or value == []:
        value = [] if vr == "SQ" else None
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    # Stored values are returned as they were received, even when not strictly valid for their VR.
    return DataElement(tag, vr, value, validation_mode=dicom_config.IGNORE)


def _item_dataset(cond: Condition, spec: A.Sequence, item: Mapping[str, object]) -> Dataset:
    ds = Dataset()
    asked = [c.keyword for c in cond.items] or [a.keyword for a in spec.items if item.get(a.keyword)]
    for keyword in asked:
        attr = spec.item(keyword)
        assert attr is not None
        ds.add(_element(keyword, attr.vr, item.get(keyword)))
    for tag, vr in cond.unsupported:
        if not (tag >> 16) & 1:
            ds.add(DataElement(tag, vr, [] if vr == "SQ" else None))
    return ds


def run_find(conn: sa.Connection, query: Query, limit: int | None) -> list[Dataset]:
    """The response identifiers of a C-FIND (PS3.4 C.4.1.1.3.2), or QueryLimitError past ``limit``."""
    rows = conn.execute(find_select(query, limit)).mappings().all()
    if limit and len(rows) > limit:
        raise QueryLimitError(
            f"the query matched more than {limit} {_NOUNS[query.level]}; narrow it "
            f"(e.g. {_HINTS[query.level]})"
        )
    return _responses(conn, query, rows)


def run_search(conn: sa.Connection, query: Query, limit: int, offset: int) -> tuple[list[Dataset], bool]:
    """A page of a QIDO-RS search (PS3.18 8.3.4.4): at most ``limit`` responses after ``offset``, and
    whether more follow."""
    rows = conn.execute(find_select(query, limit, offset)).mappings().all()
    more = len(rows) > limit
    return _responses(conn, query, rows[:limit]), more


def run_search_json(
    conn: sa.Connection, query: Query, limit: int, offset: int
) -> tuple[list[dict[str, Any]], bool]:
    """:func:`run_search` answering DICOM JSON objects (without Query/Retrieve Level) directly, as
    :func:`~safepacs.dicom.dicomjson.dataset_json` would convert :func:`run_search`'s (PS3.18 F.2)."""
    rows = conn.execute(find_select(query, limit, offset)).mappings().all()
    more = len(rows) > limit
    rows = rows[:limit]
    extra = _extra(conn, query, rows)
    return [_response_json(query, row, extra) for row in rows], more


def _answered(
    query: Query, row: sa.RowMapping, extra: Mapping[str, Mapping[int, Any]]
) -> Iterator[tuple[str, str, object]]:
    """(keyword, VR, value) of each key the query asked for, from one result row: a sequence (VR SQ) as
    the matching items of the row's record, a derived key (ModalitiesInStudy, SOPClassesInStudy,
    InstanceAvailability) as computed, any other key as its column.  What both the C-FIND data sets
    and the QIDO-RS DICOM JSON answer."""
    for cond in query.conditions:
        if cond.kind is MatchKind.SEQUENCE:
            spec = A.SEQUENCE_BY_KEYWORD[cond.keyword]
            items = extra[cond.keyword].get(row[_pk_label(spec.level)], [])
            chosen = [i for i in items if cond.is_universal or matches(cond.items, i)]
            yield cond.keyword, "SQ", DicomSequence([_item_dataset(cond, spec, i) for i in chosen])
            continue
        attr = A.BY_KEYWORD[cond.keyword]
        if attr.derived is A.Derived.ONLINE:
            value: object = "ONLINE"
        elif attr.derived in {A.Derived.MODALITIES, A.Derived.SOP_CLASSES}:
            value = extra[cond.keyword].get(row[_pk_label(QueryLevel.STUDY)], [])
        else:
            value = row[cond.keyword]
        yield cond.keyword, attr.vr, value


def _response_json(
    query: Query, row: sa.RowMapping, extra: Mapping[str, Mapping[int, Any]]
) -> dict[str, Any]:
    out: dict[str, Any] = {"00080005": {"vr": "CS", "Value": [RESPONSE_CHARSET]}}
    for keyword, vr, value in _answered(query, row, extra):
        if vr == "SQ":
            out[tag_key(keyword)] = data_element_json(_element(keyword, vr, value))
        else:
            out[tag_key(keyword)] = element_json(keyword, vr, value)
    for tag, vr in query.unsupported:
        if not (tag >> 16) & 1:
            out[f"{tag:08X}"] = {"vr": vr}  # asked for, not indexed: empty (PS3.18 F.2.5)
    return dict(sorted(out.items()))


def _extra(conn: sa.Connection, query: Query, rows: Sequence[sa.RowMapping]) -> dict[str, dict[int, Any]]:
    extra: dict[str, dict[int, Any]] = {}
    for cond in query.conditions:
        if cond.keyword in {"ModalitiesInStudy", "SOPClassesInStudy"}:
            pks = [row[_pk_label(QueryLevel.STUDY)] for row in rows]
            extra[cond.keyword] = _distinct_below(conn, cond.keyword, pks)
        elif cond.kind is MatchKind.SEQUENCE:
            level = A.SEQUENCE_BY_KEYWORD[cond.keyword].level
            pks = [row[_pk_label(level)] for row in rows]
            extra[cond.keyword] = sequence_items(conn, cond.keyword, sorted(set(pks)))
    return extra


def run_find_encoded(
    conn: sa.Connection, query: Query, limit: int | None, *, implicit_vr: bool, fill: Mapping[int, str]
) -> list[bytes | None]:
    """:func:`run_find`'s response identifiers encoded as pynetdicom encodes them for the C-FIND-RSP
    (Implicit or Explicit VR Little Endian), written from the rows (:mod:`~safepacs.dicom.dicombytes`)
    without a data set each.  ``fill``: values for keys the index does not keep, by tag (RetrieveAETitle,
    which the query service answers).  None in place of a response that pydicom could not encode either
    (pynetdicom then answered 0xC312 instead of it)."""
    rows = conn.execute(find_select(query, limit)).mappings().all()
    if limit and len(rows) > limit:
        raise QueryLimitError(
            f"the query matched more than {limit} {_NOUNS[query.level]}; narrow it "
            f"(e.g. {_HINTS[query.level]})"
        )
    extra = _extra(conn, query, rows)
    try:
        parts = _encoder(query, implicit_vr, fill)
    except Unencodable:
        parts = None
    out: list[bytes | None] = []
    for row in rows:
        if parts is not None:
            try:
                out.append(b"".join(p if isinstance(p, bytes) else p(row, extra) for p in parts))
                continue
            except Unencodable:
                pass
        out.append(_pydicom_encoded(_response(query, row, extra), implicit_vr, fill))
    return out


#: Rows and what ``_extra`` found for them -> the bytes of one element.
_Extra = Mapping[str, Mapping[int, Any]]
_Part = Callable[[sa.RowMapping, _Extra], bytes]


def _tag(keyword: str) -> int:
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    return int(tag)


def _encoder(query: Query, implicit: bool, fill: Mapping[int, str]) -> list[bytes | _Part]:
    """How :func:`_response`'s data set for a row is written (PS3.5 7.1): its elements in ascending tag
    order, each constant (bytes) or made from the row; constant neighbours joined."""
    level = query.level.value
    elements: dict[int, bytes | _Part] = {
        0x00080005: B.element(0x00080005, "CS", RESPONSE_CHARSET, implicit),
        0x00080052: B.element(0x00080052, "CS", level, implicit),
    }
    for cond in query.conditions:
        tag = _tag(cond.keyword)
        if cond.kind is MatchKind.SEQUENCE:
            elements[tag] = _sequence_part(cond, tag, implicit)
            continue
        attr = A.BY_KEYWORD[cond.keyword]
        if attr.derived is A.Derived.ONLINE:
            elements[tag] = B.element(tag, attr.vr, "ONLINE", implicit)
        elif attr.derived in {A.Derived.MODALITIES, A.Derived.SOP_CLASSES}:
            elements[tag] = _derived_part(cond.keyword, tag, attr.vr, _pk_label(QueryLevel.STUDY), implicit)
        else:
            elements[tag] = _column_part(cond.keyword, tag, attr.vr, implicit)
    for tag, vr in query.unsupported:
        if (tag >> 16) & 1:
            continue  # private keys are not answered
        if tag < 0x00080000:
            raise Unencodable(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) in an identifier")
        elements[tag] = (
            B.element(tag, vr, fill[tag], implicit) if tag in fill else B.empty_element(tag, vr, implicit)
        )
    parts: list[bytes | _Part] = []
    for _, part in sorted(elements.items()):
        if isinstance(part, bytes) and parts and isinstance(parts[-1], bytes):
            parts[-1] += part
        else:
            parts.append(part)
    return parts


def _column_part(keyword: str, tag: int, vr: str, implicit: bool) -> _Part:
    write = B.writer(tag, vr, implicit)

    def part(row: sa.RowMapping, extra: _Extra) -> bytes:
        return write(row[keyword])

    return part


def _derived_part(keyword: str, tag: int, vr: str, pk: str, implicit: bool) -> _Part:
    write = B.writer(tag, vr, implicit)

    def part(row: sa.RowMapping, extra: _Extra) -> bytes:
        return write(extra[keyword].get(row[pk], []))

    return part


def _sequence_part(cond: Condition, tag: int, implicit: bool) -> _Part:
    """A sequence key: the stored items that match the query's item (:func:`_item_dataset`)."""
    spec = A.SEQUENCE_BY_KEYWORD[cond.keyword]
    pk = _pk_label(spec.level)
    asked = [(_tag(c.keyword), c.keyword) for c in cond.items]
    unsupported = sorted(
        (t, B.empty_element(t, vr, implicit)) for t, vr in cond.unsupported if not (t >> 16) & 1
    )
    vrs = {a.keyword: a.vr for a in spec.items}
    every = sorted((_tag(a.keyword), a.keyword) for a in spec.items)

    def part(row: sa.RowMapping, extra: _Extra) -> bytes:
        items = []
        for record in extra[cond.keyword].get(row[pk], []):
            if not (cond.is_universal or matches(cond.items, record)):
                continue
            keys = asked or [(t, k) for t, k in every if record.get(k)]
            out = {t: B.element(t, vrs[k], record.get(k), implicit) for t, k in keys}
            out.update(unsupported)
            items.append(B.item(out[t] for t in sorted(out)))
        body = b"".join(items)
        return B.header(tag, "SQ", len(body), implicit) + body

    return part


def _pydicom_encoded(ds: Dataset, implicit: bool, fill: Mapping[int, str]) -> bytes | None:
    """``ds`` with ``fill`` applied, encoded by pydicom as pynetdicom's ``dsutils.encode`` does; None
    when that fails."""
    for tag, value in fill.items():
        if tag in ds:
            ds[tag].value = value
        else:
            ds.add(DataElement(tag, dictionary_VR(tag), value))
    fp = DicomBytesIO()
    fp.is_implicit_VR = implicit
    fp.is_little_endian = True
    try:
        write_dataset(fp, ds)
    except Exception:  # noqa: BLE001 - whatever pydicom fails on, the response cannot be encoded
        return None
    return fp.getvalue()


def _responses(conn: sa.Connection, query: Query, rows: Sequence[sa.RowMapping]) -> list[Dataset]:
    extra = _extra(conn, query, rows)
    return [_response(query, row, extra) for row in rows]


def _response(query: Query, row: sa.RowMapping, extra: Mapping[str, Mapping[int, Any]]) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = RESPONSE_CHARSET
    ds.QueryRetrieveLevel = query.level.value
    for keyword, vr, value in _answered(query, row, extra):
        ds.add(_element(keyword, vr, value))
    for tag, vr in query.unsupported:
        if not (tag >> 16) & 1:  # private keys are not answered
            ds.add(DataElement(tag, vr, [] if vr == "SQ" else None))
    return ds


# C-GET / C-MOVE ----------------------------------------------------------------------------------------
_KEY_COLUMNS: dict[str, sa.Column[Any]] = {
    "PatientID": patients.c.patient_id,
    "IssuerOfPatientID": patients.c.issuer_of_patient_id,
    "StudyInstanceUID": studies.c.study_instance_uid,
    "SeriesInstanceUID": series.c.series_instance_uid,
    "SOPInstanceUID": instances.c.sop_instance_uid,
}


def _key_clause(keyword: str, values: Sequence[str]) -> sa.ColumnElement[bool]:
    """A unique key of a retrieve, matched literally; PatientID as C-FIND answers it."""
    if keyword == "PatientID":
        return _patient_id_clause(Condition(keyword, "LO", MatchKind.LIST, tuple(values)))
    return _KEY_COLUMNS[keyword].in_(values)


def run_retrieve(
    conn: sa.Connection, keys: Mapping[str, tuple[str, ...]], main: str, scope: Scope | None = None
) -> list[InstanceRef]:
    """The instances under the unique keys ``keys`` (PS3.4 C.4.2.2.1) in studies visible within ``scope``;
    ``main`` is the retrieve level's key, whose (possibly long) list of values is queried in chunks."""
    base = (
        sa.select(
            studies.c.study_instance_uid,
            series.c.series_instance_uid,
            instances.c.sop_class_uid,
            instances.c.sop_instance_uid,
            instances.c.transfer_syntax_uid,
            instances.c.blob_id,
            instances.c.key_id,
            instances.c.sha256,
            instances.c.size,
            studies.c.pk,
            series.c.pk,
            instances.c.instance_number,
            instances.c.pk,
            instances.c.seal_tag,
        )
        .select_from(_from(QueryLevel.IMAGE))
        .where(*(_key_clause(k, v) for k, v in keys.items() if k != main), visible_clause(scope))
    )
    found: dict[str, tuple[Any, ...]] = {}
    for chunk in _chunks(sorted(set(keys[main]))):
        for row in conn.execute(base.where(_key_clause(main, chunk))):
            found[row[3]] = tuple(row)
    ordered = sorted(found.values(), key=lambda r: (r[9], r[10], r[11] is None, r[11] or 0, r[12]))
    return [
        InstanceRef(r[0], r[1], r[2], r[3], r[4], StoredBlob(r[5], r[6], r[7], r[8], r[13])) for r in ordered
    ]
