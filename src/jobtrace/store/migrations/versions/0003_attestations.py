"""Signing keys, attestations and the record of what retention pruned.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

SEQ = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "signing_keys",
        sa.Column("key_id", sa.String(64), primary_key=True),
        sa.Column("public_key", sa.String(128), nullable=False),
        sa.Column("algorithm", sa.String(32), nullable=False),
        sa.Column("created_us", sa.BigInteger(), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
    )
    op.create_table(
        "attestations",
        sa.Column("seq", SEQ, primary_key=True, autoincrement=True),
        sa.Column("key", sa.String(200), nullable=False, unique=True),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("type", sa.Integer(), nullable=False),
        sa.Column("entity_type", sa.String(16), nullable=False),
        sa.Column("entity_id", sa.String(64), nullable=False),
        sa.Column("workflow_id", sa.String(64), nullable=False),
        sa.Column("job_id", sa.String(64), nullable=False),
        sa.Column("worker_id", sa.String(128), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("state", sa.Integer(), nullable=False),
        sa.Column("data", sa.Text(), nullable=False),
        sa.Column("chain_id", sa.String(64), nullable=False),
        sa.Column("chain_seq", sa.BigInteger(), nullable=False),
        sa.Column("digest", sa.String(80), nullable=False),
        sa.Column("previous_digest", sa.String(80), nullable=False),
        sa.Column("signature", sa.String(200), nullable=False),
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.Column("created_us", sa.BigInteger(), nullable=False),
        sa.Column("expire_us", sa.BigInteger(), nullable=False),
    )
    op.create_index("ux_attestations_chain", "attestations", ["chain_id", "chain_seq"], unique=True)
    op.create_index("ix_attestations_workflow", "attestations", ["workflow_id", "seq"])
    op.create_index("ix_attestations_job", "attestations", ["job_id", "seq"])
    op.create_index("ix_attestations_expire", "attestations", ["expire_us"])
    op.create_table(
        "pruned_attestations",
        sa.Column("chain_id", sa.String(64), primary_key=True),
        sa.Column("chain_seq", sa.BigInteger(), primary_key=True),
        sa.Column("key", sa.String(200), nullable=False),
        sa.Column("digest", sa.String(80), nullable=False),
        sa.Column("pruned_us", sa.BigInteger(), nullable=False),
    )


def downgrade() -> None:
    for table in ("pruned_attestations", "attestations", "signing_keys"):
        op.drop_table(table)
