"""Flow control storage: named rate limits, their token buckets, and the
concurrency keys' slot rows and RUNNING counts."""

from __future__ import annotations

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from jobtrace.model import (
    Concurrency,
    ConcurrencyStrategy,
    JobSpec,
    RateLimit,
    RateLimitUse,
    RunState,
)
from jobtrace.store import codec, sql
from jobtrace.store.tables import JobRow, RateBucketRow, RateLimitRow

# --- storage form on jobs -------------------------------------------------


def dumps(spec: JobSpec) -> str:
    """The `flow` column's value (None: no flow control)."""
    if not spec.rate_limits and spec.concurrency is None:
        return ""
    out: dict[str, object] = {}
    if spec.rate_limits:
        out["r"] = [[u.key, u.units, u.partition, u.resolved] for u in spec.rate_limits]
    c = spec.concurrency
    if c is not None:
        out["c"] = [c.key, c.max_running, int(c.strategy), c.resolved]
    return codec.dumps(out)


def loads(text: str) -> tuple[tuple[RateLimitUse, ...], Concurrency | None]:
    if not text:
        return (), None
    value = codec.loads(text)
    uses = tuple(
        RateLimitUse(str(r[0]), int(r[1]), str(r[2]), str(r[3])) for r in value.get("r", ())
    )
    c = value.get("c")
    conc = (
        None
        if c is None
        else Concurrency(str(c[0]), int(c[1]), ConcurrencyStrategy(int(c[2])), str(c[3]))
    )
    return uses, conc


def flow_key(tenant: str, spec: JobSpec) -> str:
    """The key the dispatcher skips while it knows it blocked: the job's first
    bucket, else its concurrency key ('' without flow control)."""
    if spec.rate_limits:
        return f"{tenant}\x1fr\x1f{spec.rate_limits[0].bucket}"
    if spec.concurrency is not None:
        return f"{tenant}\x1fc\x1f{spec.concurrency.resolved}"
    return ""


def concurrency_flow_key(tenant: str, key: str) -> str:
    return f"{tenant}\x1fc\x1f{key}"


def _limit(r: RateLimitRow) -> RateLimit:
    return RateLimit(
        key=r.key,
        count=r.count,
        period_us=r.period_us,
        burst=r.burst,
        tenant=r.tenant,
        created_by=r.created_by,
        created_us=r.created_us,
        updated_us=r.updated_us,
    )


async def insert_limit(session: AsyncSession, limit: RateLimit) -> bool:
    """Store a new limit; False (nothing stored) if the tenant has one with its key."""
    found = await session.get(RateLimitRow, (limit.tenant, limit.key))
    if found is not None:
        return False
    await session.execute(
        insert(RateLimitRow).values(
            tenant=limit.tenant,
            key=limit.key,
            count=limit.count,
            period_us=limit.period_us,
            burst=limit.burst,
            created_by=limit.created_by,
            created_us=limit.created_us,
            updated_us=limit.updated_us,
        )
    )
    return True


async def get_limit(session: AsyncSession, tenant: str, key: str) -> RateLimit | None:
    stmt = select(RateLimitRow).where(RateLimitRow.tenant == tenant, RateLimitRow.key == key)
    row = (await session.execute(stmt)).scalar_one_or_none()
    return None if row is None else _limit(row)


async def list_limits(
    session: AsyncSession, tenant: str, after: str, limit: int
) -> list[RateLimit]:
    stmt = (
        select(RateLimitRow)
        .where(RateLimitRow.tenant == tenant, RateLimitRow.key > after)
        .order_by(RateLimitRow.key)
        .limit(limit)
    )
    return [_limit(r) for r in (await session.execute(stmt)).scalars()]


async def known_keys(session: AsyncSession, tenant: str, keys: set[str]) -> set[str]:
    """Which of `keys` name limits of the tenant."""
    if not keys:
        return set()
    stmt = select(RateLimitRow.key).where(
        RateLimitRow.tenant == tenant, RateLimitRow.key.in_(sorted(keys))
    )
    return set((await session.execute(stmt)).scalars())


async def update_limit(session: AsyncSession, limit: RateLimit) -> bool:
    """Change a limit's rate and burst; its buckets keep their tokens, capped
    at the new burst. False if there is no such limit."""
    changed = await session.execute(
        update(RateLimitRow)
        .where(RateLimitRow.tenant == limit.tenant, RateLimitRow.key == limit.key)
        .values(
            count=limit.count,
            period_us=limit.period_us,
            burst=limit.burst,
            updated_us=limit.updated_us,
        )
    )
    if not changed.rowcount:  # type: ignore[attr-defined]
        return False
    await session.execute(
        update(RateBucketRow)
        .where(
            RateBucketRow.tenant == limit.tenant,
            RateBucketRow.key == limit.key,
            RateBucketRow.tokens > limit.burst,
        )
        .values(tokens=float(limit.burst))
    )
    return True


async def delete_limit(session: AsyncSession, tenant: str, key: str) -> bool:
    gone = await session.execute(
        delete(RateLimitRow).where(RateLimitRow.tenant == tenant, RateLimitRow.key == key)
    )
    await session.execute(
        delete(RateBucketRow).where(RateBucketRow.tenant == tenant, RateBucketRow.key == key)
    )
    return bool(gone.rowcount)  # type: ignore[attr-defined]


# --- the claim's checks (only jobs with flow control get here) ---------------

_BUCKET = (
    "SELECT b.tokens, b.updated_us, l.count, l.period_us, l.burst FROM rate_limits l"
    " LEFT JOIN rate_buckets b ON b.tenant = l.tenant AND b.key = l.key"
    " AND b.partition = :partition WHERE l.tenant = :tenant AND l.key = :key"
)
_BUCKET_Q = sql.Query(
    _BUCKET,
    # The limit row is read, the bucket row locked; one locked by another
    # replica's claim is not waited for (NOWAIT fails the statement, so
    # SKIP LOCKED on the bucket alone: no row comes back).
    "SELECT b.tokens, b.updated_us, l.count, l.period_us, l.burst FROM rate_limits l"
    " JOIN rate_buckets b ON b.tenant = l.tenant AND b.key = l.key"
    " AND b.partition = :partition WHERE l.tenant = :tenant AND l.key = :key"
    " FOR UPDATE OF b SKIP LOCKED",
)
_NEW_BUCKET = sql.Query(
    "INSERT INTO rate_buckets (tenant, key, partition, tokens, updated_us)"
    " SELECT tenant, key, :partition, burst, :now FROM rate_limits"
    " WHERE tenant = :tenant AND key = :key"
    " ON CONFLICT (tenant, key, partition) DO NOTHING"
)
_LIMIT_EXISTS = sql.Query("SELECT 1 FROM rate_limits WHERE tenant = :tenant AND key = :key")


class Bucket:
    """A bucket as the claim read it (locked on PostgreSQL), refilled to `now`."""

    __slots__ = ("as_of_us", "burst", "key", "partition", "per_us", "tokens")

    def __init__(
        self, key: str, partition: str, tokens: float, per_us: float, burst: int, as_of_us: int
    ):
        self.key = key
        self.partition = partition
        self.tokens = tokens
        self.per_us = per_us
        self.burst = burst
        # When the tokens were counted: never before the row's time (a claim
        # whose clock read came before another's commit must not move it back).
        self.as_of_us = as_of_us


async def lock_bucket(
    session: AsyncSession, tenant: str, key: str, partition: str, now: int
) -> Bucket | bool | None:
    """The bucket of a limit's partition, refilled to `now` (locked on
    PostgreSQL, created full if new); None if the limit is gone (it no longer
    limits); False if another replica's claim holds it locked right now."""
    params = {"tenant": tenant, "key": key, "partition": partition, "now": now}
    row = await sql.fetch_one(session, _BUCKET_Q, params)
    if row is None or row["tokens"] is None:
        if sql.dialect(session) == "sqlite" and row is not None:
            await sql.execute(session, _NEW_BUCKET, params)
            row = await sql.fetch_one(session, _BUCKET_Q, params)
        elif row is None:
            if await sql.fetch_one(session, _LIMIT_EXISTS, params) is None:
                return None
            await sql.execute(session, _NEW_BUCKET, params)
            row = await sql.fetch_one(session, _BUCKET_Q, params)
            if row is None:
                return False  # created or held by another claim: locked
        if row is None or row["tokens"] is None:
            return None
    per_us = row["count"] / row["period_us"]
    burst = int(row["burst"])
    counted = int(row["updated_us"])
    tokens = min(float(burst), float(row["tokens"]) + max(0, now - counted) * per_us)
    return Bucket(key, partition, tokens, per_us, burst, max(now, counted))


_TAKE = sql.Query(
    "UPDATE rate_buckets SET tokens = :tokens, updated_us = :now"
    " WHERE tenant = :tenant AND key = :key AND partition = :partition"
)


async def take(session: AsyncSession, tenant: str, bucket: Bucket) -> None:
    """Write back a bucket after its tokens were taken (bucket.tokens)."""
    await sql.execute(
        session,
        _TAKE,
        {
            "tokens": bucket.tokens,
            "now": bucket.as_of_us,
            "tenant": tenant,
            "key": bucket.key,
            "partition": bucket.partition,
        },
    )


_NEW_SLOT = sql.Query(
    "INSERT INTO concurrency_slots (tenant, key) VALUES (:tenant, :key)"
    " ON CONFLICT (tenant, key) DO NOTHING"
)
_LOCK_SLOT = sql.Query(
    "SELECT 1 FROM concurrency_slots WHERE tenant = :tenant AND key = :key",
    "SELECT 1 FROM concurrency_slots WHERE tenant = :tenant AND key = :key FOR UPDATE SKIP LOCKED",
)


async def lock_slot(session: AsyncSession, tenant: str, key: str) -> bool:
    """Lock a concurrency key's slot row (PostgreSQL; created if new): False
    if another replica's claim holds it right now."""
    params = {"tenant": tenant, "key": key}
    if sql.dialect(session) == "sqlite":
        return True  # one writer at a time
    if await sql.fetch_one(session, _LOCK_SLOT, params) is not None:
        return True
    await sql.execute(session, _NEW_SLOT, params)
    return await sql.fetch_one(session, _LOCK_SLOT, params) is not None


async def running_with_key(session: AsyncSession, tenant: str, key: str) -> list[tuple[str, int]]:
    """The RUNNING jobs of a tenant holding a concurrency key: (id, started_us),
    the first started first (ix_jobs_concurrency)."""
    stmt = (
        select(JobRow.id, JobRow.started_us)
        .where(
            JobRow.tenant == tenant,
            JobRow.concurrency_key == key,
            JobRow.state == int(RunState.RUNNING),
        )
        .order_by(JobRow.started_us, JobRow.seq)
    )
    return [(r[0], int(r[1])) for r in (await session.execute(stmt)).all()]


async def count_limits(session: AsyncSession, tenant: str) -> int:
    stmt = select(func.count()).select_from(RateLimitRow).where(RateLimitRow.tenant == tenant)
    return int((await session.execute(stmt)).scalar_one())
