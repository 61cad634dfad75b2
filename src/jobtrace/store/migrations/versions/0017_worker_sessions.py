"""The fleet registry: one row per connected worker session, owned by the
replica its stream is connected to, expiring unless that replica refreshes it.

Revision ID: 0017
Revises: 0016
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None

SEQ = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "worker_sessions",
        sa.Column("seq", SEQ, primary_key=True, autoincrement=True),
        sa.Column("session_id", sa.String(64), nullable=False, unique=True),
        sa.Column("replica", sa.String(320), nullable=False),
        sa.Column("worker_id", sa.Text(), nullable=False),
        sa.Column("holder", sa.String(64), nullable=False),
        sa.Column("tenants", sa.Text(), nullable=True),
        sa.Column("services", sa.Text(), nullable=False),
        sa.Column("labels", sa.Text(), nullable=False),
        sa.Column("version", sa.Text(), nullable=False, server_default=""),
        sa.Column("max_concurrency", sa.Integer(), nullable=False),
        sa.Column("held", sa.Text(), nullable=False),
        sa.Column("affinity_keys", sa.Text(), nullable=False),
        sa.Column("draining", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("connected_us", sa.BigInteger(), nullable=False),
        sa.Column("last_heartbeat_us", sa.BigInteger(), nullable=False),
        sa.Column("expires_us", sa.BigInteger(), nullable=False),
        sa.Column("completed", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("failed", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("lease_losses", sa.BigInteger(), nullable=False, server_default="0"),
    )
    op.create_index("ix_worker_sessions_replica", "worker_sessions", ["replica"])
    op.create_index("ix_worker_sessions_expires", "worker_sessions", ["expires_us"])


def downgrade() -> None:
    op.drop_index("ix_worker_sessions_expires", table_name="worker_sessions")
    op.drop_index("ix_worker_sessions_replica", table_name="worker_sessions")
    op.drop_table("worker_sessions")
