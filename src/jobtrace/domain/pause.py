"""Pausing and resuming runs: a paused workflow dispatches no new step, a
paused queue (a tenant's jobs of one service) dispatches no job.

How dispatch skips them. A paused workflow's unfinished steps are held
(jobs.held, bit HELD_BY_WORKFLOW) in the pause's transaction, under the
workflow's lock, which every claim of a step takes first: a pause committed
before a claim wins, a claim committed first runs. The dispatch read leaves
held jobs out through its index; the claim re-checks held in its own
statement.

A paused queue is a row of queue_pauses. Each replica keeps the set of paused
queues (read again after its own pause or resume, on another replica's
notice, after a lost LISTEN connection, and every 5 s when idle) and its
dispatch read leaves their jobs out; the claim statement checks queue_pauses
itself, so a stale set costs a refused claim, never a dispatched job.
Guarantee: once PauseQueue returns, no job of the queue is claimed (a claim
that committed before it runs). PauseQueue commits the row, then marks the
queue's QUEUED jobs HELD_BY_QUEUE in a second transaction: on PostgreSQL a
claim whose statement began before the row committed (and so does not see
it) either holds its job's row lock, so the marking waits for it to commit,
or finds the job marked when it locks it, and is refused; a job queued after
the marking began is queued after the row committed, and every claim that
can see it sees the row. The marking and ResumeQueue both lock the pause's
row first, so a resume between the two transactions leaves nothing held."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy.ext.asyncio import AsyncSession

from jobtrace.clock import now_us
from jobtrace.domain import lifecycle, states
from jobtrace.domain.errors import FailedPrecondition, NotFound, Violations
from jobtrace.domain.jobs import MAX_REASON, Jobs
from jobtrace.domain.states import Action, RunKind
from jobtrace.domain.trace import PRIORITY_OUTCOME
from jobtrace.domain.validation import SERVICE_RE, check_id, check_text
from jobtrace.model import (
    Category,
    Level,
    QueueState,
    RunState,
    TraceEvent,
    TraceType,
    Workflow,
)
from jobtrace.store import jobs as store
from jobtrace.store import pause as pause_store
from jobtrace.store.db import Database, Tx

# The notice that tells other replicas the paused queues changed.
QUEUES_NOTICE = "queues"


class Pauses:
    """PauseWorkflow, ResumeWorkflow, PauseQueue, ResumeQueue, ListQueues."""

    def __init__(
        self,
        db: Database,
        jobs: Jobs,
        life: lifecycle.Lifecycle,
        queues_changed: Callable[[], None] = lambda: None,
    ) -> None:
        self._db = db
        self._jobs = jobs
        self._life = life
        # Tells this replica's dispatcher to read the paused queues again.
        self._queues_changed = queues_changed

    # --- workflows ----------------------------------------------------------

    async def pause_workflow(
        self, tenant: str | None, workflow_id: str, reason: str, by: str
    ) -> Workflow:
        """Pause a workflow; `by` is the caller's authenticated subject."""
        v = Violations()
        check_id(v, "workflow_id", workflow_id)
        check_text(v, "reason", reason, MAX_REASON)
        v.raise_if_any()

        async def op(session: AsyncSession, tx: Tx) -> Workflow:
            workflow = await self._locked(session, tenant, workflow_id)
            states.require(RunKind.WORKFLOW, workflow_id, workflow.state, Action.PAUSE)
            states.check_transition(RunKind.WORKFLOW, workflow_id, workflow.state, RunState.PAUSED)
            now = now_us()
            await pause_store.pause_workflow_row(session, workflow_id, workflow.state, reason, now)
            held = await pause_store.hold_steps(session, workflow_id, now)
            message = f"workflow paused: {reason}" if reason else "workflow paused"
            await self._event(session, tx, workflow, message, by, now, {"reason": reason})
            self._jobs.notify(tx, held)
            return await self._stored(session, workflow_id)

        return await self._db.write(op)

    async def resume_workflow(self, tenant: str | None, workflow_id: str, by: str) -> Workflow:
        """Resume a paused workflow where it stopped; its waiting steps are
        dispatched at once (every replica's dispatcher is woken)."""
        v = Violations()
        check_id(v, "workflow_id", workflow_id)
        v.raise_if_any()

        async def op(session: AsyncSession, tx: Tx) -> Workflow:
            workflow = await self._locked(session, tenant, workflow_id)
            states.require(RunKind.WORKFLOW, workflow_id, workflow.state, Action.RESUME)
            before, started_us = await pause_store.paused_from(session, workflow_id)
            target = resumed_state(before, started_us)
            states.check_transition(RunKind.WORKFLOW, workflow_id, workflow.state, target)
            now = now_us()
            await pause_store.resume_workflow_row(session, workflow_id, target, now)
            released = await pause_store.release_steps(session, workflow_id, now)
            # What happened while paused decides too: a gate decided (work
            # queued: not WAITING_FOR_HUMAN) or come to wait (only a gate left).
            await self._life.workflow_waiting(session, workflow_id, now)
            await self._event(session, tx, workflow, "workflow resumed", by, now, None)
            # QUEUED jobs among them wake the dispatcher here and, by their
            # notice, on every other replica.
            self._jobs.notify(tx, released)
            return await self._stored(session, workflow_id)

        return await self._db.write(op)

    async def _locked(
        self, session: AsyncSession, tenant: str | None, workflow_id: str
    ) -> Workflow:
        await store.lock_workflow(session, workflow_id)
        workflow = await store.get_workflow(session, workflow_id, tenant)
        if workflow is None:
            raise NotFound(
                f"workflow {workflow_id!r} not found",
                reason="WORKFLOW_NOT_FOUND",
                metadata={"workflow_id": workflow_id},
            )
        return workflow

    async def _stored(self, session: AsyncSession, workflow_id: str) -> Workflow:
        stored = await store.get_workflow(session, workflow_id)
        assert stored is not None
        return stored

    async def _event(
        self,
        session: AsyncSession,
        tx: Tx,
        workflow: Workflow,
        message: str,
        by: str,
        now: int,
        data: dict[str, str] | None,
    ) -> None:
        event = TraceEvent(
            run_id=workflow.id,
            node_id=lifecycle.WORKFLOW_NODE,
            type=TraceType.LOG,
            level=Level.INFO,
            category=Category.BUSINESS,
            milestone=True,
            display_priority=PRIORITY_OUTCOME,
            message=message,
            data=data,
            traceparent=await store.workflow_traceparent(session, workflow.id),
            recorded_by=by,
            ts_us=now,
        )
        await self._life.trace.record(session, tx, workflow.tenant, [event])

    # --- queues -------------------------------------------------------------

    async def pause_queue(self, tenant: str, service: str, reason: str, by: str) -> QueueState:
        """Pause a tenant's queue of one service (see the module's guarantee)."""
        _check_queue(tenant, service, reason)

        async def record(session: AsyncSession, tx: Tx) -> None:
            if await pause_store.get_queue_pause(session, tenant, service) is not None:
                raise FailedPrecondition(
                    f"queue {service!r} of tenant {tenant!r} is paused already",
                    reason="QUEUE_PAUSED",
                    metadata={"tenant": tenant, "service": service},
                )
            await pause_store.insert_queue_pause(session, tenant, service, by, reason, now_us())
            self._announce(tx)

        async def mark(session: AsyncSession, tx: Tx) -> QueueState:
            # Only while it is still paused: a ResumeQueue that committed in
            # between released the queue, and must not find it held again.
            if await pause_store.lock_queue_pause(session, tenant, service):
                await pause_store.hold_queued(session, tenant, service)
            return await self._queue(session, tenant, service)

        await self._db.write(record)
        # A second transaction, after the row committed: see the guarantee.
        return await self._db.write(mark)

    async def resume_queue(self, tenant: str, service: str, by: str) -> QueueState:
        """Resume a paused queue: its jobs are dispatched at once, on every replica."""
        _check_queue(tenant, service, "")

        async def op(session: AsyncSession, tx: Tx) -> QueueState:
            if not await pause_store.delete_queue_pause(session, tenant, service):
                raise FailedPrecondition(
                    f"queue {service!r} of tenant {tenant!r} is not paused",
                    reason="QUEUE_NOT_PAUSED",
                    metadata={"tenant": tenant, "service": service},
                )
            await pause_store.release_queue(session, tenant, service)
            self._announce(tx)
            return await self._queue(session, tenant, service)

        return await self._db.write(op)

    async def list_queues(self, tenant: str | None) -> list[QueueState]:
        """The queues of `tenant` (of every tenant: None)."""
        async with self._db.read() as session:
            return await pause_store.list_queues(session, tenant)

    def _announce(self, tx: Tx) -> None:
        """Once `tx` commits, every replica's dispatcher reads the paused queues again."""
        tx.notify({"k": QUEUES_NOTICE})
        tx.on_commit(self._queues_changed)

    async def _queue(self, session: AsyncSession, tenant: str, service: str) -> QueueState:
        found = await pause_store.get_queue_pause(session, tenant, service)
        queued, running = await pause_store.queue_counts(session, tenant, service)
        base = found or QueueState(tenant=tenant, service=service)
        return QueueState(
            tenant=tenant,
            service=service,
            paused=base.paused,
            paused_by=base.paused_by,
            paused_us=base.paused_us,
            reason=base.reason,
            queued=queued,
            running=running,
        )


def resumed_state(paused_from: RunState, started_us: int) -> RunState:
    """Where a resumed workflow goes: the state it was paused from, RUNNING
    if a step has started since (or it was paused from QUEUED after a start)."""
    if paused_from in (RunState.UNSPECIFIED, RunState.QUEUED):
        return RunState.RUNNING if started_us else RunState.QUEUED
    return paused_from


def _check_queue(tenant: str, service: str, reason: str) -> None:
    v = Violations()
    if not service:
        v.add("service", "required")
    elif not SERVICE_RE.fullmatch(service):
        v.add("service", "must be 1-128 characters of [A-Za-z0-9._:/-]")
    if not tenant or len(tenant) > 128:
        v.add("tenant", "must be 1-128 characters")
    check_text(v, "reason", reason, MAX_REASON)
    v.raise_if_any()
