"""Trace events with a per-run sequence.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

NOT_EMPTY = "event_key <> ''"


def upgrade() -> None:
    op.create_table(
        "trace_runs",
        sa.Column("run_id", sa.String(64), primary_key=True),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("last_seq", sa.BigInteger(), nullable=False),
    )
    op.create_table(
        "trace_events",
        sa.Column("run_id", sa.String(64), primary_key=True),
        sa.Column("seq", sa.BigInteger(), primary_key=True),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("event_key", sa.String(256), nullable=False),
        sa.Column("node_id", sa.String(128), nullable=False),
        sa.Column("type", sa.Integer(), nullable=False),
        sa.Column("level", sa.Integer(), nullable=False),
        sa.Column("category", sa.Integer(), nullable=False),
        sa.Column("ts_us", sa.BigInteger(), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("user_message", sa.Text(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("output_summary", sa.Text(), nullable=True),
        sa.Column("data", sa.Text(), nullable=True),
        sa.Column("step_number", sa.Integer(), nullable=False),
        sa.Column("total_steps", sa.Integer(), nullable=False),
        sa.Column("percent", sa.Float(), nullable=False),
        sa.Column("display_priority", sa.Integer(), nullable=False),
        sa.Column("milestone", sa.Boolean(), nullable=False),
        sa.Column("truncated", sa.Boolean(), nullable=False),
        sa.Column("job_id", sa.String(64), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("worker_id", sa.String(128), nullable=False),
        sa.Column("traceparent", sa.String(64), nullable=False),
        sa.Column("created_us", sa.BigInteger(), nullable=False),
    )
    op.create_index(
        "ux_trace_events_key",
        "trace_events",
        ["run_id", "event_key"],
        unique=True,
        sqlite_where=sa.text(NOT_EMPTY),
        postgresql_where=sa.text(NOT_EMPTY),
    )
    op.create_index("ix_trace_events_created", "trace_events", ["created_us"])


def downgrade() -> None:
    op.drop_table("trace_events")
    op.drop_table("trace_runs")
