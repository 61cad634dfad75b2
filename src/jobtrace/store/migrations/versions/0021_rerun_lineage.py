"""Reruns: each run's lineage (the run it reruns, the first run of its
chain, and for a workflow why it was rerun), and for a step a rerun carried
over, the parent's job it reuses; indexed for listings by parent and by root.
Plain columns (no batch rebuild: on SQLite that would drop the triggers of
0018).

Revision ID: 0021
Revises: 0020
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0021"
down_revision = "0020"
branch_labels = None
depends_on = None

COLUMNS = (
    ("workflows", "parent_run_id", 64),
    ("workflows", "root_run_id", 64),
    ("workflows", "rerun_reason", None),
    ("jobs", "parent_run_id", 64),
    ("jobs", "root_run_id", 64),
    ("jobs", "reused_from", 64),
)
INDEXES = (
    ("workflows", "ix_workflows_tenant_parent_seq", ["tenant", "parent_run_id", "seq"]),
    ("workflows", "ix_workflows_tenant_root_seq", ["tenant", "root_run_id", "seq"]),
    ("jobs", "ix_jobs_tenant_parent_seq", ["tenant", "parent_run_id", "seq"]),
    ("jobs", "ix_jobs_tenant_root_seq", ["tenant", "root_run_id", "seq"]),
)


def upgrade() -> None:
    for table, name, length in COLUMNS:
        kind: sa.types.TypeEngine[str] = sa.String(length) if length else sa.Text()
        op.add_column(table, sa.Column(name, kind, nullable=False, server_default=""))
    for table, name, columns in INDEXES:
        op.create_index(name, table, columns)


def downgrade() -> None:
    for table, name, _ in reversed(INDEXES):
        op.drop_index(name, table_name=table)
    # Not a batch rebuild (see the docstring): SQLite 3.35+ drops a column in place.
    for table, name, _ in reversed(COLUMNS):
        op.execute(f"ALTER TABLE {table} DROP COLUMN {name}")
