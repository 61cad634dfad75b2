"""Aggregate queries that summarise a run: its events counted by the database
(never read one by one), its steps' attempts, and the runs of a workflow name."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from jobtrace.model import RunState
from jobtrace.store.tables import JobRow, TraceEventRow, WorkflowRow


@dataclass(frozen=True, slots=True)
class EventGroup:
    """Events of one (node, level, type) of a run: how many, how many are
    milestones, and when they span."""

    node_id: str
    level: int
    type: int
    events: int
    milestones: int
    first_us: int
    last_us: int


@dataclass(frozen=True, slots=True)
class StepRow:
    """What the jobs table says of one job of a run."""

    node_id: str
    job_id: str
    step_index: int
    state: RunState
    attempt: int


@dataclass(frozen=True, slots=True)
class MilestoneRow:
    seq: int
    ts_us: int
    type: int
    level: int
    node_id: str
    message: str
    user_message: str


@dataclass(frozen=True, slots=True)
class WorkflowRun:
    """One run of a workflow name, in short."""

    id: str
    state: RunState
    created_us: int
    started_us: int
    completed_us: int


def event_groups_query(run_id: str) -> Any:
    e = TraceEventRow
    milestones = func.sum(case((e.milestone.is_(True), 1), else_=0))
    return (
        select(
            e.node_id,
            e.level,
            e.type,
            func.count(),
            milestones,
            func.min(e.ts_us),
            func.max(e.ts_us),
        )
        .where(e.run_id == run_id)
        .group_by(e.node_id, e.level, e.type)
    )


async def event_groups(session: AsyncSession, run_id: str) -> list[EventGroup]:
    """A run's events grouped by (node, level, type): one range scan of the
    run's rows on the primary key (run_id, seq), counted by the database; a
    summary's counts by level, by type and by node all add these groups up."""
    stmt = event_groups_query(run_id)
    return [
        EventGroup(str(node), int(lv), int(ty), int(n), int(m or 0), int(lo), int(hi))
        for node, lv, ty, n, m, lo, hi in (await session.execute(stmt)).all()
    ]


async def first_milestones(session: AsyncSession, run_id: str, limit: int) -> list[MilestoneRow]:
    """A run's first `limit` milestones in sequence order, without their heavy
    fields (data, output summary, error)."""
    stmt = milestones_query(run_id, limit)
    return [MilestoneRow(*row) for row in (await session.execute(stmt)).all()]


def milestones_query(run_id: str, limit: int) -> Any:
    e = TraceEventRow
    return (
        select(e.seq, e.ts_us, e.type, e.level, e.node_id, e.message, e.user_message)
        .where(e.run_id == run_id, e.milestone.is_(True))
        .order_by(e.seq)
        .limit(limit)
    )


async def run_jobs(session: AsyncSession, run_id: str, *, workflow: bool) -> list[StepRow]:
    """The jobs of a run (a workflow's steps in step order, or the standalone
    job itself), from their step columns alone."""
    j = JobRow
    where = j.workflow_id == run_id if workflow else j.id == run_id
    stmt = (
        select(j.step_name, j.id, j.step_index, j.state, j.attempt)
        .where(where)
        .order_by(j.step_index, j.seq)
    )
    return [
        StepRow(
            node_id=name or job_id, job_id=job_id, step_index=index, state=RunState(s), attempt=a
        )
        for name, job_id, index, s, a in (await session.execute(stmt)).all()
    ]


async def runs_of_name(
    session: AsyncSession, tenant: str, name: str, limit: int
) -> list[WorkflowRun]:
    """The newest `limit` runs of a workflow name in a tenant, newest first
    (ix_workflows_tenant_name_seq)."""
    stmt = runs_of_name_query(tenant, name, limit)
    return [
        WorkflowRun(id=i, state=RunState(s), created_us=c, started_us=st, completed_us=done)
        for i, s, c, st, done in (await session.execute(stmt)).all()
    ]


def runs_of_name_query(tenant: str, name: str, limit: int) -> Any:
    w = WorkflowRow
    return (
        select(w.id, w.state, w.created_us, w.started_us, w.completed_us)
        .where(w.tenant == tenant, w.name == name)
        .order_by(w.seq.desc())
        .limit(limit)
    )


async def workflow_name(session: AsyncSession, workflow_id: str) -> str:
    stmt = select(WorkflowRow.name).where(WorkflowRow.id == workflow_id)
    return str((await session.execute(stmt)).scalar_one_or_none() or "")
