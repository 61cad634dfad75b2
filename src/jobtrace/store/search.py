"""Full-text search of trace events: a parsed query in each backend's own
syntax (FTS5 MATCH, PostgreSQL tsquery) and the keyset reads of its hits,
newest stored first. The index itself is migration 0014's."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import case, column, exists, literal_column, select, table, text, tuple_
from sqlalchemy.ext.asyncio import AsyncSession

from jobtrace.model import TraceEvent
from jobtrace.store import sql
from jobtrace.store.listing import SIZE_SCAN, stored_size
from jobtrace.store.tables import JobRow, TraceEventRow
from jobtrace.store.trace import EVENTS, event_from_row


@dataclass(frozen=True, slots=True)
class Term:
    """Words next to each other, in order (one word: a phrase of one). Each is
    a lowercase run of letters and digits, so no engine reads syntax in it;
    with `prefix` the last one matches any word it starts."""

    words: tuple[str, ...]
    prefix: bool = False


@dataclass(frozen=True, slots=True)
class Clause:
    """Any of its terms (OR); with `negated`, none of them."""

    terms: tuple[Term, ...]
    negated: bool = False


@dataclass(frozen=True, slots=True)
class TextQuery:
    """Every clause holds (AND); at least one is not negated."""

    clauses: tuple[Clause, ...]


@dataclass(frozen=True, slots=True)
class SearchFilter:
    tenant: str | None = None
    run_id: str = ""
    min_level: int = 0
    category: int = 0
    type: int = 0
    service: str = ""
    since_us: int = 0
    until_us: int = 0


# Where the last hit of a page is, to read on from: SQLite's rowid (the order
# events were stored in); PostgreSQL's (created_us, run_id, seq).
SearchKey = tuple[int] | tuple[int, str, int]


@dataclass(frozen=True, slots=True)
class Hit:
    event: TraceEvent
    key: SearchKey


@dataclass(frozen=True, slots=True)
class HitChunk:
    """Hits read in one step; `after` is the key to read on from, `exhausted`
    True when no hit follows it."""

    items: list[Hit]
    after: SearchKey | None
    exhausted: bool


def fts5_match(q: TextQuery) -> str:
    """The query as an FTS5 MATCH expression: each term a quoted string (a
    phrase; its words hold no quote), a prefix term's followed by *."""

    def term(t: Term) -> str:
        return '"' + " ".join(t.words) + '"' + ("*" if t.prefix else "")

    def clause(c: Clause) -> str:
        return "(" + " OR ".join(term(t) for t in c.terms) + ")"

    expr = "(" + " AND ".join(clause(c) for c in q.clauses if not c.negated) + ")"
    for c in q.clauses:
        if c.negated:
            expr = f"({expr} NOT {clause(c)})"
    return expr


def pg_tsquery(q: TextQuery) -> str:
    """The query as to_tsquery text: each word a quoted lexeme (it holds no
    quote or backslash), phrases joined by <->, a prefix marked :*."""

    def term(t: Term) -> str:
        return " <-> ".join(f"'{w}'" for w in t.words) + (":*" if t.prefix else "")

    def clause(c: Clause) -> str:
        return "(" + " | ".join(term(t) for t in c.terms) + ")"

    return " & ".join(("!" if c.negated else "") + clause(c) for c in q.clauses)


_FTS = table("trace_events_search", column("rowid"))
_ROWID: Any = literal_column("trace_events.rowid")


def _where(session: AsyncSession, q: TextQuery, f: SearchFilter) -> list[Any]:
    where: list[Any] = []
    if sql.dialect(session) == "postgresql":
        where.append(
            text("trace_events.search_vector @@ to_tsquery('simple', :tsquery)").bindparams(
                tsquery=pg_tsquery(q)
            )
        )
    else:
        where.append(text("trace_events_search MATCH :match").bindparams(match=fts5_match(q)))
    if f.tenant is not None:
        where.append(TraceEventRow.tenant == f.tenant)
    if f.run_id:
        where.append(TraceEventRow.run_id == f.run_id)
    if f.min_level:
        where.append(TraceEventRow.level >= f.min_level)
    if f.category:
        where.append(TraceEventRow.category == f.category)
    if f.type:
        where.append(TraceEventRow.type == f.type)
    if f.since_us:
        where.append(TraceEventRow.ts_us >= f.since_us)
    if f.until_us:
        where.append(TraceEventRow.ts_us < f.until_us)
    if f.service:
        # A step's events name its job; a standalone job's run is the job.
        job = case((TraceEventRow.job_id != "", TraceEventRow.job_id), else_=TraceEventRow.run_id)
        where.append(exists().where(JobRow.id == job, JobRow.service == f.service))
    return where


def _key_columns(session: AsyncSession) -> Sequence[Any]:
    if sql.dialect(session) == "postgresql":
        return (TraceEventRow.created_us, TraceEventRow.run_id, TraceEventRow.seq)
    return (_FTS.c.rowid,)


def check_key(session: AsyncSession, key: Sequence[Any]) -> SearchKey | None:
    """A key read back from a page token, if it has this backend's shape."""
    if sql.dialect(session) == "postgresql":
        if len(key) == 3 and isinstance(key[1], str):
            c, s = key[0], key[2]
            if isinstance(c, int) and isinstance(s, int):
                return (c, key[1], s)
        return None
    if len(key) == 1 and isinstance(key[0], int):
        return (key[0],)
    return None


_HEAVY = ("output_summary", "data")


def match_statement(
    session: AsyncSession,
    q: TextQuery,
    f: SearchFilter,
    after: SearchKey | None,
    limit: int,
    full: bool = False,
) -> Any:
    """The read of the index: the key and stored size of each of the next
    `limit` matching events after `after`, newest stored first."""
    pg = sql.dialect(session) == "postgresql"
    keys = _key_columns(session)
    where = _where(session, q, f)
    if after is not None:
        where.append(tuple_(*keys) < tuple_(*after) if pg else _FTS.c.rowid < after[0])
    heavy = _HEAVY if full else ()
    size = stored_size(session, [EVENTS.c[n] for n in ("message", "user_message", "error", *heavy)])
    source: Any = EVENTS if pg else _FTS.join(EVENTS, _ROWID == _FTS.c.rowid)
    return (
        select(*keys, size)
        .select_from(source)
        .where(*where)
        .order_by(*(k.desc() for k in keys))
        .limit(limit)
    )


async def search_events(
    session: AsyncSession,
    q: TextQuery,
    f: SearchFilter,
    *,
    after: SearchKey | None,
    limit: int,
    max_bytes: int,
    full: bool,
) -> HitChunk:
    """The next matching events after `after`, newest stored first: at most
    `limit`, and no more than `max_bytes` of stored size (the first whatever
    its size); data and output_summary only when `full`. Sizes and keys are
    read first (one match of the index), the events' columns then."""
    pg = sql.dialect(session) == "postgresql"
    keys = _key_columns(session)
    scan = min(limit, SIZE_SCAN)
    found = (await session.execute(match_statement(session, q, f, after, scan, full))).all()
    picked: list[SearchKey] = []
    total = 0
    for row in found:
        key: SearchKey = (row[0], row[1], row[2]) if pg else (row[0],)
        if picked and total + int(row[-1]) > max_bytes:
            break
        picked.append(key)
        total += int(row[-1])
    if not picked:
        return HitChunk([], after, True)
    columns = [c for c in EVENTS.c if full or c.name not in _HEAVY]
    if pg:
        stmt = select(*columns).where(tuple_(*keys).in_(picked))
    else:
        rowid = _ROWID.label("search_rowid_")
        stmt = select(*columns, rowid).where(_ROWID.in_([k[0] for k in picked]))
    rows = (await session.execute(stmt)).mappings().all()
    by_key = {
        ((r["created_us"], r["run_id"], r["seq"]) if pg else (r["search_rowid_"],)): r for r in rows
    }
    # Deleted since its key was read (the retention sweep): left out.
    hits = [Hit(event_from_row(by_key[k], full=full), k) for k in picked if k in by_key]
    exhausted = len(picked) == len(found) < scan
    return HitChunk(hits, picked[-1], exhausted)
