"""The failures summary: failed attempts in a window, by kind and service."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from jobtrace.clock import now_us
from jobtrace.domain.errors import Violations
from jobtrace.domain.validation import SERVICE_RE, check_window
from jobtrace.model import FailureGroup
from jobtrace.store import failures as store
from jobtrace.store.db import Database, Tx


async def summarize(
    db: Database, tenant: str | None, since_us: int | None, until_us: int | None, service: str
) -> list[FailureGroup]:
    """Failed attempts of `tenant` (None: all tenants) in [since, until) (until
    None: now), grouped by kind and service; INVALID_ARGUMENT for a bad window."""
    v = Violations()
    if since_us is None:
        v.add("since", "required: failures at or after this time")
    if service and not SERVICE_RE.fullmatch(service):
        v.add("service", "must be a service name: 1-128 characters of [A-Za-z0-9._:/-]")
    check_window(v, "since", since_us, "until", until_us)
    v.raise_if_any()
    until = now_us() if until_us is None else until_us
    assert since_us is not None
    async with db.read() as session:
        return await store.summarize(session, tenant, since_us, until, service)


async def sweep_once(db: Database, retention_s: float, batch: int = 1000) -> int:
    """Delete failures older than the retention, in short batched writes."""
    cutoff = now_us() - int(retention_s * 1_000_000)
    total = 0
    while True:

        async def op(session: AsyncSession, tx: Tx) -> int:
            return await store.delete_older_than(session, cutoff, batch)

        deleted = await db.write(op)
        total += deleted
        if deleted < batch:
            return total
