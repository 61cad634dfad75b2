"""Pause: a paused workflow's steps are held (jobs.held, which the dispatch
index leads with after the service, so held jobs cost the dispatch read
nothing), the workflow remembers when, why and from which state it was paused
(workflows.paused_us, pause_reason, paused_from), and paused queues
(queue_pauses: one row per paused tenant and service).

Revision ID: 0024
Revises: 0023
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0024"
down_revision = "0023"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain added columns, no batch rebuild: on SQLite a rebuild of jobs or
    # workflows would drop the label triggers of revision 0018.
    op.add_column("jobs", sa.Column("held", sa.Integer(), nullable=False, server_default="0"))
    op.add_column(
        "workflows", sa.Column("paused_us", sa.BigInteger(), nullable=False, server_default="0")
    )
    op.add_column(
        "workflows", sa.Column("pause_reason", sa.Text(), nullable=False, server_default="")
    )
    op.add_column(
        "workflows", sa.Column("paused_from", sa.Integer(), nullable=False, server_default="0")
    )
    op.drop_index("ix_jobs_dispatch", table_name="jobs")
    op.create_index("ix_jobs_dispatch", "jobs", ["state", "service", "held", "priority", "seq"])
    op.create_table(
        "queue_pauses",
        sa.Column("tenant", sa.String(128), primary_key=True),
        sa.Column("service", sa.String(128), primary_key=True),
        sa.Column("paused_by", sa.Text(), nullable=False),
        sa.Column("paused_us", sa.BigInteger(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("queue_pauses")
    op.drop_index("ix_jobs_dispatch", table_name="jobs")
    op.create_index("ix_jobs_dispatch", "jobs", ["state", "service", "priority", "seq"])
    op.execute("ALTER TABLE workflows DROP COLUMN paused_from")
    op.execute("ALTER TABLE workflows DROP COLUMN pause_reason")
    op.execute("ALTER TABLE workflows DROP COLUMN paused_us")
    op.execute("ALTER TABLE jobs DROP COLUMN held")
