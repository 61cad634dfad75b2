"""Queries over trace events and per-run sequences."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import delete, func, select, tuple_
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncSession

from jobtrace.model import Category, ErrorInfo, Level, TraceEvent, TraceType
from jobtrace.store import codec, sql
from jobtrace.store.listing import Chunk, Listing, read_chunk
from jobtrace.store.sql import Params, Query, Row
from jobtrace.store.tables import TraceEventRow, TraceRunRow


@dataclass(frozen=True, slots=True)
class EventFilter:
    min_level: int = 0
    category: int = 0
    node_id: str = ""
    type: int = 0
    since_us: int = 0
    until_us: int = 0
    milestones_only: bool = False
    # 1 (low) to 10 (high); 0: any.
    min_display_priority: int = 0

    def matches(self, e: TraceEvent) -> bool:
        return (
            (not self.min_level or e.level >= self.min_level)
            and (not self.category or e.category == self.category)
            and (not self.node_id or e.node_id == self.node_id)
            and (not self.type or e.type == self.type)
            and (not self.since_us or e.ts_us >= self.since_us)
            and (not self.until_us or e.ts_us < self.until_us)
            and (not self.milestones_only or e.milestone)
            and (not self.min_display_priority or e.display_priority >= self.min_display_priority)
        )


_RESERVE = Query(
    "INSERT INTO trace_runs (run_id, tenant, last_seq) VALUES (:run_id, :tenant, :count)"
    " ON CONFLICT (run_id) DO UPDATE SET last_seq = trace_runs.last_seq + :count"
    " RETURNING last_seq"
)


async def reserve_sequence(session: AsyncSession, run_id: str, tenant: str, count: int) -> int:
    """Reserve `count` numbers of a run's sequence; return the first. The row
    stays locked until commit, so commit order is sequence order per run."""
    params = {"run_id": run_id, "tenant": tenant, "count": count}
    last = await sql.scalar(session, _RESERVE, params)
    return int(last) - count + 1


EVENTS = TraceEventRow.__table__
_INSERT_EVENT = sql.insert_query(EVENTS, sql.columns(EVENTS))


def _reserve_and_insert(update: str = "", also: Sequence[str] = ()) -> Query:
    """PostgreSQL: reserve the run's numbers and insert its events in one
    statement (a data-modifying CTE): one array per column, numbered by
    their position. The column list is the table's. With `update` (an
    UPDATE of one job RETURNING *), that runs first in the same statement,
    and the events are stored only if it matched a row (they take its
    traceparent); the statement returns the row and the last number. `also`:
    INSERTs (or UPDATEs of other tables) run in the same statement (whether
    the update matched or not)."""
    names = [n for n in sql.columns(EVENTS) if n != "seq"]
    pg = postgresql.dialect()  # type: ignore[no-untyped-call]
    arrays = ", ".join(f"CAST(:a_{n} AS {EVENTS.c[n].type.compile(dialect=pg)}[])" for n in names)
    quoted = ", ".join(f'"{n}"' for n in names)
    more = "".join(f" x{i} AS ({text})," for i, text in enumerate(also))
    if not update:
        picked = ", ".join(f"u.{n}" for n in names)
        return Query(
            f"WITH{more} r AS (INSERT INTO trace_runs (run_id, tenant, last_seq)"
            " VALUES (:run_id, :tenant, CAST(:count AS BIGINT))"
            " ON CONFLICT (run_id) DO UPDATE SET last_seq = trace_runs.last_seq + EXCLUDED.last_seq"
            " RETURNING last_seq),"
            f" e AS (INSERT INTO trace_events (seq, {quoted})"
            f" SELECT r.last_seq - CAST(:count AS BIGINT) + u.n, {picked}"
            f" FROM r, unnest({arrays}) WITH ORDINALITY AS u({', '.join(names)}, n))"
            " SELECT last_seq FROM r"
        )
    picked = ", ".join("j.traceparent" if n == "traceparent" else f"u.{n}" for n in names)
    return Query(
        f"WITH j AS ({update}),{more}"
        " r AS (INSERT INTO trace_runs (run_id, tenant, last_seq)"
        " SELECT :run_id, :tenant, CAST(:count AS BIGINT) FROM j"
        " ON CONFLICT (run_id) DO UPDATE SET last_seq = trace_runs.last_seq + EXCLUDED.last_seq"
        " RETURNING last_seq),"
        f" e AS (INSERT INTO trace_events (seq, {quoted})"
        f" SELECT r.last_seq - CAST(:count AS BIGINT) + u.n, {picked}"
        f" FROM r, j, unnest({arrays}) WITH ORDINALITY AS u({', '.join(names)}, n))"
        " SELECT j.*, r.last_seq AS trace_last_seq_ FROM j, r"
    )


_RESERVE_AND_INSERT = _reserve_and_insert()
_UPDATE_AND_INSERT: dict[tuple[str, ...], Query] = {}
_INSERT_WITH: dict[tuple[str, ...], Query] = {}


def _merged(params: Params, *more: Params) -> Params:
    for extra in more:
        clash = params.keys() & extra.keys()
        assert not clash, f"parameters named twice: {sorted(clash)}"
        params.update(extra)
    return params


def _event_params(run_id: str, tenant: str, events: Sequence[TraceEvent]) -> Params:
    rows = [_values(e) for e in events]
    params: Params = {"run_id": run_id, "tenant": tenant, "count": len(events)}
    for name in rows[0]:
        if name != "seq":
            params[f"a_{name}"] = [r[name] for r in rows]
    return params


def _numbered(events: Sequence[TraceEvent], last: int, **fields: Any) -> list[TraceEvent]:
    first = last - len(events) + 1
    return [replace(e, seq=first + i, **fields) for i, e in enumerate(events)]


async def store_events(
    session: AsyncSession,
    run_id: str,
    tenant: str,
    events: Sequence[TraceEvent],
    also: Sequence[tuple[Query, Params]] = (),
) -> list[TraceEvent]:
    """Number events of one run with its next sequence numbers and store them;
    return them numbered. The trace_runs row stays locked until commit, so
    commit order is sequence order per run. One statement on PostgreSQL; two
    on SQLite (its statements run in-process, in microseconds). `also`:
    writes of other tables (with parameters of their own names) run in the
    same statement on PostgreSQL, before on SQLite."""
    if sql.dialect(session) != "postgresql":
        for q, p in also:
            await sql.execute(session, q, p)
        first = await reserve_sequence(session, run_id, tenant, len(events))
        numbered = [replace(e, seq=first + i) for i, e in enumerate(events)]
        await insert_events(session, numbered)
        return numbered
    params = _event_params(run_id, tenant, events)
    query = _RESERVE_AND_INSERT
    if also:
        texts = tuple(q.clause("postgresql").text for q, _ in also)
        query = _INSERT_WITH.get(texts) or _INSERT_WITH.setdefault(
            texts, _reserve_and_insert("", texts)
        )
        params = _merged(params, *(p for _, p in also))
    return _numbered(events, int(await sql.scalar(session, query, params)))


async def update_and_store_events(
    session: AsyncSession,
    update: tuple[Query, Params],
    run_id: str,
    tenant: str,
    events: Sequence[TraceEvent],
    also: Sequence[tuple[Query, Params]] = (),
) -> tuple[Row | None, list[TraceEvent]]:
    """Run `update` (an UPDATE of one job, RETURNING *) and, if it matched its
    row, store these events of the job's run as store_events does (with the
    job's traceparent): the row as updated and the events as stored, or
    (None, []) with nothing changed. One statement on PostgreSQL. `also`:
    INSERTs (of other tables) to run too, with names of their own; they run
    whatever the update matched, so they go with an update of a locked row
    (which cannot miss)."""
    query, update_params = update
    if sql.dialect(session) != "postgresql":
        row = await sql.fetch_one(session, query, update_params)
        if row is None:
            return None, []
        for q, p in also:
            await sql.execute(session, q, p)
        marked = [replace(e, traceparent=row["traceparent"]) for e in events]
        return row, await store_events(session, run_id, tenant, marked)
    texts = (query.clause("postgresql").text, *(q.clause("postgresql").text for q, _ in also))
    combined = _UPDATE_AND_INSERT.get(texts)
    if combined is None:
        combined = _UPDATE_AND_INSERT[texts] = _reserve_and_insert(texts[0], texts[1:])
    params = _merged(_event_params(run_id, tenant, events), update_params, *(p for _, p in also))
    row = await sql.fetch_one(session, combined, params)
    if row is None:
        return None, []
    return row, _numbered(events, int(row["trace_last_seq_"]), traceparent=row["traceparent"])


async def update_many_and_store_events(
    session: AsyncSession,
    update: tuple[Query, Params],
    events: Sequence[TraceEvent],
    also: Sequence[tuple[Query, Params]] = (),
) -> tuple[dict[str, Row], list[TraceEvent]]:
    """Run `update` (an UPDATE of several jobs RETURNING at least id and
    traceparent) and store the events of the jobs it matched (an event's
    job_id names its job; it takes that job's traceparent), numbered per run
    as store_events numbers one run's: the rows as updated by job id, and the
    events as stored. Events of a job it did not match are dropped: nothing
    of that job changed. Three statements, whatever the number of jobs and
    runs. `also`: INSERTs (of other tables) to run too, whatever the update
    matched (so with an update of locked rows, which cannot miss), one
    statement (an executemany) per distinct query."""
    query, params = update
    rows = {r["id"]: r for r in await sql.fetch(session, query, params)}
    kept = [e for e in events if e.job_id in rows]
    traceparents = {job_id: row["traceparent"] for job_id, row in rows.items()}
    stored = await store_runs_events(session, kept, traceparents)
    grouped: dict[Query, list[Params]] = {}
    for q, p in also:
        grouped.setdefault(q, []).append(p)
    for q, many in grouped.items():
        await sql.execute_many(session, q, many)
    return rows, stored


_RESERVE_MANY = Query(
    "INSERT INTO trace_runs (run_id, tenant, last_seq)"
    " SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'),"
    " json_extract(value, '$[2]') FROM json_each(:runs) WHERE true"
    " ON CONFLICT (run_id) DO UPDATE SET last_seq = trace_runs.last_seq + excluded.last_seq"
    " RETURNING run_id, last_seq",
    postgresql="INSERT INTO trace_runs (run_id, tenant, last_seq)"
    " SELECT * FROM unnest(CAST(:run_ids AS TEXT[]), CAST(:tenants AS TEXT[]),"
    " CAST(:counts AS BIGINT[])) ORDER BY 1"
    " ON CONFLICT (run_id) DO UPDATE SET last_seq = trace_runs.last_seq + EXCLUDED.last_seq"
    " RETURNING run_id, last_seq",
)


async def store_runs_events(
    session: AsyncSession,
    events: Sequence[TraceEvent],
    traceparents: Mapping[str, str] | None = None,
) -> list[TraceEvent]:
    """Store events of any number of runs, each run's numbered with its next
    sequence numbers in the order given: one statement reserves every run's
    numbers (their trace_runs rows locked until commit, in run id order, as
    store_events locks one) and one inserts the events. Return them numbered
    (and with `traceparents`, each with its job's traceparent)."""
    if not events:
        return []
    counts: dict[str, list[Any]] = {}
    for e in events:
        found = counts.get(e.run_id)
        if found is None:
            counts[e.run_id] = [e.tenant, 1]
        else:
            found[1] += 1
    runs = sorted(counts)
    params: Params
    if sql.dialect(session) == "postgresql":
        params = {
            "run_ids": runs,
            "tenants": [counts[r][0] for r in runs],
            "counts": [counts[r][1] for r in runs],
        }
    else:
        params = {"runs": codec.dumps([[r, *counts[r]] for r in runs])}
    reserved = await sql.fetch(session, _RESERVE_MANY, params)
    following = {r["run_id"]: int(r["last_seq"]) - counts[r["run_id"]][1] + 1 for r in reserved}
    numbered = []
    for e in events:
        seq = following[e.run_id]
        following[e.run_id] = seq + 1
        if traceparents is None:
            numbered.append(replace(e, seq=seq))
        else:
            numbered.append(replace(e, seq=seq, traceparent=traceparents[e.job_id]))
    await insert_events(session, numbered)
    return numbered


def _values(e: TraceEvent) -> dict[str, Any]:
    return {
        "run_id": e.run_id,
        "seq": e.seq,
        "tenant": e.tenant,
        "event_key": e.event_key,
        "node_id": e.node_id,
        "type": int(e.type),
        "level": int(e.level),
        "category": int(e.category),
        "ts_us": e.ts_us,
        "message": e.message,
        "user_message": e.user_message,
        "error": None
        if e.error is None
        else codec.dumps(
            {
                "message": e.error.message,
                "code": e.error.code,
                "details": e.error.details,
                "stack": e.error.stack,
            }
        ),
        "output_summary": None if e.output_summary is None else codec.dumps(e.output_summary),
        "data": None if e.data is None else codec.dumps(e.data),
        "step_number": e.step_number,
        "total_steps": e.total_steps,
        "percent": e.percent,
        "display_priority": e.display_priority,
        "milestone": bool(e.milestone),
        "truncated": bool(e.truncated),
        "job_id": e.job_id,
        "attempt": e.attempt,
        "worker_id": e.worker_id,
        "traceparent": e.traceparent,
        "created_us": e.created_us,
        "recorded_by": e.recorded_by,
        "duration_us": e.duration_us,
    }


def event_from_row(r: Row, *, full: bool = True) -> TraceEvent:
    """An event from its row (any mapping of column name to value); without
    `full`, a row read without data and output_summary (both left unset)."""
    error = codec.loads(r["error"])
    return TraceEvent(
        run_id=r["run_id"],
        node_id=r["node_id"],
        type=TraceType(r["type"]),
        level=Level(r["level"]),
        category=Category(r["category"]),
        ts_us=r["ts_us"],
        message=r["message"],
        user_message=r["user_message"],
        error=None if error is None else ErrorInfo(**error),
        output_summary=codec.loads(r["output_summary"]) if full else None,
        data=codec.loads(r["data"]) if full else None,
        step_number=r["step_number"],
        total_steps=r["total_steps"],
        percent=r["percent"],
        display_priority=r["display_priority"],
        milestone=bool(r["milestone"]),
        event_key=r["event_key"],
        truncated=bool(r["truncated"]),
        job_id=r["job_id"],
        attempt=r["attempt"],
        worker_id=r["worker_id"],
        traceparent=r["traceparent"],
        tenant=r["tenant"],
        seq=r["seq"],
        created_us=r["created_us"],
        recorded_by=r["recorded_by"],
        duration_us=r["duration_us"],
    )


async def insert_events(session: AsyncSession, events: Sequence[TraceEvent]) -> None:
    await sql.execute_many(session, _INSERT_EVENT, [_values(e) for e in events])


async def events_by_key(
    session: AsyncSession, run_id: str, keys: Sequence[str]
) -> dict[str, TraceEvent]:
    if not keys:
        return {}
    stmt = select(EVENTS).where(
        TraceEventRow.run_id == run_id, TraceEventRow.event_key.in_(list(keys))
    )
    return {r["event_key"]: event_from_row(r) for r in (await session.execute(stmt)).mappings()}


_EVENT_HEAVY = ("output_summary", "data")


async def read_events(
    session: AsyncSession,
    run_id: str,
    after_seq: int,
    flt: EventFilter,
    *,
    limit: int,
    max_bytes: int,
    full: bool = True,
) -> Chunk[TraceEvent]:
    """A run's events after a sequence number, in order; data and
    output_summary only when `full`."""
    where = [TraceEventRow.run_id == run_id]
    if flt.min_level:
        where.append(TraceEventRow.level >= flt.min_level)
    if flt.category:
        where.append(TraceEventRow.category == flt.category)
    if flt.node_id:
        where.append(TraceEventRow.node_id == flt.node_id)
    if flt.type:
        where.append(TraceEventRow.type == flt.type)
    if flt.since_us:
        where.append(TraceEventRow.ts_us >= flt.since_us)
    if flt.until_us:
        where.append(TraceEventRow.ts_us < flt.until_us)
    if flt.milestones_only:
        where.append(TraceEventRow.milestone.is_(True))
    if flt.min_display_priority:
        where.append(TraceEventRow.display_priority >= flt.min_display_priority)
    heavy = _EVENT_HEAVY if full else ()
    listing = Listing(
        key=TraceEventRow.seq,
        where=where,
        columns=[c for c in EVENTS.c if full or c.name not in _EVENT_HEAVY],
        sized=[EVENTS.c[name] for name in ("message", "user_message", "error", *heavy)],
    )
    return await read_chunk(
        session,
        listing,
        after=after_seq,
        limit=limit,
        max_bytes=max_bytes,
        build=lambda row: event_from_row(row, full=full),
    )


async def last_sequence(session: AsyncSession, run_id: str) -> int:
    stmt = select(TraceRunRow.last_seq).where(TraceRunRow.run_id == run_id)
    return int((await session.execute(stmt)).scalar() or 0)


async def history_length(session: AsyncSession, run_id: str) -> int:
    stmt = select(func.count()).select_from(TraceEventRow).where(TraceEventRow.run_id == run_id)
    return int((await session.execute(stmt)).scalar() or 0)


async def delete_older_than(session: AsyncSession, cutoff_us: int, limit: int) -> int:
    """Delete up to `limit` of the oldest events created before the cutoff."""
    victims = (
        select(TraceEventRow.run_id, TraceEventRow.seq)
        .where(TraceEventRow.created_us < cutoff_us)
        .order_by(TraceEventRow.created_us)
        .limit(limit)
    ).subquery()
    result = await session.execute(
        delete(TraceEventRow).where(
            tuple_(TraceEventRow.run_id, TraceEventRow.seq).in_(
                select(victims.c.run_id, victims.c.seq)
            )
        )
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]
