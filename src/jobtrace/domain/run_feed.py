"""The live feed of a tenant's runs (WatchRuns): its filter, its initial
snapshot of the active runs, and the changes that follow, in order per run."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass

from jobtrace.clock import now_us
from jobtrace.domain.errors import ResourceExhausted, Unavailable, Violations
from jobtrace.domain.validation import SERVICE_RE, check_labels
from jobtrace.events.feed import RUNS_BUFFER, JobFeed
from jobtrace.model import Job, RunState, Workflow
from jobtrace.store import run_feed as store
from jobtrace.store.db import Database

# Mirrors WatchRunsRequest.RunKind by number.
KIND_ANY, KIND_JOB, KIND_WORKFLOW = 0, 1, 2
MAX_FILTER_VALUES = 32
MAX_WORKFLOW_NAME = 256
# The active runs sent first (include_active), the rows read for them at most
# (labels are matched as rows are read), and the rows read per query.
MAX_SNAPSHOT_RUNS = 10_000
MAX_SNAPSHOT_ROWS = 50_000
SNAPSHOT_PAGE = 500
ACTIVE_STATES = (
    RunState.QUEUED,
    RunState.PENDING,
    RunState.RUNNING,
    RunState.WAITING_FOR_HUMAN,
    RunState.PAUSED,
)
# Runs whose last sent version a feed remembers (to never send one backwards);
# the oldest is forgotten first.
MAX_TRACKED_RUNS = 10_000


@dataclass(frozen=True, slots=True)
class RunFilter:
    services: frozenset[str] = frozenset()
    workflow_names: frozenset[str] = frozenset()
    states: frozenset[RunState] = frozenset()
    labels: tuple[tuple[str, str], ...] = ()
    jobs: bool = True
    workflows: bool = True
    include_steps: bool = False
    include_active: bool = False

    def wants_job(self, job: Job) -> bool:
        return (
            self.jobs
            and (self.include_steps or not job.workflow_id)
            and (not self.services or job.spec.service in self.services)
            and (not self.states or job.state in self.states)
            and all(job.spec.labels.get(k) == v for k, v in self.labels)
        )

    def wants_workflow(self, workflow: Workflow) -> bool:
        return (
            self.workflows
            and (not self.workflow_names or workflow.name in self.workflow_names)
            and (not self.states or workflow.state in self.states)
            and all(workflow.labels.get(k) == v for k, v in self.labels)
        )


def run_filter(
    *,
    services: Sequence[str],
    workflow_names: Sequence[str],
    states: Sequence[int],
    labels: Mapping[str, str],
    kind: int,
    include_steps: bool,
    include_active: bool,
) -> RunFilter:
    """The filter of a WatchRuns request; INVALID_ARGUMENT names every bad field,
    and a filter no run could match (a workflow has no service, a job no
    workflow name)."""
    v = Violations()
    if len(services) > MAX_FILTER_VALUES:
        v.add("services", f"at most {MAX_FILTER_VALUES} services (got {len(services)})")
    else:
        for i, service in enumerate(services):
            if not SERVICE_RE.fullmatch(service):
                v.add(f"services[{i}]", "must be 1-128 characters of [A-Za-z0-9._:/-]")
    if len(workflow_names) > MAX_FILTER_VALUES:
        v.add("workflow_names", f"at most {MAX_FILTER_VALUES} names (got {len(workflow_names)})")
    else:
        for i, name in enumerate(workflow_names):
            if not name or len(name) > MAX_WORKFLOW_NAME:
                v.add(f"workflow_names[{i}]", f"must be 1-{MAX_WORKFLOW_NAME} characters")
    run_states = set()
    for i, state in enumerate(states):
        try:
            run_state = RunState(state)
        except ValueError:
            v.add(f"states[{i}]", f"unknown RunState value {state}")
            continue
        if run_state == RunState.UNSPECIFIED:
            v.add(f"states[{i}]", "RUN_STATE_UNSPECIFIED is not a state; leave states empty")
        run_states.add(run_state)
    check_labels(v, "labels", labels)
    if kind not in (KIND_ANY, KIND_JOB, KIND_WORKFLOW):
        v.add("kind", f"unknown RunKind value {kind}")
    if services and workflow_names:
        v.add(
            "workflow_names",
            "matches nothing with services: services selects jobs, workflow_names workflows",
        )
    elif services and kind == KIND_WORKFLOW:
        v.add("services", "matches nothing with kind RUN_KIND_WORKFLOW: a workflow has no service")
    elif workflow_names and kind == KIND_JOB:
        v.add("workflow_names", "matches nothing with kind RUN_KIND_JOB: a job has no name")
    if include_steps and kind == KIND_WORKFLOW:
        v.add("include_steps", "steps are jobs: not with kind RUN_KIND_WORKFLOW")
    v.raise_if_any()
    return RunFilter(
        services=frozenset(services),
        workflow_names=frozenset(workflow_names),
        states=frozenset(run_states),
        labels=tuple(sorted(labels.items())),
        jobs=kind != KIND_WORKFLOW and not workflow_names,
        workflows=kind != KIND_JOB and not services,
        include_steps=include_steps,
        include_active=include_active,
    )


@dataclass(frozen=True, slots=True)
class RunChange:
    """One message of a feed: exactly one of job, workflow, snapshot_end (the
    number of runs sent before it, and whether the snapshot was cut short) or
    keepalive_us."""

    job: Job | None = None
    workflow: Workflow | None = None
    snapshot_end: tuple[int, bool] | None = None
    keepalive_us: int = 0

    @property
    def run_id(self) -> str:
        run = self.job or self.workflow
        return run.id if run is not None else ""


class _Sent:
    """The last version sent of each run, bounded: a version never goes back."""

    def __init__(self) -> None:
        self._versions: OrderedDict[str, tuple[int, int]] = OrderedDict()

    def advance(self, run_id: str, version: tuple[int, int]) -> bool:
        """True (and remembered) when `version` is newer than the last sent."""
        last = self._versions.get(run_id)
        if last is not None and version <= last:
            return False
        self._versions[run_id] = version
        self._versions.move_to_end(run_id)
        if len(self._versions) > MAX_TRACKED_RUNS:
            self._versions.popitem(last=False)
        return True


def _job_version(job: Job) -> tuple[int, int]:
    return (job.updated_us, 0)


def _workflow_version(workflow: Workflow) -> tuple[int, int]:
    return (workflow.updated_us, workflow.completed_steps)


class RunFeed:
    """Feeds of runs over one database and change feed."""

    def __init__(
        self, db: Database, feed: JobFeed, stopping: asyncio.Event, keepalive_s: float = 15.0
    ) -> None:
        self._db = db
        self._feed = feed
        self._stopping = stopping
        self.keepalive_s = keepalive_s

    async def watch(self, tenant: str | None, f: RunFilter) -> AsyncGenerator[RunChange, None]:
        """The active runs (with include_active), snapshot_end, then each change
        of a matching run. Subscribes before reading the snapshot, so nothing
        committed in between is missed; a run's version is checked before it
        is sent, so nothing goes back either."""
        sent = _Sent()
        with self._feed.subscribe_runs(tenant) as sub:
            count, truncated = 0, False
            if f.include_active:
                async for run in self._active(tenant, f):
                    if run is None or count == MAX_SNAPSHOT_RUNS:
                        truncated = True
                        break
                    count += 1
                    if isinstance(run, Job):
                        sent.advance(run.id, _job_version(run))
                        yield RunChange(job=run)
                    else:
                        sent.advance(run.id, _workflow_version(run))
                        yield RunChange(workflow=run)
            yield RunChange(snapshot_end=(count, truncated))
            while True:
                if not await self._wait(sub.wakeup):
                    yield RunChange(keepalive_us=now_us())
                    continue
                if sub.overflowed:
                    raise ResourceExhausted(
                        f"reader fell more than {RUNS_BUFFER} changes behind; the feed was "
                        "ended: read faster, or watch again (include_active sends the runs "
                        "not yet ended)",
                        reason="READER_STALLED",
                        metadata={"buffered_changes": str(RUNS_BUFFER)},
                    )
                if sub.lost:
                    raise Unavailable(
                        "changes made on other replicas may have been missed (the "
                        "notification connection was lost); watch again with include_active",
                        reason="CHANGES_LOST",
                    )
                local, remote = sub.take()
                for change in await self._changes(tenant, f, local, remote):
                    if change.job is not None:
                        if sent.advance(change.job.id, _job_version(change.job)):
                            yield change
                    elif change.workflow is not None and sent.advance(
                        change.workflow.id, _workflow_version(change.workflow)
                    ):
                        yield change

    async def _wait(self, wakeup: asyncio.Event) -> bool:
        """True when woken, False after the keepalive interval. When the server
        stops the feed ends UNAVAILABLE: watch again elsewhere."""
        if not wakeup.is_set():
            stop = asyncio.ensure_future(self._stopping.wait())
            woken = asyncio.ensure_future(wakeup.wait())
            try:
                await asyncio.wait(
                    {stop, woken}, timeout=self.keepalive_s, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                stop.cancel()
                woken.cancel()
        if self._stopping.is_set():
            raise Unavailable("server shutting down; watch again", reason="SHUTTING_DOWN")
        return wakeup.is_set()

    async def _changes(
        self, tenant: str | None, f: RunFilter, local: list[Job], remote: dict[str, str]
    ) -> list[RunChange]:
        """The matching runs that changed, in the order they first changed:
        this replica's jobs as committed (the latest of each), other replicas'
        jobs and every changed job's workflow read again (one query each)."""
        order: dict[str, int] = {}  # run id -> where it first changed
        jobs: dict[str, Job] = {}
        workflow_ids: list[str] = []
        for job in local:
            order.setdefault(job.id, len(order))
            last = jobs.get(job.id)
            if last is None or job.updated_us >= last.updated_us:
                jobs[job.id] = job
            if job.workflow_id and job.workflow_id not in order:
                order[job.workflow_id] = len(order)
                workflow_ids.append(job.workflow_id)
        reread = []
        for job_id, workflow_id in remote.items():
            if f.jobs and job_id not in jobs and (f.include_steps or not workflow_id):
                order.setdefault(job_id, len(order))
                reread.append(job_id)
            if workflow_id and workflow_id not in order:
                order[workflow_id] = len(order)
                workflow_ids.append(workflow_id)
        workflows: list[Workflow] = []
        if reread or (f.workflows and workflow_ids):
            async with self._db.read() as session:
                for job in await store.jobs_by_id(session, reread, tenant):
                    jobs[job.id] = job
                if f.workflows:
                    workflows = await store.workflows_by_id(session, workflow_ids, tenant)
        changes = [RunChange(job=j) for j in jobs.values() if f.wants_job(j)]
        changes += [RunChange(workflow=w) for w in workflows if f.wants_workflow(w)]
        changes.sort(key=lambda c: order[c.run_id])
        return changes

    async def _active(
        self, tenant: str | None, f: RunFilter
    ) -> AsyncGenerator[Job | Workflow | None]:
        """The matching runs not yet ended, jobs then workflows, each oldest
        first, read a page at a time; None once MAX_SNAPSHOT_ROWS rows were
        read and more remain."""
        states = [s for s in ACTIVE_STATES if not f.states or s in f.states]
        if not states:
            return
        read = 0
        for kind in ("job", "workflow"):
            if not (f.jobs if kind == "job" else f.workflows):
                continue
            after = 0
            while True:
                if read >= MAX_SNAPSHOT_ROWS:
                    yield None
                    return
                limit = min(SNAPSHOT_PAGE, MAX_SNAPSHOT_ROWS - read)
                async with self._db.read() as session:
                    page: Sequence[Job | Workflow]
                    if kind == "job":
                        page = await store.active_jobs(
                            session,
                            tenant=tenant,
                            states=states,
                            services=f.services,
                            top_level=not f.include_steps,
                            after=after,
                            limit=limit,
                        )
                    else:
                        page = await store.active_workflows(
                            session,
                            tenant=tenant,
                            states=states,
                            names=f.workflow_names,
                            after=after,
                            limit=limit,
                        )
                read += len(page)
                for run in page:
                    if f.wants_job(run) if isinstance(run, Job) else f.wants_workflow(run):
                        yield run
                if len(page) < limit:
                    break
                after = page[-1].seq
