"""Bulk operations' progress records (CancelRuns): one row per (tenant,
request id), read under its row lock by every step that moves it on."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from jobtrace.store import sql
from jobtrace.store.tables import BulkOperationRow

BULK = BulkOperationRow.__table__


@dataclass(slots=True)
class BulkProgress:
    """A bulk operation as stored: its identity, where it is, and its totals."""

    tenant: str
    request_id: str
    action: str
    filter_digest: str
    phase: str
    cursor: int | None = None
    state: str = "running"
    touched: int = 0
    skipped: int = 0
    skipped_reasons: dict[str, int] = field(default_factory=dict)
    failed: int = 0
    failures: list[dict[str, str]] = field(default_factory=list)
    created_by: str = ""
    created_us: int = 0
    updated_us: int = 0


def _from_row(row: Any) -> BulkProgress:
    return BulkProgress(
        tenant=row["tenant"],
        request_id=row["request_id"],
        action=row["action"],
        filter_digest=row["filter_digest"],
        phase=row["phase"],
        cursor=None if row["cursor"] is None else int(row["cursor"]),
        state=row["state"],
        touched=int(row["touched"]),
        skipped=int(row["skipped"]),
        skipped_reasons={str(k): int(v) for k, v in json.loads(row["skipped_reasons"]).items()},
        failed=int(row["failed"]),
        failures=list(json.loads(row["failures"])),
        created_by=row["created_by"],
        created_us=int(row["created_us"]),
        updated_us=int(row["updated_us"]),
    )


async def get(
    session: AsyncSession, tenant: str, request_id: str, *, for_update: bool = False
) -> BulkProgress | None:
    """The operation (under its row lock with `for_update`, on PostgreSQL;
    SQLite's one writer needs none)."""
    stmt = select(BULK).where(BULK.c.tenant == tenant, BULK.c.request_id == request_id)
    if for_update and sql.dialect(session) == "postgresql":
        stmt = stmt.with_for_update()
    row = (await session.execute(stmt)).mappings().first()
    return None if row is None else _from_row(row)


async def insert_if_new(session: AsyncSession, op: BulkProgress) -> bool:
    """Record a new operation unless its (tenant, request id) is recorded
    already (by a concurrent call): whether this one was stored."""
    values = {
        "tenant": op.tenant,
        "request_id": op.request_id,
        "action": op.action,
        "filter_digest": op.filter_digest,
        "state": op.state,
        "phase": op.phase,
        "cursor": op.cursor,
        "touched": 0,
        "skipped": 0,
        "skipped_reasons": "{}",
        "failed": 0,
        "failures": "[]",
        "created_by": op.created_by,
        "created_us": op.created_us,
        "updated_us": op.updated_us,
    }
    dialect = postgresql if sql.dialect(session) == "postgresql" else sqlite
    stmt = dialect.insert(BULK).values(values).on_conflict_do_nothing()
    result = await session.execute(stmt)
    return bool(getattr(result, "rowcount", 0))


async def save(session: AsyncSession, op: BulkProgress) -> None:
    """Write the operation's position and totals back (its row is locked)."""
    await session.execute(
        update(BulkOperationRow)
        .where(BulkOperationRow.tenant == op.tenant, BulkOperationRow.request_id == op.request_id)
        .values(
            state=op.state,
            phase=op.phase,
            cursor=op.cursor,
            touched=op.touched,
            skipped=op.skipped,
            skipped_reasons=json.dumps(op.skipped_reasons, sort_keys=True),
            failed=op.failed,
            failures=json.dumps(op.failures),
            updated_us=op.updated_us,
        )
    )
