"""Hot-path statements as literal SQL.

A job's life is some thirty statements (submit, claim, progress reports,
completion, their trace events and the completion attestation). Built as
SQLAlchemy expressions, each costs about a hundred times what SQLite needs to
run it: building the statement, its cache key, the compiled-cache lookup, the
execution context and a greenlet switch. The statements here are written once
as SQL that both backends accept. On SQLite they run on the session's own
sqlite3 connection (in its transaction and savepoints: the session has begun
it). On PostgreSQL they run on the session's own asyncpg connection, inside the
transaction SQLAlchemy's adapter holds on it (begun first if the session has
not sent anything yet), as statements asyncpg prepares once per connection:
no SQLAlchemy compile, execution context or greenlet switch per call.

Rows come back as mappings (`row["column"]`). A driver error is raised as
SQLAlchemy's wrapper of it (IntegrityError, OperationalError...), as it would
be from `session.execute` (InlineSqlite and _Asyncpg wrap it).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import sqlite3
from collections.abc import Mapping, Sequence
from typing import Any, cast

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.elements import TextClause

from jobtrace.store.db import InlineSqlite
from jobtrace.store.errors import refusing_sqlstate

Params = dict[str, Any]
# sqlite3.Row or SQLAlchemy's RowMapping: both answer row["column"].
Row = Any

_CONNECTION = "jobtrace.sqlite3"
_ASYNCPG = "jobtrace.asyncpg"
# How long a failed statement waits for a dying connection to report its end.
_SETTLE_TRIES = 5
_SETTLE_STEP_S = 0.01
_NONE = object()
# A :named parameter (not a PostgreSQL ::cast, not inside a word).
_NAMED = re.compile(r"(?<![:\w]):([A-Za-z_][A-Za-z0-9_]*)")


class Query:
    """One statement with :named parameters; `postgresql` when that dialect
    needs other text (FOR UPDATE, say)."""

    __slots__ = ("_clauses", "pg_names", "pg_sql", "sqlite")

    def __init__(self, sql: str, postgresql: str | None = None) -> None:
        self.sqlite = sql
        pg = postgresql if postgresql is not None else sql
        self._clauses: dict[str, TextClause] = {"sqlite": text(sql), "postgresql": text(pg)}
        self.pg_sql, self.pg_names = positional(pg)

    def clause(self, dialect: str) -> TextClause:
        return self._clauses[dialect]

    def pg_args(self, params: Params | list[Any]) -> list[Any]:
        assert isinstance(params, dict)
        return [params[n] for n in self.pg_names]


def positional(sql: str) -> tuple[str, tuple[str, ...]]:
    """`sql` with :named parameters as PostgreSQL's $1, $2...; a name used
    twice is one parameter. Returns the text and the names in number order."""
    names: dict[str, int] = {}

    def number(m: re.Match[str]) -> str:
        return f"${names.setdefault(m.group(1), len(names) + 1)}"

    return _NAMED.sub(number, sql), tuple(names)


def columns(table: Any, *, without: tuple[str, ...] = ()) -> tuple[str, ...]:
    """A table's column names, in their declared order (the schema is the one list)."""
    return tuple(c.name for c in table.columns if c.name not in without)


def insert_query(table: Any, names: Sequence[str], suffix: str = "") -> Query:
    """INSERT of these columns, one :named parameter each; names are quoted
    for both dialects ("key", say, is a keyword)."""
    quoted = ", ".join(f'"{n}"' for n in names)
    params = ", ".join(f":{n}" for n in names)
    return Query(f"INSERT INTO {table.name} ({quoted}) VALUES ({params}){suffix}")


# Bound parameters in one multi-row statement: under both SQLite's limit
# (32,766) and PostgreSQL's wire protocol's (32,767).
MAX_PARAMS = 30_000


def rows_per_statement(names: Sequence[str]) -> int:
    """How many rows of these columns one multi-row statement may hold."""
    return max(1, MAX_PARAMS // max(1, len(names)))


class Positional:
    """A statement with positional parameters (SQLite's ?, PostgreSQL's $n),
    its parameters a list: what a statement of thousands of parameters needs
    (SQLite looks each :name up among the names before it when it prepares a
    statement: quadratic in their number)."""

    __slots__ = ("pg_sql", "sqlite")

    def __init__(self, sqlite: str, pg: str) -> None:
        self.sqlite = sqlite
        self.pg_sql = pg

    def clause(self, dialect: str) -> TextClause:
        raise NotImplementedError("positional statements run on the driver's connection")

    def pg_args(self, params: Any) -> list[Any]:
        return list(params)


@functools.lru_cache(maxsize=64)
def _multi_row(table_name: str, names: tuple[str, ...], count: int, suffix: str) -> Positional:
    quoted = ", ".join(f'"{n}"' for n in names)
    width = len(names)
    head = f"INSERT INTO {table_name} ({quoted}) VALUES "
    row = "(" + ", ".join("?" for _ in names) + ")"
    sqlite = head + ", ".join(row for _ in range(count)) + suffix
    pg = (
        head
        + ", ".join(
            "(" + ", ".join(f"${i * width + k + 1}" for k in range(width)) + ")"
            for i in range(count)
        )
        + suffix
    )
    return Positional(sqlite, pg)


def multi_row(
    table: Any, names: tuple[str, ...], rows: Sequence[Params], suffix: str = ""
) -> list[tuple[Any, list[Any]]]:
    """INSERTs of many rows, each statement with as many rows as its
    parameters allow (see MAX_PARAMS): one statement per such chunk, not one
    per row. Each returns its statement and its parameters (run them with
    fetch or execute)."""
    step = rows_per_statement(names)
    out: list[tuple[Any, list[Any]]] = []
    for start in range(0, len(rows), step):
        chunk = rows[start : start + step]
        params = [row[n] for row in chunk for n in names]
        out.append((_multi_row(table.name, names, len(chunk), suffix), params))
    return out


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


class _Asyncpg:
    """The asyncpg connection under a session, used inside the transaction
    SQLAlchemy's adapter keeps on it; errors come out as SQLAlchemy's, and a
    connection found dead is invalidated as SQLAlchemy would (the pool then
    hands it out no more)."""

    __slots__ = ("_adapter", "_connection_sa", "_dbapi_error", "_dialect")

    def __init__(self, adapter: Any, dialect: Any, connection: Any) -> None:
        self._adapter = adapter
        self._dialect = dialect
        self._connection_sa = connection
        self._dbapi_error = dialect.loaded_dbapi.Error

    async def _connection(self) -> Any:
        adapter = self._adapter
        if adapter._transaction is None:  # nothing sent yet: BEGIN as the adapter would
            async with adapter._execute_mutex:
                if adapter._transaction is None:
                    try:
                        await adapter._start_transaction()
                    except Exception as exc:
                        exc._jobtrace_begin = True  # type: ignore[attr-defined]
                        raise
        return adapter._connection

    async def _wrapped(self, q: Query | Positional, args: Any, error: Exception) -> Exception:
        """asyncpg's error (or the adapter's translation of it, as BEGIN raises)
        as SQLAlchemy raises it from session.execute."""
        translated: Exception = error
        if not isinstance(error, self._dbapi_error):
            try:
                self._adapter._handle_exception(error)  # raises the DBAPI-level error
            except Exception as exc:
                translated = exc
        if not isinstance(translated, self._dbapi_error):
            return translated  # not a database error: as it is
        invalidated = bool(self._dialect.is_disconnect(translated, None, None)) or any(
            refusing_sqlstate(getattr(e, "sqlstate", None)) for e in (error, translated)
        )  # the server ended the session (a restart, an administrator)
        if not invalidated and _client_side(error):
            # Not the server refusing a statement (that has a SQLSTATE) but the
            # driver: at BEGIN, with no statement of ours in progress, "another
            # operation is in progress" means the connection is stuck on what
            # the server sent as it ended the session; else it may be closing.
            invalidated = getattr(error, "_jobtrace_begin", False) or await self._lost()
        if invalidated:
            with contextlib.suppress(Exception):
                await self._connection_sa.invalidate(translated)
        return cast(
            DBAPIError,
            DBAPIError.instance(
                q.pg_sql,
                args,
                translated,
                self._dbapi_error,
                connection_invalidated=invalidated,
                dialect=self._dialect,
            ),
        )

    async def _lost(self) -> bool:
        """Whether the connection is gone. A server that ends a session (a
        restart, pg_terminate_backend) says so in a message asyncpg may still
        be reading when the next statement starts; that statement then fails
        as "another operation is in progress" rather than as a lost connection:
        give the protocol a moment to take the message in and close."""
        connection = self._adapter._connection
        for _ in range(_SETTLE_TRIES):
            if connection.is_closed():
                return True
            await asyncio.sleep(_SETTLE_STEP_S)
        return bool(connection.is_closed())

    async def fetch(self, q: Query | Positional, params: Params | list[Any]) -> list[Row]:
        args = q.pg_args(params)
        try:
            conn = await self._connection()
            return cast(list[Row], await conn.fetch(q.pg_sql, *args))
        except Exception as exc:
            wrapped = await self._wrapped(q, args, exc)
            if wrapped is exc:
                raise
            raise wrapped from exc

    async def change(self, q: Query | Positional, params: Params | list[Any]) -> int:
        args = q.pg_args(params)
        try:
            conn = await self._connection()
            status: str = await conn.execute(q.pg_sql, *args)
        except Exception as exc:
            wrapped = await self._wrapped(q, args, exc)
            if wrapped is exc:
                raise
            raise wrapped from exc
        # "UPDATE 3", "DELETE 0", "INSERT 0 1": the last number is the row count.
        count = status.rpartition(" ")[2]
        return int(count) if count.isdigit() else -1

    async def change_many(self, q: Query, rows: Sequence[Params]) -> None:
        args = [q.pg_args(r) for r in rows]
        try:
            conn = await self._connection()
            await conn.executemany(q.pg_sql, args)
        except Exception as exc:
            wrapped = await self._wrapped(q, args, exc)
            if wrapped is exc:
                raise
            raise wrapped from exc


def _client_side(error: BaseException) -> bool:
    """An error of the driver itself, not a statement the server refused."""
    import asyncpg

    seen = 0
    cause: BaseException | None = error
    while cause is not None and seen < 8:
        if isinstance(cause, asyncpg.PostgresError):
            return False
        cause, seen = cause.__cause__ or getattr(cause, "orig", None), seen + 1
    return True


async def _asyncpg(session: AsyncSession) -> _Asyncpg | None:
    """The session's asyncpg connection on PostgreSQL, else None. Looked up
    once per session (each lives one transaction, on one connection)."""
    info = session.sync_session.info
    found = info.get(_ASYNCPG, _NONE)
    if found is _NONE:
        found = None
        bind = session.get_bind()
        if bind.dialect.name == "postgresql" and bind.dialect.driver == "asyncpg":
            connection = await session.connection()
            raw = await connection.get_raw_connection()
            found = _Asyncpg(raw.dbapi_connection, bind.dialect, connection)
        info[_ASYNCPG] = found
    return cast(_Asyncpg | None, found)


async def fetch(
    session: AsyncSession, q: Query | Positional, params: Params | list[Any]
) -> list[Row]:
    """Every row the statement returns."""
    conn = await _inline(session)
    if conn is None:
        pg = await _asyncpg(session)
        if pg is not None:
            return await pg.fetch(q, params)
        return list((await session.execute(q.clause(dialect(session)), params)).mappings())
    return conn.fetch(q.sqlite, params)


def by_name(row: Row) -> Mapping[str, Any]:
    """A row to read many columns of by name: SQLite's as a dict (a
    sqlite3.Row finds a name by scanning its columns, and `in` tests its
    values, not its names), any other backend's as it is."""
    if type(row) is sqlite3.Row:
        return dict(zip(row.keys(), row, strict=True))
    return cast(Mapping[str, Any], row)


async def fetch_one(session: AsyncSession, q: Query, params: Params) -> Row | None:
    """The first row the statement returns, or None."""
    rows = await fetch(session, q, params)
    return rows[0] if rows else None


async def scalar(session: AsyncSession, q: Query, params: Params) -> Any:
    """The first column of the first row, or None."""
    conn = await _inline(session)
    if conn is None:
        pg = await _asyncpg(session)
        if pg is not None:
            found = await pg.fetch(q, params)
            return found[0][0] if found else None
        return (await session.execute(q.clause(dialect(session)), params)).scalar()
    rows = conn.fetch(q.sqlite, params)
    return rows[0][0] if rows else None


async def execute(session: AsyncSession, q: Query | Positional, params: Params | list[Any]) -> int:
    """Run a statement that returns no rows; the number of rows it changed."""
    conn = await _inline(session)
    if conn is None:
        pg = await _asyncpg(session)
        if pg is not None:
            return await pg.change(q, params)
        result = await session.execute(q.clause(dialect(session)), params)
        return int(result.rowcount)  # type: ignore[attr-defined]
    return conn.change(q.sqlite, params)


async def execute_many(session: AsyncSession, q: Query, rows: Sequence[Params]) -> None:
    """Run a statement once per parameter set (one executemany)."""
    if not rows:
        return
    conn = await _inline(session)
    if conn is None:
        pg = await _asyncpg(session)
        if pg is not None:
            await pg.change_many(q, rows)
            return
        await session.execute(q.clause(dialect(session)), list(rows))
        return
    conn.change_many(q.sqlite, rows)
