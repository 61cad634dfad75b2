"""Schedules: a job or workflow template submitted on a cron expression (in an
IANA time zone) or a fixed interval, exactly once per tick across replicas.

Every replica runs a scanner. A due schedule is claimed with a compare-and-set
(its next tick unchanged, no other claim current), each tick's run is submitted
through the normal submit path with the deterministic request id
"schedule:<id>:<tick us>" (so a doubled attempt, by two replicas, a restart
or a clock skew, finds the run the first one created), and then the next tick
is advanced with a compare-and-set on the tick the claim read. A replica that
dies between the submission and the advance leaves the claim to expire
(CLAIM_S); the next scanner submits the same ticks again, and idempotency
makes that harmless. So no tick starts twice and none inside the catch-up
window is lost.

Time zones: cron fields are wall times in the schedule's zone. A wall time a
spring-forward day skips runs at the first instant after the gap (02:30 in
Europe/Berlin on that day runs at 03:00 CEST); a wall time a fall-back day
repeats runs once, at its first occurrence.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import re
import zoneinfo
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from croniter import croniter  # type: ignore[import-untyped]
from sqlalchemy.ext.asyncio import AsyncSession

from jobtrace.clock import Clock
from jobtrace.domain.errors import (
    AlreadyExists,
    DomainError,
    FailedPrecondition,
    FieldViolation,
    Invalid,
    NotFound,
    Violations,
    log_failure,
)
from jobtrace.domain.jobs import Jobs, JobSubmission, WorkflowSubmission
from jobtrace.domain.pagination import PageTokens
from jobtrace.domain.validation import check_request_id, check_text
from jobtrace.model import TERMINAL_STATES, Caller, RunState
from jobtrace.store import schedules as store
from jobtrace.store.db import Database, Tx

log = logging.getLogger(__name__)

ID_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
MIN_INTERVAL_US = 1_000_000
MAX_INTERVAL_US = 366 * 86400 * 1_000_000
MAX_JITTER_US = 3600 * 1_000_000
MAX_WINDOW_US = 7 * 86400 * 1_000_000
MAX_DESCRIPTION = 1024
# A tick more than this old when the scanner sees it was missed (catch-up).
ON_TIME_US = 60 * 1_000_000
# At most this many ticks are caught up in one pass.
MAX_CATCH_UP = 1000
# A scanner's claim of a due schedule lasts this long (then another may redo it).
CLAIM_US = 30 * 1_000_000
# Schedules handled per scanner pass.
SCAN_BATCH = 100
MAX_PAGE = 1000
DEFAULT_PAGE = 100

OVERLAP_SKIP, OVERLAP_BUFFER_ONE, OVERLAP_ALLOW_ALL, OVERLAP_CANCEL_OTHER = 1, 2, 3, 4
CATCH_UP_NONE, CATCH_UP_LAST, CATCH_UP_ALL = 1, 2, 3


@dataclass(frozen=True, slots=True)
class ScheduleDef:
    """A schedule's settable fields, as the caller gave them."""

    id: str
    description: str = ""
    cron: str = ""
    time_zone: str = ""
    interval_us: int = 0
    # Whether interval/jitter/catch_up_window were set (a zero Duration is set).
    interval_set: bool = False
    jitter_us: int = 0
    overlap: int = 0
    catch_up: int = 0
    catch_up_window_us: int = 0
    window_set: bool = False
    # "job" or "workflow" ("" when no template was set), and its serialized request.
    kind: str = ""
    template: bytes = b""
    request_id_set: bool = False
    paused: bool = False

    def definition_hash(self) -> str:
        parts = [
            self.description,
            self.cron,
            self.time_zone or "UTC",
            str(self.interval_us),
            str(self.jitter_us),
            str(self.overlap or OVERLAP_SKIP),
            str(self.catch_up or CATCH_UP_LAST),
            str(self.catch_up_window_us),
            self.kind,
            self.template.hex(),
        ]
        return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Schedule:
    """A stored schedule, with its last run's state read now."""

    row: dict[str, Any]
    last_run_state: int = 0


# The api layer turns a stored template into a submission of one tick:
# (kind, template, request id, annotations to add) -> JobSubmission | WorkflowSubmission.
Builder = Callable[[str, bytes, str, dict[str, Any]], JobSubmission | WorkflowSubmission]


def zone_of(name: str) -> zoneinfo.ZoneInfo:
    return zoneinfo.ZoneInfo(name or "UTC")


def _to_utc_us(wall: dt.datetime, zone: zoneinfo.ZoneInfo) -> int:
    """A wall time in `zone` as an instant: its first occurrence when repeated
    (fall back); the first instant after the gap when skipped (spring forward)."""
    first = wall.replace(tzinfo=zone, fold=0)
    instant = first.astimezone(dt.UTC)
    if instant.astimezone(zone).replace(tzinfo=None) == wall:
        return int(instant.timestamp() * 1_000_000)
    # In a gap: fold=1 reads it with the offset after the transition (an
    # instant before the gap), fold=0 with the one before (after the gap).
    # The transition is between them; find it to the second.
    lo = int(wall.replace(tzinfo=zone, fold=1).astimezone(dt.UTC).timestamp())
    hi = int(instant.timestamp())
    lo, hi = min(lo, hi), max(lo, hi)
    before = dt.datetime.fromtimestamp(lo, dt.UTC).astimezone(zone).utcoffset()
    while hi - lo > 1:
        mid = (lo + hi) // 2
        at = dt.datetime.fromtimestamp(mid, dt.UTC).astimezone(zone)
        if at.utcoffset() == before:
            lo = mid
        else:
            hi = mid
    return hi * 1_000_000


def ticks_after(row: dict[str, Any], after_us: int) -> Iterator[int]:
    """The schedule's ticks strictly after `after_us`, in order."""
    if row["cron"]:
        zone = zone_of(row["time_zone"])
        start = dt.datetime.fromtimestamp(after_us / 1e6, dt.UTC).astimezone(zone)
        it = croniter(row["cron"], start.replace(tzinfo=None, microsecond=0))
        last = after_us
        for _ in range(100_000):
            wall = it.get_next(dt.datetime)
            at = _to_utc_us(wall, zone)
            if at > last:
                last = at
                yield at
        return
    interval, anchor = row["interval_us"], row["anchor_us"]
    k = max(0, (after_us - anchor) // interval + 1)
    while True:
        yield anchor + k * interval
        k += 1


def next_tick(row: dict[str, Any], after_us: int) -> int:
    return next(ticks_after(row, after_us))


def jitter_of(row: dict[str, Any], tick_us: int) -> int:
    """A fixed pseudo-random delay of one tick (the same on every replica)."""
    if not row["jitter_us"]:
        return 0
    digest = hashlib.sha256(f"{row['tenant']}\x1f{row['id']}\x1f{tick_us}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % int(row["jitter_us"])


def tick_request_id(schedule_id: str, tick_us: int) -> str:
    return f"schedule:{schedule_id}:{tick_us}"


def iso(us: int) -> str:
    return dt.datetime.fromtimestamp(us / 1e6, dt.UTC).isoformat().replace("+00:00", "Z")


def check(v: Violations, d: ScheduleDef) -> None:
    """Every rule of a schedule's definition; violations name the field."""
    f = "schedule"
    if not ID_RE.fullmatch(d.id):
        v.add(f"{f}.id", "required: 1-128 characters of [A-Za-z0-9._-]")
    check_text(v, f"{f}.description", d.description, MAX_DESCRIPTION)
    if d.cron and d.interval_set:
        v.add(f"{f}.interval", "set one of cron and interval, not both")
    elif not d.cron and not d.interval_set:
        v.add(f"{f}.cron", "required: set a cron expression or an interval")
    if d.cron:
        if len(d.cron) > 256 or len(d.cron.split()) != 5 or not croniter.is_valid(d.cron):
            v.add(
                f"{f}.cron",
                f"invalid cron expression {d.cron[:256]!r}: five fields "
                "(minute hour day-of-month month day-of-week)",
            )
        try:
            zone_of(d.time_zone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            v.add(f"{f}.time_zone", f"unknown IANA time zone {d.time_zone[:64]!r}")
    elif d.time_zone:
        v.add(f"{f}.time_zone", "only with cron")
    if d.interval_set and not MIN_INTERVAL_US <= d.interval_us <= MAX_INTERVAL_US:
        v.add(f"{f}.interval", "must be at least 1 second and at most 366 days")
    if d.jitter_us < 0 or d.jitter_us > MAX_JITTER_US:
        v.add(f"{f}.jitter", "must not be negative and at most 1 hour")
    elif d.interval_set and d.jitter_us and d.jitter_us >= d.interval_us:
        v.add(f"{f}.jitter", "must be less than the interval")
    if d.overlap not in (0, 1, 2, 3, 4):
        v.add(f"{f}.overlap_policy", f"unknown overlap policy {d.overlap}")
    if d.catch_up not in (0, 1, 2, 3):
        v.add(f"{f}.catch_up_policy", f"unknown catch-up policy {d.catch_up}")
    if d.catch_up == CATCH_UP_ALL and not d.window_set:
        v.add(f"{f}.catch_up_window", "required with CATCH_UP_POLICY_ALL")
    elif d.catch_up == CATCH_UP_NONE and d.window_set:
        v.add(f"{f}.catch_up_window", "not allowed with CATCH_UP_POLICY_NONE")
    elif d.window_set and not 0 < d.catch_up_window_us <= MAX_WINDOW_US:
        v.add(f"{f}.catch_up_window", "must be positive and at most 7 days")
    if not d.kind:
        v.add(f"{f}.job", "required: set a job or a workflow template")
    elif d.request_id_set:
        v.add(f"{f}.{d.kind}.request_id", "must be empty: each tick sets its own")


class Schedules:
    """The ScheduleService rules, and the scanner that fires due ticks."""

    def __init__(
        self,
        db: Database,
        tokens: PageTokens,
        jobs: Jobs,
        build: Builder,
        *,
        clock: Clock | None = None,
    ) -> None:
        self._db = db
        self._tokens = tokens
        self._jobs = jobs
        self._build = build
        self.clock = clock or Clock()
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    # --- definitions ----------------------------------------------------

    def _check_template(self, d: ScheduleDef, caller: Caller) -> None:
        """The template as a tick would submit it (the trigger annotations
        added) passes the submit path's checks; violations are prefixed."""
        sub = self._build(d.kind, d.template, tick_request_id(d.id, 0), _trigger(d.id, 0))
        try:
            if isinstance(sub, JobSubmission):
                self._jobs.check_job(sub, caller)
            else:
                self._jobs.check_workflow(sub, caller)
        except Invalid as exc:
            raise Invalid(
                [
                    FieldViolation(f"schedule.{d.kind}.{x.field}", x.description)
                    for x in exc.violations
                ]
            ) from None

    def _values(self, d: ScheduleDef, now: int) -> dict[str, Any]:
        return {
            "description": d.description,
            "cron": d.cron,
            "time_zone": d.time_zone if d.cron else "",
            "interval_us": d.interval_us if d.interval_set else 0,
            "jitter_us": d.jitter_us,
            "overlap": d.overlap or OVERLAP_SKIP,
            "catch_up": d.catch_up or CATCH_UP_LAST,
            "catch_up_window_us": d.catch_up_window_us if d.window_set else 0,
            "kind": d.kind,
            "template": d.template,
            "definition_hash": d.definition_hash(),
            "anchor_us": now,
            "updated_us": now,
        }

    @staticmethod
    def _timing(values: dict[str, Any], paused: bool, now: int) -> dict[str, Any]:
        if paused:
            return {"paused": True, "due_us": None, "claim_until_us": 0}
        tick = next_tick(values, now)
        return {
            "paused": False,
            "next_tick_us": tick,
            "due_us": tick + jitter_of(values, tick),
            "claim_until_us": 0,
        }

    async def create(self, tenant: str, d: ScheduleDef, owner: Caller) -> tuple[Schedule, bool]:
        v = Violations()
        check(v, d)
        v.raise_if_any()
        self._check_template(d, owner)
        now = self.clock.now_us()

        async def op(session: AsyncSession, tx: Tx) -> tuple[dict[str, Any], bool]:
            existing = await store.get(session, tenant, d.id)
            if existing is not None:
                if existing["definition_hash"] != d.definition_hash():
                    raise AlreadyExists(
                        f"schedule {d.id!r} exists with a different definition",
                        reason="SCHEDULE_EXISTS",
                        metadata={"schedule_id": d.id},
                    )
                return existing, True
            values = {
                "tenant": tenant,
                "id": d.id,
                **self._values(d, now),
                "owner": owner.subject,
                "created_us": now,
            }
            values.update(self._timing(values, d.paused, now))
            await store.insert(session, values)
            return await self._require(session, tenant, d.id), False

        row, deduplicated = await self._db.write(op)
        if not deduplicated:
            log.info("schedule created", extra={"tenant": tenant, "schedule_id": d.id})
        return await self._with_state(row), deduplicated

    async def update(self, tenant: str, d: ScheduleDef, caller: Caller) -> Schedule:
        v = Violations()
        check(v, d)
        v.raise_if_any()
        self._check_template(d, caller)
        now = self.clock.now_us()

        async def op(session: AsyncSession, tx: Tx) -> dict[str, Any]:
            existing = await self._require(session, tenant, d.id)
            values = {**existing, **self._values(d, now)}
            values.update(self._timing(values, existing["paused"], now))
            values["buffered_us"] = 0
            await store.change(session, tenant, d.id, _settable(values))
            return await self._require(session, tenant, d.id)

        return await self._with_state(await self._db.write(op))

    async def get(self, tenant: str, schedule_id: str) -> Schedule:
        _check_id(schedule_id)
        async with self._db.read() as session:
            row = await store.get(session, tenant, schedule_id)
            if row is None:
                raise _not_found(schedule_id)
            return Schedule(row, await store.run_state(session, row["kind"], row["last_run_id"]))

    async def list(
        self, tenant: str, page_size: int, page_token: str
    ) -> tuple[list[Schedule], str]:
        if page_size < 0 or page_size > MAX_PAGE:
            raise Invalid([FieldViolation("page_size", f"must be 0-{MAX_PAGE}")])
        limit = page_size or DEFAULT_PAGE
        key = self._tokens.decode_key("page_token", page_token, "schedules", {})
        after = str(key[0]) if key else ""
        async with self._db.read() as session:
            rows = await store.page(session, tenant, after, limit + 1)
            more = len(rows) > limit
            rows = rows[:limit]
            out = [
                Schedule(r, await store.run_state(session, r["kind"], r["last_run_id"]))
                for r in rows
            ]
        token = self._tokens.encode_key("schedules", {}, [rows[-1]["id"]]) if more else ""
        return out, token

    async def delete(self, tenant: str, schedule_id: str) -> None:
        _check_id(schedule_id)

        async def op(session: AsyncSession, tx: Tx) -> bool:
            return await store.remove(session, tenant, schedule_id)

        if not await self._db.write(op):
            raise _not_found(schedule_id)
        log.info("schedule deleted", extra={"tenant": tenant, "schedule_id": schedule_id})

    async def set_paused(self, tenant: str, schedule_id: str, paused: bool) -> Schedule:
        _check_id(schedule_id)
        now = self.clock.now_us()

        async def op(session: AsyncSession, tx: Tx) -> dict[str, Any]:
            row = await self._require(session, tenant, schedule_id)
            if row["paused"] == paused:
                return row
            values = {**row, **self._timing(row, paused, now), "updated_us": now}
            if paused:
                values["buffered_us"] = 0
            await store.change(session, tenant, schedule_id, _settable(values))
            return await self._require(session, tenant, schedule_id)

        return await self._with_state(await self._db.write(op))

    async def trigger(
        self, tenant: str, schedule_id: str, request_id: str, caller: Caller
    ) -> tuple[str, bool]:
        """Submit the schedule's run now (as its owner); the next tick is unchanged."""
        _check_id(schedule_id)
        if request_id:
            v = Violations()
            check_request_id(v, "request_id", request_id)
            v.raise_if_any()
        now = self.clock.now_us()
        async with self._db.read() as session:
            row = await store.get(session, tenant, schedule_id)
        if row is None:
            raise _not_found(schedule_id)
        import secrets

        key = request_id or secrets.token_hex(12)
        if len(key) > 64:  # the run's request id stays within 256 characters
            key = hashlib.sha256(key.encode()).hexdigest()
        run_id, deduplicated = await self._submit(
            row, f"schedule:{schedule_id}:manual:{key}", now, manual=caller.subject
        )

        async def op(session: AsyncSession, tx: Tx) -> None:
            if not deduplicated:
                await store.change(
                    session, tenant, schedule_id, {"last_run_id": run_id, "last_run_us": now}
                )

        await self._db.write(op)
        return run_id, deduplicated

    async def _require(
        self, session: AsyncSession, tenant: str, schedule_id: str
    ) -> dict[str, Any]:
        row = await store.get(session, tenant, schedule_id)
        if row is None:
            raise _not_found(schedule_id)
        return row

    async def _with_state(self, row: dict[str, Any]) -> Schedule:
        async with self._db.read() as session:
            return Schedule(row, await store.run_state(session, row["kind"], row["last_run_id"]))

    # --- the scanner ------------------------------------------------------

    def start(self, every_s: float) -> None:
        self._task = asyncio.create_task(self._loop(every_s), name="jobtrace-schedules")

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def _loop(self, every_s: float) -> None:
        while not self._stopping.is_set():
            try:
                await self.scan_once()
            except Exception as exc:
                log_failure(log, exc, "schedule scan failed; retrying")
            try:
                await asyncio.wait_for(self._stopping.wait(), every_s)
            except TimeoutError:
                pass

    async def scan_once(self) -> int:
        """One pass: fire every due tick (and buffered ticks whose previous run
        ended). Returns the runs submitted (new or found)."""
        now = self.clock.now_us()
        async with self._db.read() as session:
            due = await store.due(session, now, SCAN_BATCH)
            waiting = await store.buffered(session, SCAN_BATCH)
        fired = 0
        for row in due:
            try:
                fired += await self._fire_due(row, now)
            except Exception as exc:
                log_failure(log, exc, f"schedule {row['id']!r}: tick failed; retrying")
        for row in waiting:
            try:
                fired += await self._fire_buffered(row, now)
            except Exception as exc:
                log_failure(log, exc, f"schedule {row['id']!r}: buffered tick failed")
        return fired

    async def _claim(self, row: dict[str, Any], now: int) -> bool:
        async def op(session: AsyncSession, tx: Tx) -> bool:
            return await store.claim(
                session, row["tenant"], row["id"], row["next_tick_us"], now, now + CLAIM_US
            )

        claimed: bool = await self._db.write(op)
        return claimed

    async def _fire_due(self, row: dict[str, Any], now: int) -> int:
        if not await self._claim(row, now):
            return 0  # another scanner has it, or it changed since the read
        first = row["next_tick_us"]
        due_ticks = [first]
        upcoming = first
        for tick in ticks_after(row, first):
            if tick + jitter_of(row, tick) > now:
                upcoming = tick
                break
            due_ticks.append(tick)
            if len(due_ticks) > 100_000:
                upcoming = next_tick(row, now)
                break
        chosen = _caught_up(row, due_ticks, now)
        skipped = len(due_ticks) - len(chosen)
        last_run_id, last_run_us = row["last_run_id"], row["last_run_us"]
        buffered = row["buffered_us"]
        fired = 0
        for tick in chosen:
            if row["overlap"] != OVERLAP_ALLOW_ALL and last_run_id:
                async with self._db.read() as session:
                    state = await store.run_state(session, row["kind"], last_run_id)
                if state and RunState(state) not in TERMINAL_STATES:
                    if row["overlap"] == OVERLAP_SKIP:
                        skipped += 1
                        continue
                    if row["overlap"] == OVERLAP_BUFFER_ONE:
                        if buffered:
                            skipped += 1
                        else:
                            buffered = tick
                        continue
                    await self._cancel(row, last_run_id)
            run_id, _ = await self._submit(row, tick_request_id(row["id"], tick), tick)
            last_run_id, last_run_us = run_id, tick
            fired += 1

        async def advance(session: AsyncSession, tx: Tx) -> bool:
            changed = await store.change(
                session,
                row["tenant"],
                row["id"],
                {
                    "next_tick_us": upcoming,
                    "due_us": upcoming + jitter_of(row, upcoming),
                    "claim_until_us": 0,
                    "last_run_id": last_run_id,
                    "last_run_us": last_run_us,
                    "buffered_us": buffered,
                    "skipped_ticks": row["skipped_ticks"] + skipped,
                },
                next_tick_us=first,
            )
            return changed

        if not await self._db.write(advance):
            log.info(
                "schedule changed while its tick fired; the change stands",
                extra={"schedule_id": row["id"]},
            )
        return fired

    async def _fire_buffered(self, row: dict[str, Any], now: int) -> int:
        async with self._db.read() as session:
            state = await store.run_state(session, row["kind"], row["last_run_id"])
        if state and RunState(state) not in TERMINAL_STATES:
            return 0
        if not await self._claim(row, now):
            return 0
        tick = row["buffered_us"]
        run_id, _ = await self._submit(row, tick_request_id(row["id"], tick), tick)

        async def op(session: AsyncSession, tx: Tx) -> bool:
            return await store.change(
                session,
                row["tenant"],
                row["id"],
                {
                    "claim_until_us": 0,
                    "buffered_us": 0,
                    "last_run_id": run_id,
                    "last_run_us": tick,
                },
                next_tick_us=row["next_tick_us"],
            )

        await self._db.write(op)
        return 1

    async def _cancel(self, row: dict[str, Any], run_id: str) -> None:
        reason = f"cancelled by schedule {row['id']} (overlap policy CANCEL_OTHER)"
        by = f"schedule:{row['id']}"
        try:
            if row["kind"] == "workflow":
                await self._jobs.cancel_workflow(row["tenant"], run_id, reason, by)
            else:
                await self._jobs.cancel_job(row["tenant"], run_id, reason, by)
        except (FailedPrecondition, NotFound):
            pass  # it ended meanwhile

    async def _submit(
        self, row: dict[str, Any], request_id: str, tick: int, manual: str = ""
    ) -> tuple[str, bool]:
        """Submit one run as the schedule's owner; the same request id finds
        the run an earlier attempt created."""
        sub = self._build(
            row["kind"], row["template"], request_id, _trigger(row["id"], tick, manual)
        )
        # The template passed the submit path's checks, approval.* keys
        # included, under the authority of whoever created or last updated
        # the schedule; its runs are submitted as the owner.
        caller = Caller(row["owner"], reviewer=True)
        try:
            if isinstance(sub, JobSubmission):
                job, dedup = await self._jobs.submit_job(row["tenant"], sub, caller)
                run_id = job.id
            else:
                workflow, dedup = await self._jobs.submit_workflow(row["tenant"], sub, caller)
                run_id = workflow.id
        except AlreadyExists as exc:
            # The tick was submitted before the schedule's template changed.
            existing = exc.metadata.get("existing_id")
            if not existing:
                raise
            return existing, True
        if not dedup:
            log.info(
                "schedule fired",
                extra={"schedule_id": row["id"], "run_id": run_id, "tick": iso(tick)},
            )
        return run_id, dedup


def _caught_up(row: dict[str, Any], ticks: list[int], now: int) -> list[int]:
    """The due ticks that still run under the catch-up policy."""
    on_time = [t for t in ticks if now - (t + jitter_of(row, t)) <= ON_TIME_US]
    window = row["catch_up_window_us"]
    policy = row["catch_up"]
    if policy == CATCH_UP_NONE:
        return on_time
    within = [t for t in ticks if not window or now - t <= window or t in on_time]
    if policy == CATCH_UP_LAST:
        return within[-1:]
    return within[-MAX_CATCH_UP:]


def _trigger(schedule_id: str, tick: int, manual: str = "") -> dict[str, Any]:
    attrs: dict[str, Any] = {
        "trigger.source": "schedule",
        "trigger.schedule_id": schedule_id,
    }
    if manual:
        attrs["trigger.reason"] = "triggered manually (TriggerSchedule)"
        attrs["trigger.actor.id"] = manual
    else:
        attrs["trigger.scheduled_time"] = iso(tick) if tick else iso(0)
    return attrs


def _settable(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if k not in ("tenant", "id")}


def _check_id(schedule_id: str) -> None:
    if not ID_RE.fullmatch(schedule_id):
        raise Invalid(
            [FieldViolation("schedule_id", "required: 1-128 characters of [A-Za-z0-9._-]")]
        )


def _not_found(schedule_id: str) -> DomainError:
    return NotFound(f"schedule {schedule_id!r} not found", reason="SCHEDULE_NOT_FOUND")
