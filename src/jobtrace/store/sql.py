"""Hot-path statements as literal SQL.

A job's life is some thirty statements (submit, claim, progress reports,
completion, their trace events and the completion attestation). Built as
SQLAlchemy expressions, each costs about a hundred times what SQLite needs to
run it: building the statement, its cache key, the compiled-cache lookup, the
execution context and a greenlet switch. The statements here are written once
as SQL that both backends accept. On SQLite they run on the session's own
sqlite3 connection (in its transaction and savepoints: the session has begun
it); on PostgreSQL they go through SQLAlchemy as `text()`, compiled once.

Rows come back as mappings (`row["column"]`). A driver error is raised as
SQLAlchemy's wrapper of it (IntegrityError, OperationalError...), as it would
be from `session.execute` (InlineSqlite wraps it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.elements import TextClause

from jobtrace.store.db import InlineSqlite

Params = dict[str, Any]
# sqlite3.Row or SQLAlchemy's RowMapping: both answer row["column"].
Row = Any

_CONNECTION = "jobtrace.sqlite3"
_NONE = object()


class Query:
    """One statement with :named parameters; `postgresql` when that dialect
    needs other text (FOR UPDATE, say)."""

    __slots__ = ("_clauses", "sqlite")

    def __init__(self, sql: str, postgresql: str | None = None) -> None:
        self.sqlite = sql
        self._clauses: dict[str, TextClause] = {
            "sqlite": text(sql),
            "postgresql": text(postgresql if postgresql is not None else sql),
        }

    def clause(self, dialect: str) -> TextClause:
        return self._clauses[dialect]


def columns(table: Any, *, without: tuple[str, ...] = ()) -> tuple[str, ...]:
    """A table's column names, in their declared order (the schema is the one list)."""
    return tuple(c.name for c in table.columns if c.name not in without)


def insert_query(table: Any, names: Sequence[str], suffix: str = "") -> Query:
    """INSERT of these columns, one :named parameter each; names are quoted
    for both dialects ("key", say, is a keyword)."""
    quoted = ", ".join(f'"{n}"' for n in names)
    params = ", ".join(f":{n}" for n in names)
    return Query(f"INSERT INTO {table.name} ({quoted}) VALUES ({params}){suffix}")


def dialect(session: AsyncSession) -> str:
    return session.get_bind().dialect.name


async def _inline(session: AsyncSession) -> InlineSqlite | None:
    """The session's SQLite connection (its transaction begun), or None on
    another backend. Looked up once per session: each lives one transaction."""
    info = session.sync_session.info
    found = info.get(_CONNECTION, _NONE)
    if found is _NONE:
        found = None
        if dialect(session) == "sqlite":
            connection = await session.connection()  # begins the transaction
            raw = await connection.get_raw_connection()
            if isinstance(raw.driver_connection, InlineSqlite):
                found = raw.driver_connection
        info[_CONNECTION] = found
    return cast(InlineSqlite | None, found)


async def fetch(session: AsyncSession, q: Query, params: Params) -> list[Row]:
    """Every row the statement returns."""
    conn = await _inline(session)
    if conn is None:
        return list((await session.execute(q.clause(dialect(session)), params)).mappings())
    return conn.fetch(q.sqlite, params)


async def fetch_one(session: AsyncSession, q: Query, params: Params) -> Row | None:
    """The first row the statement returns, or None."""
    rows = await fetch(session, q, params)
    return rows[0] if rows else None


async def scalar(session: AsyncSession, q: Query, params: Params) -> Any:
    """The first column of the first row, or None."""
    conn = await _inline(session)
    if conn is None:
        return (await session.execute(q.clause(dialect(session)), params)).scalar()
    rows = conn.fetch(q.sqlite, params)
    return rows[0][0] if rows else None


async def execute(session: AsyncSession, q: Query, params: Params) -> int:
    """Run a statement that returns no rows; the number of rows it changed."""
    conn = await _inline(session)
    if conn is None:
        result = await session.execute(q.clause(dialect(session)), params)
        return int(result.rowcount)  # type: ignore[attr-defined]
    return conn.change(q.sqlite, params)


async def execute_many(session: AsyncSession, q: Query, rows: Sequence[Params]) -> None:
    """Run a statement once per parameter set (one executemany)."""
    if not rows:
        return
    conn = await _inline(session)
    if conn is None:
        await session.execute(q.clause(dialect(session)), list(rows))
        return
    conn.change_many(q.sqlite, rows)
