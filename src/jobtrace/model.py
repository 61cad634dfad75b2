"""Plain typed records shared by the domain and the store: no rules, no I/O."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

JSON = dict[str, Any]

# Who a write is recorded by when the server acted on its own (a lease that
# expired, a timeout): no caller's action caused it.
SYSTEM_SUBJECT = "system"


class RunState(enum.IntEnum):
    """Mirrors jobtrace.v1.RunState by number."""

    UNSPECIFIED = 0
    QUEUED = 1
    RUNNING = 2
    COMPLETED = 3
    FAILED = 4
    CANCELLED = 5
    TERMINATED = 6
    TIMED_OUT = 7
    PENDING = 8
    PAUSED = 9
    WAITING_FOR_HUMAN = 10

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset(
    {
        RunState.COMPLETED,
        RunState.FAILED,
        RunState.CANCELLED,
        RunState.TERMINATED,
        RunState.TIMED_OUT,
    }
)


class View(enum.IntEnum):
    """How much of each item a listing returns. Mirrors by number jobtrace.v1's
    JobView, WorkflowView, TraceEventView, AttestationView and AnnotationView."""

    UNSPECIFIED = 0  # BASIC
    BASIC = 1
    FULL = 2


@dataclass(frozen=True, slots=True)
class Backoff:
    initial_ms: int = 1_000
    multiplier: float = 2.0
    maximum_ms: int = 300_000

    def delay_ms(self, retry_number: int) -> int:
        """Delay before retry `retry_number` (1 for the first retry)."""
        delay = self.initial_ms * self.multiplier ** max(0, retry_number - 1)
        return int(min(delay, self.maximum_ms))


class Comparator(enum.IntEnum):
    """How a worker's label is compared with a LabelRequirement's value.
    Mirrors jobtrace.v1.Comparator by number; UNSPECIFIED is stored as EQUAL."""

    UNSPECIFIED = 0
    EQUAL = 1
    NOT_EQUAL = 2
    GREATER = 3
    AT_LEAST = 4
    LESS = 5
    AT_MOST = 6

    @property
    def numeric(self) -> bool:
        """Orders numbers: the value must be a number."""
        return self in (
            Comparator.GREATER,
            Comparator.AT_LEAST,
            Comparator.LESS,
            Comparator.AT_MOST,
        )


@dataclass(frozen=True, slots=True)
class LabelRequirement:
    """A label a job wants of its worker: required (every one must hold) or a
    preference whose weight adds to the score of a worker where it holds.
    `value` is a string or a number; None only before validation (neither)."""

    key: str
    value: str | float | None
    comparator: Comparator = Comparator.EQUAL
    required: bool = False
    weight: float = 0.0


class WaitingReason(enum.IntEnum):
    """Why a job is not running yet; mirrors jobtrace.v1.WaitingReason."""

    UNSPECIFIED = 0
    NO_WORKER_FOR_SERVICE = 1
    NO_WORKER_MEETS_LABELS = 2
    ALL_BUSY = 3
    NOT_BEFORE = 4
    DEPENDENCIES = 5
    PAUSED = 6
    APPROVAL = 7
    RATE_LIMITED = 8
    CONCURRENCY_LIMIT = 9


@dataclass(frozen=True, slots=True)
class JobSpec:
    service: str
    payload: JSON = field(default_factory=dict)
    priority: int = 0
    max_attempts: int = 3
    timeout_ms: int = 0
    not_before_us: int = 0
    affinity_keys: tuple[str, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)
    backoff: Backoff = field(default_factory=Backoff)
    # Desired worker labels (required ones and weighted preferences).
    worker_labels: tuple[LabelRequirement, ...] = ()
    # Weighted affinity keys: (key, weight) pairs over a worker's cached keys.
    affinity: tuple[tuple[str, float], ...] = ()
    # Flow control (see domain.flow): rate-limit uses and a concurrency key,
    # each with its template resolved from the payload at submission.
    rate_limits: tuple[RateLimitUse, ...] = ()
    concurrency: Concurrency | None = None


class ConcurrencyStrategy(enum.IntEnum):
    """Mirrors jobtrace.v1.ConcurrencyKey.Strategy."""

    UNSPECIFIED = 0
    QUEUE = 1
    CANCEL_NEWEST = 2
    CANCEL_OLDEST = 3


@dataclass(frozen=True, slots=True)
class RateLimitUse:
    """A job's use of a named rate limit: `units` tokens of the bucket of
    partition `resolved` (the `partition` template resolved; '' the shared
    bucket)."""

    key: str
    units: int = 1
    partition: str = ""
    resolved: str = ""

    @property
    def bucket(self) -> str:
        return self.key if not self.partition else f"{self.key}/{self.resolved}"


@dataclass(frozen=True, slots=True)
class Concurrency:
    """A job's concurrency key: the template `key`, resolved to `resolved`."""

    key: str
    max_running: int
    strategy: ConcurrencyStrategy = ConcurrencyStrategy.QUEUE
    resolved: str = ""


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A named rate limit: `count` tokens per `period_us`, at most `burst`."""

    key: str
    count: int
    period_us: int
    burst: int
    tenant: str = ""
    created_by: str = ""
    created_us: int = 0
    updated_us: int = 0

    @property
    def per_us(self) -> float:
        """Tokens added per microsecond."""
        return self.count / self.period_us


@dataclass(frozen=True, slots=True)
class Failure:
    reason: str
    code: str = ""
    retryable: bool = False
    details: str = ""
    attempt: int = 0
    # What the failure rules classified it as ('' unclassified).
    kind: str = ""


@dataclass(frozen=True, slots=True)
class FailureGroup:
    """Failed attempts of one kind ('' unclassified) and service in a window,
    with the last of them as an example."""

    kind: str
    service: str
    count: int
    job_id: str
    attempt: int
    failed_us: int
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Caller:
    """Who writes, as authenticated (never as claimed): the subject recorded
    as submitted_by / recorded_by, and whether its roles let it make a
    reviewer's statements (approval.* keys, actor kind REVIEWER)."""

    subject: str
    reviewer: bool = False


@dataclass(frozen=True, slots=True)
class QueueState:
    """A queue (a tenant's jobs of one service): paused or not, and its jobs
    waiting and running."""

    tenant: str
    service: str
    paused: bool = False
    paused_by: str = ""
    paused_us: int = 0
    reason: str = ""
    queued: int = 0
    running: int = 0


@dataclass(frozen=True, slots=True)
class AnnotationInput:
    actor_kind: int
    actor_id: str
    actor_version: str
    attributes: JSON
    payload: JSON | None = None
    idempotency_key: str = ""


class OnTimeout(enum.IntEnum):
    """What an approval gate's timeout means; mirrors jobtrace.v1.OnTimeout."""

    UNSPECIFIED = 0
    FAIL = 1
    REJECT = 2


class OnReject(enum.IntEnum):
    """What a rejection of an approval gate means; mirrors jobtrace.v1.OnReject."""

    UNSPECIFIED = 0
    FAIL = 1
    SKIP = 2


class Disposition(enum.IntEnum):
    """A decision on an approval gate; mirrors jobtrace.v1.ApprovalDisposition."""

    UNSPECIFIED = 0
    APPROVED = 1
    REJECTED = 2


# An approval gate's approver entry that admits any principal with the
# reviewer role.
ANY_REVIEWER = "role:reviewer"


@dataclass(frozen=True, slots=True)
class ApprovalGate:
    """A workflow step that people decide instead of a worker (defaults applied)."""

    approvers: tuple[str, ...]
    min_approvals: int = 1
    timeout_ms: int = 0
    on_timeout: OnTimeout = OnTimeout.FAIL
    policy_version: str = ""
    on_reject: OnReject = OnReject.FAIL


@dataclass(frozen=True, slots=True)
class ApprovalDecision:
    """One approver's decision on a gate: `approver` is the authenticated subject."""

    approver: str
    disposition: Disposition
    comment: str
    decided_us: int


@dataclass(frozen=True, slots=True)
class Job:
    id: str
    tenant: str
    request_id: str
    spec: JobSpec
    state: RunState
    created_us: int
    updated_us: int
    workflow_id: str = ""
    step_name: str = ""
    depends_on: tuple[str, ...] = ()
    attempt: int = 0
    progress_percent: float = 0.0
    progress_message: str = ""
    result: JSON | None = None
    failure: Failure | None = None
    worker_id: str = ""
    # When the current (or last) attempt started; each claim resets it.
    started_us: int = 0
    completed_us: int = 0
    lease_deadline_us: int = 0
    next_attempt_us: int = 0
    traceparent: str = ""
    seq: int = 0
    # The worker session (stream) holding the current lease, if any.
    lease_session: str = ""
    # Who holds the lease: the holder digest of the worker's identity (tenant,
    # subject, worker id; see domain.worker_identity). `worker_id` only names it.
    lease_holder: str = ""
    # Annotations the running attempt's worker sent, published when it ends.
    pending_annotations: int = 0
    # When the first attempt started (0 before): retries leave it as it is.
    first_started_us: int = 0
    # The authenticated subject that submitted it ('' if stored before 0008).
    submitted_by: str = ""
    # A fan-out step: what its children run over (None: not a fan-out step;
    # its children have None too).
    for_each: ForEach | None = None
    # The user it was requested for (request_context.user_context.user_id; a
    # step's is its workflow's); '' when none or not read.
    user_id: str = ""
    # Who (a lease holder) the next attempt should not go to when another
    # worker can take it: set when a failure rule says avoid_same_worker.
    avoid_holder: str = ""
    # The triggering request of a standalone job as stored (JSON text), when
    # the row it was read from carried it (a transition's locked row does):
    # its attestation needs no second read. None: not read.
    request_context: str | None = field(default=None, compare=False, repr=False)
    # The head of a standalone job's attestation chain (last chain_seq, its
    # digest) as its row records it, when the row was read whole; None: not
    # recorded or not read (see store.attest.chain_head).
    chain_head: tuple[int, str] | None = field(default=None, compare=False, repr=False)
    # A step's number in its workflow's declared order, from 1 (a fan-out
    # child: its step's), and the workflow's declared steps; 0 and 0 for a
    # standalone job. Every event of the step carries them.
    step_number: int = 0
    total_steps: int = 0
    # A standalone job's rerun lineage: the job it reruns and the first job
    # of its chain ('' when it is no rerun).
    parent_run_id: str = ""
    root_run_id: str = ""
    # A step a workflow rerun carried over: the parent run's job it reuses.
    reused_from: str = ""
    # An approval gate step: the gate, the decisions so far, and while it
    # waits with a timeout, when it times out (0: none). None: a job step.
    approval: ApprovalGate | None = None
    decisions: tuple[ApprovalDecision, ...] = ()
    gate_deadline_us: int = 0
    # Why it may not be dispatched, whatever its state: HELD_BY_WORKFLOW while
    # its workflow is paused, HELD_BY_QUEUE when its queue was paused while it
    # was QUEUED (a bit each; 0: not held). See domain.pause.
    held: int = 0


# Job.held bits.
HELD_BY_WORKFLOW = 1
HELD_BY_QUEUE = 2


@dataclass(frozen=True, slots=True)
class ForEach:
    """A fan-out step's items: the list at `path` (dotted) in the result of
    its upstream step `step`."""

    step: str
    path: str = ""


@dataclass(frozen=True, slots=True)
class StepResultRef:
    """Where a step's result is read when it was too large to travel inline."""

    step_name: str
    job_id: str
    size_bytes: int


@dataclass(frozen=True, slots=True)
class StepResults:
    """Results of some steps of a workflow: step name -> result inline, up to
    a bound, and a reference for each one that did not fit."""

    inline: JSON = field(default_factory=dict)
    refs: tuple[StepResultRef, ...] = ()


@dataclass(frozen=True, slots=True)
class WorkflowStep:
    name: str
    job_id: str
    state: RunState
    depends_on: tuple[str, ...]
    attempt: int
    progress_percent: float = 0.0
    progress_message: str = ""
    # Carried over by a rerun: the parent run's job it reuses ('' otherwise).
    reused_from: str = ""
    # An approval gate step: as Job.approval, Job.decisions, Job.gate_deadline_us.
    approval: ApprovalGate | None = None
    decisions: tuple[ApprovalDecision, ...] = ()
    gate_deadline_us: int = 0


@dataclass(frozen=True, slots=True)
class Workflow:
    id: str
    tenant: str
    request_id: str
    name: str
    state: RunState
    priority: int
    steps: tuple[WorkflowStep, ...]
    created_us: int
    updated_us: int
    labels: dict[str, str] = field(default_factory=dict)
    started_us: int = 0
    completed_us: int = 0
    failure: Failure | None = None
    seq: int = 0
    # (completed, all) steps, set when `steps` was left out (a BASIC listing).
    step_counts: tuple[int, int] | None = None
    # The authenticated subject that submitted it ('' if stored before 0008).
    submitted_by: str = ""
    # The results of its output steps, once COMPLETED (left out of a listing).
    outputs: StepResults | None = None
    # When it ends TIMED_OUT unless it ended before: its submission plus the
    # timeout it was submitted with (0: no deadline).
    deadline_us: int = 0

    @property
    def timeout_us(self) -> int:
        return self.deadline_us - self.created_us if self.deadline_us else 0

    # A rerun's lineage: the run it reruns, the first run of its chain, why
    # ('' when it is no rerun).
    parent_run_id: str = ""
    root_run_id: str = ""
    rerun_reason: str = ""
    # When and why it was paused (0 and '': not paused; a run that ended
    # while paused keeps them).
    paused_us: int = 0
    pause_reason: str = ""

    @property
    def completed_steps(self) -> int:
        if self.step_counts is not None:
            return self.step_counts[0]
        return sum(1 for s in self.steps if s.state == RunState.COMPLETED)

    @property
    def total_steps(self) -> int:
        return self.step_counts[1] if self.step_counts is not None else len(self.steps)


class AnnotationScope(enum.IntEnum):
    """Mirrors jobtrace.v1.AnnotationScope by number."""

    UNSPECIFIED = 0
    RUN = 1
    STEP = 2
    ATTEMPT = 3


@dataclass(frozen=True, slots=True)
class Annotation:
    id: str
    tenant: str
    run_id: str
    key: str
    value: Any
    actor_kind: int
    actor_id: str
    created_us: int
    actor_version: str = ""
    job_id: str = ""
    attempt: int = 0
    scope: AnnotationScope = AnnotationScope.RUN
    scope_id: str = ""
    payload: JSON | None = None
    idempotency_key: str = ""
    seq: int = 0
    # The authenticated subject that wrote it, beside the claimed actor.
    recorded_by: str = ""


class TraceType(enum.IntEnum):
    UNSPECIFIED = 0
    STARTED = 1
    PROGRESS = 2
    COMPLETED = 3
    FAILED = 4
    LOG = 5


class Level(enum.IntEnum):
    UNSPECIFIED = 0
    DEBUG = 1
    INFO = 2
    WARN = 3
    ERROR = 4
    CRITICAL = 5


class Category(enum.IntEnum):
    UNSPECIFIED = 0
    BUSINESS = 1
    TECHNICAL = 2


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    message: str
    code: str = ""
    details: str = ""
    stack: str = ""


@dataclass(frozen=True, slots=True)
class TraceEvent:
    """A trace event; `seq` is 0 until stored."""

    run_id: str
    node_id: str = ""
    type: TraceType = TraceType.LOG
    level: Level = Level.INFO
    category: Category = Category.TECHNICAL
    ts_us: int = 0
    message: str = ""
    user_message: str = ""
    error: ErrorInfo | None = None
    output_summary: JSON | None = None
    data: JSON | None = None
    step_number: int = 0
    total_steps: int = 0
    percent: float = 0.0
    display_priority: int = 5
    milestone: bool = False
    event_key: str = ""
    truncated: bool = False
    job_id: str = ""
    attempt: int = 0
    worker_id: str = ""
    traceparent: str = ""
    tenant: str = ""
    seq: int = 0
    created_us: int = 0
    # The authenticated subject whose action caused it (SYSTEM_SUBJECT: none).
    recorded_by: str = ""
    # How long what a COMPLETED or FAILED event closes ran (an attempt, or a
    # workflow's run), in microseconds; None on other events.
    duration_us: int | None = None


class AttestationType(enum.IntEnum):
    UNSPECIFIED = 0
    WORKER_COMPLETION = 1
    WORKER_FAILURE = 2
    WORKFLOW_COMPLETION = 3
    WORKFLOW_FAILURE = 4
    WORKFLOW_CANCELLATION = 5
    WORKER_CANCELLATION = 6
    APPROVAL = 7
    WORKER_TERMINATION = 8
    WORKFLOW_TERMINATION = 9


@dataclass(frozen=True, slots=True)
class Attestation:
    key: str
    tenant: str
    type: AttestationType
    entity_type: str
    entity_id: str
    workflow_id: str
    job_id: str
    worker_id: str
    attempt: int
    state: RunState
    data: JSON
    chain_id: str
    chain_seq: int
    digest: str
    previous_digest: str
    signature: bytes
    key_id: str
    created_us: int
    expire_us: int
    seq: int = 0
    # The authenticated subject whose action caused it; also data["recorded_by"].
    recorded_by: str = ""


@dataclass(frozen=True, slots=True)
class SigningKey:
    key_id: str
    public_key: bytes
    algorithm: str
    created_us: int
    active: bool
