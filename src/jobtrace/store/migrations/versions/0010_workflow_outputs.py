"""Workflows keep the steps whose results are their outputs (output_steps, as
submitted; [] means the steps no other step depends on) and, once completed,
those outputs (outputs: the results inline up to a bound, the rest by
reference).

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "workflows", sa.Column("output_steps", sa.Text(), nullable=False, server_default="[]")
    )
    op.add_column("workflows", sa.Column("outputs", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("workflows") as batch:
        batch.drop_column("outputs")
        batch.drop_column("output_steps")
