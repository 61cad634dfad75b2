"""Keyset reads for list pages in chunks whose stored size is known before they
are read, so that a page of huge rows is never loaded whole."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy import LargeBinary, String, cast, func, literal, select
from sqlalchemy.ext.asyncio import AsyncSession

from jobtrace.store import sql

T = TypeVar("T")

# Rows whose sizes one query reads at most. PostgreSQL reads a large value's
# size from its TOAST pointer; SQLite walks the value's overflow pages (in C,
# but on the event loop's thread), so this bounds one step of a listing.
SIZE_SCAN = 128
# Counted for every row besides its sized columns: its other, bounded columns.
ROW_OVERHEAD = 256


@dataclass(frozen=True, slots=True)
class Chunk(Generic[T]):
    """Rows of a listing read in one step. `after` is the key to read on from
    (the last row this step considered, even one that changed meanwhile and no
    longer matches); `exhausted` is True when no matching row follows it."""

    items: list[T]
    after: int | None
    exhausted: bool


@dataclass(frozen=True, slots=True)
class Listing:
    """One keyset listing of a table: which rows (`where`, ordered by `key`, a
    column that only grows, or listing.unindexed of one to keep the planner
    from reading it in index order), which columns a view reads, and which of
    those may be large (their stored sizes bound what one step reads)."""

    key: Any
    where: Sequence[Any]
    columns: Sequence[Any]
    sized: Sequence[Any]
    descending: bool = False
    # Further stored bytes of a row, read elsewhere (a workflow's steps).
    extra_size: Any = None
    # The picked rows are read by this column (their table's key) when `key`
    # is another (a label row's, or an unindexed copy), and checked again
    # only against `recheck` when given (conditions that can change).
    row_key: Any = None
    recheck: Sequence[Any] | None = None


def stored_size(session: AsyncSession, columns: Sequence[Any]) -> Any:
    """The summed stored size in bytes of these columns (NULL counts 0), read
    without loading the values where the database allows."""
    total: Any = literal(ROW_OVERHEAD)
    for column in columns:
        if sql.dialect(session) == "postgresql":
            size = func.octet_length(column)  # from the TOAST pointer: no detoasting
        else:
            size = func.length(cast(column, LargeBinary))  # bytes, no counting of characters
        total = total + func.coalesce(size, 0)
    return total


async def read_chunk(
    session: AsyncSession,
    listing: Listing,
    *,
    after: int | None,
    limit: int,
    max_bytes: int,
    build: Callable[[Any], T],
) -> Chunk[T]:
    """The next rows after `after` in key order: at most `limit` of them, and
    no more than `max_bytes` of stored size (the first one whatever its size).
    Their sizes are read first, their columns then."""
    where = list(listing.where)
    if after is not None:
        where.append(listing.key < after if listing.descending else listing.key > after)
    order = listing.key.desc() if listing.descending else listing.key
    size = stored_size(session, listing.sized)
    if listing.extra_size is not None:
        size = size + listing.extra_size
    scan = min(limit, SIZE_SCAN)
    sizes = (
        await session.execute(select(listing.key, size).where(*where).order_by(order).limit(scan))
    ).all()
    picked: list[Any] = []
    total = 0
    for key, row_size in sizes:
        if picked and total + int(row_size) > max_bytes:
            break
        picked.append(key)
        total += int(row_size)
    if not picked:
        return Chunk([], after, True)
    # The filters again: a row that changed since its size was read is left
    # out, as it would be had the change come before.
    fetch = listing.key if listing.row_key is None else listing.row_key
    again = listing.where if listing.recheck is None else listing.recheck
    stmt = (
        select(*listing.columns)
        .where(*again, fetch.in_(picked))
        .order_by(fetch.desc() if listing.descending else fetch)
    )
    rows = (await session.execute(stmt)).mappings().all()
    exhausted = len(picked) == len(sizes) < scan
    return Chunk([build(r) for r in rows], int(picked[-1]), exhausted)


def created_between(
    column: Any, after_us: int | None, before_us: int | None, *, newest_first: bool = True
) -> list[Any]:
    """[after_us, before_us) on a creation time. Rows are created in about
    the order of their seq, so a listing newest first meets the rows a lone
    lower bound keeps first, walking its tenant's seq index: that bound is
    then only checked (unindexed: the planner keeps off the time index,
    whose range it would read whole and sort). A window, or an upper bound,
    reads the time index (tenant, created_us): only its rows, then sorted.
    Oldest first, the same holds of a lone upper bound."""
    lone = after_us if newest_first else before_us
    if (after_us is None) == (before_us is None) or lone is None:
        checked = column
    else:
        checked = unindexed(column)
    where: list[Any] = []
    if after_us is not None:
        where.append(checked >= after_us)
    if before_us is not None:
        where.append(checked < before_us)
    return where


def unindexed(column: Any) -> Any:
    """The column's value as an expression no index serves (`|| ''` for text,
    `+ 0` for numbers): the planner then only checks it on rows another
    condition's index yields."""
    if isinstance(column.type, String):
        return column.concat("")
    return column + 0
