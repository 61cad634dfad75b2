"""Worker sessions, push dispatch, leases, heartbeats and supervision."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter, deque
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from jobtrace.clock import now_us
from jobtrace.domain import annotations as annotation_rules
from jobtrace.domain import lifecycle
from jobtrace.domain.errors import (
    AlreadyExists,
    DomainError,
    FailedPrecondition,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    StaleAttempt,
    Violations,
    log_failure,
)
from jobtrace.domain.jobs import Jobs
from jobtrace.domain.trace import WORKER_TYPES, EventInput, check_event, check_sizes
from jobtrace.domain.validation import (
    MAX_CONCURRENCY,
    MAX_WORKER_AFFINITY_KEYS,
    SERVICE_RE,
    check_affinity,
    check_id,
    check_labels,
    check_size,
    check_text,
)
from jobtrace.domain.worker_identity import WorkerIdentity
from jobtrace.ids import new_id
from jobtrace.model import (
    JSON,
    AnnotationInput,
    AnnotationScope,
    Failure,
    Job,
    RunState,
)
from jobtrace.store import jobs as store
from jobtrace.store.db import Database, Tx
from jobtrace.store.errors import is_transient

log = logging.getLogger(__name__)

OUTBOX_HIGH_WATER = 1024
MAX_ATTEMPT_ANNOTATIONS = 1000
# Giving back a lost stream's leases while storage fails: retried this often.
GIVE_BACK_RETRY_INITIAL_S = 0.1
GIVE_BACK_RETRY_MAX_S = 2.0


# --- messages to a worker (the api turns them into ConnectResponse) -----------


@dataclass(frozen=True, slots=True)
class Welcome:
    session_id: str
    heartbeat_ms: int
    lease_ms: int
    resumed: list[tuple[str, int]]
    revoked: list[tuple[str, int]]


@dataclass(frozen=True, slots=True)
class Assign:
    job: Job
    lease_deadline_us: int
    request_context: JSON


@dataclass(frozen=True, slots=True)
class Cancel:
    job_id: str
    attempt: int
    reason: str


@dataclass(frozen=True, slots=True)
class Acked:
    message_id: int
    job_id: str
    attempt: int


@dataclass(frozen=True, slots=True)
class HeartbeatAcked:
    message_id: int
    lease_deadline_us: int
    cancels: list[Cancel]


@dataclass(frozen=True, slots=True)
class Refused:
    message_id: int
    kind: str
    job_id: str
    attempt: int
    error: DomainError
    fatal: bool = False


@dataclass(frozen=True, slots=True)
class Drained:
    reason: str
    grace_ms: int


Outgoing = Welcome | Assign | Cancel | Acked | HeartbeatAcked | Refused | Drained


@dataclass(frozen=True, slots=True)
class _Claim:
    """A claim of one attempt of a job for one session, whose worker was not told."""

    job_id: str
    attempt: int
    session: WorkerSession


@dataclass(frozen=True, slots=True)
class Hello:
    identity: WorkerIdentity
    services: tuple[str, ...]
    max_concurrency: int
    labels: dict[str, str]
    affinity_keys: tuple[str, ...]
    running: tuple[tuple[str, int], ...] = ()
    allowed_services: frozenset[str] | None = None  # None: any
    allowed_tenants: frozenset[str] | None = None  # None: any

    @property
    def worker_id(self) -> str:
        return self.identity.name


@dataclass(eq=False)
class WorkerSession:
    """One connected worker stream on this replica."""

    identity: WorkerIdentity
    session_id: str
    services: frozenset[str]
    max_concurrency: int
    affinity_keys: frozenset[str]
    labels: dict[str, str]
    tenants: frozenset[str] | None = None  # whose jobs it may run; None: any
    held: dict[str, int] = field(default_factory=dict)  # job id -> attempt
    # Claims for this session that its worker has not been told of and that may
    # be stored (Scheduler._unsettled): their slots stay taken until settled.
    claiming: dict[str, int] = field(default_factory=dict)  # job id -> attempt
    last_heartbeat_us: int = 0
    draining: bool = False
    closed: bool = False
    close_reason: str = ""
    # Hello has taken over the leases it resumes (an older session of the same
    # worker may give back the rest).
    resumed: bool = False
    # Who holds this session's leases (WorkerIdentity.holder; the key of
    # Scheduler.sessions), and the worker's name (jobs, events and logs show it).
    holder: str = field(init=False)
    worker_id: str = field(init=False)
    _outbox: deque[Outgoing | None] = field(default_factory=deque)
    _ready: asyncio.Event = field(default_factory=asyncio.Event)
    _space: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.holder = self.identity.holder
        self.worker_id = self.identity.name

    @property
    def free_slots(self) -> int:
        if self.closed or self.draining:
            return 0
        return max(0, self.max_concurrency - len(self.held) - len(self.claiming))

    def send(self, message: Outgoing) -> None:
        if not self.closed:
            self._outbox.append(message)
            self._ready.set()

    async def send_reply(self, message: Outgoing) -> None:
        """Replies wait while the worker is not reading (backpressure on its reports)."""
        while len(self._outbox) >= OUTBOX_HIGH_WATER and not self.closed:
            self._space.clear()
            await self._space.wait()
        self.send(message)

    def close(self, reason: str) -> None:
        if not self.closed:
            self.closed = True
            self.close_reason = reason
            self._outbox.append(None)
            self._ready.set()
            self._space.set()

    async def next_outgoing(self) -> Outgoing | None:
        """The next message to write; None once the session is closed and flushed."""
        while not self._outbox:
            self._ready.clear()
            await self._ready.wait()
        message = self._outbox.popleft()
        if len(self._outbox) < OUTBOX_HIGH_WATER:
            self._space.set()
        return message


async def _fenced(
    db: AsyncSession, session: WorkerSession, job_id: str, attempt: int, kind: str
) -> Job:
    """The job a session's report is about, read under its lock and fenced."""
    job = await store.load_locked(db, job_id)
    return fence(job, job_id, session.holder, attempt, kind, session.tenants)


def fence(
    job: Job | None,
    job_id: str,
    holder: str,
    attempt: int,
    kind: str,
    tenants: frozenset[str] | None = None,
) -> Job:
    """The job a report is about, if the reporter holds its current lease. A job
    of a tenant the worker may not serve does not exist for it (nothing about
    it, not even its attempt, is told)."""
    if job is None or (tenants is not None and job.tenant not in tenants):
        raise NotFound(f"unknown job {job_id!r}", reason="UNKNOWN_JOB", metadata={"job_id": job_id})
    meta = {"job_id": job_id, "attempt": str(attempt), "current_attempt": str(job.attempt)}
    if attempt < job.attempt:
        raise StaleAttempt(
            f"attempt {attempt} of job {job_id!r} is stale (current attempt {job.attempt})",
            metadata=meta,
        )
    if attempt > job.attempt:
        raise FailedPrecondition(
            f"job {job_id!r} has no attempt {attempt}", reason="UNKNOWN_ATTEMPT", metadata=meta
        )
    if job.lease_holder != holder:
        raise PermissionDenied(
            f"job {job_id!r} is leased to another worker", reason="NOT_LEASE_HOLDER", metadata=meta
        )
    if job.state == RunState.COMPLETED and kind in {"complete", "fail"}:
        raise AlreadyExists(
            f"job {job_id!r} attempt {attempt} already completed",
            reason="DUPLICATE_REPORT",
            metadata=meta,
        )
    if job.state.terminal:
        raise FailedPrecondition(
            f"job {job_id!r} already ended {job.state.name}",
            reason="JOB_TERMINAL",
            metadata={**meta, "state": job.state.name},
        )
    if job.state != RunState.RUNNING:
        raise FailedPrecondition(
            f"the lease of job {job_id!r} attempt {attempt} was lost",
            reason="LEASE_LOST",
            metadata=meta,
        )
    return job


class Scheduler:
    """Dispatches eligible jobs to connected workers and supervises leases."""

    def __init__(
        self,
        db: Database,
        jobs: Jobs,
        life: lifecycle.Lifecycle,
        *,
        lease_ms: int,
        heartbeat_ms: int,
        reconnect_grace_ms: int | None = None,
    ) -> None:
        self._db = db
        self._jobs = jobs
        self._life = life
        self.lease_ms = lease_ms
        self.heartbeat_ms = heartbeat_ms
        # How long a lost stream's leases wait for the worker to come back:
        # one heartbeat interval unless told, never beyond the lease.
        grace = heartbeat_ms if reconnect_grace_ms is None else reconnect_grace_ms
        self.reconnect_grace_ms = max(0, min(grace, lease_ms))
        # Connected sessions by holder (WorkerIdentity.holder).
        self.sessions: dict[str, WorkerSession] = {}
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._draining = False
        # Lost sessions' leases waiting for their worker or their grace.
        self._give_backs: set[asyncio.Task[None]] = set()
        # Set (and replaced) each time a session has resumed its leases or ended.
        self._session_changes = asyncio.Event()
        # Claims that may be stored although their worker was not told (their
        # commit went unanswered, or their stream ended as they committed), by
        # job id: settled (see _settle_claims) before anything else is dispatched.
        self._unsettled: dict[str, _Claim] = {}
        # Leases lost (deadline passed or stream ended), by service (metrics).
        self.lease_expiries: Counter[str] = Counter()
        jobs.add_listener(self._on_jobs_changed)

    # --- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._dispatch_loop(), name="jobtrace-dispatch"),
            asyncio.create_task(self._supervise_loop(), name="jobtrace-supervise"),
        ]

    async def drain(self, grace_ms: int) -> None:
        """Shutdown: tell every worker, end their streams, keep their leases."""
        self._draining = True
        for session in list(self.sessions.values()):
            session.send(Drained("server shutting down", grace_ms))
            session.close("server shutting down")
        # Leases waiting for their worker are kept too: after a restart they
        # expire, unless the worker resumes them.
        for task in [*self._tasks, *self._give_backs]:
            task.cancel()
        for task in [*self._tasks, *self._give_backs]:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    def wake(self) -> None:
        self._wake.set()

    # --- sessions ----------------------------------------------------------

    async def open_session(self, hello: Hello) -> tuple[WorkerSession, Welcome]:
        v = Violations()
        if not hello.identity.worker_id:
            v.add("hello.worker_id", "required")
        # The name the job records (subject/worker id) fits its column.
        check_text(v, "hello.worker_id", hello.worker_id, 128)
        if not hello.services:
            v.add("hello.services", "required: at least one service")
        elif len(hello.services) > 256:
            v.add("hello.services", "at most 256 services")
        for i, service in enumerate(hello.services):
            if not SERVICE_RE.fullmatch(service):
                v.add(f"hello.services[{i}]", "must be 1-128 characters of [A-Za-z0-9._:/-]")
            elif hello.allowed_services is not None and service not in hello.allowed_services:
                v.add(f"hello.services[{i}]", f"this worker may not serve {service!r}")
        if not 0 <= hello.max_concurrency <= MAX_CONCURRENCY:
            v.add("hello.max_concurrency", f"must be between 1 and {MAX_CONCURRENCY} (0 means 1)")
        check_labels(v, "hello.labels", hello.labels, free_keys=True)
        check_affinity(v, "hello.affinity_keys", hello.affinity_keys, MAX_WORKER_AFFINITY_KEYS)
        _check_running(v, "hello.running", hello.running)
        v.raise_if_any()
        if self._draining:
            raise FailedPrecondition("server is shutting down", reason="DRAINING")

        running = dict(hello.running)
        session = WorkerSession(
            identity=hello.identity,
            session_id=new_id("ses"),
            services=frozenset(hello.services),
            max_concurrency=hello.max_concurrency or 1,
            affinity_keys=frozenset(hello.affinity_keys),
            labels=dict(hello.labels),
            tenants=hello.allowed_tenants,
            last_heartbeat_us=now_us(),
            # The claimed jobs take their slots while their leases are checked.
            held=dict(running),
        )
        # The new stream takes over before anything is awaited: once the old
        # one is closed, its end must find it replaced and keep the leases this
        # hello resumes (a proxy may keep a dead stream open meanwhile).
        # Only the same tenant, subject and worker id is the same worker.
        previous = self.sessions.get(session.holder)
        self.sessions[session.holder] = session
        if previous is not None:
            previous.close("replaced by a new session of the same worker")
        try:
            resumed, revoked = await self._resume(session, running)
        except BaseException:
            session.close("hello failed")
            await self.close_session(session, lost=True)
            raise
        # An older stream's leases that this hello did not resume are not
        # running anywhere: they need not wait out its grace.
        session.resumed = True
        self._sessions_changed()
        self.wake()
        log.info(
            "worker connected",
            extra={
                "worker_id": session.worker_id,
                "session_id": session.session_id,
                "services": sorted(session.services),
                "max_concurrency": session.max_concurrency,
                "resumed": len(resumed),
            },
        )
        welcome = Welcome(session.session_id, self.heartbeat_ms, self.lease_ms, resumed, revoked)
        return session, welcome

    async def _resume(
        self, session: WorkerSession, running: dict[str, int]
    ) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
        """Take over the leases hello claims that this worker still holds (the
        new session becomes their holder, in the database too, so the end of
        an older stream, here or on another replica, cannot give them back)."""
        if not running:
            return [], []
        deadline = now_us() + self.lease_ms * 1000

        async def op(db: AsyncSession, tx: Tx) -> list[Job]:
            await store.extend_leases(
                db,
                session.holder,
                running,
                deadline,
                take_over=session.session_id,
                tenants=session.tenants,
            )
            return await store.jobs_by_id(db, running)

        current = {j.id: j for j in await self._db.write(op)}
        resumed, revoked = [], []
        for job_id, attempt in running.items():
            job = current.get(job_id)
            # Any other job, whoever's it is, is revoked as an unknown one is.
            if (
                job is not None
                and job.state == RunState.RUNNING
                and job.lease_holder == session.holder
                and (session.tenants is None or job.tenant in session.tenants)
                and job.attempt == attempt
                and job.lease_session == session.session_id
                # A cancel that committed meanwhile has already taken it back.
                and session.held.get(job_id) == attempt
            ):
                resumed.append((job_id, attempt))
            else:
                session.held.pop(job_id, None)
                revoked.append((job_id, attempt))
        return resumed, revoked

    async def close_session(
        self, session: WorkerSession, *, lost: bool, grace: bool = True
    ) -> None:
        """The stream ended. Unless the server is draining, the leases it still
        holds are given back once its worker is back (a newer session of it has
        resumed what it still runs) or, if it is not, when the reconnect grace
        ends (at once without `grace`). Nothing here waits for storage."""
        session.close(session.close_reason or "stream ended")
        log.info(
            "worker disconnected",
            extra={
                "worker_id": session.worker_id,
                "session_id": session.session_id,
                "reason": session.close_reason,
                "held": len(session.held),
            },
        )
        if self.sessions.get(session.holder) is session:
            del self.sessions[session.holder]
            self._sessions_changed()
        held = dict(session.held)
        session.held.clear()
        if lost and not self._draining and held:
            self._give_back(session, held, self.reconnect_grace_ms if grace else 0)
        self.wake()

    def _sessions_changed(self) -> None:
        """Wake whoever waits for a worker to come back (see _worker_back_or_gone)."""
        self._session_changes.set()
        self._session_changes = asyncio.Event()

    def _give_back(
        self,
        session: WorkerSession,
        held: dict[str, int],
        grace_ms: int,
        details: str = "worker stream lost",
    ) -> None:
        task = asyncio.create_task(
            self._give_back_when_due(session, held, grace_ms, details),
            name=f"jobtrace-give-back-{session.session_id}",
        )
        self._give_backs.add(task)
        task.add_done_callback(self._give_backs.discard)

    async def _give_back_when_due(
        self, session: WorkerSession, held: dict[str, int], grace_ms: int, details: str
    ) -> None:
        """Give back a lost session's leases when they are due (see close_session).
        A storage failure meanwhile is retried, with backoff, for as long as the
        leases could still be live; after that their deadlines have passed and
        the supervisor requeues them once storage is back. Logged once, in one
        line: storage being away is not a bug of ours."""
        loop = asyncio.get_running_loop()
        expiry = loop.time() + self.lease_ms / 1000
        await self._worker_back_or_gone(session.holder, loop.time() + grace_ms / 1000, expiry)
        delay, failures = GIVE_BACK_RETRY_INITIAL_S, 0
        while True:
            try:
                await self._release(session, held, details)
            except Exception as exc:  # retried (bounded), and the leases expire anyway
                failures += 1
                if failures == 1:
                    log.warning(
                        "could not give back the %d leases of worker %s's lost stream (%s);"
                        " retrying until they would expire",
                        len(held),
                        session.worker_id,
                        _one_line(exc),
                        extra={"worker_id": session.worker_id, "session_id": session.session_id},
                    )
                if loop.time() + delay >= expiry:
                    log.warning(
                        "leases of worker %s's lost stream left to expire (%d tries failed)",
                        session.worker_id,
                        failures,
                    )
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, GIVE_BACK_RETRY_MAX_S)
            else:
                if failures:
                    log.info(
                        "gave back the leases of worker %s's lost stream (%d tries failed)",
                        session.worker_id,
                        failures,
                    )
                return

    async def _worker_back_or_gone(self, holder: str, grace_end: float, expiry: float) -> None:
        """Return once a newer session of this worker has resumed what it still
        runs, or once the grace has passed with no newer session; a session that
        is still saying hello is waited for (up to the leases' expiry)."""
        loop = asyncio.get_running_loop()
        while True:
            changed = self._session_changes
            successor = self.sessions.get(holder)
            if successor is not None and successor.resumed:
                return
            left = (expiry if successor is not None else grace_end) - loop.time()
            if left <= 0:
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await changed.wait()

    async def _release(self, session: WorkerSession, held: dict[str, int], details: str) -> None:
        """Give back the leases of these attempts that this session still holds
        (not those a newer session of its worker took over)."""

        async def op(db: AsyncSession, tx: Tx) -> None:
            now = now_us()
            changed: list[Job] = []
            for job_id, attempt in held.items():
                job = await store.load_locked(db, job_id)
                if (
                    job is not None
                    and job.state == RunState.RUNNING
                    and job.lease_holder == session.holder
                    and job.attempt == attempt
                    and job.lease_session == session.session_id
                ):
                    changed += await self._lease_lost(db, tx, job, details, now)
            self._jobs.notify(tx, changed)

        await self._db.write(op)

    async def _lease_lost(
        self, db: AsyncSession, tx: Tx, job: Job, details: str, now: int
    ) -> list[Job]:
        service, holder, job_id, attempt = job.spec.service, job.lease_holder, job.id, job.attempt

        def count_expiry() -> None:
            self.lease_expiries[service] += 1
            # A worker still connected here is told to stop the attempt.
            self._revoke(holder, job_id, attempt, lifecycle.LEASE_EXPIRED)

        tx.on_commit(count_expiry)
        self._life.log_after(
            tx, logging.WARNING, "lease expired", job, worker_id=job.worker_id, reason=details
        )
        failure = Failure(
            reason=lifecycle.LEASE_EXPIRED,
            code="LEASE_EXPIRED",
            retryable=True,
            details=details,
            attempt=job.attempt,
        )
        return await self._life.fail_attempt(db, tx, job, failure, True, now)

    # --- reports from a worker --------------------------------------------

    async def heartbeat(
        self,
        session: WorkerSession,
        message_id: int,
        affinity_keys: tuple[str, ...],
        draining: bool = False,
        running: tuple[tuple[str, int], ...] = (),
    ) -> HeartbeatAcked:
        # Check first: a refused heartbeat changes nothing, not even liveness
        # (a session kept alive by heartbeats that renew no lease would hold
        # its slots while its leases expire).
        v = Violations()
        check_affinity(v, "heartbeat.affinity_keys", affinity_keys, MAX_WORKER_AFFINITY_KEYS)
        _check_running(v, "heartbeat.running", running)
        v.raise_if_any()
        session.last_heartbeat_us = now_us()
        session.draining = session.draining or draining
        if affinity_keys:
            session.affinity_keys = frozenset(affinity_keys)
        deadline = session.last_heartbeat_us + self.lease_ms * 1000
        held = dict(session.held)
        # Only the leases of the jobs the worker says it runs are renewed: one
        # it no longer lists (its end was never reported, or the report was
        # lost) runs out, and its job is retried.
        renew = {job_id: attempt for job_id, attempt in running if held.get(job_id) == attempt}

        async def op(db: AsyncSession, tx: Tx) -> list[Job]:
            await store.extend_leases(
                db, session.holder, renew, deadline, held_by=session.session_id
            )
            return await store.jobs_by_id(db, held)

        cancels = []
        for job in await self._db.write(op):
            attempt = held[job.id]
            if (
                job.state != RunState.RUNNING
                or job.attempt != attempt
                or job.lease_holder != session.holder
                or job.lease_session != session.session_id
            ) and session.held.get(job.id) == attempt:
                reason = job.failure.reason if job.failure else f"job is {job.state.name}"
                cancels.append(Cancel(job.id, attempt, reason))
                del session.held[job.id]
        if cancels:
            self.wake()
        return HeartbeatAcked(message_id, deadline, cancels)

    async def progress(
        self, session: WorkerSession, job_id: str, attempt: int, percent: float, message: str
    ) -> None:
        v = Violations()
        if not 0.0 <= percent <= 100.0 or percent != percent:
            v.add("progress.percent", "must be between 0 and 100")
        check_text(v, "progress.message", message, 10_000)
        v.raise_if_any()

        async def op(db: AsyncSession, tx: Tx) -> None:
            job = await _fenced(db, session, job_id, attempt, "progress")
            updated = await self._life.progress(db, tx, job, percent, message, now_us())
            self._jobs.notify(tx, [updated])

        await self._db.write(op)

    async def complete(
        self,
        session: WorkerSession,
        job_id: str,
        attempt: int,
        result: JSON | None,
        result_bytes: int,
    ) -> None:
        v = Violations()
        check_size(v, "complete.result", result_bytes)
        v.raise_if_any()

        async def op(db: AsyncSession, tx: Tx) -> None:
            job = await _fenced(db, session, job_id, attempt, "complete")
            self._jobs.notify(tx, await self._life.complete(db, tx, job, result, now_us()))

        await self._db.write(op)
        self._release_slot(session, job_id)

    async def fail(
        self, session: WorkerSession, job_id: str, attempt: int, failure: Failure, retryable: bool
    ) -> None:
        v = Violations()
        if not failure.reason:
            v.add("fail.error.message", "required")
        check_text(v, "fail.error.message", failure.reason, 10_000)
        check_text(v, "fail.error.code", failure.code, 128)
        check_text(v, "fail.error.details", failure.details, 64 * 1024)
        v.raise_if_any()

        async def op(db: AsyncSession, tx: Tx) -> None:
            job = await _fenced(db, session, job_id, attempt, "fail")
            changed = await self._life.fail_attempt(db, tx, job, failure, retryable, now_us())
            self._jobs.notify(tx, changed)

        await self._db.write(op)
        self._release_slot(session, job_id)

    async def trace_report(
        self, session: WorkerSession, job_id: str, attempt: int, inputs: list[EventInput]
    ) -> None:
        v = Violations()
        if not inputs:
            v.add("trace.events", "required: 1 to 1000 events")
        elif len(inputs) > 1000:
            v.add("trace.events", f"at most 1000 events per report (got {len(inputs)})")
        for i, item in enumerate(inputs[:1000]):
            check_event(
                v,
                f"trace.events[{i}]",
                item.event,
                key_required=False,
                allowed_types=WORKER_TYPES,
            )
        v.raise_if_any()
        check_sizes("trace.events", inputs)

        async def op(db: AsyncSession, tx: Tx) -> None:
            # Under the job's lock: a cancel or timeout committing meanwhile
            # either precedes this report (which is then refused) or follows
            # it, so no event lands after the run's final one.
            job = await _fenced(db, session, job_id, attempt, "trace")
            run_id = lifecycle.run_of(job)
            events = [
                replace(
                    item.event,
                    run_id=run_id,
                    node_id=item.event.node_id or lifecycle.node_of(job),
                    job_id=job.id,
                    attempt=job.attempt,
                    worker_id=session.worker_id,
                    traceparent=job.traceparent,
                )
                for item in inputs
            ]
            # Keyed events are idempotent, as with AppendTraceEvents.
            fresh, _ = await self._life.trace.unseen(db, run_id, events)
            await self._life.trace.record(db, tx, job.tenant, fresh)

        await self._db.write(op)

    async def annotate(
        self,
        session: WorkerSession,
        job_id: str,
        attempt: int,
        item: AnnotationInput,
        payload_bytes: int,
    ) -> None:
        """Store annotations of a running attempt before acknowledging them:
        durable at once, visible (see lifecycle.set_job) in the transaction that
        ends the attempt, however it ends."""
        v = Violations()
        annotation_rules.check_input(v, "annotate", item, payload_bytes)
        v.raise_if_any()

        async def op(db: AsyncSession, tx: Tx) -> None:
            # Under the job's lock, so the attempt cannot end between the fence
            # and the insert (which would leave the annotations pending forever).
            job = await _fenced(db, session, job_id, attempt, "annotate")
            if job.pending_annotations + len(item.attributes) > MAX_ATTEMPT_ANNOTATIONS:
                raise ResourceExhausted(
                    f"at most {MAX_ATTEMPT_ANNOTATIONS} annotations per attempt",
                    reason="TOO_MANY_ANNOTATIONS",
                    metadata={"job_id": job_id, "attempt": str(attempt)},
                )
            annotations = annotation_rules.build(
                item,
                tenant=job.tenant,
                run_id=lifecycle.run_of(job),
                now_us=now_us(),
                job_id=job_id,
                attempt=attempt,
                scope=AnnotationScope.ATTEMPT,
                scope_id=job.step_name,
            )
            await store.insert_pending_annotations(db, annotations)
            await store.update_job(
                db, job_id, pending_annotations=job.pending_annotations + len(annotations)
            )

        await self._db.write(op)

    def _release_slot(self, session: WorkerSession, job_id: str) -> None:
        if session.held.pop(job_id, None) is not None:
            self.wake()

    # --- dispatch ------------------------------------------------------------

    def _on_jobs_changed(self, jobs: list[Job]) -> None:
        wake = False
        for job in jobs:
            if job.state == RunState.QUEUED:
                wake = True
            elif job.state in (RunState.CANCELLED, RunState.TIMED_OUT) and job.lease_holder:
                reason = job.failure.reason if job.failure else job.state.name
                self._revoke(job.lease_holder, job.id, job.attempt, reason)
        if wake:
            self.wake()

    def remote_change(self, job_id: str, state: int, holder: str, attempt: int) -> None:
        """Another replica changed a job: wake the dispatcher for queued work, and
        tell the worker here that held the attempt when its lease is gone
        (cancelled, timed out, expired)."""
        if state == RunState.QUEUED:
            self.wake()
        if state in (RunState.CANCELLED, RunState.TIMED_OUT):
            self._revoke(holder, job_id, attempt, RunState(state).name.lower())
        elif state != RunState.RUNNING:
            self._revoke(holder, job_id, attempt, "the lease was lost")

    def _revoke(self, holder: str, job_id: str, attempt: int, reason: str) -> None:
        """The lease of this attempt is gone: the session here that holds it
        (only the worker it was leased to) is told to stop, and its slot frees."""
        session = self.sessions.get(holder)
        if session is not None and session.held.get(job_id) == attempt:
            session.send(Cancel(job_id, attempt, reason))
            del session.held[job_id]
            self.wake()

    async def _dispatch_loop(self) -> None:
        while not self._draining:
            timeout = await self._dispatch_once()
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a
            # cancellation that races with the event being set.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    async def _dispatch_once(self) -> float:
        """Assign what can be assigned now; return how long to sleep at most."""
        self._wake.clear()
        try:
            if self._unsettled:
                await self._settle_claims()
            return await self._assign_eligible()
        except Exception as exc:
            log_failure(log, exc, "dispatch failed; retrying")
            return 0.5

    async def _assign_eligible(self) -> float:
        if not any(s.free_slots for s in self.sessions.values()):
            return 5.0
        now = now_us()
        capacity: dict[tuple[str, frozenset[str] | None], int] = {}
        for s in self.sessions.values():
            for service in s.services:
                key = (service, s.tenants)
                capacity[key] = capacity.get(key, 0) + s.free_slots
        async with self._db.read() as db:
            candidates: dict[str, Job] = {}
            for (service, tenants), slots in capacity.items():
                if slots:
                    for job in await store.eligible_jobs(db, service, now, slots, tenants):
                        candidates[job.id] = job
            next_us = await store.next_eligible_us(db, {svc for svc, _ in capacity}, now)
        # Pick among the sessions as they are now, after the reads: a worker that
        # connected meanwhile competes (affinity must not lose to a stale view).
        free = [s for s in self.sessions.values() if s.free_slots > 0]
        ordered = sorted(candidates.values(), key=lambda j: (-j.spec.priority, j.seq))
        plan: list[tuple[Job, WorkerSession]] = []
        open_slots = {s.session_id: s.free_slots for s in free}
        for job in ordered:
            best = _pick_worker(job, free, open_slots)
            if best is not None:
                open_slots[best.session_id] -= 1
                plan.append((job, best))
        sleep = 5.0 if next_us is None else max(0.0, (next_us - now) / 1e6)
        if not plan:
            return min(sleep, 5.0)
        await self._claim(plan)
        return 0.0  # look again at once: more may have become eligible meanwhile

    async def _claim(self, plan: list[tuple[Job, WorkerSession]]) -> None:
        # The claims of the transaction that ran last (a group commit may run
        # an operation more than once), and those handed to their worker.
        claims: list[_Claim] = []
        delivered: set[str] = set()

        def hand_over(assign: Assign, session: WorkerSession) -> None:
            # Runs right after the commit, in commit order: a cancel committed
            # later finds the job held and reaches the worker.
            if session.closed:
                return  # the worker never saw the job: settled below
            delivered.add(assign.job.id)
            session.held[assign.job.id] = assign.job.attempt
            session.send(assign)
            if log.isEnabledFor(logging.INFO):
                job = assign.job
                log.info(
                    "job assigned",
                    extra={**lifecycle.job_log_fields(job), "worker_id": session.worker_id},
                )

        async def op(db: AsyncSession, tx: Tx) -> None:
            claims.clear()
            now = now_us()
            deadline = now + self.lease_ms * 1000
            changed = []
            # Lock order everywhere: workflows, then jobs. Jobs another replica is
            # claiming right now are skipped, not waited for.
            for workflow_id in sorted({j.workflow_id for j, _ in plan if j.workflow_id}):
                await store.lock_workflow(db, workflow_id)
            free = await store.lock_queued(db, [j.id for j, _ in plan])
            for job, session in plan:
                if session.closed or job.id not in free:
                    continue
                claimed = await store.claim_job(
                    db, job.id, session.worker_id, deadline, now, session.session_id, session.holder
                )
                if claimed is None:
                    continue
                await self._life.started(db, tx, claimed, now)
                context = await store.request_context_for(db, claimed)
                assign = Assign(claimed, deadline, context)
                tx.on_commit(lambda a=assign, s=session: hand_over(a, s))  # type: ignore[misc]
                claims.append(_Claim(claimed.id, claimed.attempt, session))
                changed.append(claimed)
            self._jobs.notify(tx, changed)

        try:
            await self._db.write(op)
        except Exception:
            # Storage failed at or during COMMIT (a connection lost as it
            # committed, say): the claims may be stored though their workers
            # were not told. Their jobs would sit RUNNING until their leases
            # expire, so they are looked at again once storage answers.
            self._unsure(claims)
            raise
        # Stored, but the stream ended as they committed: given back at once.
        self._unsure([c for c in claims if c.job_id not in delivered])

    def _unsure(self, claims: list[_Claim]) -> None:
        """Remember claims that may be stored but whose worker was not told;
        their slots stay taken until they are settled (next dispatch pass)."""
        for claim in claims:
            self._unsettled[claim.job_id] = claim
            claim.session.claiming[claim.job_id] = claim.attempt
        if claims:
            self.wake()

    async def _settle_claims(self) -> None:
        """Settle the claims whose worker was not told, now that storage answers.
        A claim that is stored (its job RUNNING under that session's lease, for
        that attempt) goes to its worker, with a fresh lease, if the session is
        still connected (its slot was kept); if the session is gone, the claim
        is undone: the job is QUEUED again at once, with no attempt counted. A
        claim that is not stored, or whose job has moved on since (cancelled,
        say), is dropped: its job is dispatched, or not, as any other."""
        claims = list(self._unsettled.values())
        ended: list[_Claim] = []  # sessions that closed as the settling committed

        def deliver(claim: _Claim, assign: Assign) -> None:
            session = claim.session
            if session.closed:
                ended.append(claim)
                return
            session.claiming.pop(claim.job_id, None)
            session.held[claim.job_id] = claim.attempt
            session.send(assign)
            log.info(
                "job assigned after its claim's commit went unanswered",
                extra={**lifecycle.job_log_fields(assign.job), "worker_id": session.worker_id},
            )

        async def op(db: AsyncSession, tx: Tx) -> None:
            ended.clear()
            now = now_us()
            deadline = now + self.lease_ms * 1000
            changed: list[Job] = []
            for claim in claims:
                job = await store.load_locked(db, claim.job_id)
                if (
                    job is None
                    or job.state != RunState.RUNNING
                    or job.attempt != claim.attempt
                    or job.lease_session != claim.session.session_id
                ):
                    continue
                if claim.session.closed:
                    changed.append(
                        await self._life.unclaim(
                            db, tx, job, "worker stream lost before assignment", now
                        )
                    )
                    continue
                # The lease ran while storage was away: it starts now.
                job = await lifecycle.set_job(db, job, lease_deadline_us=deadline)
                context = await store.request_context_for(db, job)
                assign = Assign(job, deadline, context)
                tx.on_commit(lambda c=claim, a=assign: deliver(c, a))  # type: ignore[misc]
            self._jobs.notify(tx, changed)

        try:
            await self._db.write(op)
        except Exception as exc:
            if is_transient(exc):
                raise  # storage still away: tried again on the next pass
            # Not something time mends: dispatch must not wait on it. Their
            # leases run out as any other (the job is then retried).
            log.error("could not settle %d claims; left to expire", len(claims), exc_info=exc)
            ended.clear()
        for claim in claims:
            if claim in ended:  # settled again, now as a lost session's claim
                continue
            if self._unsettled.get(claim.job_id) is claim:
                del self._unsettled[claim.job_id]
            claim.session.claiming.pop(claim.job_id, None)
        self.wake()

    # --- supervision ---------------------------------------------------------

    async def _supervise_loop(self) -> None:
        tick = max(0.05, min(1.0, self.lease_ms / 4000))
        while not self._draining:
            await asyncio.sleep(tick)
            try:
                await self.supervise_once()
            except Exception as exc:
                log_failure(log, exc, "supervision failed; retrying")

    async def supervise_once(self) -> None:
        now = now_us()
        # Liveness comes from heartbeats, not from an open stream.
        for session in list(self.sessions.values()):
            if now - session.last_heartbeat_us > self.lease_ms * 1000:
                session.send(
                    Refused(
                        0,
                        "heartbeat",
                        "",
                        0,
                        FailedPrecondition(
                            "no heartbeat within the lease; leases given back",
                            reason="HEARTBEAT_TIMEOUT",
                        ),
                        fatal=True,
                    )
                )
                session.close("heartbeat timeout")
                # Silent for a whole lease: no grace for a reconnect.
                await self.close_session(session, lost=True, grace=False)

        async def op(db: AsyncSession, tx: Tx) -> None:
            changed: list[Job] = []
            for candidate in await store.timed_out_jobs(db, now):
                # Re-read under lock: another replica may have handled it already.
                job = await store.load_locked(db, candidate.id)
                if job is None or job.state != RunState.RUNNING or job.attempt != candidate.attempt:
                    continue
                failure = Failure(
                    reason=f"timed out after {job.spec.timeout_ms} ms",
                    code="TIMED_OUT",
                    attempt=job.attempt,
                )
                changed += await self._life.end_job(
                    db, tx, job, RunState.TIMED_OUT, failure, now, failed_attempt=True
                )
            for candidate in await store.expired_leases(db, now):
                job = await store.load_locked(db, candidate.id)
                if (
                    job is None
                    or job.state != RunState.RUNNING
                    or job.attempt != candidate.attempt
                    or not 0 < job.lease_deadline_us < now
                ):
                    continue
                changed += await self._lease_lost(
                    db, tx, job, "no heartbeat before the deadline", now
                )
            self._jobs.notify(tx, changed)

        async with self._db.read() as db:
            due = bool(
                await store.timed_out_jobs(db, now, 1) or await store.expired_leases(db, now, 1)
            )
        if due:
            await self._db.write(op)

    # --- introspection -------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The connected sessions by session id."""
        return {
            s.session_id: {"worker_id": s.worker_id, "held": dict(s.held), "max": s.max_concurrency}
            for s in self.sessions.values()
        }


def _pick_worker(
    job: Job, free: list[WorkerSession], slots: dict[str, int]
) -> WorkerSession | None:
    """Among capable workers with a free slot: most affinity keys in common first
    (a preference, never a wait), then the most free slots."""
    best: WorkerSession | None = None
    best_score: tuple[int, int] = (-1, -1)
    wanted = set(job.spec.affinity_keys)
    for s in free:
        if slots[s.session_id] <= 0 or job.spec.service not in s.services or s.closed:
            continue
        if s.tenants is not None and job.tenant not in s.tenants:
            continue
        score = (len(wanted & s.affinity_keys), slots[s.session_id])
        if score > best_score:
            best, best_score = s, score
    return best


def _check_running(v: Violations, field: str, running: tuple[tuple[str, int], ...]) -> None:
    """The jobs a worker says it runs (hello or heartbeat)."""
    if len(running) > MAX_CONCURRENCY:
        v.add(field, f"at most {MAX_CONCURRENCY} jobs (got {len(running)})")
        return
    for i, (job_id, attempt) in enumerate(running):
        check_id(v, f"{field}[{i}].job_id", job_id)
        if attempt < 1:
            v.add(f"{field}[{i}].attempt", "must be an attempt number (1 or more)")


def _one_line(exc: BaseException) -> str:
    """An exception as one short log line: its driver's message, without SQL."""
    cause = getattr(exc, "orig", None) or exc
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0][:200] if text else ''}"
