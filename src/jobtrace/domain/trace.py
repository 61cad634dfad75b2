"""Trace rules: sequenced, idempotent appends; filtered cursor pages; resumable live streams."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession

from jobtrace.clock import now_us
from jobtrace.domain import redact as redact_rules
from jobtrace.domain.attest import off_loop_if_large, redact, redact_text
from jobtrace.domain.errors import (
    FailedPrecondition,
    FieldViolation,
    NotFound,
    ResourceExhausted,
    Unavailable,
    Violations,
    log_failure,
)
from jobtrace.domain.pagination import Encoder, PageTokens, fill, position
from jobtrace.domain.redact import Redaction
from jobtrace.domain.validation import check_page_size, check_text, check_view
from jobtrace.events.trace_bus import TraceBus
from jobtrace.ids import run_kind
from jobtrace.model import (
    Category,
    Failure,
    Level,
    RunState,
    TraceEvent,
    TraceType,
)
from jobtrace.store import jobs as job_store
from jobtrace.store import trace as store
from jobtrace.store.db import Database, Tx
from jobtrace.store.sql import Params, Query, Row
from jobtrace.store.trace import EventFilter

log = logging.getLogger(__name__)

E = TypeVar("E")

MAX_MESSAGE_BYTES = 10 * 1024
MAX_BLOB_BYTES = 64 * 1024
MAX_BATCH = 1000
# A replay or a fetch for live subscribers reads at most this many events,
# and this many stored bytes (one event whatever its size), at a time.
REPLAY_PAGE = 500
REPLAY_BYTES = 4 * 1024 * 1024
# What a caller may append: lifecycle events (STARTED, COMPLETED, FAILED) are
# the server's alone, written by the transitions they record, so no caller can
# make a run look finished or failed. UNSPECIFIED means LOG.
APPEND_TYPES = frozenset({TraceType.UNSPECIFIED, TraceType.LOG})
# The worker holding the job may also report PROGRESS events on its stream.
WORKER_TYPES = APPEND_TYPES | {TraceType.PROGRESS}
# display_priority, as the execution-log spec defines it: 1 is low, 10 high.
MAX_DISPLAY_PRIORITY = 10
DEFAULT_DISPLAY_PRIORITY = 5
# The server's own events: a run's or step's outcome (completed, failed for
# good, cancelled) first, then a start, a failed attempt that will be
# retried, technical warnings, and annotation notes last.
PRIORITY_OUTCOME = 9
PRIORITY_START = 7
PRIORITY_RETRY = 6
PRIORITY_TECHNICAL = 4
PRIORITY_NOTE = 3


@dataclass(frozen=True, slots=True)
class EventInput:
    """An event as submitted, with the serialised sizes of its free-form parts."""

    event: TraceEvent
    data_bytes: int = 0
    summary_bytes: int = 0


@dataclass(frozen=True, slots=True)
class RunStatus:
    run_id: str
    state: RunState
    # When the run started: a job's first attempt, a workflow's first step.
    started_us: int
    updated_us: int
    completed_us: int
    completed_actions: int
    total_actions: int
    service: str
    history_length: int
    failure: Failure | None
    # A standalone job's current (or last) attempt's start; 0 for a workflow.
    attempt_started_us: int = 0


@dataclass(frozen=True, slots=True)
class StreamItem:
    """One message of a trace stream: exactly one of event/final/keepalive_us."""

    cursor: str
    event: TraceEvent | None = None
    final: RunStatus | None = None
    keepalive_us: int = 0


def truncate_message(message: str) -> tuple[str, bool]:
    raw = message.encode()
    if len(raw) <= MAX_MESSAGE_BYTES:
        return message, False
    return raw[:MAX_MESSAGE_BYTES].decode(errors="ignore"), True


def check_event(
    v: Violations,
    field: str,
    e: TraceEvent,
    *,
    key_required: bool,
    allowed_types: frozenset[TraceType] = APPEND_TYPES,
) -> None:
    if key_required and not e.event_key:
        v.add(f"{field}.event_key", "required: a client-chosen key that makes retries idempotent")
    check_text(v, f"{field}.event_key", e.event_key, 256)
    check_text(v, f"{field}.node_id", e.node_id, 128)
    if len(e.user_message.encode()) > MAX_MESSAGE_BYTES:
        v.add(f"{field}.user_message", f"must be at most {MAX_MESSAGE_BYTES} bytes")
    for name, enum_type, value in (
        ("type", TraceType, e.type),
        ("level", Level, e.level),
        ("category", Category, e.category),
    ):
        if value not in enum_type.__members__.values():
            v.add(f"{field}.{name}", f"unknown value {int(value)}")
    if e.type in TraceType.__members__.values() and e.type not in allowed_types:
        kinds = " or ".join(t.name for t in sorted(allowed_types - {TraceType.UNSPECIFIED}))
        v.add(
            f"{field}.type",
            f"{TraceType(e.type).name} events are the server's own (it records each "
            f"lifecycle transition); callers append {kinds}",
        )
    if not 0 <= e.display_priority <= MAX_DISPLAY_PRIORITY:
        v.add(
            f"{field}.display_priority",
            f"must be between 1 (low) and {MAX_DISPLAY_PRIORITY} (high); 0 means "
            f"{DEFAULT_DISPLAY_PRIORITY}",
        )
    if not 0.0 <= e.percent <= 100.0:
        v.add(f"{field}.percent", "must be between 0 and 100")
    if e.step_number < 0 or e.total_steps < 0:
        v.add(f"{field}.step_number", "must not be negative")
    if e.error is not None:
        check_text(v, f"{field}.error.message", e.error.message, MAX_MESSAGE_BYTES)
        check_text(v, f"{field}.error.code", e.error.code, 128)
        check_text(v, f"{field}.error.details", e.error.details, MAX_BLOB_BYTES)
        check_text(v, f"{field}.error.stack", e.error.stack, MAX_BLOB_BYTES)


def check_sizes(field: str, inputs: list[EventInput]) -> None:
    too_big = [
        FieldViolation(f"{field}[{i}].{name}", f"must be at most {MAX_BLOB_BYTES} bytes")
        for i, item in enumerate(inputs)
        for name, size in (("data", item.data_bytes), ("output_summary", item.summary_bytes))
        if size > MAX_BLOB_BYTES
    ]
    if too_big:
        error = ResourceExhausted(
            "; ".join(f"{v.field}: {v.description}" for v in too_big), reason="EVENT_TOO_LARGE"
        )
        error.violations = too_big  # type: ignore[attr-defined]
        raise error


def _evidence_of(e: TraceEvent) -> list[Any]:
    """What of an event is caller text or data (what redaction reads)."""
    parts: list[Any] = [e.message, e.user_message, e.output_summary, e.data]
    if e.error is not None:
        parts += [e.error.message, e.error.details, e.error.stack]
    return parts


def redact_event(e: TraceEvent, r: Redaction) -> TraceEvent:
    """`e` with its credentials redacted (see attest.redact): message, user
    message, error, output summary and data."""
    if not r.active:
        return e
    error = e.error
    if error is not None:
        clean = replace(
            error,
            message=redact_text(error.message, r),
            details=redact_text(error.details, r),
            stack=redact_text(error.stack, r),
        )
        error = error if clean == error else clean
    message = redact_text(e.message, r)
    user_message = redact_text(e.user_message, r)
    summary = None if e.output_summary is None else redact(e.output_summary, r)
    data = None if e.data is None else redact(e.data, r)
    if (
        error is e.error
        and message == e.message
        and user_message == e.user_message
        and summary == e.output_summary
        and data == e.data
    ):
        return e  # nothing to redact (most events): no copy
    return replace(
        e,
        message=message,
        user_message=user_message,
        error=error,
        output_summary=summary,
        data=data,
    )


def _redact_events(events: list[TraceEvent], r: Redaction) -> list[TraceEvent]:
    return [redact_event(e, r) for e in events]


def normalize(e: TraceEvent, now: int, seq: int, tenant: str) -> TraceEvent:
    """The event as stored: defaults filled in, its message bounded, numbered."""
    message, truncated = truncate_message(e.message)
    return replace(
        e,
        seq=seq,
        tenant=tenant,
        type=e.type or TraceType.LOG,
        level=e.level or Level.INFO,
        category=e.category or Category.TECHNICAL,
        ts_us=e.ts_us or now,
        message=message,
        truncated=truncated or e.truncated,
        display_priority=e.display_priority or DEFAULT_DISPLAY_PRIORITY,
        created_us=now,
    )


def run_ended(run_id: str, state: RunState) -> FailedPrecondition:
    """The refusal of an event for a run that has ended: readers already have
    its final status, so an event after it would never reach them."""
    return FailedPrecondition(
        f"run {run_id!r} has ended ({state.name}); it takes no more events",
        reason="RUN_ENDED",
        metadata={"run_id": run_id, "state": state.name},
    )


def _reply(run_id: str, events: list[TraceEvent], out: Encoder[TraceEvent, E]) -> list[E]:
    """The events as `out` encodes them, or RESOURCE_EXHAUSTED if together
    they are more than a response may carry."""
    encoded: list[E] = []
    total = 0
    for e in events:
        message, size = out.encode(e)
        encoded.append(message)
        total += size
    if total > out.ceiling:
        raise ResourceExhausted(
            f"the reply to this append would be {total} bytes, more than a response may "
            f"carry ({out.ceiling}), so nothing was stored: append these {len(events)} "
            "events in smaller calls",
            reason="REPLY_TOO_LARGE",
            metadata={
                "run_id": run_id,
                "events": str(len(events)),
                "bytes": str(total),
                "limit": str(out.ceiling),
            },
        )
    return encoded


class Trace:
    def __init__(
        self,
        db: Database,
        tokens: PageTokens,
        *,
        retention_s: float = 30 * 86400,
        keepalive_s: float = 15.0,
        redaction: Redaction = redact_rules.DEFAULT,
    ) -> None:
        self._db = db
        # What every stored event, and every annotation, is redacted with.
        self.redaction = redaction
        self._tokens = tokens
        self.bus = TraceBus()
        self.retention_s = retention_s
        self.keepalive_s = keepalive_s
        self.stopping = asyncio.Event()
        self._sweeper: asyncio.Task[None] | None = None
        self._fetching: dict[str, asyncio.Task[None]] = {}
        self._fetch_again: set[str] = set()
        # Events stored by this replica, and sent on its live streams (metrics).
        self.events_appended = 0
        self.events_delivered = 0
        # Live streams that went back to the database (a gap, an overflow of
        # their buffer, a lost notice): each costs a few reads (metrics).
        self.stream_catchups = 0

    # --- writing (inside other transactions too) -------------------------------

    async def record(
        self,
        session: AsyncSession,
        tx: Tx,
        tenant: str,
        events: list[TraceEvent],
        also: Sequence[tuple[Query, Params]] = (),
    ) -> list[TraceEvent]:
        """Store events with their run's next sequence numbers, in this transaction;
        publish them to live streams once it commits. `also` (events of one
        run): writes of other tables, in the same statement where the backend
        allows (see store.trace.store_events)."""
        if not events:
            assert not also, "writes ride with events: with none, run them yourself"
            return []
        # Redacted before anything is stored or published: off the event loop
        # when the batch is large (see attest.INLINE_EVIDENCE).
        events = await off_loop_if_large(
            [_evidence_of(e) for e in events], _redact_events, events, self.redaction
        )
        now = now_us()
        stored: list[TraceEvent] = []
        by_run: dict[str, list[TraceEvent]] = {}
        for e in events:
            by_run.setdefault(e.run_id, []).append(e)
        assert not also or len(by_run) == 1, "writes ride with the events of one run"
        for run_id, items in by_run.items():
            numbered = await store.store_events(
                session, run_id, tenant, [normalize(e, now, 0, tenant) for e in items], also
            )
            tx.on_commit(lambda r=run_id, n=numbered: self._committed(r, n))  # type: ignore[misc]
            tx.notify({"k": "trace", "run": run_id})
            stored += numbered
        return stored

    async def record_after_update(
        self,
        session: AsyncSession,
        tx: Tx,
        tenant: str,
        events: list[TraceEvent],
        update: tuple[Query, Params],
        also: Sequence[tuple[Query, Params]] = (),
    ) -> Row | None:
        """Run `update` (an UPDATE of one job RETURNING *, a transition) and,
        if it matched, record these events of one run (as `record` does, with
        the job's traceparent) in the same statement where the backend allows:
        the job's row as updated, or None with nothing changed."""
        events = await off_loop_if_large(
            [_evidence_of(e) for e in events], _redact_events, events, self.redaction
        )
        now = now_us()
        run_id = events[0].run_id
        assert all(e.run_id == run_id for e in events), "events of one run"
        row, numbered = await store.update_and_store_events(
            session, update, run_id, tenant, [normalize(e, now, 0, tenant) for e in events], also
        )
        if row is not None:
            tx.on_commit(lambda: self._committed(run_id, numbered))
            tx.notify({"k": "trace", "run": run_id})
        return row

    async def record_after_update_many(
        self,
        session: AsyncSession,
        update: tuple[Query, Params],
        items: Sequence[tuple[Tx, str, TraceEvent]],
        also: Sequence[tuple[Query, Params]] = (),
    ) -> dict[str, Row]:
        """Run `update` (an UPDATE of several jobs RETURNING at least their id
        and traceparent) and record, for
        each job it matched, that job's event (items: the writing operation's
        Tx, the tenant and the event, one per job, named by its job_id), as
        record_after_update does for one job, in three statements for all:
        the rows as updated by job id; a job it did not match has nothing
        changed and nothing recorded. `also`: INSERTs to run too, as
        store.trace.update_many_and_store_events runs them."""
        events = await off_loop_if_large(
            [_evidence_of(e) for _, _, e in items],
            _redact_events,
            [e for _, _, e in items],
            self.redaction,
        )
        now = now_us()
        normalized = [
            normalize(e, now, 0, tenant) for (_, tenant, _), e in zip(items, events, strict=True)
        ]
        rows, numbered = await store.update_many_and_store_events(session, update, normalized, also)
        stored = {e.job_id: e for e in numbered}
        for tx, _, event in items:
            done = stored.get(event.job_id)
            if done is not None:
                tx.on_commit(lambda d=done: self._committed(d.run_id, [d]))  # type: ignore[misc]
                tx.notify({"k": "trace", "run": done.run_id})
        return rows

    def _committed(self, run_id: str, events: list[TraceEvent]) -> None:
        self.events_appended += len(events)
        self.bus.publish(run_id, events)

    def remote_events(self, run_id: str) -> None:
        """Another replica stored events of this run. One read per run (not one
        per subscriber) brings them here; they are published locally in
        sequence order, and a subscriber that sees a gap still reads for itself."""
        if not self.bus.watched(run_id):
            return
        if run_id in self._fetching:
            self._fetch_again.add(run_id)
            return
        self._fetching[run_id] = asyncio.create_task(self._fetch_remote(run_id))

    async def _fetch_remote(self, run_id: str) -> None:
        try:
            while True:
                self._fetch_again.discard(run_id)
                after = self.bus.high_water.get(run_id) or None
                if after is None:
                    # Nothing published here yet: read from where the furthest-behind
                    # live subscriber is (one read for all of them; each drops what
                    # it already has), not one catch-up read per subscriber.
                    after = self.bus.lowest_position(run_id)
                if after is None:
                    # No subscriber is live yet: they catch up by themselves once;
                    # later events are fetched after this point.
                    async with self._db.read() as session:
                        upto = await store.last_sequence(session, run_id)
                    if not self.bus.watched(run_id):
                        return
                    self.bus.high_water[run_id] = max(self.bus.high_water.get(run_id, 0), upto)
                    self.bus.poke(run_id)
                    if run_id not in self._fetch_again:
                        return
                    continue
                async with self._db.read() as session:
                    chunk = await store.read_events(
                        session,
                        run_id,
                        after,
                        EventFilter(),
                        limit=REPLAY_PAGE,
                        max_bytes=REPLAY_BYTES,
                    )
                self.bus.publish(run_id, chunk.items)
                if chunk.exhausted and run_id not in self._fetch_again:
                    return
        except Exception as exc:
            log_failure(
                log, exc, "fetching remote events of %s failed; subscribers catch up", run_id
            )
            self.bus.poke(run_id)
        finally:
            self._fetching.pop(run_id, None)

    def run_ended(self, tx: Tx, run_id: str) -> None:
        tx.on_commit(lambda: self.bus.publish(run_id, [], run_ended=True))
        tx.notify({"k": "end", "run": run_id})

    # --- TraceService -----------------------------------------------------------

    async def append(
        self,
        scope: str | None,
        run_id: str,
        inputs: list[EventInput],
        out: Encoder[TraceEvent, E],
        *,
        recorded_by: str,
    ) -> list[E]:
        """Store the events not stored yet (by event_key) and return every one
        as stored, as `out` encodes them. The reply holds each event whole, a
        stored one too (which a retry with the same key may name, whatever
        the retry's own event holds): an append whose reply would be larger
        than `out.ceiling` is refused before anything is stored, so no
        stored events are ever answered by an error, on every retry."""
        v = Violations()
        if not run_id:
            v.add("run_id", "required")
        if not inputs:
            v.add("events", "required: 1 to 1000 events")
        elif len(inputs) > MAX_BATCH:
            v.add("events", f"at most {MAX_BATCH} events per call (got {len(inputs)})")
        for i, item in enumerate(inputs[:MAX_BATCH]):
            check_event(v, f"events[{i}]", item.event, key_required=True)
        v.raise_if_any()
        check_sizes("events", inputs)

        async def op(session: AsyncSession, tx: Tx) -> list[E]:
            # Under the run's row lock: the transition that ends a run takes the
            # same lock, so it cannot commit between this check and these events.
            tenant, traceparent, state = await self._run_owner(
                session, scope, run_id, lock=True, traceparent=True
            )
            events = [
                replace(i.event, run_id=run_id, traceparent=traceparent, recorded_by=recorded_by)
                for i in inputs
            ]
            fresh, existing = await self.unseen(session, run_id, events)
            if fresh and state.terminal:
                # Readers already have the final status; a retry of an append
                # stored before the end still gets its events back.
                raise run_ended(run_id, state)
            for e in await self.record(session, tx, tenant, fresh):
                existing[e.event_key] = e
            # Raising here rolls back this operation alone (the group commit
            # isolates it): nothing of a refused append is stored.
            return _reply(run_id, [existing[e.event_key] for e in events], out)

        return await self._db.write(op)

    async def unseen(
        self, session: AsyncSession, run_id: str, events: list[TraceEvent]
    ) -> tuple[list[TraceEvent], dict[str, TraceEvent]]:
        """The events not stored yet, and the stored events of the keys given.
        Each event_key is stored once, so a retried append or a resent worker
        report stores nothing twice; an event without a key is always new."""
        keys = [e.event_key for e in events if e.event_key]
        existing = await store.events_by_key(session, run_id, keys) if keys else {}
        seen = set(existing)
        fresh = []
        for e in events:
            if e.event_key:
                if e.event_key in seen:
                    continue
                seen.add(e.event_key)
            fresh.append(e)
        return fresh, existing

    async def require_run(self, session: AsyncSession, tenant: str | None, run_id: str) -> str:
        """The run's tenant, if it exists and `tenant` (None: any) may see it."""
        owner, _, _ = await self._run_owner(session, tenant, run_id)
        return owner

    async def locked_run(
        self, session: AsyncSession, tenant: str | None, run_id: str
    ) -> tuple[str, str, RunState]:
        """(tenant, traceparent, state) of a run read under its row lock, so that
        no transition that ends it can commit before this transaction does."""
        return await self._run_owner(session, tenant, run_id, lock=True, traceparent=True)

    async def _run_owner(
        self,
        session: AsyncSession,
        tenant: str | None,
        run_id: str,
        *,
        lock: bool = False,
        traceparent: bool = False,
    ) -> tuple[str, str, RunState]:
        """(tenant, traceparent, state) of a run that exists and `tenant` may see.
        With `lock`, read under the row lock of the job or workflow (PostgreSQL;
        SQLite's one writer needs none), taken in the order transitions take it.
        A workflow's traceparent costs a query: it is read only when asked for."""
        kind = run_kind(run_id)
        if kind == "job":
            job = await job_store.get_job(session, run_id, tenant, for_update=lock)
            if job is not None and job.workflow_id:
                raise NotFound(
                    f"job {run_id!r} is a step of workflow {job.workflow_id!r}; "
                    "its run id is the workflow id",
                    reason="RUN_NOT_FOUND",
                    metadata={"run_id": run_id, "workflow_id": job.workflow_id},
                )
            if job is not None:
                return job.tenant, job.traceparent, job.state
        elif kind == "workflow":
            if lock:
                await job_store.lock_workflow(session, run_id)
            row = await job_store.get_workflow_row(session, run_id, tenant)
            if row is not None:
                parent = (
                    await job_store.workflow_traceparent(session, run_id) if traceparent else ""
                )
                return row.tenant, parent, RunState(row.state)
        raise NotFound(
            f"run {run_id!r} not found", reason="RUN_NOT_FOUND", metadata={"run_id": run_id}
        )

    def _cursor(self, run_id: str, seq: int) -> str:
        return self._tokens.encode(f"trace:{run_id}", {}, seq) if seq else ""

    def _after(self, v: Violations, run_id: str, cursor: str) -> int:
        return position(
            self._tokens,
            v,
            "cursor",
            cursor,
            f"trace:{run_id}",
            {},
            "malformed cursor, or one of another run",
        )

    async def list(
        self,
        tenant: str | None,
        run_id: str,
        cursor: str,
        flt: EventFilter,
        page_size: int,
        *,
        view: int,
        out: Encoder[TraceEvent, Any],
    ) -> tuple[list[Any], str, bool]:
        """One page of events after the cursor, as `out` encodes them; the
        cursor after its last event; whether more follow."""
        v = Violations()
        if not run_id:
            v.add("run_id", "required")
        limit = check_page_size(v, "page_size", page_size)
        full = check_view(v, "view", view)
        after = self._after(v, run_id, cursor)
        _check_filter(v, flt)
        v.raise_if_any()
        async with self._db.read() as session:
            await self.require_run(session, tenant, run_id)
            filled = await fill(
                lambda start, n, max_bytes: store.read_events(
                    session, run_id, start or 0, flt, limit=n, max_bytes=max_bytes, full=full
                ),
                start=after,
                count=limit,
                out=out,
                position=lambda e: e.seq,
                name=lambda e: f"event {run_id}:{e.seq}",
            )
        last = filled.last if filled.last is not None else after
        return filled.items, self._cursor(run_id, last), filled.more

    async def run_status(self, tenant: str | None, run_id: str) -> RunStatus:
        v = Violations()
        if not run_id:
            v.add("run_id", "required")
        v.raise_if_any()
        async with self._db.read() as session:
            return await self._status(session, tenant, run_id)

    async def status_in(self, session: AsyncSession, tenant: str | None, run_id: str) -> RunStatus:
        """The status of a run `tenant` (None: any) may see, read in this
        session (with other reads of the same snapshot); NOT_FOUND otherwise."""
        return await self._status(session, tenant, run_id)

    async def _status(self, session: AsyncSession, tenant: str | None, run_id: str) -> RunStatus:
        await self.require_run(session, tenant, run_id)
        history = await store.history_length(session, run_id)
        if run_kind(run_id) == "job":
            job = await job_store.get_job(session, run_id, tenant)
            assert job is not None
            return RunStatus(
                run_id=run_id,
                state=_run_state(job.state, job.attempt),
                started_us=job.first_started_us,
                attempt_started_us=job.started_us,
                updated_us=job.updated_us,
                completed_us=job.completed_us,
                completed_actions=1 if job.state == RunState.COMPLETED else 0,
                total_actions=1,
                service=job.spec.service,
                history_length=history,
                failure=job.failure if job.state in _FAILED else None,
            )
        workflow = await job_store.get_workflow(session, run_id, tenant)
        assert workflow is not None
        return RunStatus(
            run_id=run_id,
            state=workflow.state,
            started_us=workflow.started_us,
            updated_us=workflow.updated_us,
            completed_us=workflow.completed_us,
            completed_actions=workflow.completed_steps,
            total_actions=len(workflow.steps),
            service="",
            history_length=history,
            failure=workflow.failure if workflow.state in _FAILED else None,
        )

    async def stream(
        self, tenant: str | None, run_id: str, cursor: str, flt: EventFilter, follow: bool
    ) -> AsyncIterator[StreamItem]:
        """Replay after the cursor, then follow live. The subscription is bound
        before the first read, and live events already replayed are dropped by
        sequence, so nothing falls between replay and live."""
        v = Violations()
        if not run_id:
            v.add("run_id", "required")
        last = self._after(v, run_id, cursor)
        _check_filter(v, flt)
        v.raise_if_any()
        with self.bus.subscribe(run_id) as sub:
            while True:
                # Catch up from the database: replay, or recovery after a gap or
                # an overflow of the live buffer.
                if sub.position is not None:
                    self.stream_catchups += 1
                async with self._db.read() as session:
                    status = await self._status(session, tenant, run_id)
                    upto = await store.last_sequence(session, run_id)
                while last < upto:
                    async with self._db.read() as session:
                        chunk = await store.read_events(
                            session, run_id, last, flt, limit=REPLAY_PAGE, max_bytes=REPLAY_BYTES
                        )
                    for e in chunk.items:
                        if e.seq > upto:
                            break
                        self.events_delivered += 1
                        yield StreamItem(self._cursor(run_id, e.seq), event=e)
                    if chunk.exhausted or chunk.after is None or chunk.after >= upto:
                        last = upto
                    else:
                        last = chunk.after
                if status.state.terminal:
                    yield StreamItem(self._cursor(run_id, last), final=status)
                    return
                if not follow:
                    return
                # Follow live, pushed.
                sub.position = last
                while True:
                    woke = await self._wait(sub.wakeup)
                    if self.stopping.is_set():
                        # Not an empty OK: the run goes on, the reader must resume.
                        raise Unavailable(
                            "server shutting down; resume from your cursor",
                            reason="SHUTTING_DOWN",
                            metadata={"run_id": run_id, "cursor": self._cursor(run_id, last)},
                        )
                    if not woke:
                        yield StreamItem(self._cursor(run_id, last), keepalive_us=now_us())
                        continue
                    events, overflowed = sub.take()
                    if overflowed or sub.run_ended:
                        break
                    gap = False
                    for e in events:
                        if e.seq <= last:
                            continue  # already sent by the replay
                        if e.seq != last + 1:
                            gap = True  # missed something: read it from the database
                            break
                        last = e.seq
                        if flt.matches(e):
                            self.events_delivered += 1
                            yield StreamItem(self._cursor(run_id, e.seq), event=e)
                        sub.position = last
                    if gap:
                        break

    async def _wait(self, wakeup: asyncio.Event) -> bool:
        """True when woken, False after the keepalive interval (or on stop)."""
        if wakeup.is_set():
            return True
        stop = asyncio.ensure_future(self.stopping.wait())
        woke = asyncio.ensure_future(wakeup.wait())
        try:
            done, _ = await asyncio.wait(
                {stop, woke}, timeout=self.keepalive_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            stop.cancel()
            woke.cancel()
        return woke in done

    # --- retention -----------------------------------------------------------------

    def start(self, sweep_every_s: float = 60.0) -> None:
        self._sweeper = asyncio.create_task(self._sweep_loop(sweep_every_s), name="trace-sweep")

    async def stop(self) -> None:
        self.stopping.set()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None

    async def _sweep_loop(self, every_s: float) -> None:
        while True:
            try:
                await self.sweep_once()
            except Exception as exc:
                log_failure(log, exc, "trace retention sweep failed; retrying later")
            await asyncio.sleep(every_s)

    async def sweep_once(self, batch: int = 1000) -> int:
        """Delete expired events in small batches, each its own short write, so
        writers are never blocked behind one long delete."""
        cutoff = now_us() - int(self.retention_s * 1_000_000)
        total = 0
        while True:

            async def op(session: AsyncSession, tx: Tx) -> int:
                return await store.delete_older_than(session, cutoff, batch)

            deleted = await self._db.write(op)
            total += deleted
            if deleted < batch:
                return total


_FAILED = frozenset({RunState.FAILED, RunState.TIMED_OUT, RunState.TERMINATED, RunState.CANCELLED})


def _run_state(job_state: RunState, attempt: int) -> RunState:
    """A standalone job's state as its run's: once an attempt has started, the
    run stays RUNNING while the job waits (QUEUED) for its next attempt."""
    if job_state == RunState.QUEUED and attempt > 0:
        return RunState.RUNNING
    return job_state


def _check_filter(v: Violations, flt: EventFilter) -> None:
    if flt.min_level not in Level.__members__.values():
        v.add("min_level", f"unknown level {flt.min_level}")
    if flt.category not in Category.__members__.values():
        v.add("category", f"unknown category {flt.category}")
    if flt.type not in TraceType.__members__.values():
        v.add("type", f"unknown type {flt.type}")
    if flt.since_us and flt.until_us and flt.until_us <= flt.since_us:
        v.add("until", "must be after since")
    if not 0 <= flt.min_display_priority <= MAX_DISPLAY_PRIORITY:
        v.add(
            "min_display_priority",
            f"must be between 1 (low) and {MAX_DISPLAY_PRIORITY} (high), or 0 for no filter "
            f"(got {flt.min_display_priority})",
        )
