"""Placement: which worker runs which eligible job, its claim, and settling unanswered claims."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import NamedTuple

from sqlalchemy.ext.asyncio import AsyncSession

from jobtrace.clock import now_us
from jobtrace.domain import flow, lifecycle, step_data
from jobtrace.domain.dispatch.leases import Leases
from jobtrace.domain.dispatch.matching import Score, affinity_weights, meets, required_of, score
from jobtrace.domain.dispatch.sessions import Assign, AssignMany, WorkerSession
from jobtrace.domain.errors import log_failure
from jobtrace.model import JSON, SYSTEM_SUBJECT, Failure, Job, RunState, WaitingReason
from jobtrace.store import codec
from jobtrace.store import jobs as store
from jobtrace.store import pause as pause_store
from jobtrace.store.db import Tx
from jobtrace.store.errors import is_transient

log = logging.getLogger(__name__)

# Placement classes (of required labels) remembered at most; past it they are
# forgotten and learnt again as their jobs are read.
MAX_KNOWN_CLASSES = 1024
# The longest the dispatcher sleeps without a wake-up (s).
IDLE_S = 5.0

# An attempt's end that its worker is told of at once (its lease revoked):
# an operator's cancel or terminate, or the job's (or workflow's) timeout.
_REVOKING = frozenset({RunState.CANCELLED, RunState.TERMINATED, RunState.TIMED_OUT})

# A dispatch read: service, tenants (None: any), placement classes skipped.
_ReadKey = tuple[str, frozenset[str] | None, frozenset[str]]


@dataclass(frozen=True, slots=True)
class _Claim:
    """A claim of one attempt of a job for one session, whose worker was not told."""

    job_id: str
    attempt: int
    session: WorkerSession


class Placement(Leases):
    """The dispatch loop: eligible jobs are claimed for the best free worker."""

    def _on_jobs_changed(self, jobs: list[Job]) -> None:
        wake = False
        for job in jobs:
            if job.state == RunState.QUEUED:
                wake = True
            elif job.state in _REVOKING and job.lease_holder:
                reason = job.failure.reason if job.failure else job.state.name
                self._revoke(job.lease_holder, job.id, job.attempt, reason)
            if (
                job.spec.concurrency is not None
                and self.flow_blocked
                and job.state != RunState.RUNNING
            ):
                key = flow.concurrency_flow_key(job.tenant, job.spec.concurrency.resolved)
                if self.flow_blocked.pop(key, None) is not None:
                    wake = True  # a slot of a full key came free
        if wake:
            self.wake()

    def remote_change(self, job_id: str, state: int, holder: str, attempt: int) -> None:
        """Another replica changed a job: wake the dispatcher for queued work, and
        tell the worker here that held the attempt when its lease is gone
        (cancelled, terminated, timed out, expired)."""
        if state == RunState.QUEUED:
            self.wake()
        elif state != RunState.RUNNING and self.flow_blocked:
            # A job ended on another replica: it may have held a full
            # concurrency key (which, this notice does not say).
            for key in [k for k, (_, why) in self.flow_blocked.items() if _is_key_block(why)]:
                del self.flow_blocked[key]
            self.wake()
        if state in _REVOKING:
            self._revoke(holder, job_id, attempt, RunState(state).name.lower())
        elif state != RunState.RUNNING:
            self._revoke(holder, job_id, attempt, "the lease was lost")

    async def _dispatch_loop(self) -> None:
        while not self._draining:
            timeout = await self._dispatch_once()
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a
            # cancellation that races with the event being set.
            try:
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            except TimeoutError:
                if timeout > 0:  # a waiting job may be due (or 5 s passed): look again
                    self._queue_seen = None
                if timeout >= IDLE_S:
                    # Idle: the paused queues are read again too (notices
                    # keep them; this bounds how stale a lost one leaves them).
                    self._paused_stale = True

    async def _dispatch_once(self) -> float:
        """Assign what can be assigned now; return how long to sleep at most."""
        self._wake.clear()
        try:
            if self._unsettled:
                await self._settle_claims()
            if self._paused_stale:
                await self._read_paused_queues()
            return await self._assign_eligible()
        except Exception as exc:
            log_failure(log, exc, "dispatch failed; retrying")
            return 0.5

    async def _read_paused_queues(self) -> None:
        """Read the paused queues again (see SchedulerState.paused_queues)."""
        self._paused_stale = False
        try:
            async with self._db.read() as db:
                self.paused_queues = await pause_store.paused_queues(db)
        except BaseException:
            self._paused_stale = True
            raise

    async def _assign_eligible(self) -> float:
        if not any(s.free_slots for s in self.sessions.values()):
            return IDLE_S
        now = now_us()
        # One read per service, tenants and placement classes to skip (the
        # known classes of required labels the worker does not meet): what
        # the read returns, every worker of its key can take, so a job no free
        # worker can take never hides those behind it.
        capacity: dict[_ReadKey, int] = {}
        for s in self.sessions.values():
            slots = s.free_slots
            if not slots:
                continue
            skip = self._skipped_classes(s)
            for service in s.services:
                key = (service, s.tenants, skip)
                capacity[key] = capacity.get(key, 0) + slots
        wanted = frozenset(capacity)
        seen = self._queue_seen
        if seen is not None and wanted <= seen[0] and (seen[1] is None or seen[1] > now):
            # Only slots came free since the last read, which found (and
            # claimed) every eligible job of these, and no waiting job is due
            # yet: nothing to read.
            return _sleep_until(seen[1], now)
        self._queue_seen = None
        wakes = self._wakes
        drained = True
        candidates: dict[str, Job] = {}
        next_us: int | None = None
        blocked = self._flow_blocks(now)
        if blocked:
            next_us = min(until for until, _ in self.flow_blocked.values())
        async with self._db.read() as db:
            paused = self.paused_queues
            # A service with no free slot is not read: a slot that frees wakes
            # the dispatcher, which then reads it. One row more than the slots:
            # fewer says the queue holds no other eligible job.
            caps = self.flow_read_cap
            for (service, tenants, skip), slots in capacity.items():
                limit = slots + 1
                cap = caps.get(service) if caps else None
                if cap is not None and cap < limit:
                    limit = cap
                jobs, waiting_us = await store.eligible_jobs(
                    db,
                    service,
                    now,
                    limit,
                    tenants,
                    skip,
                    _paused(paused, service, tenants),
                    blocked,
                )
                drained = drained and len(jobs) < limit
                for job in jobs:
                    if blocked and _flow_blocked(job, blocked):
                        continue  # blocked by a key other than the one the read skips
                    candidates[job.id] = job
                if waiting_us is not None and (next_us is None or waiting_us < next_us):
                    next_us = waiting_us
        # A class of required labels seen for the first time: the next read
        # skips it where no worker meets it.
        if self._learn_classes(candidates.values()):
            drained = False
        # Pick among the sessions as they are now, after the reads: a worker that
        # connected meanwhile competes (affinity must not lose to a stale view).
        free = [s for s in self.sessions.values() if s.free_slots > 0]
        ordered = sorted(candidates.values(), key=lambda j: (-j.spec.priority, j.seq))
        plan: list[tuple[Job, WorkerSession, JSON]] = []
        open_slots = {s.session_id: s.free_slots for s in free}
        for job in ordered:
            picked = pick_worker(job, free, open_slots)
            if picked is not None:
                open_slots[picked.session.session_id] -= 1
                plan.append((job, picked.session, picked.record()))
        if len(plan) < len(candidates):
            drained = False
        if not plan:
            if drained and self._wakes == wakes:
                self._queue_seen = (wanted, next_us)
            return _sleep_until(next_us, now)
        if await self._claim(plan) and drained and self._wakes == wakes:
            self._queue_seen = (wanted, next_us)
        return 0.0  # look again at once: more may have become eligible meanwhile

    def _skipped_classes(self, session: WorkerSession) -> frozenset[str]:
        """The known placement classes whose required labels this worker does
        not meet (as its labels are now)."""
        classes = self._placement_classes
        if not classes:
            return frozenset()
        cached = session.skipped_classes
        if cached is not None and cached[0] == self._classes_version:
            return cached[1]
        skip = frozenset(
            c for c, required in classes.items() if not meets(required, session.labels)
        )
        session.skipped_classes = (self._classes_version, skip)
        return skip

    def _learn_classes(self, jobs: Iterable[Job]) -> bool:
        """Remember the placement classes of these jobs not known yet; whether
        one was new (the queue must then be read again, skipping it)."""
        classes = self._placement_classes
        learned = False
        for job in jobs:
            if not job.spec.worker_labels:
                continue
            required = required_of(job.spec)
            if not required:
                continue
            name = codec.placement_class(job.spec.worker_labels)
            if name not in classes:
                if len(classes) >= MAX_KNOWN_CLASSES:
                    classes.clear()  # learnt again as their jobs are read
                classes[name] = required
                learned = True
        if learned:
            self._classes_version += 1
            self.wake()
        return learned

    def _flow_blocks(self, now: int) -> frozenset[str]:
        """The flow keys blocked now (those whose time has come are dropped)."""
        blocks = self.flow_blocked
        if not blocks:
            return frozenset()
        for key in [k for k, (until, _) in blocks.items() if until <= now]:
            del blocks[key]
        return frozenset(blocks)

    def _flow_wait(self, job: Job) -> WaitingReason:
        """RATE_LIMITED or CONCURRENCY_LIMIT when a claim here found one of the
        job's buckets or its concurrency key blocked; UNSPECIFIED otherwise."""
        now = now_us()
        for key in _flow_keys(job):
            found = self.flow_blocked.get(key)
            if found is not None and found[0] > now:
                return found[1]
        return WaitingReason.UNSPECIFIED

    def waiting_reason(self, job: Job) -> WaitingReason:
        """Why a job is not running yet, as this replica sees its workers now."""
        if job.state in (RunState.PENDING, RunState.QUEUED) and (
            job.held or job.tenant in self.paused_queues.get(job.spec.service, ())
        ):
            return WaitingReason.PAUSED
        if job.state == RunState.PENDING:
            return WaitingReason.DEPENDENCIES
        if job.state == RunState.WAITING_FOR_HUMAN:
            return WaitingReason.APPROVAL
        if job.state != RunState.QUEUED:
            return WaitingReason.UNSPECIFIED
        if max(job.spec.not_before_us, job.next_attempt_us) > now_us():
            return WaitingReason.NOT_BEFORE
        if self.flow_blocked and (job.spec.rate_limits or job.spec.concurrency):
            reason = self._flow_wait(job)
            if reason:
                return reason
        serving = [
            s
            for s in self.sessions.values()
            if not s.closed
            and job.spec.service in s.services
            and (s.tenants is None or job.tenant in s.tenants)
        ]
        if not serving:
            return WaitingReason.NO_WORKER_FOR_SERVICE
        required = required_of(job.spec)
        meeting = [s for s in serving if meets(required, s.labels)]
        if not meeting:
            return WaitingReason.NO_WORKER_MEETS_LABELS
        if not any(s.free_slots for s in meeting):
            return WaitingReason.ALL_BUSY
        return WaitingReason.UNSPECIFIED

    async def _claim(self, plan: list[tuple[Job, WorkerSession, JSON]]) -> bool:
        """Claim the plan's jobs for their sessions; whether every one was
        claimed and handed over."""
        # The claims of the transaction that ran last (a group commit may run
        # an operation more than once), and those handed to their worker.
        claims: list[_Claim] = []
        delivered: set[str] = set()
        # Flow keys a claim found blocked (applied once the write is over),
        # and by service, the flow-controlled jobs started where one was.
        blocks: dict[str, tuple[int, WaitingReason]] = {}
        flow_started: dict[str, int] = {}
        blocked_services: set[str] = set()

        def hand_over(assigns: list[Assign], session: WorkerSession) -> None:
            # Runs right after the commit, in commit order: a cancel committed
            # later finds the job held and reaches the worker.
            if session.closed:
                return  # the worker never saw the jobs: settled below
            for assign in assigns:
                delivered.add(assign.job.id)
                session.held[assign.job.id] = assign.job.attempt
            if session.accepts_batches and len(assigns) > 1:
                session.send(AssignMany(assigns))  # its free slots' jobs in one message
            else:
                for assign in assigns:
                    session.send(assign)
            if log.isEnabledFor(logging.INFO):
                for assign in assigns:
                    job = assign.job
                    log.info(
                        "job assigned",
                        extra={**lifecycle.job_log_fields(job), "worker_id": session.worker_id},
                    )

        async def op(db: AsyncSession, tx: Tx) -> None:
            claims.clear()
            blocks.clear()
            flow_started.clear()
            blocked_services.clear()
            now = now_us()
            deadline = now + self.lease_ms * 1000
            changed: list[Job] = []
            # Each session's jobs, handed over together after the commit.
            handed: dict[str, tuple[WorkerSession, list[Assign]]] = {}
            # Lock order everywhere: workflows, then jobs. Jobs another replica is
            # claiming right now are skipped, not waited for (see store.claim_update).
            for workflow_id in sorted({j.workflow_id for j, _, _ in plan if j.workflow_id}):
                await store.lock_workflow(db, workflow_id)
            # Standalone jobs without flow control are claimed together.
            together = [
                lifecycle.ClaimOf(
                    job,
                    session.worker_id,
                    session.session_id,
                    session.holder,
                    session.identity.subject,
                    placement,
                )
                for job, session, placement in plan
                if not session.closed and _plain(job)
            ]
            claimed_together: dict[str, Job | None] = {}
            if len(together) > 1:
                for c, got in zip(
                    together,
                    await self._life.claim_many(db, tx, together, deadline, now),
                    strict=True,
                ):
                    claimed_together[c.job.id] = got
            for job, session, placement in plan:
                if job.id in claimed_together:
                    # Claimed: handed over, or (its session closed meanwhile)
                    # settled after the commit, like any claim.
                    claimed = claimed_together[job.id]
                    if claimed is not None:
                        await self._assign(db, handed, claims, changed, session, claimed, deadline)
                    continue
                if session.closed:
                    continue
                verdict: flow.Verdict | None = None
                if job.spec.rate_limits or job.spec.concurrency is not None:
                    # Only flow-controlled jobs pay for this (their rows locked
                    # until the commit on PostgreSQL).
                    if _flow_blocked(job, blocks):
                        continue
                    verdict = await flow.admit(db, job, now)
                    if verdict.blocked:
                        blocks[verdict.blocked] = (verdict.until_us, verdict.reason)
                        blocked_services.add(job.spec.service)
                        continue
                    if verdict.cancel_self:
                        changed.extend(
                            await self._flow_cancel(db, tx, job.id, RunState.QUEUED, now)
                        )
                        continue
                claimed = await self._life.claim(
                    db,
                    tx,
                    job,
                    session.worker_id,
                    deadline,
                    now,
                    session.session_id,
                    session.holder,
                    by=session.identity.subject,
                    placement=placement,
                )
                if claimed is None:
                    continue
                if verdict is not None:
                    service = job.spec.service
                    flow_started[service] = flow_started.get(service, 0) + 1
                    await flow.started(db, job, verdict, now)
                    for running_id in verdict.cancel:  # CANCEL_OLDEST
                        changed.extend(
                            await self._flow_cancel(db, tx, running_id, RunState.RUNNING, now)
                        )
                await self._assign(db, handed, claims, changed, session, claimed, deadline)
            for session, assigns in handed.values():
                tx.on_commit(lambda a=assigns, s=session: hand_over(a, s))  # type: ignore[misc]
            self._jobs.notify(tx, changed)

        try:
            await self._db.write(op)
        except Exception:
            self.flow_blocked.update(blocks)
            # Storage failed at or during COMMIT (a connection lost as it
            # committed, say): the claims may be stored though their workers
            # were not told. Their jobs would sit RUNNING until their leases
            # expire, so they are looked at again once storage answers.
            self._unsure(claims)
            raise
        if blocks:
            self.flow_blocked.update(blocks)
            self._queue_seen = None
        caps = self.flow_read_cap
        for service in {job.spec.service for job, _, _ in plan}:
            started = flow_started.get(service, 0)
            if service in blocked_services:
                caps[service] = started + 2
            elif started and service in caps:
                caps[service] = 2 * max(caps[service], started)  # all started: read more
            elif caps:
                caps.pop(service, None)  # no flow-controlled job in the way
        # Stored, but the stream ended as they committed: given back at once.
        self._unsure([c for c in claims if c.job_id not in delivered])
        return len(delivered) == len(plan)

    @staticmethod
    async def _assign(
        db: AsyncSession,
        handed: dict[str, tuple[WorkerSession, list[Assign]]],
        claims: list[_Claim],
        changed: list[Job],
        session: WorkerSession,
        claimed: Job,
        deadline: int,
    ) -> None:
        """A claimed job's assignment, handed to its session's worker after the
        commit (with the session's others); the claim remembered until then."""
        context = await store.request_context_for(db, claimed)
        upstream = await step_data.upstream(db, claimed)
        assign = Assign(claimed, deadline, context, upstream)
        handed.setdefault(session.session_id, (session, []))[1].append(assign)
        claims.append(_Claim(claimed.id, claimed.attempt, session))
        changed.append(claimed)

    async def _flow_cancel(
        self, db: AsyncSession, tx: Tx, job_id: str, expected: RunState, now: int
    ) -> list[Job]:
        """Cancel a job a concurrency key's strategy gives up (CANCEL_NEWEST:
        the QUEUED job dispatch reached; CANCEL_OLDEST: the key's RUNNING job
        that started first, whose worker is told as by CancelJob)."""
        job = await store.load_locked(db, job_id)
        if job is None or job.state != expected:
            return []
        if expected == RunState.QUEUED and job.held:
            return []  # its workflow (or queue) was paused meanwhile: it waits
        key = job.spec.concurrency.resolved if job.spec.concurrency else ""
        failure = Failure(
            reason=f"concurrency key {key!r} is full ({expected.name.lower()} job given up)",
            code=flow.CONCURRENCY_CODE,
            attempt=job.attempt,
        )
        return await self._life.end_job(
            db, tx, job, RunState.CANCELLED, failure, now, by=SYSTEM_SUBJECT
        )

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
                assign = Assign(job, deadline, context, await step_data.upstream(db, job))
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


def _paused(
    paused: dict[str, frozenset[str]], service: str, tenants: frozenset[str] | None
) -> frozenset[str]:
    """The tenants whose queue of `service` is paused, of those a read covers."""
    found = paused.get(service, frozenset())
    return found if tenants is None or not found else found & tenants


def _flow_keys(job: Job) -> list[str]:
    """The flow keys (domain.flow) of a job: its buckets and its concurrency key."""
    keys = [f"{job.tenant}\x1fr\x1f{u.bucket}" for u in job.spec.rate_limits]
    if job.spec.concurrency is not None:
        keys.append(flow.concurrency_flow_key(job.tenant, job.spec.concurrency.resolved))
    return keys


def _flow_blocked(job: Job, blocked: Collection[str]) -> bool:
    """Whether one of a flow-controlled job's keys is blocked."""
    if not job.spec.rate_limits and job.spec.concurrency is None:
        return False
    return any(k in blocked for k in _flow_keys(job))


def _is_key_block(reason: WaitingReason) -> bool:
    return reason == WaitingReason.CONCURRENCY_LIMIT


def _sleep_until(next_us: int | None, now: int) -> float:
    """How long the dispatcher may sleep: until the next waiting job is due,
    at most IDLE_S."""
    return IDLE_S if next_us is None else min(IDLE_S, max(0.0, (next_us - now) / 1e6))


class Picked(NamedTuple):
    """The worker chosen for a job, and why (the STARTED event's `placement`).
    A NamedTuple: one is built per job dispatched."""

    session: WorkerSession
    score: Score
    candidates: int

    def record(self) -> JSON:
        score = self.score.score
        return {
            "worker": self.session.worker_id,
            "score": int(score) if score.is_integer() else score,
            "matched_labels": list(self.score.matched_labels),
            "matched_keys": list(self.score.matched_keys),
            "candidates": self.candidates,
        }


def pick_worker(
    job: Job,
    free: list[WorkerSession],
    slots: dict[str, int],
) -> Picked | None:
    """Among capable workers with a free slot that meet the job's required
    labels: the highest score (weights of the preferred labels that hold and
    of the affinity keys cached; a preference, never a wait), then the most
    free slots. The worker a failure rule said to avoid (job.avoid_holder)
    only when no other can."""
    spec = job.spec
    simple = not spec.worker_labels and not spec.affinity
    weights = None if simple else affinity_weights(spec)
    wanted = set(spec.affinity_keys)
    best: WorkerSession | None = None
    best_rank: tuple[bool, float, int] = (False, -math.inf, -1)
    best_detail: Score | None = None
    candidates = 0
    for s in free:
        free_slots = slots[s.session_id]
        if free_slots <= 0 or spec.service not in s.services or s.closed:
            continue
        if s.tenants is not None and job.tenant not in s.tenants:
            continue
        detail: Score | None = None
        if weights is None:
            value = float(len(wanted & s.affinity_keys)) if wanted else 0.0
        else:
            detail = score(spec, s.labels, s.affinity_keys, weights)
            if detail is None:
                continue  # a required label does not hold
            value = detail.score
        candidates += 1
        # The worker a failure rule said to avoid: only when no other can take
        # the job (a retry never waits).
        avoided = job.avoid_holder != "" and s.holder == job.avoid_holder
        rank = (not avoided, value, free_slots)
        if rank > best_rank:
            best, best_rank, best_detail = s, rank, detail
    if best is None:
        return None
    if best_detail is None:
        keys = tuple(k for k in spec.affinity_keys if k in best.affinity_keys) if wanted else ()
        best_detail = Score(float(len(keys)), (), keys)
    return Picked(best, best_detail, candidates)


def _plain(job: Job) -> bool:
    """A standalone job without flow control: claimed with the others of its
    dispatch round in one statement (Lifecycle.claim_many)."""
    return not job.workflow_id and not job.spec.rate_limits and job.spec.concurrency is None
