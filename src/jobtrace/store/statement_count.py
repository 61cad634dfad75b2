"""Counts every statement and transaction the server sends its database, at the
lowest layer each driver offers (for `jobtrace bench`; off unless asked for).

SQLite: the sqlite3 connection's trace callback, which sees every statement
SQLite runs on it, including those `store/sql.py` runs on the connection
directly and each row of an executemany; what runs inside a statement (a
trigger's body, the full-text index's writes of its own tables) is that
statement's work and is not counted (see _sqlite_trace). PostgreSQL: SQLAlchemy's cursor events
for the statements it prepares and runs, plus asyncpg's query logger for what
is sent on the asyncpg connection otherwise: BEGIN, COMMIT, ROLLBACK and
savepoints (SQLAlchemy sends them through asyncpg's transaction object),
executemany (one statement each) and the hot-path statements store/sql.py
runs on the asyncpg connection directly.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

_WRITES = frozenset({"INSERT", "UPDATE", "DELETE", "REPLACE"})


def kind_of(sql: str) -> str:
    """The statement's first keyword, upper case ("INSERT", "COMMIT", ...)."""
    words = sql.lstrip(" \t\r\n(").split(None, 1)
    return words[0].rstrip(";").upper() if words else ""


class StatementCounter:
    """Statements by kind; safe to call from the driver's threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kinds: Counter[str] = Counter()

    def add(self, sql: str, n: int = 1) -> None:
        kind = kind_of(sql)
        with self._lock:
            self._kinds[kind] += n

    def snapshot(self) -> dict[str, Any]:
        """{"statements", "transactions", "kinds"}: totals since the start."""
        with self._lock:
            kinds = dict(self._kinds)
        return {
            "statements": sum(kinds.values()),
            "transactions": kinds.get("COMMIT", 0) + kinds.get("END", 0),
            "kinds": kinds,
        }

    def install(self, engine: AsyncEngine) -> None:
        """Count on every connection `engine` opens from now on."""
        sync = engine.sync_engine
        if sync.dialect.name == "sqlite":

            @event.listens_for(sync, "connect")
            def _trace(dbapi_connection: Any, _record: Any) -> None:
                raw = dbapi_connection.driver_connection._connection  # the sqlite3 connection
                raw.set_trace_callback(self._sqlite_trace())

            return

        @event.listens_for(sync, "before_cursor_execute")
        def _statement(
            _conn: Any, _cursor: Any, sql: str, _params: Any, _ctx: Any, many: bool
        ) -> None:
            if not many:  # asyncpg's query logger sees SQLAlchemy's executemany
                self.add(sql)

        @event.listens_for(sync, "connect")
        def _log_driver(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.driver_connection.add_query_logger(self._logged)

    def _sqlite_trace(self) -> Callable[[str], None]:
        """The trace callback of one sqlite3 connection: each statement once.
        What runs inside a statement (a trigger's body, the full-text index's
        writes of its own tables) comes with a leading "-- "; and SQLite
        traces a write again as it enters each of its triggers, which Python
        reports as the statement itself, bound values and all, right after it
        (a write executed anew, an executemany's next row, holds other values)."""
        last = ""

        def trace(sql: str) -> None:
            nonlocal last
            if sql.startswith("-- "):
                return
            if sql == last and kind_of(sql) in _WRITES:
                return
            last = sql
            self.add(sql)

        return trace

    def _logged(self, record: Any) -> None:
        """asyncpg's query logger: transaction control, SQLAlchemy's executemany
        and the statements store/sql.py sends on the asyncpg connection
        directly (prepared statements SQLAlchemy runs are not logged by asyncpg)."""
        self.add(record.query)
