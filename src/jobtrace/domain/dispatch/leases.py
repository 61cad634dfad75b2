"""Leases: fencing, renewal by heartbeat, resume, give-back after the grace, loss, revocation."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from sqlalchemy.ext.asyncio import AsyncSession

from jobtrace.clock import now_us
from jobtrace.domain import lifecycle
from jobtrace.domain.dispatch.sessions import (
    Cancel,
    HeartbeatAcked,
    WorkerSession,
    check_running,
)
from jobtrace.domain.dispatch.state import SchedulerState
from jobtrace.domain.errors import (
    AlreadyExists,
    FailedPrecondition,
    NotFound,
    PermissionDenied,
    StaleAttempt,
    Violations,
)
from jobtrace.domain.validation import MAX_WORKER_AFFINITY_KEYS, check_affinity, check_labels
from jobtrace.model import SYSTEM_SUBJECT, Failure, Job, RunState
from jobtrace.store import jobs as store
from jobtrace.store.db import Tx

log = logging.getLogger(__name__)

# Giving back a lost stream's leases while storage fails: retried this often.
GIVE_BACK_RETRY_INITIAL_S = 0.1
GIVE_BACK_RETRY_MAX_S = 2.0


async def fenced(
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


class Leases(SchedulerState):
    """Who holds which attempt, until when, and what happens when that ends."""

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
            session = self.sessions.get(holder)
            if session is not None and session.held.get(job_id) == attempt:
                session.lease_losses += 1
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
        # A lost lease is the server's own doing, whoever held it.
        return await self._life.fail_attempt(db, tx, job, failure, True, now, by=SYSTEM_SUBJECT)

    async def heartbeat(
        self,
        session: WorkerSession,
        message_id: int,
        affinity_keys: tuple[str, ...],
        draining: bool = False,
        running: tuple[tuple[str, int], ...] = (),
        labels: dict[str, str] | None = None,
    ) -> HeartbeatAcked:
        # Check first: a refused heartbeat changes nothing, not even liveness
        # (a session kept alive by heartbeats that renew no lease would hold
        # its slots while its leases expire).
        v = Violations()
        check_affinity(v, "heartbeat.affinity_keys", affinity_keys, MAX_WORKER_AFFINITY_KEYS)
        check_running(v, "heartbeat.running", running)
        if labels is not None:
            check_labels(v, "heartbeat.labels.labels", labels, free_keys=True)
        v.raise_if_any()
        session.last_heartbeat_us = now_us()
        session.draining = session.draining or draining
        if affinity_keys:
            session.affinity_keys = frozenset(affinity_keys)
        if labels is not None and labels != session.labels:
            # Placement uses the labels as they are now: jobs that waited for
            # these may be taken.
            session.labels = dict(labels)
            session.skipped_classes = None
            self.wake()
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

    def _revoke(self, holder: str, job_id: str, attempt: int, reason: str) -> None:
        """The lease of this attempt is gone: the session here that holds it
        (only the worker it was leased to) is told to stop, and its slot frees."""
        session = self.sessions.get(holder)
        if session is not None and session.held.get(job_id) == attempt:
            session.send(Cancel(job_id, attempt, reason))
            del session.held[job_id]
            self.wake()


def _one_line(exc: BaseException) -> str:
    """An exception as one short log line: its driver's message, without SQL."""
    cause = getattr(exc, "orig", None) or exc
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0][:200] if text else ''}"
