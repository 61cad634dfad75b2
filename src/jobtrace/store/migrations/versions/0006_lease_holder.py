"""Leases record who holds them by the worker's whole identity (tenant, subject
and worker id), not by its display name `subject/worker_id`, which two callers
may share.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import hashlib
import json

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

RUNNING = 2  # RunState.RUNNING
# With authentication off every caller is this principal (jobtrace.auth.ANONYMOUS).
ANONYMOUS_TENANT, ANONYMOUS_SUBJECT = "default", "anonymous"


def _holder(tenant: str, subject: str, worker_id: str) -> str:
    # As jobtrace.domain.worker_identity.holder_of computes it (kept here as it
    # was when this revision was written).
    encoded = json.dumps([tenant, subject, worker_id], separators=(",", ":"))
    return hashlib.sha256(encoded.encode()).hexdigest()


def upgrade() -> None:
    op.add_column(
        "jobs",
        sa.Column("lease_holder", sa.String(64), nullable=False, server_default=""),
    )
    # A lease running across the upgrade: its worker id was the worker's own id
    # when authentication is off, so such a worker reconnecting resumes it. With
    # authentication on, `subject/worker_id` cannot be split back safely, and no
    # anonymous caller exists to match this holder: the lease is left to expire
    # (and its job is retried) as before.
    jobs = sa.table(
        "jobs",
        sa.column("id", sa.String),
        sa.column("state", sa.Integer),
        sa.column("worker_id", sa.String),
        sa.column("lease_holder", sa.String),
    )
    bind = op.get_bind()
    running = bind.execute(sa.select(jobs.c.id, jobs.c.worker_id).where(jobs.c.state == RUNNING))
    for job_id, worker_id in running.all():
        bind.execute(
            jobs.update()
            .where(jobs.c.id == job_id)
            .values(lease_holder=_holder(ANONYMOUS_TENANT, ANONYMOUS_SUBJECT, worker_id))
        )


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("lease_holder")
