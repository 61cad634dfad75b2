"""Job and workflow submission, queries and cancellation."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import Any, Generic, TypeVar

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from jobtrace.clock import now_us
from jobtrace.domain import annotations as annotation_rules
from jobtrace.domain import approvals, failures, fan_out, flow, lifecycle, reruns, states
from jobtrace.domain import redact as redact_rules
from jobtrace.domain.bulk import (
    BulkOperations,
    BulkRequest,
    BulkResult,
    BulkRun,
    BulkStep,
    StepContext,
)
from jobtrace.domain.errors import (
    AlreadyExists,
    DeadlineExceeded,
    DomainError,
    FieldViolation,
    NotFound,
    ResourceExhausted,
    Unavailable,
    Violations,
)
from jobtrace.domain.pagination import Encoder, PageTokens, fill, position
from jobtrace.domain.redact import Redaction
from jobtrace.domain.reruns import RerunRequest
from jobtrace.domain.run_feed import RunFeed
from jobtrace.domain.run_filters import NO_RUN_FILTER, RunFilter, check_run_filter
from jobtrace.domain.validation import (
    MAX_STEPS,
    MAX_TIMEOUT_MS,
    STEP_NAME_RE,
    check_id,
    check_labels,
    check_page_size,
    check_request_id,
    check_size,
    check_text,
    check_view,
    normalize_spec,
)
from jobtrace.events.feed import JobFeed, Subscription
from jobtrace.ids import JOB_PREFIX, WORKFLOW_PREFIX, new_id
from jobtrace.model import (
    JSON,
    SYSTEM_SUBJECT,
    AnnotationInput,
    ApprovalGate,
    Caller,
    Failure,
    FailureGroup,
    ForEach,
    Job,
    JobSpec,
    RunState,
    Workflow,
    WorkflowStep,
)
from jobtrace.store import codec
from jobtrace.store import jobs as store
from jobtrace.store.db import Database, Tx
from jobtrace.store.listing import Chunk

log = logging.getLogger(__name__)

CANCELLED_BY_USER = lifecycle.CANCELLED_BY_USER
MAX_SUBMIT_ANNOTATIONS = 16
MAX_REASON = 1000
# Jobs listed in one notice to the other replicas (see Jobs._changed).
JOBS_PER_NOTICE = 40
# WatchWorkflow sends a step's progress at most this often (seconds); its
# state changes go at once.
STEP_PROGRESS_INTERVAL_S = 0.25
# The longest wait one AwaitJob / AwaitWorkflow call may ask for (seconds).
MAX_AWAIT_S = 3600.0


@dataclass(frozen=True, slots=True)
class SizedAnnotation:
    item: AnnotationInput
    payload_bytes: int


@dataclass(frozen=True, slots=True)
class JobSubmission:
    request_id: str
    spec: JobSpec
    payload_bytes: int
    request_hash: str
    request_context: JSON = field(default_factory=dict)
    context_bytes: int = 0
    annotations: tuple[SizedAnnotation, ...] = ()
    traceparent: str = ""


@dataclass(frozen=True, slots=True)
class StepSubmission:
    name: str
    spec: JobSpec | None
    payload_bytes: int
    depends_on: tuple[str, ...] = ()
    independent: bool = False
    for_each: ForEach | None = None
    # An approval gate instead of a job (set exactly one of spec and approval).
    approval: ApprovalGate | None = None


@dataclass(frozen=True, slots=True)
class WorkflowSubmission:
    request_id: str
    name: str
    steps: tuple[StepSubmission, ...]
    request_hash: str
    priority: int = 0
    request_context: JSON = field(default_factory=dict)
    context_bytes: int = 0
    annotations: tuple[SizedAnnotation, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)
    traceparent: str = ""
    # The steps whose results are its outputs (): those no step depends on.
    outputs: tuple[str, ...] = ()
    # The whole run's timeout from submission (None: not set, no deadline).
    timeout_ms: int | None = None


# Items of one SubmitJobs / SubmitWorkflows call.
MAX_BULK_JOBS = 1000
MAX_BULK_WORKFLOWS = 100

R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class ItemResult(Generic[R]):
    """One item's outcome in a bulk submission: its run (new, or an identical
    earlier submission's: deduplicated), or the error that kept it out."""

    run: R | None
    deduplicated: bool = False
    error: DomainError | None = None


@dataclass(frozen=True, slots=True)
class Page:
    items: list[Any]
    next_page_token: str
    # Every matching item, over all pages, when the listing was asked to count.
    total_size: int | None = None


_Run = TypeVar("_Run", Job, Workflow)


# Called after commit with the ids of jobs whose state changed.
ChangeListener = Callable[[list[Job]], None]


def iso(us: int) -> str:
    return dt.datetime.fromtimestamp(us / 1e6, dt.UTC).isoformat().replace("+00:00", "Z")


def complete_request_context(
    ctx: JSON, request_id: str, received_us: int, redaction: Redaction = redact_rules.DEFAULT
) -> JSON:
    """Fill the metadata the caller left out: the request id and receive time.
    Credential headers (see Redaction.secret_header) are dropped: never stored,
    never sent to a worker, never in evidence."""
    out = dict(ctx)
    metadata = dict(out.get("metadata") or {})
    headers = metadata.get("headers")
    if isinstance(headers, dict):
        metadata["headers"] = {
            name: value for name, value in headers.items() if not redaction.secret_header(name)
        }
    metadata.setdefault("request_id", request_id)
    metadata.setdefault("timestamp", iso(received_us))
    out["metadata"] = metadata
    return out


def check_job_submission(v: Violations, sub: JobSubmission) -> JobSpec:
    """A job submission's violations (into v, fields named as in
    SubmitJobRequest); its spec normalized."""
    check_request_id(v, "request_id", sub.request_id)
    spec = normalize_spec(v, "job", sub.spec, sub.payload_bytes)
    check_size(v, "request_context", sub.context_bytes)
    _check_annotations(v, "annotations", sub.annotations)
    return spec


def check_workflow_submission(
    v: Violations, sub: WorkflowSubmission
) -> tuple[list[JobSpec], dict[int, ApprovalGate], list[tuple[str, ...]]]:
    """A workflow submission's violations (into v, fields named as in
    SubmitWorkflowRequest); its steps' specs normalized, its approval gates by
    step index, each step's dependencies (valid only without violations)."""
    check_request_id(v, "request_id", sub.request_id)
    if not sub.name:
        v.add("name", "required")
    check_text(v, "name", sub.name, 256)
    if not sub.steps:
        v.add("steps", "required: at least one step")
    elif len(sub.steps) > MAX_STEPS:
        v.add("steps", f"at most {MAX_STEPS} steps (got {len(sub.steps)})")
    if not -1000 <= sub.priority <= 1000:
        v.add("priority", "must be between -1000 and 1000")
    check_labels(v, "labels", sub.labels)
    if sub.timeout_ms is not None and not 0 < sub.timeout_ms <= MAX_TIMEOUT_MS:
        v.add("timeout", "must be positive and at most 7 days")
    check_size(v, "request_context", sub.context_bytes)
    _check_annotations(v, "annotations", sub.annotations)
    specs: list[JobSpec] = []
    gates: dict[int, ApprovalGate] = {}
    seen: set[str] = set()
    for i, step in enumerate(sub.steps):
        if not STEP_NAME_RE.fullmatch(step.name):
            v.add(f"steps[{i}].name", "required: 1-128 characters of [A-Za-z0-9._-]")
        elif step.name in seen:
            v.add(f"steps[{i}].name", f"duplicate step name {step.name!r}")
        seen.add(step.name)
        if step.approval is not None:
            gates[i] = approvals.check_gate(v, f"steps[{i}].approval", step.approval)
            if step.spec is not None:
                v.add(f"steps[{i}]", "set one of job and approval, not both")
            if step.for_each is not None:
                v.add(f"steps[{i}].for_each", "an approval gate cannot fan out")
            specs.append(
                JobSpec(service=approvals.GATE_SERVICE, priority=sub.priority, max_attempts=1)
            )
        elif step.spec is None:
            v.add(f"steps[{i}].job", "required: set job (or approval for an approval gate)")
            specs.append(JobSpec(service=""))
        else:
            specs.append(
                normalize_spec(
                    v,
                    f"steps[{i}].job",
                    step.spec,
                    step.payload_bytes,
                    default_priority=sub.priority,
                )
            )
    claimed_outputs: set[str] = set()
    for i, name in enumerate(sub.outputs):
        if name not in seen:
            v.add(f"outputs[{i}]", f"unknown step {name!r}")
        elif name in claimed_outputs:
            v.add(f"outputs[{i}]", f"step {name!r} is named twice")
        claimed_outputs.add(name)
    for i, step in enumerate(sub.steps):
        if step.for_each is not None:
            _check_for_each(v, i, step, specs[i])
    deps: list[tuple[str, ...]] = [() for _ in sub.steps]
    if not v.items:
        deps = resolve_dependencies(v, sub.steps)
        for i, step in enumerate(sub.steps):
            if step.for_each is not None and step.for_each.step not in deps[i]:
                v.add(
                    f"steps[{i}].for_each.step",
                    f"must name a step that step {step.name!r} depends on"
                    f" (it depends on {', '.join(map(repr, deps[i])) or 'nothing'})",
                )
    return specs, gates, deps


def _bulk_violations(
    v: Violations,
    kind: str,
    limit: int,
    items: Sequence[Any],
    invalid: Sequence[FieldViolation],
    check: Callable[[Violations, Any], Any],
) -> list[Any]:
    """Check every item of a bulk submission, naming each violation by its
    item ("items[12].job.service"); `invalid` are those found converting the
    items (named so already; their items are None). Items sharing a
    request_id must be identical. Returns each item's check result."""
    if not items:
        v.add("items", f"required: 1 to {limit} {kind}s")
    elif len(items) > limit:
        v.add("items", f"at most {limit} {kind}s per call (got {len(items)})")
        return []
    v.items.extend(invalid)
    checked: list[Any] = []
    first: dict[str, int] = {}
    for i, sub in enumerate(items):
        if sub is None:
            checked.append(None)
            continue
        own = Violations()
        checked.append(check(own, sub))
        for item in own.items:
            v.add(f"items[{i}].{item.field}" if item.field else f"items[{i}]", item.description)
        at = first.setdefault(sub.request_id, i)
        if at != i and items[at] is not None and items[at].request_hash != sub.request_hash:
            v.add(
                f"items[{i}].request_id",
                f"request_id {sub.request_id!r} is also items[{at}].request_id, with a"
                " different request: items sharing a request_id must be identical",
            )
            v.add(
                f"items[{at}].request_id",
                f"request_id {sub.request_id!r} is also items[{i}].request_id, with a"
                " different request",
            )
    v.items.sort(key=lambda f: _item_order(f.field))
    return checked


def _item_order(field_name: str) -> tuple[int, str]:
    if field_name.startswith("items["):
        number = field_name[6:].split("]", 1)[0]
        if number.isdigit():
            return int(number), field_name
    return -1, field_name


def _conflict(found: Any, request_id: str) -> AlreadyExists:
    kind, entity_id = str(found["kind"]), str(found["entity_id"])
    return AlreadyExists(
        f"request_id {request_id!r} was already used for a different request ({kind} {entity_id})",
        reason="IDEMPOTENCY_CONFLICT",
        metadata={"existing_id": entity_id, "existing_kind": kind},
    )


def _check_annotations(v: Violations, field: str, items: tuple[SizedAnnotation, ...]) -> None:
    if len(items) > MAX_SUBMIT_ANNOTATIONS:
        v.add(field, f"at most {MAX_SUBMIT_ANNOTATIONS} entries")
    # (idempotency key, attribute key) is unique per run: two annotations of one
    # submission may not both claim it.
    claimed: dict[tuple[str, str], int] = {}
    for i, a in enumerate(items):
        annotation_rules.check_input(v, f"{field}[{i}]", a.item, a.payload_bytes)
        if not a.item.idempotency_key:
            continue
        for key in sorted(a.item.attributes):
            first = claimed.setdefault((a.item.idempotency_key, key), i)
            if first != i:
                v.add(
                    f"{field}[{i}].idempotency_key",
                    f"{field}[{first}] already records {key!r} under this idempotency key",
                )


def _check_for_each(v: Violations, i: int, step: StepSubmission, spec: JobSpec) -> None:
    """A fan-out step's own rules (that it names a step it depends on is
    checked with its dependencies)."""
    assert step.for_each is not None
    where = f"steps[{i}].for_each"
    if not step.for_each.step:
        v.add(f"{where}.step", "required: the upstream step whose result holds the list")
    path = step.for_each.path
    if len(path) > fan_out.MAX_PATH or (path and not fan_out.PATH_RE.fullmatch(path)):
        v.add(
            f"{where}.path",
            f"a dotted path of [A-Za-z0-9_-] keys, at most {fan_out.MAX_PATH} characters",
        )
    if len(step.name) > fan_out.MAX_STEP_NAME:
        v.add(
            f"steps[{i}].name",
            f"a for_each step's name has at most {fan_out.MAX_STEP_NAME} characters",
        )
    if isinstance(spec.payload, dict) and fan_out.ITEM_KEY in spec.payload:
        v.add(
            f"steps[{i}].job.payload",
            f"a for_each step's payload must not have the key {fan_out.ITEM_KEY!r}:"
            " each child gets its item there",
        )


def resolve_dependencies(v: Violations, steps: tuple[StepSubmission, ...]) -> list[tuple[str, ...]]:
    """Each step's dependencies (defaulting to the previous step); reports unknown
    names, self-references and cycles."""
    names = [s.name for s in steps]
    known = set(names)
    resolved: list[tuple[str, ...]] = []
    for i, step in enumerate(steps):
        if step.independent and step.depends_on:
            v.add(f"steps[{i}].depends_on", "must be empty when independent is set")
        if step.depends_on:
            deps = tuple(dict.fromkeys(step.depends_on))
        elif step.independent or i == 0:
            deps = ()
        else:
            deps = (names[i - 1],)
        for j, dep in enumerate(step.depends_on):
            if dep == step.name:
                v.add(f"steps[{i}].depends_on[{j}]", f"step {step.name!r} depends on itself")
            elif dep not in known:
                v.add(f"steps[{i}].depends_on[{j}]", f"unknown step {dep!r}")
        resolved.append(deps)
    if v.items:
        return resolved
    # Kahn's algorithm: whatever is never freed sits on a cycle.
    waiting = {name: set(deps) for name, deps in zip(names, resolved, strict=True)}
    ready = [n for n, d in waiting.items() if not d]
    while ready:
        done = ready.pop()
        for name, pending in waiting.items():
            if done in pending:
                pending.discard(done)
                if not pending:
                    ready.append(name)
        waiting[done] = set()
    cyclic = sorted(n for n, d in waiting.items() if d)
    if cyclic:
        v.add("steps", "dependency cycle among steps: " + ", ".join(cyclic))
    return resolved


def _state_filter(v: Violations, state: int) -> RunState | None:
    try:
        return RunState(state) or None
    except ValueError:
        v.add("state", f"unknown RunState value {state}")
        return None


# How old the count of a tenant's waiting jobs may be before it is taken again.
WAITING_RECOUNT_S = 1.0


class Jobs:
    """The JobService rules over one database."""

    def __init__(
        self,
        db: Database,
        tokens: PageTokens,
        life: lifecycle.Lifecycle,
        *,
        max_queued_per_tenant: int = 100_000,
    ) -> None:
        self.max_queued_per_tenant = max_queued_per_tenant
        # tenant -> (waiting jobs counted, when, admitted since); see _admit.
        self._waiting: dict[str, tuple[int, float]] = {}
        self._db = db
        self._tokens = tokens
        self._life = life
        self._listeners: list[ChangeListener] = []
        self.feed = JobFeed()
        self.stopping = asyncio.Event()
        # The live feeds of runs (WatchRuns).
        self.runs = RunFeed(db, self.feed, self.stopping)
        # Bulk operations over runs (CancelRuns).
        self.bulk = BulkOperations(db)
        self.add_listener(self.feed.publish)
        # Approval gate steps: decisions, pending gates, timeouts.
        self.approvals = approvals.Approvals(db, tokens, life, self._changed)

    def add_listener(self, listener: ChangeListener) -> None:
        self._listeners.append(listener)

    def notify(self, tx: Tx, jobs: list[Job]) -> None:
        """After `tx` commits, tell listeners (feeds, dispatcher) about these jobs."""
        self._changed(tx, jobs)

    def _changed(self, tx: Tx, jobs: list[Job]) -> None:
        if jobs:
            # One notice per JOBS_PER_NOTICE jobs: a notice travels in one
            # NOTIFY payload (under 8000 bytes), and one transaction may change
            # every step of a workflow (MAX_STEPS). The ids are the server's,
            # the holder a digest: each entry is at most about 150 bytes.
            for start in range(0, len(jobs), JOBS_PER_NOTICE):
                tx.notify(
                    {
                        "k": "jobs",
                        "j": [
                            [j.id, j.workflow_id, int(j.state), j.lease_holder, j.attempt]
                            for j in jobs[start : start + JOBS_PER_NOTICE]
                        ],
                    }
                )
            for listener in self._listeners:
                tx.on_commit(lambda listener=listener: listener(jobs))  # type: ignore[misc]

    # --- submission -------------------------------------------------------

    def check_job(self, sub: JobSubmission, caller: Caller) -> JobSpec:
        """SubmitJob's checks of a submission (nothing stored): its normalized spec."""
        for a in sub.annotations:
            annotation_rules.check_authority(a.item, caller)
        v = Violations()
        spec = check_job_submission(v, sub)
        v.raise_if_any()
        return spec

    async def submit_job(self, tenant: str, sub: JobSubmission, caller: Caller) -> tuple[Job, bool]:
        spec = self.check_job(sub, caller)

        async def op(session: AsyncSession, tx: Tx) -> tuple[Job, bool]:
            if spec.rate_limits:
                await flow.check_known(session, tenant, [("job", spec)])
            now = now_us()
            job = Job(
                id=new_id(JOB_PREFIX),
                tenant=tenant,
                request_id=sub.request_id,
                spec=spec,
                state=RunState.QUEUED,
                created_us=now,
                updated_us=now,
                traceparent=sub.traceparent,
                submitted_by=caller.subject,
            )
            try:
                await self._admit(session, tenant, 1)
            except ResourceExhausted:
                # An idempotent retry of an accepted submission is never refused.
                if await self._existing(session, tenant, sub.request_id, sub.request_hash, "job"):
                    return await self._deduplicated(session, tenant, sub)
                raise
            context = complete_request_context(
                sub.request_context, sub.request_id, now, self._life.trace.redaction
            )
            # The request id is recorded by the statement that stores the job
            # (on PostgreSQL), unless it is recorded already: a retry.
            stored = await store.insert_job_if_new(session, job, context, sub.request_hash)
            if stored is None:
                self._unadmit(tenant, 1)
                return await self._deduplicated(session, tenant, sub)
            await store.insert_annotations(
                session,
                [
                    a
                    for s in sub.annotations
                    for a in annotation_rules.build(
                        s.item,
                        recorded_by=caller.subject,
                        tenant=tenant,
                        run_id=job.id,
                        now_us=now,
                        redaction=self._life.trace.redaction,
                    )
                ],
            )
            self._changed(tx, [stored])
            return stored, False

        result: tuple[Job, bool] = await self._write_submission(op)
        job, deduplicated = result
        if not deduplicated:
            log.info(
                "job submitted",
                extra={"job_id": job.id, "tenant": tenant, "service": job.spec.service},
            )
        return result

    def check_workflow(
        self, sub: WorkflowSubmission, caller: Caller
    ) -> tuple[list[JobSpec], dict[int, ApprovalGate], list[tuple[str, ...]]]:
        """SubmitWorkflow's checks of a submission (nothing stored): the steps'
        normalized specs, their approval gates and dependencies."""
        for a in sub.annotations:
            annotation_rules.check_authority(a.item, caller)
        v = Violations()
        specs, gates, deps = check_workflow_submission(v, sub)
        v.raise_if_any()
        return specs, gates, deps

    async def submit_workflow(
        self, tenant: str, sub: WorkflowSubmission, caller: Caller
    ) -> tuple[Workflow, bool]:
        specs, gates, deps = self.check_workflow(sub, caller)

        async def op(session: AsyncSession, tx: Tx) -> tuple[Workflow, bool]:
            await flow.check_known(
                session, tenant, [(f"steps[{i}].job", s) for i, s in enumerate(specs)]
            )
            existing = await self._existing(
                session, tenant, sub.request_id, sub.request_hash, "workflow"
            )
            if existing is not None:
                workflow = await store.get_workflow(session, existing)
                assert workflow is not None
                return workflow, True
            await self._admit(session, tenant, len(sub.steps))
            workflow, jobs, context = self._new_workflow(tenant, sub, specs, gates, deps, caller)
            stored = await self._write_workflow(
                session,
                tx,
                workflow,
                jobs,
                context=context,
                outputs=sub.outputs,
                request_hash=sub.request_hash,
                annotations=[s.item for s in sub.annotations],
                caller=caller,
            )
            return stored, False

        result: tuple[Workflow, bool] = await self._write_submission(op)
        workflow, deduplicated = result
        if not deduplicated:
            log.info(
                "workflow submitted",
                extra={
                    "workflow_id": workflow.id,
                    "tenant": tenant,
                    "steps": len(workflow.steps),
                },
            )
        return result

    async def submit_jobs(
        self,
        tenant: str,
        items: Sequence[JobSubmission | None],
        caller: Caller,
        invalid: Sequence[FieldViolation] = (),
    ) -> list[ItemResult[Job]]:
        """Submit 1 to MAX_BULK_JOBS jobs in one transaction (SubmitJobs): every
        item checked first (any violation: Invalid naming each by its item,
        nothing stored); each item idempotent by its own request_id, a
        conflicting one answered with its error while the others are stored;
        the new jobs written in a few multi-row statements, admitted against
        the quota together, announced (dispatched) once, at commit."""
        for sub in items:
            for a in sub.annotations if sub is not None else ():
                annotation_rules.check_authority(a.item, caller)
        v = Violations()
        specs = _bulk_violations(v, "job", MAX_BULK_JOBS, items, invalid, check_job_submission)
        v.raise_if_any()
        subs = [s for s in items if s is not None]
        unique: dict[str, tuple[JobSubmission, JobSpec]] = {}
        for sub, spec in zip(subs, specs, strict=True):
            unique.setdefault(sub.request_id, (sub, spec))

        limited = [(f"items[{i}].job", spec) for i, spec in enumerate(specs) if spec.rate_limits]

        async def op(session: AsyncSession, tx: Tx) -> dict[str, ItemResult[Job]]:
            if limited:  # a rate limit named must exist, as for SubmitJob
                await flow.check_known(session, tenant, limited)
            now = now_us()
            found = await store.get_submissions(session, tenant, list(unique))
            out: dict[str, ItemResult[Job]] = {}
            earlier: dict[str, str] = {}
            new: list[tuple[Job, JSON]] = []
            notes: list[Any] = []
            redaction = self._life.trace.redaction
            for request_id, (sub, spec) in unique.items():
                row = found.get(request_id)
                if row is not None:
                    if row["kind"] != "job" or row["request_hash"] != sub.request_hash:
                        out[request_id] = ItemResult(None, error=_conflict(row, request_id))
                    else:
                        earlier[request_id] = str(row["entity_id"])
                    continue
                job = Job(
                    id=new_id(JOB_PREFIX),
                    tenant=tenant,
                    request_id=request_id,
                    spec=spec,
                    state=RunState.QUEUED,
                    created_us=now,
                    updated_us=now,
                    traceparent=sub.traceparent,
                    submitted_by=caller.subject,
                )
                context = complete_request_context(sub.request_context, request_id, now, redaction)
                new.append((job, context))
                notes.extend(
                    a
                    for s in sub.annotations
                    for a in annotation_rules.build(
                        s.item,
                        recorded_by=caller.subject,
                        tenant=tenant,
                        run_id=job.id,
                        now_us=now,
                        redaction=redaction,
                    )
                )
            if new:
                await self._admit(session, tenant, len(new))
                await store.insert_submissions(
                    session,
                    [
                        {
                            "tenant": tenant,
                            "request_id": job.request_id,
                            "kind": "job",
                            "entity_id": job.id,
                            "request_hash": unique[job.request_id][0].request_hash,
                            "created_us": now,
                        }
                        for job, _ in new
                    ],
                )
            stored = await store.insert_new_jobs(session, new)
            await store.insert_annotations_bulk(session, notes)
            for job in stored:
                out[job.request_id] = ItemResult(job)
            existing = await store.jobs_as_stored(session, earlier.values())
            for request_id, job_id in earlier.items():
                out[request_id] = ItemResult(existing[job_id], deduplicated=True)
            self._changed(tx, stored)
            return out

        by_id: dict[str, ItemResult[Job]] = await self._write_submission(op)
        results: list[ItemResult[Job]] = []
        answered: set[str] = set()
        for sub in subs:
            result = by_id[sub.request_id]
            if sub.request_id in answered and result.run is not None:
                result = replace(result, deduplicated=True)  # an earlier item's job
            answered.add(sub.request_id)
            results.append(result)
        created = sum(1 for r in by_id.values() if r.run is not None and not r.deduplicated)
        if created:
            log.info("jobs submitted", extra={"tenant": tenant, "jobs": created})
        return results

    async def submit_workflows(
        self,
        tenant: str,
        items: Sequence[WorkflowSubmission | None],
        caller: Caller,
        invalid: Sequence[FieldViolation] = (),
    ) -> list[ItemResult[Workflow]]:
        """Submit 1 to MAX_BULK_WORKFLOWS workflows in one transaction
        (SubmitWorkflows), checked, deduplicated and answered per item as in
        submit_jobs; the quota admits all their steps together."""
        for sub in items:
            for a in sub.annotations if sub is not None else ():
                annotation_rules.check_authority(a.item, caller)
        v = Violations()
        checked = _bulk_violations(
            v, "workflow", MAX_BULK_WORKFLOWS, items, invalid, check_workflow_submission
        )
        v.raise_if_any()
        subs = [s for s in items if s is not None]
        unique: dict[str, tuple[WorkflowSubmission, Any]] = {}
        for sub, parts in zip(subs, checked, strict=True):
            unique.setdefault(sub.request_id, (sub, parts))

        limited = [
            (f"items[{i}].steps[{k}].job", spec)
            for i, parts in enumerate(checked)
            for k, spec in enumerate(parts[0])
            if spec.rate_limits
        ]

        async def op(session: AsyncSession, tx: Tx) -> dict[str, ItemResult[Workflow]]:
            if limited:  # a rate limit named must exist, as for SubmitWorkflow
                await flow.check_known(session, tenant, limited)
            found = await store.get_submissions(session, tenant, list(unique))
            out: dict[str, ItemResult[Workflow]] = {}
            fresh: list[tuple[WorkflowSubmission, Any]] = []
            for request_id, (sub, parts) in unique.items():
                row = found.get(request_id)
                if row is None:
                    fresh.append((sub, parts))
                elif row["kind"] != "workflow" or row["request_hash"] != sub.request_hash:
                    out[request_id] = ItemResult(None, error=_conflict(row, request_id))
                else:
                    workflow = await store.get_workflow(session, str(row["entity_id"]))
                    assert workflow is not None
                    out[request_id] = ItemResult(workflow, deduplicated=True)
            if fresh:
                await self._admit(session, tenant, sum(len(sub.steps) for sub, _ in fresh))
            for sub, (specs, gates, deps) in fresh:
                workflow, jobs, context = self._new_workflow(
                    tenant, sub, specs, gates, deps, caller
                )
                out[sub.request_id] = ItemResult(
                    await self._write_workflow(
                        session,
                        tx,
                        workflow,
                        jobs,
                        context=context,
                        outputs=sub.outputs,
                        request_hash=sub.request_hash,
                        annotations=[s.item for s in sub.annotations],
                        caller=caller,
                    )
                )
            return out

        by_id: dict[str, ItemResult[Workflow]] = await self._write_submission(op)
        results: list[ItemResult[Workflow]] = []
        answered: set[str] = set()
        for sub in subs:
            result = by_id[sub.request_id]
            if sub.request_id in answered and result.run is not None:
                result = replace(result, deduplicated=True)
            answered.add(sub.request_id)
            results.append(result)
        created = sum(1 for r in by_id.values() if r.run is not None and not r.deduplicated)
        if created:
            log.info("workflows submitted", extra={"tenant": tenant, "workflows": created})
        return results

    def _new_workflow(
        self,
        tenant: str,
        sub: WorkflowSubmission,
        specs: list[JobSpec],
        gates: dict[int, ApprovalGate],
        deps: list[tuple[str, ...]],
        caller: Caller,
    ) -> tuple[Workflow, list[Job], JSON]:
        """A checked submission's new workflow, its steps' jobs and its
        request context, not stored yet."""
        now = now_us()
        workflow_id = new_id(WORKFLOW_PREFIX)
        context = complete_request_context(
            sub.request_context, sub.request_id, now, self._life.trace.redaction
        )
        jobs = [
            Job(
                id=new_id(JOB_PREFIX),
                tenant=tenant,
                request_id=sub.request_id,
                spec=spec,
                state=RunState.PENDING if step_deps else RunState.QUEUED,
                approval=gates.get(number - 1),
                created_us=now,
                updated_us=now,
                workflow_id=workflow_id,
                step_name=step.name,
                depends_on=step_deps,
                traceparent=sub.traceparent,
                submitted_by=caller.subject,
                for_each=step.for_each,
                step_number=number,
                total_steps=len(sub.steps),
                user_id=store.user_of(context),
            )
            for number, (step, spec, step_deps) in enumerate(
                zip(sub.steps, specs, deps, strict=True), start=1
            )
        ]
        # A gate that depends on nothing waits for people from the start.
        jobs = [
            replace(
                j,
                state=RunState.WAITING_FOR_HUMAN,
                started_us=now,
                gate_deadline_us=now + j.approval.timeout_ms * 1000 if j.approval.timeout_ms else 0,
            )
            if j.approval is not None and j.state == RunState.QUEUED
            else j
            for j in jobs
        ]
        gated = any(j.state == RunState.WAITING_FOR_HUMAN for j in jobs)
        idle = not any(j.state == RunState.QUEUED for j in jobs)
        workflow = Workflow(
            id=workflow_id,
            tenant=tenant,
            request_id=sub.request_id,
            name=sub.name,
            state=RunState.WAITING_FOR_HUMAN if gated and idle else RunState.QUEUED,
            priority=sub.priority,
            steps=tuple(WorkflowStep(j.step_name, j.id, j.state, j.depends_on, 0) for j in jobs),
            created_us=now,
            updated_us=now,
            labels=dict(sub.labels),
            submitted_by=caller.subject,
            deadline_us=now + sub.timeout_ms * 1000 if sub.timeout_ms else 0,
        )
        return workflow, jobs, context

    async def _write_workflow(
        self,
        session: AsyncSession,
        tx: Tx,
        workflow: Workflow,
        jobs: list[Job],
        *,
        context: JSON,
        outputs: Sequence[str],
        request_hash: str,
        annotations: Sequence[AnnotationInput],
        caller: Caller,
    ) -> Workflow:
        """Store a new workflow run (a submission's or a rerun's): its request
        id, its row, its steps (jobs, in declared order) and its annotations,
        in one transaction; the QUEUED steps are announced once it commits."""
        now = workflow.created_us
        await store.insert_submission(
            session,
            tenant=workflow.tenant,
            request_id=workflow.request_id,
            kind="workflow",
            entity_id=workflow.id,
            request_hash=request_hash,
            created_us=now,
        )
        await store.insert_workflow(session, workflow, context, outputs)
        # Steps read the request context from their workflow.
        await store.insert_jobs(
            session, [store.job_values(j, {}, step_index=i) for i, j in enumerate(jobs)]
        )
        await store.insert_annotations(
            session,
            [
                a
                for item in annotations
                for a in annotation_rules.build(
                    item,
                    recorded_by=caller.subject,
                    tenant=workflow.tenant,
                    run_id=workflow.id,
                    now_us=now,
                    redaction=self._life.trace.redaction,
                )
            ],
        )
        waiting = [j for j in jobs if j.state == RunState.WAITING_FOR_HUMAN]
        if waiting:
            await self._life.trace.record(
                session,
                tx,
                workflow.tenant,
                [self._life.gate_waiting_event(j, caller.subject) for j in waiting],
            )
        stored = await store.get_workflow(session, workflow.id)
        assert stored is not None
        self._changed(
            tx, [j for j in jobs if j.state in (RunState.QUEUED, RunState.WAITING_FOR_HUMAN)]
        )
        return stored

    # --- reruns -------------------------------------------------------------

    async def rerun_workflow(
        self, tenant: str | None, workflow_id: str, req: RerunRequest, caller: Caller
    ) -> tuple[Workflow, bool]:
        """A new run of an ended workflow (see domain.reruns) of `tenant`
        (None: any, an admin's), in the workflow's tenant: the run as stored,
        and whether an identical earlier rerun (same request_id and request,
        in that tenant) had created it. The parent does not change."""
        v = Violations()
        reruns.check(v, "workflow_id", workflow_id, req)
        v.raise_if_any()
        result: tuple[Workflow, bool] = await self._write_submission(
            lambda session, tx: self.rerun_workflow_in(
                session, tx, tenant, workflow_id, req, caller
            )
        )
        workflow, deduplicated = result
        if not deduplicated:
            log.info(
                "workflow rerun",
                extra={
                    "workflow_id": workflow.id,
                    "parent_run_id": workflow_id,
                    "tenant": workflow.tenant,
                },
            )
        return result

    async def rerun_workflow_in(
        self,
        session: AsyncSession,
        tx: Tx,
        tenant: str | None,
        workflow_id: str,
        req: RerunRequest,
        caller: Caller,
        *,
        only: frozenset[RunState] = frozenset(),
    ) -> tuple[Workflow, bool]:
        """Rerun a workflow inside a write (its checked inputs), as
        rerun_workflow: the idempotency and state checks under the
        workflow's lock. `only`: refuse unless the workflow is in one of
        these states too (a bulk rerun's filter, checked again)."""
        await store.lock_workflow(session, workflow_id)
        parent = await store.get_workflow_row(session, workflow_id, tenant)
        if parent is None:
            raise NotFound(
                f"workflow {workflow_id!r} not found",
                reason="WORKFLOW_NOT_FOUND",
                metadata={"workflow_id": workflow_id},
            )
        existing = await self._existing(
            session, parent.tenant, req.request_id, req.request_hash, "workflow"
        )
        if existing is not None:
            found = await store.get_workflow(session, existing)
            assert found is not None
            return found, True
        states.require_among(
            states.RunKind.WORKFLOW,
            workflow_id,
            RunState(parent.state),
            states.Action.RERUN,
            only,
        )
        # The declared steps, whole (a fan-out step's children are its result).
        old = [
            j
            for j in (await store.workflow_jobs(session, [workflow_id]))[workflow_id]
            if fan_out.parent_of(j.step_name) is None
        ]
        again = reruns.rerun_set(workflow_id, old, req)
        await self._admit(session, parent.tenant, len(again))
        now = now_us()
        new_id_ = new_id(WORKFLOW_PREFIX)
        context = codec.loads(parent.request_context) or {}
        jobs = [_rerun_step(j, new_id_, now, caller, again, req, context) for j in old]
        parent_run_id, root_run_id = reruns.lineage(workflow_id, parent.root_run_id)
        gated = any(j.state == RunState.WAITING_FOR_HUMAN for j in jobs)
        idle = not any(j.state == RunState.QUEUED for j in jobs)
        # The same whole-run timeout as the parent's, from the rerun's creation.
        timeout_us = parent.deadline_us - parent.created_us if parent.deadline_us else 0
        workflow = Workflow(
            id=new_id_,
            tenant=parent.tenant,
            request_id=req.request_id,
            name=parent.name,
            state=RunState.WAITING_FOR_HUMAN if gated and idle else RunState.QUEUED,
            deadline_us=now + timeout_us if timeout_us else 0,
            priority=parent.priority,
            steps=tuple(
                WorkflowStep(j.step_name, j.id, j.state, j.depends_on, 0, 0.0, "", j.reused_from)
                for j in jobs
            ),
            created_us=now,
            updated_us=now,
            labels=codec.loads(parent.labels),
            submitted_by=caller.subject,
            parent_run_id=parent_run_id,
            root_run_id=root_run_id,
            rerun_reason=req.reason,
        )
        stored = await self._write_workflow(
            session,
            tx,
            workflow,
            jobs,
            context=context,
            outputs=codec.loads(parent.output_steps),
            request_hash=req.request_hash,
            annotations=[reruns.trigger(workflow_id, req.reason, caller.subject)],
            caller=caller,
        )
        carried = [j.step_name for j in jobs if j.reused_from]
        await self._life.trace.record(
            session,
            tx,
            workflow.tenant,
            [
                reruns.created_event(
                    new_id_,
                    lifecycle.WORKFLOW_NODE,
                    workflow_id,
                    req,
                    carried,
                    [j.step_name for j in jobs if not j.reused_from],
                    now,
                    caller.subject,
                )
            ],
        )
        # A fan-out step whose dependencies were all carried over fans
        # out now: no step completion of this run will start it.
        done = {j.step_name for j in jobs if j.state == RunState.COMPLETED}
        for j in jobs:
            if j.state == RunState.PENDING and all(d in done for d in j.depends_on):
                started, _ = await self._life.start_fan_out(session, tx, j, now, caller.subject)
                self._changed(tx, started)
        if any(j.for_each is not None and j.state == RunState.PENDING for j in jobs):
            # Its children are work: a run created waiting for a gate is not.
            await self._life.workflow_waiting(session, new_id_, now)
            reread = await store.get_workflow(session, new_id_)
            assert reread is not None
            stored = reread
        return stored, False

    async def rerun_job(
        self, tenant: str | None, job_id: str, req: RerunRequest, caller: Caller
    ) -> tuple[Job, bool]:
        """A new run of an ended standalone job of `tenant` (None: any), in the
        job's tenant: the same spec and request context, a new job with fresh
        attempts; the job as stored, and whether an identical earlier rerun
        had created it."""
        v = Violations()
        reruns.check(v, "job_id", job_id, req)
        if req.from_steps or req.failed_only:
            v.add("from_steps", "a job has no steps: rerun it whole")
        v.raise_if_any()
        result: tuple[Job, bool] = await self._write_submission(
            lambda session, tx: self.rerun_job_in(session, tx, tenant, job_id, req, caller)
        )
        return result

    async def rerun_job_in(
        self,
        session: AsyncSession,
        tx: Tx,
        tenant: str | None,
        job_id: str,
        req: RerunRequest,
        caller: Caller,
        *,
        only: frozenset[RunState] = frozenset(),
    ) -> tuple[Job, bool]:
        """Rerun a standalone job inside a write (its checked inputs), as
        rerun_job: the idempotency and state checks under the job's lock.
        `only` as in rerun_workflow_in."""
        parent = await store.load_locked(session, job_id, tenant)
        if parent is None:
            raise NotFound(
                f"job {job_id!r} not found", reason="JOB_NOT_FOUND", metadata={"job_id": job_id}
            )
        home = parent.tenant
        existing = await self._existing(session, home, req.request_id, req.request_hash, "job")
        if existing is not None:
            found = await store.get_job(session, existing)
            assert found is not None
            return found, True
        if parent.workflow_id:
            step = Violations()
            step.add(
                "job_id",
                f"job {job_id!r} is step {parent.step_name!r} of workflow"
                f" {parent.workflow_id!r}: rerun the workflow (RerunWorkflow from_steps)",
            )
            step.raise_if_any()
        states.require_among(states.RunKind.JOB, job_id, parent.state, states.Action.RERUN, only)
        await self._admit(session, home, 1)
        now = now_us()
        parent_run_id, root_run_id = reruns.lineage(job_id, parent.root_run_id)
        job = Job(
            id=new_id(JOB_PREFIX),
            tenant=home,
            request_id=req.request_id,
            spec=parent.spec,
            state=RunState.QUEUED,
            created_us=now,
            updated_us=now,
            traceparent=req.traceparent or parent.traceparent,
            submitted_by=caller.subject,
            parent_run_id=parent_run_id,
            root_run_id=root_run_id,
        )
        context = codec.loads(parent.request_context or "{}") or {}
        stored = await store.insert_job_if_new(session, job, context, req.request_hash)
        if stored is None:  # a concurrent identical rerun won
            self._unadmit(home, 1)
            existing = await self._existing(session, home, req.request_id, req.request_hash, "job")
            assert existing is not None
            found = await store.get_job(session, existing)
            assert found is not None
            return found, True
        await store.insert_annotations(
            session,
            annotation_rules.build(
                reruns.trigger(job_id, req.reason, caller.subject),
                recorded_by=caller.subject,
                tenant=home,
                run_id=job.id,
                now_us=now,
                redaction=self._life.trace.redaction,
            ),
        )
        await self._life.trace.record(
            session,
            tx,
            home,
            [reruns.created_event(job.id, job.id, job_id, req, (), (), now, caller.subject)],
        )
        self._changed(tx, [stored])
        return stored, False

    async def _write_submission(self, op: Any) -> Any:
        """A concurrent submission of the same request id on another replica
        makes the insert conflict; the retry then finds it and deduplicates."""
        try:
            return await self._db.write(op)
        except IntegrityError:
            return await self._db.write(op)

    async def _deduplicated(
        self, session: AsyncSession, tenant: str, sub: JobSubmission
    ) -> tuple[Job, bool]:
        """The job an identical earlier submission created (ALREADY_EXISTS
        when the request id was used for a different request)."""
        existing = await self._existing(session, tenant, sub.request_id, sub.request_hash, "job")
        assert existing is not None  # submissions are never deleted
        job = await store.get_job(session, existing)
        assert job is not None
        return job, True

    def _unadmit(self, tenant: str, adding: int) -> None:
        """An admission that stored nothing (a retry) leaves the bound as it was."""
        count, at = self._waiting.get(tenant, (0, float("-inf")))
        self._waiting[tenant] = (max(0, count - adding), at)

    async def _admit(self, session: AsyncSession, tenant: str, adding: int) -> None:
        """Enforce the per-tenant quota of waiting jobs without counting the
        queue per submit. The count (a bounded scan, O(quota)) is taken at most
        once a second per tenant, and else only when the cached bound says this
        admission could exceed the quota; in between, admissions add to the
        bound (jobs that left the queue meanwhile still count: the bound only
        errs high, and a refusal is checked against a fresh count). So a deep
        queue costs no scan per submit. What other replicas admitted since the
        last count is not in the bound: with several replicas the quota may be
        overshot by about one second of their admissions."""
        limit = self.max_queued_per_tenant
        count, at = self._waiting.get(tenant, (0, float("-inf")))
        now = time.monotonic()
        if now - at > WAITING_RECOUNT_S or count + adding > limit:
            count = await store.count_waiting(session, tenant, limit + 1)
            at = now
        if count + adding > limit:
            self._waiting[tenant] = (count, at)
            raise ResourceExhausted(
                f"tenant {tenant!r} has {count} jobs waiting; the quota is {limit}",
                reason="QUEUED_JOB_QUOTA",
                metadata={"limit": str(limit)},
            )
        self._waiting[tenant] = (count + adding, at)

    async def _existing(
        self, session: AsyncSession, tenant: str, request_id: str, request_hash: str, kind: str
    ) -> str | None:
        """The id an identical earlier submission created; ALREADY_EXISTS when the
        request id was used for a different request."""
        found = await store.get_submission(session, tenant, request_id)
        if found is None:
            return None
        found_kind, entity_id = str(found["kind"]), str(found["entity_id"])
        if found_kind != kind or found["request_hash"] != request_hash:
            raise AlreadyExists(
                f"request_id {request_id!r} was already used for a different request "
                f"({found_kind} {entity_id})",
                reason="IDEMPOTENCY_CONFLICT",
                metadata={"existing_id": entity_id, "existing_kind": found_kind},
            )
        return entity_id

    # --- reads ------------------------------------------------------------

    async def get_job(self, tenant: str | None, job_id: str) -> Job:
        v = Violations()
        check_id(v, "job_id", job_id)
        v.raise_if_any()
        async with self._db.read() as session:
            job = await store.get_job(session, job_id, tenant)
        if job is None:
            raise NotFound(
                f"job {job_id!r} not found", reason="JOB_NOT_FOUND", metadata={"job_id": job_id}
            )
        return job

    async def summarize_failures(
        self, tenant: str | None, since_us: int | None, until_us: int | None, service: str
    ) -> list[FailureGroup]:
        """Failed attempts in a window by kind and service (see domain.failures)."""
        return await failures.summarize(self._db, tenant, since_us, until_us, service)

    async def get_workflow(self, tenant: str | None, workflow_id: str) -> Workflow:
        v = Violations()
        check_id(v, "workflow_id", workflow_id)
        v.raise_if_any()
        async with self._db.read() as session:
            workflow = await store.get_workflow(session, workflow_id, tenant)
        if workflow is None:
            raise NotFound(
                f"workflow {workflow_id!r} not found",
                reason="WORKFLOW_NOT_FOUND",
                metadata={"workflow_id": workflow_id},
            )
        return workflow

    async def list_jobs(
        self,
        tenant: str | None,
        *,
        state: int,
        service: str,
        workflow_id: str,
        page_size: int,
        page_token: str,
        view: int,
        out: Encoder[Job, Any],
        more: RunFilter = NO_RUN_FILTER,
    ) -> Page:
        v = Violations()
        limit = check_page_size(v, "page_size", page_size)
        run_state = _state_filter(v, state)
        full = check_view(v, "view", view)
        checked = check_run_filter(v, more)
        # The filters of earlier releases under their names, the others when set.
        filters = {
            "state": int(state),
            "service": service,
            "workflow_id": workflow_id,
            "tenant": tenant,
            **checked.token_filters(),
        }
        query = store.RunQuery(
            state=run_state,
            service=service,
            workflow_id=workflow_id,
            labels=checked.labels,
            user_id=checked.user_id,
            worker_id=checked.worker_id,
            created_after_us=checked.after_us,
            created_before_us=checked.before_us,
            parent_run_id=checked.parent_run_id,
            root_run_id=checked.root_run_id,
        )
        return await self._list(
            v,
            "jobs",
            filters,
            page_token,
            limit,
            out,
            lambda session, after, n, max_bytes: store.read_jobs(
                session,
                tenant=tenant,
                query=query,
                after=after,
                limit=n,
                max_bytes=max_bytes,
                full=full,
            ),
            kind="job",
            count=(
                (lambda session: store.count_jobs(session, tenant, query))
                if more.include_total
                else None
            ),
        )

    async def list_workflows(
        self,
        tenant: str | None,
        *,
        state: int,
        name: str,
        page_size: int,
        page_token: str,
        view: int,
        out: Encoder[Workflow, Any],
        more: RunFilter = NO_RUN_FILTER,
    ) -> Page:
        v = Violations()
        limit = check_page_size(v, "page_size", page_size)
        run_state = _state_filter(v, state)
        full = check_view(v, "view", view)
        checked = check_run_filter(v, more)
        filters = {"state": int(state), "name": name, "tenant": tenant, **checked.token_filters()}
        query = store.RunQuery(
            state=run_state,
            name=name,
            labels=checked.labels,
            user_id=checked.user_id,
            created_after_us=checked.after_us,
            created_before_us=checked.before_us,
            parent_run_id=checked.parent_run_id,
            root_run_id=checked.root_run_id,
        )
        return await self._list(
            v,
            "workflows",
            filters,
            page_token,
            limit,
            out,
            lambda session, after, n, max_bytes: store.read_workflows(
                session,
                tenant=tenant,
                query=query,
                after=after,
                limit=n,
                max_bytes=max_bytes,
                full=full,
            ),
            kind="workflow",
            count=(
                (lambda session: store.count_workflows(session, tenant, query))
                if more.include_total
                else None
            ),
        )

    async def _list(
        self,
        v: Violations,
        query: str,
        filters: dict[str, Any],
        page_token: str,
        limit: int,
        out: Encoder[_Run, Any],
        read: Callable[[AsyncSession, int | None, int, int], Awaitable[Chunk[_Run]]],
        *,
        kind: str,
        count: Callable[[AsyncSession], Awaitable[int]] | None = None,
    ) -> Page:
        """One page of jobs or workflows, newest first, once the request's other
        fields are checked (a bad page token is reported beside them); with
        `count`, the number of every matching run, read in the same snapshot
        where the database gives one (PostgreSQL's read transaction)."""
        # Newest first: no token starts from the top (None), not after position 0.
        before = position(self._tokens, v, "page_token", page_token, query, filters) or None
        v.raise_if_any()
        async with self._db.read() as session:
            filled = await fill(
                lambda after, n, max_bytes: read(session, after, n, max_bytes),
                start=before,
                count=limit,
                out=out,
                position=lambda run: run.seq,
                name=lambda run: f"{kind} {run.id}",
            )
            total = await count(session) if count is not None else None
        return Page(filled.items, self._tokens.next_token(query, filters, filled), total)

    # --- cancellation -----------------------------------------------------

    async def cancel_job(self, tenant: str | None, job_id: str, reason: str, by: str) -> Job:
        """Cancel a job; `by` is the canceller's authenticated subject."""
        v = Violations()
        check_id(v, "job_id", job_id)
        check_text(v, "reason", reason, MAX_REASON)
        v.raise_if_any()
        return await self._db.write(
            lambda session, tx: self.cancel_job_in(session, tx, tenant, job_id, reason, by)
        )

    async def cancel_job_in(
        self,
        session: AsyncSession,
        tx: Tx,
        tenant: str | None,
        job_id: str,
        reason: str,
        by: str,
        *,
        only: frozenset[RunState] = frozenset(),
    ) -> Job:
        """Cancel a job inside a write (its checked inputs): the state check
        under the job's lock. `only`: refuse unless the job is in one of
        these states too (a bulk cancel's filter, checked again)."""
        job = await store.load_locked(session, job_id, tenant)
        if job is None:
            raise NotFound(
                f"job {job_id!r} not found", reason="JOB_NOT_FOUND", metadata={"job_id": job_id}
            )
        states.require_among(states.RunKind.JOB, job_id, job.state, states.Action.CANCEL, only)
        failure = Failure(reason=reason or CANCELLED_BY_USER, code="CANCELLED", attempt=job.attempt)
        changed = await self._life.end_job(
            session, tx, job, RunState.CANCELLED, failure, now_us(), by=by
        )
        self._changed(tx, changed)
        return changed[0]

    async def cancel_workflow(
        self, tenant: str | None, workflow_id: str, reason: str, by: str
    ) -> Workflow:
        """Cancel a workflow; `by` is the canceller's authenticated subject."""
        v = Violations()
        check_id(v, "workflow_id", workflow_id)
        check_text(v, "reason", reason, MAX_REASON)
        v.raise_if_any()
        return await self._db.write(
            lambda session, tx: self.cancel_workflow_in(
                session, tx, tenant, workflow_id, reason, by
            )
        )

    async def cancel_workflow_in(
        self,
        session: AsyncSession,
        tx: Tx,
        tenant: str | None,
        workflow_id: str,
        reason: str,
        by: str,
        *,
        only: frozenset[RunState] = frozenset(),
    ) -> Workflow:
        """Cancel a workflow and its unfinished steps inside a write, as
        cancel_job_in: the state check under the workflow's lock."""
        await store.lock_workflow(session, workflow_id)
        workflow = await store.get_workflow(session, workflow_id, tenant)
        if workflow is None:
            raise NotFound(
                f"workflow {workflow_id!r} not found",
                reason="WORKFLOW_NOT_FOUND",
                metadata={"workflow_id": workflow_id},
            )
        states.require_among(
            states.RunKind.WORKFLOW, workflow_id, workflow.state, states.Action.CANCEL, only
        )
        now = now_us()
        why = reason or CANCELLED_BY_USER
        # Only the steps a cancel changes are read whole (not every result).
        steps = (await store.workflow_jobs(session, [workflow_id], unfinished=True))[workflow_id]
        changed = await self._life.cancel_steps(session, tx, steps, why, "CANCELLED", now, by=by)
        await self._life.end_workflow(
            session,
            tx,
            workflow_id,
            workflow.tenant,
            RunState.CANCELLED,
            Failure(reason=why, code="CANCELLED"),
            now,
            by=by,
            traceparent=await store.workflow_traceparent(session, workflow_id),
        )
        self._changed(tx, changed)
        stored = await store.get_workflow(session, workflow_id)
        assert stored is not None
        return stored

    # --- in bulk ----------------------------------------------------------

    def cancel_step(self) -> BulkStep:
        """CancelRuns' action on one run: CancelJob's or CancelWorkflow's,
        inside the bulk operation's transaction for the run."""

        async def act(session: AsyncSession, tx: Tx, run: BulkRun, ctx: StepContext) -> None:
            if run.kind is states.RunKind.JOB:
                await self.cancel_job_in(
                    session, tx, ctx.scope, run.id, ctx.reason, ctx.by, only=ctx.only
                )
            else:
                await self.cancel_workflow_in(
                    session, tx, ctx.scope, run.id, ctx.reason, ctx.by, only=ctx.only
                )

        return BulkStep("cancel", states.Action.CANCEL, act)

    async def cancel_runs(
        self,
        scope: str | None,
        tenant: str,
        by: str,
        request: BulkRequest,
        time_left_s: float | None = None,
    ) -> BulkResult:
        """Cancel the runs a filter matches, in bulk (see domain.bulk): `scope`
        the tenant whose runs it may touch (None: every tenant's), `tenant`
        the one its request id belongs to, `by` the caller's subject."""
        return await self.bulk.run(
            self.cancel_step(),
            scope=scope,
            tenant=tenant,
            by=by,
            request=request,
            time_left_s=time_left_s,
        )

    def rerun_step(self, caller: Caller, failed_only: bool) -> BulkStep:
        """RerunRuns' action on one run: RerunJob's or RerunWorkflow's (whole,
        or failed_only), inside the bulk operation's transaction for the run,
        its request id the run's key in the operation. A rerun that exists
        under that key (this operation's, or a RerunJob / RerunWorkflow sent
        with it) is a skip (RERUN_EXISTS), never a second rerun."""

        async def act(session: AsyncSession, tx: Tx, run: BulkRun, ctx: StepContext) -> str:
            key = ctx.run_key(run)
            job = run.kind is states.RunKind.JOB
            req = RerunRequest(
                request_id=key,
                request_hash=reruns.bulk_request_hash(
                    run.kind.value, run.id, ctx.reason, failed_only and not job
                ),
                reason=ctx.reason,
                failed_only=failed_only and not job,
            )
            try:
                made: Job | Workflow
                if job:
                    made, existed = await self.rerun_job_in(
                        session, tx, ctx.scope, run.id, req, caller, only=ctx.only
                    )
                else:
                    made, existed = await self.rerun_workflow_in(
                        session, tx, ctx.scope, run.id, req, caller, only=ctx.only
                    )
            except AlreadyExists as error:  # the key names another request
                if error.reason != "IDEMPOTENCY_CONFLICT":
                    raise
                existing = error.metadata.get("existing_id", "")
                raise reruns.rerun_exists(run.id, key, existing) from error
            if existed:
                raise reruns.rerun_exists(run.id, key, made.id)
            return made.id

        return BulkStep(
            "rerun",
            states.Action.RERUN,
            act,
            skips=frozenset({reruns.RERUN_EXISTS, reruns.NOTHING_TO_RERUN}),
            options={"failed_only": True} if failed_only else {},
            takes_steps=False,
            max_request_id=reruns.MAX_BULK_REQUEST_ID,
        )

    async def rerun_runs(
        self,
        scope: str | None,
        tenant: str,
        caller: Caller,
        request: BulkRequest,
        *,
        failed_only: bool = False,
        time_left_s: float | None = None,
    ) -> BulkResult:
        """Rerun the ended runs a filter matches, in bulk (see domain.bulk),
        as cancel_runs; each new run is in its parent's tenant."""
        return await self.bulk.run(
            self.rerun_step(caller, failed_only),
            scope=scope,
            tenant=tenant,
            by=caller.subject,
            request=request,
            time_left_s=time_left_s,
        )

    # --- termination ------------------------------------------------------

    async def terminate_job(self, tenant: str | None, job_id: str, reason: str, by: str) -> Job:
        """End a job TERMINATED now, without waiting for its worker: the
        lease is revoked (the worker told once this commits) and its later
        reports for the attempt are refused (the job has ended). A step's
        workflow ends TERMINATED with it. `by` is the operator's subject."""
        v = Violations()
        check_id(v, "job_id", job_id)
        check_text(v, "reason", reason, MAX_REASON)
        v.raise_if_any()

        async def op(session: AsyncSession, tx: Tx) -> Job:
            job = await store.load_locked(session, job_id, tenant)
            if job is None:
                raise NotFound(
                    f"job {job_id!r} not found", reason="JOB_NOT_FOUND", metadata={"job_id": job_id}
                )
            states.require(states.RunKind.JOB, job_id, job.state, states.Action.TERMINATE)
            failure = Failure(
                reason=reason or lifecycle.TERMINATED_BY_OPERATOR,
                code="TERMINATED",
                attempt=job.attempt,
            )
            changed = await self._life.end_job(
                session, tx, job, RunState.TERMINATED, failure, now_us(), by=by
            )
            self._changed(tx, changed)
            return changed[0]

        return await self._db.write(op)

    async def terminate_workflow(
        self, tenant: str | None, workflow_id: str, reason: str, by: str
    ) -> Workflow:
        """End a workflow and every step not ended yet TERMINATED now, their
        workers told as in terminate_job."""
        v = Violations()
        check_id(v, "workflow_id", workflow_id)
        check_text(v, "reason", reason, MAX_REASON)
        v.raise_if_any()
        why = reason or lifecycle.TERMINATED_BY_OPERATOR

        async def op(session: AsyncSession, tx: Tx) -> Workflow:
            return await self._end_workflow(
                session,
                tx,
                tenant,
                workflow_id,
                states.Action.TERMINATE,
                Failure(reason=why, code="TERMINATED"),
                step_code="TERMINATED",
                by=by,
            )

        return await self._db.write(op)

    async def _end_workflow(
        self,
        session: AsyncSession,
        tx: Tx,
        tenant: str | None,
        workflow_id: str,
        action: states.Action,
        failure: Failure,
        *,
        step_code: str,
        by: str,
    ) -> Workflow:
        """Under the workflow's lock: check `action` against its state, end
        its unfinished steps (TERMINATED for a terminate, else CANCELLED) and
        it in the action's state, with `failure`."""
        await store.lock_workflow(session, workflow_id)
        workflow = await store.get_workflow(session, workflow_id, tenant)
        if workflow is None:
            raise NotFound(
                f"workflow {workflow_id!r} not found",
                reason="WORKFLOW_NOT_FOUND",
                metadata={"workflow_id": workflow_id},
            )
        states.require(states.RunKind.WORKFLOW, workflow_id, workflow.state, action)
        state = states.ACTION_TARGETS[action]
        now = now_us()
        steps = (await store.workflow_jobs(session, [workflow_id], unfinished=True))[workflow_id]
        changed = await self._life.cancel_steps(
            session,
            tx,
            steps,
            failure.reason,
            step_code,
            now,
            by=by,
            state=RunState.TERMINATED if state == RunState.TERMINATED else RunState.CANCELLED,
        )
        await self._life.end_workflow(
            session,
            tx,
            workflow_id,
            workflow.tenant,
            state,
            failure,
            now,
            by=by,
            traceparent=await store.workflow_traceparent(session, workflow_id),
        )
        self._changed(tx, changed)
        stored = await store.get_workflow(session, workflow_id)
        assert stored is not None
        return stored

    async def time_out_workflow(self, session: AsyncSession, tx: Tx, workflow_id: str) -> bool:
        """In the supervisor's transaction: end a workflow past its deadline
        TIMED_OUT, its unfinished steps cancelled. Under its lock, re-read:
        False when it ended already (another replica, or a step, came first)."""
        await store.lock_workflow(session, workflow_id)
        workflow = await store.get_workflow_row(session, workflow_id)
        if (
            workflow is None
            or not states.can(
                states.RunKind.WORKFLOW, RunState(workflow.state), states.Action.TIME_OUT
            )
            or not 0 < workflow.deadline_us < now_us()
        ):
            return False
        timeout_ms = (workflow.deadline_us - workflow.created_us) // 1000
        failure = Failure(
            reason=f"workflow timed out: its deadline {iso(workflow.deadline_us)}"
            f" ({timeout_ms} ms after submission) passed",
            code="TIMED_OUT",
        )
        await self._end_workflow(
            session,
            tx,
            None,
            workflow_id,
            states.Action.TIME_OUT,
            failure,
            step_code="TIMED_OUT",
            by=SYSTEM_SUBJECT,
        )
        return True

    # --- live feeds -------------------------------------------------------

    async def queue_depth(self) -> list[tuple[str, RunState, int]]:
        """(service, state, jobs) of every non-terminal state, across tenants."""
        async with self._db.read() as session:
            return await store.queue_depth(session)

    async def _next_changes(
        self, sub: Subscription, timeout: float | None = None
    ) -> tuple[list[Job], bool]:
        """Wait for changes (at most `timeout` seconds: then none). When the
        server stops, the watch ends UNAVAILABLE (not an empty OK, which would
        read as "no more changes"): watch again elsewhere."""
        if not sub.wakeup.is_set():
            stop = asyncio.ensure_future(self.stopping.wait())
            woken = asyncio.ensure_future(sub.wakeup.wait())
            try:
                await asyncio.wait(
                    {stop, woken}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                stop.cancel()
                woken.cancel()
        if self.stopping.is_set():
            raise Unavailable("server shutting down; watch again", reason="SHUTTING_DOWN")
        return sub.drain()

    async def watch_job(self, tenant: str | None, job_id: str) -> AsyncGenerator[Job, None]:
        """The job now, then each change, until a terminal state. Subscribes before
        reading the snapshot so nothing committed in between is missed."""
        with self.feed.subscribe(job_id) as sub:
            last = await self.get_job(tenant, job_id)
            yield last
            while not last.state.terminal:
                items, overflowed = await self._next_changes(sub)
                if overflowed:
                    items = [await self.get_job(tenant, job_id)]
                for job in items:
                    if job.updated_us >= last.updated_us and job != last:
                        last = job
                        yield job

    async def watch_workflow(
        self, tenant: str | None, workflow_id: str
    ) -> AsyncGenerator[tuple[Workflow, Job | None], None]:
        """The workflow now, then each change of it or of a step's state or
        progress, until a terminal state. Progress alone is throttled: at most
        one message per step per STEP_PROGRESS_INTERVAL_S, and the latest
        value is always sent (held back, then sent when its time comes)."""
        with self.feed.subscribe(workflow_id) as sub:
            last = await self.get_workflow(tenant, workflow_id)
            yield last, None
            sent_at: dict[str, float] = {}  # step name -> when its progress was last sent
            due: float | None = None  # when a held-back progress change is to be sent
            held_job: Job | None = None
            while not last.state.terminal:
                wait = None if due is None else max(0.0, due - time.monotonic())
                items, _ = await self._next_changes(sub, wait)
                held_job = items[-1] if items else held_job
                current = await self.get_workflow(tenant, workflow_id)
                if current == last:
                    due = None
                    continue
                now = time.monotonic()
                moved = _progress_only(last, current)
                if moved is not None:
                    next_due = min(sent_at.get(n, -1e9) + STEP_PROGRESS_INTERVAL_S for n in moved)
                    if next_due > now:
                        due = next_due
                        continue
                    for name in moved:
                        sent_at[name] = now
                last, due = current, None
                yield current, _as_of(held_job, current)
                held_job = None

    # --- waiting for the end --------------------------------------------------

    async def await_job(self, tenant: str | None, job_id: str, wait_s: float | None) -> Job:
        """The job once it has ended, followed on its change feed (no polling);
        DEADLINE_EXCEEDED (AWAIT_TIMEOUT) when `wait_s` seconds pass first. A
        job that has already ended is answered whatever the wait."""
        check_wait(wait_s)
        async with aclosing(self.watch_job(tenant, job_id)) as jobs:
            last = await anext(jobs)
            try:
                async with asyncio.timeout(wait_s):
                    async for job in jobs:
                        last = job
            except TimeoutError:
                raise _await_timeout("job", job_id, last.state) from None
        return last

    async def await_workflow(
        self, tenant: str | None, workflow_id: str, wait_s: float | None
    ) -> Workflow:
        """The workflow once it has ended (with its outputs when it completed),
        followed on its change feed; DEADLINE_EXCEEDED as await_job."""
        check_wait(wait_s)
        async with aclosing(self.watch_workflow(tenant, workflow_id)) as changes:
            last, _ = await anext(changes)
            try:
                async with asyncio.timeout(wait_s):
                    async for workflow, _ in changes:
                        last = workflow
            except TimeoutError:
                raise _await_timeout("workflow", workflow_id, last.state) from None
        return last


def _rerun_step(
    old: Job,
    workflow_id: str,
    now: int,
    caller: Caller,
    again: set[str],
    req: RerunRequest,
    context: JSON,
) -> Job:
    """A declared step of the parent run as a step of its rerun: run again
    (a new job, fresh attempts; QUEUED when every dependency is carried
    over, else PENDING) or carried over (COMPLETED, reused_from the old job,
    no result of its own: it is read through reused_from)."""
    step = Job(
        id=new_id(JOB_PREFIX),
        tenant=old.tenant,
        request_id=req.request_id,
        spec=old.spec,
        state=RunState.PENDING,
        created_us=now,
        updated_us=now,
        workflow_id=workflow_id,
        step_name=old.step_name,
        depends_on=old.depends_on,
        traceparent=req.traceparent or old.traceparent,
        submitted_by=caller.subject,
        for_each=old.for_each,
        step_number=old.step_number,
        total_steps=old.total_steps,
        user_id=store.user_of(context),
        approval=old.approval,
    )
    if old.step_name not in again:
        return replace(
            step,
            state=RunState.COMPLETED,
            completed_us=now,
            progress_percent=100.0,
            reused_from=old.reused_from or old.id,
        )
    ready = not any(d in again for d in old.depends_on)
    if ready and old.approval is not None:
        # An approval gate run again waits for people again, from now.
        timeout_us = old.approval.timeout_ms * 1000
        return replace(
            step,
            state=RunState.WAITING_FOR_HUMAN,
            started_us=now,
            gate_deadline_us=now + timeout_us if timeout_us else 0,
        )
    if ready and old.for_each is None:
        return replace(step, state=RunState.QUEUED)
    return step


def _as_of(job: Job | None, workflow: Workflow) -> Job | None:
    """The step job that caused a change, if the workflow as read agrees with
    it: a snapshot read after a later change (the step completed meanwhile)
    must not be paired with an older state of the step."""
    if job is None:
        return None
    for step in workflow.steps:
        if step.job_id == job.id:
            return job if (step.state, step.attempt) == (job.state, job.attempt) else None
    return None


def _progress_only(before: Workflow, after: Workflow) -> list[str] | None:
    """The steps whose progress changed, when nothing but step progress did
    (None otherwise)."""
    if len(before.steps) != len(after.steps):
        return None
    moved = []
    for b, a in zip(before.steps, after.steps, strict=True):
        if b == a:
            continue
        same_but_progress = replace(
            b, progress_percent=a.progress_percent, progress_message=a.progress_message
        )
        if same_but_progress != a:
            return None
        moved.append(a.name)
    if not moved or replace(before, steps=after.steps, updated_us=after.updated_us) != after:
        return None
    return moved


def check_wait(wait_s: float | None) -> None:
    v = Violations()
    if wait_s is not None and not 0 <= wait_s <= MAX_AWAIT_S:
        v.add("timeout", f"must be between 0 and {MAX_AWAIT_S:g} seconds")
    v.raise_if_any()


def _await_timeout(kind: str, run_id: str, state: RunState) -> DeadlineExceeded:
    return DeadlineExceeded(
        f"{kind} {run_id!r} has not ended yet (it is {state.name}); await it again",
        reason="AWAIT_TIMEOUT",
        metadata={f"{kind}_id": run_id, "state": state.name},
    )
