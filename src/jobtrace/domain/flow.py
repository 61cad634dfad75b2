"""Flow control: named rate limits (token buckets in the database) and
concurrency keys, checked when a job would start.

Rules (see the README's "Schedules and flow control"):
- A RateLimitUse names a limit of the job's tenant by `key`; its optional
  `partition` template, resolved from the payload at submission, picks the
  bucket ("" the limit's shared one). Each bucket holds at most the limit's
  burst and refills continuously at count / period; a new bucket starts full.
- A job with rate limits starts only when each of its buckets holds its
  units; the claim that starts it takes them, in the claim's transaction
  (the bucket row locked on PostgreSQL: a bucket another replica's claim
  holds is skipped, not waited for). A limit deleted since submission no
  longer limits.
- A concurrency key (resolved from the payload at submission) allows
  max_running RUNNING jobs of the tenant with that key: the claim counts
  them in its transaction, under the key's slot row lock on PostgreSQL. Full:
  QUEUE waits; CANCEL_NEWEST cancels the job dispatch reached (the newest
  arrival); CANCEL_OLDEST cancels the key's running job that started first
  (its worker told) and starts this one.
Jobs with neither carry an empty `flow` column and never reach this module.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from sqlalchemy.ext.asyncio import AsyncSession

from jobtrace.clock import now_us
from jobtrace.domain import validation
from jobtrace.domain.errors import AlreadyExists, NotFound, Violations
from jobtrace.model import (
    Concurrency,
    ConcurrencyStrategy,
    Job,
    JobSpec,
    RateLimit,
    RateLimitUse,
    WaitingReason,
)
from jobtrace.store import flow as store
from jobtrace.store.db import Database, Tx

KEY_RE = re.compile(r"[A-Za-z0-9._:/-]{1,128}+")
MAX_USES = 8
MAX_UNITS = 1000
MAX_TEMPLATE = 256
MAX_RUNNING = 10000
MAX_COUNT = 1_000_000
MAX_PERIOD_US = 24 * 3600 * 1_000_000
# A bucket or slot row another replica's claim holds: look again this soon (s).
LOCKED_RETRY_US = 5_000
# A full QUEUE key, or an empty bucket, is looked at again at least this
# often (a job's end on another replica, a limit changed or deleted).
FULL_RETRY_US = 1_000_000
CONCURRENCY_CODE = "CONCURRENCY_LIMIT"

_FIELD = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")


def resolve(template: str, payload: Mapping[str, object]) -> tuple[str, str | None]:
    """A template resolved from the payload's top-level keys ("{user_id}");
    "{{" and "}}" are literal braces. Returns (resolved, None), or ("", why)."""
    out: list[str] = []
    pos = 0
    for m in _FIELD.finditer(template):
        out.append(template[pos : m.start()])
        pos = m.end()
        token = m.group(0)
        if token == "{{":
            out.append("{")
        elif token == "}}":
            out.append("}")
        elif m.group(1) is None:
            return "", f"has an unmatched {token!r} (write {token * 2} for a literal one)"
        else:
            name = m.group(1)
            if name not in payload:
                return "", f"refers to {{{name}}}, which the payload does not have"
            value = payload[name]
            if isinstance(value, bool):
                out.append("true" if value else "false")
            elif isinstance(value, float) and value.is_integer():
                out.append(str(int(value)))
            elif isinstance(value, str | int | float):
                out.append(str(value))
            else:
                return "", f"refers to {{{name}}}, whose value is not a string or number"
    out.append(template[pos:])
    return "".join(out), None


def normalize(
    v: Violations, field_: str, spec: JobSpec
) -> tuple[tuple[RateLimitUse, ...], Concurrency | None]:
    """Check a spec's flow control and resolve its templates from its payload."""
    uses: list[RateLimitUse] = []
    if len(spec.rate_limits) > MAX_USES:
        v.add(f"{field_}.rate_limits", f"at most {MAX_USES} uses")
    seen: set[str] = set()
    for i, use in enumerate(spec.rate_limits):
        f = f"{field_}.rate_limits[{i}]"
        if not KEY_RE.fullmatch(use.key):
            v.add(f"{f}.key", "required: a limit's key, 1-128 characters of [A-Za-z0-9._:/-]")
            continue
        units = use.units or 1
        if not 1 <= units <= MAX_UNITS:
            v.add(f"{f}.units", f"must be 1-{MAX_UNITS} (0 means 1)")
        resolved = ""
        if use.partition:
            if len(use.partition) > MAX_TEMPLATE:
                v.add(f"{f}.partition", f"must be at most {MAX_TEMPLATE} characters")
                continue
            resolved, why = resolve(use.partition, spec.payload)
            if why is not None:
                v.add(f"{f}.partition", why)
                continue
            if not resolved or len(resolved) > MAX_TEMPLATE:
                v.add(f"{f}.partition", f"must resolve to 1-{MAX_TEMPLATE} characters")
                continue
        u = RateLimitUse(use.key, units, use.partition, resolved)
        if u.bucket in seen:
            v.add(f"{f}", f"uses bucket {u.bucket!r} twice")
        seen.add(u.bucket)
        uses.append(u)
    c = spec.concurrency
    if c is None:
        return tuple(uses), None
    f = f"{field_}.concurrency"
    if not c.key:
        v.add(f"{f}.key", "required: a key template such as 'user:{user_id}'")
    elif len(c.key) > MAX_TEMPLATE:
        v.add(f"{f}.key", f"must be at most {MAX_TEMPLATE} characters")
    resolved, why = resolve(c.key, spec.payload) if c.key else ("", None)
    if why is not None:
        v.add(f"{f}.key", why)
    elif c.key and (not resolved or len(resolved) > MAX_TEMPLATE):
        v.add(f"{f}.key", f"must resolve to 1-{MAX_TEMPLATE} characters")
    if not 1 <= c.max_running <= MAX_RUNNING:
        v.add(f"{f}.max_running", f"required: 1-{MAX_RUNNING}")
    try:
        strategy = ConcurrencyStrategy(c.strategy) or ConcurrencyStrategy.QUEUE
    except ValueError:
        v.add(f"{f}.strategy", "must be QUEUE, CANCEL_NEWEST or CANCEL_OLDEST")
        strategy = ConcurrencyStrategy.QUEUE
    return tuple(uses), Concurrency(c.key, c.max_running, strategy, resolved)


async def check_known(session: AsyncSession, tenant: str, specs: list[tuple[str, JobSpec]]) -> None:
    """INVALID_ARGUMENT naming each use of a limit the tenant does not have."""
    wanted = {u.key for _, s in specs for u in s.rate_limits}
    if not wanted:
        return
    known = await store.known_keys(session, tenant, wanted)
    v = Violations()
    for f, spec in specs:
        for i, u in enumerate(spec.rate_limits):
            if u.key not in known:
                v.add(
                    f"{f}.rate_limits[{i}].key",
                    f"no rate limit {u.key!r} (ScheduleService.CreateRateLimit)",
                )
    v.raise_if_any()


def check_limit(v: Violations, limit: RateLimit) -> RateLimit:
    """Check a limit to create or update; the burst defaulted."""
    if not KEY_RE.fullmatch(limit.key):
        v.add("rate_limit.key", "required: 1-128 characters of [A-Za-z0-9._:/-]")
    if not 1 <= limit.count <= MAX_COUNT:
        v.add("rate_limit.count", f"required: 1-{MAX_COUNT}")
    if not 1000 <= limit.period_us <= MAX_PERIOD_US:
        v.add("rate_limit.period", "required: 1 ms to 1 day")
    burst = limit.burst or limit.count
    if not 1 <= burst <= MAX_COUNT:
        v.add("rate_limit.burst", f"must be 0-{MAX_COUNT} (0 means count)")
    return RateLimit(limit.key, limit.count, limit.period_us, burst, limit.tenant)


flow_key = store.flow_key
concurrency_flow_key = store.concurrency_flow_key


# --- the claim's check ----------------------------------------------------


@dataclass(slots=True)
class Verdict:
    """What the claim of a flow-controlled job may do."""

    # Blocked: the flow key to skip, until when (us), and why.
    blocked: str = ""
    until_us: int = 0
    reason: WaitingReason = WaitingReason.UNSPECIFIED
    # Cancel the job itself (CANCEL_NEWEST, the key full).
    cancel_self: bool = False
    # Started: the buckets to write back, and the running jobs to cancel.
    buckets: list[store.Bucket] = field(default_factory=list)
    cancel: list[str] = field(default_factory=list)


async def admit(session: AsyncSession, job: Job, now: int) -> Verdict:
    """Check, in the claim's transaction, whether a flow-controlled job may
    start now (its bucket and slot rows locked on PostgreSQL until commit)."""
    spec = job.spec
    verdict = Verdict()
    c = spec.concurrency
    if c is not None:
        key = concurrency_flow_key(job.tenant, c.resolved)
        if not await store.lock_slot(session, job.tenant, c.resolved):
            return Verdict(key, now + LOCKED_RETRY_US, WaitingReason.CONCURRENCY_LIMIT)
        running = await store.running_with_key(session, job.tenant, c.resolved)
        over = len(running) - c.max_running + 1
        if over > 0:
            if c.strategy == ConcurrencyStrategy.CANCEL_NEWEST:
                return Verdict(cancel_self=True)
            if c.strategy == ConcurrencyStrategy.CANCEL_OLDEST:
                verdict.cancel = [job_id for job_id, _ in running[:over]]
            else:
                return Verdict(key, now + FULL_RETRY_US, WaitingReason.CONCURRENCY_LIMIT)
    for use in spec.rate_limits:
        key = f"{job.tenant}\x1fr\x1f{use.bucket}"
        bucket = await store.lock_bucket(session, job.tenant, use.key, use.resolved, now)
        if bucket is None:
            continue  # the limit was deleted: it no longer limits
        if bucket is False:
            return Verdict(key, now + LOCKED_RETRY_US, WaitingReason.RATE_LIMITED)
        assert isinstance(bucket, store.Bucket)
        if bucket.tokens < use.units:
            # Looked at again when the tokens are due, or within a second
            # (a limit changed or deleted meanwhile is seen then).
            wait = min(FULL_RETRY_US, int((use.units - bucket.tokens) / bucket.per_us) + 1)
            return Verdict(key, now + wait, WaitingReason.RATE_LIMITED)
        bucket.tokens -= use.units
        verdict.buckets.append(bucket)
    return verdict


async def started(session: AsyncSession, job: Job, verdict: Verdict, now: int) -> None:
    """The job was claimed: write its buckets back."""
    for bucket in verdict.buckets:
        await store.take(session, job.tenant, bucket)


class RateLimits:
    """The rate-limit admin operations (ScheduleService)."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def create(self, tenant: str, limit: RateLimit, by: str) -> RateLimit:
        v = Violations()
        checked = check_limit(v, limit)
        v.raise_if_any()
        now = now_us()
        new = replace(checked, tenant=tenant, created_by=by, created_us=now, updated_us=now)

        async def op(session: AsyncSession, tx: Tx) -> RateLimit:
            if not await store.insert_limit(session, new):
                raise AlreadyExists(
                    f"rate limit {new.key!r} exists",
                    reason="RATE_LIMIT_EXISTS",
                    metadata={"key": new.key},
                )
            return new

        result: RateLimit = await self._db.write(op)
        return result

    async def get(self, tenant: str, key: str) -> RateLimit:
        _check_key(key)
        async with self._db.read() as session:
            found = await store.get_limit(session, tenant, key)
        if found is None:
            raise _not_found(key)
        return found

    async def list(
        self, tenant: str, page_size: int, page_token: str
    ) -> tuple[list[RateLimit], str]:
        v = Violations()
        size = validation.check_page_size(v, "page_size", page_size)
        after = ""
        if page_token:
            try:
                after = base64.urlsafe_b64decode(page_token.encode()).decode()
            except (ValueError, UnicodeDecodeError):
                v.add("page_token", "not a page token of ListRateLimits")
        v.raise_if_any()
        async with self._db.read() as session:
            found = await store.list_limits(session, tenant, after, size + 1)
        token = ""
        if len(found) > size:
            found = found[:size]
            token = base64.urlsafe_b64encode(found[-1].key.encode()).decode()
        return found, token

    async def update(self, tenant: str, limit: RateLimit) -> RateLimit:
        v = Violations()
        checked = check_limit(v, limit)
        v.raise_if_any()

        async def op(session: AsyncSession, tx: Tx) -> RateLimit:
            now = now_us()
            if not await store.update_limit(
                session, replace(checked, tenant=tenant, updated_us=now)
            ):
                raise _not_found(checked.key)
            found = await store.get_limit(session, tenant, checked.key)
            assert found is not None
            return found

        result: RateLimit = await self._db.write(op)
        return result

    async def delete(self, tenant: str, key: str) -> None:
        _check_key(key)

        async def op(session: AsyncSession, tx: Tx) -> None:
            if not await store.delete_limit(session, tenant, key):
                raise _not_found(key)

        await self._db.write(op)


def _check_key(key: str) -> None:
    v = Violations()
    if not KEY_RE.fullmatch(key):
        v.add("key", "required: 1-128 characters of [A-Za-z0-9._:/-]")
    v.raise_if_any()


def _not_found(key: str) -> NotFound:
    return NotFound(
        f"rate limit {key!r} not found", reason="RATE_LIMIT_NOT_FOUND", metadata={"key": key}
    )
