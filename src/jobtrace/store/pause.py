"""Paused workflows and queues: the held bits of jobs, the workflow's pause
columns, and the queue_pauses table."""

from __future__ import annotations

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from jobtrace.model import (
    HELD_BY_QUEUE,
    HELD_BY_WORKFLOW,
    TERMINAL_STATES,
    Job,
    QueueState,
    RunState,
)
from jobtrace.store import sql
from jobtrace.store.jobs import JOBS, job_from_row
from jobtrace.store.tables import JobRow, QueuePauseRow, WorkflowRow

_UNFINISHED = JobRow.state.not_in([int(s) for s in TERMINAL_STATES])


async def hold_steps(session: AsyncSession, workflow_id: str, now: int) -> list[Job]:
    """Hold every unfinished step of a workflow (HELD_BY_WORKFLOW): the jobs
    as held. A running step keeps running; its retry, its dependants and
    fan-out children keep (or inherit) the bit."""
    stmt = (
        update(JobRow)
        .where(JobRow.workflow_id == workflow_id, _UNFINISHED)
        .values(held=JobRow.held.op("|")(HELD_BY_WORKFLOW), updated_us=now)
        .returning(*JOBS.c)
    )
    return [job_from_row(r) for r in (await session.execute(stmt)).mappings()]


async def release_steps(session: AsyncSession, workflow_id: str, now: int) -> list[Job]:
    """Clear HELD_BY_WORKFLOW on a workflow's steps: the jobs released."""
    stmt = (
        update(JobRow)
        .where(
            JobRow.workflow_id == workflow_id,
            JobRow.held.op("&")(HELD_BY_WORKFLOW) != 0,
        )
        .values(held=JobRow.held.op("&")(HELD_BY_QUEUE), updated_us=now)
        .returning(*JOBS.c)
    )
    return [job_from_row(r) for r in (await session.execute(stmt)).mappings()]


async def pause_workflow_row(
    session: AsyncSession, workflow_id: str, paused_from: RunState, reason: str, now: int
) -> None:
    await session.execute(
        update(WorkflowRow)
        .where(WorkflowRow.id == workflow_id)
        .values(
            state=int(RunState.PAUSED),
            paused_us=now,
            pause_reason=reason,
            paused_from=int(paused_from),
            updated_us=now,
        )
    )


async def paused_from(session: AsyncSession, workflow_id: str) -> tuple[RunState, int]:
    """The state a workflow was paused from (UNSPECIFIED: not recorded) and
    when it started (0: no step has)."""
    stmt = select(WorkflowRow.paused_from, WorkflowRow.started_us).where(
        WorkflowRow.id == workflow_id
    )
    state, started_us = (await session.execute(stmt)).one()
    return RunState(state), int(started_us)


async def resume_workflow_row(
    session: AsyncSession, workflow_id: str, state: RunState, now: int
) -> None:
    await session.execute(
        update(WorkflowRow)
        .where(WorkflowRow.id == workflow_id)
        .values(state=int(state), paused_us=0, pause_reason="", paused_from=0, updated_us=now)
    )


# --- queues ----------------------------------------------------------------


def _queue_state(row: QueuePauseRow) -> QueueState:
    return QueueState(
        tenant=row.tenant,
        service=row.service,
        paused=True,
        paused_by=row.paused_by,
        paused_us=row.paused_us,
        reason=row.reason,
    )


async def get_queue_pause(session: AsyncSession, tenant: str, service: str) -> QueueState | None:
    row = await session.get(QueuePauseRow, (tenant, service))
    return None if row is None else _queue_state(row)


async def lock_queue_pause(session: AsyncSession, tenant: str, service: str) -> bool:
    """Row-lock a queue's pause (PostgreSQL; SQLite's single writer needs
    none): whether the queue is paused. ResumeQueue's DELETE takes the same
    lock, so marking a queue's jobs and releasing them never interleave."""
    stmt = (
        select(QueuePauseRow.tenant)
        .where(QueuePauseRow.tenant == tenant, QueuePauseRow.service == service)
        .with_for_update()
    )
    return (await session.execute(stmt)).scalar() is not None


async def insert_queue_pause(
    session: AsyncSession, tenant: str, service: str, by: str, reason: str, now: int
) -> None:
    await session.execute(
        insert(QueuePauseRow).values(
            tenant=tenant, service=service, paused_by=by, paused_us=now, reason=reason
        )
    )


async def delete_queue_pause(session: AsyncSession, tenant: str, service: str) -> int:
    result = await session.execute(
        delete(QueuePauseRow).where(
            QueuePauseRow.tenant == tenant, QueuePauseRow.service == service
        )
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


_HOLD_QUEUED = sql.Query(
    "UPDATE jobs SET held = held | :bit WHERE tenant = :tenant AND service = :service"
    " AND state = :queued"
)


async def hold_queued(session: AsyncSession, tenant: str, service: str) -> int:
    """Mark the QUEUED jobs of a queue HELD_BY_QUEUE (how many). On
    PostgreSQL this waits for the claims of them in flight (their row locks):
    see domain.pause."""
    return await sql.execute(
        session,
        _HOLD_QUEUED,
        {
            "bit": HELD_BY_QUEUE,
            "tenant": tenant,
            "service": service,
            "queued": int(RunState.QUEUED),
        },
    )


_RELEASE_QUEUE = sql.Query(
    "UPDATE jobs SET held = held & :keep WHERE tenant = :tenant AND service = :service"
    " AND (held & :bit) != 0"
)


async def release_queue(session: AsyncSession, tenant: str, service: str) -> int:
    """Clear HELD_BY_QUEUE on a queue's jobs (how many). The dispatchers are
    woken by the queue's notice, not by one per job: a queue may hold many."""
    return await sql.execute(
        session,
        _RELEASE_QUEUE,
        {"keep": HELD_BY_WORKFLOW, "bit": HELD_BY_QUEUE, "tenant": tenant, "service": service},
    )


async def paused_queues(session: AsyncSession) -> dict[str, frozenset[str]]:
    """Every paused queue: service -> the tenants whose queue of it is paused."""
    out: dict[str, set[str]] = {}
    for tenant, service in (
        await session.execute(select(QueuePauseRow.tenant, QueuePauseRow.service))
    ).all():
        out.setdefault(service, set()).add(tenant)
    return {service: frozenset(tenants) for service, tenants in out.items()}


async def list_queues(session: AsyncSession, tenant: str | None) -> list[QueueState]:
    """Each queue (of `tenant`, or of every tenant) with jobs QUEUED or
    RUNNING, and each paused one, by tenant then service."""
    counted = (RunState.QUEUED, RunState.RUNNING)
    stmt = select(JobRow.tenant, JobRow.service, JobRow.state, func.count()).where(
        JobRow.state.in_([int(s) for s in counted])
    )
    if tenant is not None:
        stmt = stmt.where(JobRow.tenant == tenant)
    stmt = stmt.group_by(JobRow.tenant, JobRow.service, JobRow.state)
    counts: dict[tuple[str, str], dict[RunState, int]] = {}
    for t, service, state, n in (await session.execute(stmt)).all():
        counts.setdefault((t, service), {})[RunState(state)] = int(n)
    pauses = select(QueuePauseRow)
    if tenant is not None:
        pauses = pauses.where(QueuePauseRow.tenant == tenant)
    queues = {
        (q.tenant, q.service): q
        for q in (_queue_state(r) for r in (await session.execute(pauses)).scalars())
    }
    out = []
    for key in sorted(set(counts) | set(queues)):
        base = queues.get(key) or QueueState(tenant=key[0], service=key[1])
        found = counts.get(key, {})
        out.append(
            QueueState(
                tenant=base.tenant,
                service=base.service,
                paused=base.paused,
                paused_by=base.paused_by,
                paused_us=base.paused_us,
                reason=base.reason,
                queued=found.get(RunState.QUEUED, 0),
                running=found.get(RunState.RUNNING, 0),
            )
        )
    return out


async def queue_counts(session: AsyncSession, tenant: str, service: str) -> tuple[int, int]:
    """(QUEUED, RUNNING) jobs of one queue."""
    stmt = (
        select(JobRow.state, func.count())
        .where(
            JobRow.tenant == tenant,
            JobRow.service == service,
            JobRow.state.in_([int(RunState.QUEUED), int(RunState.RUNNING)]),
        )
        .group_by(JobRow.state)
    )
    n = {RunState(s): int(c) for s, c in (await session.execute(stmt)).all()}
    return n.get(RunState.QUEUED, 0), n.get(RunState.RUNNING, 0)
