"""Indexing one instance: its header read once into rows, and the statements that store them.

Ingest calls this for every object received, so it is built for the common case, another instance of a
series the index knows, which costs two statements: one ``SELECT`` of the series with its study and
patient, and the ``INSERT ... ON CONFLICT DO NOTHING RETURNING`` of the instance (no row back: the SOP
Instance UID is indexed already, and the transaction is rolled back).  A study, series or patient row
is updated (``updated_at`` too) only when the instance brings a value it does not hold yet, and the
items of a sequence are rewritten only when they differ from those kept.  The first instance of a
study adds a lookup of the study, the patient's lookup or insert, and the study and series inserts.

The statements of adding are built once per :class:`Writer` and run with their parameters, so
SQLAlchemy finds the compiled form in its cache instead of building and hashing a statement per call
(replacing and deleting, rare, build theirs as they go).  Races between writers are left to the unique
constraints (``ON CONFLICT DO NOTHING``, then a lookup of the winner's row) and, on PostgreSQL, to the
retries of :class:`~safepacs.db.database.Database` (a foreign key race raises 23503).
"""

from __future__ import annotations

import logging
import sqlite3
import struct
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

import sqlalchemy as sa
from pydicom.charset import convert_encodings
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql.compiler import SQLCompiler

from safepacs.db.schema import SEQUENCE_TABLES, attribute_columns, instances, patients, series, studies
from safepacs.dicom import attributes as A
from safepacs.dicom.matching import fold, normalize_stored, to_int
from safepacs.errors import ConflictError, InvalidObjectError
from safepacs.types import QueryLevel, StoredBlob

__all__ = [
    "InstanceRows",
    "LevelRows",
    "Writer",
    "attribute_values",
    "driver_execute",
    "read_header",
]

log = logging.getLogger(__name__)

_MAX_ITEMS = 64  # sequence items kept per sequence and record
_EXISTS = "an instance with this SOP Instance UID is indexed already"

Columns = dict[str, object]


# Headers -> rows ---------------------------------------------------------------------------------------
def attribute_values(attr: A.Attribute, text: str | None) -> Columns:
    """The column values that keep ``text`` for ``attr`` (see :mod:`safepacs.db.schema`)."""
    assert attr.column is not None
    if attr.vr in A.INTEGER_VRS:
        return {attr.column: to_int(text.split("\\")[0]) if text else None}
    text = text or ""
    if attr.vr == "DA":
        return {attr.column: normalize_stored("DA", text)}
    if attr.vr == "PN":
        return {attr.column: text, attr.fold_column: fold(text)}
    if attr.vr in A.TEMPORAL_VRS:
        return {attr.column: text, attr.key_column: normalize_stored(attr.vr, text)}
    return {attr.column: text}


def _tag(keyword: str) -> int:
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    return int(tag)


@dataclass(frozen=True)
class _Key:
    """An attribute read from headers: its tag, and its columns when the header lacks it."""

    tag: int
    attr: A.Attribute
    empty: Columns


def _key(attr: A.Attribute) -> _Key:
    return _Key(_tag(attr.keyword), attr, attribute_values(attr, None))


_LEVEL_KEYS: dict[QueryLevel, tuple[_Key, ...]] = {
    level: tuple(_key(a) for a in A.ATTRIBUTES if a.level is level and a.column is not None)
    for level in QueryLevel
}
_LEVEL_SEQUENCES: dict[QueryLevel, tuple[tuple[int, A.Sequence, tuple[_Key, ...]], ...]] = {
    level: tuple(
        (_tag(s.keyword), s, tuple(_key(a) for a in s.items)) for s in A.SEQUENCES if s.level is level
    )
    for level in QueryLevel
}


# What :func:`read_header` reads must be what :data:`~safepacs.dicom.attributes.HEADER_TAGS` names.
_READ_TAGS: tuple[int, ...] = tuple(
    sorted(
        {key.tag for keys in _LEVEL_KEYS.values() for key in keys}
        | {number for sequences in _LEVEL_SEQUENCES.values() for number, _, _ in sequences}
    )
)


def _tags(ds: Dataset) -> dict[int, Any]:
    """The tags of ``ds``, by number, as the data set's own keys: looking an element up by its own key
    object spares pydicom's tag comparisons (written in Python) on every dictionary access."""
    keys = ds.keys()
    return dict(zip(map(int, keys), keys, strict=True))


# Value representations whose bytes pydicom decodes with the default (Latin-1) codec, and those it
# decodes with the Specific Character Set (PS3.5 6.1.2.3); LT, ST, UT, UR hold one value.
_DEFAULT_CODEC_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI", "UR"})
_CHARSET_VRS = frozenset({"SH", "LO", "PN", "ST", "LT", "UC", "UT"})
_SINGLE_VALUE_VRS = frozenset({"LT", "ST", "UT", "UR"})
_BINARY_INTEGER_VRS = {"US": "H", "SS": "h", "UL": "L", "SL": "l"}  # struct codes (PS3.5 6.2)
_ESC = 0x1B


def _raw_text(raw: RawDataElement, vr: str, encoding: str) -> str | None:
    """The text of a still undecoded element as pydicom would give it, or None when only pydicom can
    say (ISO 2022 escapes, unknown VR or codec, undecodable bytes).

    Converting through pydicom is slow per element and the index reads ~30 per instance; the
    bytes of these VRs decode with one codec, which is what pydicom does too (``charset.decode_bytes``
    without escape sequences), value by value after splitting on the backslash.
    """
    value = raw.value
    if not isinstance(value, bytes):
        return None
    if vr in _BINARY_INTEGER_VRS:
        return _raw_integers(value, vr, raw.is_little_endian)
    if vr in _DEFAULT_CODEC_VRS:
        codec = "latin-1"
    elif vr in _CHARSET_VRS and _ESC not in value:
        codec = encoding
    else:
        return None
    try:
        if vr in _SINGLE_VALUE_VRS or b"\\" not in value:  # one value: most of them
            return value.decode(codec).strip(" \x00")
        return "\\".join(p.decode(codec).strip(" \x00") for p in value.split(b"\\"))
    except (LookupError, UnicodeError):
        return None


def _raw_integers(value: bytes, vr: str, little_endian: bool) -> str | None:
    """The values of a binary integer element (US, SS, UL, SL) as pydicom would give them, "\\"-joined;
    None when the length is not a whole number of values (pydicom decides then)."""
    code = _BINARY_INTEGER_VRS[vr]
    size = struct.calcsize("<" + code)  # standard sizes: 2 or 4 bytes (native "L" is 8)
    if len(value) % size:
        return None
    form = ("<" if little_endian else ">") + code * (len(value) // size)
    return "\\".join(str(v) for v in struct.unpack(form, value))


def _text(ds: Dataset, tag: Any, vr: str, encoding: str) -> str | None:
    """The value of a present element as text ("\\"-joined when multi-valued); None when unreadable."""
    raw = ds.get_item(tag)
    if isinstance(raw, RawDataElement) and (raw.VR is None or raw.VR == vr):
        text = _raw_text(raw, vr, encoding)
        if text is not None:
            return text
    return _converted_text(ds, tag)


def _converted_text(ds: Dataset, tag: Any) -> str | None:
    """The same text through pydicom's value conversion (the reference :func:`_raw_text` must match)."""
    try:
        value = ds[tag].value
    except Exception:  # noqa: BLE001 - a malformed optional value is indexed as empty, not fatal
        return None
    if value is None:
        return None
    parts = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    return "\\".join(str(p).strip(" \x00") for p in parts if not isinstance(p, bytes | Dataset))


def _encoding(ds: Dataset, inherited: str = "iso8859") -> str:
    """The codec of a data set without code extensions (the first of its Specific Character Set)."""
    if 0x00080005 not in ds:
        return inherited
    try:
        return convert_encodings(ds.get("SpecificCharacterSet"))[0]
    except Exception:  # noqa: BLE001 - an unknown character set: pydicom's conversion decides
        return ""


def _item_row(item: Dataset, keys: tuple[_Key, ...], encoding: str) -> Columns:
    found = _tags(item)
    encoding = _encoding(item, encoding)
    row: Columns = {}
    for key in keys:
        tag = found.get(key.tag)
        text = None if tag is None else _text(item, tag, key.attr.vr, encoding)
        row.update(key.empty if tag is None else attribute_values(key.attr, text))
    return row


def _items(header: Dataset, tag: Any) -> list[Dataset]:
    try:
        return list(header[tag].value or [])[:_MAX_ITEMS]
    except Exception:  # noqa: BLE001 - a malformed optional sequence is indexed as empty, not fatal
        return []


@dataclass(frozen=True)
class LevelRows:
    """What an instance header says about one level."""

    columns: Columns  # every stored column, '' (or NULL) for attributes the header lacks
    present: Columns  # only the attributes with a value: what a later instance updates
    sequences: dict[str, list[Columns]]  # the items of the sequences the header holds


def _level_rows(header: Dataset, found: dict[int, Any], level: QueryLevel, encoding: str) -> LevelRows:
    columns: Columns = {}
    present: Columns = {}
    for key in _LEVEL_KEYS[level]:
        tag = found.get(key.tag)
        text = None if tag is None else _text(header, tag, key.attr.vr, encoding)
        if text:
            values = attribute_values(key.attr, text)
            columns.update(values)
            present.update(values)
        else:
            columns.update(key.empty)
    sequences: dict[str, list[Columns]] = {}
    for number, spec, keys in _LEVEL_SEQUENCES[level]:
        tag = found.get(number)
        if tag is not None:
            rows = [_item_row(item, keys, encoding) for item in _items(header, tag)]
            if rows:
                sequences[spec.keyword] = rows
    return LevelRows(columns, present, sequences)


@dataclass(frozen=True)
class InstanceRows:
    """An instance header read into the rows of each level."""

    levels: dict[QueryLevel, LevelRows]
    study_uid: str
    series_uid: str
    sop_uid: str
    patient_key: tuple[str, str, str]  # PatientID, IssuerOfPatientID, anon_key (see schema.patients)


def read_header(header: Dataset) -> InstanceRows:
    """Read the indexed attributes of an instance header, each once; InvalidObjectError without its UIDs."""
    found = _tags(header)
    encoding = _encoding(header)
    levels = {level: _level_rows(header, found, level, encoding) for level in QueryLevel}
    study_uid = str(levels[QueryLevel.STUDY].columns["study_instance_uid"])
    series_uid = str(levels[QueryLevel.SERIES].columns["series_instance_uid"])
    sop_uid = str(levels[QueryLevel.IMAGE].columns["sop_instance_uid"])
    if not (study_uid and series_uid and sop_uid):
        raise InvalidObjectError(
            "the data set lacks a Study, Series or SOP Instance UID; it cannot be indexed"
        )
    patient = levels[QueryLevel.PATIENT].columns
    pid, issuer = str(patient["patient_id"]), str(patient["issuer_of_patient_id"])
    return InstanceRows(levels, study_uid, series_uid, sop_uid, (pid, issuer, "" if pid else study_uid))


# Rows -> statements ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Part:
    """The columns of one level in a lookup: pk, a second column, then the stored attributes."""

    table: sa.Table
    second: str  # the parent's pk, or anon_key for patients
    names: tuple[str, ...]

    @property
    def columns(self) -> list[sa.Column[Any]]:
        return [self.table.c.pk, self.table.c[self.second], *(self.table.c[n] for n in self.names)]

    def read(self, row: sa.Row[Any], start: int) -> _Stored:
        end = start + 2 + len(self.names)
        return _Stored(row[start], row[start + 1], dict(zip(self.names, row[start + 2 : end], strict=True)))


@dataclass(frozen=True)
class _Stored:
    """A stored patient, study or series row as a lookup found it."""

    pk: int
    second: Any
    values: Columns


def _part(table: sa.Table, second: str, level: QueryLevel) -> _Part:
    names = tuple(c.name for k in _LEVEL_KEYS[level] for c in attribute_columns(k.attr))
    return _Part(table, second, names)


_PATIENT = _part(patients, "anon_key", QueryLevel.PATIENT)
_STUDY = _part(studies, "patient_pk", QueryLevel.STUDY)
_SERIES = _part(series, "study_pk", QueryLevel.SERIES)
_STUDY_WIDTH = 2 + len(_STUDY.names)
_SERIES_WIDTH = 2 + len(_SERIES.names)


def _item_params(items: list[Columns], owner_pk: int) -> list[Columns]:
    return [{**item, "owner_pk": owner_pk, "position": n} for n, item in enumerate(items)]


def _insert(dialect: str, table: sa.Table) -> sa.Executable:
    stmt = sqlite.insert(table) if dialect == "sqlite" else postgresql.insert(table)
    return stmt.on_conflict_do_nothing().returning(table.c.pk)


class _Driver:
    """The two statements of the common case - the series lookup and the instance insert - compiled once
    and sent to SQLite's driver directly.

    Through SQLAlchemy each cost several times more Python per instance (cache key, execution context,
    result metadata) than SQLite takes to run the statement, inside the transaction that holds the
    index's write lock (bench/README.md, "Ingest benchmark").  Only statements whose columns need no
    SQLAlchemy type processing on the way out, and whose inserts have no Python-side defaults, qualify;
    errors are raised as SQLAlchemy would raise them (and retried alike), without their parameters.
    """

    def __init__(self, series_lookup: sa.Select[Any], instance_insert: sa.Executable) -> None:
        self._dialect = sqlite.dialect()
        # The dialect's own implementation of each type holds its processors (DateTime's: timestamps
        # are stored as SQLAlchemy's text, not sqlite3's); the generic type has none.
        if any(
            c.type.dialect_impl(self._dialect).result_processor(self._dialect, None)
            for c in series_lookup.selected_columns
        ):
            raise ValueError("the series lookup needs SQLAlchemy's result processing")  # pragma: no cover
        self._series = self._compile(series_lookup, None)
        self._instance_insert = instance_insert
        self._inserts: dict[tuple[str, ...], tuple[str, list[tuple[str, Any]]]] = {}

    def _compile(self, stmt: Any, keys: list[str] | None) -> tuple[str, list[tuple[str, Any]]]:
        compiled = cast(SQLCompiler, stmt.compile(dialect=self._dialect, column_keys=keys))
        binds = [
            (name, compiled.binds[name].type.dialect_impl(self._dialect).bind_processor(self._dialect))
            for name in compiled.positiontup or []
        ]
        return str(compiled), binds

    def series(self, conn: sa.Connection, uid: str) -> Any:
        found = self._run(conn, self._series, {"uid": uid}).fetchall()  # at most one: the UID is unique
        return found[0] if found else None

    def insert_instance(self, conn: sa.Connection, row: Columns) -> int | None:
        keys = tuple(row)
        compiled = self._inserts.get(keys)
        if compiled is None:
            compiled = self._inserts[keys] = self._compile(self._instance_insert, list(keys))
        found = self._run(conn, compiled, row).fetchall()
        return int(found[0][0]) if found else None

    @staticmethod
    def _run(conn: sa.Connection, compiled: tuple[str, list[tuple[str, Any]]], params: Columns) -> Any:
        sql, binds = compiled
        values = tuple(process(params[name]) if process else params[name] for name, process in binds)
        return driver_execute(conn, sql, values)


def driver_execute(conn: sa.Connection, sql: str, values: tuple[Any, ...] = ()) -> Any:
    """Run ``sql`` on the sqlite3 connection under ``conn``, past SQLAlchemy's execution machinery (a
    few tens of microseconds a statement); its errors raised as SQLAlchemy raises them, without the
    values (patient names and IDs) in their text."""
    try:
        return conn.connection.driver_connection.execute(sql, values)  # type: ignore[union-attr]
    except sqlite3.IntegrityError as exc:
        raise sa.exc.IntegrityError(sql, None, exc, hide_parameters=True) from exc
    except sqlite3.OperationalError as exc:
        raise sa.exc.OperationalError(sql, None, exc, hide_parameters=True) from exc
    except sqlite3.Error as exc:
        raise sa.exc.DatabaseError(sql, None, exc, hide_parameters=True) from exc


class Writer:
    """The write path of the index on one SQL dialect; its statements are built once, here."""

    def __init__(self, dialect: str) -> None:
        self._inserts = {t.name: _insert(dialect, t) for t in (patients, studies, series, instances)}
        self._updates = {
            t.name: sa.update(t).where(t.c.pk == sa.bindparam("key_pk")) for t in (patients, studies, series)
        }
        uid: sa.BindParameter[str] = sa.bindparam("uid")
        self._series = (
            sa.select(*_SERIES.columns, *_STUDY.columns, *_PATIENT.columns)
            .select_from(
                series.join(studies, series.c.study_pk == studies.c.pk).join(
                    patients, studies.c.patient_pk == patients.c.pk
                )
            )
            .where(series.c.series_instance_uid == uid)
        )
        self._driver = _Driver(self._series, self._inserts["instances"]) if dialect == "sqlite" else None
        self._study = (
            sa.select(*_STUDY.columns, *_PATIENT.columns)
            .select_from(studies.join(patients, studies.c.patient_pk == patients.c.pk))
            .where(studies.c.study_instance_uid == uid)
        )
        self._patient = sa.select(*_PATIENT.columns).where(
            patients.c.patient_id == sa.bindparam("pid"),
            patients.c.issuer_of_patient_id == sa.bindparam("issuer"),
            patients.c.anon_key == sa.bindparam("anon"),
        )
        self._instance = sa.select(
            instances.c.pk,
            instances.c.series_pk,
            instances.c.study_pk,
            instances.c.blob_id,
            instances.c.key_id,
            instances.c.sha256,
            instances.c.size,
            instances.c.created_at,
        ).where(instances.c.sop_instance_uid == uid)
        owner: sa.BindParameter[int] = sa.bindparam("owner")
        self._items: dict[str, tuple[sa.Executable, sa.Executable, sa.Executable]] = {}
        for keyword, table in SEQUENCE_TABLES.items():
            stored = [c for c in table.c if c.name not in {"pk", "owner_pk", "position"}]
            self._items[keyword] = (
                sa.select(*stored).where(table.c.owner_pk == owner).order_by(table.c.position),
                sa.delete(table).where(table.c.owner_pk == owner),
                sa.insert(table),
            )

    # Adding ---------------------------------------------------------------------------------------------
    def add(
        self,
        conn: sa.Connection,
        rows: InstanceRows,
        values: Columns,
        now: datetime,
        *,
        replace: bool,
    ) -> StoredBlob | None:
        """Index an instance (see :meth:`safepacs.db.instances.SqlInstances.add_instance`); ``values`` are the
        instance columns that do not come from the header."""
        old: StoredBlob | None = None
        created = now
        if replace:
            found = conn.execute(self._instance, {"uid": rows.sop_uid}).first()
            if found is not None:
                pk, series_pk, study_pk, blob_id, key_id, sha256, size, created = found
                old = StoredBlob(blob_id, key_id, sha256, size)
                self.remove(conn, pk, series_pk, study_pk)
        study_pk, series_pk, moved = self._parents(conn, rows, now, replace)
        image = rows.levels[QueryLevel.IMAGE]
        row = {
            **image.columns,
            **values,
            "series_pk": series_pk,
            "study_pk": study_pk,
            "created_at": created,
            "updated_at": now,
        }
        if self._driver is not None:
            pk = self._driver.insert_instance(conn, row)
        else:
            pk = conn.execute(self._inserts["instances"], row).scalar()
        if pk is None:
            raise ConflictError(_EXISTS)
        if moved:
            log.warning(
                "an instance names another patient than its stored study; the study keeps its patient"
            )
        self._add_items(conn, image.sequences, pk)
        return old

    def _parents(
        self, conn: sa.Connection, rows: InstanceRows, now: datetime, replace: bool
    ) -> tuple[int, int, bool]:
        """The study and series pks of the instance, created or updated; and whether the instance
        names another patient than its stored study."""
        if self._driver is not None:
            found = self._driver.series(conn, rows.series_uid)
        else:
            found = conn.execute(self._series, {"uid": rows.series_uid}).first()
        if found is not None:  # the common case: another instance of a known series
            stored = _SERIES.read(found, 0)
            study = _STUDY.read(found, _SERIES_WIDTH)
            patient = _PATIENT.read(found, _SERIES_WIDTH + _STUDY_WIDTH)
            if study.values["study_instance_uid"] != rows.study_uid:
                self._refuse_series(conn, rows, replace)
            moved = self._update_study(conn, rows, study, patient, now)
            self._update(conn, "series", stored, rows.levels[QueryLevel.SERIES], now)
            return study.pk, stored.pk, moved
        study_pk, moved = self._study_pk(conn, rows, now)
        level = rows.levels[QueryLevel.SERIES]
        new = {**level.columns, "study_pk": study_pk, "created_at": now, "updated_at": now}
        series_pk = conn.execute(self._inserts["series"], new).scalar()
        if series_pk is not None:
            self._add_items(conn, level.sequences, series_pk)
            return study_pk, series_pk, moved
        # Another writer created the series meanwhile.
        stored = _SERIES.read(conn.execute(self._series, {"uid": rows.series_uid}).one(), 0)
        if stored.second != study_pk:
            self._refuse_series(conn, rows, replace)
        self._update(conn, "series", stored, level, now)
        return study_pk, stored.pk, moved

    def _refuse_series(self, conn: sa.Connection, rows: InstanceRows, replace: bool) -> None:
        # An instance indexed already is a conflict, whatever else it says.
        if not replace and conn.execute(self._instance, {"uid": rows.sop_uid}).first() is not None:
            raise ConflictError(_EXISTS)
        raise InvalidObjectError(
            "the instance's Series Instance UID belongs to another study already; it was not stored"
        )

    def _study_pk(self, conn: sa.Connection, rows: InstanceRows, now: datetime) -> tuple[int, bool]:
        found = conn.execute(self._study, {"uid": rows.study_uid}).first()
        if found is None:
            patient_pk = self._patient_pk(conn, rows, now)
            level = rows.levels[QueryLevel.STUDY]
            new = {**level.columns, "patient_pk": patient_pk, "created_at": now, "updated_at": now}
            study_pk = conn.execute(self._inserts["studies"], new).scalar()
            if study_pk is not None:
                self._add_items(conn, level.sequences, study_pk)
                return study_pk, False
            found = conn.execute(self._study, {"uid": rows.study_uid}).one()  # lost a race
        study = _STUDY.read(found, 0)
        patient = _PATIENT.read(found, _STUDY_WIDTH)
        return study.pk, self._update_study(conn, rows, study, patient, now)

    def _patient_pk(self, conn: sa.Connection, rows: InstanceRows, now: datetime) -> int:
        pid, issuer, anon = rows.patient_key
        key = {"pid": pid, "issuer": issuer, "anon": anon}
        level = rows.levels[QueryLevel.PATIENT]
        found = conn.execute(self._patient, key).first()
        if found is None:
            new = {**level.columns, "anon_key": anon, "created_at": now, "updated_at": now}
            patient_pk = conn.execute(self._inserts["patients"], new).scalar()
            if patient_pk is not None:
                self._add_items(conn, level.sequences, patient_pk)
                return int(patient_pk)
            found = conn.execute(self._patient, key).one()  # lost a race
        patient = _PATIENT.read(found, 0)
        self._update(conn, "patients", patient, level, now)
        return patient.pk

    def _update_study(
        self, conn: sa.Connection, rows: InstanceRows, study: _Stored, patient: _Stored, now: datetime
    ) -> bool:
        """Update a stored study and, unless the instance names another one, its patient; whether it does."""
        stored_key = (patient.values["patient_id"], patient.values["issuer_of_patient_id"], patient.second)
        moved = stored_key != rows.patient_key
        if not moved:
            self._update(conn, "patients", patient, rows.levels[QueryLevel.PATIENT], now)
        self._update(conn, "studies", study, rows.levels[QueryLevel.STUDY], now)
        return moved

    def _update(
        self, conn: sa.Connection, table: str, stored: _Stored, level: LevelRows, now: datetime
    ) -> None:
        """Latest non-empty value wins: write the values the row does not hold yet, and the sequences
        whose items differ from those kept."""
        changed = {k: v for k, v in level.present.items() if stored.values[k] != v}
        if changed:
            conn.execute(self._updates[table], {**changed, "updated_at": now, "key_pk": stored.pk})
        for keyword, items in level.sequences.items():
            select, delete, insert = self._items[keyword]
            kept = [dict(r) for r in conn.execute(select, {"owner": stored.pk}).mappings()]
            if kept != items:
                conn.execute(delete, {"owner": stored.pk})
                conn.execute(
                    insert, [{**r, "owner_pk": stored.pk, "position": n} for n, r in enumerate(items)]
                )

    def _add_items(self, conn: sa.Connection, sequences: dict[str, list[Columns]], owner_pk: int) -> None:
        for keyword, items in sequences.items():
            conn.execute(self._items[keyword][2], _item_params(items, owner_pk))

    # Removing -------------------------------------------------------------------------------------------
    def remove(self, conn: sa.Connection, pk: int, series_pk: int, study_pk: int) -> None:
        """Delete one instance row and the series, study and patient rows it leaves empty."""
        patient_pk = conn.execute(
            sa.select(studies.c.patient_pk).where(studies.c.pk == study_pk)
        ).scalar_one()
        # Lock top-down (PostgreSQL; a no-op on SQLite, which holds the database lock) so that two
        # removals in one series cannot both see the other's instance and leave an empty series behind.
        for table, key in ((patients, patient_pk), (studies, study_pk), (series, series_pk)):
            conn.execute(sa.select(table.c.pk).where(table.c.pk == key).with_for_update())
        self._delete_items(conn, QueryLevel.IMAGE, pk)
        conn.execute(sa.delete(instances).where(instances.c.pk == pk))
        chain = (
            (series, series_pk, instances.c.series_pk, QueryLevel.SERIES),
            (studies, study_pk, series.c.study_pk, QueryLevel.STUDY),
            (patients, patient_pk, studies.c.patient_pk, QueryLevel.PATIENT),
        )
        for table, key, child_fk, level in chain:
            if conn.execute(sa.select(child_fk).where(child_fk == key).limit(1)).first() is not None:
                return
            self._delete_items(conn, level, key)
            conn.execute(sa.delete(table).where(table.c.pk == key))

    def _delete_items(self, conn: sa.Connection, level: QueryLevel, owner_pk: int) -> None:
        for _tag, spec, _keys in _LEVEL_SEQUENCES[level]:
            conn.execute(self._items[spec.keyword][1], {"owner": owner_pk})
