"""Jobs record when their first attempt started (first_started_us) beside the
current attempt's start (started_us, which each claim resets), so a run's
started_at is its first start whatever retries follow.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "jobs",
        sa.Column("first_started_us", sa.BigInteger(), nullable=False, server_default="0"),
    )
    # The earliest start known for jobs already started: their current
    # attempt's (the first one's was not kept).
    jobs = sa.table(
        "jobs",
        sa.column("started_us", sa.BigInteger),
        sa.column("first_started_us", sa.BigInteger),
    )
    op.execute(jobs.update().values(first_started_us=jobs.c.started_us))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("first_started_us")
