"""Engines, migrations and the group-commit writer; SQLite/PostgreSQL differences live here."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from alembic import command
from alembic.config import Config
from sqlalchemy import event
from sqlalchemy import text as sql_text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
MIGRATIONS = Path(__file__).parent / "migrations"


class Tx:
    """What a write operation sees besides its session: hooks that run after
    commit, and notices for the other replicas (sent with the commit)."""

    def __init__(self) -> None:
        self._after: list[Callable[[], None]] = []
        self._notices: list[dict[str, Any]] = []

    def on_commit(self, callback: Callable[[], None]) -> None:
        self._after.append(callback)

    def notify(self, notice: dict[str, Any]) -> None:
        """Tell other replicas (PostgreSQL NOTIFY, delivered only if this commits)."""
        self._notices.append(notice)


WriteOp = Callable[[AsyncSession, Tx], Awaitable[T]]


@dataclass
class _Pending(Generic[T]):
    op: WriteOp[T]
    future: asyncio.Future[T]
    tx: Tx = field(default_factory=Tx)
    # The caller's context (e.g. its request id for logs): after-commit hooks
    # run in it, not in the writer task's.
    context: contextvars.Context = field(default_factory=contextvars.copy_context)


class Database:
    """One database: a read engine, a write engine and a group-commit writer.

    Writes are queued; one writer task takes whatever is waiting, runs each
    operation in its own savepoint inside one transaction and commits once, so
    throughput is bound by the CPU rather than by one fsync per request. A
    caller's future resolves only after the commit: acknowledged means durable.
    """

    def __init__(self, url: str, *, max_batch: int = 256) -> None:
        self.url = url
        self.dialect = make_url(url).get_backend_name()
        self.max_batch = max_batch
        self._read_engine: AsyncEngine | None = None
        self._write_engine: AsyncEngine | None = None
        self._reads: async_sessionmaker[AsyncSession] | None = None
        self._writes: async_sessionmaker[AsyncSession] | None = None
        self._queue: asyncio.Queue[_Pending[Any]] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self.batches_committed = 0
        self.ops_committed = 0
        # Called with the number of operations of each committed transaction
        # (metrics); runs on the event loop, must be cheap and must not raise.
        self.on_batch: Callable[[int], None] | None = None
        self.replica_id = os.urandom(6).hex()
        self._listener: Any = None

    @property
    def is_sqlite(self) -> bool:
        return self.dialect == "sqlite"

    async def start(self) -> None:
        if self.is_sqlite:
            self._write_engine = _sqlite_engine(self.url, write=True)
            self._read_engine = _sqlite_engine(self.url, write=False)
        else:
            self._write_engine = create_async_engine(self.url, pool_size=4, max_overflow=4)
            self._read_engine = create_async_engine(self.url, pool_size=8, max_overflow=8)
        self._writes = async_sessionmaker(self._write_engine, expire_on_commit=False)
        self._reads = async_sessionmaker(self._read_engine, expire_on_commit=False)
        async with self._write_engine.begin() as conn:
            await conn.run_sync(_upgrade)
        self._writer = asyncio.create_task(self._write_loop(), name="jobtrace-writer")

    async def close(self) -> None:
        await self._close_listener()
        if self._writer is not None:
            # Let queued writes finish: their callers are waiting for an answer.
            await self._queue.join()
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
            self._writer = None
        for engine in (self._read_engine, self._write_engine):
            if engine is not None:
                await engine.dispose()

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncSession]:
        """A read-only session in one transaction (a consistent snapshot)."""
        assert self._reads is not None, "database not started"
        async with self._reads() as session, session.begin():
            yield session

    async def write(self, op: WriteOp[T]) -> T:
        """Run `op` in the next group commit; return its result once committed."""
        if self._writer is None or self._writer.done():
            raise RuntimeError("database writer is not running")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(op, future))
        return await future

    async def _write_loop(self) -> None:
        assert self._writes is not None
        while True:
            batch: list[_Pending[Any]] = [await self._queue.get()]
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._commit_batch(batch)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _commit_batch(self, batch: list[_Pending[Any]]) -> None:
        """Fast path: every operation of the batch in one transaction, no
        savepoints. If one raises, nothing of the batch is kept: each operation
        is then run again in a transaction of its own, so one caller's error
        never costs another caller its write."""
        try:
            outcomes = await self._run_batch(batch)
        except _BatchFailed:
            for item in batch:
                item.tx = Tx()
                try:
                    outcomes = await self._run_batch([item])
                except _BatchFailed as failed:
                    outcomes = [(False, failed.error)]
                except Exception as exc:  # the commit itself failed: nothing stored
                    outcomes = [(False, exc)]
                self._settle([item], outcomes)
            return
        except Exception as exc:  # the commit itself failed: nothing was stored
            self._settle(batch, [(False, exc)] * len(batch))
            return
        self._settle(batch, outcomes)

    async def _run_batch(self, batch: list[_Pending[Any]]) -> list[tuple[bool, Any]]:
        assert self._writes is not None
        outcomes: list[tuple[bool, Any]] = []
        async with self._writes() as session, session.begin():
            for item in batch:
                try:
                    outcomes.append((True, await item.op(session, item.tx)))
                except Exception as exc:
                    raise _BatchFailed(exc) from exc
            if not self.is_sqlite:
                await self._send_notices(session, [n for i in batch for n in i.tx._notices])
        self.batches_committed += 1
        self.ops_committed += len(batch)
        if self.on_batch is not None:
            self.on_batch(len(batch))
        return outcomes

    def _settle(self, batch: list[_Pending[Any]], outcomes: list[tuple[bool, Any]]) -> None:
        for item, (ok, value) in zip(batch, outcomes, strict=True):
            if ok:
                for callback in item.tx._after:
                    try:
                        item.context.run(callback)
                    except Exception:
                        log.exception("after-commit hook failed")
            if item.future.done():  # the caller went away
                continue
            if ok:
                item.future.set_result(value)
            else:
                item.future.set_exception(value)

    async def _send_notices(self, session: AsyncSession, notices: list[dict[str, Any]]) -> None:
        """One NOTIFY per ~7 KB of notices; PostgreSQL delivers them at commit."""
        chunk: list[dict[str, Any]] = []
        size = 0
        for notice in [*notices, None]:
            text = json.dumps(notice, separators=(",", ":")) if notice is not None else ""
            if chunk and (notice is None or size + len(text) > 7000):
                payload = json.dumps({"r": self.replica_id, "n": chunk}, separators=(",", ":"))
                await session.execute(
                    sql_text("SELECT pg_notify(:channel, :payload)"),
                    {"channel": NOTIFY_CHANNEL, "payload": payload},
                )
                chunk, size = [], 0
            if notice is not None:
                chunk.append(notice)
                size += len(text)

    async def listen(self, on_notices: Callable[[list[dict[str, Any]]], None]) -> None:
        """Receive the other replicas' notices (PostgreSQL LISTEN); a no-op on SQLite."""
        if self.is_sqlite:
            return
        import asyncpg

        dsn = make_url(self.url).set(drivername="postgresql").render_as_string(hide_password=False)

        def received(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
            try:
                doc = json.loads(payload)
            except ValueError:
                log.warning("ignoring a malformed notice")
                return
            if doc.get("r") != self.replica_id:
                on_notices(doc.get("n", []))

        self._listener = await asyncpg.connect(dsn)
        await self._listener.add_listener(NOTIFY_CHANNEL, received)

    async def _close_listener(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.close()
            self._listener = None


class _BatchFailed(Exception):
    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


NOTIFY_CHANNEL = "jobtrace"
MIGRATION_LOCK = 0x6A6F6274  # "jobt"


def _upgrade(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":
        # Replicas starting together migrate one at a time.
        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


def _sqlite_engine(url: str, *, write: bool) -> AsyncEngine:
    """SQLite in WAL mode: one writer connection with BEGIN IMMEDIATE, pooled readers."""
    path = make_url(url).database
    if not path or path == ":memory:":
        raise ValueError("SQLite needs a database file (sqlite+aiosqlite:///path/to.db)")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if write:
        engine = create_async_engine(url, pool_size=1, max_overflow=0)
    else:
        engine = create_async_engine(url, pool_size=8, max_overflow=8)

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the sqlite3 module, emit BEGIN/SAVEPOINT.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk before the caller is told it is stored.
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA busy_timeout=10000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    begin = "BEGIN IMMEDIATE" if write else "BEGIN"

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql(begin)

    return engine


def sqlite_url(path: str | Path) -> str:
    return f"sqlite+aiosqlite:///{Path(path)}"
