"""Bulk operations over runs (CancelRuns, RerunRuns): which runs a
filter matches, taking them in pages, and an operation's progress, so that
an interrupted call resumes where it stopped and no run is handled twice.

An operation is one action (a `BulkStep`) over the runs one filter matches,
named by its request id per tenant. Each call takes runs newest first (by
seq, which only grows: a run submitted after the operation started is never
taken), workflows before jobs, in pages read in their own read transaction.
Each run is then acted on in its own write transaction, the same one that
moves the operation's cursor past it and adds to its counts: a retried,
resumed or concurrent call with the same request id sees the cursor and
skips a run another call handled (the run's idempotency key is the
operation's request id and the run's place in its order). A run that ended,
or left the filter's states, before its turn is skipped, not failed: the
step's state check runs under the run's lock (states.require_among). A
step may name other refusals that mean "nothing to do for this run"
(BulkStep.skips): they are skips too, counted under their reason.

A step is an action on one run inside that transaction: `act(session, tx,
run, ctx)`, raising a domain error to refuse, and returning the id of the
run it made, if any (the call reports the first MAX_MADE_KEPT of them).
CancelRuns plugs in Jobs.cancel_job_in / cancel_workflow_in
(jobs.cancel_step). RerunRuns plugs in the same way (jobs.rerun_step): a
BulkStep named "rerun" with Action.RERUN (the state table gives the ended
states it may be taken from) whose act calls Jobs.rerun_job_in /
rerun_workflow_in, submitting the new run with ctx.run_key(run) (request id
+ run id) as its submission's request id, so that even a rerun whose
progress was lost is deduplicated by submissions (skipped, RERUN_EXISTS)."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from jobtrace.clock import now_us
from jobtrace.domain import states
from jobtrace.domain.errors import AlreadyExists, DomainError, FailedPrecondition, Violations
from jobtrace.domain.run_filters import (
    MAX_SERVICE,
    Instant,
    RunFilter,
    check_name,
    check_run_filter,
)
from jobtrace.domain.validation import check_text, printable
from jobtrace.ids import new_id
from jobtrace.model import RunState
from jobtrace.store import bulk as progress_store
from jobtrace.store import jobs as store
from jobtrace.store.bulk import BulkProgress
from jobtrace.store.db import Database, Tx
from jobtrace.store.listing import Chunk

RunKind = states.RunKind

# Runs one call handles at most, and by default.
MAX_LIMIT = 10_000
DEFAULT_LIMIT = 1_000
# Runs read per page, at most and by default.
MAX_PAGE_SIZE = 500
DEFAULT_PAGE_SIZE = 100
# Runs a dry run shows.
SAMPLE_SIZE = 20
# Failures an operation keeps (their count goes on).
MAX_FAILURES_KEPT = 100
# Runs a step made (a rerun's new runs) one call reports.
MAX_MADE_KEPT = 100
MAX_REQUEST_ID = 256
MAX_STATES = 10
MAX_WORKFLOW_NAME = 256
MAX_REASON = 1000
# Stored bytes of runs one page reads at most (BASIC view).
PAGE_READ_BYTES = 4 * 1024 * 1024
# A call stops taking runs this long before its deadline, to answer in time.
DEADLINE_MARGIN_S = 0.5

# Kinds as the filter names them (WatchRunsRequest.RunKind's numbers).
KIND_ANY, KIND_JOB, KIND_WORKFLOW = 0, 1, 2
# Phases of an operation, in order: the kind of run it is at.
PHASES = ("workflows", "jobs", "done")
_PHASE_KIND = {"workflows": RunKind.WORKFLOW, "jobs": RunKind.JOB}

# Why a run was skipped: it had ended, or moved to a state the filter does
# not take (both seen under the run's lock).
SKIP_ENDED = "ENDED"
SKIP_STATE = "STATE"


@dataclass(frozen=True, slots=True)
class BulkFilter:
    """Which runs: as ListJobs / ListWorkflows filter them (`kind`: 0 both,
    1 jobs, 2 workflows; `service` jobs only, `workflow_name` workflows
    only; `states`: RunState numbers)."""

    kind: int = KIND_ANY
    states: tuple[int, ...] = ()
    service: str = ""
    workflow_name: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    user_id: str = ""
    created_after: Instant | None = None
    created_before: Instant | None = None
    include_steps: bool = False


@dataclass(frozen=True, slots=True)
class BulkRequest:
    filter: BulkFilter
    dry_run: bool = False
    reason: str = ""
    request_id: str = ""
    limit: int = 0
    page_size: int = 0


@dataclass(frozen=True, slots=True)
class BulkRun:
    """A run an operation takes, as it was read for its page."""

    kind: RunKind
    id: str
    seq: int
    state: RunState


@dataclass(frozen=True, slots=True)
class StepContext:
    """What a step knows besides its run: whose runs it may touch (None: an
    admin's, every tenant), who acts, why, the states the filter takes (to
    check again under the run's lock), and the operation's request id."""

    scope: str | None
    by: str
    reason: str
    only: frozenset[RunState]
    request_id: str

    def run_key(self, run: BulkRun) -> str:
        """The idempotency key of this operation's action on one run."""
        return f"{self.request_id}/{run.id}"


@dataclass(frozen=True, slots=True)
class BulkStep:
    """One action on one run, inside the write transaction that records it
    (see the module docstring). `name` names the operation in messages and
    records ("cancel"); `action` is the state machine's: the states a run
    is matched in come from its table."""

    name: str
    action: states.Action
    act: Callable[[AsyncSession, Tx, BulkRun, StepContext], Awaitable[str | None]]
    # FAILED_PRECONDITION reasons that mean nothing is to be done for the
    # run: skipped under that reason, not failed.
    skips: frozenset[str] = frozenset()
    # What else the operation's request id is bound to (the step's options).
    options: Mapping[str, Any] = field(default_factory=dict)
    # Whether workflow steps may be taken as jobs (filter.include_steps).
    takes_steps: bool = True
    # Room the operation's request id leaves for the runs' keys.
    max_request_id: int = MAX_REQUEST_ID


@dataclass(frozen=True, slots=True)
class BulkFailure:
    run_id: str
    kind: RunKind
    code: str
    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class BulkResult:
    """An answer: a dry run's count and sample, or an operation's totals."""

    request_id: str
    matched: int
    sample: tuple[BulkRun, ...] = ()
    touched: int = 0
    skipped: int = 0
    skipped_reasons: Mapping[str, int] = field(default_factory=dict)
    failed: int = 0
    failures: tuple[BulkFailure, ...] = ()
    done: bool = False
    handled: int = 0
    # (run, the run the step made of it) for this call, first MAX_MADE_KEPT.
    made: tuple[tuple[BulkRun, str], ...] = ()


@dataclass(frozen=True, slots=True)
class _Phase:
    name: str
    kind: RunKind
    query: store.RunQuery
    # The states the filter takes for this kind (checked again under lock).
    only: frozenset[RunState]


@dataclass(frozen=True, slots=True)
class _Plan:
    phases: tuple[_Phase, ...]
    digest: str
    limit: int
    page_size: int

    def phase(self, name: str) -> _Phase | None:
        return next((p for p in self.phases if p.name == name), None)

    def after(self, name: str) -> str:
        """The phase that follows `name` ("done" after the last)."""
        names = [p.name for p in self.phases]
        i = names.index(name) if name in names else len(names) - 1
        return names[i + 1] if i + 1 < len(names) else "done"


def _state_names(states_: frozenset[RunState]) -> str:
    return ", ".join(s.name for s in sorted(states_))


def plan(v: Violations, step: BulkStep, scope: str | None, req: BulkRequest) -> _Plan:
    """Check a request (every violation at once) and work out its phases."""
    f = req.filter
    if f.kind not in (KIND_ANY, KIND_JOB, KIND_WORKFLOW):
        v.add("filter.kind", f"unknown RunKind value {f.kind}")
    if len(f.states) > MAX_STATES:
        v.add("filter.states", f"at most {MAX_STATES} entries (got {len(f.states)})")
    check_name(v, "filter.service", f.service, MAX_SERVICE)
    check_name(v, "filter.workflow_name", f.workflow_name, MAX_WORKFLOW_NAME)
    inner = Violations()
    checked = check_run_filter(
        inner,
        RunFilter(
            labels=f.labels,
            user_id=f.user_id,
            created_after=f.created_after,
            created_before=f.created_before,
        ),
    )
    for item in inner.items:  # named as fields of the request's filter
        v.add(f"filter.{item.field}", item.description)
    if f.service and f.kind == KIND_WORKFLOW:
        v.add("filter.service", "filters jobs, and kind asks for workflows only")
    if f.workflow_name and f.kind == KIND_JOB:
        v.add("filter.workflow_name", "filters workflows, and kind asks for jobs only")
    if f.service and f.workflow_name:
        v.add("filter.workflow_name", "filters workflows and service filters jobs: give one")
    if not (
        f.states
        or f.service
        or f.workflow_name
        or f.labels
        or f.user_id
        or f.created_after is not None
        or f.created_before is not None
    ):
        v.add(
            "filter",
            f"a bulk {step.name} needs at least one filter (states, service, workflow_name,"
            " labels, user_id, created_after, created_before); to mean every run, give"
            " created_before",
        )
    kinds: list[RunKind] = []
    if f.kind in (KIND_ANY, KIND_WORKFLOW) and not f.service:
        kinds.append(RunKind.WORKFLOW)
    if f.kind in (KIND_ANY, KIND_JOB) and not f.workflow_name:
        kinds.append(RunKind.JOB)
    eligible = frozenset().union(*(states.allowed_from(k, step.action) for k in kinds))
    wanted: set[RunState] = set()
    for i, number in enumerate(f.states):
        try:
            state = RunState(number)
        except ValueError:
            v.add(f"filter.states[{i}]", f"unknown RunState value {number}")
            continue
        if state not in eligible:
            v.add(
                f"filter.states[{i}]",
                f"a {step.name} is never taken from {state.name}"
                f" (it is from {_state_names(eligible) or 'no state'})",
            )
        wanted.add(state)
    limit = req.limit or DEFAULT_LIMIT
    if not 1 <= limit <= MAX_LIMIT:
        v.add("limit", f"must be between 1 and {MAX_LIMIT} (0 means {DEFAULT_LIMIT})")
    page_size = req.page_size or DEFAULT_PAGE_SIZE
    if not 1 <= page_size <= MAX_PAGE_SIZE:
        v.add("page_size", f"must be between 1 and {MAX_PAGE_SIZE} (0 means {DEFAULT_PAGE_SIZE})")
    check_text(v, "reason", req.reason, MAX_REASON)
    if req.request_id and (
        len(req.request_id) > step.max_request_id or not printable(req.request_id)
    ):
        v.add("request_id", f"must be 1-{step.max_request_id} printable characters")
    if f.include_steps and not step.takes_steps:
        v.add(
            "filter.include_steps",
            f"a bulk {step.name} takes workflows whole, not their steps: leave it false",
        )
    v.raise_if_any()
    phases = []
    for kind in kinds:
        only = states.allowed_from(kind, step.action)
        if wanted:
            only &= frozenset(wanted)
        if not only:
            continue
        query = store.RunQuery(
            service=f.service if kind is RunKind.JOB else "",
            name=f.workflow_name if kind is RunKind.WORKFLOW else "",
            labels=checked.labels,
            user_id=checked.user_id,
            created_after_us=checked.after_us,
            created_before_us=checked.before_us,
            states=tuple(sorted(only)),
            standalone=kind is RunKind.JOB and not f.include_steps,
        )
        name = "workflows" if kind is RunKind.WORKFLOW else "jobs"
        phases.append(_Phase(name, kind, query, only))
    digest = _digest(step, scope, f, checked.labels, checked.after_us, checked.before_us, req)
    return _Plan(tuple(phases), digest, limit, page_size)


def _digest(
    step: BulkStep,
    scope: str | None,
    f: BulkFilter,
    labels: tuple[tuple[str, str], ...],
    after_us: int | None,
    before_us: int | None,
    req: BulkRequest,
) -> str:
    """What an operation's request id is bound to: its action, scope, filter
    and reason (not limit or page size, which may change between calls)."""
    bound: dict[str, Any] = {
        "action": step.name,
        "scope": scope,
        "kind": f.kind,
        "states": sorted(set(f.states)),
        "service": f.service,
        "workflow_name": f.workflow_name,
        "labels": [list(p) for p in labels],
        "user_id": f.user_id,
        "after_us": after_us,
        "before_us": before_us,
        "include_steps": f.include_steps,
        "reason": req.reason,
    }
    if step.options:  # (absent otherwise: earlier operations' digests hold)
        bound["options"] = dict(step.options)
    text = json.dumps(bound, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _index(phase: str) -> int:
    return PHASES.index(phase) if phase in PHASES else len(PHASES)


def _ahead(op: BulkProgress, phase: str, seq: int) -> bool:
    """Whether the operation has not yet handled the run at (phase, seq):
    runs are taken in phase order, newest (highest seq) first."""
    if _index(op.phase) != _index(phase):
        return _index(op.phase) < _index(phase)
    return op.cursor is None or op.cursor > seq


def _skip_reason(step: BulkStep, error: DomainError) -> str | None:
    """A refusal of the state check: the run ended, or is in a state the
    filter does not take; or one the step names as nothing to do. Anything
    else is a failure."""
    if isinstance(error, FailedPrecondition):
        if error.reason in step.skips:
            return error.reason
        if error.reason.endswith("_TERMINAL"):
            return SKIP_ENDED
        if error.reason.endswith("_STATE"):
            return SKIP_STATE
    return None


def _code(error: DomainError) -> str:
    """The name of the gRPC status code a domain error maps to: the class-level
    reason of its kind (the direct subclass of DomainError it descends from)."""
    for cls in type(error).__mro__:
        if DomainError in cls.__bases__:
            return str(getattr(cls, "reason", "UNKNOWN"))
    return "UNKNOWN"


class BulkOperations:
    """Runs bulk operations over one database."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def run(
        self,
        step: BulkStep,
        *,
        scope: str | None,
        tenant: str,
        by: str,
        request: BulkRequest,
        time_left_s: float | None = None,
    ) -> BulkResult:
        """A dry run, or one call of the operation `request.request_id` (a
        new one when empty): take runs until none is left, `limit` are
        handled or the deadline nears."""
        checked = plan(Violations(), step, scope, request)
        if request.dry_run:
            return await self._dry_run(scope, checked)
        # Stop in time to answer: DEADLINE_MARGIN_S before the deadline, or a
        # fifth of a shorter call's time.
        stop_at = None
        if time_left_s is not None:
            margin = min(DEADLINE_MARGIN_S, time_left_s / 5)
            stop_at = time.monotonic() + time_left_s - margin
        request_id = request.request_id or new_id("bulk")
        op = await self._open(step, tenant, request_id, checked, by)
        handled = 0
        made: list[tuple[BulkRun, str]] = []
        while op.state != "done" and handled < checked.limit and not _late(stop_at):
            phase = checked.phase(op.phase)
            if phase is None:  # stored by a release with other phases: go on
                op = await self._advance(tenant, request_id, op.phase, checked.after(op.phase))
                continue
            chunk = await self._page(scope, phase, op.cursor, checked.page_size, handled, checked)
            ctx = StepContext(scope, by, request.reason, phase.only, request_id)
            for run in chunk.items:
                if handled >= checked.limit or _late(stop_at):
                    break
                op, ours, new = await self._take(step, tenant, request_id, phase.name, run, ctx)
                handled += ours
                if new is not None and len(made) < MAX_MADE_KEPT:
                    made.append((run, new))
            else:
                if chunk.exhausted:
                    op = await self._advance(
                        tenant, request_id, phase.name, checked.after(phase.name)
                    )
                elif chunk.after is not None and _ahead(op, phase.name, chunk.after):
                    # Rows of the page that no longer matched when read.
                    op = await self._move(tenant, request_id, phase.name, chunk.after)
        return BulkResult(
            request_id=request_id,
            matched=op.touched + op.skipped + op.failed,
            touched=op.touched,
            skipped=op.skipped,
            skipped_reasons=dict(op.skipped_reasons),
            failed=op.failed,
            failures=tuple(
                BulkFailure(
                    run_id=f["run_id"],
                    kind=RunKind(f["kind"]),
                    code=f["code"],
                    reason=f["reason"],
                    message=f["message"],
                )
                for f in op.failures
            ),
            done=op.state == "done",
            handled=handled,
            made=tuple(made),
        )

    async def _page(
        self,
        scope: str | None,
        phase: _Phase,
        cursor: int | None,
        page_size: int,
        handled: int,
        checked: _Plan,
    ) -> Chunk[BulkRun]:
        """The next runs of a phase after `cursor`, at most a page (and no
        more than the call may still handle), in their own read."""
        count = min(page_size, checked.limit - handled)
        async with self._db.read() as session:
            return await _read(session, scope, phase, cursor, count)

    async def _dry_run(self, scope: str | None, checked: _Plan) -> BulkResult:
        matched = 0
        sample: list[BulkRun] = []
        async with self._db.read() as session:
            for phase in checked.phases:
                if phase.kind is RunKind.JOB:
                    matched += await store.count_jobs(session, scope, phase.query)
                else:
                    matched += await store.count_workflows(session, scope, phase.query)
                cursor: int | None = None
                while len(sample) < SAMPLE_SIZE:
                    chunk = await _read(session, scope, phase, cursor, SAMPLE_SIZE - len(sample))
                    sample.extend(chunk.items)
                    if chunk.exhausted:
                        break
                    cursor = chunk.after
        return BulkResult(request_id="", matched=matched, sample=tuple(sample), done=True)

    async def _open(
        self, step: BulkStep, tenant: str, request_id: str, checked: _Plan, by: str
    ) -> BulkProgress:
        """The operation of this request id: new, or as an earlier call left
        it (ALREADY_EXISTS when that one had another filter or action)."""

        async def op(session: AsyncSession, tx: Tx) -> BulkProgress:
            found = await progress_store.get(session, tenant, request_id, for_update=True)
            if found is None:
                now = now_us()
                first = checked.phases[0].name if checked.phases else "done"
                new = BulkProgress(
                    tenant=tenant,
                    request_id=request_id,
                    action=step.name,
                    filter_digest=checked.digest,
                    phase=first,
                    state="done" if first == "done" else "running",
                    created_by=by,
                    created_us=now,
                    updated_us=now,
                )
                if await progress_store.insert_if_new(session, new):
                    return new
                found = await progress_store.get(session, tenant, request_id, for_update=True)
                assert found is not None
            if found.action != step.name or found.filter_digest != checked.digest:
                raise AlreadyExists(
                    f"request_id {request_id!r} was already used for another bulk operation"
                    f" (a {found.action} with another filter or reason)",
                    reason="IDEMPOTENCY_CONFLICT",
                    metadata={"request_id": request_id, "existing_action": found.action},
                )
            return found

        return await self._db.write(op)

    async def _take(
        self,
        step: BulkStep,
        tenant: str,
        request_id: str,
        phase: str,
        run: BulkRun,
        ctx: StepContext,
    ) -> tuple[BulkProgress, bool, str | None]:
        """Act on one run and record it, in one transaction; a refusal is
        recorded (skipped or failed) in a second one. Either way only while
        the operation has not passed the run (another call may have: then
        False, nothing done). Also the id of the run the step made, if any."""

        async def act(session: AsyncSession, tx: Tx) -> tuple[BulkProgress, bool, str | None]:
            op = await _locked(session, tenant, request_id)
            if not _ahead(op, phase, run.seq):
                return op, False, None
            new = await step.act(session, tx, run, ctx)
            op.touched += 1
            return await _moved(session, op, phase, run.seq), True, new

        try:
            return await self._db.write(act)
        except DomainError as error:
            refusal = error

        async def record(session: AsyncSession, tx: Tx) -> tuple[BulkProgress, bool, None]:
            op = await _locked(session, tenant, request_id)
            if not _ahead(op, phase, run.seq):
                return op, False, None
            why = _skip_reason(step, refusal)
            if why is not None:
                op.skipped += 1
                op.skipped_reasons[why] = op.skipped_reasons.get(why, 0) + 1
            else:
                op.failed += 1
                if len(op.failures) < MAX_FAILURES_KEPT:
                    op.failures.append(
                        {
                            "run_id": run.id,
                            "kind": run.kind.value,
                            "code": _code(refusal),
                            "reason": refusal.reason,
                            "message": refusal.message[:1000],
                        }
                    )
            return await _moved(session, op, phase, run.seq), True, None

        return await self._db.write(record)

    async def _advance(self, tenant: str, request_id: str, phase: str, to: str) -> BulkProgress:
        """Go on to the next phase (or end) once `phase` has no run left."""

        async def op(session: AsyncSession, tx: Tx) -> BulkProgress:
            found = await _locked(session, tenant, request_id)
            if found.phase != phase:  # another call went on already
                return found
            found.phase, found.cursor = to, None
            if to == "done":
                found.state = "done"
            found.updated_us = now_us()
            await progress_store.save(session, found)
            return found

        return await self._db.write(op)

    async def _move(self, tenant: str, request_id: str, phase: str, seq: int) -> BulkProgress:
        async def op(session: AsyncSession, tx: Tx) -> BulkProgress:
            found = await _locked(session, tenant, request_id)
            if not _ahead(found, phase, seq):
                return found
            return await _moved(session, found, phase, seq)

        return await self._db.write(op)


def _late(stop_at: float | None) -> bool:
    return stop_at is not None and time.monotonic() >= stop_at


async def _locked(session: AsyncSession, tenant: str, request_id: str) -> BulkProgress:
    op = await progress_store.get(session, tenant, request_id, for_update=True)
    assert op is not None  # operations are never deleted
    return op


async def _moved(session: AsyncSession, op: BulkProgress, phase: str, seq: int) -> BulkProgress:
    op.phase, op.cursor, op.updated_us = phase, seq, now_us()
    await progress_store.save(session, op)
    return op


async def _read(
    session: AsyncSession, scope: str | None, phase: _Phase, cursor: int | None, count: int
) -> Chunk[BulkRun]:
    """Up to `count` runs of a phase after `cursor`, newest first."""
    chunk: Chunk[Any]
    if phase.kind is RunKind.JOB:
        chunk = await store.read_jobs(
            session,
            tenant=scope,
            query=phase.query,
            after=cursor,
            limit=count,
            max_bytes=PAGE_READ_BYTES,
            full=False,
        )
    else:
        chunk = await store.read_workflows(
            session,
            tenant=scope,
            query=phase.query,
            after=cursor,
            limit=count,
            max_bytes=PAGE_READ_BYTES,
            full=False,
        )
    runs = [BulkRun(phase.kind, r.id, r.seq, r.state) for r in chunk.items]
    return Chunk(runs, chunk.after, chunk.exhausted)
