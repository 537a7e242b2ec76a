"""The attributes the index keeps and can match on, level by level, as data.

The lists cover the keys PS3.4 C.6.1.1.2-5 (Patient Root) and C.6.2.1.2-4 (Study Root) name for the
Query/Retrieve information models and the matching and return attributes of QIDO-RS (PS3.18 Table
10.6.1-5, Tables 10.6.3-3 to 10.6.3-5), plus a few common optional keys.  Everything else asked for in a
query identifier is answered with an empty value (PS3.4 C.2.2.1.3: an SCP need not support every optional
key).

Pure data: :mod:`safepacs.dicom.matching` (parsing and the reference matcher) and
:mod:`safepacs.db.schema` (the tables) are both built from these tuples.  Patient level attributes are
also Study level attributes of the Study Root model (PS3.4 C.6.2.1.2); an attribute of a level may be used
at that level and every level below it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from pydicom.datadict import tag_for_keyword

from safepacs.types import QueryLevel

__all__ = [
    "ATTRIBUTES",
    "BY_KEYWORD",
    "INTEGER_VRS",
    "LEVEL_RANK",
    "REQUIRED_KEYS",
    "SEQUENCES",
    "SEQUENCE_BY_KEYWORD",
    "STRING_VRS",
    "TEMPORAL_VRS",
    "UNIQUE_KEYS",
    "WILDCARD_VRS",
    "Attribute",
    "Derived",
    "Sequence",
    "usable_at",
]

#: Depth of each level in the hierarchy (PS3.4 C.3): a key of a level is usable at that level and below.
LEVEL_RANK: dict[QueryLevel, int] = {
    QueryLevel.PATIENT: 0,
    QueryLevel.STUDY: 1,
    QueryLevel.SERIES: 2,
    QueryLevel.IMAGE: 3,
}

#: The unique key of each level (PS3.4 C.6.1.1 / C.6.2.1, "U" in the tables).
UNIQUE_KEYS: dict[QueryLevel, str] = {
    QueryLevel.PATIENT: "PatientID",
    QueryLevel.STUDY: "StudyInstanceUID",
    QueryLevel.SERIES: "SeriesInstanceUID",
    QueryLevel.IMAGE: "SOPInstanceUID",
}

#: The Required Keys ("R") of the Patient Root and Study Root models (PS3.4 Tables C.6-1 to C.6-7): an
#: entity whose value is zero length matches every query on them (C.2.2.1.2).  PatientID, R at the Study
#: level of Study Root, is the Patient level's Unique Key and never answered empty (C.2.2.1.1; see
#: :func:`safepacs.dicom.matching.answered_patient_id`), so the rule never applies to it.
REQUIRED_KEYS = frozenset(
    {
        "PatientName",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "StudyID",
        "Modality",
        "SeriesNumber",
        "InstanceNumber",
    }
)

#: VRs on which Wild Card Matching applies (PS3.4 C.2.2.2.4).
WILDCARD_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"})
#: VRs kept as text and matched literally (besides PN, which also has a case-folded copy).
STRING_VRS = frozenset({"AE", "AS", "CS", "LO", "LT", "SH", "ST", "UC", "UR", "UT", "UI"})
#: VRs with Range Matching (PS3.4 C.2.2.2.5); kept as given plus a normalized, comparable key.
TEMPORAL_VRS = frozenset({"DA", "TM", "DT"})
#: VRs kept as integers (Single Value Matching compares numbers, so "007" matches 7).
INTEGER_VRS = frozenset({"IS", "US"})


class Derived(enum.Enum):
    """How a derived attribute is computed from the rows below it (never read from a header)."""

    MODALITIES = "modalities"  # distinct non-empty Modality of the study's series (PS3.4 C.6.1.1.3)
    SOP_CLASSES = "sop_classes"  # distinct SOP Class UID of the study's instances
    PATIENT_STUDIES = "patient_studies"
    PATIENT_SERIES = "patient_series"
    PATIENT_INSTANCES = "patient_instances"
    STUDY_SERIES = "study_series"
    STUDY_INSTANCES = "study_instances"
    SERIES_INSTANCES = "series_instances"
    ONLINE = "online"  # Instance Availability (0008,0056): everything stored here is ONLINE
    TRANSFER_SYNTAX = "transfer_syntax"  # Available Transfer Syntax UID: the one the object is kept in


@dataclass(frozen=True)
class Attribute:
    """One key: DICOM keyword, VR, the level it belongs to and its column (``None`` when derived)."""

    keyword: str
    vr: str
    level: QueryLevel
    column: str | None
    derived: Derived | None = None
    multi: bool = False  # several values (only derived attributes are multi-valued here)

    @property
    def fold_column(self) -> str:
        """The case-folded copy of a PN column, matched case-insensitively (PS3.4 C.2.2.2.1)."""
        return f"{self.column}_ci"

    @property
    def key_column(self) -> str:
        """The normalized, sortable copy of a DA/TM/DT column used for Range Matching."""
        column = self.column or ""
        return column if self.vr == "DA" else f"{column}_key"


@dataclass(frozen=True)
class Sequence:
    """A sequence key kept item by item in its own table, for Sequence Matching (PS3.4 C.2.2.2.6)."""

    keyword: str
    level: QueryLevel
    table: str
    items: tuple[Attribute, ...]

    def item(self, keyword: str) -> Attribute | None:
        for attr in self.items:
            if attr.keyword == keyword:
                return attr
        return None


_P, _ST, _SE, _IM = QueryLevel.PATIENT, QueryLevel.STUDY, QueryLevel.SERIES, QueryLevel.IMAGE

ATTRIBUTES: tuple[Attribute, ...] = (
    # Patient level: PS3.4 Table C.6-1 (and the patient keys of Table C.6-5, Study Root)
    Attribute("PatientName", "PN", _P, "patient_name"),
    Attribute("PatientID", "LO", _P, "patient_id"),
    Attribute("IssuerOfPatientID", "LO", _P, "issuer_of_patient_id"),
    Attribute("TypeOfPatientID", "CS", _P, "type_of_patient_id"),
    Attribute("PatientBirthDate", "DA", _P, "patient_birth_date"),
    Attribute("PatientBirthTime", "TM", _P, "patient_birth_time"),
    Attribute("PatientSex", "CS", _P, "patient_sex"),
    Attribute("EthnicGroup", "SH", _P, "ethnic_group"),
    Attribute("PatientComments", "LT", _P, "patient_comments"),
    Attribute("NumberOfPatientRelatedStudies", "IS", _P, None, Derived.PATIENT_STUDIES),
    Attribute("NumberOfPatientRelatedSeries", "IS", _P, None, Derived.PATIENT_SERIES),
    Attribute("NumberOfPatientRelatedInstances", "IS", _P, None, Derived.PATIENT_INSTANCES),
    # Study level: PS3.4 Table C.6-2 / C.6-5; PS3.18 Table 10.6.1-5 and 10.6.3-3
    Attribute("StudyInstanceUID", "UI", _ST, "study_instance_uid"),
    Attribute("StudyDate", "DA", _ST, "study_date"),
    Attribute("StudyTime", "TM", _ST, "study_time"),
    Attribute("AccessionNumber", "SH", _ST, "accession_number"),
    Attribute("StudyID", "SH", _ST, "study_id"),
    Attribute("ReferringPhysicianName", "PN", _ST, "referring_physician_name"),
    Attribute("StudyDescription", "LO", _ST, "study_description"),
    Attribute("PatientAge", "AS", _ST, "patient_age"),
    Attribute("Occupation", "SH", _ST, "occupation"),
    Attribute("AdditionalPatientHistory", "LT", _ST, "additional_patient_history"),
    Attribute("TimezoneOffsetFromUTC", "SH", _ST, "timezone_offset_from_utc"),
    Attribute("ModalitiesInStudy", "CS", _ST, None, Derived.MODALITIES, multi=True),
    Attribute("SOPClassesInStudy", "UI", _ST, None, Derived.SOP_CLASSES, multi=True),
    Attribute("NumberOfStudyRelatedSeries", "IS", _ST, None, Derived.STUDY_SERIES),
    Attribute("NumberOfStudyRelatedInstances", "IS", _ST, None, Derived.STUDY_INSTANCES),
    Attribute("InstanceAvailability", "CS", _ST, None, Derived.ONLINE),
    # Series level: PS3.4 Table C.6-3 / C.6-6; PS3.18 Table 10.6.1-5 and 10.6.3-4
    Attribute("SeriesInstanceUID", "UI", _SE, "series_instance_uid"),
    Attribute("Modality", "CS", _SE, "modality"),
    Attribute("SeriesNumber", "IS", _SE, "series_number"),
    Attribute("SeriesDescription", "LO", _SE, "series_description"),
    Attribute("SeriesDate", "DA", _SE, "series_date"),
    Attribute("SeriesTime", "TM", _SE, "series_time"),
    Attribute("BodyPartExamined", "CS", _SE, "body_part_examined"),
    Attribute("Laterality", "CS", _SE, "laterality"),
    Attribute("ProtocolName", "LO", _SE, "protocol_name"),
    Attribute("PerformedProcedureStepStartDate", "DA", _SE, "pps_start_date"),
    Attribute("PerformedProcedureStepStartTime", "TM", _SE, "pps_start_time"),
    Attribute("PerformedProcedureStepID", "SH", _SE, "pps_id"),
    Attribute("PerformedProcedureStepDescription", "LO", _SE, "pps_description"),
    Attribute("StationName", "SH", _SE, "station_name"),
    Attribute("InstitutionName", "LO", _SE, "institution_name"),
    Attribute("InstitutionalDepartmentName", "LO", _SE, "institutional_department_name"),
    Attribute("Manufacturer", "LO", _SE, "manufacturer"),
    Attribute("ManufacturerModelName", "LO", _SE, "manufacturer_model_name"),
    Attribute("NumberOfSeriesRelatedInstances", "IS", _SE, None, Derived.SERIES_INSTANCES),
    # Instance level: PS3.4 Table C.6-4 / C.6-7; PS3.18 Table 10.6.1-5 and 10.6.3-5
    Attribute("SOPInstanceUID", "UI", _IM, "sop_instance_uid"),
    Attribute("SOPClassUID", "UI", _IM, "sop_class_uid"),
    Attribute("InstanceNumber", "IS", _IM, "instance_number"),
    Attribute("ContentDate", "DA", _IM, "content_date"),
    Attribute("ContentTime", "TM", _IM, "content_time"),
    Attribute("AcquisitionDate", "DA", _IM, "acquisition_date"),
    Attribute("AcquisitionTime", "TM", _IM, "acquisition_time"),
    Attribute("AcquisitionDateTime", "DT", _IM, "acquisition_datetime"),
    Attribute("AcquisitionNumber", "IS", _IM, "acquisition_number"),
    Attribute("Rows", "US", _IM, "rows"),
    Attribute("Columns", "US", _IM, "columns"),
    Attribute("BitsAllocated", "US", _IM, "bits_allocated"),
    Attribute("NumberOfFrames", "IS", _IM, "number_of_frames"),
    Attribute("PhotometricInterpretation", "CS", _IM, "photometric_interpretation"),
    Attribute("CompletionFlag", "CS", _IM, "completion_flag"),
    Attribute("VerificationFlag", "CS", _IM, "verification_flag"),
    Attribute("ContentLabel", "CS", _IM, "content_label"),
    Attribute("ContentDescription", "LO", _IM, "content_description"),
    Attribute("ContentCreatorName", "PN", _IM, "content_creator_name"),
    Attribute("ObservationDateTime", "DT", _IM, "observation_datetime"),
    Attribute("AvailableTransferSyntaxUID", "UI", _IM, None, Derived.TRANSFER_SYNTAX),
)


def _code_items(level: QueryLevel) -> tuple[Attribute, ...]:
    """The Basic Code Sequence Macro keys (PS3.3 Table 8.8-1)."""
    return (
        Attribute("CodeValue", "SH", level, "code_value"),
        Attribute("CodingSchemeDesignator", "SH", level, "coding_scheme_designator"),
        Attribute("CodingSchemeVersion", "SH", level, "coding_scheme_version"),
        Attribute("CodeMeaning", "LO", level, "code_meaning"),
    )


SEQUENCES: tuple[Sequence, ...] = (
    Sequence(
        "OtherPatientIDsSequence",
        _P,
        "patient_other_ids",
        (
            Attribute("PatientID", "LO", _P, "patient_id"),
            Attribute("IssuerOfPatientID", "LO", _P, "issuer_of_patient_id"),
            Attribute("TypeOfPatientID", "CS", _P, "type_of_patient_id"),
        ),
    ),
    Sequence(
        "IssuerOfPatientIDQualifiersSequence",
        _P,
        "patient_issuer_qualifiers",
        (
            Attribute("UniversalEntityID", "UT", _P, "universal_entity_id"),
            Attribute("UniversalEntityIDType", "CS", _P, "universal_entity_id_type"),
        ),
    ),
    Sequence(
        "IssuerOfAccessionNumberSequence",
        _ST,
        "study_accession_issuers",
        (
            Attribute("LocalNamespaceEntityID", "UT", _ST, "local_namespace_entity_id"),
            Attribute("UniversalEntityID", "UT", _ST, "universal_entity_id"),
            Attribute("UniversalEntityIDType", "CS", _ST, "universal_entity_id_type"),
        ),
    ),
    Sequence("ProcedureCodeSequence", _ST, "study_procedure_codes", _code_items(_ST)),
    Sequence(
        "RequestAttributesSequence",
        _SE,
        "series_request_attributes",
        (
            Attribute("RequestedProcedureID", "SH", _SE, "requested_procedure_id"),
            Attribute("ScheduledProcedureStepID", "SH", _SE, "scheduled_procedure_step_id"),
            Attribute("AccessionNumber", "SH", _SE, "accession_number"),
            Attribute("StudyInstanceUID", "UI", _SE, "study_instance_uid"),
            Attribute("RequestedProcedureDescription", "LO", _SE, "requested_procedure_description"),
            Attribute("ScheduledProcedureStepDescription", "LO", _SE, "scheduled_procedure_step_description"),
        ),
    ),
    Sequence("ConceptNameCodeSequence", _IM, "instance_concept_names", _code_items(_IM)),
)

BY_KEYWORD: dict[str, Attribute] = {a.keyword: a for a in ATTRIBUTES}
SEQUENCE_BY_KEYWORD: dict[str, Sequence] = {s.keyword: s for s in SEQUENCES}


def _tag(keyword: str) -> int:
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    return int(tag)


#: Every top-level element the index reads from a header (the Specific Character Set aside): a header
#: parsed with only these (pydicom's ``specific_tags``) yields the same index rows.
HEADER_TAGS: tuple[int, ...] = tuple(
    sorted(
        {_tag(a.keyword) for a in ATTRIBUTES if a.column is not None} | {_tag(s.keyword) for s in SEQUENCES}
    )
)


def usable_at(level: QueryLevel, attr_level: QueryLevel) -> bool:
    """Whether a key of ``attr_level`` can be matched and returned in a query at ``level``."""
    return LEVEL_RANK[attr_level] <= LEVEL_RANK[level]
