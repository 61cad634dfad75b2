"""Run summaries: what a run's events and jobs add up to, counted by the
database, and the recent runs of a workflow name."""

from __future__ import annotations

from dataclasses import dataclass

from jobtrace.domain import fan_out
from jobtrace.domain.errors import NotFound, Violations
from jobtrace.domain.trace import RunStatus, Trace
from jobtrace.ids import run_kind
from jobtrace.model import Level, RunState
from jobtrace.store import summary as store
from jobtrace.store.db import Database
from jobtrace.store.summary import MilestoneRow, WorkflowRun

# Milestones a summary lists (the first, in sequence order).
MAX_MILESTONES = 100
# Earlier runs of a workflow name listed by default, and at most.
DEFAULT_RECENT_RUNS = 10
MAX_RECENT_RUNS = 100
# Failed attempts: the last attempt of a job in these states failed too.
_LAST_ATTEMPT_FAILED = frozenset({RunState.FAILED, RunState.TIMED_OUT, RunState.QUEUED})


@dataclass(frozen=True, slots=True)
class Span:
    """When some events span (0, 0 without events)."""

    first_us: int = 0
    last_us: int = 0

    @property
    def duration_us(self) -> int:
        return self.last_us - self.first_us


@dataclass(frozen=True, slots=True)
class NodeSummary:
    node_id: str
    # Position of the step in its workflow, from 1; 0 if not a step.
    step_number: int = 0
    job_id: str = ""
    state: RunState = RunState.UNSPECIFIED
    events: int = 0
    errors: int = 0
    span: Span = Span()
    attempts: int = 0
    failures: int = 0


@dataclass(frozen=True, slots=True)
class RunSummary:
    run_id: str
    status: RunStatus
    workflow_name: str
    total_events: int
    # (level, events) and (type, events) in level / type order, those present.
    levels: tuple[tuple[int, int], ...]
    types: tuple[tuple[int, int], ...]
    span: Span
    nodes: tuple[NodeSummary, ...]
    milestones: tuple[MilestoneRow, ...]
    total_milestones: int


def failed_attempts(state: RunState, attempts: int) -> int:
    """Attempts of a job that failed: a retry follows only a failed (or lost)
    attempt, so every attempt but the last; the last too when the job failed,
    timed out, or waits (QUEUED) to retry it."""
    if attempts <= 0:
        return 0
    return attempts - (0 if state in _LAST_ATTEMPT_FAILED else 1)


class RunSummaries:
    def __init__(self, db: Database, trace: Trace) -> None:
        self._db = db
        self._trace = trace

    async def summarise(
        self,
        scope: str | None,
        tenant: str,
        *,
        run_id: str,
        workflow_name: str,
        recent_runs: int,
    ) -> tuple[RunSummary, list[WorkflowRun]]:
        """The summary of `run_id` (visible in `scope`: a tenant, None for
        all), or of the newest run named `workflow_name` in `tenant` with the
        runs of that name before it, newest first (at most `recent_runs`, 0:
        the default)."""
        v = Violations()
        if not run_id and not workflow_name:
            v.add("run_id", "required: a run id, or a workflow_name instead")
        elif run_id and workflow_name:
            v.add("workflow_name", "give run_id or workflow_name, not both")
        if run_id and recent_runs:
            v.add("recent_runs", "only with workflow_name (the runs before its newest)")
        elif not 0 <= recent_runs <= MAX_RECENT_RUNS:
            v.add(
                "recent_runs",
                f"must be between 1 and {MAX_RECENT_RUNS}, or 0 for {DEFAULT_RECENT_RUNS} "
                f"(got {recent_runs})",
            )
        v.raise_if_any()
        async with self._db.read() as session:
            recent: list[WorkflowRun] = []
            if workflow_name:
                runs = await store.runs_of_name(
                    session, tenant, workflow_name, 1 + (recent_runs or DEFAULT_RECENT_RUNS)
                )
                if not runs:
                    raise NotFound(
                        f"no workflow named {workflow_name!r}",
                        reason="WORKFLOW_NAME_NOT_FOUND",
                        metadata={"workflow_name": workflow_name},
                    )
                run_id, recent = runs[0].id, runs[1:]
                scope = tenant
            # Every read in one read transaction.
            status = await self._trace.status_in(session, scope, run_id)
            workflow = run_kind(run_id) == "workflow"
            groups = await store.event_groups(session, run_id)
            jobs = await store.run_jobs(session, run_id, workflow=workflow)
            milestones = await store.first_milestones(session, run_id, MAX_MILESTONES)
            name = workflow_name or (await store.workflow_name(session, run_id) if workflow else "")
        # Adding up the groups the database counted (a few per node), not events.
        levels: dict[int, int] = {}
        types: dict[int, int] = {}
        for g in groups:
            levels[g.level] = levels.get(g.level, 0) + g.events
            types[g.type] = types.get(g.type, 0) + g.events
        return (
            RunSummary(
                run_id=run_id,
                status=status,
                workflow_name=name,
                total_events=sum(g.events for g in groups),
                levels=tuple(sorted(levels.items())),
                types=tuple(sorted(types.items())),
                span=_span(groups),
                nodes=_nodes(jobs, groups, workflow=workflow),
                milestones=tuple(milestones),
                total_milestones=sum(g.milestones for g in groups),
            ),
            recent,
        )


def _span(groups: list[store.EventGroup]) -> Span:
    if not groups:
        return Span()
    return Span(min(g.first_us for g in groups), max(g.last_us for g in groups))


@dataclass(frozen=True, slots=True)
class _NodeEvents:
    events: int
    errors: int
    span: Span


def _by_node(groups: list[store.EventGroup]) -> dict[str, _NodeEvents]:
    nodes: dict[str, list[store.EventGroup]] = {}
    for g in groups:
        nodes.setdefault(g.node_id, []).append(g)
    return {
        node: _NodeEvents(
            events=sum(g.events for g in mine),
            errors=sum(g.events for g in mine if g.level >= Level.ERROR),
            span=_span(mine),
        )
        for node, mine in nodes.items()
    }


def _nodes(
    jobs: list[store.StepRow], groups: list[store.EventGroup], *, workflow: bool
) -> tuple[NodeSummary, ...]:
    """The run's jobs (steps in step order) with their events' counts, then
    the other nodes events named, by name."""
    by_node = _by_node(groups)
    numbers = {j.node_id: j.step_index + 1 for j in jobs if j.step_index < fan_out.CHILD_INDEX_BASE}
    nodes = []
    for job in jobs:
        c = by_node.pop(job.node_id, None)
        # A fan-out child has its step's number.
        parent = fan_out.parent_of(job.node_id)
        number = numbers.get(parent[0] if parent else job.node_id, 0) if workflow else 0
        nodes.append(
            NodeSummary(
                node_id=job.node_id,
                step_number=number,
                job_id=job.job_id,
                state=job.state,
                events=c.events if c else 0,
                errors=c.errors if c else 0,
                span=c.span if c else Span(),
                attempts=job.attempt,
                failures=failed_attempts(job.state, job.attempt),
            )
        )
    for node_id, c in sorted(by_node.items()):
        nodes.append(NodeSummary(node_id=node_id, events=c.events, errors=c.errors, span=c.span))
    return tuple(nodes)
