"""Queries over jobs, workflows, submissions and annotations."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import (
    LargeBinary,
    case,
    cast,
    delete,
    exists,
    func,
    insert,
    select,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from jobtrace.model import (
    JSON,
    TERMINAL_STATES,
    Annotation,
    AnnotationScope,
    ApprovalDecision,
    ApprovalGate,
    Disposition,
    ForEach,
    Job,
    JobSpec,
    OnReject,
    OnTimeout,
    RunState,
    Workflow,
    WorkflowStep,
)
from jobtrace.store import codec, sql
from jobtrace.store import flow as flow_store
from jobtrace.store.listing import (
    Chunk,
    Listing,
    created_between,
    read_chunk,
    stored_size,
    unindexed,
)
from jobtrace.store.sql import Params, Query, Row
from jobtrace.store.tables import (
    WORKFLOW_DEADLINE_PENDING,
    AnnotationRow,
    JobLabelRow,
    JobRow,
    Meta,
    PendingAnnotationRow,
    Submission,
    WorkflowLabelRow,
    WorkflowRow,
)


async def get_meta(session: AsyncSession, key: str) -> str | None:
    return (await session.execute(select(Meta.value).where(Meta.key == key))).scalar()


async def put_meta(session: AsyncSession, key: str, value: str) -> str:
    """Store a value unless one is there already (another replica may have won);
    return the stored value."""
    insert_ = postgresql.insert if sql.dialect(session) == "postgresql" else sqlite.insert
    await session.execute(
        insert_(Meta).values(key=key, value=value).on_conflict_do_nothing(index_elements=["key"])
    )
    stored = await get_meta(session, key)
    assert stored is not None
    return stored


_GET_SUBMISSION = Query(
    "SELECT kind, entity_id, request_hash FROM submissions"
    " WHERE tenant = :tenant AND request_id = :request_id"
)
_INSERT_SUBMISSION = Query(
    "INSERT INTO submissions (tenant, request_id, kind, entity_id, request_hash, created_us)"
    " VALUES (:tenant, :request_id, :kind, :entity_id, :request_hash, :created_us)"
)


_CLAIM_SUBMISSION = Query(
    _INSERT_SUBMISSION.sqlite + " ON CONFLICT (tenant, request_id) DO NOTHING"
)


async def claim_submission(
    session: AsyncSession,
    *,
    tenant: str,
    request_id: str,
    kind: str,
    entity_id: str,
    request_hash: str,
    created_us: int,
) -> bool:
    """Record a request id for a new entity unless it is recorded already:
    whether it was (False: an earlier submission has it; see get_submission).
    One statement for the common case, a request id never seen."""
    changed = await sql.execute(
        session,
        _CLAIM_SUBMISSION,
        {
            "tenant": tenant,
            "request_id": request_id,
            "kind": kind,
            "entity_id": entity_id,
            "request_hash": request_hash,
            "created_us": created_us,
        },
    )
    return changed > 0


async def get_submission(session: AsyncSession, tenant: str, request_id: str) -> Row | None:
    """The earlier submission of a request id: its kind, entity_id and request_hash."""
    return await sql.fetch_one(
        session, _GET_SUBMISSION, {"tenant": tenant, "request_id": request_id}
    )


async def insert_submission(
    session: AsyncSession,
    *,
    tenant: str,
    request_id: str,
    kind: str,
    entity_id: str,
    request_hash: str,
    created_us: int,
) -> None:
    await sql.execute(
        session,
        _INSERT_SUBMISSION,
        {
            "tenant": tenant,
            "request_id": request_id,
            "kind": kind,
            "entity_id": entity_id,
            "request_hash": request_hash,
            "created_us": created_us,
        },
    )


SUBMISSIONS = Submission.__table__
_SUBMISSION_COLUMNS = ("tenant", "request_id", "kind", "entity_id", "request_hash", "created_us")
# Request ids looked up per statement (get_submissions).
_IDS_PER_LOOKUP = 1000


async def get_submissions(
    session: AsyncSession, tenant: str, request_ids: Sequence[str]
) -> dict[str, Row]:
    """The earlier submissions of these request ids (request_id -> its kind,
    entity_id and request_hash); one statement per 1,000 ids."""
    found: dict[str, Row] = {}
    ids = list(dict.fromkeys(request_ids))
    for start in range(0, len(ids), _IDS_PER_LOOKUP):
        chunk = ids[start : start + _IDS_PER_LOOKUP]
        names = ", ".join(f":r{i}" for i in range(len(chunk)))
        q = _lookup_query(len(chunk), names)
        params: Params = {"tenant": tenant, **{f"r{i}": r for i, r in enumerate(chunk)}}
        for row in await sql.fetch(session, q, params):
            found[str(row["request_id"])] = row
    return found


_LOOKUPS: dict[int, Query] = {}


def _lookup_query(count: int, names: str) -> Query:
    q = _LOOKUPS.get(count)
    if q is None:
        if len(_LOOKUPS) > 64:
            _LOOKUPS.clear()
        q = _LOOKUPS[count] = Query(
            "SELECT request_id, kind, entity_id, request_hash FROM submissions"
            f" WHERE tenant = :tenant AND request_id IN ({names})"
        )
    return q


async def insert_submissions(session: AsyncSession, rows: Sequence[Params]) -> None:
    """Record many request ids (each row: tenant, request_id, kind, entity_id,
    request_hash, created_us) in multi-row statements. A request id recorded
    already (a concurrent submission) raises IntegrityError: nothing stored."""
    for q, params in sql.multi_row(SUBMISSIONS, _SUBMISSION_COLUMNS, rows):
        await sql.execute(session, q, params)


async def insert_new_jobs(session: AsyncSession, jobs: Sequence[tuple[Job, JSON]]) -> list[Job]:
    """Store new jobs (each with its request context) in multi-row statements;
    return them as insert_job does, in the same order."""
    values = [job_values(job, context) for job, context in jobs]
    seqs: dict[str, int] = {}
    for q, params in sql.multi_row(JOBS, JOB_COLUMNS, values, " RETURNING id, seq"):
        for row in await sql.fetch(session, q, params):
            seqs[str(row["id"])] = int(row["seq"])
    return [_stored(job, v, seqs[job.id]) for (job, _), v in zip(jobs, values, strict=True)]


def user_of(request_context: JSON) -> str:
    """The user a request context names (user_context.user_id); '' when none."""
    user = request_context.get("user_context") if isinstance(request_context, dict) else None
    found = user.get("user_id") if isinstance(user, dict) else None
    return found if isinstance(found, str) else ""


def gate_dumps(gate: ApprovalGate | None) -> str | None:
    if gate is None:
        return None
    return codec.dumps(
        {
            "approvers": list(gate.approvers),
            "min_approvals": gate.min_approvals,
            "timeout_ms": gate.timeout_ms,
            "on_timeout": int(gate.on_timeout),
            "policy_version": gate.policy_version,
            "on_reject": int(gate.on_reject),
        }
    )


def gate_loads(text: str | None) -> ApprovalGate | None:
    if text is None:
        return None
    d = codec.loads(text)
    return ApprovalGate(
        approvers=tuple(d["approvers"]),
        min_approvals=d["min_approvals"],
        timeout_ms=d["timeout_ms"],
        on_timeout=OnTimeout(d["on_timeout"]),
        policy_version=d["policy_version"],
        on_reject=OnReject(d["on_reject"]),
    )


def decisions_dumps(decisions: Sequence[ApprovalDecision]) -> str:
    return codec.dumps(
        [
            {"by": d.approver, "d": int(d.disposition), "c": d.comment, "at": d.decided_us}
            for d in decisions
        ]
    )


def decisions_loads(text: str | None) -> tuple[ApprovalDecision, ...]:
    return tuple(
        ApprovalDecision(d["by"], Disposition(d["d"]), d["c"], d["at"])
        for d in codec.loads(text or "[]")
    )


def job_values(job: Job, request_context: JSON, step_index: int = 0) -> dict[str, Any]:
    spec = job.spec
    return {
        "id": job.id,
        "tenant": job.tenant,
        "request_id": job.request_id,
        "workflow_id": job.workflow_id,
        "step_name": job.step_name,
        "step_index": step_index,
        "step_number": job.step_number,
        "total_steps": job.total_steps,
        "depends_on": codec.dumps(list(job.depends_on)),
        "for_each": None
        if job.for_each is None
        else codec.dumps({"step": job.for_each.step, "path": job.for_each.path}),
        "service": spec.service,
        "payload": codec.dumps(spec.payload),
        "priority": spec.priority,
        "max_attempts": spec.max_attempts,
        "timeout_ms": spec.timeout_ms,
        "not_before_us": spec.not_before_us,
        "affinity_keys": codec.dumps(list(spec.affinity_keys)),
        "labels": codec.dumps(spec.labels),
        "backoff": codec.backoff_dumps(spec.backoff),
        "worker_labels": codec.requirements_dumps(spec.worker_labels),
        "affinity": codec.affinity_dumps(spec.affinity),
        "placement_class": codec.placement_class(spec.worker_labels),
        "request_context": codec.dumps(request_context),
        "state": int(job.state),
        "attempt": job.attempt,
        "progress_percent": job.progress_percent,
        "progress_message": job.progress_message,
        "result": None if job.result is None else codec.dumps(job.result),
        "failure": codec.failure_dumps(job.failure),
        "worker_id": job.worker_id,
        "lease_session": job.lease_session,
        "lease_holder": job.lease_holder,
        "pending_annotations": job.pending_annotations,
        "lease_deadline_us": job.lease_deadline_us,
        "next_attempt_us": job.next_attempt_us,
        "traceparent": job.traceparent,
        "created_us": job.created_us,
        "updated_us": job.updated_us,
        "started_us": job.started_us,
        "completed_us": job.completed_us,
        "first_started_us": job.first_started_us,
        "submitted_by": job.submitted_by,
        # A new standalone job's chain is empty; a step's is its workflow's.
        "chain_seq": None if job.workflow_id else 0,
        "chain_digest": None if job.workflow_id else "",
        "user_id": job.user_id or user_of(request_context),
        "avoid_holder": job.avoid_holder,
        "parent_run_id": job.parent_run_id,
        "root_run_id": job.root_run_id,
        "reused_from": job.reused_from,
        "approval": gate_dumps(job.approval),
        "approval_decisions": decisions_dumps(job.decisions),
        "gate_deadline_us": job.gate_deadline_us,
        "held": job.held,
        "flow": flow_store.dumps(spec),
        "flow_key": flow_store.flow_key(job.tenant, spec),
        "concurrency_key": "" if spec.concurrency is None else spec.concurrency.resolved,
    }


JOBS = JobRow.__table__
JOB_LABELS = JobLabelRow.__table__
WORKFLOW_LABELS = WorkflowLabelRow.__table__
JOB_COLUMNS = sql.columns(JOBS, without=("seq",))
_INSERT_JOB = sql.insert_query(JOBS, JOB_COLUMNS)
_INSERT_JOB_RETURNING_SEQ = sql.insert_query(JOBS, JOB_COLUMNS, " RETURNING seq")
_JOB = "SELECT * FROM jobs WHERE id = :id"
_GET_JOB = {
    (False, False): Query(_JOB),
    (True, False): Query(_JOB + " AND tenant = :tenant"),
    (False, True): Query(_JOB, _JOB + " FOR UPDATE"),
    (True, True): Query(_JOB + " AND tenant = :tenant", _JOB + " AND tenant = :tenant FOR UPDATE"),
}


async def insert_jobs(session: AsyncSession, rows: Sequence[dict[str, Any]]) -> None:
    await sql.execute_many(session, _INSERT_JOB, rows)


def _insert_job_if_new() -> Query:
    """PostgreSQL: record the request id and insert the job in one statement;
    the job only if the request id was new (no row returned: it was not)."""
    pg = postgresql.dialect()  # type: ignore[no-untyped-call]
    quoted = ", ".join(f'"{n}"' for n in JOB_COLUMNS)
    typed = ", ".join(f"CAST(:{n} AS {JOBS.c[n].type.compile(dialect=pg)})" for n in JOB_COLUMNS)
    return Query(
        "WITH s AS (INSERT INTO submissions"
        " (tenant, request_id, kind, entity_id, request_hash, created_us)"
        " VALUES (:tenant, :request_id, 'job', :id, :request_hash, :created_us)"
        " ON CONFLICT (tenant, request_id) DO NOTHING RETURNING 1)"
        f" INSERT INTO jobs ({quoted}) SELECT {typed} FROM s RETURNING seq"
    )


_INSERT_JOB_IF_NEW: list[Query] = []


async def insert_job_if_new(
    session: AsyncSession, job: Job, request_context: JSON, request_hash: str
) -> Job | None:
    """Record a new job's request id (see claim_submission) and store the job,
    unless the request id is recorded already: then None, nothing stored. One
    statement on PostgreSQL, two on SQLite."""
    if _is_sqlite(session):
        new = await claim_submission(
            session,
            tenant=job.tenant,
            request_id=job.request_id,
            kind="job",
            entity_id=job.id,
            request_hash=request_hash,
            created_us=job.created_us,
        )
        return await insert_job(session, job, request_context) if new else None
    if not _INSERT_JOB_IF_NEW:
        _INSERT_JOB_IF_NEW.append(_insert_job_if_new())
    values = job_values(job, request_context)
    # The submission's tenant, request id, entity id (the job's id) and time
    # are the job's own columns.
    seq = await sql.scalar(session, _INSERT_JOB_IF_NEW[0], {**values, "request_hash": request_hash})
    return None if seq is None else _stored(job, values, int(seq))


async def insert_job(session: AsyncSession, job: Job, request_context: JSON) -> Job:
    """Store a new job; return it as a read would: with the position (seq) it was
    given, and its payload and labels as stored (keys in their stored order)."""
    values = job_values(job, request_context)
    seq = await sql.scalar(session, _INSERT_JOB_RETURNING_SEQ, values)
    return _stored(job, values, int(seq))


def _stored(job: Job, values: dict[str, Any], seq: int) -> Job:
    spec = replace(
        job.spec, payload=codec.loads(values["payload"]), labels=codec.loads(values["labels"])
    )
    stored = replace(job, seq=seq, spec=spec, request_context=values["request_context"])
    if not job.workflow_id:
        stored = replace(stored, chain_head=(0, ""))
    return _remember(stored)


def job_from_row(row: Row, *, full: bool = True, context: bool = False) -> Job:
    """A job from its row (any mapping of column name to value); without
    `full`, a row read without payload and result (both left empty); with
    `context`, a whole row: the job carries its request_context."""
    row = sql.by_name(row)  # some 50 columns
    flow = row["flow"]
    rate_limits, concurrency = flow_store.loads(flow) if flow else ((), None)
    return Job(
        id=row["id"],
        tenant=row["tenant"],
        request_id=row["request_id"],
        spec=JobSpec(
            service=row["service"],
            payload=codec.loads(row["payload"]) if full else {},
            priority=row["priority"],
            max_attempts=row["max_attempts"],
            timeout_ms=row["timeout_ms"],
            not_before_us=row["not_before_us"],
            affinity_keys=tuple(codec.loads(row["affinity_keys"])),
            labels=codec.loads(row["labels"]),
            backoff=codec.backoff_loads(row["backoff"]),
            worker_labels=codec.requirements_loads(row["worker_labels"]),
            affinity=codec.affinity_loads(row["affinity"]),
            rate_limits=rate_limits,
            concurrency=concurrency,
        ),
        state=RunState(row["state"]),
        created_us=row["created_us"],
        updated_us=row["updated_us"],
        workflow_id=row["workflow_id"],
        step_name=row["step_name"],
        depends_on=tuple(codec.loads(row["depends_on"])),
        attempt=row["attempt"],
        progress_percent=row["progress_percent"],
        progress_message=row["progress_message"],
        result=codec.loads(row["result"]) if full else None,
        failure=codec.failure_loads(row["failure"]),
        worker_id=row["worker_id"],
        started_us=row["started_us"],
        completed_us=row["completed_us"],
        lease_deadline_us=row["lease_deadline_us"],
        next_attempt_us=row["next_attempt_us"],
        traceparent=row["traceparent"],
        seq=row["seq"],
        lease_session=row["lease_session"],
        lease_holder=row["lease_holder"],
        pending_annotations=row["pending_annotations"],
        first_started_us=row["first_started_us"],
        submitted_by=row["submitted_by"],
        for_each=_for_each(row["for_each"]),
        user_id=row["user_id"] if "user_id" in row else "",
        avoid_holder=row["avoid_holder"],
        request_context=row["request_context"] if context else None,
        chain_head=_chain_head(row) if context else None,
        step_number=row["step_number"],
        total_steps=row["total_steps"],
        parent_run_id=row["parent_run_id"],
        root_run_id=row["root_run_id"],
        reused_from=row["reused_from"],
        approval=gate_loads(row["approval"]),
        decisions=decisions_loads(row["approval_decisions"]),
        gate_deadline_us=row["gate_deadline_us"],
        held=row["held"],
    )


def _for_each(text: str | None) -> ForEach | None:
    if text is None:
        return None
    d = codec.loads(text)
    return ForEach(d["step"], d.get("path", ""))


def _chain_head(row: Row) -> tuple[int, str] | None:
    seq = row["chain_seq"]
    return None if seq is None else (int(seq), str(row["chain_digest"]))


async def get_job(
    session: AsyncSession, job_id: str, tenant: str | None = None, *, for_update: bool = False
) -> Job | None:
    params = {"id": job_id} if tenant is None else {"id": job_id, "tenant": tenant}
    row = await sql.fetch_one(session, _GET_JOB[tenant is not None, for_update], params)
    return None if row is None else _remember(job_from_row(row, context=True))


async def _jobs(session: AsyncSession, stmt: Any) -> list[Job]:
    """The jobs a Core select of whole job rows finds."""
    return [job_from_row(r) for r in (await session.execute(stmt)).mappings()]


async def lock_workflow(session: AsyncSession, workflow_id: str) -> None:
    """Row-lock a workflow (PostgreSQL; SQLite's single writer needs none). Every
    transition of a step locks its workflow first, then the step: one order, so
    replicas serialise on the workflow and never deadlock."""
    await session.execute(
        select(WorkflowRow.seq).where(WorkflowRow.id == workflow_id).with_for_update()
    )


# The workflow of jobs read or written lately ('' for a standalone job): a
# job's workflow never changes, so a transition of a job seen before locks
# it with one statement (its workflow's lock first, for a step). Bounded: the
# oldest entry goes when it is full; a job not found is read first.
_WORKFLOW_OF: dict[str, str] = {}
WORKFLOW_OF_MAX = 65_536
# Likewise (bounded alike) what else of a job never changes: (tenant, step
# name, step number, total steps).
_IDENTITY_OF: dict[str, tuple[str, str, int, int]] = {}


def remember(job: Job) -> Job:
    """Note a job read or written (its workflow and identity, for the
    one-statement paths); the job itself."""
    return _remember(job)


def _remember(job: Job) -> Job:
    if job.id not in _WORKFLOW_OF:
        if len(_WORKFLOW_OF) >= WORKFLOW_OF_MAX:
            oldest = next(iter(_WORKFLOW_OF))
            del _WORKFLOW_OF[oldest]
            _IDENTITY_OF.pop(oldest, None)
        _WORKFLOW_OF[job.id] = job.workflow_id
        _IDENTITY_OF[job.id] = (job.tenant, job.step_name, job.step_number, job.total_steps)
    return job


def one_statement_run(session: AsyncSession, job_id: str) -> tuple[str, str, str, int, int] | None:
    """(tenant, run id, node id, step number, total steps) of a job whose
    fenced transition may be written by one statement (see progress_update):
    a job seen lately, and on PostgreSQL a standalone one (a step is locked
    after its workflow)."""
    workflow_id = _WORKFLOW_OF.get(job_id)
    identity = _IDENTITY_OF.get(job_id)
    if workflow_id is None or identity is None:
        return None
    if workflow_id and not _is_sqlite(session):
        return None
    tenant, step_name, step_number, total_steps = identity
    return tenant, workflow_id or job_id, step_name or job_id, step_number, total_steps


async def load_locked(session: AsyncSession, job_id: str, tenant: str | None = None) -> Job | None:
    """A job read under its row lock (after its workflow's), for a transition."""
    if _is_sqlite(session):  # one writer connection: the transaction is the lock
        return await get_job(session, job_id, tenant)
    workflow_id = _WORKFLOW_OF.get(job_id)
    if workflow_id is None:
        job = await get_job(session, job_id, tenant)
        if job is None:
            return None
        workflow_id = job.workflow_id
    if workflow_id:
        await lock_workflow(session, workflow_id)
    return await get_job(session, job_id, tenant, for_update=True)


def is_standalone(job_id: str) -> bool:
    """Whether a job seen lately is a standalone one (False: a step, or not
    seen lately: unknown)."""
    return _WORKFLOW_OF.get(job_id) == ""


_LOCK_MANY = Query(
    "SELECT * FROM jobs WHERE id IN (SELECT value FROM json_each(:ids)) ORDER BY id",
    postgresql="SELECT * FROM jobs WHERE id = ANY(CAST(:id_list AS TEXT[])) ORDER BY id FOR UPDATE",
)


async def load_locked_many(session: AsyncSession, job_ids: Sequence[str]) -> dict[str, Job]:
    """Standalone jobs read under their row locks (taken in id order), as
    load_locked reads one, by id; an id not found, or a workflow step's
    (locked after its workflow: see load_locked), is left out."""
    ordered = sorted(job_ids)
    params: Params = {"ids": codec.dumps(ordered)} if _is_sqlite(session) else {"id_list": ordered}
    rows = await sql.fetch(session, _LOCK_MANY, params)
    jobs = [_remember(job_from_row(r, context=True)) for r in rows]
    return {job.id: job for job in jobs if not job.workflow_id}


# A standalone job's attestation covers its run's annotations of attempt 0
# (run-level) and of the attempt (see domain.annotated.selector).
_ANNOTATIONS_OF_RUNS = Query(
    "SELECT a.* FROM json_each(:runs) AS r JOIN annotations AS a"
    " ON a.run_id = json_extract(r.value, '$[0]')"
    " AND a.attempt IN (0, json_extract(r.value, '$[1]')) ORDER BY a.seq",
    postgresql="SELECT a.* FROM unnest(CAST(:run_list AS TEXT[]), CAST(:attempts AS INTEGER[]))"
    " AS r(run_id, attempt) JOIN annotations AS a ON a.run_id = r.run_id"
    " AND a.attempt IN (0, r.attempt) ORDER BY a.seq",
)


async def annotations_of_runs(
    session: AsyncSession, runs: Sequence[tuple[str, int]]
) -> dict[str, list[Row]]:
    """Rows (mappings) of the annotations of these (standalone job's run,
    attempt), run-level ones and the attempt's, by run, each run's in
    publication (seq) order: what attested_annotations reads of each, at once."""
    ordered = sorted(runs)
    params = _list_params(session, ordered, "runs", ("run_list", "attempts"))
    found: dict[str, list[Row]] = {r: [] for r, _ in ordered}
    for row in await sql.fetch(session, _ANNOTATIONS_OF_RUNS, params):
        found[row["run_id"]].append(row)
    return found


def _list_params(
    session: AsyncSession, rows: Sequence[Sequence[Any]], sqlite_name: str, pg_names: Sequence[str]
) -> Params:
    """A list of rows as a statement takes it: on SQLite one JSON array of
    arrays (read with json_each), on PostgreSQL one array per column (unnest)."""
    if _is_sqlite(session):
        return {sqlite_name: codec.dumps([list(r) for r in rows])}
    return {name: [r[i] for r in rows] for i, name in enumerate(pg_names)}


# What a job listing reads: never request_context (a Job does not carry it),
# and payload and result only for the FULL view.
_JOB_HEAVY = ("payload", "result")
_JOB_SIZED = (
    "depends_on",
    "affinity_keys",
    "labels",
    "worker_labels",
    "affinity",
    "progress_message",
    "failure",
)
_JOB_LISTED = [c for c in JOBS.c if c.name != "request_context"]


@dataclass(frozen=True, slots=True)
class RunQuery:
    """Which jobs or workflows a listing reads; empty / None fields match all.
    `labels`: pairs that must all be among the run's labels; `created_*_us`:
    at or after, before (exclusive). `service`, `workflow_id` and `worker_id`
    filter jobs only, `name` workflows only."""

    state: RunState | None = None
    service: str = ""
    workflow_id: str = ""
    name: str = ""
    labels: tuple[tuple[str, str], ...] = ()
    user_id: str = ""
    worker_id: str = ""
    created_after_us: int | None = None
    created_before_us: int | None = None
    # A run's reruns: one level (parent), or its whole chain (root).
    parent_run_id: str = ""
    root_run_id: str = ""
    # Only runs in one of these states (with `state`, both hold); () all.
    states: tuple[RunState, ...] = ()
    # Jobs only: leave workflow steps out (standalone jobs only).
    standalone: bool = False


@dataclass(frozen=True, slots=True)
class _Keyset:
    """How a listing of runs reads: `key` orders it (a run's seq, or the seq
    column of the label rows that drive it); `labels` are the conditions on
    the label rows alone; `runs` those on the runs (joined to the label rows
    when there are labels)."""

    key: Any
    labels: list[Any]
    runs: list[Any]
    # What is counted: the driving label rows, or the runs.
    table: Any
    # The conditions on the runs alone (labels never change): what a row
    # picked by its size is checked against again when it is read.
    recheck: list[Any]

    @property
    def where(self) -> list[Any]:
        return self.labels + self.runs


# One filter of a listing: its column, and its conditions on that column (or
# on listing.unindexed(column), which no index serves).
Filter = tuple[Any, Callable[[Any], list[Any]]]


def _keyset(
    labels_table: Any,
    ref: str,
    run_seq: Any,
    tenant: str | None,
    q: RunQuery,
    above: list[Filter],
    below: list[Filter],
    *,
    ranked: bool,
) -> _Keyset:
    """The first label pair drives a listing by labels: its rows of the label
    table's primary key (tenant, key, value, seq) are walked in seq order,
    each joined to its run; each further pair is a point lookup in that key.

    `above` and `below` are the other filters, most selective first, ranked
    above or below labels. `ranked` (SQLite, which keeps no statistics and so
    cannot tell a user's hundred jobs from a state's thirty thousand) lets
    only the first filter be served by its index, labels included, and checks
    the others on the rows it yields. Unranked (PostgreSQL), the planner
    weighs them with its statistics.

    A creation window (both bounds) read in seq order would be looked for
    from the newest row down, however old it is (PostgreSQL's planner bets on
    it with a LIMIT); unless a filter above labels serves the listing, it is
    ordered by an unindexed seq: its rows are read from the time index, then
    sorted."""
    runs = [run_seq.table.c.tenant == tenant] if tenant is not None else []
    drive = bool(q.labels) and not (ranked and above)
    for i, (column, conditions) in enumerate(above + below):
        indexed = not ranked or (i == 0 and not drive)
        runs += conditions(column if indexed else unindexed(column))
    if not q.labels:
        window = q.created_after_us is not None and q.created_before_us is not None
        key = unindexed(run_seq) if window and not above else run_seq
        return _Keyset(key, [], runs, run_seq.table, runs)
    seq, where, table, recheck = run_seq, [], run_seq.table, list(runs)
    pairs = list(q.labels)
    if drive:
        (key, value), *pairs = pairs
        first = table = labels_table.alias("l0")
        seq = first.c[ref]
        where = [first.c.key == key, first.c.value == value]
        if tenant is not None:
            where.append(first.c.tenant == tenant)
        runs.insert(0, seq == run_seq)
    for i, (key, value) in enumerate(pairs, 1):
        other = labels_table.alias(f"l{i}")
        match = [other.c.key == key, other.c.value == value, other.c[ref] == seq]
        if tenant is not None:
            match.append(other.c.tenant == tenant)
        where.append(exists().where(*match))
    return _Keyset(seq, where, runs, table, recheck)


def job_keyset(tenant: str | None, q: RunQuery, *, ranked: bool = False) -> _Keyset:
    """A listing of jobs: each filter served by an index of JobRow's (tenant
    first), labels by job_labels' primary key; `ranked`: see _keyset."""
    above: list[Filter] = []
    # A run's reruns are few: these come first.
    if q.root_run_id:
        above.append((JobRow.root_run_id, lambda c: [c == q.root_run_id]))
    if q.parent_run_id:
        above.append((JobRow.parent_run_id, lambda c: [c == q.parent_run_id]))
    if q.workflow_id:
        above.append((JobRow.workflow_id, lambda c: [c == q.workflow_id]))
    if q.user_id:
        above.append((JobRow.user_id, lambda c: [c == q.user_id]))
    if q.worker_id:
        above.append((JobRow.worker_id, lambda c: [c == q.worker_id]))
    below: list[Filter] = []
    if q.service:
        below.append((JobRow.service, lambda c: [c == q.service]))
    if q.state is not None:
        below.append((JobRow.state, lambda c: [c == int(q.state or 0)]))
    if q.states:
        below.append((JobRow.state, lambda c: [c.in_([int(s) for s in q.states])]))
    if q.standalone:
        below.append((JobRow.workflow_id, lambda c: [c == ""]))
    if q.created_after_us is not None or q.created_before_us is not None:
        below.append(
            (
                JobRow.created_us,
                lambda c: created_between(c, q.created_after_us, q.created_before_us),
            )
        )
    return _keyset(JOB_LABELS, "job_seq", JobRow.seq, tenant, q, above, below, ranked=ranked)


def workflow_keyset(tenant: str | None, q: RunQuery, *, ranked: bool = False) -> _Keyset:
    """A listing of workflows, as job_keyset's."""
    above: list[Filter] = []
    # A run's reruns are few: these come first.
    if q.root_run_id:
        above.append((WorkflowRow.root_run_id, lambda c: [c == q.root_run_id]))
    if q.parent_run_id:
        above.append((WorkflowRow.parent_run_id, lambda c: [c == q.parent_run_id]))
    if q.user_id:
        above.append((WorkflowRow.user_id, lambda c: [c == q.user_id]))
    below: list[Filter] = []
    if q.name:
        below.append((WorkflowRow.name, lambda c: [c == q.name]))
    if q.state is not None:
        below.append((WorkflowRow.state, lambda c: [c == int(q.state or 0)]))
    if q.states:
        below.append((WorkflowRow.state, lambda c: [c.in_([int(s) for s in q.states])]))
    if q.created_after_us is not None or q.created_before_us is not None:
        below.append(
            (
                WorkflowRow.created_us,
                lambda c: created_between(c, q.created_after_us, q.created_before_us),
            )
        )
    return _keyset(
        WORKFLOW_LABELS, "workflow_seq", WorkflowRow.seq, tenant, q, above, below, ranked=ranked
    )


async def count_runs(session: AsyncSession, keyset: _Keyset, only_labels: bool) -> int:
    """How many runs a listing holds over all its pages. Filtered by labels
    alone (and the tenant), the label rows are counted without their runs:
    each carries its run's tenant, labels never change and runs are never
    deleted."""
    if only_labels:
        stmt = select(func.count()).select_from(keyset.table).where(*keyset.labels)
    else:
        stmt = select(func.count()).select_from(keyset.table).where(*keyset.where)
    return int((await session.execute(stmt)).scalar() or 0)


async def count_jobs(session: AsyncSession, tenant: str | None, query: RunQuery) -> int:
    """How many jobs a listing with these filters holds, over all its pages."""
    only_labels = bool(query.labels) and query == RunQuery(labels=query.labels)
    keyset = job_keyset(tenant, query, ranked=_is_sqlite(session))
    return await count_runs(session, keyset, only_labels)


async def count_workflows(session: AsyncSession, tenant: str | None, query: RunQuery) -> int:
    """How many workflows a listing with these filters holds, over all its pages."""
    only_labels = bool(query.labels) and query == RunQuery(labels=query.labels)
    keyset = workflow_keyset(tenant, query, ranked=_is_sqlite(session))
    return await count_runs(session, keyset, only_labels)


async def read_jobs(
    session: AsyncSession,
    *,
    tenant: str | None,
    query: RunQuery,
    after: int | None,
    limit: int,
    max_bytes: int,
    full: bool,
) -> Chunk[Job]:
    """Newest first; keyset on seq, which only grows, so pages never shift."""
    heavy = _JOB_HEAVY if full else ()
    keyset = job_keyset(tenant, query, ranked=_is_sqlite(session))
    listing = Listing(
        key=keyset.key,
        where=keyset.where,
        columns=[c for c in _JOB_LISTED if full or c.name not in _JOB_HEAVY],
        sized=[JOBS.c[name] for name in (*_JOB_SIZED, *heavy)],
        descending=True,
        row_key=JobRow.seq,
        recheck=keyset.recheck,
    )
    return await read_chunk(
        session,
        listing,
        after=after,
        limit=limit,
        max_bytes=max_bytes,
        build=lambda row: job_from_row(row, full=full),
    )


async def workflow_jobs(
    session: AsyncSession, workflow_ids: Iterable[str], *, unfinished: bool = False
) -> dict[str, list[Job]]:
    """The steps of these workflows, whole, in submission order; with
    `unfinished`, only those that have not ended."""
    ids = list(workflow_ids)
    out: dict[str, list[Job]] = {i: [] for i in ids}
    if not ids:
        return out
    where = [JobRow.workflow_id.in_(ids)]
    if unfinished:
        where.append(JobRow.state.not_in([int(s) for s in TERMINAL_STATES]))
    stmt = select(JOBS).where(*where).order_by(JobRow.workflow_id, JobRow.step_index)
    for job in await _jobs(session, stmt):
        out[job.workflow_id].append(job)
    return out


_STEP_COLUMNS = (
    JobRow.workflow_id,
    JobRow.id,
    JobRow.step_name,
    JobRow.state,
    JobRow.depends_on,
    JobRow.attempt,
    JobRow.progress_percent,
    JobRow.progress_message,
    JobRow.reused_from,
    JobRow.approval,
    JobRow.approval_decisions,
    JobRow.gate_deadline_us,
)


async def workflow_steps(
    session: AsyncSession, workflow_ids: Iterable[str], *, states: Collection[RunState] = ()
) -> dict[str, list[WorkflowStep]]:
    """The steps of these workflows in submission order (only those in
    `states`, if given), read from their jobs' step columns alone (never a
    payload or a result)."""
    ids = list(workflow_ids)
    out: dict[str, list[WorkflowStep]] = {i: [] for i in ids}
    if not ids:
        return out
    where = [JobRow.workflow_id.in_(ids)]
    if states:
        where.append(JobRow.state.in_([int(s) for s in states]))
    stmt = select(*_STEP_COLUMNS).where(*where).order_by(JobRow.workflow_id, JobRow.step_index)
    for r in (await session.execute(stmt)).mappings():
        out[r["workflow_id"]].append(
            WorkflowStep(
                name=r["step_name"],
                job_id=r["id"],
                state=RunState(r["state"]),
                depends_on=tuple(codec.loads(r["depends_on"])),
                attempt=r["attempt"],
                progress_percent=r["progress_percent"],
                progress_message=r["progress_message"],
                reused_from=r["reused_from"],
                approval=gate_loads(r["approval"]),
                decisions=decisions_loads(r["approval_decisions"]),
                gate_deadline_us=r["gate_deadline_us"],
            )
        )
    return out


async def step_counts(
    session: AsyncSession, workflow_ids: Iterable[str]
) -> dict[str, tuple[int, int]]:
    """(completed, all) steps of these workflows, counted by the database."""
    ids = list(workflow_ids)
    if not ids:
        return {}
    completed = func.sum(case((JobRow.state == int(RunState.COMPLETED), 1), else_=0))
    stmt = (
        select(JobRow.workflow_id, completed, func.count())
        .where(JobRow.workflow_id.in_(ids))
        .group_by(JobRow.workflow_id)
    )
    return {w: (int(done or 0), int(n)) for w, done, n in (await session.execute(stmt)).all()}


async def step_progress(
    session: AsyncSession, workflow_id: str, child_index_base: int
) -> tuple[int, int, int]:
    """(completed, all) jobs of a workflow (its steps and their fan-out
    children, whose step_index is from `child_index_base`), and its declared
    steps completed: one query."""
    completed = JobRow.state == int(RunState.COMPLETED)
    stmt = select(
        func.sum(case((completed, 1), else_=0)),
        func.count(),
        func.sum(case(((JobRow.step_index < child_index_base) & completed, 1), else_=0)),
    ).where(JobRow.workflow_id == workflow_id)
    done, total, steps_done = (await session.execute(stmt)).one()
    return int(done or 0), int(total), int(steps_done or 0)


# A step a rerun carried over holds no result of its own: it is read from the
# parent run's job it reuses (jobs.reused_from), joined as _SOURCE.
_SOURCE = aliased(JobRow, name="source")
_WITH_SOURCE = JobRow.__table__.outerjoin(
    _SOURCE, (JobRow.reused_from != "") & (_SOURCE.id == JobRow.reused_from)
)
# The job whose result a step's is, and that result.
_RESULT_JOB = func.coalesce(_SOURCE.id, JobRow.id)
_RESULT = func.coalesce(_SOURCE.result, JobRow.result)


async def result_sizes(session: AsyncSession, workflow_id: str) -> list[tuple[str, str, int]]:
    """(job id, step name, stored bytes of its result) of each completed step
    of a workflow, smallest result first; no result is read. A carried-over
    step's is its source's (that job's id, its result's size)."""
    size = stored_size(session, [_RESULT])
    stmt = (
        select(_RESULT_JOB, JobRow.step_name, size)
        .select_from(_WITH_SOURCE)
        .where(JobRow.workflow_id == workflow_id, JobRow.state == int(RunState.COMPLETED))
        .order_by(size, JobRow.step_index)
    )
    return [(i, name, int(n)) for i, name, n in (await session.execute(stmt)).all()]


async def step_results(
    session: AsyncSession, workflow_id: str, step_names: Collection[str], read_up_to: int
) -> list[tuple[str, str, int, JSON | None]]:
    """(step name, job id, stored bytes of its result, the result) of each
    COMPLETED step of these names, in one query on the workflow's index; a
    result larger than `read_up_to` bytes is not read (None). A carried-over
    step's result is its source job's, and that job is named."""
    if sql.dialect(session) == "postgresql":
        size = func.octet_length(_RESULT)
    else:
        size = func.length(cast(_RESULT, LargeBinary))
    size = func.coalesce(size, 0)
    stmt = (
        select(
            JobRow.step_name,
            _RESULT_JOB,
            size,
            case((size <= read_up_to, _RESULT), else_=None),
        )
        .select_from(_WITH_SOURCE)
        .where(
            JobRow.workflow_id == workflow_id,
            JobRow.step_name.in_(sorted(step_names)),
            JobRow.state == int(RunState.COMPLETED),
        )
    )
    return [
        (name, job_id, int(n), codec.loads(text) if text is not None else None)
        for name, job_id, n, text in (await session.execute(stmt)).all()
    ]


async def step_result(
    session: AsyncSession, workflow_id: str, step_name: str
) -> tuple[RunState, JSON | None] | None:
    """The state and result of one step of a workflow (a carried-over
    step's: its source job's); None if it has no such step."""
    stmt = (
        select(JobRow.state, _RESULT)
        .select_from(_WITH_SOURCE)
        .where(JobRow.workflow_id == workflow_id, JobRow.step_name == step_name)
    )
    row = (await session.execute(stmt)).first()
    return None if row is None else (RunState(row[0]), codec.loads(row[1]))


async def step_job(session: AsyncSession, workflow_id: str, step_name: str) -> Job | None:
    """One step of a workflow, whole, by its name."""
    stmt = select(JOBS).where(JobRow.workflow_id == workflow_id, JobRow.step_name == step_name)
    found = await _jobs(session, stmt)
    return found[0] if found else None


def _named_from(prefix: str) -> Any:
    # substr, not LIKE: step names may hold "_", a LIKE wildcard.
    return func.substr(JobRow.step_name, 1, len(prefix)) == prefix


async def prefixed_counts(session: AsyncSession, workflow_id: str, prefix: str) -> tuple[int, int]:
    """(completed, all) jobs of a workflow whose step name starts with
    `prefix` (a fan-out step's children), counted by the database."""
    completed = func.sum(case((JobRow.state == int(RunState.COMPLETED), 1), else_=0))
    stmt = select(completed, func.count()).where(
        JobRow.workflow_id == workflow_id, _named_from(prefix)
    )
    row = (await session.execute(stmt)).one()
    return int(row[0] or 0), int(row[1])


async def prefixed_results(
    session: AsyncSession, workflow_id: str, prefix: str
) -> list[tuple[str, JSON | None]]:
    """(step name, result) of the jobs of a workflow whose step name starts
    with `prefix`."""
    stmt = select(JobRow.step_name, JobRow.result).where(
        JobRow.workflow_id == workflow_id, _named_from(prefix)
    )
    return [(name, codec.loads(r)) for name, r in (await session.execute(stmt)).all()]


async def results(session: AsyncSession, job_ids: Iterable[str]) -> dict[str, JSON]:
    """The results of these jobs, by job id."""
    ids = list(job_ids)
    if not ids:
        return {}
    stmt = select(JobRow.id, JobRow.result).where(JobRow.id.in_(ids))
    return {i: codec.loads(r) for i, r in (await session.execute(stmt)).all()}


def workflow_from_row(
    row: Row,
    steps: Sequence[WorkflowStep],
    counts: tuple[int, int] | None = None,
) -> Workflow:
    """A workflow from its row (a mapping) and its steps; with `counts` (a
    listing that leaves the steps out), from the step counts instead."""
    return Workflow(
        id=row["id"],
        tenant=row["tenant"],
        request_id=row["request_id"],
        name=row["name"],
        state=RunState(row["state"]),
        priority=row["priority"],
        steps=tuple(steps),
        created_us=row["created_us"],
        updated_us=row["updated_us"],
        labels=codec.loads(row["labels"]),
        started_us=row["started_us"],
        completed_us=row["completed_us"],
        failure=codec.failure_loads(row["failure"]),
        seq=row["seq"],
        step_counts=counts,
        submitted_by=row["submitted_by"],
        outputs=codec.step_results_loads(row["outputs"]) if "outputs" in row else None,
        deadline_us=row["deadline_us"] if "deadline_us" in row else 0,
        parent_run_id=row["parent_run_id"],
        root_run_id=row["root_run_id"],
        rerun_reason=row["rerun_reason"],
        paused_us=row["paused_us"],
        pause_reason=row["pause_reason"],
    )


async def insert_workflow(
    session: AsyncSession,
    workflow: Workflow,
    request_context: JSON,
    output_steps: Sequence[str] = (),
) -> None:
    await session.execute(
        insert(WorkflowRow).values(
            id=workflow.id,
            tenant=workflow.tenant,
            request_id=workflow.request_id,
            name=workflow.name,
            state=int(workflow.state),
            priority=workflow.priority,
            labels=codec.dumps(workflow.labels),
            request_context=codec.dumps(request_context),
            total_steps=len(workflow.steps),
            completed_steps=workflow.completed_steps,
            failure=codec.failure_dumps(workflow.failure),
            created_us=workflow.created_us,
            updated_us=workflow.updated_us,
            started_us=workflow.started_us,
            completed_us=workflow.completed_us,
            submitted_by=workflow.submitted_by,
            output_steps=codec.dumps(list(output_steps)),
            user_id=user_of(request_context),
            deadline_us=workflow.deadline_us,
            parent_run_id=workflow.parent_run_id,
            root_run_id=workflow.root_run_id,
            rerun_reason=workflow.rerun_reason,
        )
    )


async def workflow_output_steps(session: AsyncSession, workflow_id: str) -> list[str]:
    """The output step names a workflow was submitted with ([]: the default)."""
    stmt = select(WorkflowRow.output_steps).where(WorkflowRow.id == workflow_id)
    return list(codec.loads((await session.execute(stmt)).scalar_one()))


async def get_workflow_row(
    session: AsyncSession, workflow_id: str, tenant: str | None = None
) -> WorkflowRow | None:
    stmt = select(WorkflowRow).where(WorkflowRow.id == workflow_id)
    if tenant is not None:
        stmt = stmt.where(WorkflowRow.tenant == tenant)
    return (await session.execute(stmt)).scalar_one_or_none()


WORKFLOWS = WorkflowRow.__table__
# request_context is read only to hand it to workers and attestations;
# outputs only for a whole workflow (not a BASIC listing).
_WORKFLOW_LISTED = [c for c in WORKFLOWS.c if c.name != "request_context"]
_WORKFLOW_BASIC = [c for c in _WORKFLOW_LISTED if c.name != "outputs"]


async def get_workflow(
    session: AsyncSession, workflow_id: str, tenant: str | None = None
) -> Workflow | None:
    stmt = select(*_WORKFLOW_LISTED).where(WorkflowRow.id == workflow_id)
    if tenant is not None:
        stmt = stmt.where(WorkflowRow.tenant == tenant)
    row = (await session.execute(stmt)).mappings().first()
    if row is None:
        return None
    steps = await workflow_steps(session, [row["id"]])
    return workflow_from_row(row, steps[row["id"]])


async def read_workflows(
    session: AsyncSession,
    *,
    tenant: str | None,
    query: RunQuery,
    after: int | None,
    limit: int,
    max_bytes: int,
    full: bool,
) -> Chunk[Workflow]:
    """Newest first, keyset on seq. FULL reads the steps (their stored size is
    counted before they are read); BASIC only counts them."""
    keyset = workflow_keyset(tenant, query, ranked=_is_sqlite(session))
    step_bytes = None
    if full:
        step_bytes = (
            select(func.coalesce(func.sum(stored_size(session, [JobRow.depends_on])), 0))
            .where(JobRow.workflow_id == WorkflowRow.id)
            .scalar_subquery()
        )
    listing = Listing(
        key=keyset.key,
        where=keyset.where,
        columns=_WORKFLOW_LISTED if full else _WORKFLOW_BASIC,
        sized=[WorkflowRow.labels, WorkflowRow.failure, *([WorkflowRow.outputs] if full else [])],
        descending=True,
        extra_size=step_bytes,
        row_key=WorkflowRow.seq,
        recheck=keyset.recheck,
    )
    chunk = await read_chunk(
        session, listing, after=after, limit=limit, max_bytes=max_bytes, build=lambda row: row
    )
    ids = [row["id"] for row in chunk.items]
    if full:
        steps = await workflow_steps(session, ids)
        workflows = [workflow_from_row(row, steps[row["id"]]) for row in chunk.items]
    else:
        counts = await step_counts(session, ids)
        workflows = [
            workflow_from_row(row, (), counts.get(row["id"], (0, 0))) for row in chunk.items
        ]
    return Chunk(workflows, chunk.after, chunk.exhausted)


_UPDATE_JOB: dict[tuple[str, ...], Query] = {}


async def update_job(session: AsyncSession, job_id: str, **values: Any) -> None:
    """Set these columns of a job (plain values, not SQL expressions)."""
    columns = tuple(values)
    q = _UPDATE_JOB.get(columns)
    if q is None:
        if not set(columns) <= set(JOB_COLUMNS) - {"id"}:
            raise ValueError(f"not a job column: {sorted(set(columns) - set(JOB_COLUMNS))}")
        assignments = ", ".join(f"{c} = :{c}" for c in columns)
        q = _UPDATE_JOB[columns] = Query(f"UPDATE jobs SET {assignments} WHERE id = :job_id_")
    await sql.execute(session, q, {**values, "job_id_": job_id})


def job_update(job_id: str, values: dict[str, Any]) -> tuple[Query, Params]:
    """The UPDATE of these columns of a job, RETURNING the row (to run with
    the transition's trace events: store.trace.update_and_store_events)."""
    columns = tuple(values)
    q = _UPDATE_JOB_RETURNING.get(columns)
    if q is None:
        _check_updatable(columns)
        assignments = ", ".join(f"{c} = :{c}" for c in columns)
        q = _UPDATE_JOB_RETURNING[columns] = Query(
            f"UPDATE jobs SET {assignments} WHERE id = :job_id_ RETURNING *"
        )
    return q, {**values, "job_id_": job_id}


_UPDATE_JOB_RETURNING: dict[tuple[str, ...], Query] = {}


def _check_updatable(columns: tuple[str, ...]) -> None:
    """Columns an UPDATE of a job may set (its id is not one)."""
    if not set(columns) <= set(JOB_COLUMNS) - {"id"}:
        raise ValueError(f"not a job column: {sorted(set(columns) - set(JOB_COLUMNS))}")


def jobs_update_many(
    session: AsyncSession, rows: Sequence[tuple[str, dict[str, object]]]
) -> tuple[Query, Params]:
    """The UPDATE of several jobs, each row (job id, its column values; every
    row the same columns, in the same order) as job_update writes one, in one
    statement RETURNING each job's id and traceparent (to run with their
    transitions' trace events: store.trace.update_many_and_store_events).
    The jobs must be locked (the UPDATE cannot miss one)."""
    columns = tuple(rows[0][1])
    if any(tuple(values) != columns for _, values in rows):
        raise ValueError("the rows of one UPDATE set the same columns")
    q = jobs_update_many_query(columns)
    if _is_sqlite(session):
        return q, {"items": codec.dumps([[job_id, *values.values()] for job_id, values in rows])}
    return q, {
        "items": codec.dumps([{**values, "id": job_id} for job_id, values in rows]),
        "ids": [job_id for job_id, _ in rows],
    }


_UPDATE_JOBS_RETURNING: dict[tuple[str, ...], Query] = {}


def jobs_update_many_query(columns: tuple[str, ...]) -> Query:
    """jobs_update_many's statement for these columns (built once)."""
    q = _UPDATE_JOBS_RETURNING.get(columns)
    if q is None:
        _check_updatable(columns)
        assignments = ", ".join(f"{c} = v.{c}" for c in columns)
        picked = ", ".join(
            f"json_extract(value, '$[{i}]') AS {c}" for i, c in enumerate(("id", *columns))
        )
        q = _UPDATE_JOBS_RETURNING[columns] = Query(
            f"UPDATE jobs SET {assignments} FROM (SELECT {picked} FROM json_each(:items)) AS v"
            " WHERE jobs.id = v.id RETURNING jobs.id, jobs.traceparent",
            # Each row typed as the jobs table's, by column name; the jobs
            # found by primary key (id = ANY), whatever the estimate of the list.
            postgresql=f"UPDATE jobs SET {assignments}"
            " FROM json_populate_recordset(NULL::jobs, CAST(:items AS JSON)) AS v"
            " WHERE jobs.id = v.id AND jobs.id = ANY(CAST(:ids AS TEXT[]))"
            " RETURNING jobs.id, jobs.traceparent",
        )
    return q


async def update_workflow(session: AsyncSession, workflow_id: str, **values: Any) -> None:
    await session.execute(update(WorkflowRow).where(WorkflowRow.id == workflow_id).values(**values))


_WORKFLOW_PROGRESS = Query(
    "UPDATE workflows SET completed_steps = :wf_completed_steps, updated_us = :wf_updated_us"
    " WHERE id = :wf_id"
)


def workflow_progress_update(
    workflow_id: str, completed_steps: int, now: int
) -> tuple[Query, Params]:
    """The UPDATE of a workflow's completed steps, to run with its PROGRESS
    event (store.trace.store_events `also`)."""
    return _WORKFLOW_PROGRESS, {
        "wf_id": workflow_id,
        "wf_completed_steps": completed_steps,
        "wf_updated_us": now,
    }


async def end_workflow_row(session: AsyncSession, workflow_id: str, **values: Any) -> int:
    """update_workflow for the transition that ends it: its started_us (0: no
    step started), read by the same statement."""
    stmt = (
        update(WorkflowRow)
        .where(WorkflowRow.id == workflow_id)
        .values(**values)
        .returning(WorkflowRow.started_us)
    )
    return int((await session.execute(stmt)).scalar_one() or 0)


async def workflow_state(session: AsyncSession, workflow_id: str) -> tuple[RunState, int] | None:
    """A workflow's state and started_us, read by column (not the ORM row)."""
    stmt = select(WorkflowRow.state, WorkflowRow.started_us).where(WorkflowRow.id == workflow_id)
    row = (await session.execute(stmt)).first()
    return None if row is None else (RunState(row[0]), int(row[1] or 0))


async def workflow_span_fields(
    session: AsyncSession, workflow_id: str
) -> tuple[str, int, int, str] | None:
    """What a workflow's OpenTelemetry span needs: (tenant, created_us,
    started_us, traceparent of its steps); read only when OTLP is on."""
    stmt = select(WorkflowRow.tenant, WorkflowRow.created_us, WorkflowRow.started_us).where(
        WorkflowRow.id == workflow_id
    )
    row = (await session.execute(stmt)).first()
    if row is None:
        return None
    return (
        str(row[0]),
        int(row[1] or 0),
        int(row[2] or 0),
        await workflow_traceparent(session, workflow_id),
    )


async def start_workflow(session: AsyncSession, workflow_id: str, now: int) -> int | None:
    """QUEUED -> RUNNING, compare-and-set in one UPDATE: the workflow's
    declared step count if this statement changed it, None if it was not
    QUEUED (started already, or ended). Concurrent starts, on any replica,
    change it once: PostgreSQL re-checks the state of a row another
    transaction updated once that one commits."""
    stmt = (
        update(WorkflowRow)
        .where(WorkflowRow.id == workflow_id, WorkflowRow.state == int(RunState.QUEUED))
        .values(state=int(RunState.RUNNING), started_us=now, updated_us=now)
        .returning(WorkflowRow.total_steps)
    )
    total = (await session.execute(stmt)).scalar_one_or_none()
    return None if total is None else int(total)


async def insert_annotations(session: AsyncSession, annotations: Sequence[Annotation]) -> None:
    if annotations:
        await session.execute(insert(AnnotationRow), [annotation_values(a) for a in annotations])


def annotation_values(a: Annotation) -> dict[str, Any]:
    return {
        "id": a.id,
        "tenant": a.tenant,
        "run_id": a.run_id,
        "job_id": a.job_id,
        "attempt": a.attempt,
        "scope": int(a.scope),
        "scope_id": a.scope_id,
        "actor_kind": a.actor_kind,
        "actor_id": a.actor_id,
        "actor_version": a.actor_version,
        "key": a.key,
        "value": codec.dumps(a.value),
        "payload": None if a.payload is None else codec.dumps(a.payload),
        "idempotency_key": a.idempotency_key,
        "created_us": a.created_us,
        "recorded_by": a.recorded_by,
        "value_num": numeric(a.value),
    }


def numeric(value: Any) -> float | None:
    """A number value as a float, for range filters; None for anything else."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


async def insert_pending_annotations(
    session: AsyncSession, annotations: Sequence[Annotation]
) -> None:
    """Store a running attempt's annotations, invisible until the attempt ends."""
    if annotations:
        values = [annotation_values(a) for a in annotations]
        await session.execute(insert(PendingAnnotationRow), values)


_ANNOTATION_COLUMNS = sql.columns(PendingAnnotationRow.__table__, without=("seq",))


async def publish_annotations(session: AsyncSession, job_id: str, attempt: int) -> None:
    """Make an ended attempt's annotations visible, in the caller's transaction.
    They are moved, so they take their place (seq) in the run's annotations now,
    after whatever a reader may already have paged past."""
    pending = (
        PendingAnnotationRow.job_id == job_id,
        PendingAnnotationRow.attempt == attempt,
    )
    source = (
        select(*(getattr(PendingAnnotationRow, c) for c in _ANNOTATION_COLUMNS))
        .where(*pending)
        .order_by(PendingAnnotationRow.seq)
    )
    await session.execute(insert(AnnotationRow).from_select(list(_ANNOTATION_COLUMNS), source))
    await session.execute(delete(PendingAnnotationRow).where(*pending))


ANNOTATIONS = AnnotationRow.__table__


def annotation_from_row(row: Row, *, full: bool = True) -> Annotation:
    """An annotation from its row (a mapping); without `full`, one read
    without its payload."""
    return Annotation(
        id=row["id"],
        tenant=row["tenant"],
        run_id=row["run_id"],
        key=row["key"],
        value=codec.loads(row["value"]),
        actor_kind=row["actor_kind"],
        actor_id=row["actor_id"],
        actor_version=row["actor_version"],
        created_us=row["created_us"],
        job_id=row["job_id"],
        attempt=row["attempt"],
        scope=AnnotationScope(row["scope"]),
        scope_id=row["scope_id"],
        payload=codec.loads(row["payload"]) if full else None,
        idempotency_key=row["idempotency_key"],
        seq=row["seq"],
        recorded_by=row["recorded_by"],
    )


# The annotations an attestation covers (see domain/annotated.py), in
# publication order: one statement on ix_annotations_run_seq. The attempt
# lists are fixed in shape: (A), (0) or (0, A).
_ATTESTED_ANNOTATIONS = "SELECT * FROM annotations WHERE run_id = :run_id"
_ATTESTED: dict[tuple[bool, int], Query] = {
    (job, n): Query(
        _ATTESTED_ANNOTATIONS
        + (" AND job_id = :job_id" if job else "")
        + " AND attempt IN ("
        + ", ".join(f":attempt{i}" for i in range(n))
        + ") ORDER BY seq LIMIT :limit"
    )
    for job in (False, True)
    for n in (1, 2)
}


async def attested_annotations(
    session: AsyncSession, run_id: str, job_id: str, attempts: Sequence[int], limit: int
) -> list[Row]:
    """Rows (mappings) of the run's annotations of `attempts` (and of `job_id`
    if given), in publication (seq) order, at most `limit`."""
    params: dict[str, Any] = {"run_id": run_id, "limit": limit}
    if job_id:
        params["job_id"] = job_id
    params.update({f"attempt{i}": a for i, a in enumerate(attempts)})
    return list(await sql.fetch(session, _ATTESTED[(bool(job_id), len(attempts))], params))


async def annotations_by_id(session: AsyncSession, ids: Sequence[str]) -> dict[str, Row]:
    """Rows (mappings) of the annotations with these ids (unique index), by id."""
    if not ids:
        return {}
    stmt = select(ANNOTATIONS).where(AnnotationRow.id.in_(list(ids)))
    return {r["id"]: r for r in (await session.execute(stmt)).mappings()}


_ELIGIBLE: dict[tuple[int, int, int, int], Query] = {}


def _in(name: str, count: int) -> str:
    """`(:name0, :name1, ...)`: an IN list of `count` parameters."""
    return "(" + ", ".join(f":{name}{i}" for i in range(count)) + ")"


def _eligible_query(tenants: int, skipped: int = 0, paused: int = 0, blocked: int = 0) -> Query:
    """The eligible jobs of a service (a page), and one more row whose job
    columns are NULL and whose last column says when the service's next
    waiting job (not_before or backoff) becomes eligible: one statement for
    both questions a dispatch round asks. `skipped` placement classes (of
    required labels the reading workers do not meet) and the `paused`
    tenants' jobs (their queue of this service is paused) are left out of
    both; held jobs (held != 0) are never eligible, a range of the dispatch
    index of their own."""
    where = (
        "state = :queued AND service = :service AND held = 0"
        " AND not_before_us <= :now AND next_attempt_us <= :now"
    )
    skip = f" AND placement_class NOT IN {_in('skip', skipped)}" if skipped else ""
    if paused:
        skip += f" AND tenant NOT IN {_in('paused', paused)}"
    if blocked:  # flow-controlled jobs whose bucket or key the dispatcher knows blocked
        skip += f" AND flow_key NOT IN {_in('blocked', blocked)}"
    if tenants >= 0:
        where += f" AND tenant IN {_in('tenant', tenants)}" if tenants else " AND 0 = 1"
    names = [c.name for c in JOBS.columns]
    picked = ", ".join(f'"{n}"' for n in names)
    nulls = ", ".join("NULL" for _ in names)
    template = (
        f"SELECT {picked}, NULL AS next_eligible_us FROM (SELECT {picked} FROM jobs"
        f" WHERE {where}{skip} ORDER BY priority DESC, seq LIMIT :limit) AS page"
        # The next due: a seek in ix_jobs_waiting, whose expression this
        # spells exactly as the index does.
        f" UNION ALL SELECT {nulls}, (SELECT {{due}} FROM jobs"
        " WHERE state = :queued AND service = :service AND held = 0"
        f" AND {{due}} > :now{skip} ORDER BY {{due}} LIMIT 1)"
    )
    return Query(
        template.format(due=_DUE["sqlite"]), postgresql=template.format(due=_DUE["postgresql"])
    )


# When a queued job becomes eligible, as ix_jobs_waiting (revision 0027) indexes it.
_DUE = {
    "sqlite": "max(not_before_us, next_attempt_us)",
    "postgresql": "greatest(not_before_us, next_attempt_us)",
}


async def eligible_jobs(
    session: AsyncSession,
    service: str,
    now: int,
    limit: int,
    tenants: frozenset[str] | None = None,
    skip: Collection[str] = (),
    paused: Collection[str] = (),
    blocked: Collection[str] = (),
) -> tuple[list[Job], int | None]:
    """QUEUED jobs of a service that may run now (higher priority first, then
    oldest), and when the next of its waiting (not_before or backoff) jobs
    becomes eligible (None: none waits); jobs whose placement class is in
    `skip`, of the `paused` tenants, or held, are left out of both."""
    names = sorted(tenants) if tenants is not None else None
    shape = (-1 if names is None else len(names), len(skip), len(paused), len(blocked))
    q = _ELIGIBLE.get(shape)
    if q is None:
        q = _ELIGIBLE[shape] = _eligible_query(*shape)
    params: dict[str, Any] = {
        "queued": int(RunState.QUEUED),
        "service": service,
        "now": now,
        "limit": limit,
    }
    params.update((f"tenant{i}", t) for i, t in enumerate(names or ()))
    params.update((f"skip{i}", c) for i, c in enumerate(sorted(skip)))
    params.update((f"paused{i}", t) for i, t in enumerate(sorted(paused)))
    params.update((f"blocked{i}", k) for i, k in enumerate(sorted(blocked)))
    jobs: list[Job] = []
    next_us: int | None = None
    for r in await sql.fetch(session, q, params):
        if r["id"] is not None:
            jobs.append(job_from_row(r))
        elif r["next_eligible_us"] is not None:
            next_us = int(r["next_eligible_us"])
    jobs.sort(key=lambda j: (-j.spec.priority, j.seq))
    return jobs, next_us


def _is_sqlite(session: AsyncSession) -> bool:
    return sql.dialect(session) == "sqlite"


_PROGRESS_IF_HELD = Query(
    "UPDATE jobs SET progress_percent = :percent, progress_message = :message,"
    " updated_us = :now WHERE id = :id AND attempt = :attempt AND lease_holder = :holder"
    " AND state = :running RETURNING *"
)


def progress_update(
    job_id: str, attempt: int, holder: str, percent: float, message: str, now: int
) -> tuple[Query, Params]:
    """The fenced progress UPDATE of a RUNNING attempt whose lease `holder`
    holds (RETURNING the job as updated; no row: refused, nothing changed),
    to run with its trace event (store.trace.update_and_store_events)."""
    return _PROGRESS_IF_HELD, {
        "id": job_id,
        "attempt": attempt,
        "holder": holder,
        "running": int(RunState.RUNNING),
        "percent": percent,
        "message": message,
        "now": now,
    }


# Progress of several attempts in one statement: each row's (job id, attempt,
# holder, percent, message) fenced as _PROGRESS_IF_HELD fences one.
_PROGRESS_MANY_SET = (
    "UPDATE jobs SET progress_percent = v.percent, progress_message = v.message,"
    " updated_us = :now FROM "
)
_PROGRESS_MANY_WHERE = (
    " WHERE jobs.id = v.id AND jobs.attempt = v.attempt AND jobs.lease_holder = v.holder AND "
)
_PROGRESS_MANY = Query(
    _PROGRESS_MANY_SET
    + "(SELECT json_extract(value, '$[0]') AS id, json_extract(value, '$[1]') AS attempt,"
    " json_extract(value, '$[2]') AS holder, json_extract(value, '$[3]') AS percent,"
    " json_extract(value, '$[4]') AS message FROM json_each(:items)) AS v"
    + _PROGRESS_MANY_WHERE
    # +state is no index term: SQLite walks the list and finds each job by
    # its primary key (not each RUNNING job, for each entry of the list).
    + "+jobs.state = :running RETURNING *",
    # id = ANY and state + 0 (no index term either): the jobs found by
    # primary key, whatever the estimates of unnest and of RUNNING jobs.
    postgresql=_PROGRESS_MANY_SET
    + "unnest(CAST(:ids AS TEXT[]), CAST(:attempts AS INTEGER[]), CAST(:holders AS TEXT[]),"
    " CAST(:percents AS FLOAT8[]), CAST(:messages AS TEXT[]))"
    " AS v(id, attempt, holder, percent, message)"
    + _PROGRESS_MANY_WHERE
    + "jobs.id = ANY(CAST(:ids AS TEXT[])) AND jobs.state + 0 = :running RETURNING jobs.*",
)


def progress_many_update(
    session: AsyncSession, reports: Sequence[tuple[str, int, str, float, str]], now: int
) -> tuple[Query, Params]:
    """The fenced progress UPDATE of several RUNNING attempts at once, each
    (job id, attempt, holder, percent, message) as progress_update writes
    one, for distinct jobs: RETURNING each job it matched as updated (one it
    did not match: refused, nothing of it changed). To run with their trace
    events (store.trace.update_many_and_store_events)."""
    names = ("ids", "attempts", "holders", "percents", "messages")
    params = _list_params(session, sorted(reports), "items", names)
    params.update(now=now, running=int(RunState.RUNNING))
    return _PROGRESS_MANY, params


_CLAIM_SET = (
    "UPDATE jobs SET state = :running, attempt = attempt + 1, worker_id = :worker_id,"
    " lease_holder = :holder, lease_session = :session_id, lease_deadline_us = :lease_deadline_us,"
    " next_attempt_us = 0, started_us = :now, updated_us = :now,"
    " first_started_us = CASE WHEN first_started_us = 0 THEN :now ELSE first_started_us END,"
    " progress_percent = 0.0, progress_message = ''"
)
# A job another replica is claiming right now (its row locked) is skipped, not
# waited for: the lock is taken, SKIP LOCKED, by the claim's own statement.
# The claim re-checks, in the same statement, that the job is not held (its
# workflow or its queue paused: a pause that wrote its held bit first wins,
# PostgreSQL re-checking a row another transaction changed) and that its
# queue is not paused (queue_pauses, a primary-key probe: jobs queued after a
# queue was paused carry no held bit). See domain.pause for the guarantee.
_NOT_PAUSED = (
    " AND held = 0 AND NOT EXISTS (SELECT 1 FROM queue_pauses p"
    " WHERE p.tenant = jobs.tenant AND p.service = jobs.service)"
)
_CLAIM_AT = Query(
    _CLAIM_SET
    + " WHERE id = :id AND state = :queued AND attempt = :seen_attempt"
    + _NOT_PAUSED
    + " RETURNING *",
    postgresql=_CLAIM_SET + " WHERE id = (SELECT id FROM jobs WHERE id = :id AND state = :queued"
    " AND held = 0 FOR UPDATE SKIP LOCKED) AND state = :queued AND attempt = :seen_attempt"
    + _NOT_PAUSED
    + " RETURNING *",
)


# Claims of several jobs in one statement, each row's (id, attempt seen,
# worker id, holder, session) compare-and-set as _CLAIM_AT sets one; the
# same SET with the per-job values taken from the list.
_CLAIM_MANY_SET = (
    _CLAIM_SET.replace(":worker_id", "v.worker_id")
    .replace(":holder", "v.holder")
    .replace(":session_id", "v.session_id")
    + " FROM "
)
_CLAIM_MANY = Query(
    _CLAIM_MANY_SET
    + "(SELECT json_extract(value, '$[0]') AS id, json_extract(value, '$[1]') AS seen_attempt,"
    " json_extract(value, '$[2]') AS worker_id, json_extract(value, '$[3]') AS holder,"
    " json_extract(value, '$[4]') AS session_id FROM json_each(:items)) AS v"
    # +state: found by primary key, walking the list (see _PROGRESS_MANY).
    " WHERE jobs.id = v.id AND +jobs.state = :queued AND jobs.attempt = v.seen_attempt"
    + _NOT_PAUSED
    + " RETURNING *",
    postgresql=_CLAIM_MANY_SET
    + "unnest(CAST(:ids AS TEXT[]), CAST(:seen AS INTEGER[]), CAST(:workers AS TEXT[]),"
    " CAST(:holders AS TEXT[]), CAST(:sessions AS TEXT[]))"
    " AS v(id, seen_attempt, worker_id, holder, session_id)"
    " WHERE jobs.id = v.id AND jobs.id IN (SELECT id FROM jobs WHERE id = ANY(CAST(:ids AS TEXT[]))"
    " AND state = :queued AND held = 0 FOR UPDATE SKIP LOCKED)"
    " AND jobs.state = :queued AND jobs.attempt = v.seen_attempt"
    + _NOT_PAUSED
    + " RETURNING jobs.*",
)


def claim_many_update(
    session: AsyncSession,
    claims: Sequence[tuple[str, int, str, str, str]],
    lease_deadline_us: int,
    now: int,
) -> tuple[Query, Params]:
    """Claims of several distinct QUEUED jobs at once, each (job id, attempt
    the dispatch read saw, worker id, holder, session id) as claim_update
    makes one: RETURNING each job claimed (one not returned: not claimed,
    nothing of it changed). To run with their STARTED events
    (store.trace.update_many_and_store_events)."""
    names = ("ids", "seen", "workers", "holders", "sessions")
    params = _list_params(session, sorted(claims), "items", names)
    params.update(
        running=int(RunState.RUNNING),
        queued=int(RunState.QUEUED),
        lease_deadline_us=lease_deadline_us,
        now=now,
    )
    return _CLAIM_MANY, params


def claim_update(
    job_id: str,
    attempt: int,
    worker_id: str,
    lease_deadline_us: int,
    now: int,
    session_id: str = "",
    holder: str = "",
) -> tuple[Query, Params]:
    """Lease a QUEUED job to a worker session (`holder` is who the worker is,
    `worker_id` its name), compare-and-set on the state and on the attempt the
    dispatch read saw, attempt + 1: an UPDATE RETURNING the claimed row (no
    row: not claimed, nothing changed), to run with its start's trace event
    (store.trace.update_and_store_events)."""
    return _CLAIM_AT, {
        "id": job_id,
        "seen_attempt": attempt,
        "running": int(RunState.RUNNING),
        "queued": int(RunState.QUEUED),
        "worker_id": worker_id,
        "holder": holder,
        "session_id": session_id,
        "lease_deadline_us": lease_deadline_us,
        "now": now,
    }


async def extend_leases(
    session: AsyncSession,
    holder: str,
    attempts: dict[str, int],
    deadline_us: int,
    *,
    held_by: str = "",
    take_over: str = "",
    tenants: frozenset[str] | None = None,
) -> None:
    """Renew the leases this worker (`holder`) still holds for exactly these
    attempts (a lease of another attempt of the same job is left alone): only
    those of session `held_by` if given; with `take_over`, that session becomes
    their holder. With `tenants`, only jobs of those tenants."""
    if not attempts:
        return
    values: dict[str, Any] = {"lease_deadline_us": deadline_us}
    if take_over:
        values["lease_session"] = take_over
    conditions = [
        tuple_(JobRow.id, JobRow.attempt).in_(list(attempts.items())),
        JobRow.lease_holder == holder,
        JobRow.state == int(RunState.RUNNING),
    ]
    if held_by:
        conditions.append(JobRow.lease_session == held_by)
    if tenants is not None:
        conditions.append(JobRow.tenant.in_(sorted(tenants)))
    await session.execute(update(JobRow).where(*conditions).values(**values))


async def jobs_by_id(session: AsyncSession, job_ids: Iterable[str]) -> list[Job]:
    ids = list(job_ids)
    if not ids:
        return []
    return await _jobs(session, select(JOBS).where(JobRow.id.in_(ids)))


async def jobs_as_stored(session: AsyncSession, job_ids: Iterable[str]) -> dict[str, Job]:
    """These jobs as get_job reads them (request context included), by id;
    one statement."""
    ids = list(job_ids)
    if not ids:
        return {}
    rows = (await session.execute(select(JOBS).where(JobRow.id.in_(ids)))).mappings()
    return {str(r["id"]): _remember(job_from_row(r, context=True)) for r in rows}


ANNOTATIONS = AnnotationRow.__table__


async def insert_annotations_bulk(session: AsyncSession, annotations: Sequence[Annotation]) -> None:
    """insert_annotations in multi-row statements (not one per annotation)."""
    if annotations:
        rows = [annotation_values(a) for a in annotations]
        for q, params in sql.multi_row(ANNOTATIONS, tuple(rows[0]), rows):
            await sql.execute(session, q, params)


async def expired_leases(session: AsyncSession, now: int, limit: int = 500) -> list[Job]:
    stmt = (
        select(JOBS)
        .where(
            JobRow.state == int(RunState.RUNNING),
            JobRow.lease_deadline_us > 0,
            JobRow.lease_deadline_us < now,
        )
        .limit(limit)
    )
    return await _jobs(session, stmt)


async def timed_out_jobs(session: AsyncSession, now: int, limit: int = 500) -> list[Job]:
    stmt = (
        select(JOBS)
        .where(
            JobRow.state == int(RunState.RUNNING),
            JobRow.timeout_ms > 0,
            # A fan-out step runs no attempt itself: its children time out.
            JobRow.for_each.is_(None),
            JobRow.started_us + JobRow.timeout_ms * 1000 < now,
        )
        .limit(limit)
    )
    return await _jobs(session, stmt)


def overdue_workflows_query(now: int, limit: int) -> Any:
    """Unfinished workflows past their deadline, soonest first. Its WHERE is
    ix_workflows_deadline's predicate word for word (a partial index is used
    only when the query implies it), plus the range on its column."""
    return (
        select(WorkflowRow.id)
        .where(WORKFLOW_DEADLINE_PENDING, WorkflowRow.deadline_us < now)
        .order_by(WorkflowRow.deadline_us)
        .limit(limit)
    )


async def overdue_workflows(session: AsyncSession, now: int, limit: int = 100) -> list[str]:
    """See overdue_workflows_query."""
    return list((await session.execute(overdue_workflows_query(now, limit))).scalars())


async def timed_out_gates(session: AsyncSession, now: int, limit: int = 500) -> list[Job]:
    """Approval gates waiting past their timeout (ix_jobs_gate_deadline)."""
    stmt = (
        select(JOBS)
        .where(
            JobRow.state == int(RunState.WAITING_FOR_HUMAN),
            JobRow.gate_deadline_us > 0,
            JobRow.gate_deadline_us < now,
        )
        .limit(limit)
    )
    return await _jobs(session, stmt)


async def waiting_gates(
    session: AsyncSession, tenant: str | None, after: int, limit: int
) -> list[Job]:
    """Approval gates WAITING_FOR_HUMAN after position `after` (seq), oldest
    first (ix_jobs_tenant_state_seq)."""
    where = [JobRow.state == int(RunState.WAITING_FOR_HUMAN), JobRow.seq > after]
    if tenant is not None:
        where.append(JobRow.tenant == tenant)
    cols = [c for c in JOBS.c if c.name not in ("payload", "result", "request_context")]
    stmt = select(*cols).where(*where).order_by(JobRow.seq).limit(limit)
    return [
        job_from_row({**r, "payload": "{}", "result": None}, full=False)
        for r in (await session.execute(stmt)).mappings()
    ]


async def gate_counts(session: AsyncSession, workflow_id: str) -> tuple[int, int]:
    """(steps WAITING_FOR_HUMAN, steps QUEUED or RUNNING) of a workflow."""
    waiting = JobRow.state == int(RunState.WAITING_FOR_HUMAN)
    active = JobRow.state.in_([int(RunState.QUEUED), int(RunState.RUNNING)])
    stmt = select(
        func.sum(case((waiting, 1), else_=0)), func.sum(case((active, 1), else_=0))
    ).where(JobRow.workflow_id == workflow_id)
    w, a = (await session.execute(stmt)).one()
    return int(w or 0), int(a or 0)


_JOB_CONTEXT = Query("SELECT request_context FROM jobs WHERE id = :id")
_WORKFLOW_CONTEXT = Query("SELECT request_context FROM workflows WHERE id = :id")


async def request_context_for(session: AsyncSession, job: Job) -> JSON:
    """The request that triggered a job: its own (as the job carries it, when
    it was read whole), or its workflow's."""
    if job.workflow_id:
        text = await sql.scalar(session, _WORKFLOW_CONTEXT, {"id": job.workflow_id})
    elif job.request_context is not None:
        text = job.request_context
    else:
        text = await sql.scalar(session, _JOB_CONTEXT, {"id": job.id})
    return codec.loads(text) or {}


async def annotations_by_idempotency(
    session: AsyncSession, run_id: str, idempotency_key: str, keys: list[str]
) -> dict[str, Annotation]:
    stmt = select(ANNOTATIONS).where(
        AnnotationRow.run_id == run_id,
        AnnotationRow.idempotency_key == idempotency_key,
        AnnotationRow.key.in_(keys),
    )
    return {r["key"]: annotation_from_row(r) for r in (await session.execute(stmt)).mappings()}


@dataclass(frozen=True, slots=True)
class AnnotationQuery:
    """Which annotations a listing reads; empty / zero / None fields match all.
    `value_text` is a scalar value as stored (codec.dumps); `value_num` a number."""

    run_id: str = ""
    key: str = ""
    key_prefix: str = ""
    actor_id: str = ""
    actor_kind: int = 0
    recorded_by: str = ""
    since_us: int = 0
    until_us: int = 0
    job_id: str = ""
    attempt: int = 0
    scope: int = 0
    value_text: str | None = None
    value_num: float | None = None
    value_min: float | None = None
    value_max: float | None = None


async def read_annotations(
    session: AsyncSession,
    *,
    tenant: str | None,
    query: AnnotationQuery,
    after: int | None,
    limit: int,
    max_bytes: int,
    full: bool,
) -> Chunk[Annotation]:
    """Of one run in the order they were stored (published); across runs
    (no run_id) newest first. Payload only when `full`."""
    listing = Listing(
        key=AnnotationRow.seq,
        where=annotation_where(tenant, query),
        columns=[c for c in ANNOTATIONS.c if full or c.name != "payload"],
        sized=[AnnotationRow.value, *([AnnotationRow.payload] if full else [])],
        descending=not query.run_id,
    )
    return await read_chunk(
        session,
        listing,
        after=after,
        limit=limit,
        max_bytes=max_bytes,
        build=lambda row: annotation_from_row(row, full=full),
    )


def annotation_where(tenant: str | None, q: AnnotationQuery) -> list[Any]:
    """The conditions of a listing of annotations (each filter on an index of
    AnnotationRow's, with the tenant)."""
    where: list[Any] = []
    if q.run_id:
        where.append(AnnotationRow.run_id == q.run_id)
    if tenant is not None:
        where.append(AnnotationRow.tenant == tenant)
    if q.key:
        where.append(AnnotationRow.key == q.key)
    if q.key_prefix:
        escaped = q.key_prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        where.append(AnnotationRow.key.like(escaped + "%", escape="\\"))
    if q.actor_id:
        where.append(AnnotationRow.actor_id == q.actor_id)
    if q.actor_kind:
        where.append(AnnotationRow.actor_kind == q.actor_kind)
    if q.recorded_by:
        where.append(AnnotationRow.recorded_by == q.recorded_by)
    if q.since_us:
        where.append(AnnotationRow.created_us >= q.since_us)
    if q.until_us:
        where.append(AnnotationRow.created_us < q.until_us)
    if q.job_id:
        where.append(AnnotationRow.job_id == q.job_id)
    if q.attempt:
        where.append(AnnotationRow.attempt == q.attempt)
    if q.scope:
        where.append(AnnotationRow.scope == q.scope)
    if q.value_text is not None:
        where.append(AnnotationRow.value == q.value_text)
    if q.value_num is not None:
        where.append(AnnotationRow.value_num == q.value_num)
    if q.value_min is not None:
        where.append(AnnotationRow.value_num >= q.value_min)
    if q.value_max is not None:
        where.append(AnnotationRow.value_num <= q.value_max)
    return where


async def count_waiting(session: AsyncSession, tenant: str, cap: int) -> int:
    """Jobs of a tenant waiting to run (QUEUED or PENDING), counted up to `cap`."""

    inner = (
        select(JobRow.seq)
        .where(
            JobRow.tenant == tenant, JobRow.state.in_([int(RunState.QUEUED), int(RunState.PENDING)])
        )
        .limit(cap)
        .subquery()
    )
    return int((await session.execute(select(func.count()).select_from(inner))).scalar() or 0)


NON_TERMINAL = tuple(s for s in RunState if s and not s.terminal)


async def queue_depth(session: AsyncSession) -> list[tuple[str, RunState, int]]:
    """(service, state, jobs) of every non-terminal state, across tenants; one
    GROUP BY over the dispatch index."""

    rows = await session.execute(
        select(JobRow.service, JobRow.state, func.count())
        .where(JobRow.state.in_([int(s) for s in NON_TERMINAL]))
        .group_by(JobRow.state, JobRow.service)
    )
    return [(service, RunState(state), int(n)) for service, state, n in rows.all()]


async def workflow_traceparent(session: AsyncSession, workflow_id: str) -> str:
    """The traceparent a workflow was submitted with (each of its steps carries it)."""
    row = await session.execute(
        select(JobRow.traceparent).where(JobRow.workflow_id == workflow_id).limit(1)
    )
    return row.scalar() or ""
