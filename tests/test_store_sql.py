"""Hot-path statements (store.sql) run inside the session's transaction on both
backends: on PostgreSQL straight on asyncpg, with SQLAlchemy's errors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from jobtrace.store import sql
from jobtrace.store.db import Database, Tx, WriteOp

_CREATE = sql.Query("CREATE TABLE IF NOT EXISTS sqlprobe (k TEXT PRIMARY KEY, n BIGINT NOT NULL)")
_INSERT = sql.Query("INSERT INTO sqlprobe (k, n) VALUES (:k, :n)")
_BUMP = sql.Query("UPDATE sqlprobe SET n = n + :by WHERE k = :k AND n < :by")
_ALL = sql.Query("SELECT k, n FROM sqlprobe ORDER BY k")
_CAST = sql.Query("SELECT :k AS k", postgresql="SELECT CAST(:k AS text)::text AS k")


def test_named_parameters_become_numbered_once_each() -> None:
    text, names = sql.positional("UPDATE t SET n = n + :by WHERE k = :k OR n < :by")
    assert text == "UPDATE t SET n = n + $1 WHERE k = $2 OR n < $1"
    assert names == ("by", "k")
    text, names = sql.positional("SELECT :a::text, x::int, b.c")
    assert (text, names) == ("SELECT $1::text, x::int, b.c", ("a",))


@pytest.fixture
async def database(db_url: str) -> AsyncIterator[Database]:
    db = Database(db_url)
    await db.start()

    async def create(session: AsyncSession, tx: Tx) -> None:
        await sql.execute(session, _CREATE, {})

    await db.write(create)
    yield db
    await db.close()


async def _rows(db: Database) -> list[tuple[str, int]]:
    async with db.read() as session:
        return [(r["k"], r["n"]) for r in await sql.fetch(session, _ALL, {})]


async def test_statements_commit_with_their_group(database: Database) -> None:
    async def op(session: AsyncSession, tx: Tx) -> int:
        await sql.execute_many(session, _INSERT, [{"k": "a", "n": 1}, {"k": "b", "n": 2}])
        changed = await sql.execute(session, _BUMP, {"k": "a", "by": 2})
        assert await sql.scalar(session, _CAST, {"k": "x"}) == "x"
        return changed

    assert await database.write(op) == 1
    assert await _rows(database) == [("a", 3), ("b", 2)]


async def test_a_failing_operation_leaves_nothing_behind(database: Database) -> None:
    async def op(session: AsyncSession, tx: Tx) -> None:
        await sql.execute(session, _INSERT, {"k": "kept-out", "n": 1})
        raise RuntimeError("the operation fails after its statement ran")

    with pytest.raises(RuntimeError):
        await database.write(op)
    assert await _rows(database) == []


async def test_driver_errors_arrive_as_sqlalchemy_errors_and_spare_the_batch(
    database: Database,
) -> None:
    async def first(session: AsyncSession, tx: Tx) -> None:
        await sql.execute(session, _INSERT, {"k": "dup", "n": 1})

    await database.write(first)

    async def again(session: AsyncSession, tx: Tx) -> None:
        await sql.execute(session, _INSERT, {"k": "dup", "n": 2})

    async def other(session: AsyncSession, tx: Tx) -> None:
        await sql.execute(session, _INSERT, {"k": "other", "n": 5})

    results = await asyncio.gather(
        database.write(again), database.write(other), return_exceptions=True
    )
    assert isinstance(results[0], IntegrityError), results[0]
    assert results[1] is None
    assert await _rows(database) == [("dup", 1), ("other", 5)]


_COUNTER = sql.Query("UPDATE sqlprobe SET n = n + 1 WHERE k = :k RETURNING n")


async def test_concurrent_batches_lose_no_update_and_answer_in_commit_order(
    database: Database,
) -> None:
    """Many writers at once: batches follow each other (on PostgreSQL the next
    runs while the one before commits), yet every increment counts, each value
    is handed out once, and after-commit hooks run in the order of the values."""
    keys = [f"row{i}" for i in range(4)]

    async def seed(session: AsyncSession, tx: Tx) -> None:
        await sql.execute_many(session, _INSERT, [{"k": k, "n": 0} for k in keys])

    await database.write(seed)
    hooked: dict[str, list[int]] = {k: [] for k in keys}

    def bump(key: str) -> WriteOp[int]:
        async def op(session: AsyncSession, tx: Tx) -> int:
            value = int(await sql.scalar(session, _COUNTER, {"k": key}))
            tx.on_commit(lambda: hooked[key].append(value))
            return value

        return op

    per_key = 60
    writes = [database.write(bump(keys[i % len(keys)])) for i in range(per_key * len(keys))]
    answers = await asyncio.wait_for(asyncio.gather(*writes), 120)
    assert sorted(answers) == sorted(list(range(1, per_key + 1)) * len(keys))
    assert await _rows(database) == [(k, per_key) for k in keys]
    for key in keys:
        assert hooked[key] == list(range(1, per_key + 1)), key
    assert database.batches_committed >= 2


async def test_a_connection_that_died_is_a_transient_error_and_is_not_used_again(
    pg_url: str,
) -> None:
    """PostgreSQL ends the session's connection (a restart, an administrator): the
    next statement on it fails as a transient storage error (answered
    UNAVAILABLE, never INTERNAL) and the pool drops it, so the one after works."""
    from jobtrace.store.errors import is_transient

    from .conftest import _pg_admin

    db = Database(pg_url)
    await db.start()
    try:
        pid = _PID
        async with db.read() as session:
            backend = await sql.scalar(session, pid, {})
        await _pg_admin(f"SELECT pg_terminate_backend({int(backend)})")
        with pytest.raises(Exception) as failed:
            async with db.read() as session:
                await sql.scalar(session, pid, {})
        assert is_transient(failed.value), repr(failed.value)
        async with db.read() as session:
            assert await sql.scalar(session, pid, {}) != backend
    finally:
        await db.close()


_PID = sql.Query("SELECT pg_backend_pid()")
