"""The runs of a workflow name are read newest first (GetRunSummary by
workflow_name): an index on (tenant, name, seq).

Revision ID: 0016
Revises: 0015
"""

from __future__ import annotations

from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_workflows_tenant_name_seq", "workflows", ["tenant", "name", "seq"])


def downgrade() -> None:
    op.drop_index("ix_workflows_tenant_name_seq", table_name="workflows")
