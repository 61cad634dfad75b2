"""The schema, in SQLAlchemy 2 typed style. Times are integer microseconds (UTC)."""

from __future__ import annotations

from sqlalchemy import BigInteger, Boolean, Float, Index, Integer, LargeBinary, String, Text, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# SQLite only makes INTEGER PRIMARY KEY an alias of rowid (autoincrementing);
# BIGINT elsewhere.
SeqType = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    pass


# The rows of ix_workflows_deadline: unfinished workflows (QUEUED, RUNNING,
# PAUSED, WAITING_FOR_HUMAN) with a deadline. The supervisor's query repeats
# this predicate word for word, so both backends use the partial index.
WORKFLOW_DEADLINE_PENDING = text("deadline_us > 0 AND state IN (1, 2, 9, 10)")


class Meta(Base):
    """Server-wide settings that must survive restarts (e.g. the page-token secret)."""

    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Submission(Base):
    """Idempotency record: one per (tenant, request_id), across jobs and workflows."""

    __tablename__ = "submissions"
    tenant: Mapped[str] = mapped_column(String(128), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(256), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    entity_id: Mapped[str] = mapped_column(String(64))
    request_hash: Mapped[str] = mapped_column(String(64))
    created_us: Mapped[int] = mapped_column(BigInteger)


class WorkflowRow(Base):
    __tablename__ = "workflows"
    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    tenant: Mapped[str] = mapped_column(String(128))
    request_id: Mapped[str] = mapped_column(String(256))
    name: Mapped[str] = mapped_column(String(256))
    state: Mapped[int] = mapped_column(Integer)
    priority: Mapped[int] = mapped_column(Integer)
    labels: Mapped[str] = mapped_column(Text)
    request_context: Mapped[str] = mapped_column(Text)
    total_steps: Mapped[int] = mapped_column(Integer)
    completed_steps: Mapped[int] = mapped_column(Integer, default=0)
    failure: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_us: Mapped[int] = mapped_column(BigInteger)
    updated_us: Mapped[int] = mapped_column(BigInteger)
    started_us: Mapped[int] = mapped_column(BigInteger, default=0)
    completed_us: Mapped[int] = mapped_column(BigInteger, default=0)
    # The authenticated subject that submitted it; '' when stored before 0008.
    submitted_by: Mapped[str] = mapped_column(Text, default="")
    # The steps whose results are its outputs, as submitted ([]: the steps no
    # other step depends on); its outputs once COMPLETED (see StepResults).
    output_steps: Mapped[str] = mapped_column(Text, default="[]")
    outputs: Mapped[str | None] = mapped_column(Text, nullable=True)
    # request_context.user_context.user_id, for listings by user; '' when none.
    user_id: Mapped[str] = mapped_column(String(256), default="", server_default="")
    # When it ends TIMED_OUT unless it ended before (0: no deadline) (0020).
    deadline_us: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # A rerun's lineage (0021): the run it reruns, the first run of its
    # chain, why; '' for a run that is no rerun.
    parent_run_id: Mapped[str] = mapped_column(String(64), default="", server_default="")
    root_run_id: Mapped[str] = mapped_column(String(64), default="", server_default="")
    rerun_reason: Mapped[str] = mapped_column(Text, default="", server_default="")
    # While PAUSED (and after a run that ended paused): when and why it was
    # paused, and the state it was paused from (what ResumeWorkflow goes
    # back to); 0, '' and 0 when it was never paused or has been resumed.
    paused_us: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    pause_reason: Mapped[str] = mapped_column(Text, default="", server_default="")
    paused_from: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    __table_args__ = (
        # The supervisor's scan for workflows past their deadline: only the
        # unfinished ones with a deadline are in it (0020).
        Index(
            "ix_workflows_deadline",
            "deadline_us",
            sqlite_where=WORKFLOW_DEADLINE_PENDING,
            postgresql_where=WORKFLOW_DEADLINE_PENDING,
        ),
        Index("ix_workflows_tenant_seq", "tenant", "seq"),
        # Listings of a run's reruns, one level or the whole chain (0021).
        Index("ix_workflows_tenant_parent_seq", "tenant", "parent_run_id", "seq"),
        Index("ix_workflows_tenant_root_seq", "tenant", "root_run_id", "seq"),
        Index("ix_workflows_tenant_state_seq", "tenant", "state", "seq"),
        # Listings by user and by creation time (0018); by label: workflow_labels.
        Index("ix_workflows_tenant_user_seq", "tenant", "user_id", "seq"),
        Index("ix_workflows_tenant_created", "tenant", "created_us"),
        # The runs of a workflow name, newest first (GetRunSummary's recent
        # runs, ListWorkflows by name).
        Index("ix_workflows_tenant_name_seq", "tenant", "name", "seq"),
    )


class JobRow(Base):
    __tablename__ = "jobs"
    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    tenant: Mapped[str] = mapped_column(String(128))
    request_id: Mapped[str] = mapped_column(String(256))
    workflow_id: Mapped[str] = mapped_column(String(64), default="")
    step_name: Mapped[str] = mapped_column(String(128), default="")
    step_index: Mapped[int] = mapped_column(Integer, default=0)
    # A step's number in its workflow's declared order, from 1 (a fan-out
    # child: its step's), and the workflow's declared steps: what every event
    # of the step carries. 0 for a standalone job.
    step_number: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int] = mapped_column(Integer, default=0)
    depends_on: Mapped[str] = mapped_column(Text, default="[]")
    # A fan-out step's {"step", "path"} (JSON); NULL for any other job.
    for_each: Mapped[str | None] = mapped_column(Text, nullable=True)
    service: Mapped[str] = mapped_column(String(128))
    payload: Mapped[str] = mapped_column(Text)
    priority: Mapped[int] = mapped_column(Integer)
    max_attempts: Mapped[int] = mapped_column(Integer)
    timeout_ms: Mapped[int] = mapped_column(BigInteger, default=0)
    not_before_us: Mapped[int] = mapped_column(BigInteger, default=0)
    affinity_keys: Mapped[str] = mapped_column(Text, default="[]")
    labels: Mapped[str] = mapped_column(Text, default="{}")
    backoff: Mapped[str] = mapped_column(Text)
    request_context: Mapped[str] = mapped_column(Text, default="{}")
    state: Mapped[int] = mapped_column(Integer)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    progress_percent: Mapped[float] = mapped_column(Float, default=0.0)
    progress_message: Mapped[str] = mapped_column(Text, default="")
    result: Mapped[str | None] = mapped_column(Text, nullable=True)
    failure: Mapped[str | None] = mapped_column(Text, nullable=True)
    worker_id: Mapped[str] = mapped_column(String(128), default="")
    # The worker session (stream) that holds the lease: a stream that ended
    # gives back only the leases it still holds, not those a newer stream of
    # the same worker resumed (on this replica or another).
    lease_session: Mapped[str] = mapped_column(String(64), default="")
    # Who holds the lease (a digest of the worker's tenant, subject and id):
    # worker_id is a display name that two callers may share.
    lease_holder: Mapped[str] = mapped_column(String(64), default="")
    # Annotations the running attempt's worker sent (in pending_annotations).
    pending_annotations: Mapped[int] = mapped_column(Integer, default=0)
    lease_deadline_us: Mapped[int] = mapped_column(BigInteger, default=0)
    next_attempt_us: Mapped[int] = mapped_column(BigInteger, default=0)
    traceparent: Mapped[str] = mapped_column(String(64), default="")
    created_us: Mapped[int] = mapped_column(BigInteger)
    updated_us: Mapped[int] = mapped_column(BigInteger)
    started_us: Mapped[int] = mapped_column(BigInteger, default=0)
    completed_us: Mapped[int] = mapped_column(BigInteger, default=0)
    # When the first attempt started; started_us is the current attempt's.
    first_started_us: Mapped[int] = mapped_column(BigInteger, default=0)
    # The authenticated subject that submitted it; '' when stored before 0008.
    submitted_by: Mapped[str] = mapped_column(Text, default="")
    # The head of a standalone job's attestation chain (last chain_seq and its
    # digest; 0 and '' before its first attestation), kept by the transitions
    # that attest. NULL: not kept (a workflow step, or a job older than this
    # column): the head is read from the attestations.
    chain_seq: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    chain_digest: Mapped[str | None] = mapped_column(String(80), nullable=True)
    # JobSpec.worker_labels and JobSpec.affinity (JSON), and the digest of the
    # required labels ('' when none: see codec.placement_class) that the
    # dispatch read filters on.
    worker_labels: Mapped[str] = mapped_column(Text, default="[]")
    affinity: Mapped[str] = mapped_column(Text, default="[]")
    placement_class: Mapped[str] = mapped_column(String(32), default="")
    # The user the job was requested for: its request_context's
    # user_context.user_id, or its workflow's for a step; '' when none.
    user_id: Mapped[str] = mapped_column(String(256), default="", server_default="")
    # The holder (see lease_holder) of the attempt that failed last, when a
    # failure rule says its retry should go to another worker; '' otherwise.
    avoid_holder: Mapped[str] = mapped_column(String(64), default="")
    # A standalone job's rerun lineage (0021), as a workflow's; '' otherwise.
    parent_run_id: Mapped[str] = mapped_column(String(64), default="", server_default="")
    root_run_id: Mapped[str] = mapped_column(String(64), default="", server_default="")
    # A step a workflow rerun carried over: the parent run's job whose
    # result, attestations and annotations it references; '' otherwise.
    reused_from: Mapped[str] = mapped_column(String(64), default="", server_default="")
    # An approval gate step (0023): the gate (JSON; NULL for a job step), its
    # decisions so far (JSON list), and while it waits with a timeout, when it
    # times out (0: none).
    approval: Mapped[str | None] = mapped_column(Text, nullable=True)
    approval_decisions: Mapped[str] = mapped_column(Text, default="[]", server_default="[]")
    gate_deadline_us: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # 1 while its workflow is paused: never dispatched (the dispatch read and
    # the claim both require 0). Set on every unfinished step by the pause,
    # kept through a step's moves (PENDING -> QUEUED, a retry), inherited by
    # fan-out children, cleared by the resume.
    held: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Flow control (0026): the job's resolved rate-limit uses and concurrency
    # (JSON, see store.flow; '' for a job with neither: the claim of such a
    # job never looks at flow tables), the key the dispatcher skips while it
    # knows it blocked ('' when none), and the resolved concurrency key.
    flow: Mapped[str] = mapped_column(Text, default="", server_default="")
    flow_key: Mapped[str] = mapped_column(String(512), default="", server_default="")
    concurrency_key: Mapped[str] = mapped_column(String(256), default="", server_default="")

    __table_args__ = (
        Index("ix_jobs_tenant_seq", "tenant", "seq"),
        # Listings of a job's reruns, one level or the whole chain (0021).
        Index("ix_jobs_tenant_parent_seq", "tenant", "parent_run_id", "seq"),
        Index("ix_jobs_tenant_root_seq", "tenant", "root_run_id", "seq"),
        # Listings by user, by worker and by creation time (0018); by label: job_labels.
        Index("ix_jobs_tenant_user_seq", "tenant", "user_id", "seq"),
        Index("ix_jobs_tenant_worker_seq", "tenant", "worker_id", "seq"),
        Index("ix_jobs_tenant_created", "tenant", "created_us"),
        # (and by service, a filter of earlier releases, until then served
        # only with a state, by the dispatch index)
        Index("ix_jobs_tenant_service_seq", "tenant", "service", "seq"),
        Index("ix_jobs_tenant_state_seq", "tenant", "state", "seq"),
        Index("ix_jobs_workflow", "workflow_id", "step_index"),
        # The dispatcher's scan: eligible jobs of a service by priority, then
        # age, in the index's order (0027); held jobs (a paused workflow's)
        # are a range of their own. Its "next due" seek is ix_jobs_waiting, an
        # index on an expression spelt per dialect (migration 0027 only).
        Index("ix_jobs_dispatch", "state", "service", "held", text("priority DESC"), "seq"),
        # The supervisor's scan of leases.
        Index("ix_jobs_lease", "state", "lease_deadline_us"),
        # The supervisor's scan of approval gates past their timeout.
        Index("ix_jobs_gate_deadline", "state", "gate_deadline_us"),
        # The claim's count of a concurrency key's RUNNING jobs (0026).
        Index("ix_jobs_concurrency", "tenant", "concurrency_key", "state"),
    )


class RateLimitRow(Base):
    """A named rate limit of a tenant (ScheduleService.CreateRateLimit):
    `count` tokens per `period_us`, at most `burst`."""

    __tablename__ = "rate_limits"
    tenant: Mapped[str] = mapped_column(String(128), primary_key=True)
    key: Mapped[str] = mapped_column(String(128), primary_key=True)
    count: Mapped[int] = mapped_column(BigInteger)
    period_us: Mapped[int] = mapped_column(BigInteger)
    burst: Mapped[int] = mapped_column(BigInteger)
    created_by: Mapped[str] = mapped_column(Text)
    created_us: Mapped[int] = mapped_column(BigInteger)
    updated_us: Mapped[int] = mapped_column(BigInteger)


class RateBucketRow(Base):
    """A token bucket of a rate limit's partition ('' the shared one): its
    tokens as of updated_us, refilled lazily by the claim that reads it
    (row-locked on PostgreSQL)."""

    __tablename__ = "rate_buckets"
    tenant: Mapped[str] = mapped_column(String(128), primary_key=True)
    key: Mapped[str] = mapped_column(String(128), primary_key=True)
    partition: Mapped[str] = mapped_column(String(256), primary_key=True)
    tokens: Mapped[float] = mapped_column(Float)
    updated_us: Mapped[int] = mapped_column(BigInteger)


class ConcurrencySlotRow(Base):
    """One row per concurrency key in use: the claim of a job with the key
    locks it (PostgreSQL) while it counts the key's RUNNING jobs."""

    __tablename__ = "concurrency_slots"
    tenant: Mapped[str] = mapped_column(String(128), primary_key=True)
    key: Mapped[str] = mapped_column(String(256), primary_key=True)


class QueuePauseRow(Base):
    """A paused queue: a tenant's jobs of one service are not dispatched
    while this row exists (PauseQueue writes it, ResumeQueue deletes it)."""

    __tablename__ = "queue_pauses"
    tenant: Mapped[str] = mapped_column(String(128), primary_key=True)
    service: Mapped[str] = mapped_column(String(128), primary_key=True)
    # The authenticated subject that paused it, when, and why.
    paused_by: Mapped[str] = mapped_column(Text)
    paused_us: Mapped[int] = mapped_column(BigInteger)
    reason: Mapped[str] = mapped_column(Text)


class JobLabelRow(Base):
    """One label of a job, for listings by label: written by a trigger on
    jobs (migration 0018) from the job's labels when it is inserted (labels
    never change), so no path that stores jobs has to remember it. The primary
    key is the index of the filter: a tenant's jobs with key=value, by seq."""

    __tablename__ = "job_labels"
    tenant: Mapped[str] = mapped_column(String(128), primary_key=True)
    key: Mapped[str] = mapped_column(String(128), primary_key=True)
    value: Mapped[str] = mapped_column(String(256), primary_key=True)
    job_seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)


class WorkflowLabelRow(Base):
    """One label of a workflow, as JobLabelRow is of a job."""

    __tablename__ = "workflow_labels"
    tenant: Mapped[str] = mapped_column(String(128), primary_key=True)
    key: Mapped[str] = mapped_column(String(128), primary_key=True)
    value: Mapped[str] = mapped_column(String(256), primary_key=True)
    workflow_seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)


class FailureRow(Base):
    """One failed attempt (a worker's failure, a lost lease, a timeout), with
    the kind the failure rules gave it ('' unclassified): what the failures
    summary counts. Written with the failure's transition."""

    __tablename__ = "failures"
    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    tenant: Mapped[str] = mapped_column(String(128))
    job_id: Mapped[str] = mapped_column(String(64))
    attempt: Mapped[int] = mapped_column(Integer)
    service: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(64))
    code: Mapped[str] = mapped_column(String(128))
    message: Mapped[str] = mapped_column(Text)
    failed_us: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = (
        Index("ix_failures_tenant_time", "tenant", "failed_us"),
        # The retention sweep's (see domain.failures.sweep_once).
        Index("ix_failures_time", "failed_us"),
    )


class BulkOperationRow(Base):
    """One bulk operation (CancelRuns) per (tenant, request id): what it works
    through (its action, and a digest of its filter and reason: the same key
    with another is a conflict), and how far it got. `phase` is the kind of
    run it is at ("workflows", then "jobs"; "done" at the end), `cursor` the
    seq of the last run of that phase it handled (runs are taken newest
    first, so the next is below it; NULL: none yet). Counts are the
    operation's totals; `skipped_reasons` a JSON object of counts by reason,
    `failures` a JSON list of the first failures."""

    __tablename__ = "bulk_operations"
    tenant: Mapped[str] = mapped_column(String(128), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(256), primary_key=True)
    action: Mapped[str] = mapped_column(String(32))
    filter_digest: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))
    phase: Mapped[str] = mapped_column(String(16))
    cursor: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    touched: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    skipped: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    skipped_reasons: Mapped[str] = mapped_column(Text, default="{}", server_default="{}")
    failed: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    failures: Mapped[str] = mapped_column(Text, default="[]", server_default="[]")
    created_by: Mapped[str] = mapped_column(String(256), default="", server_default="")
    created_us: Mapped[int] = mapped_column(BigInteger)
    updated_us: Mapped[int] = mapped_column(BigInteger)


class _AnnotationColumns:
    """What an annotation is, published or pending."""

    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    tenant: Mapped[str] = mapped_column(String(128))
    run_id: Mapped[str] = mapped_column(String(64))
    scope: Mapped[int] = mapped_column(Integer)
    scope_id: Mapped[str] = mapped_column(String(128), default="")
    actor_kind: Mapped[int] = mapped_column(Integer)
    actor_id: Mapped[str] = mapped_column(String(256))
    actor_version: Mapped[str] = mapped_column(String(128), default="")
    key: Mapped[str] = mapped_column(String(256))
    value: Mapped[str] = mapped_column(Text)
    payload: Mapped[str | None] = mapped_column(Text, nullable=True)
    idempotency_key: Mapped[str] = mapped_column(String(256), default="")
    created_us: Mapped[int] = mapped_column(BigInteger)
    # The authenticated subject that wrote it; '' when stored before 0008.
    recorded_by: Mapped[str] = mapped_column(Text, default="")
    # The value when it is a number (not a bool), for range filters; else NULL.
    value_num: Mapped[float | None] = mapped_column(Float, nullable=True)


class AnnotationRow(_AnnotationColumns, Base):
    __tablename__ = "annotations"
    job_id: Mapped[str] = mapped_column(String(64), default="")
    attempt: Mapped[int] = mapped_column(Integer, default=0)

    __table_args__ = (
        Index("ix_annotations_run_seq", "run_id", "seq"),
        Index("ix_annotations_run_key", "run_id", "key"),
        # Listings across runs: newest first in a tenant, by key (and numeric
        # value), by recording subject, by actor.
        Index("ix_annotations_tenant_seq", "tenant", "seq"),
        Index("ix_annotations_tenant_key_seq", "tenant", "key", "seq"),
        Index("ix_annotations_tenant_key_num", "tenant", "key", "value_num"),
        Index("ix_annotations_tenant_recorded_by_seq", "tenant", "recorded_by", "seq"),
        Index("ix_annotations_tenant_actor_seq", "tenant", "actor_id", "seq"),
        Index("ix_annotations_job_seq", "job_id", "seq"),
        Index(
            "ux_annotations_idempotency",
            "run_id",
            "key",
            "idempotency_key",
            unique=True,
            sqlite_where=text("idempotency_key <> ''"),
            postgresql_where=text("idempotency_key <> ''"),
        ),
    )


class PendingAnnotationRow(_AnnotationColumns, Base):
    """Annotations a worker sent for the attempt it runs: stored (durable) when
    acknowledged, invisible to every read, and moved into `annotations` in the
    transaction that ends the attempt, however it ends."""

    __tablename__ = "pending_annotations"
    job_id: Mapped[str] = mapped_column(String(64))
    attempt: Mapped[int] = mapped_column(Integer)

    __table_args__ = (
        # Publishing (and counting) the annotations of one attempt.
        Index("ix_pending_annotations_attempt", "job_id", "attempt", "seq"),
    )


class TraceRunRow(Base):
    """Per-run trace sequence: the last number handed out, bumped in the same
    transaction that stores the events (the row lock orders concurrent writers)."""

    __tablename__ = "trace_runs"
    run_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(128))
    last_seq: Mapped[int] = mapped_column(BigInteger)


class TraceEventRow(Base):
    __tablename__ = "trace_events"
    run_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    tenant: Mapped[str] = mapped_column(String(128))
    event_key: Mapped[str] = mapped_column(String(256))
    node_id: Mapped[str] = mapped_column(String(128))
    type: Mapped[int] = mapped_column(Integer)
    level: Mapped[int] = mapped_column(Integer)
    category: Mapped[int] = mapped_column(Integer)
    ts_us: Mapped[int] = mapped_column(BigInteger)
    message: Mapped[str] = mapped_column(Text)
    user_message: Mapped[str] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    output_summary: Mapped[str | None] = mapped_column(Text, nullable=True)
    data: Mapped[str | None] = mapped_column(Text, nullable=True)
    step_number: Mapped[int] = mapped_column(Integer)
    total_steps: Mapped[int] = mapped_column(Integer)
    percent: Mapped[float] = mapped_column(Float)
    display_priority: Mapped[int] = mapped_column(Integer)
    milestone: Mapped[bool] = mapped_column(Boolean)
    truncated: Mapped[bool] = mapped_column(Boolean)
    job_id: Mapped[str] = mapped_column(String(64))
    attempt: Mapped[int] = mapped_column(Integer)
    worker_id: Mapped[str] = mapped_column(String(128))
    traceparent: Mapped[str] = mapped_column(String(64))
    created_us: Mapped[int] = mapped_column(BigInteger)
    # The authenticated subject whose action caused it ("system": the server's
    # own); '' when stored before 0008.
    recorded_by: Mapped[str] = mapped_column(Text, default="")
    # On a COMPLETED or FAILED event the server records, how long what it
    # closes ran, in microseconds; NULL on other events and on those stored
    # before 0013.
    duration_us: Mapped[int | None] = mapped_column(BigInteger, nullable=True)

    __table_args__ = (
        Index(
            "ux_trace_events_key",
            "run_id",
            "event_key",
            unique=True,
            sqlite_where=text("event_key <> ''"),
            postgresql_where=text("event_key <> ''"),
        ),
        # The retention sweep deletes by age.
        Index("ix_trace_events_created", "created_us"),
    )
    # Full-text search (migration 0014, queried in store/search.py) is kept
    # out of this metadata, each backend's own and maintained by the database
    # on every insert and delete: PostgreSQL's generated column search_vector
    # (a tsvector; no insert names it) with its GIN index
    # ix_trace_events_search, SQLite's FTS5 table trace_events_search with
    # its triggers.


class SigningKeyRow(Base):
    """Public keys that signed attestations; kept after rotation for verification."""

    __tablename__ = "signing_keys"
    key_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    public_key: Mapped[str] = mapped_column(String(128))  # raw Ed25519, hex
    algorithm: Mapped[str] = mapped_column(String(32))
    created_us: Mapped[int] = mapped_column(BigInteger)
    active: Mapped[bool] = mapped_column(Boolean)


class AttestationRow(Base):
    __tablename__ = "attestations"
    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    key: Mapped[str] = mapped_column(String(200), unique=True)
    tenant: Mapped[str] = mapped_column(String(128))
    type: Mapped[int] = mapped_column(Integer)
    entity_type: Mapped[str] = mapped_column(String(16))
    entity_id: Mapped[str] = mapped_column(String(64))
    workflow_id: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[str] = mapped_column(String(64))
    worker_id: Mapped[str] = mapped_column(String(128))
    attempt: Mapped[int] = mapped_column(Integer)
    state: Mapped[int] = mapped_column(Integer)
    data: Mapped[str] = mapped_column(Text)
    chain_id: Mapped[str] = mapped_column(String(64))
    chain_seq: Mapped[int] = mapped_column(BigInteger)
    digest: Mapped[str] = mapped_column(String(80))
    previous_digest: Mapped[str] = mapped_column(String(80))
    signature: Mapped[str] = mapped_column(String(200))  # hex
    key_id: Mapped[str] = mapped_column(String(64))
    created_us: Mapped[int] = mapped_column(BigInteger)
    expire_us: Mapped[int] = mapped_column(BigInteger)
    # As data["recorded_by"] (which the signature covers), readable without
    # the data; '' when written before 0008.
    recorded_by: Mapped[str] = mapped_column(Text, default="")
    # As data["service"] (a job's) and data's request_context user_id, for
    # listings; '' when none (0018 backfilled them).
    service: Mapped[str] = mapped_column(String(128), default="", server_default="")
    user_id: Mapped[str] = mapped_column(String(256), default="", server_default="")

    __table_args__ = (
        Index("ux_attestations_chain", "chain_id", "chain_seq", unique=True),
        Index("ix_attestations_workflow", "workflow_id", "seq"),
        Index("ix_attestations_job", "job_id", "seq"),
        Index("ix_attestations_expire", "expire_us"),
        # Listings across runs (0018), in chain-write order within a tenant.
        Index("ix_attestations_tenant_seq", "tenant", "seq"),
        Index("ix_attestations_tenant_state_seq", "tenant", "state", "seq"),
        Index("ix_attestations_tenant_service_seq", "tenant", "service", "seq"),
        Index("ix_attestations_tenant_user_seq", "tenant", "user_id", "seq"),
        Index("ix_attestations_tenant_worker_seq", "tenant", "worker_id", "seq"),
        Index("ix_attestations_tenant_created", "tenant", "created_us"),
    )


class PrunedAttestationRow(Base):
    """What retention deleted, so a chain can tell 'pruned' from 'tampered'."""

    __tablename__ = "pruned_attestations"
    chain_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    chain_seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    key: Mapped[str] = mapped_column(String(200))
    digest: Mapped[str] = mapped_column(String(80))
    pruned_us: Mapped[int] = mapped_column(BigInteger)


class WorkerSessionRow(Base):
    """The fleet registry: one row per connected worker session, written by the
    replica its stream is connected to (on connect, in batches as it changes,
    refreshed before `expires_us`, deleted on disconnect). A replica that dies
    stops refreshing its rows: they are not listed past `expires_us`, and swept."""

    __tablename__ = "worker_sessions"
    __table_args__ = (
        Index("ix_worker_sessions_replica", "replica"),
        Index("ix_worker_sessions_expires", "expires_us"),
    )
    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    session_id: Mapped[str] = mapped_column(String(64), unique=True)
    replica: Mapped[str] = mapped_column(String(320))
    # The worker as jobs name it, and its lease holder digest.
    worker_id: Mapped[str] = mapped_column(Text)
    holder: Mapped[str] = mapped_column(String(64))
    # JSON list of the tenants whose jobs it may run; NULL: any tenant.
    tenants: Mapped[str | None] = mapped_column(Text, nullable=True)
    services: Mapped[str] = mapped_column(Text)  # JSON list
    labels: Mapped[str] = mapped_column(Text)  # JSON object
    version: Mapped[str] = mapped_column(Text, default="")
    max_concurrency: Mapped[int] = mapped_column(Integer)
    # JSON list of [job id, attempt, since (us), service].
    held: Mapped[str] = mapped_column(Text)
    affinity_keys: Mapped[str] = mapped_column(Text)  # JSON list
    draining: Mapped[bool] = mapped_column(Boolean, default=False)
    connected_us: Mapped[int] = mapped_column(BigInteger)
    last_heartbeat_us: Mapped[int] = mapped_column(BigInteger)
    expires_us: Mapped[int] = mapped_column(BigInteger)
    completed: Mapped[int] = mapped_column(BigInteger, default=0)
    failed: Mapped[int] = mapped_column(BigInteger, default=0)
    lease_losses: Mapped[int] = mapped_column(BigInteger, default=0)


class ScheduleRow(Base):
    """A schedule (migration 0024): a job or workflow template (the serialized
    SubmitJobRequest / SubmitWorkflowRequest, request_id empty) and when it
    runs. `due_us` is the next tick plus its jitter (NULL while paused), read
    by every replica's scanner; `claim_until_us` is the scanner's claim."""

    __tablename__ = "schedules"
    __table_args__ = (
        Index("ix_schedules_due", "due_us"),
        Index("ix_schedules_buffered", "buffered_us"),
    )
    tenant: Mapped[str] = mapped_column(String(128), primary_key=True)
    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    description: Mapped[str] = mapped_column(Text, default="")
    cron: Mapped[str] = mapped_column(String(256), default="")
    time_zone: Mapped[str] = mapped_column(String(64), default="")
    interval_us: Mapped[int] = mapped_column(BigInteger, default=0)
    jitter_us: Mapped[int] = mapped_column(BigInteger, default=0)
    overlap: Mapped[int] = mapped_column(Integer, default=0)
    catch_up: Mapped[int] = mapped_column(Integer, default=0)
    catch_up_window_us: Mapped[int] = mapped_column(BigInteger, default=0)
    kind: Mapped[str] = mapped_column(String(16))
    template: Mapped[bytes] = mapped_column(LargeBinary)
    definition_hash: Mapped[str] = mapped_column(String(64))
    paused: Mapped[bool] = mapped_column(Boolean, default=False)
    # Interval schedules tick at anchor_us + k * interval_us.
    anchor_us: Mapped[int] = mapped_column(BigInteger)
    next_tick_us: Mapped[int] = mapped_column(BigInteger, default=0)
    due_us: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    claim_until_us: Mapped[int] = mapped_column(BigInteger, default=0)
    last_run_id: Mapped[str] = mapped_column(String(64), default="")
    last_run_us: Mapped[int] = mapped_column(BigInteger, default=0)
    skipped_ticks: Mapped[int] = mapped_column(BigInteger, default=0)
    buffered_us: Mapped[int] = mapped_column(BigInteger, default=0)
    owner: Mapped[str] = mapped_column(Text)
    created_us: Mapped[int] = mapped_column(BigInteger)
    updated_us: Mapped[int] = mapped_column(BigInteger)
