"""State transitions of jobs and workflows, with their trace events, in one transaction."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from jobtrace import conventions
from jobtrace.clock import iso, now_us
from jobtrace.domain import annotated, fan_out, output_summary, states, step_data
from jobtrace.domain.attest import Attestor
from jobtrace.domain.evidence import (
    ATTESTATION_DATA_BYTES,
    StoredOutput,
    fit_outputs,
    member_weight,
)
from jobtrace.domain.failure_rules import FailureRules
from jobtrace.domain.trace import (
    PRIORITY_OUTCOME,
    PRIORITY_RETRY,
    PRIORITY_START,
    PRIORITY_TECHNICAL,
    Trace,
)
from jobtrace.ids import JOB_PREFIX, new_id
from jobtrace.model import (
    JSON,
    SYSTEM_SUBJECT,
    Annotation,
    AnnotationScope,
    ApprovalDecision,
    AttestationType,
    Category,
    ErrorInfo,
    Failure,
    Job,
    Level,
    RunState,
    StepResults,
    TraceEvent,
    TraceType,
)
from jobtrace.store import attest as attest_store
from jobtrace.store import codec
from jobtrace.store import failures as failures_store
from jobtrace.store import jobs as store
from jobtrace.store.db import Tx, spans_of
from jobtrace.store.sql import Params, Query, Row

log = logging.getLogger(__name__)

LEASE_EXPIRED = "lease expired"
CANCELLED_BY_USER = "Run cancelled by user"
TERMINATED_BY_OPERATOR = "Run terminated by operator"
# The warn event (and default reason) of a run an operator ended: cancelled,
# or terminated (ended at once, its worker not waited for).
_ENDED_BY_OPERATOR = {
    RunState.CANCELLED: CANCELLED_BY_USER,
    RunState.TERMINATED: TERMINATED_BY_OPERATOR,
}
WORKFLOW_NODE = "workflow"
# The server's own annotations: key, actor kind (jobtrace.v1.ActorKind SYSTEM)
# and actor id.
FAILURE_KIND = conventions.Failure.kind
ACTOR_KIND_SYSTEM = 4
SERVER_ACTOR = "jobtrace"


# A standalone job cancelled or terminated: its attestation's type, key prefix,
# the data's keys, and the reason and code when no failure says them.
_STOPPED: dict[RunState, tuple[AttestationType, str, str, str, str, str]] = {
    RunState.CANCELLED: (
        AttestationType.WORKER_CANCELLATION,
        "worker-cancellation",
        "cancellation",
        "cancelled_while",
        CANCELLED_BY_USER,
        "CANCELLED",
    ),
    RunState.TERMINATED: (
        AttestationType.WORKER_TERMINATION,
        "worker-termination",
        "termination",
        "terminated_while",
        TERMINATED_BY_OPERATOR,
        "TERMINATED",
    ),
}


async def set_job(session: AsyncSession, job: Job, **changes: object) -> Job:
    """Write the changed fields of a job and return the new record.

    Every transition out of RUNNING ends the current attempt, whatever ends it
    (completion, failure, lost or expired lease, timeout, cancel of the job or
    its workflow): the annotations its worker sent become visible in the same
    transaction."""
    state = changes.get("state", job.state)
    if state != job.state:
        states.check_transition(states.RunKind.JOB, job.id, job.state, state)  # type: ignore[arg-type]
    new, values = await _changed(session, job, changes)
    await store.update_job(session, job.id, **values)
    return new


async def _publish_if_ending(session: AsyncSession, job: Job, changes: dict[str, object]) -> Job:
    """If these changes end the running attempt, publish the annotations its
    worker sent (see set_job): the job as it is then (none pending)."""
    if job.state == RunState.RUNNING and changes.get("state", job.state) != RunState.RUNNING:
        if job.pending_annotations:  # most attempts have none: no query then
            await store.publish_annotations(session, job.id, job.attempt)
            changes["pending_annotations"] = 0
            return replace(job, pending_annotations=0)
    return job


async def _changed(
    session: AsyncSession, job: Job, changes: dict[str, object]
) -> tuple[Job, dict[str, object]]:
    """The new record of a job and the column values to write (see set_job);
    an ended attempt's annotations are published here."""
    job = await _publish_if_ending(session, job, changes)
    new = replace(job, **changes)  # type: ignore[arg-type]
    if new.state != job.state:
        traced = spans_of(session)  # OTLP on: the attempt's and run's spans when they end
        if traced is not None:
            traced[0].job_changed(traced[1], job, new, now_us())
    values: dict[str, object] = {}
    for name, value in changes.items():
        if name == "state":
            values["state"] = int(value)  # type: ignore[call-overload]
        elif name == "failure":
            values["failure"] = codec.failure_dumps(value)  # type: ignore[arg-type]
        elif name == "result":
            values["result"] = None if value is None else codec.dumps(value)
        elif name == "chain_head":
            values["chain_seq"], values["chain_digest"] = value  # type: ignore[misc]
        elif name == "decisions":
            values["approval_decisions"] = store.decisions_dumps(value)  # type: ignore[arg-type]
        else:  # record fields are named like their columns
            values[name] = value
    return new, values


def job_log_fields(job: Job) -> dict[str, object]:
    """What a log line about a job says of it (besides the request's context)."""
    out: dict[str, object] = {
        "job_id": job.id,
        "tenant": job.tenant,
        "service": job.spec.service,
        "attempt": job.attempt,
    }
    if job.workflow_id:
        out["workflow_id"] = job.workflow_id
    return out


def log_on_commit(tx: Tx, level: int, message: str, extra: dict[str, object]) -> None:
    """Log once `tx` commits: a rolled-back batch is rerun, so logging inside it
    could tell of something that never happened."""
    tx.on_commit(lambda: log.log(level, message, extra=extra))


def _said(state: RunState) -> str:
    """A state in a sentence: "timed out", not "timed_out"."""
    return state.name.lower().replace("_", " ")


def run_of(job: Job) -> str:
    return job.workflow_id or job.id


def node_of(job: Job) -> str:
    return job.step_name or job.id


def attempt_duration_us(job: Job, now: int) -> int:
    """How long the attempt a transition at `now` closes ran: from its start
    when `job` (as it was before) is RUNNING, 0 when no attempt is running (a
    step that ends before it started, a fan-out step with no items)."""
    if job.state == RunState.RUNNING and job.started_us:
        return max(0, now - job.started_us)
    return 0


async def parent_evidence(db: AsyncSession, parent_run_id: str) -> JSON:
    """What a rerun's attestation says of the run it reruns: its id and the
    digest of its last attestation (the head of its chain: the parent ended,
    so its chain no longer grows; '' if it has none, e.g. pruned)."""
    _, digest = await attest_store.chain_head(db, parent_run_id)
    return {"run_id": parent_run_id, "attestation_digest": digest}


@dataclass(frozen=True, slots=True)
class ClaimOf:
    """A claim of a job (as the dispatch read saw it) for a worker session
    (see Lifecycle.claim_many)."""

    job: Job
    worker_id: str
    session_id: str
    holder: str
    by: str
    placement: JSON | None


@dataclass(frozen=True, slots=True)
class Completing:
    """A completion of a locked, fenced job (see Lifecycle.complete_many):
    its result, when (now), by whom, the worker's output summary (None:
    derived), and its run's annotations as _attest_job takes them."""

    job: Job
    result: JSON | None
    now: int
    by: str
    summary: JSON | None = None
    run_annotations: Sequence[Row] | None = None


@dataclass(frozen=True, slots=True)
class HeldProgress:
    """A progress report of an attempt whose lease `holder` holds, written
    by the operation whose Tx is `tx` (see Lifecycle.progress_many_if_held)."""

    tx: Tx
    job_id: str
    attempt: int
    holder: str
    worker_id: str
    percent: float
    message: str
    by: str


def _held_progress_event(db: AsyncSession, r: HeldProgress) -> tuple[str, TraceEvent] | None:
    """The tenant and PROGRESS event of a report whose job may take the
    one-statement path (store.one_statement_run); None when it may not."""
    run = store.one_statement_run(db, r.job_id)
    if run is None:
        return None
    tenant, run_id, node_id, step_number, total_steps = run
    return tenant, TraceEvent(
        run_id=run_id,
        node_id=node_id,
        step_number=step_number,
        total_steps=total_steps,
        job_id=r.job_id,
        attempt=r.attempt,
        worker_id=r.worker_id,
        type=TraceType.PROGRESS,
        category=Category.BUSINESS,
        percent=r.percent,
        message=r.message or f"{node_id} at {r.percent:g}%",
        recorded_by=r.by,
    )


class Lifecycle:
    """Every transition of a job and its workflow, with the trace events and the
    attestations it produces, all in the caller's transaction."""

    def __init__(
        self, trace: Trace, attestor: Attestor, *, evidence_budget: int = ATTESTATION_DATA_BYTES
    ) -> None:
        self.trace = trace
        self.attestor = attestor
        # The most a workflow attestation's data weighs (see domain/evidence.py).
        self.evidence_budget = evidence_budget
        # Failed attempts requeued for another attempt, by service (metrics).
        self.retries: Counter[str] = Counter()
        # Failed attempts by (service, failure kind; "" unclassified) (metrics).
        self.failures: Counter[tuple[str, str]] = Counter()
        # The operator's failure rules; replaced whole when their file is reloaded.
        self.failure_rules = FailureRules()
        # OTLP on: jobtrace.otel.RunSpans (a workflow's span when it ends).
        self.spans: Any = None

    async def _workflow_span(
        self, db: AsyncSession, tx: Tx, workflow_id: str, state: RunState, now: int
    ) -> None:
        """OTLP on: the span of a workflow that ends now (one read of its row)."""
        if self.spans is not None:
            fields = await store.workflow_span_fields(db, workflow_id)
            self.spans.workflow_ended(tx, workflow_id, fields, state, now)

    def log_after(self, tx: Tx, level: int, message: str, job: Job, **fields: object) -> None:
        """Log a transition of `job` once `tx` commits."""
        if log.isEnabledFor(level):
            log_on_commit(tx, level, message, {**job_log_fields(job), **fields})

    async def _attest_job(
        self,
        db: AsyncSession,
        job: Job,
        type: AttestationType,
        key: str,
        extra: JSON,
        by: str,
        *,
        keep_head: bool = True,
        fold: list[tuple[Query, Params]] | None = None,
        run_annotations: Sequence[Row] | None = None,
    ) -> tuple[int, str] | None:
        """Attest a job's transition. A standalone job's row records the head
        of its chain: read from the (locked) job as loaded when it has it, else
        from the attestations; the new head is written back to the row here,
        or, without `keep_head`, returned for the caller's own UPDATE of the
        row in this transaction (it must write it). A step's chain is its
        workflow's: None. With `fold`, the attestation's INSERT is appended
        there, for the caller to run in this transaction (_set_and_record).
        `run_annotations`: every annotation of the job's run, read in this
        transaction already (see annotated.evidence)."""
        context = await store.request_context_for(db, job)
        data: JSON = {
            "recorded_by": by,  # signed: who caused it (see Attestation.recorded_by)
            "request_context": context,
            "job_payload": job.spec.payload,
            "service": job.spec.service,
            "step_name": job.step_name,
            "max_attempts": job.spec.max_attempts,
            "created_at": iso(job.created_us),
            "started_at": iso(job.started_us),  # this attempt's start: each claim sets it
            # This attempt's end: every transition that attests sets updated_us to it,
            # also a failed attempt that is retried (which leaves completed_at empty).
            "ended_at": iso(job.updated_us),
            "completed_at": iso(job.completed_us),
            **extra,
        }
        if job.parent_run_id:
            data["parent"] = await parent_evidence(db, job.parent_run_id)
        covers = annotated.selector(
            run_id=run_of(job), workflow_id=job.workflow_id, job_id=job.id, attempt=job.attempt
        )
        signed = await self.attestor.attest(
            db,
            key=key,
            type=type,
            tenant=job.tenant,
            entity_type="job",
            entity_id=job.id,
            chain_id=run_of(job),
            state=job.state,
            data=data,
            workflow_id=job.workflow_id,
            job_id=job.id,
            worker_id=job.worker_id,
            attempt=job.attempt,
            annotations=await annotated.evidence(db, covers, run_annotations),
            recorded_by=by,
            head=None if job.workflow_id else job.chain_head,
            insert=fold is None,
        )
        if fold is not None:
            fold.append(attest_store.attestation_insert(signed))
        if job.workflow_id:
            return None
        head = (signed.chain_seq, signed.digest)
        if keep_head:
            await store.update_job(db, job.id, chain_seq=head[0], chain_digest=head[1])
        return head

    async def _attest_failure(
        self, db: AsyncSession, job: Job, failure: Failure, will_retry: bool, by: str
    ) -> Job:
        """Attest a failed attempt; the job with its chain's new head."""
        head = await self._attest_job(
            db,
            job,
            AttestationType.WORKER_FAILURE,
            f"worker-failure:{job.id}:{job.attempt}",
            {
                "error": {
                    "message": failure.reason,
                    "code": failure.code,
                    "details": failure.details,
                    "retryable": failure.retryable,
                    **({"kind": failure.kind} if failure.kind else {}),
                },
                "will_retry": will_retry,
            },
            by,
        )
        return job if head is None else replace(job, chain_head=head)

    async def _attest_workflow(
        self,
        db: AsyncSession,
        workflow_id: str,
        tenant: str,
        state: RunState,
        failure: Failure | None,
        by: str,
    ) -> None:
        row = await store.get_workflow_row(db, workflow_id)
        assert row is not None
        steps = (await store.workflow_steps(db, [workflow_id]))[workflow_id]
        type, prefix = {
            RunState.COMPLETED: (AttestationType.WORKFLOW_COMPLETION, "workflow-completion"),
            RunState.CANCELLED: (AttestationType.WORKFLOW_CANCELLATION, "workflow-cancellation"),
            RunState.TERMINATED: (AttestationType.WORKFLOW_TERMINATION, "workflow-termination"),
        }.get(state, (AttestationType.WORKFLOW_FAILURE, "workflow-failure"))
        data: JSON = {
            "recorded_by": by,  # signed: who caused it (see Attestation.recorded_by)
            "request_context": codec.loads(row.request_context) or {},
            "name": row.name,
            "total_steps": len(steps),
            "completed_steps": sum(1 for s in steps if s.state == RunState.COMPLETED),
            "steps": {
                s.name: {
                    "job_id": s.job_id,
                    "state": s.state.name,
                    "attempt": s.attempt,
                    # Carried over by a rerun: the parent run's job it is.
                    **({"reused_from": s.reused_from} if s.reused_from else {}),
                }
                for s in steps
            },
            "created_at": iso(row.created_us),
            "started_at": iso(row.started_us),
            "completed_at": iso(row.completed_us),
        }
        if failure is not None:
            data["failure"] = {"reason": failure.reason, "code": failure.code}
        if row.parent_run_id:
            data["parent"] = await parent_evidence(db, row.parent_run_id)
        relied = await attest_store.approvals_of(db, workflow_id)
        if relied:
            # The approval decisions (their attestations in this chain) it relied on.
            data["approvals"] = relied
        # Each completed step's result, as many as the budget holds (up to
        # MAX_STEPS results of up to 1 MiB each would not fit any response).
        outputs = [
            StoredOutput(name, job_id, size)
            for job_id, name, size in await store.result_sizes(db, workflow_id)
        ]
        annotations = await annotated.evidence(
            db,
            annotated.selector(run_id=workflow_id, workflow_id=workflow_id, job_id="", attempt=0),
        )
        evidence = await fit_outputs(
            data,
            "outputs",
            outputs,
            lambda job_ids: store.results(db, job_ids),
            # data["annotations"] is added whole, after the outputs are fitted.
            budget=self.evidence_budget - max(member_weight(annotated.MEMBER, annotations)),
            redaction=self.attestor.redaction,
        )
        await self.attestor.attest(
            db,
            key=f"{prefix}:{workflow_id}",
            type=type,
            tenant=tenant,
            entity_type="workflow",
            entity_id=workflow_id,
            chain_id=workflow_id,
            state=state,
            data=evidence,
            workflow_id=workflow_id,
            annotations=annotations,
            recorded_by=by,
        )

    def _log_workflow(
        self, tx: Tx, level: int, message: str, workflow_id: str, tenant: str, **fields: object
    ) -> None:
        if log.isEnabledFor(level):
            log_on_commit(
                tx, level, message, {"workflow_id": workflow_id, "tenant": tenant, **fields}
            )

    def _event(self, job: Job, by: str, **fields: object) -> TraceEvent:
        """An event of `job`; a step's carries its number and its workflow's
        step count (a standalone job's: 0 and 0)."""
        values: dict[str, object] = {
            "recorded_by": by,
            "run_id": run_of(job),
            "node_id": node_of(job),
            "job_id": job.id,
            "attempt": job.attempt,
            "worker_id": job.worker_id,
            "traceparent": job.traceparent,
            "step_number": job.step_number,
            "total_steps": job.total_steps,
        }
        values.update(fields)
        return TraceEvent(**values)  # type: ignore[arg-type]

    def _completed_event(
        self, job: Job, by: str, message: str, summary: JSON | None, now: int, **fields: object
    ) -> TraceEvent:
        """The COMPLETED event of a job (or an approval gate step): an outcome
        milestone at 100%, with its output summary."""
        return self._event(
            job,
            by,
            type=TraceType.COMPLETED,
            category=Category.BUSINESS,
            milestone=True,
            display_priority=PRIORITY_OUTCOME,
            percent=100.0,
            message=message,
            output_summary=summary,
            ts_us=now,
            **fields,
        )

    async def _record(self, db: AsyncSession, tx: Tx, job: Job, *events: TraceEvent) -> None:
        await self.trace.record(db, tx, job.tenant, list(events))

    async def _set_and_record(
        self,
        db: AsyncSession,
        tx: Tx,
        job: Job,
        changes: dict[str, object],
        *events: TraceEvent,
        also: Sequence[tuple[Query, Params]] = (),
    ) -> Job:
        """set_job and then _record (events of the job's run), and the INSERTs
        `also`, in one statement where the backend allows. The job must be
        locked (the UPDATE cannot miss it)."""
        new, values = await _changed(db, job, changes)
        update = store.job_update(job.id, values)
        row = await self.trace.record_after_update(db, tx, job.tenant, list(events), update, also)
        assert row is not None, f"job {job.id} vanished under its lock"
        return new

    async def claim(
        self,
        db: AsyncSession,
        tx: Tx,
        job: Job,
        worker_id: str,
        lease_deadline_us: int,
        now: int,
        session_id: str,
        holder: str,
        *,
        by: str,
        placement: JSON | None = None,
    ) -> Job | None:
        """Lease a QUEUED job (as a dispatch read saw it) to a worker session and
        record its start, in one statement where the backend allows: the job
        as claimed, or None with nothing changed if it is no longer QUEUED at
        that attempt (or another replica is claiming it right now). The
        STARTED event's data holds `placement`: why this worker (see
        dispatch.placement.Picked)."""
        event = self._started(job, worker_id, now, by, placement)
        update = store.claim_update(
            job.id, job.attempt, worker_id, lease_deadline_us, now, session_id, holder
        )
        row = await self.trace.record_after_update(db, tx, job.tenant, [event], update)
        if row is None:
            return None
        claimed = store.remember(store.job_from_row(row, context=True))
        await self._workflow_started(db, tx, claimed, now, by)
        return claimed

    async def claim_many(
        self,
        db: AsyncSession,
        tx: Tx,
        claims: Sequence[ClaimOf],
        lease_deadline_us: int,
        now: int,
    ) -> list[Job | None]:
        """Claims of several distinct standalone jobs, each as claim makes one
        (its STARTED event included), in three statements for all: each job
        as claimed, or None with nothing of it changed."""
        items = [
            (tx, c.job.tenant, self._started(c.job, c.worker_id, now, c.by, c.placement))
            for c in claims
        ]
        update = store.claim_many_update(
            db,
            [(c.job.id, c.job.attempt, c.worker_id, c.holder, c.session_id) for c in claims],
            lease_deadline_us,
            now,
        )
        rows = await self.trace.record_after_update_many(db, update, items)
        return [
            None
            if (row := rows.get(c.job.id)) is None
            else store.remember(store.job_from_row(row, context=True))
            for c in claims
        ]

    def _started(
        self, job: Job, worker_id: str, now: int, by: str, placement: JSON | None
    ) -> TraceEvent:
        """The STARTED event of a claim of `job` (as read, before its claim)
        for `worker_id`; its data holds `placement` (why this worker)."""
        attempt = job.attempt + 1
        return self._event(
            replace(job, attempt=attempt, worker_id=worker_id),
            by,
            type=TraceType.STARTED,
            category=Category.BUSINESS,
            milestone=True,
            display_priority=PRIORITY_START,
            message=f"{node_of(job)} started (attempt {attempt})",
            # The attempt's start as the job records it (started_us), so a
            # COMPLETED or FAILED event's duration spans exactly from here.
            ts_us=now,
            data={"placement": placement} if placement is not None else None,
        )

    async def _workflow_started(
        self, db: AsyncSession, tx: Tx, job: Job, now: int, by: str
    ) -> None:
        """A step's first start makes its workflow RUNNING, and records the
        workflow's STARTED event. The event is tied to the conditional change
        (QUEUED -> RUNNING, one UPDATE): of steps starting at once, on this
        replica or others, only the one whose UPDATE changed the row records
        it, once."""
        if not job.workflow_id:
            return
        total = await store.start_workflow(db, job.workflow_id, now)
        if total is None:
            return  # started already (or ended)
        await self.trace.record(
            db,
            tx,
            job.tenant,
            [
                TraceEvent(
                    run_id=job.workflow_id,
                    node_id=WORKFLOW_NODE,
                    type=TraceType.STARTED,
                    category=Category.BUSINESS,
                    milestone=True,
                    display_priority=PRIORITY_START,
                    step_number=0,
                    total_steps=total,
                    message=f"workflow started ({total} steps)",
                    ts_us=now,
                    traceparent=job.traceparent,
                    recorded_by=by,
                )
            ],
        )

    async def unclaim(self, db: AsyncSession, tx: Tx, job: Job, reason: str, now: int) -> Job:
        """Undo the claim of an attempt that never reached its worker (its stream
        ended before the worker was told): the job is QUEUED again at once, with
        the attempt number it had before the claim, so the attempt that never
        ran is not counted (no failure, no backoff, no attempt used up). Its
        number is reused by the next claim; no worker can hold it, since none
        was told of it."""
        # An attempt that never ran is no start: the first start is the next
        # claim's when this was the first.
        first: dict[str, object] = {"first_started_us": 0} if job.attempt <= 1 else {}
        queued = await set_job(
            db,
            job,
            state=RunState.QUEUED,
            attempt=job.attempt - 1,
            lease_deadline_us=0,
            next_attempt_us=0,
            updated_us=now,
            **first,
        )
        await self._record(
            db,
            tx,
            job,
            self._event(
                job,
                SYSTEM_SUBJECT,
                type=TraceType.LOG,
                level=Level.WARN,
                category=Category.TECHNICAL,
                display_priority=PRIORITY_TECHNICAL,
                message=f"{node_of(job)} attempt {job.attempt} never reached its worker "
                f"({reason}); queued again",
            ),
        )
        self.log_after(
            tx, logging.WARNING, "claim undone; job queued again", job, worker_id=job.worker_id
        )
        return queued

    async def progress(
        self, db: AsyncSession, tx: Tx, job: Job, percent: float, message: str, now: int, by: str
    ) -> Job:
        updated = await set_job(
            db, job, progress_percent=percent, progress_message=message, updated_us=now
        )
        await self.progressed(db, tx, updated, percent, message, by)
        return updated

    async def progress_if_held(self, db: AsyncSession, report: HeldProgress) -> Job | None:
        """Progress of an attempt whose lease `report.holder` holds, fenced and
        written with its trace event in one statement under the job's row lock
        (where the store allows it for this job): the job as updated, or None
        with nothing changed (refused, or not for this path): the caller then
        takes the general one (load_locked, fence, progress), which says why."""
        prepared = _held_progress_event(db, report)
        if prepared is None:
            return None
        tenant, event = prepared
        update = store.progress_update(
            report.job_id, report.attempt, report.holder, report.percent, report.message, now_us()
        )
        row = await self.trace.record_after_update(db, report.tx, tenant, [event], update)
        return None if row is None else store.job_from_row(row, context=True)

    async def progress_many_if_held(
        self, db: AsyncSession, reports: Sequence[HeldProgress]
    ) -> list[Job | None]:
        """Progress of several attempts of distinct jobs, each as
        progress_if_held writes one (fenced, with its trace event), in three
        statements for all: each job as updated, or None with nothing of it
        changed (refused, or not for this path): the caller then takes the
        general path for that report, which says why."""
        items: list[tuple[Tx, str, TraceEvent]] = []
        updates: list[tuple[str, int, str, float, str]] = []
        for r in reports:
            prepared = _held_progress_event(db, r)
            if prepared is None:
                continue
            items.append((r.tx, *prepared))
            updates.append((r.job_id, r.attempt, r.holder, r.percent, r.message))
        rows: dict[str, Row] = {}
        if items:
            update = store.progress_many_update(db, updates, now_us())
            rows = await self.trace.record_after_update_many(db, update, items)
        return [
            None if (row := rows.get(r.job_id)) is None else store.job_from_row(row, context=True)
            for r in reports
        ]

    async def progressed(
        self, db: AsyncSession, tx: Tx, job: Job, percent: float, message: str, by: str
    ) -> None:
        """The trace event of progress already written to the job."""
        await self._record(
            db,
            tx,
            job,
            self._event(
                job,
                by,
                type=TraceType.PROGRESS,
                category=Category.BUSINESS,
                percent=percent,
                message=message or f"{node_of(job)} at {percent:g}%",
            ),
        )

    async def complete(
        self,
        db: AsyncSession,
        tx: Tx,
        job: Job,
        result: JSON | None,
        now: int,
        by: str,
        *,
        summary: JSON | None = None,
        run_annotations: Sequence[Row] | None = None,
    ) -> list[Job]:
        """Complete a job with its result. Its COMPLETED event carries the
        attempt's duration and `summary` (the worker's own) as its
        output_summary, else one derived from the result (output_summary.derive).
        `run_annotations`: as _attest_job takes them (a job with no pending
        annotations, whose completion publishes none)."""
        c = Completing(job, result, now, by, summary, run_annotations)
        job, changes, event, attestation = await self._completion(db, c)
        done = await self._set_and_record(db, tx, job, changes, event, also=attestation)
        return await self._completed(db, tx, job, done, now, by)

    async def complete_many(
        self, db: AsyncSession, tx: Tx, items: Sequence[Completing]
    ) -> list[list[Job]]:
        """Complete several distinct standalone jobs (each locked, fenced, with
        no pending annotations), each as complete does (its COMPLETED event,
        its attestation, the new head of its chain), written together: one
        UPDATE of every job, one reservation and one INSERT of their events,
        one INSERT of their attestations. What complete returns, per item."""
        prepared = [await self._completion(db, c) for c in items]
        rows: list[tuple[str, dict[str, object]]] = []
        done: list[Job] = []
        events: list[tuple[Tx, str, TraceEvent]] = []
        also: list[tuple[Query, Params]] = []
        for job, changes, event, attestation in prepared:
            assert not job.workflow_id and not job.pending_annotations, job.id
            new, values = await _changed(db, job, changes)
            rows.append((job.id, values))
            done.append(new)
            events.append((tx, job.tenant, event))
            also.extend(attestation)
        if rows:
            update = store.jobs_update_many(db, rows)
            written = await self.trace.record_after_update_many(db, update, events, also)
            missed = [job_id for job_id, _ in rows if job_id not in written]
            assert not missed, f"jobs {missed} vanished under their lock"
        return [
            await self._completed(db, tx, job, new, c.now, c.by)
            for (job, *_), new, c in zip(prepared, done, items, strict=True)
        ]

    async def _completion(
        self, db: AsyncSession, c: Completing
    ) -> tuple[Job, dict[str, object], TraceEvent, list[tuple[Query, Params]]]:
        """What completing `c.job` writes: the job as it is then (its pending
        annotations published), its changes, its COMPLETED event and the
        INSERT of its attestation (sealed before the job's UPDATE, so that
        the UPDATE also records the new head of its attestation chain)."""
        job, result, now = c.job, c.result, c.now
        summary, run_annotations = c.summary, c.run_annotations
        if summary is None:
            summary = await output_summary.derive(result, self.trace.redaction)
        if job.pending_annotations:
            run_annotations = None  # published below: read them as they are then
        changes: dict[str, object] = {
            "state": RunState.COMPLETED,
            "result": result,
            "completed_us": now,
            "updated_us": now,
            "lease_deadline_us": 0,
            "failure": None,
            "progress_percent": 100.0,
        }
        # The attempt's annotations are published first: the attestation
        # vouches for them.
        job = await _publish_if_ending(db, job, changes)
        attestation: list[tuple[Query, Params]] = []
        head = await self._attest_job(
            db,
            replace(job, **changes),  # type: ignore[arg-type]
            AttestationType.WORKER_COMPLETION,
            f"worker-completion:{job.id}",
            {"result": result},
            c.by,
            keep_head=False,
            fold=attestation,
            run_annotations=run_annotations,
        )
        if head is not None:
            changes["chain_head"] = head
        event = self._completed_event(
            job,
            c.by,
            f"{node_of(job)} completed",
            summary,
            now,
            duration_us=attempt_duration_us(job, now),
        )
        return job, changes, event, attestation

    async def _completed(
        self, db: AsyncSession, tx: Tx, job: Job, done: Job, now: int, by: str
    ) -> list[Job]:
        """After a job's completion is written (`job` before it, `done` after):
        its log line and its run's end once committed, and its workflow
        advanced. The jobs changed: `done` first."""
        self.log_after(tx, logging.INFO, "job completed", job, worker_id=job.worker_id)
        if not job.workflow_id:
            self.trace.run_ended(tx, job.id)
        return [done, *await self._step_finished(db, tx, done, now, by)]

    async def fail_attempt(
        self,
        db: AsyncSession,
        tx: Tx,
        job: Job,
        failure: Failure,
        retryable: bool,
        now: int,
        *,
        by: str,
    ) -> list[Job]:
        """A failed attempt: retry with backoff while attempts remain and the failure
        is retryable, else fail the job (and its workflow). `by`: the worker's
        subject when it reported the failure, SYSTEM_SUBJECT for a lost lease."""
        backoff, avoid_holder = job.spec.backoff, ""
        rule = self.failure_rules.classify(job.spec.service, failure)
        if rule is not None:
            # A rule may only take retrying away (the worker's "not retryable"
            # stands) or change how the retry happens.
            failure = replace(failure, kind=rule.kind)
            retryable = retryable and rule.retryable is not False
            if rule.backoff is not None:
                backoff = rule.backoff.applied_to(backoff)
            if rule.avoid_same_worker:
                avoid_holder = job.lease_holder
        await self._record_failure(db, tx, job, failure, now)
        if retryable and job.attempt < job.spec.max_attempts:
            delay_us = backoff.delay_ms(job.attempt) * 1000
            queued = await set_job(
                db,
                job,
                state=RunState.QUEUED,
                failure=replace(failure, retryable=True),
                lease_deadline_us=0,
                next_attempt_us=now + delay_us,
                updated_us=now,
                avoid_holder=avoid_holder,
            )
            if failure.kind:
                await self._annotate_kind(db, job, failure.kind, now)
            await self._record(
                db,
                tx,
                job,
                self._failed_event(
                    job,
                    by,
                    failure,
                    Level.ERROR,
                    f"{node_of(job)} attempt {job.attempt} failed: {failure.reason}; "
                    f"retrying in {delay_us / 1e6:g}s",
                    now=now,
                    duration_us=attempt_duration_us(job, now),
                ),
            )
            queued = await self._attest_failure(db, queued, failure, True, by)
            service = job.spec.service

            def count_retry() -> None:
                self.retries[service] += 1

            tx.on_commit(count_retry)
            self.log_after(
                tx,
                logging.WARNING,
                "job attempt failed; retrying",
                job,
                worker_id=job.worker_id,
                reason=failure.reason,
                code=failure.code,
                retry_in_s=delay_us / 1e6,
            )
            return [queued]
        return await self.end_job(
            db,
            tx,
            job,
            RunState.FAILED,
            replace(failure, retryable=retryable),
            now,
            by=by,
            failed_attempt=True,
        )

    async def attempt_timed_out(
        self, db: AsyncSession, tx: Tx, job: Job, failure: Failure, now: int
    ) -> list[Job]:
        """A running attempt passed the job's timeout: the job ends TIMED_OUT
        (never retried), its failure classified by the rules (a kind only)."""
        rule = self.failure_rules.classify(job.spec.service, failure)
        if rule is not None:
            failure = replace(failure, kind=rule.kind)
        await self._record_failure(db, tx, job, failure, now)
        return await self.end_job(
            db, tx, job, RunState.TIMED_OUT, failure, now, by=SYSTEM_SUBJECT, failed_attempt=True
        )

    async def _record_failure(
        self, db: AsyncSession, tx: Tx, job: Job, failure: Failure, now: int
    ) -> None:
        """Keep a failed attempt for the failures summary, and count it."""
        await failures_store.insert_failure(
            db,
            tenant=job.tenant,
            job_id=job.id,
            attempt=job.attempt,
            service=job.spec.service,
            kind=failure.kind,
            code=failure.code,
            message=failure.reason,
            failed_us=now,
        )
        key = (job.spec.service, failure.kind)

        def count() -> None:
            self.failures[key] += 1

        tx.on_commit(count)

    async def _annotate_kind(self, db: AsyncSession, job: Job, kind: str, now: int) -> None:
        """The failed attempt's failure.kind annotation, recorded by the server
        (published at once: the attempt has ended), before its attestation,
        which then covers it."""
        await store.insert_annotations(
            db,
            [
                Annotation(
                    id=new_id("ann"),
                    tenant=job.tenant,
                    run_id=run_of(job),
                    key=FAILURE_KIND,
                    value=kind,
                    actor_kind=ACTOR_KIND_SYSTEM,
                    actor_id=SERVER_ACTOR,
                    created_us=now,
                    job_id=job.id,
                    attempt=job.attempt,
                    scope=AnnotationScope.ATTEMPT,
                    scope_id=job.step_name,
                    recorded_by=SYSTEM_SUBJECT,
                )
            ],
        )

    def _failed_event(
        self,
        job: Job,
        by: str,
        failure: Failure,
        level: Level,
        message: str,
        *,
        now: int,
        duration_us: int,
    ) -> TraceEvent:
        return self._event(
            job,
            by,
            type=TraceType.FAILED,
            level=level,
            category=Category.BUSINESS,
            milestone=level >= Level.CRITICAL,
            # CRITICAL: failed for good; ERROR: an attempt, to be retried.
            display_priority=PRIORITY_OUTCOME if level >= Level.CRITICAL else PRIORITY_RETRY,
            message=message,
            error=ErrorInfo(message=failure.reason, code=failure.code, stack=failure.details),
            ts_us=now,
            duration_us=duration_us,
        )

    async def end_job(
        self,
        db: AsyncSession,
        tx: Tx,
        job: Job,
        state: RunState,
        failure: Failure | None,
        now: int,
        *,
        by: str,
        failed_attempt: bool = False,
    ) -> list[Job]:
        """End a job in `state`; `by` is the subject whose action ended it (the
        canceller, the worker that failed it), SYSTEM_SUBJECT for a timeout."""
        ended = await set_job(
            db,
            job,
            state=state,
            failure=failure,
            completed_us=now,
            updated_us=now,
            lease_deadline_us=0,
            next_attempt_us=0,
        )
        if state in _ENDED_BY_OPERATOR:
            event = self._event(
                job,
                by,
                type=TraceType.LOG,
                level=Level.WARN,
                category=Category.BUSINESS,
                milestone=True,
                display_priority=PRIORITY_OUTCOME,
                message=_ENDED_BY_OPERATOR[state],
                data={"reason": failure.reason} if failure else None,
            )
        else:
            reason = failure.reason if failure else state.name.lower()
            event = self._failed_event(
                ended,
                by,
                failure or Failure(reason=reason),
                Level.CRITICAL,
                f"{node_of(job)} {state.name.lower().replace('_', ' ')}: {reason}",
                now=now,
                duration_us=attempt_duration_us(job, now),
            )
        await self._record(db, tx, job, event)
        self.log_after(
            tx,
            logging.INFO if state in _ENDED_BY_OPERATOR else logging.WARNING,
            f"job {state.name.lower().replace('_', ' ')}",
            job,
            reason=failure.reason if failure else "",
            code=failure.code if failure else "",
        )
        if failed_attempt and failure is not None:
            if failure.kind:
                await self._annotate_kind(db, job, failure.kind, now)
            ended = await self._attest_failure(db, ended, failure, False, by)
        stopped = _STOPPED.get(state)
        if stopped is not None and not job.workflow_id:
            # A step's cancellation or termination is in its workflow's attestation.
            kind, prefix, what, while_key, default_reason, default_code = stopped
            await self._attest_job(
                db,
                ended,
                kind,
                f"{prefix}:{job.id}",
                {
                    what: {
                        "reason": failure.reason if failure else default_reason,
                        "code": failure.code if failure else default_code,
                    },
                    # What it was doing then: waiting (QUEUED, maybe for a
                    # retry) or running the attempt (whose worker a terminate
                    # does not wait for).
                    while_key: job.state.name,
                },
                by,
            )
        if not job.workflow_id:
            self.trace.run_ended(tx, job.id)
        return [ended, *await self._step_finished(db, tx, ended, now, by)]

    # --- approval gates (the rules: domain/approvals.py) -------------------

    async def gate_waits(self, db: AsyncSession, tx: Tx, gate: Job, now: int, by: str) -> Job:
        """A gate whose dependencies completed: WAITING_FOR_HUMAN, its timeout
        (if any) counted from now."""
        assert gate.approval is not None
        timeout_ms = gate.approval.timeout_ms
        waiting = await set_job(
            db,
            gate,
            state=RunState.WAITING_FOR_HUMAN,
            started_us=now,
            updated_us=now,
            gate_deadline_us=now + timeout_ms * 1000 if timeout_ms else 0,
        )
        await self._record(db, tx, gate, self.gate_waiting_event(waiting, by))
        return waiting

    def gate_waiting_event(self, gate: Job, by: str) -> TraceEvent:
        assert gate.approval is not None
        rules = gate.approval
        return self._event(
            gate,
            by,
            type=TraceType.LOG,
            category=Category.BUSINESS,
            milestone=True,
            display_priority=PRIORITY_START,
            message=f"{node_of(gate)} waits for approval "
            f"({rules.min_approvals} of {', '.join(rules.approvers)})",
            data={"approvers": list(rules.approvers), "min_approvals": rules.min_approvals},
            ts_us=gate.updated_us,
        )

    async def workflow_waiting(self, db: AsyncSession, workflow_id: str, now: int) -> None:
        """A workflow with a waiting gate and no step queued or running is
        WAITING_FOR_HUMAN; it goes back to RUNNING (QUEUED if no step ever
        started) when work is queued again. A paused or ended one is left be."""
        found = await store.workflow_state(db, workflow_id)
        if found is None:
            return
        current, started_us = found
        if current.terminal or current == RunState.PAUSED:
            return
        waiting, active = await store.gate_counts(db, workflow_id)
        if waiting and not active:
            target = RunState.WAITING_FOR_HUMAN
        elif current == RunState.WAITING_FOR_HUMAN:
            target = RunState.RUNNING if started_us else RunState.QUEUED
        else:
            return
        if target != current:
            states.check_transition(states.RunKind.WORKFLOW, workflow_id, current, target)
            await store.update_workflow(db, workflow_id, state=int(target), updated_us=now)

    async def attest_approval(
        self, db: AsyncSession, gate: Job, number: int, approval: JSON, by: str
    ) -> None:
        """Attest the `number`-th decision on a gate, in its workflow's chain;
        it covers the annotations that recorded it (their attempt: `number`)."""
        assert gate.workflow_id
        await self.attestor.attest(
            db,
            key=f"approval:{gate.workflow_id}:{gate.step_name}:{number}",
            type=AttestationType.APPROVAL,
            tenant=gate.tenant,
            entity_type="job",
            entity_id=gate.id,
            chain_id=gate.workflow_id,
            state=gate.state,
            data={
                "recorded_by": by,
                "request_context": await store.request_context_for(db, gate),
                "step_name": gate.step_name,
                "approval": approval,
            },
            workflow_id=gate.workflow_id,
            job_id=gate.id,
            attempt=number,
            annotations=await annotated.evidence(
                db,
                annotated.selector(
                    run_id=gate.workflow_id,
                    workflow_id=gate.workflow_id,
                    job_id=gate.id,
                    attempt=number,
                ),
            ),
            recorded_by=by,
        )

    async def gate_decision(
        self,
        db: AsyncSession,
        tx: Tx,
        gate: Job,
        decisions: tuple[ApprovalDecision, ...],
        now: int,
        by: str,
        message: str,
    ) -> list[Job]:
        """A decision that leaves the gate waiting (more approvals needed)."""
        kept = await set_job(db, gate, decisions=decisions, updated_us=now)
        await self._record(
            db,
            tx,
            gate,
            self._event(gate, by, type=TraceType.LOG, category=Category.BUSINESS, message=message),
        )
        return [kept]

    async def gate_completed(
        self,
        db: AsyncSession,
        tx: Tx,
        gate: Job,
        decisions: tuple[ApprovalDecision, ...],
        result: JSON,
        now: int,
        by: str,
    ) -> list[Job]:
        """A gate approved (or skipped after a rejection): COMPLETED with
        `result`, and its workflow goes on as after any step."""
        done = await set_job(
            db,
            gate,
            state=RunState.COMPLETED,
            result=result,
            decisions=decisions,
            completed_us=now,
            updated_us=now,
            gate_deadline_us=0,
            failure=None,
            progress_percent=100.0,
        )
        verdict = "approved" if result.get("approved") else "skipped (not approved)"
        await self._record(
            db,
            tx,
            gate,
            self._completed_event(
                gate,
                by,
                f"{node_of(gate)} {verdict}",
                {"approved": result.get("approved"), "skipped": result.get("skipped")},
                now,
            ),
        )
        self.log_after(tx, logging.INFO, f"approval gate {verdict}", gate)
        return [done, *await self._step_finished(db, tx, done, now, by)]

    async def gate_ended(
        self,
        db: AsyncSession,
        tx: Tx,
        gate: Job,
        decisions: tuple[ApprovalDecision, ...],
        state: RunState,
        failure: Failure,
        now: int,
        by: str,
    ) -> list[Job]:
        """A gate rejected (FAILED) or past its timeout (TIMED_OUT): its
        workflow fails as after any step that did not complete."""
        gate = await set_job(db, gate, decisions=decisions, gate_deadline_us=0)
        return await self.end_job(db, tx, gate, state, failure, now, by=by)

    async def _step_finished(
        self, db: AsyncSession, tx: Tx, step: Job, now: int, by: str
    ) -> list[Job]:
        """Advance or end the workflow of a step that reached a terminal state."""
        if not step.workflow_id:
            return []
        # Reads what this step's end can change, not every step whole: a
        # workflow has up to MAX_STEPS steps, each result up to 1 MiB, and
        # every step's end passes here.
        workflow_id = step.workflow_id
        changed: list[Job] = []
        child = fan_out.parent_of(step.step_name)
        if child is not None:
            parent_changed = await self._child_finished(db, tx, step, child[0], now, by)
            if parent_changed is not None:
                return parent_changed
        if step.state == RunState.COMPLETED:
            progress_recorded = False
            pending = await store.workflow_steps(db, [workflow_id], states=[RunState.PENDING])
            if pending[workflow_id]:
                completed = await store.workflow_steps(
                    db, [workflow_id], states=[RunState.COMPLETED]
                )
                done = {s.name for s in completed[workflow_id]}
                ready = [
                    s.job_id for s in pending[workflow_id] if all(d in done for d in s.depends_on)
                ]
                whole = {j.id: j for j in await store.jobs_by_id(db, ready)}
                fanning = [whole[i] for i in ready if whole[i].for_each is not None]
                if fanning and fan_out.parent_of(step.step_name) is None:
                    # A fan-out step may end at once and advance the workflow
                    # from there: this step's progress goes first.
                    _, _, steps_now = await store.step_progress(
                        db, workflow_id, fan_out.CHILD_INDEX_BASE
                    )
                    progress = self._workflow_progress(step, steps_now, now, by)
                    await self.trace.record(db, tx, step.tenant, [progress])
                    progress_recorded = True
                for job_id in ready:
                    if whole[job_id].approval is not None:
                        changed.append(await self.gate_waits(db, tx, whole[job_id], now, by))
                    elif whole[job_id].for_each is None:
                        changed.append(
                            await set_job(db, whole[job_id], state=RunState.QUEUED, updated_us=now)
                        )
                for parent in fanning:
                    started, ended = await self._fan_out(db, tx, parent, now, by)
                    changed += started
                    if ended:
                        # The step ended at once (its list was empty, or it
                        # failed) and its end advanced the workflow, starting
                        # the other ready fan-out steps, or ended it.
                        return changed
            # Jobs (fan-out children too), and the declared steps completed.
            done_count, total, steps_done = await store.step_progress(
                db, workflow_id, fan_out.CHILD_INDEX_BASE
            )
            # The workflow's progress when a declared step (not a fan-out
            # child, which is an item of its step) completed.
            progressed = (
                [self._workflow_progress(step, steps_done, now, by)]
                if fan_out.parent_of(step.step_name) is None and not progress_recorded
                else []
            )
            if done_count == total:
                outputs = await self._outputs(db, workflow_id)
                started_us = await store.end_workflow_row(
                    db,
                    step.workflow_id,
                    state=int(RunState.COMPLETED),
                    completed_steps=done_count,
                    completed_us=now,
                    updated_us=now,
                    outputs=codec.step_results_dumps(outputs),
                )
                await self.trace.record(
                    db,
                    tx,
                    step.tenant,
                    [
                        *progressed,
                        TraceEvent(
                            run_id=step.workflow_id,
                            node_id=WORKFLOW_NODE,
                            type=TraceType.COMPLETED,
                            category=Category.BUSINESS,
                            milestone=True,
                            display_priority=PRIORITY_OUTCOME,
                            percent=100.0,
                            step_number=step.total_steps,
                            total_steps=step.total_steps,
                            message=f"workflow completed ({done_count} steps)",
                            traceparent=step.traceparent,
                            recorded_by=by,
                            ts_us=now,
                            duration_us=max(0, now - started_us) if started_us else 0,
                        ),
                    ],
                )
                self._log_workflow(
                    tx, logging.INFO, "workflow completed", step.workflow_id, step.tenant
                )
                await self._attest_workflow(
                    db, step.workflow_id, step.tenant, RunState.COMPLETED, None, by
                )
                self.trace.run_ended(tx, step.workflow_id)
                await self._workflow_span(db, tx, step.workflow_id, RunState.COMPLETED, now)
            elif progressed:
                # The progress event rides in the workflow's UPDATE statement.
                update = store.workflow_progress_update(step.workflow_id, done_count, now)
                await self.trace.record(db, tx, step.tenant, progressed, also=[update])
            else:
                await store.update_workflow(
                    db, step.workflow_id, completed_steps=done_count, updated_us=now
                )
            if done_count != total:
                await self.workflow_waiting(db, step.workflow_id, now)
            return changed
        # A step ended without completing: the workflow fails (or is cancelled,
        # or terminated, as the step was) and every step that has not ended is
        # cancelled (terminated). A step that timed out fails it, code TIMED_OUT.
        workflow_state = (
            step.state
            if step.state in (RunState.CANCELLED, RunState.TERMINATED)
            else RunState.FAILED
        )
        failure = Failure(
            reason=f"step {step.step_name!r} {_said(step.state)}"
            + (f": {step.failure.reason}" if step.failure else ""),
            code=step.failure.code if step.failure else step.state.name,
            attempt=step.attempt,
        )
        changed += await self.cancel_steps(
            db,
            tx,
            (await store.workflow_jobs(db, [workflow_id], unfinished=True))[workflow_id],
            f"workflow {workflow_state.name.lower()}: step {step.step_name!r} did not complete",
            "DEPENDENCY_FAILED",
            now,
            by=by,
            quiet=True,
            state=RunState.TERMINATED
            if workflow_state == RunState.TERMINATED
            else RunState.CANCELLED,
        )
        await self.end_workflow(
            db,
            tx,
            step.workflow_id,
            step.tenant,
            workflow_state,
            failure,
            now,
            by=by,
            traceparent=step.traceparent,
        )
        return changed

    def _workflow_progress(self, step: Job, done: int, now: int, by: str) -> TraceEvent:
        """The workflow's PROGRESS event once `step` completed, `done` of its
        declared steps completed in all."""
        total = step.total_steps
        assert step.workflow_id
        return TraceEvent(
            run_id=step.workflow_id,
            node_id=WORKFLOW_NODE,
            type=TraceType.PROGRESS,
            category=Category.BUSINESS,
            percent=100.0 * done / total if total else 100.0,
            step_number=done,
            total_steps=total,
            message=f"{done} of {total} steps",
            data={"step": step.step_name, "step_number": step.step_number},
            traceparent=step.traceparent,
            recorded_by=by,
            ts_us=now,
        )

    async def _fan_out(
        self, db: AsyncSession, tx: Tx, parent: Job, now: int, by: str
    ) -> tuple[list[Job], bool]:
        """Start a ready fan-out step, in the transaction that completed its
        last dependency: its children are stored QUEUED and it RUNNING (it
        runs no attempt itself). Returns what changed and whether the step
        ended at once: completed with [] (no items) or failed (no list, or
        too many items), the workflow advanced or ended by that end."""
        assert parent.for_each is not None and parent.workflow_id
        upstream = await store.step_result(db, parent.workflow_id, parent.for_each.step)
        found = fan_out.items(upstream[1] if upstream else None, parent.for_each)
        if isinstance(found, str):
            failure = Failure(reason=found, code="FOR_EACH_INVALID")
            return await self.end_job(db, tx, parent, RunState.FAILED, failure, now, by=by), True
        if not found:
            empty: Any = []  # a fan-out step's result is a list
            return await self.complete(db, tx, parent, empty, now, by), True
        payload = parent.spec.payload if isinstance(parent.spec.payload, dict) else {}
        children = [
            replace(
                parent,
                id=new_id(JOB_PREFIX),
                spec=replace(parent.spec, payload={**payload, fan_out.ITEM_KEY: item}),
                state=RunState.QUEUED,
                created_us=now,
                updated_us=now,
                step_name=fan_out.child_name(parent.step_name, i),
                for_each=None,
                seq=0,
            )
            for i, item in enumerate(found)
        ]
        # Listed after every submitted step (MAX_STEPS of them), in item order.
        await store.insert_jobs(
            db,
            [
                store.job_values(c, {}, step_index=fan_out.CHILD_INDEX_BASE + i)
                for i, c in enumerate(children)
            ],
        )
        running = await set_job(
            db,
            parent,
            state=RunState.RUNNING,
            started_us=now,
            first_started_us=parent.first_started_us or now,
            updated_us=now,
            progress_message=f"{len(children)} items",
        )
        await self._record(
            db,
            tx,
            parent,
            self._event(
                parent,
                by,
                type=TraceType.STARTED,
                category=Category.BUSINESS,
                message=f"{node_of(parent)} fans out to {len(children)} jobs",
            ),
        )
        await self._workflow_started(db, tx, running, now, by)
        return [running, *children], False

    async def start_fan_out(
        self, db: AsyncSession, tx: Tx, parent: Job, now: int, by: str
    ) -> tuple[list[Job], bool]:
        """Start a fan-out step whose dependencies are done without a step
        completing in this transaction (a rerun carried them over); see
        _fan_out."""
        return await self._fan_out(db, tx, parent, now, by)

    async def _child_finished(
        self, db: AsyncSession, tx: Tx, child: Job, parent_name: str, now: int, by: str
    ) -> list[Job] | None:
        """A fan-out child ended: its step fails when it did not complete and
        completes with every child's result once all have. None when the
        step goes on (the workflow's progress is counted as for any step)."""
        assert child.workflow_id
        parent = await store.step_job(db, child.workflow_id, parent_name)
        if parent is None or parent.state.terminal:
            return []  # the step ended already (its workflow failed or was cancelled)
        if child.state != RunState.COMPLETED:
            index = fan_out.parent_of(child.step_name)
            failure = Failure(
                reason=f"item {index[1] if index else '?'} {_said(child.state)}"
                + (f": {child.failure.reason}" if child.failure else ""),
                code=child.failure.code if child.failure else child.state.name,
                attempt=child.attempt,
            )
            return await self.end_job(db, tx, parent, RunState.FAILED, failure, now, by=by)
        prefix = fan_out.child_name(parent_name, 0)[:-2]  # "step["
        done, total = await store.prefixed_counts(db, child.workflow_id, prefix)
        if done < total:
            return None
        found = await store.prefixed_results(db, child.workflow_id, prefix)
        ordered = sorted(found, key=lambda c: (fan_out.parent_of(c[0]) or ("", 0))[1])
        # A list, where results are objects: only a fan-out step's is one.
        results: Any = [r for _, r in ordered]
        return await self.complete(db, tx, parent, results, now, by)

    async def _outputs(self, db: AsyncSession, workflow_id: str) -> StepResults:
        """A completing workflow's outputs: the results of the steps it named,
        or of those no other step depends on."""
        names = await store.workflow_output_steps(db, workflow_id)
        if not names:
            steps = (await store.workflow_steps(db, [workflow_id]))[workflow_id]
            names = step_data.output_steps([s.name for s in steps], [s.depends_on for s in steps])
        return await step_data.results_of(db, workflow_id, names)

    async def cancel_steps(
        self,
        db: AsyncSession,
        tx: Tx,
        steps: list[Job],
        reason: str,
        code: str,
        now: int,
        *,
        by: str,
        quiet: bool = False,
        state: RunState = RunState.CANCELLED,
    ) -> list[Job]:
        """End the steps not ended yet in `state` (CANCELLED, or TERMINATED),
        with `reason` and `code` as their failure."""
        changed = []
        verb = state.name.lower()
        for s in steps:
            if s.state.terminal:
                continue
            changed.append(
                await set_job(
                    db,
                    s,
                    state=state,
                    completed_us=now,
                    updated_us=now,
                    lease_deadline_us=0,
                    next_attempt_us=0,
                    failure=Failure(reason=reason, code=code, attempt=s.attempt),
                )
            )
            self.log_after(tx, logging.INFO, f"job {verb}", s, reason=reason, code=code)
            if not quiet or s.state == RunState.RUNNING:
                await self._record(
                    db,
                    tx,
                    s,
                    self._event(
                        s,
                        by,
                        type=TraceType.LOG,
                        level=Level.WARN,
                        category=Category.TECHNICAL,
                        display_priority=PRIORITY_TECHNICAL,
                        message=f"{node_of(s)} {verb}: {reason}",
                    ),
                )
        return changed

    async def end_workflow(
        self,
        db: AsyncSession,
        tx: Tx,
        workflow_id: str,
        tenant: str,
        state: RunState,
        failure: Failure | None,
        now: int,
        *,
        by: str,
        traceparent: str = "",
    ) -> None:
        started_us = await store.end_workflow_row(
            db,
            workflow_id,
            state=int(state),
            failure=codec.failure_dumps(failure),
            completed_us=now,
            updated_us=now,
        )
        if state in _ENDED_BY_OPERATOR:
            event = TraceEvent(
                run_id=workflow_id,
                node_id=WORKFLOW_NODE,
                type=TraceType.LOG,
                level=Level.WARN,
                category=Category.BUSINESS,
                milestone=True,
                display_priority=PRIORITY_OUTCOME,
                message=_ENDED_BY_OPERATOR[state],
                data={"reason": failure.reason} if failure else None,
                traceparent=traceparent,
                recorded_by=by,
            )
        else:
            reason = failure.reason if failure else "failed"
            event = TraceEvent(
                run_id=workflow_id,
                node_id=WORKFLOW_NODE,
                type=TraceType.FAILED,
                level=Level.CRITICAL,
                category=Category.BUSINESS,
                milestone=True,
                display_priority=PRIORITY_OUTCOME,
                message=f"workflow {state.name.lower()}: {reason}",
                error=ErrorInfo(message=reason, code=failure.code if failure else ""),
                traceparent=traceparent,
                recorded_by=by,
                ts_us=now,
                # The run's: from its start (its first step's), if it started.
                duration_us=max(0, now - started_us) if started_us else 0,
            )
        await self.trace.record(db, tx, tenant, [event])
        self._log_workflow(
            tx,
            logging.INFO if state in _ENDED_BY_OPERATOR else logging.WARNING,
            f"workflow {state.name.lower().replace('_', ' ')}",
            workflow_id,
            tenant,
            reason=failure.reason if failure else "",
        )
        await self._attest_workflow(db, workflow_id, tenant, state, failure, by)
        self.trace.run_ended(tx, workflow_id)
        await self._workflow_span(db, tx, workflow_id, state, now)
