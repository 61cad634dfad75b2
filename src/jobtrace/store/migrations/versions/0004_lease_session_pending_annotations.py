"""Leases remember the worker session holding them; worker annotations of a
running attempt are stored, invisible, until the attempt ends.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

SEQ = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    # A lease taken before this revision has no session: only its deadline ends it.
    op.add_column(
        "jobs",
        sa.Column("lease_session", sa.String(64), nullable=False, server_default=""),
    )
    op.create_table(
        "pending_annotations",
        sa.Column("seq", SEQ, primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(64), nullable=False, unique=True),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column("job_id", sa.String(64), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("scope", sa.Integer(), nullable=False),
        sa.Column("scope_id", sa.String(128), nullable=False),
        sa.Column("actor_kind", sa.Integer(), nullable=False),
        sa.Column("actor_id", sa.String(256), nullable=False),
        sa.Column("actor_version", sa.String(128), nullable=False),
        sa.Column("key", sa.String(256), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.Column("payload", sa.Text(), nullable=True),
        sa.Column("idempotency_key", sa.String(256), nullable=False),
        sa.Column("created_us", sa.BigInteger(), nullable=False),
    )
    op.create_index(
        "ix_pending_annotations_attempt", "pending_annotations", ["job_id", "attempt", "seq"]
    )


def downgrade() -> None:
    op.drop_table("pending_annotations")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("lease_session")
