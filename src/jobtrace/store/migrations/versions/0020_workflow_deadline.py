"""Workflow deadlines: workflows.deadline_us (SubmitWorkflowRequest.timeout
from submission; 0 = none) and the partial index the supervisor scans for
unfinished workflows past it.

Revision ID: 0020
Revises: 0019
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0020"
down_revision = "0019"
branch_labels = None
depends_on = None

# As in tables.WORKFLOW_DEADLINE_PENDING (a migration does not import the
# live schema, which moves on).
_PENDING = sa.text("deadline_us > 0 AND state IN (1, 2, 9, 10)")


def upgrade() -> None:
    # A plain ADD COLUMN: no SQLite batch rebuild, so the workflows table
    # keeps its triggers.
    op.add_column(
        "workflows",
        sa.Column("deadline_us", sa.BigInteger(), nullable=False, server_default="0"),
    )
    op.create_index(
        "ix_workflows_deadline",
        "workflows",
        ["deadline_us"],
        sqlite_where=_PENDING,
        postgresql_where=_PENDING,
    )


def downgrade() -> None:
    op.drop_index("ix_workflows_deadline", table_name="workflows")
    # Not a batch rebuild (see 0019): SQLite 3.35+ drops a column in place.
    op.execute("ALTER TABLE workflows DROP COLUMN deadline_us")
