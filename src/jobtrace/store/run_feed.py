"""Reads behind the live feed of runs (WatchRuns): runs re-read by id, and the
runs not yet ended, all in the BASIC view (no payload, result, steps or outputs)."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from jobtrace.model import Job, RunState, Workflow
from jobtrace.store.jobs import JOBS, WORKFLOWS, job_from_row, step_counts, workflow_from_row
from jobtrace.store.tables import JobRow, WorkflowRow

_JOB_BASIC = [c for c in JOBS.c if c.name not in ("request_context", "payload", "result")]
_WORKFLOW_BASIC = [c for c in WORKFLOWS.c if c.name not in ("request_context", "outputs")]


async def jobs_by_id(session: AsyncSession, ids: Collection[str], tenant: str | None) -> list[Job]:
    """These jobs as they are now (those of another tenant are not found)."""
    if not ids:
        return []
    stmt = select(*_JOB_BASIC).where(JobRow.id.in_(list(ids)))
    if tenant is not None:
        stmt = stmt.where(JobRow.tenant == tenant)
    rows = (await session.execute(stmt)).mappings().all()
    return [job_from_row(row, full=False) for row in rows]


async def workflows_by_id(
    session: AsyncSession, ids: Collection[str], tenant: str | None
) -> list[Workflow]:
    """These workflows as they are now, steps counted, not read."""
    if not ids:
        return []
    stmt = select(*_WORKFLOW_BASIC).where(WorkflowRow.id.in_(list(ids)))
    if tenant is not None:
        stmt = stmt.where(WorkflowRow.tenant == tenant)
    return await _counted(session, (await session.execute(stmt)).mappings().all())


async def active_jobs(
    session: AsyncSession,
    *,
    tenant: str | None,
    states: Collection[RunState],
    services: Collection[str],
    top_level: bool,
    after: int,
    limit: int,
) -> list[Job]:
    """Up to `limit` jobs in `states` after seq `after`, oldest first (keyset on
    seq; served by ix_jobs_tenant_state_seq)."""
    stmt = select(*_JOB_BASIC).where(JobRow.state.in_([int(s) for s in states]))
    if tenant is not None:
        stmt = stmt.where(JobRow.tenant == tenant)
    if services:
        stmt = stmt.where(JobRow.service.in_(list(services)))
    if top_level:
        stmt = stmt.where(JobRow.workflow_id == "")
    stmt = stmt.where(JobRow.seq > after).order_by(JobRow.seq).limit(limit)
    rows = (await session.execute(stmt)).mappings().all()
    return [job_from_row(row, full=False) for row in rows]


async def active_workflows(
    session: AsyncSession,
    *,
    tenant: str | None,
    states: Collection[RunState],
    names: Collection[str],
    after: int,
    limit: int,
) -> list[Workflow]:
    """As active_jobs, for workflows (ix_workflows_tenant_state_seq)."""
    stmt = select(*_WORKFLOW_BASIC).where(WorkflowRow.state.in_([int(s) for s in states]))
    if tenant is not None:
        stmt = stmt.where(WorkflowRow.tenant == tenant)
    if names:
        stmt = stmt.where(WorkflowRow.name.in_(list(names)))
    stmt = stmt.where(WorkflowRow.seq > after).order_by(WorkflowRow.seq).limit(limit)
    return await _counted(session, (await session.execute(stmt)).mappings().all())


async def _counted(session: AsyncSession, rows: Any) -> list[Workflow]:
    counts = await step_counts(session, [row["id"] for row in rows])
    return [workflow_from_row(row, (), counts.get(row["id"], (0, 0))) for row in rows]
