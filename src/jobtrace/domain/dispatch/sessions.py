"""Worker sessions: the hello that opens one, the connected stream, the messages it carries."""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from jobtrace.clock import now_us
from jobtrace.domain.errors import DomainError, Violations
from jobtrace.domain.validation import (
    MAX_CONCURRENCY,
    MAX_WORKER_AFFINITY_KEYS,
    SERVICE_RE,
    check_affinity,
    check_id,
    check_labels,
    check_text,
)
from jobtrace.domain.worker_identity import WorkerIdentity
from jobtrace.model import JSON, Job, StepResults

OUTBOX_HIGH_WATER = 1024
# Most reports one ReportBatch may carry (Welcome.max_batch).
MAX_BATCH_REPORTS = 500


# --- messages to a worker (the api turns them into ConnectResponse) -----------


@dataclass(frozen=True, slots=True)
class Welcome:
    session_id: str
    heartbeat_ms: int
    lease_ms: int
    resumed: list[tuple[str, int]]
    revoked: list[tuple[str, int]]
    # Most reports per batch this server takes (0: none).
    max_batch: int = MAX_BATCH_REPORTS


@dataclass(frozen=True, slots=True)
class Assign:
    job: Job
    lease_deadline_us: int
    request_context: JSON
    # The results of the steps a workflow step depends on (None: no such steps).
    upstream: StepResults | None = None


@dataclass(frozen=True, slots=True)
class AssignMany:
    """Several jobs for a worker that takes them in one message."""

    assigns: list[Assign]


@dataclass(frozen=True, slots=True)
class Cancel:
    job_id: str
    attempt: int
    reason: str


@dataclass(frozen=True, slots=True)
class Acked:
    message_id: int
    job_id: str
    attempt: int


@dataclass(frozen=True, slots=True)
class HeartbeatAcked:
    message_id: int
    lease_deadline_us: int
    cancels: list[Cancel]


@dataclass(frozen=True, slots=True)
class Refused:
    message_id: int
    kind: str
    job_id: str
    attempt: int
    error: DomainError
    fatal: bool = False


@dataclass(frozen=True, slots=True)
class BatchAnswer:
    """The answer to a batch of reports: each one acknowledged or refused
    (a Refused here is never fatal), in batch order."""

    acked: list[Acked]
    refused: list[Refused]


@dataclass(frozen=True, slots=True)
class Drained:
    reason: str
    grace_ms: int


Outgoing = (
    Welcome
    | Assign
    | AssignMany
    | Cancel
    | Acked
    | HeartbeatAcked
    | Refused
    | BatchAnswer
    | Drained
)


@dataclass(frozen=True, slots=True)
class Hello:
    identity: WorkerIdentity
    services: tuple[str, ...]
    max_concurrency: int
    labels: dict[str, str]
    affinity_keys: tuple[str, ...]
    running: tuple[tuple[str, int], ...] = ()
    allowed_services: frozenset[str] | None = None  # None: any
    allowed_tenants: frozenset[str] | None = None  # None: any
    # Whether its credentials carry the reviewer role (approval.* annotations).
    reviewer: bool = False
    # The worker software's version, as it says (the fleet view shows it).
    version: str = ""
    # It takes several assignments in one message.
    accepts_batches: bool = False

    @property
    def worker_id(self) -> str:
        return self.identity.name


class HeldJobs(dict[str, int]):
    """Job id -> attempt held, remembering since when each attempt is held
    (the fleet view shows it)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        now = now_us()
        self.since: dict[str, tuple[int, int]] = {job: (a, now) for job, a in self.items()}

    def __setitem__(self, job_id: str, attempt: int) -> None:
        super().__setitem__(job_id, attempt)
        if self.since.get(job_id, (0, 0))[0] != attempt:
            self.since[job_id] = (attempt, now_us())
            if len(self.since) > 2 * len(self) + 64:  # forget those no longer held
                self.since = {j: v for j, v in self.since.items() if self.get(j) == v[0]}

    def since_us(self, job_id: str, attempt: int) -> int:
        held = self.since.get(job_id)
        return held[1] if held is not None and held[0] == attempt else 0


@dataclass(eq=False)
class WorkerSession:
    """One connected worker stream on this replica."""

    identity: WorkerIdentity
    session_id: str
    services: frozenset[str]
    max_concurrency: int
    affinity_keys: frozenset[str]
    labels: dict[str, str]
    tenants: frozenset[str] | None = None  # whose jobs it may run; None: any
    # Whether its credentials carry the reviewer role (approval.* annotations).
    reviewer: bool = False
    # It takes several assignments in one message (WorkerHello.accepts_batches).
    accepts_batches: bool = False
    held: dict[str, int] = field(default_factory=HeldJobs)  # job id -> attempt
    # Claims for this session that its worker has not been told of and that may
    # be stored (Scheduler._unsettled): their slots stay taken until settled.
    claiming: dict[str, int] = field(default_factory=dict)  # job id -> attempt
    last_heartbeat_us: int = 0
    draining: bool = False
    # The dispatcher's known placement classes this worker's labels do not
    # meet, as of a version of that set (None: to work out again).
    skipped_classes: tuple[int, frozenset[str]] | None = None
    # What the fleet view shows: the worker's version, when it connected, and
    # what it did since (jobs completed, failures reported, leases lost).
    version: str = ""
    connected_us: int = field(default_factory=now_us)
    completed: int = 0
    failed: int = 0
    lease_losses: int = 0
    closed: bool = False
    close_reason: str = ""
    # Hello has taken over the leases it resumes (an older session of the same
    # worker may give back the rest).
    resumed: bool = False
    # Who holds this session's leases (WorkerIdentity.holder; the key of
    # Scheduler.sessions), and the worker's name (jobs, events and logs show it).
    holder: str = field(init=False)
    worker_id: str = field(init=False)
    _outbox: deque[Outgoing | None] = field(default_factory=deque)
    _ready: asyncio.Event = field(default_factory=asyncio.Event)
    _space: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        if not isinstance(self.held, HeldJobs):
            self.held = HeldJobs(self.held)
        self.holder = self.identity.holder
        self.worker_id = self.identity.name

    @property
    def free_slots(self) -> int:
        if self.closed or self.draining:
            return 0
        return max(0, self.max_concurrency - len(self.held) - len(self.claiming))

    def send(self, message: Outgoing) -> None:
        if not self.closed:
            self._outbox.append(message)
            self._ready.set()

    async def send_reply(self, message: Outgoing) -> None:
        """Replies wait while the worker is not reading (backpressure on its reports)."""
        while len(self._outbox) >= OUTBOX_HIGH_WATER and not self.closed:
            self._space.clear()
            await self._space.wait()
        self.send(message)

    def close(self, reason: str) -> None:
        if not self.closed:
            self.closed = True
            self.close_reason = reason
            self._outbox.append(None)
            self._ready.set()
            self._space.set()

    async def next_outgoing(self) -> Outgoing | None:
        """The next message to write; None once the session is closed and flushed."""
        while not self._outbox:
            self._ready.clear()
            await self._ready.wait()
        message = self._outbox.popleft()
        if len(self._outbox) < OUTBOX_HIGH_WATER:
            self._space.set()
        return message


def check_hello(hello: Hello) -> None:
    """A worker's hello, checked before anything is registered."""
    v = Violations()
    if not hello.identity.worker_id:
        v.add("hello.worker_id", "required")
    # The name the job records (subject/worker id) fits its column.
    check_text(v, "hello.worker_id", hello.worker_id, 128)
    if not hello.services:
        v.add("hello.services", "required: at least one service")
    elif len(hello.services) > 256:
        v.add("hello.services", "at most 256 services")
    for i, service in enumerate(hello.services):
        if not SERVICE_RE.fullmatch(service):
            v.add(f"hello.services[{i}]", "must be 1-128 characters of [A-Za-z0-9._:/-]")
        elif hello.allowed_services is not None and service not in hello.allowed_services:
            v.add(f"hello.services[{i}]", f"this worker may not serve {service!r}")
    if not 0 <= hello.max_concurrency <= MAX_CONCURRENCY:
        v.add("hello.max_concurrency", f"must be between 1 and {MAX_CONCURRENCY} (0 means 1)")
    check_labels(v, "hello.labels", hello.labels, free_keys=True)
    check_affinity(v, "hello.affinity_keys", hello.affinity_keys, MAX_WORKER_AFFINITY_KEYS)
    check_text(v, "hello.version", hello.version, 128)
    check_running(v, "hello.running", hello.running)
    v.raise_if_any()


def check_running(v: Violations, field: str, running: tuple[tuple[str, int], ...]) -> None:
    """The jobs a worker says it runs (hello or heartbeat)."""
    if len(running) > MAX_CONCURRENCY:
        v.add(field, f"at most {MAX_CONCURRENCY} jobs (got {len(running)})")
        return
    for i, (job_id, attempt) in enumerate(running):
        check_id(v, f"{field}[{i}].job_id", job_id)
        if attempt < 1:
            v.add(f"{field}[{i}].attempt", "must be an attempt number (1 or more)")
