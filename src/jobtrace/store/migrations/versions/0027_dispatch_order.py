"""The dispatch read costs the same with ten queued jobs or a million: the
dispatch index orders priority descending (as the read does, so a page is
the index's first rows, not a sort of every queued job of the service), and
ix_jobs_waiting indexes when a waiting job becomes eligible (the later of
not_before_us and next_attempt_us), so the read's "when is the next one due"
is one index seek, not a scan of the service's queue. On PostgreSQL, jobs and
trace_runs leave half of each page free, so that the updates a running job
makes most (progress, its run's sequence) are heap-only.

Revision ID: 0027
Revises: 0026
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0027"
down_revision = "0026"
branch_labels = None
depends_on = None


def due_expression(dialect: str) -> str:
    """When a queued job becomes eligible, as the index and the read spell it."""
    later = "greatest" if dialect == "postgresql" else "max"
    return f"{later}(not_before_us, next_attempt_us)"


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        # Room on each page for a row's next version: a progress report
        # (which changes no indexed column) or a run's next sequence number
        # is then a heap-only update, not a new entry in every index.
        op.execute("ALTER TABLE jobs SET (fillfactor = 50)")
        op.execute("ALTER TABLE trace_runs SET (fillfactor = 50)")
    op.drop_index("ix_jobs_dispatch", table_name="jobs")
    op.create_index(
        "ix_jobs_dispatch",
        "jobs",
        ["state", "service", "held", sa.text("priority DESC"), "seq"],
    )
    op.create_index(
        "ix_jobs_waiting",
        "jobs",
        ["state", "service", "held", sa.text(f"({due_expression(dialect)})")],
    )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE jobs RESET (fillfactor)")
        op.execute("ALTER TABLE trace_runs RESET (fillfactor)")
    op.drop_index("ix_jobs_waiting", table_name="jobs")
    op.drop_index("ix_jobs_dispatch", table_name="jobs")
    op.create_index("ix_jobs_dispatch", "jobs", ["state", "service", "held", "priority", "seq"])
