"""Flow control: named rate limits (rate_limits) and their token buckets
(rate_buckets, one per tenant, limit and partition), concurrency keys
(concurrency_slots: a row per key the claim locks), and on jobs the resolved
flow spec (flow: '' for a job with neither, which the claim never looks at),
the key the dispatcher skips while blocked (flow_key) and the resolved
concurrency key with its index (tenant, concurrency_key, state).

Revision ID: 0026
Revises: 0025
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0026"
down_revision = "0025"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain added columns, no batch rebuild: on SQLite a rebuild of jobs
    # would drop the label triggers of revision 0018.
    op.add_column("jobs", sa.Column("flow", sa.Text(), nullable=False, server_default=""))
    op.add_column("jobs", sa.Column("flow_key", sa.String(512), nullable=False, server_default=""))
    op.add_column(
        "jobs", sa.Column("concurrency_key", sa.String(256), nullable=False, server_default="")
    )
    op.create_index("ix_jobs_concurrency", "jobs", ["tenant", "concurrency_key", "state"])
    op.create_table(
        "rate_limits",
        sa.Column("tenant", sa.String(128), primary_key=True),
        sa.Column("key", sa.String(128), primary_key=True),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.Column("period_us", sa.BigInteger(), nullable=False),
        sa.Column("burst", sa.BigInteger(), nullable=False),
        sa.Column("created_by", sa.Text(), nullable=False),
        sa.Column("created_us", sa.BigInteger(), nullable=False),
        sa.Column("updated_us", sa.BigInteger(), nullable=False),
    )
    op.create_table(
        "rate_buckets",
        sa.Column("tenant", sa.String(128), primary_key=True),
        sa.Column("key", sa.String(128), primary_key=True),
        sa.Column("partition", sa.String(256), primary_key=True),
        sa.Column("tokens", sa.Float(), nullable=False),
        sa.Column("updated_us", sa.BigInteger(), nullable=False),
    )
    op.create_table(
        "concurrency_slots",
        sa.Column("tenant", sa.String(128), primary_key=True),
        sa.Column("key", sa.String(256), primary_key=True),
    )


def downgrade() -> None:
    op.drop_table("concurrency_slots")
    op.drop_table("rate_buckets")
    op.drop_table("rate_limits")
    op.drop_index("ix_jobs_concurrency", table_name="jobs")
    op.execute("ALTER TABLE jobs DROP COLUMN concurrency_key")
    op.execute("ALTER TABLE jobs DROP COLUMN flow_key")
    op.execute("ALTER TABLE jobs DROP COLUMN flow")
