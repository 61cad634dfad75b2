"""Approval gates: a workflow step that people decide instead of a worker.
The gate (jobs.approval, JSON; NULL for a job step), its decisions so far
(jobs.approval_decisions, JSON list) and, while it waits with a timeout, when
it times out (jobs.gate_deadline_us, 0: none), indexed for the supervisor's
scan of gates past their deadline.

Revision ID: 0023
Revises: 0022
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0023"
down_revision = "0022"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain add_column: a batch rebuild of jobs would drop its label triggers
    # on SQLite (revision 0018).
    op.add_column("jobs", sa.Column("approval", sa.Text(), nullable=True))
    op.add_column(
        "jobs",
        sa.Column("approval_decisions", sa.Text(), nullable=False, server_default="[]"),
    )
    op.add_column(
        "jobs",
        sa.Column("gate_deadline_us", sa.BigInteger(), nullable=False, server_default="0"),
    )
    op.create_index("ix_jobs_gate_deadline", "jobs", ["state", "gate_deadline_us"])


def downgrade() -> None:
    op.drop_index("ix_jobs_gate_deadline", table_name="jobs")
    # Not a batch rebuild (see upgrade): SQLite 3.35+ drops a column in place.
    op.execute("ALTER TABLE jobs DROP COLUMN gate_deadline_us")
    op.execute("ALTER TABLE jobs DROP COLUMN approval_decisions")
    op.execute("ALTER TABLE jobs DROP COLUMN approval")
