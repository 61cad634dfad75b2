"""Schedules (table schedules): rows as mappings; the domain decides."""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from jobtrace.store.tables import JobRow, ScheduleRow, WorkflowRow

Row = dict[str, Any]


def _row(r: ScheduleRow) -> Row:
    return {c.name: getattr(r, c.name) for c in ScheduleRow.__table__.columns}


async def get(session: AsyncSession, tenant: str, schedule_id: str) -> Row | None:
    found = await session.get(ScheduleRow, (tenant, schedule_id))
    return None if found is None else _row(found)


async def insert(session: AsyncSession, values: Row) -> None:
    session.add(ScheduleRow(**values))
    await session.flush()


async def change(
    session: AsyncSession,
    tenant: str,
    schedule_id: str,
    values: Row,
    *,
    next_tick_us: int | None = None,
) -> bool:
    """Update one schedule; with next_tick_us, only while its next tick is
    still that one (compare-and-set). True when a row changed."""
    stmt = update(ScheduleRow).where(ScheduleRow.tenant == tenant, ScheduleRow.id == schedule_id)
    if next_tick_us is not None:
        # A scanner's advance: not over a pause (nor a change) made meanwhile.
        stmt = stmt.where(ScheduleRow.next_tick_us == next_tick_us, ScheduleRow.paused.is_(False))
    result = await session.execute(stmt.values(**values))
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def add_skipped(session: AsyncSession, tenant: str, schedule_id: str, n: int) -> None:
    await session.execute(
        update(ScheduleRow)
        .where(ScheduleRow.tenant == tenant, ScheduleRow.id == schedule_id)
        .values(skipped_ticks=ScheduleRow.skipped_ticks + n)
    )


async def claim(
    session: AsyncSession, tenant: str, schedule_id: str, next_tick_us: int, now: int, until: int
) -> bool:
    """Claim a due schedule for one scanner pass: only while its next tick is
    the one read and no other scanner's claim is current."""
    result = await session.execute(
        update(ScheduleRow)
        .where(
            ScheduleRow.tenant == tenant,
            ScheduleRow.id == schedule_id,
            ScheduleRow.next_tick_us == next_tick_us,
            ScheduleRow.paused.is_(False),
            ScheduleRow.claim_until_us <= now,
        )
        .values(claim_until_us=until)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def remove(session: AsyncSession, tenant: str, schedule_id: str) -> bool:
    result = await session.execute(
        delete(ScheduleRow).where(ScheduleRow.tenant == tenant, ScheduleRow.id == schedule_id)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def page(session: AsyncSession, tenant: str, after: str, limit: int) -> list[Row]:
    stmt = select(ScheduleRow).where(ScheduleRow.tenant == tenant)
    if after:
        stmt = stmt.where(ScheduleRow.id > after)
    rows = (await session.execute(stmt.order_by(ScheduleRow.id).limit(limit))).scalars()
    return [_row(r) for r in rows]


async def due(session: AsyncSession, now: int, limit: int) -> list[Row]:
    """Active schedules whose tick (with jitter) is due (ix_schedules_due)."""
    stmt = (
        select(ScheduleRow)
        .where(
            ScheduleRow.due_us.is_not(None),
            ScheduleRow.due_us <= now,
            ScheduleRow.paused.is_(False),
        )
        .order_by(ScheduleRow.due_us)
        .limit(limit)
    )
    return [_row(r) for r in (await session.execute(stmt)).scalars()]


async def buffered(session: AsyncSession, limit: int) -> list[Row]:
    """Active schedules with a tick waiting for the previous run (ix_schedules_buffered)."""
    stmt = (
        select(ScheduleRow)
        .where(ScheduleRow.buffered_us > 0, ScheduleRow.paused.is_(False))
        .order_by(ScheduleRow.buffered_us)
        .limit(limit)
    )
    return [_row(r) for r in (await session.execute(stmt)).scalars()]


async def run_state(session: AsyncSession, kind: str, run_id: str) -> int:
    """A run's state (0 when it is not found)."""
    if not run_id:
        return 0
    table = WorkflowRow if kind == "workflow" else JobRow
    state = (await session.execute(select(table.state).where(table.id == run_id))).scalar()
    return int(state or 0)


async def count(session: AsyncSession, tenant: str) -> int:
    return int(
        (
            await session.execute(
                select(func.count()).select_from(ScheduleRow).where(ScheduleRow.tenant == tenant)
            )
        ).scalar()
        or 0
    )
