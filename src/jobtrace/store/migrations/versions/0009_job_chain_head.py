"""A standalone job's row records the head of its attestation chain (the
last chain_seq and its digest), written by the transition that attests, under
the job's lock: the next attestation needs no search of the chain (nor of the
pruning records). NULL for jobs attested before this migration (and for
workflow steps, whose chain is their workflow's): their head is then read
from the attestations, as before.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("chain_seq", sa.BigInteger(), nullable=True))
    op.add_column("jobs", sa.Column("chain_digest", sa.String(80), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("chain_digest")
        batch.drop_column("chain_seq")
