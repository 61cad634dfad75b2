"""Queries over attestations, signing keys and pruning records."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from jobtrace.model import Attestation, AttestationType, RunState, SigningKey
from jobtrace.store import codec, sql
from jobtrace.store.listing import Chunk, Listing, created_between, read_chunk, unindexed
from jobtrace.store.sql import Query, Row
from jobtrace.store.tables import AttestationRow, PrunedAttestationRow, SigningKeyRow


class MalformedRow(ValueError):
    """A stored row whose columns do not decode: edited outside jobtrace."""

    def __init__(self, table: str, key: str, problems: list[str]) -> None:
        super().__init__(f"{table} row {key!r} is malformed: {'; '.join(problems)}")
        self.table = table
        self.key = key
        self.problems = problems


ATTESTATIONS = AttestationRow.__table__


def _from_row(r: Row, *, full: bool = True) -> Attestation:
    """An attestation from its row (a mapping); without `full`, one read
    without its data (left empty)."""
    problems: list[str] = []
    kind = _enum(AttestationType, r["type"], "type", problems)
    if kind == AttestationType.UNSPECIFIED:
        problems.append("type 0 is not an attestation type")
    state = _enum(RunState, r["state"], "state", problems)
    try:
        signature = bytes.fromhex(r["signature"])
    except (TypeError, ValueError):
        problems.append("signature is not hex")
        signature = b""
    data = _json_object(r["data"], problems) if full else {}
    for name in ("attempt", "chain_seq", "created_us", "expire_us"):
        value = r[name]
        if not isinstance(value, int) or isinstance(value, bool):
            problems.append(f"{name} {value!r} is not an integer")  # SQLite stores any type
    if problems:
        raise MalformedRow("attestations", r["key"], problems)
    return Attestation(
        key=r["key"],
        tenant=r["tenant"],
        type=kind,
        entity_type=r["entity_type"],
        entity_id=r["entity_id"],
        workflow_id=r["workflow_id"],
        job_id=r["job_id"],
        worker_id=r["worker_id"],
        attempt=r["attempt"],
        state=state,
        data=data,
        chain_id=r["chain_id"],
        chain_seq=r["chain_seq"],
        digest=r["digest"],
        previous_digest=r["previous_digest"],
        signature=signature,
        key_id=r["key_id"],
        created_us=r["created_us"],
        expire_us=r["expire_us"],
        seq=r["seq"],
        recorded_by=r["recorded_by"],
    )


def _enum(kind: Any, value: Any, name: str, problems: list[str]) -> Any:
    try:
        return kind(value)
    except (TypeError, ValueError):
        problems.append(f"{name} {value!r} is not a known {kind.__name__}")
        return None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is beyond the range of a double")
    return value


def _double_sized_int(text: str) -> int:
    value = int(text)
    try:
        float(value)
    except OverflowError:
        raise ValueError(f"integer of {len(text)} digits is beyond the range of a double") from None
    return value


def _json_object(text: str, problems: list[str]) -> Any:
    """The data column: a JSON object of values every JSON reader can hold."""
    try:
        data = json.loads(
            text,
            parse_constant=_refuse_constant,
            parse_float=_finite_float,
            parse_int=_double_sized_int,
        )
        if "\\ud" in text.lower():  # an escaped surrogate: is it paired?
            json.dumps(data, ensure_ascii=False).encode()
    except (TypeError, ValueError) as exc:
        problems.append(f"data is not JSON: {exc}")
        return None
    if not isinstance(data, dict):
        problems.append("data is not a JSON object")
    return data


# The head of a chain, counting links retention pruned, in one statement.
_CHAIN_HEAD = Query(
    "SELECT chain_seq, digest FROM ("
    "SELECT chain_seq, digest FROM (SELECT chain_seq, digest FROM attestations"
    " WHERE chain_id = :chain_id ORDER BY chain_seq DESC LIMIT 1) AS kept"
    " UNION ALL "
    "SELECT chain_seq, digest FROM (SELECT chain_seq, digest FROM pruned_attestations"
    " WHERE chain_id = :chain_id ORDER BY chain_seq DESC LIMIT 1) AS pruned"
    ") AS heads ORDER BY chain_seq DESC LIMIT 1"
)


async def chain_head(session: AsyncSession, chain_id: str) -> tuple[int, str]:
    """(last chain_seq, its digest) of a chain, counting pruned links; (0, '') if new."""
    row = await sql.fetch_one(session, _CHAIN_HEAD, {"chain_id": chain_id})
    return (0, "") if row is None else (int(row["chain_seq"]), str(row["digest"]))


_ATTESTATION_COLUMNS = sql.columns(AttestationRow.__table__, without=("seq",))
_INSERT_ATTESTATION = sql.insert_query(AttestationRow.__table__, _ATTESTATION_COLUMNS)
# The same INSERT with its parameters prefixed, to run inside another
# statement (store.trace.update_and_store_events) whose names it must not meet.
_INSERT_ATTESTATION_PREFIXED = Query(
    _INSERT_ATTESTATION.sqlite.split(" VALUES ")[0]
    + " VALUES ("
    + ", ".join(f":att_{n}" for n in _ATTESTATION_COLUMNS)
    + ")"
)


def attestation_insert(a: Attestation) -> tuple[Query, dict[str, Any]]:
    """The INSERT of an attestation, to be run with the statement of its
    transition (see store.trace.update_and_store_events)."""
    return _INSERT_ATTESTATION_PREFIXED, {f"att_{k}": v for k, v in attestation_values(a).items()}


async def insert_attestation(session: AsyncSession, a: Attestation) -> None:
    await sql.execute(session, _INSERT_ATTESTATION, attestation_values(a))


def attestation_values(a: Attestation) -> dict[str, Any]:
    """The row of an attestation, column by column."""
    return {
        "key": a.key,
        "tenant": a.tenant,
        "type": int(a.type),
        "entity_type": a.entity_type,
        "entity_id": a.entity_id,
        "workflow_id": a.workflow_id,
        "job_id": a.job_id,
        "worker_id": a.worker_id,
        "attempt": a.attempt,
        "state": int(a.state),
        "data": codec.dumps(a.data),
        "chain_id": a.chain_id,
        "chain_seq": a.chain_seq,
        "digest": a.digest,
        "previous_digest": a.previous_digest,
        "signature": a.signature.hex(),
        "key_id": a.key_id,
        "created_us": a.created_us,
        "expire_us": a.expire_us,
        "recorded_by": a.recorded_by,
        # Copies of what data holds (signed there), for listings.
        "service": _text(a.data.get("service")) if isinstance(a.data, dict) else "",
        "user_id": _user(a.data),
    }


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _user(data: Any) -> str:
    """data's request_context.user_context.user_id; '' when none."""
    context = data.get("request_context") if isinstance(data, dict) else None
    user = context.get("user_context") if isinstance(context, dict) else None
    return _text(user.get("user_id")) if isinstance(user, dict) else ""


async def get(session: AsyncSession, key: str, tenant: str | None = None) -> Attestation | None:
    stmt = select(ATTESTATIONS).where(AttestationRow.key == key)
    if tenant is not None:
        stmt = stmt.where(AttestationRow.tenant == tenant)
    row = (await session.execute(stmt)).mappings().one_or_none()
    return None if row is None else _from_row(row)


async def link_digest(
    session: AsyncSession, chain_id: str, chain_seq: int
) -> tuple[str, str] | None:
    """(key, digest) of one link of a chain: all a chain check needs, and readable
    even when the rest of that row is malformed."""
    stmt = select(AttestationRow.key, AttestationRow.digest).where(
        AttestationRow.chain_id == chain_id, AttestationRow.chain_seq == chain_seq
    )
    row = (await session.execute(stmt)).first()
    return None if row is None else (str(row[0]), str(row[1]))


async def pruned_link(session: AsyncSession, chain_id: str, chain_seq: int) -> str | None:
    stmt = select(PrunedAttestationRow.digest).where(
        PrunedAttestationRow.chain_id == chain_id, PrunedAttestationRow.chain_seq == chain_seq
    )
    return (await session.execute(stmt)).scalar()


@dataclass(frozen=True, slots=True)
class AttestationQuery:
    """Which attestations a listing reads; empty / zero / None match all.
    `since_us` is inclusive, `until_us` exclusive."""

    workflow_id: str = ""
    job_id: str = ""
    type: int = 0
    state: int = 0
    service: str = ""
    user_id: str = ""
    worker_id: str = ""
    since_us: int | None = None
    until_us: int | None = None


def attestation_where(
    tenant: str | None, q: AttestationQuery, *, ranked: bool = False
) -> list[Any]:
    """The conditions of a listing of attestations, each on an index of
    AttestationRow's (with the tenant). `ranked` (SQLite: no statistics)
    lets only the most selective filter given use its index and checks the
    others on the rows it yields (unindexed), as store.jobs._keyset does."""
    where: list[Any] = []
    if tenant is not None:
        where.append(AttestationRow.tenant == tenant)
    filters: list[tuple[Any, Callable[[Any], list[Any]]]] = []
    for column, value in (
        (AttestationRow.job_id, q.job_id),
        (AttestationRow.workflow_id, q.workflow_id),
        (AttestationRow.user_id, q.user_id),
        (AttestationRow.worker_id, q.worker_id),
        (AttestationRow.service, q.service),
        (AttestationRow.type, q.type),
        (AttestationRow.state, q.state),
    ):
        if value:
            filters.append((column, partial(_equal, value=value)))
    if q.since_us is not None or q.until_us is not None:
        filters.append(
            (
                AttestationRow.created_us,
                lambda c: created_between(c, q.since_us, q.until_us, newest_first=False),
            )
        )
    for i, (column, conditions) in enumerate(filters):
        where += conditions(column if i == 0 or not ranked else unindexed(column))
    return where


def attestation_key(q: AttestationQuery) -> Any:
    """What a listing is ordered by: seq; for a time window that no id
    serves, an unindexed seq, so that the window is read from the time index
    and sorted (see store.jobs._keyset), not looked for along seq."""
    window = q.since_us is not None and q.until_us is not None
    ids = q.job_id or q.workflow_id or q.user_id or q.worker_id
    return unindexed(AttestationRow.seq) if window and not ids else AttestationRow.seq


def _equal(column: Any, value: Any) -> list[Any]:
    return [column == value]


async def read_attestations(
    session: AsyncSession,
    *,
    tenant: str | None,
    query: AttestationQuery,
    after: int | None,
    limit: int,
    max_bytes: int,
    full: bool,
) -> Chunk[Attestation]:
    """In the order they were written; data only when `full`."""
    listing = Listing(
        key=attestation_key(query),
        row_key=AttestationRow.seq,
        where=attestation_where(tenant, query, ranked=sql.dialect(session) == "sqlite"),
        columns=[c for c in ATTESTATIONS.c if full or c.name != "data"],
        sized=[AttestationRow.data] if full else [],
    )
    return await read_chunk(
        session,
        listing,
        after=after,
        limit=limit,
        max_bytes=max_bytes,
        build=lambda row: _from_row(row, full=full),
    )


async def prune_expired(session: AsyncSession, now_us: int, limit: int) -> int:
    stmt = (
        select(AttestationRow)
        .where(AttestationRow.expire_us < now_us)
        .order_by(AttestationRow.expire_us)
        .limit(limit)
        .with_for_update(skip_locked=True)  # replicas sweeping together never collide
    )
    rows = list((await session.execute(stmt)).scalars())
    if not rows:
        return 0
    await session.execute(
        insert(PrunedAttestationRow),
        [
            {
                "chain_id": r.chain_id,
                "chain_seq": r.chain_seq,
                "key": r.key,
                "digest": r.digest,
                "pruned_us": now_us,
            }
            for r in rows
        ],
    )
    await session.execute(
        delete(AttestationRow).where(AttestationRow.seq.in_([r.seq for r in rows]))
    )
    return len(rows)


async def register_key(session: AsyncSession, key: SigningKey) -> None:
    await session.execute(update(SigningKeyRow).values(active=False))
    existing = (
        await session.execute(select(SigningKeyRow).where(SigningKeyRow.key_id == key.key_id))
    ).scalar_one_or_none()
    if existing is None:
        await session.execute(
            insert(SigningKeyRow).values(
                key_id=key.key_id,
                public_key=key.public_key.hex(),
                algorithm=key.algorithm,
                created_us=key.created_us,
                active=True,
            )
        )
    else:
        existing.active = True


def _key_from_row(r: SigningKeyRow) -> SigningKey:
    try:
        public_key = bytes.fromhex(r.public_key)
    except (TypeError, ValueError):
        raise MalformedRow("signing_keys", r.key_id, ["public_key is not hex"]) from None
    return SigningKey(r.key_id, public_key, r.algorithm, r.created_us, r.active)


async def keys(session: AsyncSession) -> list[SigningKey]:
    stmt = select(SigningKeyRow).order_by(SigningKeyRow.created_us.desc())
    return [_key_from_row(r) for r in (await session.execute(stmt)).scalars()]


async def key(session: AsyncSession, key_id: str) -> SigningKey | None:
    stmt = select(SigningKeyRow).where(SigningKeyRow.key_id == key_id)
    row = (await session.execute(stmt)).scalar_one_or_none()
    return None if row is None else _key_from_row(row)


async def approvals_of(session: AsyncSession, workflow_id: str) -> list[dict[str, Any]]:
    """The approval decisions attested in a workflow's chain, in chain order:
    key, digest, step job and who recorded each (ix_attestations_workflow)."""
    stmt = (
        select(
            AttestationRow.key,
            AttestationRow.digest,
            AttestationRow.job_id,
            AttestationRow.recorded_by,
        )
        .where(
            AttestationRow.workflow_id == workflow_id,
            AttestationRow.type == int(AttestationType.APPROVAL),
        )
        .order_by(AttestationRow.seq)
    )
    return [
        {"key": key, "digest": digest, "job_id": job_id, "recorded_by": by}
        for key, digest, job_id, by in (await session.execute(stmt)).all()
    ]
