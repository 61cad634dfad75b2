"""The schema, in SQLAlchemy 2 typed style. Times are integer microseconds (UTC)."""

from __future__ import annotations

from sqlalchemy import BigInteger, Boolean, Float, Index, Integer, String, Text, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# SQLite only makes INTEGER PRIMARY KEY an alias of rowid (autoincrementing);
# BIGINT elsewhere.
SeqType = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    pass


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

    __table_args__ = (
        Index("ix_workflows_tenant_seq", "tenant", "seq"),
        Index("ix_workflows_tenant_state_seq", "tenant", "state", "seq"),
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
    # The holder (see lease_holder) of the attempt that failed last, when a
    # failure rule says its retry should go to another worker; '' otherwise.
    avoid_holder: Mapped[str] = mapped_column(String(64), default="")

    __table_args__ = (
        Index("ix_jobs_tenant_seq", "tenant", "seq"),
        Index("ix_jobs_tenant_state_seq", "tenant", "state", "seq"),
        Index("ix_jobs_workflow", "workflow_id", "step_index"),
        # The dispatcher's scan: eligible jobs of a service by priority, then age.
        Index("ix_jobs_dispatch", "state", "service", "priority", "seq"),
        # The supervisor's scan of leases.
        Index("ix_jobs_lease", "state", "lease_deadline_us"),
    )


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

    __table_args__ = (
        Index("ux_attestations_chain", "chain_id", "chain_seq", unique=True),
        Index("ix_attestations_workflow", "workflow_id", "seq"),
        Index("ix_attestations_job", "job_id", "seq"),
        Index("ix_attestations_expire", "expire_us"),
    )


class PrunedAttestationRow(Base):
    """What retention deleted, so a chain can tell 'pruned' from 'tampered'."""

    __tablename__ = "pruned_attestations"
    chain_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    chain_seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    key: Mapped[str] = mapped_column(String(200))
    digest: Mapped[str] = mapped_column(String(80))
    pruned_us: Mapped[int] = mapped_column(BigInteger)
