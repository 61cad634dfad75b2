"""Counting the statements a server sends its database, at the lowest layer.

SQLite: the trace callback of every sqlite3 connection the server opens (it
sees what store/sql.py runs on the raw connection as well as SQLAlchemy's).
PostgreSQL: a loopback proxy in front of the server that reads the wire
protocol from client to server and counts each simple Query and each Execute
(whatever driver path sent it: SQLAlchemy, asyncpg directly, prepared or not).
Transaction control (BEGIN, COMMIT, SAVEPOINT...) is left out of the counts,
and so is what SQLite runs inside a statement (triggers, the full-text index:
see once_per_execution).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import struct
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest

_CONTROL = ("BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE", "PRAGMA", "SHOW", "SET ")


def is_control(statement: str) -> bool:
    return statement.lstrip().upper().startswith(_CONTROL)


def once_per_execution(add: Callable[[str], None]) -> Callable[[str], None]:
    """A trace callback for one sqlite3 connection that passes on each
    statement once. SQLite traces a write again as it enters each of its
    triggers, and Python reports that trace as the statement itself, bound
    values and all: the same text right after it (what runs inside comes
    between, with a leading "-- "). A write executed anew differs (an
    executemany's rows hold their own values)."""
    last = ""

    def trace(statement: str) -> None:
        nonlocal last
        if is_nested(statement):
            return
        if statement == last and statement.lstrip().upper().startswith(_WRITES):
            return
        last = statement
        add(statement)

    return trace


_WRITES = ("INSERT", "UPDATE", "DELETE", "REPLACE")


def is_nested(statement: str) -> bool:
    """SQLite traces what runs inside the statement being run (a trigger's
    body, a virtual table's reads and writes of its own tables, such as the
    full-text index's) with a leading "-- ": work of the statement the server
    sent, not one more statement."""
    return statement.startswith("-- ")


class Statements:
    """Every statement seen, in order (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seen: list[str] = []

    def add(self, statement: str) -> None:
        if not is_control(statement) and not is_nested(statement):
            with self._lock:
                self.seen.append(" ".join(statement.split()))

    def mark(self) -> int:
        with self._lock:
            return len(self.seen)

    def since(self, mark: int) -> list[str]:
        with self._lock:
            return self.seen[mark:]


def kinds(statements: list[str]) -> Counter[str]:
    """Statements by their first words (for a readable failure message)."""
    return Counter(" ".join(s.split()[:4])[:60] for s in statements)


@contextlib.contextmanager
def traced_sqlite(monkeypatch: pytest.MonkeyPatch) -> Iterator[Statements]:
    """Trace every sqlite3 connection opened from now on."""
    seen = Statements()
    connect = sqlite3.connect

    def traced(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn = connect(*args, **kwargs)
        conn.set_trace_callback(once_per_execution(seen.add))
        return conn

    monkeypatch.setattr(sqlite3, "connect", traced)
    yield seen


_SSL_REQUEST = 80877103
_GSSENC_REQUEST = 80877104


class CountingPgProxy:
    """A loopback proxy to PostgreSQL that records each statement executed."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.statements = Statements()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in self._writers:
            w.close()
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(BaseException):
                await t

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        up_writer: asyncio.StreamWriter | None = None
        try:
            # Startup: answer SSL/GSS requests with 'N' ourselves (the wire stays
            # readable), then pass the startup message on.
            while True:
                head = await reader.readexactly(8)
                length, code = struct.unpack("!ii", head)
                body = await reader.readexactly(length - 8)
                if code in (_SSL_REQUEST, _GSSENC_REQUEST):
                    writer.write(b"N")
                    await writer.drain()
                    continue
                break
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            self._writers |= {writer, up_writer}
            up_writer.write(head + body)
            back = asyncio.create_task(self._copy(up_reader, writer))
            self._tasks.add(back)
            try:
                await self._client_to_server(reader, up_writer)
            finally:
                back.cancel()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            for w in (writer, up_writer):
                if w is not None:
                    w.close()
                    self._writers.discard(w)
            self._tasks.discard(task)

    async def _copy(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
        finally:
            writer.close()  # the server hung up: so does the proxy, to its client

    async def _client_to_server(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        prepared: dict[bytes, str] = {}
        portals: dict[bytes, str] = {}
        while True:
            head = await reader.readexactly(5)
            kind = head[:1]
            (length,) = struct.unpack("!i", head[1:])
            body = await reader.readexactly(length - 4)
            if kind == b"Q":
                self.statements.add(body.split(b"\0", 1)[0].decode(errors="replace"))
            elif kind == b"P":
                name, query, _ = body.split(b"\0", 2)
                prepared[name] = query.decode(errors="replace")
            elif kind == b"B":
                portal, statement, _ = body.split(b"\0", 2)
                portals[portal] = prepared.get(statement, "?")
            elif kind == b"E":
                portal = body.split(b"\0", 1)[0]
                self.statements.add(portals.get(portal, "?"))
            writer.write(head + body)
            await writer.drain()
