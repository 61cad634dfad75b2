"""Lifecycle events a UI can draw: a trace event records the duration of what
it closes (duration_us, NULL on every other event and on events stored
before), and a job its step's number and its workflow's step count, so every
event of a step carries them without another read (backfilled here; 0 for a
standalone job).

Revision ID: 0013
Revises: 0012
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

# A fan-out child's step_index (see domain/fan_out.py): after every step.
CHILD_INDEX_BASE = 1_000_000


def upgrade() -> None:
    op.add_column("trace_events", sa.Column("duration_us", sa.BigInteger(), nullable=True))
    for name in ("step_number", "total_steps"):
        op.add_column("jobs", sa.Column(name, sa.Integer(), nullable=False, server_default="0"))
    # Submitted steps: their position in the declared order, from 1.
    op.execute(
        "UPDATE jobs SET step_number = step_index + 1,"
        " total_steps = COALESCE((SELECT w.total_steps FROM workflows w"
        " WHERE w.id = jobs.workflow_id), 0)"
        f" WHERE workflow_id <> '' AND step_index < {CHILD_INDEX_BASE}"
    )
    # Fan-out children ("<step>[<i>]"): their step's. A step name has no "[".
    op.execute(
        "UPDATE jobs SET"
        " step_number = COALESCE((SELECT max(p.step_number) FROM jobs p"
        f" WHERE p.workflow_id = jobs.workflow_id AND p.step_index < {CHILD_INDEX_BASE}"
        " AND substr(jobs.step_name, 1, length(p.step_name) + 1) = p.step_name || '['), 0),"
        " total_steps = COALESCE((SELECT w.total_steps FROM workflows w"
        " WHERE w.id = jobs.workflow_id), 0)"
        f" WHERE workflow_id <> '' AND step_index >= {CHILD_INDEX_BASE}"
    )


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("total_steps")
        batch.drop_column("step_number")
    with op.batch_alter_table("trace_events") as batch:
        batch.drop_column("duration_us")
