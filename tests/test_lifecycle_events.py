"""Lifecycle events a UI can draw: a workflow's own STARTED (once) and
PROGRESS ("2 of 3 steps") events, every step event's place in its workflow,
the duration on every COMPLETED and FAILED event, and the output summary of
a completion. Through the real server and worker runtime, on both backends."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2

from jobtrace.domain import jcs
from jobtrace.pb import common_pb2 as c
from jobtrace.pb import job_service_pb2 as j
from jobtrace.pb import worker_service_pb2 as w

from .conftest import Harness, Stubs, execute_sql, wait_for
from .test_trace import all_events
from .workers import RawWorker, runtime_worker

BIG = {f"k{i:03d}": "x" * 40 for i in range(60)}  # about 3 KB of JSON
SECRET = "hunter2-the-password"
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"


def us(ts: Any) -> int:
    return int(ts.seconds) * 1_000_000 + int(ts.nanos) // 1000


def duration_us(d: Any) -> int:
    return int(d.seconds) * 1_000_000 + int(d.nanos) // 1000


def chain(rid: str, names: list[str], **job: Any) -> j.SubmitWorkflowRequest:
    steps = []
    for i, name in enumerate(names):
        steps.append(
            c.WorkflowStepSpec(
                name=name,
                job=c.JobSpec(service="life", **job),
                depends_on=[names[i - 1]] if i else [],
            )
        )
    return j.SubmitWorkflowRequest(request_id=rid, name="life", steps=steps)


async def finished(api: Stubs, workflow_id: str) -> c.Workflow:
    answer = await api.jobs.AwaitWorkflow(
        j.AwaitWorkflowRequest(workflow_id=workflow_id, timeout={"seconds": 30})
    )
    return answer.workflow


async def job_of(api: Stubs, job_id: str) -> c.Job:
    return (await api.jobs.GetJob(j.GetJobRequest(job_id=job_id))).job


def summary(e: c.TraceEvent) -> dict[str, Any]:
    return json_format.MessageToDict(e.output_summary)


async def test_a_workflow_trace_shows_its_start_progress_and_every_steps_place(
    harness: Harness,
) -> None:
    api = harness.stubs()

    async def run(ctx: Any) -> dict[str, Any]:
        name = ctx.job.step_name
        await ctx.progress(50, f"{name} halfway")
        await ctx.log(f"{name} working", event_key=f"log-{name}")
        if name == "fetch":
            return {"rows": 3, "password": SECRET, "note": f"Authorization: Bearer {JWT}"}
        if name == "transform":
            return BIG
        ctx.set_output_summary({"stored": "s3://bucket/out", "token": SECRET})
        return {"stored": True}

    async with runtime_worker(harness.target, {"life": run}):
        wf = (
            await api.jobs.SubmitWorkflow(chain("wf-life", ["fetch", "transform", "store"]))
        ).workflow
        done = await finished(api, wf.id)
    assert done.state == c.RUN_STATE_COMPLETED, done.failure.reason
    events = await all_events(api, wf.id)

    own = [e for e in events if e.node_id == "workflow"]
    assert [(e.type, e.step_number, e.total_steps, e.message) for e in own] == [
        (c.TRACE_EVENT_TYPE_STARTED, 0, 3, "workflow started (3 steps)"),
        (c.TRACE_EVENT_TYPE_PROGRESS, 1, 3, "1 of 3 steps"),
        (c.TRACE_EVENT_TYPE_PROGRESS, 2, 3, "2 of 3 steps"),
        (c.TRACE_EVENT_TYPE_PROGRESS, 3, 3, "3 of 3 steps"),
        (c.TRACE_EVENT_TYPE_COMPLETED, 3, 3, "workflow completed (3 steps)"),
    ]
    assert [round(e.percent, 2) for e in own[1:4]] == [33.33, 66.67, 100.0]
    assert [json_format.MessageToDict(e.data)["step"] for e in own[1:4]] == [
        "fetch",
        "transform",
        "store",
    ]
    started, completed = own[0], own[-1]
    assert not started.HasField("duration") and not own[1].HasField("duration")
    # The run's duration: from its first step's start to its end, as stored.
    assert us(started.timestamp) == us(done.started_at)
    assert us(completed.timestamp) == us(done.completed_at)
    assert duration_us(completed.duration) == us(done.completed_at) - us(done.started_at)
    first_step_start = next(e for e in events if e.type == c.TRACE_EVENT_TYPE_STARTED)
    assert first_step_start.node_id == "fetch"
    assert us(first_step_start.timestamp) == us(started.timestamp)

    # Every event of a step, the server's and the worker's, says where it is.
    numbers = {"fetch": 1, "transform": 2, "store": 3}
    step_events = [e for e in events if e.job_id]
    assert {e.type for e in step_events} == {
        c.TRACE_EVENT_TYPE_STARTED,
        c.TRACE_EVENT_TYPE_PROGRESS,
        c.TRACE_EVENT_TYPE_LOG,
        c.TRACE_EVENT_TYPE_COMPLETED,
    }
    for e in step_events:
        assert (e.step_number, e.total_steps) == (numbers[e.node_id], 3), e

    by_step = {s.name: s for s in done.steps}
    for name in numbers:
        mine = [e for e in step_events if e.node_id == name]
        start = next(e for e in mine if e.type == c.TRACE_EVENT_TYPE_STARTED)
        end = next(e for e in mine if e.type == c.TRACE_EVENT_TYPE_COMPLETED)
        job = await job_of(api, by_step[name].job_id)
        assert us(start.timestamp) == us(job.started_at)
        assert us(end.timestamp) == us(job.completed_at)
        assert duration_us(end.duration) == us(end.timestamp) - us(start.timestamp)
        assert not start.HasField("duration")

    ends = {e.node_id: e for e in step_events if e.type == c.TRACE_EVENT_TYPE_COMPLETED}
    # Small: the result itself, its secret redacted.
    assert summary(ends["fetch"]) == {
        "rows": 3,
        "password": {"redacted": "secret", "reason": "key"},
        "note": "Authorization: [redacted secret bearer]",
    }
    # Large: its digest, size and keys.
    raw = jcs.dumps(BIG)
    assert summary(ends["transform"]) == {
        "sha256": hashlib.sha256(raw).hexdigest(),
        "size": len(raw),
        "keys": list(BIG),
        "key_count": len(BIG),
    }
    # The worker's own summary wins over the derived one, redacted too.
    assert summary(ends["store"]) == {
        "stored": "s3://bucket/out",
        "token": {"redacted": "secret", "reason": "key"},
    }


async def test_a_standalone_jobs_completion_carries_its_attempt_and_summary(
    harness: Harness,
) -> None:
    api = harness.stubs()

    async def run(ctx: Any) -> dict[str, Any]:
        await ctx.log("working", event_key="k1")
        return {"answer": 42}

    async with runtime_worker(harness.target, {"life": run}):
        job = (
            await api.jobs.SubmitJob(
                j.SubmitJobRequest(request_id="solo", job=c.JobSpec(service="life"))
            )
        ).job
        await wait_for(
            lambda: _state_is(api, job.id, c.RUN_STATE_COMPLETED), timeout=20, interval=0.05
        )
    events = await all_events(api, job.id)
    assert all((e.step_number, e.total_steps) == (0, 0) for e in events), "not a step"
    start = next(e for e in events if e.type == c.TRACE_EVENT_TYPE_STARTED)
    end = next(e for e in events if e.type == c.TRACE_EVENT_TYPE_COMPLETED)
    stored = await job_of(api, job.id)
    assert duration_us(end.duration) == us(stored.completed_at) - us(stored.started_at)
    assert duration_us(end.duration) == us(end.timestamp) - us(start.timestamp)
    assert summary(end) == {"answer": 42}


async def _state_is(api: Stubs, job_id: str, state: int) -> bool:
    return bool((await job_of(api, job_id)).state == state)


async def test_failures_carry_the_duration_of_the_attempt_and_of_the_run(
    harness: Harness,
) -> None:
    api = harness.stubs()

    async def run(ctx: Any) -> dict[str, Any]:
        if ctx.job.step_name == "flaky":
            raise RuntimeError(f"attempt {ctx.attempt} broke")
        return {}

    spec = {"max_attempts": 2, "backoff": c.BackoffPolicy(initial_interval={"nanos": 1_000_000})}
    async with runtime_worker(harness.target, {"life": run}):
        wf = (
            await api.jobs.SubmitWorkflow(chain("wf-fail", ["first", "flaky", "never"], **spec))
        ).workflow
        done = await finished(api, wf.id)
    assert done.state == c.RUN_STATE_FAILED
    events = await all_events(api, wf.id)
    flaky = [e for e in events if e.node_id == "flaky"]
    starts = [e for e in flaky if e.type == c.TRACE_EVENT_TYPE_STARTED]
    failures = [e for e in flaky if e.type == c.TRACE_EVENT_TYPE_FAILED]
    assert [e.attempt for e in starts] == [1, 2] and [e.attempt for e in failures] == [1, 2]
    for start, failed in zip(starts, failures, strict=True):
        assert (failed.step_number, failed.total_steps) == (2, 3)
        assert failed.HasField("duration")
        assert duration_us(failed.duration) == us(failed.timestamp) - us(start.timestamp)
    own = [e for e in events if e.node_id == "workflow"]
    assert [e.type for e in own] == [
        c.TRACE_EVENT_TYPE_STARTED,
        c.TRACE_EVENT_TYPE_PROGRESS,
        c.TRACE_EVENT_TYPE_FAILED,
    ]
    assert duration_us(own[-1].duration) == us(done.completed_at) - us(done.started_at)
    assert duration_us(own[-1].duration) == us(own[-1].timestamp) - us(own[0].timestamp)


async def test_steps_starting_together_start_their_workflow_once(harness: Harness) -> None:
    api = harness.stubs()
    gate = asyncio.Event()
    started = 0

    async def run(ctx: Any) -> dict[str, Any]:
        nonlocal started
        started += 1
        await gate.wait()
        return {}

    names = ["a", "b", "c", "d"]
    request = j.SubmitWorkflowRequest(
        request_id="wf-wide",
        name="wide",
        steps=[
            c.WorkflowStepSpec(name=n, job=c.JobSpec(service="life"), independent=True)
            for n in names
        ],
    )
    async with runtime_worker(harness.target, {"life": run}, max_concurrency=4):
        wf = (await api.jobs.SubmitWorkflow(request)).workflow
        await wait_for(lambda: started == 4, timeout=20)
        gate.set()
        done = await finished(api, wf.id)
    assert done.state == c.RUN_STATE_COMPLETED
    own = [e for e in await all_events(api, wf.id) if e.node_id == "workflow"]
    assert [e.type for e in own].count(c.TRACE_EVENT_TYPE_STARTED) == 1
    assert [e.step_number for e in own if e.type == c.TRACE_EVENT_TYPE_PROGRESS] == [1, 2, 3, 4]


async def test_the_workflow_start_is_a_compare_and_set(db_url: str, harness: Harness) -> None:
    """Two transactions (as two replicas would) both see the workflow QUEUED
    and start it at once: one changes it, the other finds it started."""
    from sqlalchemy.ext.asyncio import create_async_engine

    from jobtrace.store import jobs as store

    api = harness.stubs()
    wf = (await api.jobs.SubmitWorkflow(chain("wf-cas", ["only"]))).workflow
    engine = create_async_engine(db_url)
    try:
        async with engine.connect() as first_conn, engine.connect() as second_conn:
            from sqlalchemy.ext.asyncio import AsyncSession

            first, second = AsyncSession(first_conn), AsyncSession(second_conn)
            await first.begin()
            assert await store.start_workflow(first, wf.id, 1) == 1
            if "postgresql" in db_url:
                # The second waits for the first's row lock, then re-checks.
                await second.begin()
                racing = asyncio.ensure_future(store.start_workflow(second, wf.id, 2))

                async def blocked() -> bool:
                    waiting = await execute_sql(
                        db_url,
                        "SELECT count(*) FROM pg_stat_activity"
                        " WHERE datname = current_database() AND wait_event_type = 'Lock'",
                    )
                    return bool(waiting[0][0])

                await wait_for(blocked, timeout=10, interval=0.02)
                assert not racing.done()
                await first.commit()
                assert await racing is None
                await second.commit()
            else:
                await first.commit()  # one writer at a time
                await second.begin()
                assert await store.start_workflow(second, wf.id, 2) is None
                await second.commit()
    finally:
        await engine.dispose()
    rows = await execute_sql(db_url, "SELECT started_us FROM workflows WHERE id = :id", id=wf.id)
    assert rows[0][0] == 1


async def test_a_worker_summary_too_large_is_refused_and_changes_nothing(
    harness: Harness,
) -> None:
    api = harness.stubs()
    raw = RawWorker(api)
    await raw.hello("w", ["life"])
    job = (
        await api.jobs.SubmitJob(
            j.SubmitJobRequest(request_id="too-big", job=c.JobSpec(service="life"))
        )
    ).job
    assignment = await raw.expect("assignment")
    huge = struct_pb2.Struct()
    huge.update({"blob": "x" * (64 * 1024 + 1)})
    await raw.send(
        complete=w.CompleteReport(job_id=job.id, attempt=assignment.attempt, output_summary=huge)
    )
    error = await raw.expect("error")
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "complete.output_summary" in error.message and "65536" in error.message
    assert (await job_of(api, job.id)).state == c.RUN_STATE_RUNNING
    events = await all_events(api, job.id)
    assert [e.type for e in events] == [c.TRACE_EVENT_TYPE_STARTED]
    # Within the bound, it is the completion's summary.
    fits = struct_pb2.Struct()
    fits.update({"rows": 7})
    await raw.send(
        complete=w.CompleteReport(job_id=job.id, attempt=assignment.attempt, output_summary=fits)
    )
    await raw.expect("ack")
    end = (await all_events(api, job.id))[-1]
    assert end.type == c.TRACE_EVENT_TYPE_COMPLETED and summary(end) == {"rows": 7}
    await raw.close()


async def test_steps_stored_before_0013_get_their_place_in_the_workflow(db_url: str) -> None:
    """Jobs stored before revision 0013 have no step number: the migration
    fills it from their position (a fan-out child: its step's) and their
    workflow's step count, so their next events carry it; events stored
    before it are read as they were, with no duration."""
    from .test_worker_stream import migrate_down

    async with Harness(db_url) as h:
        api = h.stubs()
        raw = RawWorker(api)
        # Only the first step's service: the fan-out children it queues stay
        # queued for the worker after the migration (none is leased to this
        # stream as it closes).
        await raw.hello("w", ["life-list"], max_concurrency=4)
        request = j.SubmitWorkflowRequest(
            request_id="wf-old",
            name="old",
            steps=[
                c.WorkflowStepSpec(name="list", job=c.JobSpec(service="life-list")),
                c.WorkflowStepSpec(
                    name="each",
                    job=c.JobSpec(service="life"),
                    depends_on=["list"],
                    for_each=c.ForEach(step="list", path="files"),
                ),
                c.WorkflowStepSpec(name="sum", job=c.JobSpec(service="life")),
            ],
        )
        wf = (await api.jobs.SubmitWorkflow(request)).workflow
        first = await raw.expect("assignment")
        files = struct_pb2.Struct()
        files.update({"files": ["a", "b"]})
        await raw.send(complete=w.CompleteReport(job_id=first.job.id, attempt=1, result=files))
        await raw.expect("ack")
        await raw.close()
    await migrate_down(db_url, "0012")
    async with Harness(db_url) as h:
        api = h.stubs()
        rows = await execute_sql(
            db_url,
            "SELECT step_name, step_number, total_steps FROM jobs WHERE workflow_id = :w",
            w=wf.id,
        )
        assert sorted(tuple(r) for r in rows) == [
            ("each", 2, 3),
            ("each[0]", 2, 3),
            ("each[1]", 2, 3),
            ("list", 1, 3),
            ("sum", 3, 3),
        ]
        before = await all_events(api, wf.id)
        ended = next(e for e in before if e.type == c.TRACE_EVENT_TYPE_COMPLETED)
        assert ended.node_id == "list" and not ended.HasField("duration")
        raw = RawWorker(api)
        await raw.hello("w", ["life"], max_concurrency=4)
        child = await raw.expect("assignment")
        assert child.job.step_name.startswith("each[")
        start = next(
            e
            for e in await all_events(api, wf.id)
            if (e.type, e.node_id) == (c.TRACE_EVENT_TYPE_STARTED, child.job.step_name)
        )
        assert (start.step_number, start.total_steps) == (2, 3)
        await raw.close()
