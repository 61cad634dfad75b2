"""Schedules: a job or workflow template submitted on a cron expression or a
fixed interval. One row per (tenant, id); due_us (the next tick plus its
jitter; NULL while paused) is indexed for the scanner every replica runs, and
claim_until_us is its compare-and-set claim of a due schedule.

Revision ID: 0025
Revises: 0024
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0025"
down_revision = "0024"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "schedules",
        sa.Column("tenant", sa.String(128), primary_key=True),
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("description", sa.Text(), nullable=False, server_default=""),
        sa.Column("cron", sa.String(256), nullable=False, server_default=""),
        sa.Column("time_zone", sa.String(64), nullable=False, server_default=""),
        sa.Column("interval_us", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("jitter_us", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("overlap", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("catch_up", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("catch_up_window_us", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("template", sa.LargeBinary(), nullable=False),
        sa.Column("definition_hash", sa.String(64), nullable=False),
        sa.Column("paused", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("anchor_us", sa.BigInteger(), nullable=False),
        sa.Column("next_tick_us", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("due_us", sa.BigInteger(), nullable=True),
        sa.Column("claim_until_us", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("last_run_id", sa.String(64), nullable=False, server_default=""),
        sa.Column("last_run_us", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("skipped_ticks", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("buffered_us", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("owner", sa.Text(), nullable=False),
        sa.Column("created_us", sa.BigInteger(), nullable=False),
        sa.Column("updated_us", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_schedules_due", "schedules", ["due_us"])
    op.create_index("ix_schedules_buffered", "schedules", ["buffered_us"])


def downgrade() -> None:
    op.drop_index("ix_schedules_buffered", table_name="schedules")
    op.drop_index("ix_schedules_due", table_name="schedules")
    op.drop_table("schedules")
