"""Bulk operations (CancelRuns): one row per (tenant, request id) recording
what the operation works through (its action and filter digest) and how far
it got (phase, cursor, counts), so an interrupted call resumes.

Revision ID: 0022
Revises: 0021
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0022"
down_revision = "0021"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "bulk_operations",
        sa.Column("tenant", sa.String(128), primary_key=True),
        sa.Column("request_id", sa.String(256), primary_key=True),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("filter_digest", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("phase", sa.String(16), nullable=False),
        sa.Column("cursor", sa.BigInteger(), nullable=True),
        sa.Column("touched", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("skipped", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("skipped_reasons", sa.Text(), nullable=False, server_default="{}"),
        sa.Column("failed", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("failures", sa.Text(), nullable=False, server_default="[]"),
        sa.Column("created_by", sa.String(256), nullable=False, server_default=""),
        sa.Column("created_us", sa.BigInteger(), nullable=False),
        sa.Column("updated_us", sa.BigInteger(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("bulk_operations")
