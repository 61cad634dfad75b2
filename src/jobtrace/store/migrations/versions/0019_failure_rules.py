"""Failure rules: every failed attempt, classified, for the failures summary
(failures, tenant-scoped by time, kept as long as trace events), and the worker a retry should avoid
(jobs.avoid_holder).

Revision ID: 0019
Revises: 0018
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "jobs", sa.Column("avoid_holder", sa.String(64), nullable=False, server_default="")
    )
    op.create_table(
        "failures",
        sa.Column(
            "seq",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("job_id", sa.String(64), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("service", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("code", sa.String(128), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("failed_us", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_failures_tenant_time", "failures", ["tenant", "failed_us"])
    op.create_index("ix_failures_time", "failures", ["failed_us"])


def downgrade() -> None:
    op.drop_index("ix_failures_time", table_name="failures")
    op.drop_index("ix_failures_tenant_time", table_name="failures")
    op.drop_table("failures")
    # Not a batch rebuild of jobs: on SQLite that would drop the label
    # triggers of revision 0018 (SQLite 3.35+ drops a column in place).
    op.execute("ALTER TABLE jobs DROP COLUMN avoid_holder")
