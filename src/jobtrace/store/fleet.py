"""The fleet registry's rows: connected worker sessions, as their replicas write them."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from jobtrace.store.tables import WorkerSessionRow


@dataclass(frozen=True, slots=True)
class HeldAttempt:
    job_id: str
    attempt: int
    since_us: int
    service: str = ""  # "" when not known (an attempt resumed after a reconnect)


@dataclass(frozen=True, slots=True)
class WorkerRecord:
    """One connected worker session, as the registry holds it."""

    session_id: str
    worker_id: str
    replica: str
    holder: str
    tenants: frozenset[str] | None  # whose jobs it may run; None: any tenant
    services: tuple[str, ...]
    labels: Mapping[str, str]
    version: str
    max_concurrency: int
    held: tuple[HeldAttempt, ...]
    affinity_keys: tuple[str, ...]
    draining: bool
    connected_us: int
    completed: int = 0
    failed: int = 0
    lease_losses: int = 0
    # Not part of what a watcher is told changed: they move on every refresh.
    last_heartbeat_us: int = field(default=0, compare=False)
    expires_us: int = field(default=0, compare=False)
    seq: int = field(default=0, compare=False)

    @property
    def free_slots(self) -> int:
        return 0 if self.draining else max(0, self.max_concurrency - len(self.held))

    def visible_to(self, tenant: str | None) -> bool:
        """Whether a reader of `tenant` (None: an admin) sees this worker: an
        unscoped worker is seen by all, a scoped one by its tenants."""
        return tenant is None or self.tenants is None or tenant in self.tenants


def _row(r: WorkerRecord) -> dict[str, Any]:
    return {
        "session_id": r.session_id,
        "replica": r.replica,
        "worker_id": r.worker_id,
        "holder": r.holder,
        "tenants": None if r.tenants is None else json.dumps(sorted(r.tenants)),
        "services": json.dumps(list(r.services)),
        "labels": json.dumps(dict(r.labels), sort_keys=True),
        "version": r.version,
        "max_concurrency": r.max_concurrency,
        "held": json.dumps([[h.job_id, h.attempt, h.since_us, h.service] for h in r.held]),
        "affinity_keys": json.dumps(list(r.affinity_keys)),
        "draining": r.draining,
        "connected_us": r.connected_us,
        "last_heartbeat_us": r.last_heartbeat_us,
        "expires_us": r.expires_us,
        "completed": r.completed,
        "failed": r.failed,
        "lease_losses": r.lease_losses,
    }


def _record(row: WorkerSessionRow) -> WorkerRecord:
    tenants = None if row.tenants is None else frozenset(json.loads(row.tenants))
    return WorkerRecord(
        session_id=row.session_id,
        worker_id=row.worker_id,
        replica=row.replica,
        holder=row.holder,
        tenants=tenants,
        services=tuple(json.loads(row.services)),
        labels=json.loads(row.labels),
        version=row.version,
        max_concurrency=row.max_concurrency,
        held=tuple(HeldAttempt(*h) for h in json.loads(row.held)),
        affinity_keys=tuple(json.loads(row.affinity_keys)),
        draining=bool(row.draining),
        connected_us=row.connected_us,
        completed=row.completed,
        failed=row.failed,
        lease_losses=row.lease_losses,
        last_heartbeat_us=row.last_heartbeat_us,
        expires_us=row.expires_us,
        seq=row.seq,
    )


async def upsert_workers(db: AsyncSession, records: Iterable[WorkerRecord]) -> None:
    """Insert or rewrite these sessions' rows, in one statement."""
    rows = [_row(r) for r in records]
    if not rows:
        return
    # The one dialect difference here: each dialect spells its upsert.
    dialect = db.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    statement = insert(WorkerSessionRow)
    columns = [c for c in rows[0] if c not in ("session_id", "connected_us")]
    statement = statement.on_conflict_do_update(
        index_elements=["session_id"],
        set_={c: statement.excluded[c] for c in columns},
    )
    await db.execute(statement, rows)


async def delete_workers(db: AsyncSession, session_ids: Iterable[str]) -> None:
    ids = list(session_ids)
    if ids:
        await db.execute(delete(WorkerSessionRow).where(WorkerSessionRow.session_id.in_(ids)))


async def delete_replica(db: AsyncSession, replica: str) -> None:
    """A replica stopping cleanly takes its sessions out of the registry."""
    await db.execute(delete(WorkerSessionRow).where(WorkerSessionRow.replica == replica))


async def sweep_expired(db: AsyncSession, before_us: int) -> None:
    """Delete the rows that expired before `before_us` (their replica died)."""
    await db.execute(delete(WorkerSessionRow).where(WorkerSessionRow.expires_us < before_us))


async def live_workers(
    db: AsyncSession, now_us: int, after_seq: int, limit: int
) -> list[WorkerRecord]:
    """Unexpired sessions after `after_seq`, in connection order."""
    rows = await db.scalars(
        select(WorkerSessionRow)
        .where(WorkerSessionRow.seq > after_seq, WorkerSessionRow.expires_us > now_us)
        .order_by(WorkerSessionRow.seq)
        .limit(limit)
    )
    return [_record(r) for r in rows]


async def workers_by_session(db: AsyncSession, session_ids: Iterable[str]) -> list[WorkerRecord]:
    """These sessions' rows, expired or not (missing: disconnected, or swept)."""
    ids = list(session_ids)
    if not ids:
        return []
    rows = await db.scalars(select(WorkerSessionRow).where(WorkerSessionRow.session_id.in_(ids)))
    return [_record(r) for r in rows]
