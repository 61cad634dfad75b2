"""The group-commit writer on both backends: one transaction per batch, and an
operation that raises costs the others neither their write nor an fsync each."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from jobtrace.store import sql
from jobtrace.store.db import NOTIFY_CHANNEL, Database, Tx

from .conftest import execute_sql

Op = Callable[[AsyncSession, Tx], Awaitable[Any]]


class Stale(Exception):
    """What a domain rule raises, e.g. a report for a stale attempt."""


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    database = Database(db_url)
    await database.start()
    await execute_sql(db_url, "CREATE TABLE probe_parent (id INTEGER PRIMARY KEY)")
    await execute_sql(
        db_url,
        "CREATE TABLE probe (k VARCHAR(32) PRIMARY KEY, parent INTEGER "
        "REFERENCES probe_parent (id) DEFERRABLE INITIALLY DEFERRED)",
    )
    try:
        yield database
    finally:
        await database.close()


def insert(
    key: str, hooks: list[str], *, then_raise: bool = False, parent: int | None = None
) -> Op:
    async def op(session: AsyncSession, tx: Tx) -> str:
        await session.execute(
            text("INSERT INTO probe (k, parent) VALUES (:k, :p)"), {"k": key, "p": parent}
        )
        tx.on_commit(lambda: hooks.append(key))
        tx.notify({"k": "probe", "key": key})
        if then_raise:
            raise Stale(key)
        return key

    return op


async def one_batch(db: Database, ops: list[Op]) -> list[Any]:
    """Queue every operation before the writer runs, so they share one batch."""
    return await asyncio.gather(*(db.write(op) for op in ops), return_exceptions=True)


async def stored(db_url: str) -> list[str]:
    return [k for (k,) in await execute_sql(db_url, "SELECT k FROM probe ORDER BY k")]


@pytest.fixture
async def notices(db: Database, db_url: str) -> AsyncIterator[list[str]]:
    """Keys of the notices other replicas would receive (PostgreSQL only)."""
    seen: list[str] = []
    if db.is_sqlite:
        yield seen
        return
    import asyncpg

    conn = await asyncpg.connect(db_url.replace("postgresql+asyncpg://", "postgresql://"))

    def received(_c: Any, _pid: int, _channel: str, payload: str) -> None:
        seen.extend(n["key"] for n in json.loads(payload)["n"] if n.get("k") == "probe")

    await conn.add_listener(NOTIFY_CHANNEL, received)
    try:
        yield seen
    finally:
        await conn.close()


async def test_a_batch_without_errors_is_one_transaction(db: Database, db_url: str) -> None:
    sizes: list[int] = []
    db.on_batch = sizes.append
    hooks: list[str] = []
    results = await one_batch(db, [insert(f"k{i}", hooks) for i in range(10)])
    assert results == [f"k{i}" for i in range(10)]
    assert sizes == [10]
    assert sorted(hooks) == sorted(results)


async def test_one_failing_operation_rolls_back_alone_and_the_rest_commit_together(
    db: Database, db_url: str, notices: list[str]
) -> None:
    sizes: list[int] = []
    db.on_batch = sizes.append
    hooks: list[str] = []
    before = db.batches_committed
    ops = [insert(f"k{i}", hooks, then_raise=(i == 3)) for i in range(8)]
    results = await one_batch(db, ops)
    assert isinstance(results[3], Stale)
    assert [r for i, r in enumerate(results) if i != 3] == [f"k{i}" for i in range(8) if i != 3]
    # One commit for the seven others, not one each.
    assert db.batches_committed == before + 1 and sizes == [7]
    assert await stored(db_url) == [f"k{i}" for i in range(8) if i != 3]
    # The failed operation's after-commit hook and notice are dropped with it.
    assert sorted(hooks) == [f"k{i}" for i in range(8) if i != 3]
    if not db.is_sqlite:
        expected = [f"k{i}" for i in range(8) if i != 3]
        for _ in range(500):  # NOTIFY is delivered asynchronously after the commit
            if sorted(notices) == expected:
                break
            await asyncio.sleep(0.01)
        assert sorted(notices) == expected


async def test_a_failing_savepoint_commit_falls_back_to_one_transaction_per_operation(
    db: Database, db_url: str
) -> None:
    """A deferred constraint fails only at COMMIT, so the savepoints cannot
    isolate it: each operation then commits (or fails) on its own."""
    sizes: list[int] = []
    db.on_batch = sizes.append
    hooks: list[str] = []
    ops = [
        insert("a", hooks),
        insert("b", hooks, then_raise=True),
        insert("c", hooks, parent=42),  # no such parent: refused at COMMIT
        insert("d", hooks),
    ]
    results = await one_batch(db, ops)
    assert results[0] == "a" and results[3] == "d"
    assert isinstance(results[1], Stale)
    assert isinstance(results[2], Exception) and not isinstance(results[2], Stale)
    assert sizes == [1, 1]
    assert await stored(db_url) == ["a", "d"]
    assert sorted(hooks) == ["a", "d"]


async def test_an_operation_failing_with_a_database_error_gets_one_more_try_alone(
    db: Database, db_url: str
) -> None:
    """A database error inside a batch (a deadlock with another replica, say) is
    not the caller's answer: after the others commit, that operation runs alone."""
    sizes: list[int] = []
    db.on_batch = sizes.append
    hooks: list[str] = []
    runs = 0
    plain = insert("flaky", hooks)

    async def flaky(session: AsyncSession, tx: Tx) -> Any:
        nonlocal runs
        runs += 1
        if runs <= 2:  # the fast path and the savepoint run
            await session.execute(text("SELECT * FROM no_such_table"))
        return await plain(session, tx)

    results = await one_batch(db, [insert("a", hooks), flaky, insert("b", hooks)])
    assert results == ["a", "flaky", "b"] and runs == 3
    assert sizes == [2, 1]
    assert await stored(db_url) == ["a", "b", "flaky"]
    assert sorted(hooks) == ["a", "b", "flaky"]


# --- literal SQL (jobtrace.store.sql) inside group commits --------------------------

PROBE_INSERT = sql.Query("INSERT INTO probe (k, parent) VALUES (:k, :p)")
PROBE_MOVE = sql.Query("UPDATE probe SET k = :new WHERE k = :old")
PROBE_ROWS = sql.Query("SELECT k, parent FROM probe WHERE k >= :low ORDER BY k")


def raw_insert(key: str, *, then_raise: bool = False) -> Op:
    async def op(session: AsyncSession, tx: Tx) -> str:
        await sql.execute(session, PROBE_INSERT, {"k": key, "p": None})
        if then_raise:
            raise Stale(key)
        return key

    return op


async def test_literal_sql_shares_the_batch_transaction_and_its_savepoints(
    db: Database, db_url: str
) -> None:
    sizes: list[int] = []
    db.on_batch = sizes.append
    hooks: list[str] = []
    # Expression-layer and literal statements interleaved in one batch; op 2's
    # literal insert is undone with its savepoint, op 4 is refused by the database.
    ops = [
        insert("a", hooks),
        raw_insert("b"),
        raw_insert("c", then_raise=True),
        raw_insert("d"),
        raw_insert("a"),  # duplicate primary key
    ]
    results = await one_batch(db, ops)
    assert results[:2] == ["a", "b"] and results[3] == "d"
    assert isinstance(results[2], Stale)
    assert isinstance(results[4], IntegrityError), "the driver's error, wrapped as SQLAlchemy's"
    assert sizes == [3], "the three that succeeded committed together"
    assert await stored(db_url) == ["a", "b", "d"]


async def test_literal_sql_reads_rows_by_column_and_counts_changed_rows(db: Database) -> None:
    await one_batch(db, [raw_insert("m1"), raw_insert("m2")])

    async def move(session: AsyncSession, tx: Tx) -> tuple[int, int, list[tuple[str, Any]]]:
        moved = await sql.execute(session, PROBE_MOVE, {"new": "m9", "old": "m1"})
        missing = await sql.execute(session, PROBE_MOVE, {"new": "m8", "old": "nope"})
        rows = await sql.fetch(session, PROBE_ROWS, {"low": "m"})
        return moved, missing, [(r["k"], r["parent"]) for r in rows]

    assert await db.write(move) == (1, 0, [("m2", None), ("m9", None)])
    async with db.read() as session:
        assert await sql.scalar(session, PROBE_ROWS, {"low": "m3"}) == "m9"
        assert await sql.fetch_one(session, PROBE_ROWS, {"low": "n"}) is None
