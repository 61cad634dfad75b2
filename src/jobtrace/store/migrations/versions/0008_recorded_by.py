"""Every job, workflow, annotation (published or pending), trace event and
attestation records the authenticated subject that caused it (submitted_by /
recorded_by). Rows stored before this revision get '' : unknown.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

COLUMNS = (
    ("jobs", "submitted_by"),
    ("workflows", "submitted_by"),
    ("annotations", "recorded_by"),
    ("pending_annotations", "recorded_by"),
    ("trace_events", "recorded_by"),
    ("attestations", "recorded_by"),
)


def upgrade() -> None:
    for table, column in COLUMNS:
        op.add_column(table, sa.Column(column, sa.Text(), nullable=False, server_default=""))


def downgrade() -> None:
    for table, column in reversed(COLUMNS):
        with op.batch_alter_table(table) as batch:
            batch.drop_column(column)
