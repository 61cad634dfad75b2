"""GetRunSummary over a real server: counts by level, type and node, milestones,
timelines, steps' attempts and failures, and the recent runs of a workflow name."""

from __future__ import annotations

from collections import Counter
from typing import Any

import grpc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import create_async_engine

from jobtrace.api.convert import ts_to_us
from jobtrace.auth import DEFAULT_TENANT
from jobtrace.pb import common_pb2 as c
from jobtrace.pb import job_service_pb2 as j
from jobtrace.pb import trace_service_pb2 as t
from jobtrace.pb import worker_service_pb2 as w
from jobtrace.store import summary as summary_store

from .conftest import Harness, Stubs, expect_error, wait_for
from .test_fan_out import fan_out_workflow, struct, wait_workflow
from .test_trace import all_events, append, ev
from .workers import RawWorker

FAST_RETRY = c.BackoffPolicy(initial_interval={"nanos": 1_000_000})


async def summary_of(api: Stubs, **request: Any) -> t.GetRunSummaryResponse:
    response: t.GetRunSummaryResponse = await api.trace.GetRunSummary(
        t.GetRunSummaryRequest(**request)
    )
    return response


async def state_of(api: Stubs, run_id: str) -> int:
    status = (await api.trace.GetRunStatus(t.GetRunStatusRequest(run_id=run_id))).status
    return int(status.state)


def us(d: Any) -> int:
    return d.seconds * 1_000_000 + d.nanos // 1_000


def check_counts(summary: t.RunSummary, events: list[c.TraceEvent]) -> None:
    """What the summary says matches the events, counted here one by one."""
    assert summary.total_events == len(events) == summary.status.history_length
    assert [(x.level, x.events) for x in summary.levels] == sorted(
        Counter(e.level for e in events).items()
    )
    assert [(x.type, x.events) for x in summary.types] == sorted(
        Counter(e.type for e in events).items()
    )
    times = [ts_to_us(e.timestamp) for e in events]
    tl = summary.timeline
    assert (ts_to_us(tl.first_event_at), ts_to_us(tl.last_event_at)) == (min(times), max(times))
    assert us(tl.duration) == max(times) - min(times) >= 0
    milestones = [e for e in events if e.milestone]
    assert summary.total_milestones == len(milestones)
    assert [(m.sequence, m.type, m.message, ts_to_us(m.time)) for m in summary.milestones] == [
        (e.sequence, e.type, e.message, ts_to_us(e.timestamp)) for e in milestones
    ]
    by_node = {n.node_id: n for n in summary.nodes}
    assert sum(n.events for n in summary.nodes) == len(events)
    for node in {e.node_id for e in events}:
        mine = [e for e in events if e.node_id == node]
        n = by_node[node]
        stamps = [ts_to_us(e.timestamp) for e in mine]
        assert n.events == len(mine)
        assert n.errors == sum(1 for e in mine if e.level >= c.LEVEL_ERROR)
        first, last = ts_to_us(n.timeline.first_event_at), ts_to_us(n.timeline.last_event_at)
        assert (first, last) == (min(stamps), max(stamps))
        assert us(n.timeline.duration) == last - first >= 0


async def test_summary_of_a_retried_two_step_workflow(harness: Harness) -> None:
    api = harness.stubs()
    retried = c.JobSpec(service="svc", max_attempts=3, backoff=FAST_RETRY)
    wf = (
        await api.jobs.SubmitWorkflow(
            j.SubmitWorkflowRequest(
                request_id="wf",
                name="render",
                steps=[
                    c.WorkflowStepSpec(name="fetch", job=retried),
                    c.WorkflowStepSpec(
                        name="encode", job=c.JobSpec(service="svc"), depends_on=["fetch"]
                    ),
                ],
            )
        )
    ).workflow
    raw = RawWorker(api)
    await raw.hello("w1", ["svc"])
    first = await raw.expect("assignment")
    assert first.job.step_name == "fetch" and first.attempt == 1
    await append(
        api,
        wf.id,
        ev("log1", "downloading", node_id="fetch"),
        ev("warn", "slow mirror", node_id="fetch", level=c.LEVEL_WARN),
        ev("mark", "half way", node_id="fetch", milestone=True, category=c.CATEGORY_BUSINESS),
    )
    await raw.send(
        fail=w.FailReport(
            job_id=first.job.id, attempt=1, retryable=True, error=c.ErrorDetail(message="flaky")
        )
    )
    await raw.expect("ack")
    again = await raw.expect("assignment")
    assert again.job.id == first.job.id and again.attempt == 2
    # Mid-run: the step waits no more; its failed attempt is counted.
    running = (await summary_of(api, run_id=wf.id)).summary
    fetch = running.nodes[0]
    assert (fetch.node_id, fetch.attempts, fetch.failures) == ("fetch", 2, 1)
    assert fetch.state == c.RUN_STATE_RUNNING
    assert running.nodes[1].node_id == "encode" and running.nodes[1].events == 0
    assert running.nodes[1].state == c.RUN_STATE_PENDING and running.nodes[1].attempts == 0
    await raw.send(complete=w.CompleteReport(job_id=first.job.id, attempt=2))
    second = await raw.expect("assignment")
    await append(api, wf.id, ev("enc", "encoding", node_id="encode", level=c.LEVEL_DEBUG))
    await raw.send(complete=w.CompleteReport(job_id=second.job.id, attempt=1))
    await wait_for(lambda: _is(api, wf.id, c.RUN_STATE_COMPLETED), timeout=10)

    response = await summary_of(api, run_id=wf.id)
    assert list(response.recent_runs) == [], "recent runs only with workflow_name"
    summary = response.summary
    assert summary.run_id == wf.id and summary.workflow_name == "render"
    assert summary.status.state == c.RUN_STATE_COMPLETED
    assert summary.status.progress.completed_actions == 2
    events = await all_events(api, wf.id)
    check_counts(summary, events)
    fetch, encode = summary.nodes[0], summary.nodes[1]
    assert (fetch.node_id, fetch.step_number, fetch.job_id) == ("fetch", 1, first.job.id)
    assert (fetch.state, fetch.attempts, fetch.failures) == (c.RUN_STATE_COMPLETED, 2, 1)
    assert fetch.errors == 1, "the failed attempt's FAILED event"
    assert (encode.node_id, encode.step_number, encode.job_id) == ("encode", 2, second.job.id)
    assert (encode.state, encode.attempts, encode.failures) == (c.RUN_STATE_COMPLETED, 1, 0)
    # Then the workflow's own node (its COMPLETED event), which is no step.
    others = summary.nodes[2:]
    assert [n.node_id for n in others] == sorted({e.node_id for e in events} - {"fetch", "encode"})
    assert all(n.step_number == 0 and n.job_id == "" and n.attempts == 0 for n in others)
    # The steps ran in order: the first ended before the second began.
    assert ts_to_us(fetch.timeline.last_event_at) <= ts_to_us(encode.timeline.first_event_at)
    assert "half way" in [m.message for m in summary.milestones]
    await raw.close()


async def _is(api: Stubs, run_id: str, state: int) -> bool:
    return await state_of(api, run_id) == state


async def test_summary_of_a_plain_job(api: Stubs) -> None:
    job = (
        await api.jobs.SubmitJob(j.SubmitJobRequest(request_id="j", job=c.JobSpec(service="svc")))
    ).job
    never = await summary_of(api, run_id=job.id)
    assert never.summary.total_events == 0
    assert not never.summary.timeline.HasField("first_event_at")
    assert [(n.node_id, n.state, n.attempts, n.events) for n in never.summary.nodes] == [
        (job.id, c.RUN_STATE_QUEUED, 0, 0)
    ]
    raw = RawWorker(api)
    await raw.hello("w1", ["svc"])
    await raw.expect("assignment")
    await raw.send(progress=w.ProgressReport(job_id=job.id, attempt=1, percent=50, message="half"))
    await raw.expect("ack")
    await append(api, job.id, ev("e1", "boom", level=c.LEVEL_ERROR, node_id="helper"))
    await raw.send(complete=w.CompleteReport(job_id=job.id, attempt=1))
    await raw.expect("ack")
    summary = (await summary_of(api, run_id=job.id)).summary
    check_counts(summary, await all_events(api, job.id))
    assert summary.workflow_name == "" and summary.status.service == "svc"
    node = summary.nodes[0]
    assert (node.node_id, node.step_number, node.job_id) == (job.id, 0, job.id)
    assert (node.state, node.attempts, node.failures) == (c.RUN_STATE_COMPLETED, 1, 0)
    assert [(n.node_id, n.events, n.errors) for n in summary.nodes[1:]] == [("helper", 1, 1)]
    assert dict((x.type, x.events) for x in summary.types)[c.TRACE_EVENT_TYPE_PROGRESS] == 1
    await raw.close()


async def _workflow(api: Stubs, rid: str, name: str, service: str = "idle") -> str:
    response = await api.jobs.SubmitWorkflow(
        j.SubmitWorkflowRequest(
            request_id=rid,
            name=name,
            steps=[c.WorkflowStepSpec(name="only", job=c.JobSpec(service=service))],
        )
    )
    return str(response.workflow.id)


async def test_workflow_name_summarises_the_newest_run_and_lists_earlier_ones(api: Stubs) -> None:
    raw = RawWorker(api)
    await raw.hello("w1", ["svc"])
    done = await _workflow(api, "n1", "nightly", service="svc")
    step = await raw.expect("assignment")
    await raw.send(complete=w.CompleteReport(job_id=step.job.id, attempt=1))
    await wait_for(lambda: _is(api, done, c.RUN_STATE_COMPLETED), timeout=10)
    await raw.close()
    cancelled = await _workflow(api, "n2", "nightly")
    await api.jobs.CancelWorkflow(j.CancelWorkflowRequest(workflow_id=cancelled))
    await _workflow(api, "o1", "other")
    newest = await _workflow(api, "n3", "nightly")

    response = await summary_of(api, workflow_name="nightly")
    assert response.summary.run_id == newest and response.summary.workflow_name == "nightly"
    assert response.summary.status.state == c.RUN_STATE_QUEUED
    assert [r.run_id for r in response.recent_runs] == [cancelled, done], "newest first"
    was_cancelled, completed = response.recent_runs
    assert was_cancelled.state == c.RUN_STATE_CANCELLED
    assert not was_cancelled.HasField("started_at") and not was_cancelled.HasField("duration")
    assert completed.state == c.RUN_STATE_COMPLETED
    assert us(completed.duration) == ts_to_us(completed.completed_at) - ts_to_us(
        completed.started_at
    )
    assert us(completed.duration) >= 0
    assert ts_to_us(completed.created_at) <= ts_to_us(was_cancelled.created_at)

    one = await summary_of(api, workflow_name="nightly", recent_runs=1)
    assert [r.run_id for r in one.recent_runs] == [cancelled]
    alone = await summary_of(api, workflow_name="other")
    assert list(alone.recent_runs) == []


async def test_bad_summary_requests_are_refused(api: Stubs) -> None:
    wf = await _workflow(api, "b1", "x")
    bad: list[tuple[dict[str, Any], str]] = [
        ({}, "run_id"),
        ({"run_id": wf, "workflow_name": "x"}, "workflow_name"),
        ({"workflow_name": "x", "recent_runs": -1}, "recent_runs"),
        ({"workflow_name": "x", "recent_runs": 101}, "recent_runs"),
        ({"run_id": wf, "recent_runs": 5}, "recent_runs"),
    ]
    for request, field in bad:
        _, _, violations = await expect_error(
            summary_of(api, **request), grpc.StatusCode.INVALID_ARGUMENT
        )
        assert [f for f, _ in violations] == [field], (request, violations)
    assert len((await summary_of(api, workflow_name="x", recent_runs=100)).recent_runs) == 0
    for request in ({"run_id": "job_nope"}, {"run_id": "wf_nope"}, {"workflow_name": "nope"}):
        await expect_error(summary_of(api, **request), grpc.StatusCode.NOT_FOUND)
    # A step's job is not a run: its run is the workflow.
    step = (await api.jobs.GetWorkflow(j.GetWorkflowRequest(workflow_id=wf))).workflow.steps[0]
    _, info, _ = await expect_error(summary_of(api, run_id=step.job_id), grpc.StatusCode.NOT_FOUND)
    assert info is not None and info.metadata["workflow_id"] == wf


async def plan_of(db_url: str, stmt: Any) -> str:
    """The database's plan of a summary's statement (PostgreSQL told to avoid
    reading a small table whole, as it would otherwise)."""
    pg = db_url.startswith("postgresql")
    dialect = postgresql.dialect() if pg else sqlite.dialect()  # type: ignore[no-untyped-call]
    sql = str(stmt.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))
    engine = create_async_engine(db_url)
    try:
        async with engine.begin() as conn:
            if pg:
                await conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
                plan = (await conn.exec_driver_sql("EXPLAIN " + sql)).fetchall()
            else:
                plan = (await conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql)).fetchall()
    finally:
        await engine.dispose()
    return " ".join(str(row) for row in plan)


async def test_summary_queries_use_an_index(harness: Harness) -> None:
    api = harness.stubs()
    for i in range(5):
        run = await _workflow(api, f"p{i}", f"name{i % 2}")
        await append(api, run, *(ev(f"e{k}", node_id=f"n{k % 2}") for k in range(5)))
    url = harness.db_url
    plan = await plan_of(url, summary_store.runs_of_name_query(DEFAULT_TENANT, "name1", 11))
    assert "ix_workflows_tenant_name_seq" in plan, plan
    # A run's events are one range of the primary key (run_id, seq).
    key = "trace_events_pkey" if url.startswith("postgresql") else "sqlite_autoindex_trace_events"
    for stmt in (
        summary_store.event_groups_query(run),
        summary_store.milestones_query(run, 100),
    ):
        plan = await plan_of(url, stmt)
        assert key in plan and "SCAN trace_events" not in plan, plan


async def test_fan_out_children_have_their_steps_number_and_count_their_failures(
    api: Stubs,
) -> None:
    raw = RawWorker(api)
    await raw.hello("w", ["svc"], max_concurrency=2)
    request = fan_out_workflow()
    request.steps[1].job.max_attempts = 2
    request.steps[1].job.backoff.initial_interval.FromMilliseconds(1)
    wf = (await api.jobs.SubmitWorkflow(request)).workflow
    a = await raw.expect("assignment")
    await raw.send(
        complete=w.CompleteReport(job_id=a.job.id, attempt=1, result=struct({"files": ["x"]}))
    )
    await raw.expect("ack")
    child = await raw.expect("assignment")
    error = c.ErrorDetail(message="flaky")
    await raw.send(fail=w.FailReport(job_id=child.job.id, attempt=1, error=error, retryable=True))
    await raw.expect("assignment")
    await raw.send(fail=w.FailReport(job_id=child.job.id, attempt=2, error=error, retryable=True))
    await wait_workflow(api, wf.id)
    summary = (await summary_of(api, run_id=wf.id)).summary
    check_counts(summary, await all_events(api, wf.id))
    steps = {n.node_id: n for n in summary.nodes if n.job_id}
    assert [n.node_id for n in summary.nodes if n.job_id] == ["list", "each", "sum", "each[0]"]
    assert [steps[s].step_number for s in ("list", "each", "sum", "each[0]")] == [1, 2, 3, 2]
    failed = steps["each[0]"]
    assert (failed.state, failed.attempts, failed.failures) == (c.RUN_STATE_FAILED, 2, 2)
    assert failed.errors == 2 and steps["list"].failures == 0
    assert steps["sum"].attempts == 0 and steps["sum"].events == 0
    await raw.close()
