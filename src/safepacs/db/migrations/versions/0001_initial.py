"""Initial schema: patients, studies, series, instances, sequence items, peers, users.

Revision ID: 0001
Revises:
Create Date: 2026-11-22 05:29:25.671842
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "patients",
        sa.Column("pk", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("anon_key", sa.String(), server_default="", nullable=False),
        sa.Column("patient_name", sa.String(), server_default="", nullable=False),
        sa.Column("patient_name_ci", sa.String(), server_default="", nullable=False),
        sa.Column("patient_id", sa.String(), server_default="", nullable=False),
        sa.Column("issuer_of_patient_id", sa.String(), server_default="", nullable=False),
        sa.Column("type_of_patient_id", sa.String(), server_default="", nullable=False),
        sa.Column("patient_birth_date", sa.String(), server_default="", nullable=False),
        sa.Column("patient_birth_time", sa.String(), server_default="", nullable=False),
        sa.Column("patient_birth_time_key", sa.String(), server_default="", nullable=False),
        sa.Column("patient_sex", sa.String(), server_default="", nullable=False),
        sa.Column("ethnic_group", sa.String(), server_default="", nullable=False),
        sa.Column("patient_comments", sa.String(), server_default="", nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("pk", name=op.f("pk_patients")),
        sa.UniqueConstraint(
            "patient_id",
            "issuer_of_patient_id",
            "anon_key",
            name=op.f("uq_patients_patient_id_issuer_of_patient_id_anon_key"),
        ),
    )
    op.create_index(op.f("ix_patients_patient_name_ci"), "patients", ["patient_name_ci"], unique=False)

    op.create_table(
        "peers",
        sa.Column("ae_title", sa.String(length=16), nullable=False),
        sa.Column("host", sa.String(), nullable=False),
        sa.Column("port", sa.Integer(), nullable=True),
        sa.Column("allow", sa.String(), server_default="", nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("ae_title", name=op.f("pk_peers")),
    )
    op.create_table(
        "users",
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("password_hash", sa.String(), nullable=False),
        sa.Column("roles", sa.String(), server_default="", nullable=False),
        sa.Column("disabled", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("must_change_password", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_users")),
    )
    op.create_table(
        "patient_issuer_qualifiers",
        sa.Column("pk", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("owner_pk", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("universal_entity_id", sa.String(), server_default="", nullable=False),
        sa.Column("universal_entity_id_type", sa.String(), server_default="", nullable=False),
        sa.ForeignKeyConstraint(
            ["owner_pk"],
            ["patients.pk"],
            name=op.f("fk_patient_issuer_qualifiers_owner_pk"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("pk", name=op.f("pk_patient_issuer_qualifiers")),
    )
    op.create_index(
        op.f("ix_patient_issuer_qualifiers_owner_pk"), "patient_issuer_qualifiers", ["owner_pk"], unique=False
    )

    op.create_table(
        "patient_other_ids",
        sa.Column("pk", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("owner_pk", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("patient_id", sa.String(), server_default="", nullable=False),
        sa.Column("issuer_of_patient_id", sa.String(), server_default="", nullable=False),
        sa.Column("type_of_patient_id", sa.String(), server_default="", nullable=False),
        sa.ForeignKeyConstraint(
            ["owner_pk"], ["patients.pk"], name=op.f("fk_patient_other_ids_owner_pk"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("pk", name=op.f("pk_patient_other_ids")),
    )
    op.create_index(op.f("ix_patient_other_ids_owner_pk"), "patient_other_ids", ["owner_pk"], unique=False)

    op.create_table(
        "studies",
        sa.Column("pk", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("patient_pk", sa.Integer(), nullable=False),
        sa.Column("study_instance_uid", sa.String(), server_default="", nullable=False),
        sa.Column("study_date", sa.String(), server_default="", nullable=False),
        sa.Column("study_time", sa.String(), server_default="", nullable=False),
        sa.Column("study_time_key", sa.String(), server_default="", nullable=False),
        sa.Column("accession_number", sa.String(), server_default="", nullable=False),
        sa.Column("study_id", sa.String(), server_default="", nullable=False),
        sa.Column("referring_physician_name", sa.String(), server_default="", nullable=False),
        sa.Column("referring_physician_name_ci", sa.String(), server_default="", nullable=False),
        sa.Column("study_description", sa.String(), server_default="", nullable=False),
        sa.Column("patient_age", sa.String(), server_default="", nullable=False),
        sa.Column("occupation", sa.String(), server_default="", nullable=False),
        sa.Column("additional_patient_history", sa.String(), server_default="", nullable=False),
        sa.Column("timezone_offset_from_utc", sa.String(), server_default="", nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["patient_pk"], ["patients.pk"], name=op.f("fk_studies_patient_pk")),
        sa.PrimaryKeyConstraint("pk", name=op.f("pk_studies")),
        sa.UniqueConstraint("study_instance_uid", name=op.f("uq_studies_study_instance_uid")),
    )
    op.create_index(op.f("ix_studies_accession_number"), "studies", ["accession_number"], unique=False)
    op.create_index(op.f("ix_studies_patient_pk"), "studies", ["patient_pk"], unique=False)
    op.create_index(op.f("ix_studies_study_date"), "studies", ["study_date"], unique=False)

    op.create_table(
        "series",
        sa.Column("pk", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("study_pk", sa.Integer(), nullable=False),
        sa.Column("series_instance_uid", sa.String(), server_default="", nullable=False),
        sa.Column("modality", sa.String(), server_default="", nullable=False),
        sa.Column("series_number", sa.BigInteger(), nullable=True),
        sa.Column("series_description", sa.String(), server_default="", nullable=False),
        sa.Column("series_date", sa.String(), server_default="", nullable=False),
        sa.Column("series_time", sa.String(), server_default="", nullable=False),
        sa.Column("series_time_key", sa.String(), server_default="", nullable=False),
        sa.Column("body_part_examined", sa.String(), server_default="", nullable=False),
        sa.Column("laterality", sa.String(), server_default="", nullable=False),
        sa.Column("protocol_name", sa.String(), server_default="", nullable=False),
        sa.Column("pps_start_date", sa.String(), server_default="", nullable=False),
        sa.Column("pps_start_time", sa.String(), server_default="", nullable=False),
        sa.Column("pps_start_time_key", sa.String(), server_default="", nullable=False),
        sa.Column("pps_id", sa.String(), server_default="", nullable=False),
        sa.Column("pps_description", sa.String(), server_default="", nullable=False),
        sa.Column("station_name", sa.String(), server_default="", nullable=False),
        sa.Column("institution_name", sa.String(), server_default="", nullable=False),
        sa.Column("institutional_department_name", sa.String(), server_default="", nullable=False),
        sa.Column("manufacturer", sa.String(), server_default="", nullable=False),
        sa.Column("manufacturer_model_name", sa.String(), server_default="", nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["study_pk"], ["studies.pk"], name=op.f("fk_series_study_pk")),
        sa.PrimaryKeyConstraint("pk", name=op.f("pk_series")),
        sa.UniqueConstraint("series_instance_uid", name=op.f("uq_series_series_instance_uid")),
    )
    op.create_index(op.f("ix_series_study_pk_modality"), "series", ["study_pk", "modality"], unique=False)

    op.create_table(
        "study_accession_issuers",
        sa.Column("pk", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("owner_pk", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("local_namespace_entity_id", sa.String(), server_default="", nullable=False),
        sa.Column("universal_entity_id", sa.String(), server_default="", nullable=False),
        sa.Column("universal_entity_id_type", sa.String(), server_default="", nullable=False),
        sa.ForeignKeyConstraint(
            ["owner_pk"], ["studies.pk"], name=op.f("fk_study_accession_issuers_owner_pk"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("pk", name=op.f("pk_study_accession_issuers")),
    )
    op.create_index(
        op.f("ix_study_accession_issuers_owner_pk"), "study_accession_issuers", ["owner_pk"], unique=False
    )

    op.create_table(
        "study_procedure_codes",
        sa.Column("pk", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("owner_pk", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("code_value", sa.String(), server_default="", nullable=False),
        sa.Column("coding_scheme_designator", sa.String(), server_default="", nullable=False),
        sa.Column("coding_scheme_version", sa.String(), server_default="", nullable=False),
        sa.Column("code_meaning", sa.String(), server_default="", nullable=False),
        sa.ForeignKeyConstraint(
            ["owner_pk"], ["studies.pk"], name=op.f("fk_study_procedure_codes_owner_pk"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("pk", name=op.f("pk_study_procedure_codes")),
    )
    op.create_index(
        op.f("ix_study_procedure_codes_owner_pk"), "study_procedure_codes", ["owner_pk"], unique=False
    )

    op.create_table(
        "instances",
        sa.Column("pk", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("series_pk", sa.Integer(), nullable=False),
        sa.Column("study_pk", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(), server_default="", nullable=False),
        sa.Column("sop_class_uid", sa.String(), server_default="", nullable=False),
        sa.Column("instance_number", sa.BigInteger(), nullable=True),
        sa.Column("content_date", sa.String(), server_default="", nullable=False),
        sa.Column("content_time", sa.String(), server_default="", nullable=False),
        sa.Column("content_time_key", sa.String(), server_default="", nullable=False),
        sa.Column("acquisition_date", sa.String(), server_default="", nullable=False),
        sa.Column("acquisition_time", sa.String(), server_default="", nullable=False),
        sa.Column("acquisition_time_key", sa.String(), server_default="", nullable=False),
        sa.Column("acquisition_datetime", sa.String(), server_default="", nullable=False),
        sa.Column("acquisition_datetime_key", sa.String(), server_default="", nullable=False),
        sa.Column("acquisition_number", sa.BigInteger(), nullable=True),
        sa.Column("rows", sa.BigInteger(), nullable=True),
        sa.Column("columns", sa.BigInteger(), nullable=True),
        sa.Column("bits_allocated", sa.BigInteger(), nullable=True),
        sa.Column("number_of_frames", sa.BigInteger(), nullable=True),
        sa.Column("photometric_interpretation", sa.String(), server_default="", nullable=False),
        sa.Column("completion_flag", sa.String(), server_default="", nullable=False),
        sa.Column("verification_flag", sa.String(), server_default="", nullable=False),
        sa.Column("content_label", sa.String(), server_default="", nullable=False),
        sa.Column("content_description", sa.String(), server_default="", nullable=False),
        sa.Column("content_creator_name", sa.String(), server_default="", nullable=False),
        sa.Column("content_creator_name_ci", sa.String(), server_default="", nullable=False),
        sa.Column("observation_datetime", sa.String(), server_default="", nullable=False),
        sa.Column("observation_datetime_key", sa.String(), server_default="", nullable=False),
        sa.Column("transfer_syntax_uid", sa.String(), nullable=False),
        sa.Column("blob_id", sa.String(), nullable=False),
        sa.Column("key_id", sa.String(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["series_pk"], ["series.pk"], name=op.f("fk_instances_series_pk")),
        sa.ForeignKeyConstraint(["study_pk"], ["studies.pk"], name=op.f("fk_instances_study_pk")),
        sa.PrimaryKeyConstraint("pk", name=op.f("pk_instances")),
        sa.UniqueConstraint("sop_instance_uid", name=op.f("uq_instances_sop_instance_uid")),
    )
    op.create_index(
        op.f("ix_instances_series_pk_instance_number"),
        "instances",
        ["series_pk", "instance_number"],
        unique=False,
    )
    op.create_index(
        op.f("ix_instances_study_pk_sop_class_uid"), "instances", ["study_pk", "sop_class_uid"], unique=False
    )

    op.create_table(
        "series_request_attributes",
        sa.Column("pk", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("owner_pk", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("requested_procedure_id", sa.String(), server_default="", nullable=False),
        sa.Column("scheduled_procedure_step_id", sa.String(), server_default="", nullable=False),
        sa.Column("accession_number", sa.String(), server_default="", nullable=False),
        sa.Column("study_instance_uid", sa.String(), server_default="", nullable=False),
        sa.Column("requested_procedure_description", sa.String(), server_default="", nullable=False),
        sa.Column("scheduled_procedure_step_description", sa.String(), server_default="", nullable=False),
        sa.ForeignKeyConstraint(
            ["owner_pk"],
            ["series.pk"],
            name=op.f("fk_series_request_attributes_owner_pk"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("pk", name=op.f("pk_series_request_attributes")),
    )
    op.create_index(
        op.f("ix_series_request_attributes_owner_pk"), "series_request_attributes", ["owner_pk"], unique=False
    )

    op.create_table(
        "instance_concept_names",
        sa.Column("pk", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("owner_pk", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("code_value", sa.String(), server_default="", nullable=False),
        sa.Column("coding_scheme_designator", sa.String(), server_default="", nullable=False),
        sa.Column("coding_scheme_version", sa.String(), server_default="", nullable=False),
        sa.Column("code_meaning", sa.String(), server_default="", nullable=False),
        sa.ForeignKeyConstraint(
            ["owner_pk"],
            ["instances.pk"],
            name=op.f("fk_instance_concept_names_owner_pk"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("pk", name=op.f("pk_instance_concept_names")),
    )
    op.create_index(
        op.f("ix_instance_concept_names_owner_pk"), "instance_concept_names", ["owner_pk"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_instance_concept_names_owner_pk"), table_name="instance_concept_names")

    op.drop_table("instance_concept_names")
    op.drop_index(op.f("ix_series_request_attributes_owner_pk"), table_name="series_request_attributes")

    op.drop_table("series_request_attributes")
    op.drop_index(op.f("ix_instances_study_pk_sop_class_uid"), table_name="instances")
    op.drop_index(op.f("ix_instances_series_pk_instance_number"), table_name="instances")

    op.drop_table("instances")
    op.drop_index(op.f("ix_study_procedure_codes_owner_pk"), table_name="study_procedure_codes")

    op.drop_table("study_procedure_codes")
    op.drop_index(op.f("ix_study_accession_issuers_owner_pk"), table_name="study_accession_issuers")

    op.drop_table("study_accession_issuers")
    op.drop_index(op.f("ix_series_study_pk_modality"), table_name="series")

    op.drop_table("series")
    op.drop_index(op.f("ix_studies_study_date"), table_name="studies")
    op.drop_index(op.f("ix_studies_patient_pk"), table_name="studies")
    op.drop_index(op.f("ix_studies_accession_number"), table_name="studies")

    op.drop_table("studies")
    op.drop_index(op.f("ix_patient_other_ids_owner_pk"), table_name="patient_other_ids")

    op.drop_table("patient_other_ids")
    op.drop_index(op.f("ix_patient_issuer_qualifiers_owner_pk"), table_name="patient_issuer_qualifiers")

    op.drop_table("patient_issuer_qualifiers")
    op.drop_table("users")
    op.drop_table("peers")
    op.drop_index(op.f("ix_patients_patient_name_ci"), table_name="patients")

    op.drop_table("patients")
