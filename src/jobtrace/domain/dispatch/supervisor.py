"""Supervision: sessions silent for a whole lease, expired leases, timed-out
jobs, workflows past their deadline and approval gates past their timeout."""

from __future__ import annotations

import asyncio
import logging

from sqlalchemy.ext.asyncio import AsyncSession

from jobtrace.clock import now_us
from jobtrace.domain.dispatch.leases import Leases
from jobtrace.domain.dispatch.sessions import Refused
from jobtrace.domain.errors import FailedPrecondition, log_failure
from jobtrace.model import Failure, Job, RunState
from jobtrace.store import jobs as store
from jobtrace.store.db import Tx

log = logging.getLogger(__name__)


class Supervisor(Leases):
    """A periodic pass that ends what its deadline has passed."""

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
            # Approval gates past their timeout (each re-read under its lock).
            changed += await self._jobs.approvals.time_out(db, tx, now)
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
                changed += await self._life.attempt_timed_out(db, tx, job, failure, now)
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
                await store.timed_out_jobs(db, now, 1)
                or await store.expired_leases(db, now, 1)
                or await store.timed_out_gates(db, now, 1)
            )
            # One indexed read (ix_workflows_deadline: unfinished workflows
            # with a deadline only) per pass.
            overdue = await store.overdue_workflows(db, now)
        if due:
            await self._db.write(op)
        for workflow_id in overdue:
            # One transaction per workflow: a workflow of many steps is a big
            # one. Exactly once across replicas: decided under its lock.
            async def time_out(db: AsyncSession, tx: Tx, workflow_id: str = workflow_id) -> bool:
                return await self._jobs.time_out_workflow(db, tx, workflow_id)

            await self._db.write(time_out)
