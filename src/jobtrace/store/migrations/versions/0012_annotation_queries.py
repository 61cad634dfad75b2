"""Annotations are listed across runs: a numeric copy of each number value
(value_num, NULL otherwise, backfilled here) and the indexes of the filters.

Revision ID: 0012
Revises: 0011
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

INDEXES = (
    ("ix_annotations_tenant_seq", ["tenant", "seq"]),
    ("ix_annotations_tenant_key_seq", ["tenant", "key", "seq"]),
    ("ix_annotations_tenant_key_num", ["tenant", "key", "value_num"]),
    ("ix_annotations_tenant_recorded_by_seq", ["tenant", "recorded_by", "seq"]),
    ("ix_annotations_tenant_actor_seq", ["tenant", "actor_id", "seq"]),
    ("ix_annotations_job_seq", ["job_id", "seq"]),
)
# A JSON number, as json.dumps writes one.
NUMBER_RE = r"^-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?$"


def upgrade() -> None:
    for table in ("annotations", "pending_annotations"):
        op.add_column(table, sa.Column("value_num", sa.Float(), nullable=True))
        if op.get_bind().dialect.name == "postgresql":
            op.execute(
                f"UPDATE {table} SET value_num = CAST(value AS DOUBLE PRECISION) "
                f"WHERE value ~ '{NUMBER_RE}'"
            )
        else:
            op.execute(
                f"UPDATE {table} SET value_num = CAST(value AS REAL) "
                "WHERE json_valid(value) AND json_type(value) IN ('integer', 'real')"
            )
    for name, columns in INDEXES:
        op.create_index(name, "annotations", columns)


def downgrade() -> None:
    for name, _ in reversed(INDEXES):
        op.drop_index(name, table_name="annotations")
    for table in ("pending_annotations", "annotations"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("value_num")
