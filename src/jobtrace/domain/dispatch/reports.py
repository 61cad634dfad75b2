"""Reports on an attempt a worker holds: progress, result, failure, trace events, annotations."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import TypeVar

from sqlalchemy.ext.asyncio import AsyncSession

from jobtrace.clock import now_us
from jobtrace.domain import annotations as annotation_rules
from jobtrace.domain import lifecycle, output_summary
from jobtrace.domain.dispatch.leases import fence, fenced
from jobtrace.domain.dispatch.sessions import WorkerSession
from jobtrace.domain.dispatch.state import SchedulerState
from jobtrace.domain.errors import (
    FailedPrecondition,
    NotFound,
    ResourceExhausted,
    Violations,
)
from jobtrace.domain.lifecycle import Completing, HeldProgress
from jobtrace.domain.trace import WORKER_TYPES, EventInput, check_event, check_sizes
from jobtrace.domain.validation import STEP_NAME_RE, check_id, check_size, check_text
from jobtrace.domain.worker_identity import WorkerIdentity
from jobtrace.model import JSON, AnnotationInput, AnnotationScope, Caller, Failure, Job, RunState
from jobtrace.store import jobs as store
from jobtrace.store.db import MergeableOp, Tx
from jobtrace.store.sql import Row

MAX_ATTEMPT_ANNOTATIONS = 1000


class Reports(SchedulerState):
    """Each report is fenced by (job id, attempt) under the job's lock, then stored."""

    async def progress(
        self, session: WorkerSession, job_id: str, attempt: int, percent: float, message: str
    ) -> None:
        v = Violations()
        if not 0.0 <= percent <= 100.0 or percent != percent:
            v.add("progress.percent", "must be between 0 and 100")
        check_text(v, "progress.message", message, 10_000)
        v.raise_if_any()
        await self._db.write(_Progress(self, session, job_id, attempt, percent, message))

    async def complete(
        self,
        session: WorkerSession,
        job_id: str,
        attempt: int,
        result: JSON | None,
        result_bytes: int,
        summary: JSON | None = None,
        summary_bytes: int = 0,
    ) -> None:
        """Store an attempt's result; `summary`, the worker's own summary of
        it (None: derived from the result), is its COMPLETED event's
        output_summary, redacted like every event."""
        v = Violations()
        check_size(v, "complete.result", result_bytes)
        check_size(
            v, "complete.output_summary", summary_bytes, output_summary.MAX_WORKER_SUMMARY_BYTES
        )
        v.raise_if_any()

        await self._db.write(_Complete(self, session, job_id, attempt, result, summary))
        session.completed += 1
        self._release_slot(session, job_id)

    async def step_result(
        self,
        identity: WorkerIdentity,
        tenants: frozenset[str] | None,
        job_id: str,
        attempt: int,
        step_name: str,
    ) -> JSON | None:
        """The result of a step of the workflow of a job this worker holds (the
        upstream results an assignment carried by reference). Fenced like a
        report: another worker's job, or one of a tenant the worker may not
        serve, tells nothing."""
        v = Violations()
        check_id(v, "job_id", job_id)
        if not identity.worker_id:
            v.add("worker_id", "required")
        if not STEP_NAME_RE.fullmatch(step_name):
            v.add("step_name", "required: 1-128 characters of [A-Za-z0-9._-]")
        v.raise_if_any()
        async with self._db.read() as db:
            job = fence(
                await store.get_job(db, job_id),
                job_id,
                identity.holder,
                attempt,
                "step_result",
                tenants,
            )
            if job.state != RunState.RUNNING:
                raise FailedPrecondition(
                    f"job {job_id!r} attempt {attempt} is not running",
                    reason="JOB_NOT_RUNNING",
                    metadata={"job_id": job_id, "state": job.state.name},
                )
            found = (
                await store.step_result(db, job.workflow_id, step_name) if job.workflow_id else None
            )
        if found is None:
            raise NotFound(
                f"job {job_id!r} has no workflow step {step_name!r}",
                reason="UNKNOWN_STEP",
                metadata={"job_id": job_id, "step_name": step_name},
            )
        state, result = found
        if state != RunState.COMPLETED:
            raise FailedPrecondition(
                f"step {step_name!r} has not completed (it is {state.name})",
                reason="STEP_NOT_COMPLETED",
                metadata={"step_name": step_name, "state": state.name},
            )
        return result

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
            job = await fenced(db, session, job_id, attempt, "fail")
            changed = await self._life.fail_attempt(
                db, tx, job, failure, retryable, now_us(), by=session.identity.subject
            )
            self._jobs.notify(tx, changed)

        await self._db.write(op)
        session.failed += 1
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
            job = await fenced(db, session, job_id, attempt, "trace")
            run_id = lifecycle.run_of(job)
            # A step's events carry its place in the workflow, as the server's
            # own do; a standalone job's keep what the worker said (its own steps).
            place = (
                {"step_number": job.step_number, "total_steps": job.total_steps}
                if job.workflow_id
                else {}
            )
            events = [
                replace(
                    item.event,
                    run_id=run_id,
                    node_id=item.event.node_id or lifecycle.node_of(job),
                    job_id=job.id,
                    attempt=job.attempt,
                    worker_id=session.worker_id,
                    traceparent=job.traceparent,
                    recorded_by=session.identity.subject,
                    **place,  # type: ignore[arg-type]
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
        annotation_rules.check_authority(
            item, Caller(session.identity.subject, reviewer=session.reviewer)
        )
        v = Violations()
        annotation_rules.check_input(v, "annotate", item, payload_bytes)
        v.raise_if_any()

        async def op(db: AsyncSession, tx: Tx) -> None:
            # Under the job's lock, so the attempt cannot end between the fence
            # and the insert (which would leave the annotations pending forever).
            job = await fenced(db, session, job_id, attempt, "annotate")
            if job.pending_annotations + len(item.attributes) > MAX_ATTEMPT_ANNOTATIONS:
                raise ResourceExhausted(
                    f"at most {MAX_ATTEMPT_ANNOTATIONS} annotations per attempt",
                    reason="TOO_MANY_ANNOTATIONS",
                    metadata={"job_id": job_id, "attempt": str(attempt)},
                )
            annotations = annotation_rules.build(
                item,
                recorded_by=session.identity.subject,
                tenant=job.tenant,
                run_id=lifecycle.run_of(job),
                now_us=now_us(),
                job_id=job_id,
                attempt=attempt,
                scope=AnnotationScope.ATTEMPT,
                scope_id=job.step_name,
                redaction=self._life.trace.redaction,
            )
            await store.insert_pending_annotations(db, annotations)
            await store.update_job(
                db, job_id, pending_annotations=job.pending_annotations + len(annotations)
            )

        await self._db.write(op)

    def _release_slot(self, session: WorkerSession, job_id: str) -> None:
        if session.held.pop(job_id, None) is not None:
            self.wake(slot_freed=True)


class _Report(MergeableOp[None]):
    """The write of one report of a session's worker about (job, attempt)."""

    __slots__ = ("attempt", "job_id", "reports", "session")

    def __init__(self, reports: Reports, session: WorkerSession, job_id: str, attempt: int) -> None:
        self.reports = reports
        self.session = session
        self.job_id = job_id
        self.attempt = attempt


class _Progress(_Report):
    """The write of one progress report. Reports queued one after the other
    (a busy worker's batch, or many workers at once) are merged: the common
    case of all of them (fenced and written under each job's row lock) in
    three statements (Lifecycle.progress_many_if_held)."""

    __slots__ = ("message", "percent")

    def __init__(
        self,
        reports: Reports,
        session: WorkerSession,
        job_id: str,
        attempt: int,
        percent: float,
        message: str,
    ) -> None:
        super().__init__(reports, session, job_id, attempt)
        self.percent = percent
        self.message = message

    def _held(self, tx: Tx) -> HeldProgress:
        s = self.session
        return HeldProgress(
            tx,
            self.job_id,
            self.attempt,
            s.holder,
            s.worker_id,
            self.percent,
            self.message,
            s.identity.subject,
        )

    async def __call__(self, db: AsyncSession, tx: Tx) -> None:
        updated = None
        if self.session.tenants is None:  # one statement on PostgreSQL
            updated = await self.reports._life.progress_if_held(db, self._held(tx))
        await self._done(db, tx, updated)

    async def _done(self, db: AsyncSession, tx: Tx, updated: Job | None) -> None:
        """Notify the job as updated; None (refused, or not for the one-statement
        path: a workflow step, say): the general path, which says why."""
        if updated is None:
            job = await fenced(db, self.session, self.job_id, self.attempt, "progress")
            updated = await self.reports._life.progress(
                db, tx, job, self.percent, self.message, now_us(), self.session.identity.subject
            )
        self.reports._jobs.notify(tx, [updated])

    @classmethod
    async def run_merged(cls, db: AsyncSession, ops: list[tuple[_Progress, Tx]]) -> list[None]:
        # Every hook on the last operation's Tx (the group commits, or fails,
        # whole), in the order they are written: a run's events are published
        # in sequence order, whichever of the group's reports they came from.
        tx = ops[-1][1]
        life = ops[0][0].reports._life
        for now in _rounds([op for op, _ in ops]):
            fast = [op for op in now if op.session.tenants is None]
            found: dict[str, Job | None] = {}
            if len(fast) == 1:  # one statement on PostgreSQL
                found[fast[0].job_id] = await life.progress_if_held(db, fast[0]._held(tx))
            elif fast:
                updated = await life.progress_many_if_held(db, [op._held(tx) for op in fast])
                found = {op.job_id: job for op, job in zip(fast, updated, strict=True)}
            for op in now:
                await op._done(db, tx, found.get(op.job_id))
        return [None] * len(ops)


class _Complete(_Report):
    """The write of one completion. Completions queued one after the other
    are merged: the standalone jobs of a round are read (locked) with one
    statement and their runs' annotations (the attestations' evidence) with
    another, then those with no pending annotations are written together
    (Lifecycle.complete_many: one UPDATE, their events, their attestations);
    any other completes as alone."""

    __slots__ = ("result", "summary")

    def __init__(
        self,
        reports: Reports,
        session: WorkerSession,
        job_id: str,
        attempt: int,
        result: JSON | None,
        summary: JSON | None,
    ) -> None:
        super().__init__(reports, session, job_id, attempt)
        self.result = result
        self.summary = summary

    async def __call__(self, db: AsyncSession, tx: Tx) -> None:
        await self._finish(
            db, tx, await fenced(db, self.session, self.job_id, self.attempt, "complete")
        )

    async def _finish(
        self, db: AsyncSession, tx: Tx, job: Job, run_annotations: list[Row] | None = None
    ) -> None:
        changed = await self.reports._life.complete(
            db,
            tx,
            job,
            self.result,
            now_us(),
            self.session.identity.subject,
            summary=self.summary,
            run_annotations=run_annotations,
        )
        self.reports._jobs.notify(tx, changed)

    @classmethod
    async def run_merged(cls, db: AsyncSession, ops: list[tuple[_Complete, Tx]]) -> list[None]:
        tx = ops[-1][1]  # every hook on it, in order (see _Progress.run_merged)
        life = ops[0][0].reports._life
        for now in _rounds([op for op, _ in ops]):
            read = [
                op.job_id
                for op in now
                if op.session.tenants is None and store.is_standalone(op.job_id)
            ]
            jobs: dict[str, Job] = {}
            notes: dict[str, list[Row]] = {}
            if len(read) > 1:
                jobs = await store.load_locked_many(db, read)
                quiet = [(j.id, j.attempt) for j in jobs.values() if not j.pending_annotations]
                notes = await store.annotations_of_runs(db, quiet) if quiet else {}
            together: list[tuple[_Complete, Completing]] = []
            for op in now:
                found = jobs.get(op.job_id)
                if found is None:
                    await op(db, tx)  # read alone (and refused there if it must be)
                    continue
                s = op.session
                job = fence(found, op.job_id, s.holder, op.attempt, "complete", s.tenants)
                if job.pending_annotations:  # published first: this one alone
                    await op._finish(db, tx, job)
                    continue
                by = s.identity.subject
                c = Completing(job, op.result, now_us(), by, op.summary, notes[job.id])
                together.append((op, c))
            if together:
                changed = await life.complete_many(db, tx, [c for _, c in together])
                for (op, _), jobs_changed in zip(together, changed, strict=True):
                    op.reports._jobs.notify(tx, jobs_changed)
        return [None] * len(ops)


_Op = TypeVar("_Op", bound=_Report)


def _rounds(ops: list[_Op]) -> Iterator[list[_Op]]:
    """Merged reports in rounds of distinct jobs, each round's in queue
    order: a job's second report is in the round after its first, so a job's
    reports apply in the order they were queued."""
    pending = ops
    while pending:
        seen: set[str] = set()
        now: list[_Op] = []
        later: list[_Op] = []
        for op in pending:
            (later if op.job_id in seen else now).append(op)
            seen.add(op.job_id)
        yield now
        pending = later
