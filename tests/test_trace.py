"""TraceService over a real server: sequencing, idempotency, filters, cursors, live streams."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import grpc
import pytest

from jobtrace.pb import common_pb2 as c
from jobtrace.pb import job_service_pb2 as j
from jobtrace.pb import trace_service_pb2 as t
from jobtrace.pb import worker_service_pb2 as w

from .conftest import Harness, Stubs, expect_error, stubs_for, wait_for
from .workers import RawWorker


def ev(key: str, message: str = "", **fields: Any) -> c.TraceEvent:
    data = fields.pop("data", None)
    e = c.TraceEvent(event_key=key, message=message or key, **fields)
    if data is not None:
        e.data.update(data)
    return e


async def new_run(api: Stubs, rid: str = "run") -> str:
    job = await api.jobs.SubmitJob(j.SubmitJobRequest(request_id=rid, job=c.JobSpec(service="svc")))
    return job.job.id


async def append(api: Stubs, run_id: str, *events: c.TraceEvent) -> list[c.TraceEvent]:
    response = await api.trace.AppendTraceEvents(
        t.AppendTraceEventsRequest(run_id=run_id, events=events)
    )
    return list(response.events)


async def all_events(api: Stubs, run_id: str, **filters: Any) -> list[c.TraceEvent]:
    out: list[c.TraceEvent] = []
    cursor = ""
    while True:
        page = await api.trace.ListTraceEvents(
            t.ListTraceEventsRequest(
                run_id=run_id,
                cursor=cursor,
                page_size=1000,
                view=t.TRACE_EVENT_VIEW_FULL,
                **filters,
            )
        )
        out += page.events
        cursor = page.next_cursor
        if not page.more:
            return out


async def drain_stream(call: Any) -> tuple[list[c.TraceEvent], t.RunStatus | None, str]:
    events: list[c.TraceEvent] = []
    final = None
    cursor = ""
    async for message in call:
        cursor = message.cursor or cursor
        kind = message.WhichOneof("kind")
        if kind == "event":
            events.append(message.event)
        elif kind == "final_status":
            final = message.final_status
    return events, final, cursor


async def test_lifecycle_is_traced_in_order(harness: Harness) -> None:
    api = harness.stubs()
    raw = RawWorker(api)
    await raw.hello("w1", ["svc"])
    run_id = await new_run(api)
    await raw.expect("assignment")
    await raw.send(progress=w.ProgressReport(job_id=run_id, attempt=1, percent=50, message="half"))
    await raw.expect("ack")
    await raw.send(complete=w.CompleteReport(job_id=run_id, attempt=1))
    await raw.expect("ack")
    events = await all_events(api, run_id)
    assert [(e.type, e.sequence) for e in events] == [
        (c.TRACE_EVENT_TYPE_STARTED, 1),
        (c.TRACE_EVENT_TYPE_PROGRESS, 2),
        (c.TRACE_EVENT_TYPE_COMPLETED, 3),
    ]
    assert [e.id for e in events] == [f"{run_id}:{n}" for n in (1, 2, 3)]
    assert events[1].percent == 50 and events[1].message == "half"
    assert all(e.worker_id == "w1" and e.attempt == 1 and e.job_id == run_id for e in events)
    assert events[0].category == c.CATEGORY_BUSINESS and events[0].milestone
    await raw.close()


async def test_retryable_failure_is_an_error_event_and_terminal_one_is_final(
    harness: Harness,
) -> None:
    api = harness.stubs()
    raw = RawWorker(api)
    await raw.hello("w1", ["svc"])
    job = await api.jobs.SubmitJob(
        j.SubmitJobRequest(
            request_id="f",
            job=c.JobSpec(
                service="svc",
                max_attempts=2,
                backoff=c.BackoffPolicy(initial_interval={"nanos": 1000000}),
            ),
        )
    )
    run_id = job.job.id
    await raw.expect("assignment")
    await raw.send(
        fail=w.FailReport(
            job_id=run_id, attempt=1, retryable=True, error=c.ErrorDetail(message="flaky", code="E")
        )
    )
    await raw.expect("ack")
    status = (await api.trace.GetRunStatus(t.GetRunStatusRequest(run_id=run_id))).status
    assert status.state not in (c.RUN_STATE_FAILED,)
    failed = [e for e in await all_events(api, run_id) if e.type == c.TRACE_EVENT_TYPE_FAILED]
    assert len(failed) == 1 and failed[0].level == c.LEVEL_ERROR
    assert failed[0].error.message == "flaky" and failed[0].error.code == "E"
    await raw.expect("assignment")
    await raw.send(
        fail=w.FailReport(
            job_id=run_id, attempt=2, retryable=True, error=c.ErrorDetail(message="again")
        )
    )
    await raw.expect("ack")
    events = await all_events(api, run_id)
    assert events[-1].type == c.TRACE_EVENT_TYPE_FAILED and events[-1].level == c.LEVEL_CRITICAL
    only_failed = await all_events(api, run_id, type=c.TRACE_EVENT_TYPE_FAILED)
    assert [e.sequence for e in only_failed] == [
        e.sequence for e in events if e.type == c.TRACE_EVENT_TYPE_FAILED
    ]
    assert len(only_failed) == 2 and len(events) > 2
    status = (await api.trace.GetRunStatus(t.GetRunStatusRequest(run_id=run_id))).status
    assert status.state == c.RUN_STATE_FAILED and status.failure.reason == "again"
    assert status.history_length == len(events)
    stream = api.trace.StreamTraceEvents(t.StreamTraceEventsRequest(run_id=run_id, follow=True))
    replayed, final, _ = await drain_stream(stream)
    assert [e.sequence for e in replayed] == [e.sequence for e in events]
    assert final is not None and final.state == c.RUN_STATE_FAILED
    await raw.close()


async def test_cancellation_is_a_warn_event(api: Stubs) -> None:
    run_id = await new_run(api)
    await api.jobs.CancelJob(j.CancelJobRequest(job_id=run_id))
    (event,) = await all_events(api, run_id)
    assert event.level == c.LEVEL_WARN and event.message == "Run cancelled by user"


async def test_append_is_idempotent_by_event_key(api: Stubs) -> None:
    run_id = await new_run(api)
    first = await append(api, run_id, ev("a"), ev("b"))
    again = await append(api, run_id, ev("a"), ev("b"), ev("c"))
    assert [e.sequence for e in first] == [1, 2]
    assert [e.sequence for e in again] == [1, 2, 3]
    assert again[:2] == first
    dup_in_batch = await append(api, run_id, ev("d"), ev("d"))
    assert dup_in_batch[0] == dup_in_batch[1]
    assert [e.event_key for e in await all_events(api, run_id)] == ["a", "b", "c", "d"]


async def test_bad_appends_are_refused_and_store_nothing(api: Stubs) -> None:
    run_id = await new_run(api)
    _, _, v = await expect_error(
        api.trace.AppendTraceEvents(t.AppendTraceEventsRequest(run_id=run_id, events=[ev("")])),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert [f for f, _ in v] == ["events[0].event_key"]
    await expect_error(
        api.trace.AppendTraceEvents(t.AppendTraceEventsRequest(run_id=run_id)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    too_many = [ev(f"k{i}") for i in range(1001)]
    await expect_error(
        api.trace.AppendTraceEvents(t.AppendTraceEventsRequest(run_id=run_id, events=too_many)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    _, info, _ = await expect_error(
        api.trace.AppendTraceEvents(
            t.AppendTraceEventsRequest(
                run_id=run_id, events=[ev("ok"), ev("big", data={"x": "y" * 70_000})]
            )
        ),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    assert info is not None and info.reason == "EVENT_TOO_LARGE"
    await expect_error(
        api.trace.AppendTraceEvents(
            t.AppendTraceEventsRequest(run_id="job_nope", events=[ev("a")])
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    await expect_error(
        api.trace.AppendTraceEvents(
            t.AppendTraceEventsRequest(run_id=run_id, events=[ev("p", display_priority=11)])
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert await all_events(api, run_id) == []


async def test_an_append_whose_reply_could_not_be_sent_is_refused_and_stores_nothing(
    db_url: str,
) -> None:
    """The reply echoes every event as stored, a little larger than sent (ids,
    sequences, times): an append near the largest message would be stored,
    then answered by an error, on every retry. It is refused before anything
    is stored; the largest append whose reply fits gets its reply."""
    limit = 256 * 1024  # the server's largest message; the same rule at any size
    async with Harness(db_url, max_message_bytes=limit) as h:
        api = h.stubs()
        run_id = await new_run(api)
        count = 40

        def request(last_blob: int, blob: int) -> t.AppendTraceEventsRequest:
            events = [ev(f"k{i}", data={"blob": "x" * blob}) for i in range(count - 1)]
            events.append(ev(f"k{count - 1}", data={"blob": "x" * last_blob}))
            return t.AppendTraceEventsRequest(run_id=run_id, events=events)

        # A request of just under the limit (blobs of about 6 KB each).
        blob = (limit - 2048 - request(1000, 1000).ByteSize()) // count + 1000
        too_large = request(blob, blob)
        assert limit - 2048 - count < too_large.ByteSize() < limit - 1024, "it is accepted"
        _, info, _ = await expect_error(
            api.trace.AppendTraceEvents(too_large), grpc.StatusCode.RESOURCE_EXHAUSTED
        )
        assert info is not None and info.reason == "REPLY_TOO_LARGE"
        assert int(info.metadata["limit"]) == limit - 1024
        excess = int(info.metadata["bytes"]) - int(info.metadata["limit"])
        assert excess > 0
        assert await all_events(api, run_id) == [], "a refused append stores nothing"

        # The stored times differ from call to call, and a timestamp's encoded
        # size with them (a few bytes per event): the boundary is exact only
        # within that slack.
        slack = 8 * count
        await expect_error(
            api.trace.AppendTraceEvents(request(blob - excess + slack, blob)),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        )
        assert await all_events(api, run_id) == []
        largest = await api.trace.AppendTraceEvents(request(blob - excess - slack, blob))
        assert limit - 1024 - 2 * slack <= largest.ByteSize() <= limit - 1024
        assert [e.sequence for e in largest.events] == list(range(1, count + 1))
        assert len(await all_events(api, run_id)) == count

        # A retry names stored events, whose reply echoes them whole whatever
        # the retry holds: one more event would take it past the limit.
        retry = [ev(f"k{i}") for i in range(count)]
        again = await api.trace.AppendTraceEvents(
            t.AppendTraceEventsRequest(run_id=run_id, events=retry)
        )
        assert list(again.events) == list(largest.events)
        more = ev("new", data={"blob": "x" * (4 * slack)})
        _, info, _ = await expect_error(
            api.trace.AppendTraceEvents(
                t.AppendTraceEventsRequest(run_id=run_id, events=[*retry, more])
            ),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        )
        assert info is not None and info.reason == "REPLY_TOO_LARGE"
        assert len(await all_events(api, run_id)) == count, "the new event was not stored"


async def test_oversized_error_details_are_refused(api: Stubs) -> None:
    run_id = await new_run(api)
    big = c.ErrorDetail(message="boom", details="d" * (64 * 1024 + 1))
    _, _, v = await expect_error(
        api.trace.AppendTraceEvents(
            t.AppendTraceEventsRequest(run_id=run_id, events=[ev("e", error=big)])
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert [f for f, _ in v] == ["events[0].error.details"]
    fits = c.ErrorDetail(message="boom", details="d" * (64 * 1024))
    (stored,) = await append(api, run_id, ev("e", error=fits))
    assert stored.error.details == fits.details


async def test_append_to_an_ended_run_is_refused_and_stores_nothing(api: Stubs) -> None:
    run_id = await new_run(api)
    (before,) = await append(api, run_id, ev("before"))
    await api.jobs.CancelJob(j.CancelJobRequest(job_id=run_id))
    _, info, _ = await expect_error(
        api.trace.AppendTraceEvents(t.AppendTraceEventsRequest(run_id=run_id, events=[ev("late")])),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert info is not None and info.reason == "RUN_ENDED"
    assert info.metadata == {"run_id": run_id, "state": "CANCELLED"}
    # A retried append that was stored before the end gets its event back.
    (again,) = await append(api, run_id, ev("before"))
    assert again == before
    await expect_error(
        api.trace.AppendTraceEvents(
            t.AppendTraceEventsRequest(run_id=run_id, events=[ev("before"), ev("late")])
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    events = await all_events(api, run_id)
    assert [e.event_key for e in events] == ["before", ""]
    assert events[-1].message == "Run cancelled by user"
    # Workflows too.
    wf = (
        await api.jobs.SubmitWorkflow(
            j.SubmitWorkflowRequest(
                request_id="wf",
                name="w",
                steps=[c.WorkflowStepSpec(name="a", job=c.JobSpec(service="svc"))],
            )
        )
    ).workflow
    await api.jobs.CancelWorkflow(j.CancelWorkflowRequest(workflow_id=wf.id))
    _, info, _ = await expect_error(
        api.trace.AppendTraceEvents(t.AppendTraceEventsRequest(run_id=wf.id, events=[ev("x")])),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert info is not None and info.reason == "RUN_ENDED"


async def test_appends_racing_the_end_of_their_run_never_follow_the_final_event(
    harness: Harness,
) -> None:
    """An append and the transition that ends the run serialise on the run's lock:
    every accepted event is stored before the final one, and a stream that was
    following gets each of them and then the final status."""
    api = harness.stubs()
    raw = RawWorker(api)
    await raw.hello("w1", ["svc"], max_concurrency=10)
    for n in range(10):
        run_id = await new_run(api, f"race-{n}")
        await raw.expect("assignment")
        stream = api.trace.StreamTraceEvents(t.StreamTraceEventsRequest(run_id=run_id, follow=True))
        reader = asyncio.create_task(drain_stream(stream))

        async def appender(k: int, run_id: str = run_id) -> bool:
            try:
                await append(api, run_id, ev(f"e{k}"))
            except grpc.aio.AioRpcError as err:
                assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err
                return False
            return True

        appends = [asyncio.create_task(appender(k)) for k in range(8)]
        await raw.send(complete=w.CompleteReport(job_id=run_id, attempt=1))
        accepted = sum(await asyncio.gather(*appends))
        await raw.expect("ack")
        events = await all_events(api, run_id)
        assert events[-1].type == c.TRACE_EVENT_TYPE_COMPLETED, [e.event_key for e in events]
        assert len([e for e in events if e.event_key]) == accepted
        streamed, final, _ = await asyncio.wait_for(reader, 10)
        assert [e.sequence for e in streamed] == [e.sequence for e in events]
        assert final is not None and final.state == c.RUN_STATE_COMPLETED
    await raw.close()


async def test_appends_on_another_replica_racing_the_end_never_follow_the_final_event(
    pg_url: str,
) -> None:
    """Two replicas on one PostgreSQL: the run ends on A while B appends. B's
    check holds the run's row lock, so it sees the end or commits before it."""
    a, b = Harness(pg_url), Harness(pg_url)
    await a.start()
    await b.start()
    try:
        on_a, on_b = a.stubs(), b.stubs()
        raw = RawWorker(on_a)
        await raw.hello("w1", ["svc"], max_concurrency=20)
        for n in range(20):
            run_id = await new_run(on_b, f"race-{n}")
            await raw.expect("assignment")

            async def appender(k: int, run_id: str = run_id) -> None:
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await append(on_b, run_id, ev(f"e{k}"))

            appends = [asyncio.create_task(appender(k)) for k in range(6)]
            await raw.send(complete=w.CompleteReport(job_id=run_id, attempt=1))
            await asyncio.gather(*appends)
            await raw.expect("ack")
            events = await all_events(on_a, run_id)
            assert events[-1].type == c.TRACE_EVENT_TYPE_COMPLETED, [e.event_key for e in events]
        await raw.close()
    finally:
        await a.stop()
        await b.stop()


async def test_run_status_of_a_job_waiting_to_retry_is_running(harness: Harness) -> None:
    """DESIGN: retryable failures emit FAILED events while the run stays RUNNING."""
    api = harness.stubs()
    raw = RawWorker(api)
    await raw.hello("w1", ["svc"])
    run_id = (
        await api.jobs.SubmitJob(
            j.SubmitJobRequest(
                request_id="retry",
                job=c.JobSpec(
                    service="svc",
                    max_attempts=3,
                    backoff=c.BackoffPolicy(initial_interval={"seconds": 3600}),
                ),
            )
        )
    ).job.id
    status = (await api.trace.GetRunStatus(t.GetRunStatusRequest(run_id=run_id))).status
    assert status.state in (c.RUN_STATE_QUEUED, c.RUN_STATE_RUNNING)
    await raw.expect("assignment")
    await raw.send(
        fail=w.FailReport(
            job_id=run_id, attempt=1, retryable=True, error=c.ErrorDetail(message="flaky")
        )
    )
    await raw.expect("ack")
    job = (await api.jobs.GetJob(j.GetJobRequest(job_id=run_id))).job
    assert job.state == c.RUN_STATE_QUEUED, "the job itself waits for its next attempt"
    status = (await api.trace.GetRunStatus(t.GetRunStatusRequest(run_id=run_id))).status
    assert status.state == c.RUN_STATE_RUNNING, "the run has started and goes on"
    assert not status.HasField("completed_at")
    await raw.close()


async def test_run_status_of_a_job_never_started_is_queued(api: Stubs) -> None:
    run_id = await new_run(api)
    status = (await api.trace.GetRunStatus(t.GetRunStatusRequest(run_id=run_id))).status
    assert status.state == c.RUN_STATE_QUEUED


async def test_following_stream_ends_unavailable_when_the_server_shuts_down(
    harness: Harness,
) -> None:
    api = harness.stubs()
    run_id = await new_run(api)
    await append(api, run_id, ev("a"), ev("b"))
    stream = api.trace.StreamTraceEvents(t.StreamTraceEventsRequest(run_id=run_id, follow=True))
    cursor = ""
    for _ in range(2):
        message = await stream.read()
        cursor = message.cursor
    assert harness.server is not None
    stopping = asyncio.create_task(harness.server.stop(grace=2.0))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        while True:
            message = await stream.read()
            assert message is not grpc.aio.EOF, "ended with an empty OK"
            assert message.WhichOneof("kind") == "keepalive", message
    err = caught.value
    assert err.code() == grpc.StatusCode.UNAVAILABLE, err
    assert "resume from your cursor" in (err.details() or "")
    await stopping
    harness.server = None
    # The reader resumes from its cursor on the restarted server and misses nothing.
    await harness.start()
    api = harness.stubs()
    await append(api, run_id, ev("c"))
    await api.jobs.CancelJob(j.CancelJobRequest(job_id=run_id))
    resumed, final, _ = await drain_stream(
        api.trace.StreamTraceEvents(
            t.StreamTraceEventsRequest(run_id=run_id, cursor=cursor, follow=True)
        )
    )
    assert [e.sequence for e in resumed] == [3, 4]
    assert final is not None and final.state == c.RUN_STATE_CANCELLED


async def test_long_message_is_stored_truncated(api: Stubs) -> None:
    run_id = await new_run(api)
    (stored,) = await append(api, run_id, ev("long", "x" * 20_000))
    assert stored.truncated and len(stored.message) == 10 * 1024
    (short,) = await append(api, run_id, ev("short", "fine"))
    assert not short.truncated


async def test_concurrent_appends_get_gapless_unique_sequences(harness: Harness) -> None:
    api = harness.stubs()
    raw = RawWorker(api)
    await raw.hello("w1", ["svc"])
    run_id = await new_run(api)
    await raw.expect("assignment")
    extra = [stubs_for(grpc.aio.insecure_channel(harness.target)) for _ in range(3)]

    async def appender(stubs: Stubs, name: str) -> None:
        for batch in range(10):
            await append(stubs, run_id, *(ev(f"{name}-{batch}-{i}") for i in range(5)))

    async def worker_reports() -> None:
        for batch in range(10):
            await raw.send(
                trace=w.TraceReport(
                    job_id=run_id,
                    attempt=1,
                    events=[c.TraceEvent(message=f"log {batch}-{i}") for i in range(5)],
                )
            )

    await asyncio.gather(*(appender(s, f"s{i}") for i, s in enumerate(extra)), worker_reports())
    total = 1 + 3 * 50 + 50  # STARTED + appends + worker events

    async def stored() -> list[c.TraceEvent] | None:
        events = await all_events(api, run_id)
        return events if len(events) >= total else None

    events = await wait_for(stored, timeout=10)
    assert [e.sequence for e in events] == list(range(1, total + 1))
    keys = [e.event_key for e in events if e.event_key]
    assert len(keys) == len(set(keys)) == 150
    worker_events = [e for e in events if e.message.startswith("log ")]
    assert len(worker_events) == 50 and all(e.worker_id == "w1" for e in worker_events)
    for s in extra:
        await s.channel.close()
    await raw.close()


async def test_every_filter(api: Stubs) -> None:
    run_id = await new_run(api)
    base = time.time_ns()

    def at(offset_s: int) -> Any:
        ts = c.TraceEvent().timestamp
        ts.FromNanoseconds(base + offset_s * 1_000_000_000)
        return ts

    await append(
        api,
        run_id,
        ev("d", level=c.LEVEL_DEBUG, node_id="a", timestamp=at(0)),
        ev("i", level=c.LEVEL_INFO, category=c.CATEGORY_BUSINESS, node_id="b", timestamp=at(10)),
        ev("w", level=c.LEVEL_WARN, milestone=True, node_id="a", timestamp=at(20)),
        ev("e", level=c.LEVEL_ERROR, node_id="b", timestamp=at(30)),
    )

    async def keys(**f: Any) -> list[str]:
        return [e.event_key for e in await all_events(api, run_id, **f)]

    assert await keys() == ["d", "i", "w", "e"]
    assert await keys(min_level=c.LEVEL_WARN) == ["w", "e"]
    assert await keys(category=c.CATEGORY_BUSINESS) == ["i"]
    assert await keys(category=c.CATEGORY_TECHNICAL) == ["d", "w", "e"]
    assert await keys(node_id="a") == ["d", "w"]
    # Callers append LOG events only (the type filter over lifecycle events is
    # checked where a worker's failures record them).
    assert await keys(type=c.TRACE_EVENT_TYPE_LOG) == ["d", "i", "w", "e"]
    assert await keys(type=c.TRACE_EVENT_TYPE_FAILED) == []
    assert await keys(since=at(10), until=at(30)) == ["i", "w"]
    assert await keys(milestones_only=True) == ["w"]
    assert await keys(node_id="b", min_level=c.LEVEL_ERROR) == ["e"]
    await expect_error(
        api.trace.ListTraceEvents(
            t.ListTraceEventsRequest(run_id=run_id, since=at(5), until=at(1))
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )


async def test_cursor_pages_cover_the_run_exactly_once(api: Stubs) -> None:
    run_id = await new_run(api)
    await append(api, run_id, *(ev(f"k{i:03}") for i in range(57)))
    seen: list[int] = []
    cursor = ""
    while True:
        page = await api.trace.ListTraceEvents(
            t.ListTraceEventsRequest(run_id=run_id, cursor=cursor, page_size=10)
        )
        seen += [e.sequence for e in page.events]
        cursor = page.next_cursor
        if not page.more:
            break
    assert seen == list(range(1, 58))
    # The last cursor resumes after the end: later events appear, nothing repeats.
    await append(api, run_id, ev("later"))
    page = await api.trace.ListTraceEvents(t.ListTraceEventsRequest(run_id=run_id, cursor=cursor))
    assert [e.event_key for e in page.events] == ["later"]
    other = await new_run(api, "other")
    for bad in ("junk", cursor):
        _, _, v = await expect_error(
            api.trace.ListTraceEvents(t.ListTraceEventsRequest(run_id=other, cursor=bad)),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert [f for f, _ in v] == ["cursor"]
    await expect_error(
        api.trace.ListTraceEvents(t.ListTraceEventsRequest(run_id=run_id, page_size=5000)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    await expect_error(
        api.trace.ListTraceEvents(t.ListTraceEventsRequest(run_id="wf_nope")),
        grpc.StatusCode.NOT_FOUND,
    )


async def test_cut_stream_resumes_from_its_cursor_without_gap_or_duplicate(api: Stubs) -> None:
    run_id = await new_run(api)
    await append(api, run_id, *(ev(f"a{i}") for i in range(20)))
    stream = api.trace.StreamTraceEvents(t.StreamTraceEventsRequest(run_id=run_id, follow=True))
    got: list[int] = []
    cursor = ""
    async for message in stream:
        got.append(message.event.sequence)
        cursor = message.cursor
        if len(got) == 7:
            break
    stream.cancel()
    await append(api, run_id, *(ev(f"b{i}") for i in range(10)))
    await api.jobs.CancelJob(j.CancelJobRequest(job_id=run_id))  # ends the run
    resumed = api.trace.StreamTraceEvents(
        t.StreamTraceEventsRequest(run_id=run_id, cursor=cursor, follow=True)
    )
    events, final, _ = await drain_stream(resumed)
    got += [e.sequence for e in events]
    assert got == list(range(1, 32))
    assert final is not None and final.state == c.RUN_STATE_CANCELLED


async def test_stream_opened_before_the_run_starts_follows_it_to_the_end(
    harness: Harness,
) -> None:
    api = harness.stubs()
    run_id = await new_run(api)
    stream = api.trace.StreamTraceEvents(t.StreamTraceEventsRequest(run_id=run_id, follow=True))
    collector = asyncio.create_task(drain_stream(stream))
    assert harness.server is not None
    await wait_for(lambda: harness.server.trace.bus.subscriber_count == 1)
    raw = RawWorker(api)
    await raw.hello("w1", ["svc"])
    await raw.expect("assignment")
    for pct in (20, 40):
        await raw.send(progress=w.ProgressReport(job_id=run_id, attempt=1, percent=pct))
    await raw.send(complete=w.CompleteReport(job_id=run_id, attempt=1))
    events, final, _cursor = await asyncio.wait_for(collector, 10)
    assert [e.type for e in events] == [
        c.TRACE_EVENT_TYPE_STARTED,
        c.TRACE_EVENT_TYPE_PROGRESS,
        c.TRACE_EVENT_TYPE_PROGRESS,
        c.TRACE_EVENT_TYPE_COMPLETED,
    ]
    assert final is not None and final.state == c.RUN_STATE_COMPLETED
    assert final.progress.completed_actions == 1 and final.history_length == 4
    await wait_for(lambda: harness.server.trace.bus.subscriber_count == 0)
    await raw.close()


async def test_stream_after_the_end_replays_then_closes_with_final_status(api: Stubs) -> None:
    run_id = await new_run(api)
    await append(api, run_id, ev("x"))
    await api.jobs.CancelJob(j.CancelJobRequest(job_id=run_id))
    for follow in (True, False):
        stream = api.trace.StreamTraceEvents(
            t.StreamTraceEventsRequest(run_id=run_id, follow=follow)
        )
        events, final, _ = await drain_stream(stream)
        assert [e.event_key for e in events][:1] == ["x"] and len(events) == 2
        assert final is not None and final.state == c.RUN_STATE_CANCELLED


async def test_stream_without_follow_ends_after_the_replay(api: Stubs) -> None:
    run_id = await new_run(api)
    await append(api, run_id, ev("x"), ev("y"))
    stream = api.trace.StreamTraceEvents(t.StreamTraceEventsRequest(run_id=run_id, follow=False))
    events, final, cursor = await asyncio.wait_for(drain_stream(stream), 5)
    assert [e.event_key for e in events] == ["x", "y"] and final is None and cursor


async def test_stream_filters_apply_live(api: Stubs) -> None:
    run_id = await new_run(api)
    stream = api.trace.StreamTraceEvents(
        t.StreamTraceEventsRequest(run_id=run_id, follow=True, min_level=c.LEVEL_WARN)
    )
    collector = asyncio.create_task(drain_stream(stream))
    await append(api, run_id, ev("info"), ev("warn", level=c.LEVEL_WARN))
    await api.jobs.CancelJob(j.CancelJobRequest(job_id=run_id))
    events, final, _ = await asyncio.wait_for(collector, 10)
    assert [e.event_key or e.message for e in events] == ["warn", "Run cancelled by user"]
    assert final is not None


async def test_five_hundred_streams_each_receive_every_event_in_order(harness: Harness) -> None:
    api = harness.stubs()
    run_id = await new_run(api)
    channels = [grpc.aio.insecure_channel(harness.target) for _ in range(5)]
    streams = [
        stubs_for(channels[i % 5]).trace.StreamTraceEvents(
            t.StreamTraceEventsRequest(run_id=run_id, follow=True)
        )
        for i in range(500)
    ]
    collectors = [asyncio.create_task(drain_stream(s)) for s in streams]
    assert harness.server is not None
    await wait_for(lambda: harness.server.trace.bus.subscriber_count == 500, timeout=30)
    for batch in range(10):
        await append(api, run_id, *(ev(f"e{batch}-{i}") for i in range(10)))
    await api.jobs.CancelJob(j.CancelJobRequest(job_id=run_id))
    results = await asyncio.wait_for(asyncio.gather(*collectors), 60)
    expected = list(range(1, 102))
    for events, final, _ in results:
        assert [e.sequence for e in events] == expected
        assert final is not None and final.state == c.RUN_STATE_CANCELLED
    for ch in channels:
        await ch.close()


async def test_a_stalled_reader_neither_stalls_others_nor_grows_without_bound(
    harness: Harness,
) -> None:
    from jobtrace.events.trace_bus import SUBSCRIBER_BUFFER

    api = harness.stubs()
    run_id = await new_run(api)
    stalled_channel = grpc.aio.insecure_channel(harness.target)
    stalled = stubs_for(stalled_channel).trace.StreamTraceEvents(
        t.StreamTraceEventsRequest(run_id=run_id, follow=True)
    )
    healthy = api.trace.StreamTraceEvents(t.StreamTraceEventsRequest(run_id=run_id, follow=True))
    collector = asyncio.create_task(drain_stream(healthy))
    assert harness.server is not None
    bus = harness.server.trace.bus
    await wait_for(lambda: bus.subscriber_count == 2)
    payload = "p" * 2000
    for batch in range(30):
        await append(api, run_id, *(ev(f"k{batch}-{i}", payload) for i in range(100)))
        for subs in bus._subs.values():
            assert all(len(s._events) <= SUBSCRIBER_BUFFER for s in subs)
    await api.jobs.CancelJob(j.CancelJobRequest(job_id=run_id))
    events, final, _ = await asyncio.wait_for(collector, 30)
    assert len(events) == 3001 and final is not None
    # The stalled reader, once it reads, still gets everything in order.
    late, late_final, _ = await asyncio.wait_for(drain_stream(stalled), 60)
    assert [e.sequence for e in late] == list(range(1, 3002))
    assert late_final is not None
    await stalled_channel.close()


async def test_resume_after_a_server_restart(harness: Harness) -> None:
    api = harness.stubs()
    run_id = await new_run(api)
    await append(api, run_id, *(ev(f"a{i}") for i in range(5)))
    page = await api.trace.ListTraceEvents(t.ListTraceEventsRequest(run_id=run_id, page_size=3))
    await harness.stop()
    await harness.start()
    api = harness.stubs()
    await append(api, run_id, ev("after-restart"))
    stream = api.trace.StreamTraceEvents(
        t.StreamTraceEventsRequest(run_id=run_id, cursor=page.next_cursor, follow=False)
    )
    events, _, _ = await drain_stream(stream)
    assert [e.sequence for e in events] == [4, 5, 6]
    assert events[-1].event_key == "after-restart"


async def test_idle_stream_gets_keepalives(db_url: str) -> None:
    h = Harness(db_url, keepalive_seconds=0.1)
    await h.start()
    try:
        api = h.stubs()
        run_id = await new_run(api)
        stream = api.trace.StreamTraceEvents(t.StreamTraceEventsRequest(run_id=run_id, follow=True))
        kinds = []
        async for message in stream:
            kinds.append(message.WhichOneof("kind"))
            if len(kinds) == 2:
                break
        assert kinds == ["keepalive", "keepalive"]
        stream.cancel()
    finally:
        await h.stop()


async def test_run_status_of_a_workflow(harness: Harness) -> None:
    api = harness.stubs()
    wf = (
        await api.jobs.SubmitWorkflow(
            j.SubmitWorkflowRequest(
                request_id="wf",
                name="w",
                steps=[
                    c.WorkflowStepSpec(name="a", job=c.JobSpec(service="svc")),
                    c.WorkflowStepSpec(name="b", job=c.JobSpec(service="svc")),
                ],
            )
        )
    ).workflow
    raw = RawWorker(api)
    await raw.hello("w1", ["svc"])
    a = await raw.expect("assignment")
    await raw.send(complete=w.CompleteReport(job_id=a.job.id, attempt=1))
    await raw.expect("assignment")
    status = (await api.trace.GetRunStatus(t.GetRunStatusRequest(run_id=wf.id))).status
    assert status.state == c.RUN_STATE_RUNNING and status.HasField("started_at")
    assert (status.progress.completed_actions, status.progress.total_actions) == (1, 2)
    # a's start, the workflow's (its first step's), a's end, the workflow's
    # progress (1 of 2 steps), b's start.
    assert status.history_length == 5 and status.service == ""
    nodes = [e.node_id for e in await all_events(api, wf.id)]
    assert nodes == ["a", "workflow", "a", "workflow", "b"]
    _, info, _ = await expect_error(
        api.trace.GetRunStatus(t.GetRunStatusRequest(run_id=a.job.id)), grpc.StatusCode.NOT_FOUND
    )
    assert info is not None and info.metadata["workflow_id"] == wf.id
    await raw.close()


async def test_worker_trace_for_a_stale_attempt_is_refused(harness: Harness) -> None:
    api = harness.stubs()
    raw = RawWorker(api)
    await raw.hello("w1", ["svc"])
    run_id = await new_run(api)
    await raw.expect("assignment")
    await raw.send(
        trace=w.TraceReport(job_id=run_id, attempt=0, events=[c.TraceEvent(message="x")])
    )
    error = await raw.expect("error")
    assert error.reason == "STALE_ATTEMPT"
    out = c.TraceEvent(message="out")
    out.data.update({"stream": "stdout"})
    await raw.send(trace=w.TraceReport(job_id=run_id, attempt=1, events=[out]))
    await raw.expect("ack")
    events = await all_events(api, run_id)
    assert [e.message for e in events][1:] == ["out"] and events[1].data["stream"] == "stdout"
    await raw.close()


LIFECYCLE_TYPES = [
    c.TRACE_EVENT_TYPE_STARTED,
    c.TRACE_EVENT_TYPE_COMPLETED,
    c.TRACE_EVENT_TYPE_FAILED,
]


async def test_callers_cannot_append_lifecycle_or_progress_events(harness: Harness) -> None:
    """Lifecycle event types are the server's alone: a submitter appending
    STARTED, COMPLETED, FAILED (or PROGRESS, which only the holding worker
    reports) is refused with the field, and nothing is stored."""
    api = harness.stubs()
    run_id = await new_run(api)
    await append(api, run_id, ev("first"))
    for kind in [*LIFECYCLE_TYPES, c.TRACE_EVENT_TYPE_PROGRESS]:
        _, _, violations = await expect_error(
            api.trace.AppendTraceEvents(
                t.AppendTraceEventsRequest(
                    run_id=run_id, events=[ev("ok"), ev("forged", "done", type=kind)]
                )
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        fields = dict(violations)
        assert list(fields) == ["events[1].type"], violations
        assert "server's own" in fields["events[1].type"] and "LOG" in fields["events[1].type"]
    assert [e.event_key for e in await all_events(api, run_id)] == ["first"]
    job = await api.jobs.GetJob(j.GetJobRequest(job_id=run_id))
    assert job.job.state == c.RUN_STATE_QUEUED
    # LOG, and no type (which means LOG), are what callers append.
    stored = await append(api, run_id, ev("log", type=c.TRACE_EVENT_TYPE_LOG), ev("default"))
    assert [e.type for e in stored] == [c.TRACE_EVENT_TYPE_LOG] * 2


async def test_worker_trace_reports_may_not_claim_lifecycle_events(harness: Harness) -> None:
    """The holding worker reports LOG and PROGRESS events; a report typed
    STARTED, COMPLETED or FAILED is refused with the field, the stream and the
    lease survive, and the run is untouched."""
    api = harness.stubs()
    raw = RawWorker(api)
    await raw.hello("w1", ["svc"])
    run_id = await new_run(api)
    await raw.expect("assignment")
    for kind in LIFECYCLE_TYPES:
        await raw.send(
            trace=w.TraceReport(
                job_id=run_id,
                attempt=1,
                events=[c.TraceEvent(message="fine"), c.TraceEvent(message="done", type=kind)],
            )
        )
        error = await raw.expect("error")
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], error
        assert "trace.events[1].type" in error.message and not error.fatal, error
        assert error.job_id == run_id
    status = (await api.trace.GetRunStatus(t.GetRunStatusRequest(run_id=run_id))).status
    assert status.state == c.RUN_STATE_RUNNING
    assert [e.type for e in await all_events(api, run_id)] == [c.TRACE_EVENT_TYPE_STARTED]
    await raw.send(
        trace=w.TraceReport(
            job_id=run_id,
            attempt=1,
            events=[
                c.TraceEvent(message="half", type=c.TRACE_EVENT_TYPE_PROGRESS, percent=50),
                c.TraceEvent(message="line", type=c.TRACE_EVENT_TYPE_LOG),
            ],
        )
    )
    await raw.expect("ack")
    assert [e.type for e in await all_events(api, run_id)] == [
        c.TRACE_EVENT_TYPE_STARTED,
        c.TRACE_EVENT_TYPE_PROGRESS,
        c.TRACE_EVENT_TYPE_LOG,
    ]
    await raw.close()


async def test_retention_sweep_deletes_old_events(harness: Harness) -> None:
    api = harness.stubs()
    run_id = await new_run(api)
    for batch in range(5):
        await append(api, run_id, *(ev(f"k{batch}-{i}") for i in range(500)))
    assert harness.server is not None
    trace = harness.server.trace
    trace.retention_s = 3600.0
    assert await trace.sweep_once() == 0
    trace.retention_s = -1.0  # everything is older than "now + 1 s"
    assert await trace.sweep_once(batch=1000) == 2500
    assert await all_events(api, run_id) == []
    # The sequence keeps counting: a pruned run never reuses a number.
    (later,) = await append(api, run_id, ev("later"))
    assert later.sequence == 2501


@pytest.mark.parametrize("follow", [True, False])
async def test_stream_of_unknown_run_is_not_found(api: Stubs, follow: bool) -> None:
    stream = api.trace.StreamTraceEvents(t.StreamTraceEventsRequest(run_id="job_x", follow=follow))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stream.read()
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


# --- display priority: 1 low, 10 high (the execution-log spec) ----------------------


async def test_display_priority_is_one_low_to_ten_high_and_filters_lists(
    harness: Harness,
) -> None:
    api = harness.stubs()
    raw = RawWorker(api)
    await raw.hello("w1", ["svc"])
    run_id = await new_run(api)
    await raw.expect("assignment")
    await raw.send(progress=w.ProgressReport(job_id=run_id, attempt=1, percent=50))
    await raw.expect("ack")
    await append(
        api,
        run_id,
        ev("low", display_priority=1),
        ev("default"),
        ev("high", display_priority=10),
    )
    await raw.send(complete=w.CompleteReport(job_id=run_id, attempt=1))
    await raw.expect("ack")
    events = await all_events(api, run_id)
    by = {e.event_key or c.TraceEventType.Name(e.type): e.display_priority for e in events}
    assert by == {
        "TRACE_EVENT_TYPE_STARTED": 7,
        "TRACE_EVENT_TYPE_PROGRESS": 5,
        "low": 1,
        "default": 5,
        "high": 10,
        "TRACE_EVENT_TYPE_COMPLETED": 9,
    }, "the run's outcome ranks above its start, above ordinary progress"

    async def names(**f: Any) -> list[str]:
        return [
            e.event_key or c.TraceEventType.Name(e.type) for e in await all_events(api, run_id, **f)
        ]

    assert await names(min_display_priority=0) == list(by)
    assert await names(min_display_priority=1) == list(by)
    assert await names(min_display_priority=6) == [
        "TRACE_EVENT_TYPE_STARTED",
        "high",
        "TRACE_EVENT_TYPE_COMPLETED",
    ]
    assert await names(min_display_priority=9) == ["high", "TRACE_EVENT_TYPE_COMPLETED"]
    assert await names(min_display_priority=10) == ["high"]
    assert await names(min_display_priority=6, min_level=c.LEVEL_INFO, milestones_only=True) == [
        "TRACE_EVENT_TYPE_STARTED",
        "TRACE_EVENT_TYPE_COMPLETED",
    ]
    # Paged one event at a time, the cursor resumes after each filtered event:
    # the same events, none twice.
    seen: list[int] = []
    cursor = ""
    while True:
        page = await api.trace.ListTraceEvents(
            t.ListTraceEventsRequest(
                run_id=run_id, cursor=cursor, page_size=1, min_display_priority=6
            )
        )
        seen += [e.sequence for e in page.events]
        cursor = page.next_cursor
        if not page.more:
            break
    assert seen == [e.sequence for e in events if e.display_priority >= 6]
    await raw.close()


async def test_stream_filters_by_display_priority_in_replay_live_and_resume(
    harness: Harness,
) -> None:
    api = harness.stubs()
    run_id = await new_run(api)
    await append(api, run_id, ev("r1", display_priority=2), ev("r2", display_priority=8))
    stream = api.trace.StreamTraceEvents(
        t.StreamTraceEventsRequest(run_id=run_id, follow=True, min_display_priority=8)
    )
    first = await anext(aiter(stream))
    assert first.event.event_key == "r2"
    stream.cancel()
    await append(
        api,
        run_id,
        ev("l1", display_priority=3),
        ev("l2", display_priority=9),
        ev("l3"),
    )
    # Resumed from the cursor of r2 with the same filter: the rest, live too.
    resumed = api.trace.StreamTraceEvents(
        t.StreamTraceEventsRequest(
            run_id=run_id, cursor=first.cursor, follow=True, min_display_priority=8
        )
    )
    collector = asyncio.create_task(drain_stream(resumed))
    assert harness.server is not None
    await wait_for(lambda: harness.server.trace.bus.subscriber_count == 1)
    await append(api, run_id, ev("l4", display_priority=8), ev("l5", display_priority=7))
    await api.jobs.CancelJob(j.CancelJobRequest(job_id=run_id))
    events, final, _ = await asyncio.wait_for(collector, 10)
    # The cancellation is the run's outcome: 9.
    assert [e.event_key or e.message for e in events] == ["l2", "l4", "Run cancelled by user"]
    assert [e.display_priority for e in events] == [9, 8, 9]
    assert final is not None and final.state == c.RUN_STATE_CANCELLED


@pytest.mark.parametrize("bad", [-1, 11, 1000])
async def test_min_display_priority_out_of_range_is_refused_before_anything(
    harness: Harness, bad: int
) -> None:
    api = harness.stubs()
    run_id = await new_run(api)
    await append(api, run_id, ev("a"))
    _, _, violations = await expect_error(
        api.trace.ListTraceEvents(
            t.ListTraceEventsRequest(run_id=run_id, min_display_priority=bad)
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert [f for f, _ in violations] == ["min_display_priority"]
    assert "1 (low)" in violations[0][1] and "10 (high)" in violations[0][1]
    # Checked before the run is even looked up: an unknown run says the same.
    _, _, violations = await expect_error(
        api.trace.ListTraceEvents(
            t.ListTraceEventsRequest(run_id="job_nope", min_display_priority=bad)
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert [f for f, _ in violations] == ["min_display_priority"]
    for follow in (True, False):
        _, _, violations = await expect_error(
            _first(
                api.trace.StreamTraceEvents(
                    t.StreamTraceEventsRequest(
                        run_id=run_id, follow=follow, min_display_priority=bad
                    )
                )
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert [f for f, _ in violations] == ["min_display_priority"]
    assert harness.server is not None
    assert harness.server.trace.bus.subscriber_count == 0
    _, _, violations = await expect_error(
        api.trace.AppendTraceEvents(
            t.AppendTraceEventsRequest(run_id=run_id, events=[ev("p", display_priority=bad)])
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert [f for f, _ in violations] == ["events[0].display_priority"]
    assert [e.event_key for e in await all_events(api, run_id)] == ["a"]


async def _first(call: Any) -> Any:
    async for message in call:
        return message
    return None


# --- started_at: the run's first start; attempt_started_at: the current attempt's ------


async def test_run_started_at_is_the_first_start_whatever_retries_follow(
    harness: Harness,
) -> None:
    api = harness.stubs()
    run_id = (
        await api.jobs.SubmitJob(
            j.SubmitJobRequest(
                request_id="twice",
                job=c.JobSpec(
                    service="svc",
                    max_attempts=2,
                    backoff=c.BackoffPolicy(initial_interval={"nanos": 1_000_000}),
                ),
            )
        )
    ).job.id

    async def job() -> c.Job:
        return (await api.jobs.GetJob(j.GetJobRequest(job_id=run_id))).job

    async def status() -> t.RunStatus:
        return (await api.trace.GetRunStatus(t.GetRunStatusRequest(run_id=run_id))).status

    queued = await status()
    assert not queued.HasField("started_at") and not queued.HasField("attempt_started_at")
    assert not (await job()).HasField("first_started_at")
    raw = RawWorker(api)
    await raw.hello("w1", ["svc"])
    await raw.expect("assignment")
    one = await job()
    first = one.started_at.ToMicroseconds()
    assert first and one.first_started_at.ToMicroseconds() == first
    s = await status()
    assert s.started_at.ToMicroseconds() == s.attempt_started_at.ToMicroseconds() == first
    await raw.send(
        fail=w.FailReport(
            job_id=run_id, attempt=1, retryable=True, error=c.ErrorDetail(message="flaky")
        )
    )
    await raw.expect("ack")
    await raw.expect("assignment")
    two = await job()
    second = two.started_at.ToMicroseconds()
    assert two.attempt == 2 and second > first
    await raw.send(complete=w.CompleteReport(job_id=run_id, attempt=2))
    await raw.expect("ack")
    done = await job()
    assert done.state == c.RUN_STATE_COMPLETED
    assert done.first_started_at.ToMicroseconds() == first
    assert done.started_at.ToMicroseconds() == second
    s = await status()
    assert s.started_at.ToMicroseconds() == first, "the run's first start"
    assert s.attempt_started_at.ToMicroseconds() == second, "the last attempt's start"
    _, final, _ = await drain_stream(
        api.trace.StreamTraceEvents(t.StreamTraceEventsRequest(run_id=run_id))
    )
    assert final is not None
    assert final.started_at.ToMicroseconds() == first
    assert final.attempt_started_at.ToMicroseconds() == second
    await raw.close()


async def test_workflow_run_status_has_no_attempt_start(harness: Harness) -> None:
    api = harness.stubs()
    raw = RawWorker(api)
    await raw.hello("w1", ["svc"])
    wf = await api.jobs.SubmitWorkflow(
        j.SubmitWorkflowRequest(
            request_id="wf",
            name="wf",
            steps=[c.WorkflowStepSpec(name="a", job=c.JobSpec(service="svc"))],
        )
    )
    await raw.expect("assignment")
    s = (await api.trace.GetRunStatus(t.GetRunStatusRequest(run_id=wf.workflow.id))).status
    assert s.HasField("started_at") and not s.HasField("attempt_started_at")
    await raw.close()


async def test_first_start_of_jobs_started_before_the_upgrade_is_backfilled(
    db_url: str,
) -> None:
    """Jobs record their first start since revision 0007; a job started before
    it takes its current attempt's start as its first."""
    from .test_worker_stream import migrate_down

    h = Harness(db_url)
    await h.start()
    raw = RawWorker(h.stubs())
    await raw.hello("w", ["svc"])
    run_id = await new_run(h.stubs(), "old")
    await raw.expect("assignment")
    started = (await h.stubs().jobs.GetJob(j.GetJobRequest(job_id=run_id))).job.started_at
    await raw.close()
    await h.stop()
    await migrate_down(db_url, "0006")
    await h.start()  # migrates up again
    try:
        api = h.stubs()
        job = (await api.jobs.GetJob(j.GetJobRequest(job_id=run_id))).job
        assert job.first_started_at == started
        s = (await api.trace.GetRunStatus(t.GetRunStatusRequest(run_id=run_id))).status
        assert s.started_at == started
        never = await new_run(api, "new")
        assert not (await api.jobs.GetJob(j.GetJobRequest(job_id=never))).job.HasField(
            "first_started_at"
        )
    finally:
        await h.stop()
