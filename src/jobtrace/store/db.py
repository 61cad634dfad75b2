"""Engines, migrations and the group-commit writer; SQLite/PostgreSQL differences live here."""

from __future__ import annotations

import abc
import asyncio
import contextlib
import contextvars
import json
import logging
import os
import sqlite3
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Generic, TypeVar

import aiosqlite
from alembic import command
from alembic.config import Config
from sqlalchemy import event
from sqlalchemy import text as sql_text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import DBAPIError, StatementError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from jobtrace.store.availability import Availability
from jobtrace.store.errors import is_transient
from jobtrace.store.statement_count import StatementCounter

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

# The most operations one run_merged call takes.
MAX_MERGED = 256


class MergeableOp(abc.ABC, Generic[T]):
    """A write operation that the group commit may run together with the
    operations of the same class queued right behind it, in one run_merged
    call in the same transaction (one statement for all of them, say).
    Alone (a batch of one, another operation queued in between, or the
    retry with a savepoint per operation) it is called as any operation."""

    @abc.abstractmethod
    async def __call__(self, db: AsyncSession, tx: Tx) -> T: ...

    @classmethod
    @abc.abstractmethod
    async def run_merged(cls, db: AsyncSession, ops: list[tuple[Any, Tx]]) -> list[T]:
        """Run these operations (of this class, queued one after the other,
        each with its Tx) with the effects of calling each in turn: their
        results in the same order. Raising fails them all, as an operation
        that raises fails its group commit (which then runs each alone). As
        they commit or fail together, their after-commit hooks and notices may
        all go on the last one's Tx (the one the run spans are recorded on)."""


# session.info key of (Database.spans, the running operation's Tx) when OTLP is on.
SPANS_KEY = "jobtrace_spans"


def spans_of(session: AsyncSession) -> tuple[Any, Tx] | None:
    """The run spans recorder and the Tx of the write running in `session`,
    when OTLP is on (None otherwise: nothing to record)."""
    return session.sync_session.info.get(SPANS_KEY)


# Set by a caller that wants to know when its write is queued (not yet
# committed): Database.write resolves the future as it queues the operation.
# Operations run in queue order, so a caller may start its next, dependent
# write once this one is queued: both see their effects in order.
WRITE_QUEUED: contextvars.ContextVar[asyncio.Future[None] | None] = contextvars.ContextVar(
    "jobtrace_write_queued", default=None
)


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

    Writes are queued; one writer task takes whatever is waiting, runs every
    operation in one transaction and commits once, so throughput is bound by the
    CPU rather than by one fsync per request (an operation that raises is
    isolated by running the batch again with savepoints: `_commit_batch`). A
    caller's future resolves only after the commit: acknowledged means durable.
    """

    def __init__(
        self,
        url: str,
        *,
        max_batch: int = 256,
        probe_every_s: float = 1.0,
        allow_async_commit: bool = False,
        pipeline: bool = True,
    ) -> None:
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
        # OpenTelemetry's run and attempt spans (jobtrace.otel.RunSpans) when
        # OTLP is on: a write operation finds them, and its Tx, in its
        # session's info (spans_of), to record spans once it commits.
        self.spans: Any = None
        self.replica_id = os.urandom(6).hex()
        self._listener: Any = None
        self._listening: asyncio.Task[None] | None = None
        self._on_notices: Callable[[list[dict[str, Any]]], None] | None = None
        self._on_restored: Callable[[], None] | None = None
        # Whether storage answers (health follows it); probed in the background.
        self.availability = Availability(probe_every_s)
        self._probing: asyncio.Task[None] | None = None
        self.allow_async_commit = allow_async_commit
        # Set before start() to count every statement sent (`jobtrace bench`).
        self.statement_counter: StatementCounter | None = None
        # PostgreSQL: a batch runs its statements while the one before it
        # commits (see _pipelined); SQLite has one writer and commits in turn.
        self.pipeline = pipeline
        self._committing: asyncio.Task[None] | None = None

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
            _require_synchronous_commit(
                (self._write_engine, self._read_engine), allowed_off=self.allow_async_commit
            )
        if self.statement_counter is not None:
            for engine in (self._write_engine, self._read_engine):
                self.statement_counter.install(engine)
        self._writes = async_sessionmaker(self._write_engine, expire_on_commit=False)
        self._reads = async_sessionmaker(self._read_engine, expire_on_commit=False)
        try:
            async with self._write_engine.begin() as conn:
                await conn.run_sync(_upgrade)
        except BaseException:
            for engine in (self._read_engine, self._write_engine):
                await engine.dispose()
            raise
        self._writer = asyncio.create_task(self._write_loop(), name="jobtrace-writer")
        self._probing = asyncio.create_task(
            self.availability.watch(self._probe), name="jobtrace-storage-probe"
        )

    async def close(self) -> None:
        await self._close_listener()
        if self._probing is not None:
            self._probing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probing
            self._probing = None
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
        try:
            async with self._reads() as session, session.begin():
                yield session
        except Exception as exc:
            self._seen(exc)
            raise

    async def write(self, op: WriteOp[T]) -> T:
        """Run `op` in the next group commit; return its result once committed."""
        if self._writer is None or self._writer.done():
            raise RuntimeError("database writer is not running")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(op, future))  # unbounded: never waits
        queued = WRITE_QUEUED.get()
        if queued is not None and not queued.done():
            queued.set_result(None)
        try:
            return await future
        except Exception as exc:
            self._seen(exc)
            raise

    def _seen(self, exc: Exception) -> None:
        """An operation failed: if storage refused or lost it, storage is down."""
        if is_transient(exc):
            self.availability.failed(exc)

    async def _probe(self) -> None:
        """`SELECT 1` on a read connection; a second try on a fresh connection
        if the first met one that died with a database restart (the pool then
        drops every connection older than the failure)."""
        assert self._reads is not None
        for attempt in (1, 2):
            try:
                async with self._reads() as session:
                    await session.execute(sql_text("SELECT 1"))
                return
            except Exception as exc:
                if attempt == 2 or not is_transient(exc):
                    raise

    async def _write_loop(self) -> None:
        assert self._writes is not None
        while True:
            batch: list[_Pending[Any]] = [await self._queue.get()]
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            if not self.is_sqlite and self.pipeline:
                await self._pipelined(batch)  # marks the batch done once it is settled
                continue
            try:
                await self._commit_batch(batch)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _pipelined(self, batch: list[_Pending[Any]]) -> None:
        """PostgreSQL: run the batch's operations now, and leave its COMMIT (the
        WAL flush, most of a small batch's time) to a task, so the next batch
        runs its statements while this one is flushed.

        Only one batch runs statements at a time; the batches behind it only
        commit, in order, and take no lock while doing so. So a batch that
        waits for a row lock waits for a commit, never for a batch that waits
        for it: no deadlock between them, exactly as between two replicas,
        whose transactions already run side by side (every transition locks
        what it reads before it decides). Callers are answered, and after-commit
        hooks run, in commit order, each only once its COMMIT has returned.

        A batch whose operation raises is rolled back and, once the commits
        ahead of it are done, takes the same path as without pipelining."""
        assert self._writes is not None
        ahead = self._committing
        session = self._writes()
        try:
            outcomes: list[tuple[bool, Any]] = []
            try:
                await session.begin()
                outcomes = await self._run_ops(batch, session)
                await self._send_notices(session, [n for i in batch for n in i.tx._notices])
            except BaseException:
                await session.close()  # rolls back
                raise
        except _BatchFailed:
            await self._settled_ahead(ahead)
            for item in batch:
                item.tx = Tx()
            await self._after_fast_path_failed(batch)
            self._done(batch)
            return
        except Exception as exc:  # BEGIN, a statement outside any op, or NOTIFY failed
            await self._settled_ahead(ahead)
            self._settle(batch, [(False, exc)] * len(batch))
            self._done(batch)
            return
        self._committing = asyncio.create_task(
            self._commit_pipelined(batch, session, outcomes, ahead), name="jobtrace-commit"
        )
        # At most one batch waiting for its COMMIT while the next one runs.
        await self._settled_ahead(ahead)

    async def _commit_pipelined(
        self,
        batch: list[_Pending[Any]],
        session: AsyncSession,
        outcomes: list[tuple[bool, Any]],
        ahead: asyncio.Task[None] | None,
    ) -> None:
        try:
            await self._settled_ahead(ahead)  # commits, and answers, keep their order
            try:
                await self._commit_session(batch, session)
            except Exception as exc:  # nothing, or (connection lost) maybe all, stored
                self._settle(batch, [(False, exc)] * len(batch))
                return
            self._committed(len(batch))
            self._settle(batch, outcomes)
        finally:
            with contextlib.suppress(Exception):
                await session.close()
            self._done(batch)

    async def _commit_session(self, batch: list[_Pending[Any]], session: AsyncSession) -> None:
        """COMMIT of a pipelined batch (a seam the fault tests cut)."""
        await session.commit()

    @staticmethod
    async def _settled_ahead(ahead: asyncio.Task[None] | None) -> None:
        if ahead is not None and not ahead.done():
            # Its own errors are its callers' answers; it never raises.
            await asyncio.wait([ahead])

    def _done(self, batch: list[_Pending[Any]]) -> None:
        for _ in batch:
            self._queue.task_done()

    async def _commit_batch(self, batch: list[_Pending[Any]]) -> None:
        """Fast path: every operation of the batch in one transaction, no
        savepoints. If one raises, nothing of the batch is kept, and the batch
        runs once more in one transaction with each operation in a savepoint of
        its own: only the operations that raise are rolled back (their hooks and
        notices dropped), the others commit together. Only if that commit fails
        does each operation run in a transaction of its own. One caller's error
        never costs another caller its write, nor the batch one fsync per op."""
        try:
            outcomes = await self._run_batch(batch)
        except _BatchFailed:
            pass
        except Exception as exc:  # the commit itself failed: nothing was stored
            self._settle(batch, [(False, exc)] * len(batch))
            return
        else:
            self._settle(batch, outcomes)
            return
        for item in batch:
            item.tx = Tx()
        await self._after_fast_path_failed(batch)

    async def _after_fast_path_failed(self, batch: list[_Pending[Any]]) -> None:
        """An operation of the batch raised and the batch was rolled back: run
        it again with a savepoint per operation (see _commit_batch)."""
        try:
            outcomes = await self._run_isolated(batch)
        except _CommitFailed as failed:
            if _outcome_unknown(failed.error):
                # The connection went away during COMMIT: the batch may or may
                # not be stored, so running it again could apply it twice.
                self._settle(batch, [(False, failed.error)] * len(batch))
                return
            log.warning("group commit with savepoints failed; committing one by one")
            await self._one_by_one(batch)
            return
        except Exception as exc:  # rolled back before any commit: safe to run again
            if is_transient(exc):
                # The database is unreachable: one by one would only knock on
                # a closed door once per operation. Nothing was stored.
                self._settle(batch, [(False, exc)] * len(batch))
                return
            log.warning("group commit with savepoints failed; committing one by one", exc_info=True)
            await self._one_by_one(batch)
            return
        # A database error (a deadlock with another replica, say) is no answer
        # to give a caller: that operation gets one more try on its own.
        again = {
            i for i, (ok, error) in enumerate(outcomes) if not ok and isinstance(error, DBAPIError)
        }
        settled = [i for i in range(len(batch)) if i not in again]
        self._settle([batch[i] for i in settled], [outcomes[i] for i in settled])
        await self._one_by_one([batch[i] for i in sorted(again)])

    async def _one_by_one(self, items: list[_Pending[Any]]) -> None:
        for item in items:
            item.tx = Tx()
            try:
                outcomes = await self._run_batch([item])
            except _BatchFailed as op_failed:
                outcomes = [(False, op_failed.error)]
            except Exception as exc:  # the commit itself failed: nothing stored
                outcomes = [(False, exc)]
            self._settle([item], outcomes)

    async def _run_ops(
        self, batch: list[_Pending[Any]], session: AsyncSession
    ) -> list[tuple[bool, Any]]:
        """Every operation of the batch, in queue order, in `session`'s
        transaction; adjacent MergeableOps of one class in one run_merged call.
        _BatchFailed as soon as one raises."""
        outcomes: list[tuple[bool, Any]] = []
        i = 0
        while i < len(batch):
            item = batch[i]
            kind = type(item.op) if isinstance(item.op, MergeableOp) else None
            j = i + 1
            while (
                kind is not None
                and j < len(batch)
                and j - i < MAX_MERGED
                and type(batch[j].op) is kind
            ):
                j += 1
            try:
                if kind is None or j == i + 1:
                    outcomes.append((True, await self._op(item, session)))
                else:
                    group = batch[i:j]
                    if self.spans is not None:  # see MergeableOp.run_merged
                        session.info[SPANS_KEY] = (self.spans, group[-1].tx)
                    results = await kind.run_merged(session, [(g.op, g.tx) for g in group])
                    outcomes.extend((True, r) for r in results)
            except Exception as exc:
                raise _BatchFailed(exc) from exc
            i = j
        return outcomes

    async def _op(self, item: _Pending[T], session: AsyncSession) -> T:
        if self.spans is not None:
            session.info[SPANS_KEY] = (self.spans, item.tx)
        return await item.op(session, item.tx)

    async def _run_batch(self, batch: list[_Pending[Any]]) -> list[tuple[bool, Any]]:
        assert self._writes is not None
        async with self._writes() as session, session.begin():
            outcomes = await self._run_ops(batch, session)
            if not self.is_sqlite:
                await self._send_notices(session, [n for i in batch for n in i.tx._notices])
        self._committed(len(batch))
        return outcomes

    async def _run_isolated(self, batch: list[_Pending[Any]]) -> list[tuple[bool, Any]]:
        """The batch in one transaction, each operation in its own savepoint."""
        assert self._writes is not None
        outcomes: list[tuple[bool, Any]] = []
        committing = False
        async with self._writes() as session:
            try:
                async with session.begin():
                    for item in batch:
                        savepoint = await session.begin_nested()
                        # SAVEPOINT now, not at the session's next statement:
                        # literal SQL (store.sql) runs on the connection directly.
                        await session.connection()
                        try:
                            result = await self._op(item, session)
                        except Exception as exc:
                            # Its error is its caller's answer; a failure to roll
                            # back the savepoint is the batch's (and propagates).
                            await savepoint.rollback()
                            item.tx = Tx()
                            outcomes.append((False, exc))
                        else:
                            await savepoint.commit()
                            outcomes.append((True, result))
                    if not self.is_sqlite:
                        notices = [n for i in batch for n in i.tx._notices]
                        await self._send_notices(session, notices)
                    committing = True  # what raises from here on is COMMIT
            except Exception as exc:
                if committing:
                    raise _CommitFailed(exc) from exc
                raise
        self._committed(sum(1 for ok, _ in outcomes if ok))
        return outcomes

    def _committed(self, ops: int) -> None:
        self.batches_committed += 1
        self.ops_committed += ops
        if self.on_batch is not None:
            self.on_batch(ops)

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
        """As few NOTIFYs as fit the notices, each payload under NOTIFY_PAYLOAD_BYTES
        (PostgreSQL refuses a longer one, failing the transaction); PostgreSQL
        delivers them at commit. A notice too large for any payload is not
        sent: the other replicas are told to catch up from the database
        instead, as after a lost LISTEN connection."""
        head = f'{{"r":{json.dumps(self.replica_id)},"n":['
        chunk: list[str] = []
        size = len(head) + 2  # "]}"
        catch_up = False
        for notice in notices:
            text = json.dumps(notice, separators=(",", ":"))  # ASCII: characters are bytes
            if len(head) + len(text) + 2 > NOTIFY_PAYLOAD_BYTES:
                log.warning(
                    "a notice of %d bytes exceeds a NOTIFY payload; other replicas catch up",
                    len(text),
                )
                if not catch_up:
                    await self._notify(session, json.dumps({"r": self.replica_id, "catch_up": 1}))
                    catch_up = True
                continue
            if chunk and size + 1 + len(text) > NOTIFY_PAYLOAD_BYTES:
                await self._notify(session, head + ",".join(chunk) + "]}")
                chunk, size = [], len(head) + 2
            size += len(text) + (1 if chunk else 0)
            chunk.append(text)
        if chunk:
            await self._notify(session, head + ",".join(chunk) + "]}")

    async def _notify(self, session: AsyncSession, payload: str) -> None:
        await session.execute(
            sql_text("SELECT pg_notify(:channel, :payload)"),
            {"channel": NOTIFY_CHANNEL, "payload": payload},
        )

    async def listen(
        self,
        on_notices: Callable[[list[dict[str, Any]]], None],
        on_restored: Callable[[], None] | None = None,
    ) -> None:
        """Receive the other replicas' notices (PostgreSQL LISTEN); a no-op on SQLite.

        The first connection must succeed. A connection lost later (a database
        restart, pg_terminate_backend, a half-open socket that stops answering
        the probe) is re-established with backoff, and then `on_restored` runs:
        notices sent meanwhile are gone, so whoever waits for them must catch
        up from the database."""
        if self.is_sqlite:
            return
        self._on_notices = on_notices
        self._on_restored = on_restored
        conn, lost = await self._open_listener()
        self._listener = conn
        self._listening = asyncio.create_task(
            self._keep_listening(conn, lost), name="jobtrace-listener"
        )

    def _received(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        try:
            doc = json.loads(payload)
        except ValueError:
            log.warning("ignoring a malformed notice")
            return
        if doc.get("r") == self.replica_id:
            return
        if doc.get("catch_up"):
            if self._on_restored is not None:
                self._on_restored()
        elif self._on_notices is not None:
            self._on_notices(doc.get("n", []))

    async def _open_listener(self) -> tuple[Any, asyncio.Event]:
        import asyncpg

        dsn = make_url(self.url).set(drivername="postgresql").render_as_string(hide_password=False)
        conn = await asyncpg.connect(
            dsn, server_settings={"application_name": LISTENER_APPLICATION_NAME}
        )
        lost = asyncio.Event()
        try:
            conn.add_termination_listener(lambda _conn: lost.set())
            await conn.add_listener(NOTIFY_CHANNEL, self._received)
        except BaseException:
            conn.terminate()
            raise
        return conn, lost

    async def _keep_listening(self, conn: Any, lost: asyncio.Event) -> None:
        while True:
            await self._until_lost(conn, lost)
            log.warning("the LISTEN connection was lost; reconnecting")
            conn.terminate()
            self._listener = None
            delay = LISTEN_RETRY_INITIAL_S
            attempts = 0
            while True:
                # A pause before each attempt: right after a database restart
                # an immediate attempt mostly fails.
                await asyncio.sleep(delay)
                attempts += 1
                try:
                    conn, lost = await self._open_listener()
                    break
                except Exception as exc:  # keep trying: a replica without LISTEN goes stale
                    delay = min(delay * 2, LISTEN_RETRY_MAX_S)
                    # Once per outage at WARNING (storage availability tells the
                    # rest); an unexpected kind of failure every time, in full.
                    expected = isinstance(exc, _connection_errors())
                    log.log(
                        logging.WARNING if attempts == 1 or not expected else logging.DEBUG,
                        "LISTEN reconnect failed (%s); next try in %.1fs",
                        exc,
                        delay,
                        exc_info=not expected,
                    )
            self._listener = conn
            log.info(
                "LISTEN re-established after %d attempts; local streams and the dispatcher "
                "catch up",
                attempts,
            )
            if self._on_restored is not None:
                try:
                    self._on_restored()
                except Exception:
                    log.exception("catching up after LISTEN was re-established failed")

    async def _until_lost(self, conn: Any, lost: asyncio.Event) -> None:
        """Return once the connection is closed, or stops answering a probe."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(LISTEN_PROBE_EVERY_S):
                    await lost.wait()
                return
            try:
                async with asyncio.timeout(LISTEN_PROBE_TIMEOUT_S):
                    await conn.fetchval("SELECT 1")
            except _connection_errors() as exc:
                log.warning("the LISTEN connection does not answer (%s)", exc)
                return

    async def _close_listener(self) -> None:
        if self._listening is not None:
            self._listening.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listening
            self._listening = None
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.close(timeout=5)
            self._listener = None


def _connection_errors() -> tuple[type[Exception], ...]:
    """What connecting, or using, a connection that failed or went away raises."""
    import asyncpg

    return (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


class _BatchFailed(Exception):
    """An operation of the batch raised `error`; the transaction was rolled back."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


class _CommitFailed(Exception):
    """COMMIT itself raised `error`."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def _outcome_unknown(error: Exception) -> bool:
    """Whether a failed COMMIT may nevertheless have committed: the connection
    was lost (rather than the database refusing, e.g. a deferred constraint)."""
    if isinstance(error, DBAPIError):
        return bool(error.connection_invalidated)
    return isinstance(error, OSError)


NOTIFY_CHANNEL = "jobtrace"
# PostgreSQL refuses a NOTIFY payload of 8000 bytes or more (the default
# build's limit); one payload carries at most this many.
NOTIFY_PAYLOAD_BYTES = 7900
# The LISTEN connection's application_name (pg_stat_activity shows it).
LISTENER_APPLICATION_NAME = "jobtrace-listener"
LISTEN_RETRY_INITIAL_S = 0.1
LISTEN_RETRY_MAX_S = 5.0
# A half-open connection never reports its loss: probe it this often.
LISTEN_PROBE_EVERY_S = 15.0
LISTEN_PROBE_TIMEOUT_S = 10.0
MIGRATION_LOCK = 0x6A6F6274  # "jobt"


def _upgrade(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":
        # Replicas starting together migrate one at a time.
        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


class InlineSqlite(aiosqlite.Connection):  # type: ignore[misc]
    """An aiosqlite connection that runs statements on the event loop's thread.

    aiosqlite hands every statement to a thread and back, a round trip that
    costs far more than the statement itself (SQLite answers in microseconds
    from its page cache); with one writer running a group commit's statements
    one after the other, those round trips set the write throughput. Here only
    what may wait goes to the thread: COMMIT (the fsync), BEGIN IMMEDIATE (which
    waits out another process's write lock, up to busy_timeout), closing and
    set-up.

    A sqlite3 connection must never be used by two threads at once. A caller
    cancelled while the thread runs its COMMIT goes on (SQLAlchemy then rolls
    back or closes) while the COMMIT is still running, so every use, here and
    in the thread, holds the connection's lock."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._guard = threading.Lock()

    async def _execute(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        conn = self._sqlite3()
        # The connection's own commit and close go (a cursor's close stays here).
        if fn == conn.commit or fn == conn.close or (args and args[0] == "BEGIN IMMEDIATE"):
            return await super()._execute(self._guarded, fn, *args, **kwargs)
        return self._guarded(fn, *args, **kwargs)

    def _guarded(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        with self._guard:
            return fn(*args, **kwargs)

    # Statements run by jobtrace.store.sql, straight on the sqlite3 connection;
    # a driver error is raised as SQLAlchemy's wrapper of it, as from a session.

    def _sqlite3(self) -> sqlite3.Connection:
        if not self._running or not self._connection:
            # An OperationalError, as the driver's own would be: storage unavailable.
            raise sqlite3.OperationalError("the database connection is closed")
        return self._connection  # type: ignore[no-any-return]

    def fetch(self, sql: str, params: Any) -> list[sqlite3.Row]:
        with self._guard:
            try:
                cursor = self._sqlite3().cursor()
                try:
                    cursor.row_factory = sqlite3.Row
                    return cursor.execute(sql, params).fetchall()
                finally:
                    cursor.close()
            except sqlite3.Error as exc:
                raise _wrapped(sql, params, exc) from exc

    def change(self, sql: str, params: Any) -> int:
        with self._guard:
            try:
                cursor = self._sqlite3().execute(sql, params)
                try:
                    return cursor.rowcount
                finally:
                    cursor.close()
            except sqlite3.Error as exc:
                raise _wrapped(sql, params, exc) from exc

    def change_many(self, sql: str, rows: Any) -> None:
        with self._guard:
            try:
                self._sqlite3().executemany(sql, rows).close()
            except sqlite3.Error as exc:
                raise _wrapped(sql, rows, exc) from exc


def _wrapped(sql: str, params: Any, exc: sqlite3.Error) -> StatementError:
    return DBAPIError.instance(sql, params, exc, sqlite3.Error)


def _sqlite_engine(url: str, *, write: bool) -> AsyncEngine:
    """SQLite in WAL mode: one writer connection with BEGIN IMMEDIATE, pooled readers."""
    path = make_url(url).database
    if not path or path == ":memory:":
        raise ValueError("SQLite needs a database file (sqlite+aiosqlite:///path/to.db)")
    Path(path).parent.mkdir(parents=True, exist_ok=True)

    async def connect() -> Any:
        return await InlineSqlite(
            partial(sqlite3.connect, path, check_same_thread=False), iter_chunk_size=64
        )

    if write:
        engine = create_async_engine(url, pool_size=1, max_overflow=0, async_creator=connect)
    else:
        engine = create_async_engine(url, pool_size=8, max_overflow=8, async_creator=connect)

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the sqlite3 module, emit BEGIN/SAVEPOINT.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit is on disk before the caller is told it is stored.
            cursor.execute(f"PRAGMA synchronous={SQLITE_SYNCHRONOUS}")
            cursor.execute("PRAGMA busy_timeout=10000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA synchronous")
            (level,) = cursor.fetchone()
        finally:
            cursor.close()
        if level < SQLITE_FULL:
            # NORMAL in WAL mode survives a crash of the process but not of the
            # machine: acknowledged writes could be lost on power failure.
            raise DurabilityError(
                f"SQLite synchronous is {SQLITE_LEVELS.get(level, level)} on {path}, "
                "not FULL: acknowledged writes could be lost on power failure; "
                "refusing to use this connection"
            )

    begin = "BEGIN IMMEDIATE" if write else "BEGIN"

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql(begin)

    return engine


# The synchronous level set on every SQLite connection, and the least accepted.
SQLITE_SYNCHRONOUS = "FULL"
SQLITE_FULL = 2
SQLITE_LEVELS = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}


class DurabilityError(OSError):
    """The database would acknowledge writes it may lose (SQLite synchronous
    below FULL, PostgreSQL synchronous_commit off): jobtrace refuses it, since
    acknowledged means durable."""


def _require_synchronous_commit(engines: tuple[AsyncEngine, ...], *, allowed_off: bool) -> None:
    """Check `synchronous_commit` on every new PostgreSQL connection (a database,
    role or server setting may have turned it off): off acknowledges commits
    before they reach the disk, so a database crash loses acknowledged writes.
    Refused unless `allowed_off` (then a warning, once)."""
    warned = False

    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        nonlocal warned
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("SHOW synchronous_commit")
            (setting,) = cursor.fetchone()
        finally:
            cursor.close()
        dbapi_connection.rollback()  # hand the connection over with no transaction open
        if setting != "off":
            return
        if not allowed_off:
            raise DurabilityError(
                "PostgreSQL synchronous_commit is off for this database: a database "
                "crash would lose writes jobtrace has acknowledged; turn it on "
                "(ALTER DATABASE ... SET synchronous_commit = on), or accept the "
                "risk with --allow-async-commit (JOBTRACE_ALLOW_ASYNC_COMMIT=1)"
            )
        if not warned:
            warned = True
            log.warning(
                "PostgreSQL synchronous_commit is off and --allow-async-commit is set: "
                "a database crash may lose the last writes jobtrace acknowledged"
            )

    for engine in engines:
        event.listen(engine.sync_engine, "connect", _on_connect)


def sqlite_url(path: str | Path) -> str:
    return f"sqlite+aiosqlite:///{Path(path)}"
