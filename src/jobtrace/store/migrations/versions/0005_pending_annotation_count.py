"""Each job counts the annotations pending for its running attempt, so ending an
attempt that has none costs no query.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "jobs",
        sa.Column("pending_annotations", sa.Integer(), nullable=False, server_default="0"),
    )
    # Attempts running across the upgrade keep what their workers already sent.
    op.execute(
        "UPDATE jobs SET pending_annotations = (SELECT count(*) FROM pending_annotations p "
        "WHERE p.job_id = jobs.id AND p.attempt = jobs.attempt)"
    )


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("pending_annotations")
