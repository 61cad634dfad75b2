"""Counts every statement and transaction the server sends its database, at the
lowest layer each driver offers (for `jobtrace bench`; off unless asked for).

SQLite: the sqlite3 connection's trace callback, which sees every statement
SQLite runs on it, including those `store/sql.py` runs on the connection
directly and each row of an executemany. PostgreSQL: SQLAlchemy's cursor events
for every statement sent through an engine (an executemany is one statement),
plus asyncpg's query logger for statements sent on the asyncpg connection
directly (BEGIN, COMMIT, ROLLBACK and savepoints among them, which SQLAlchemy
sends through asyncpg's transaction object).
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

# Statements that open, end or nest a transaction, by their first word.
CONTROL = frozenset({"BEGIN", "COMMIT", "END", "ROLLBACK", "SAVEPOINT", "RELEASE", "START"})


def kind_of(sql: str) -> str:
    """The statement's first keyword, upper case ("INSERT", "COMMIT", ...)."""
    words = sql.lstrip(" \t\r\n(").split(None, 1)
    return words[0].rstrip(";").upper() if words else ""


class StatementCounter:
    """Statements by kind; safe to call from the driver's threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kinds: Counter[str] = Counter()
        # PostgreSQL: executemany calls SQLAlchemy saw, which asyncpg's query
        # logger also sees; they are subtracted from the logger's count.
        self._engine_many = 0
        self._driver_other = 0

    def add(self, sql: str, n: int = 1) -> None:
        kind = kind_of(sql)
        with self._lock:
            self._kinds[kind] += n

    def snapshot(self) -> dict[str, Any]:
        """{"statements", "transactions", "kinds"}: totals since the start."""
        with self._lock:
            kinds = dict(self._kinds)
            direct = max(0, self._driver_other - self._engine_many)
        if direct:
            kinds["(asyncpg direct)"] = direct
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
                raw.set_trace_callback(self.add)

            return

        @event.listens_for(sync, "before_cursor_execute")
        def _statement(
            _conn: Any, _cursor: Any, sql: str, _params: Any, _ctx: Any, many: bool
        ) -> None:
            self.add(sql)
            if many:
                with self._lock:
                    self._engine_many += 1

        @event.listens_for(sync, "connect")
        def _log_driver(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.driver_connection.add_query_logger(self._logged)

    def _logged(self, record: Any) -> None:
        """asyncpg's query logger: transaction control, SQLAlchemy's executemany
        and anything sent on the asyncpg connection directly (prepared
        statements SQLAlchemy runs are not logged by asyncpg)."""
        kind = kind_of(record.query)
        with self._lock:
            if kind in CONTROL:
                self._kinds[kind] += 1
            else:
                self._driver_other += 1
