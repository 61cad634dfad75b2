"""Placement you can steer: a job keeps its desired worker labels and weighted
affinity (JSON), and the digest of its required labels that the dispatch read
filters on ('' for every job stored before, which requires none).

Revision ID: 0015
Revises: 0014
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "jobs", sa.Column("worker_labels", sa.Text(), nullable=False, server_default="[]")
    )
    op.add_column("jobs", sa.Column("affinity", sa.Text(), nullable=False, server_default="[]"))
    op.add_column(
        "jobs", sa.Column("placement_class", sa.String(32), nullable=False, server_default="")
    )


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("placement_class")
        batch.drop_column("affinity")
        batch.drop_column("worker_labels")
