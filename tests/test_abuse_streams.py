"""Hostile stream and connection behaviour against a real server: readers that
stop reading."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2

from jobtrace.pb import common_pb2 as c
from jobtrace.pb import job_service_pb2 as j
from jobtrace.pb import trace_service_pb2 as t
from jobtrace.pb import worker_service_pb2 as w
from jobtrace.server import JobtraceServer

from .conftest import Harness, Stubs, error_details, stubs_for, wait_for
from .workers import RawWorker

# A client that advertises a small HTTP/2 window and never widens it: once a
# message larger than the window is on its way, the server's next write waits
# until the client reads.
SMALL_WINDOW = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]
STALL_S = 0.5


@contextlib.asynccontextmanager
async def slow_reader(harness: Harness) -> AsyncIterator[Stubs]:
    async with grpc.aio.insecure_channel(harness.target, options=SMALL_WINDOW) as channel:
        yield stubs_for(channel)


def big_payload(kib: int) -> struct_pb2.Struct:
    payload = struct_pb2.Struct()
    payload.update({"blob": "x" * (kib * 1024)})
    return payload


async def expect_stalled(call: Any) -> list[Any]:
    """Read what the server sent before it gave up, then its status."""
    received: list[Any] = []
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        while True:
            message = await asyncio.wait_for(call.read(), 20)
            assert message is not grpc.aio.EOF, "the stream ended OK, not stalled"
            received.append(message)
    err = ended.value
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (err.code(), err.details())
    assert f"reader stalled for {STALL_S:g} s" in (err.details() or "")
    info, _ = error_details(err)
    assert info is not None and info.reason == "READER_STALLED"
    return received


def open_streams(server: JobtraceServer | None) -> int:
    assert server is not None
    return server.streams.open_streams()


async def test_a_trace_stream_whose_reader_stalls_is_ended_and_released(db_url: str) -> None:
    async with Harness(db_url, stream_stall_seconds=STALL_S) as h:
        assert h.server is not None
        bus = h.server.trace.bus
        api = h.stubs()
        job = await api.jobs.SubmitJob(
            j.SubmitJobRequest(request_id="r", job=c.JobSpec(service="svc"))
        )
        run_id = job.job.id
        async with slow_reader(h) as slow:
            call = slow.trace.StreamTraceEvents(
                t.StreamTraceEventsRequest(run_id=run_id, follow=True)
            )
            await wait_for(lambda: bus.subscriber_count == 1, timeout=20)
            # Events far larger than the reader's window, which it never reads.
            events = [
                c.TraceEvent(event_key=f"k{i}", message=f"{i:04} " + "m" * 8000) for i in range(20)
            ]
            await api.trace.AppendTraceEvents(
                t.AppendTraceEventsRequest(run_id=run_id, events=events)
            )
            # The server gives up on the reader and releases its subscription and slot.
            await wait_for(lambda: bus.subscriber_count == 0 and open_streams(h.server) == 0, 20)
            # Reading again, the reader gets what was already on its way, then the status.
            received = await expect_stalled(call)
            assert 0 < len(received) < len(events)
            assert [m.event.event_key for m in received] == [f"k{i}" for i in range(len(received))]
            # Its cursor resumes exactly after the last event it got.
            cursor = received[-1].cursor
        resumed = api.trace.StreamTraceEvents(
            t.StreamTraceEventsRequest(run_id=run_id, cursor=cursor, follow=False)
        )
        rest = [m.event.event_key async for m in resumed if m.WhichOneof("kind") == "event"]
        assert rest == [f"k{i}" for i in range(len(received), len(events))]


async def test_a_job_watch_whose_reader_stalls_is_ended_and_released(db_url: str) -> None:
    async with Harness(db_url, stream_stall_seconds=STALL_S) as h:
        assert h.server is not None
        feed = h.server.jobs.feed
        api = h.stubs()
        job = await api.jobs.SubmitJob(
            j.SubmitJobRequest(
                request_id="r", job=c.JobSpec(service="svc", payload=big_payload(256))
            )
        )
        async with slow_reader(h) as slow:
            call = slow.jobs.WatchJob(j.WatchJobRequest(job_id=job.job.id))
            await wait_for(lambda: feed.subscribers_by_kind()["job"] == 1, timeout=20)
            await api.jobs.CancelJob(j.CancelJobRequest(job_id=job.job.id))
            await wait_for(
                lambda: feed.subscribers_by_kind()["job"] == 0 and open_streams(h.server) == 0,
                timeout=20,
            )
            received = await expect_stalled(call)
            assert len(received) < 2  # the cancellation never reached it


async def test_a_worker_that_stops_reading_loses_its_session(db_url: str) -> None:
    """The worker stream's outgoing side has the same deadline: a worker that
    takes no message (here an assignment larger than its window) is
    disconnected, and its job goes to a worker that reads."""
    async with Harness(db_url, stream_stall_seconds=STALL_S, heartbeat_seconds=1.0) as h:
        assert h.server is not None
        scheduler = h.server.scheduler
        api = h.stubs()
        async with slow_reader(h) as slow:
            stalled = RawWorker(slow)
            await stalled.hello("stalled", ["svc"])
            job = await api.jobs.SubmitJob(
                j.SubmitJobRequest(
                    request_id="r", job=c.JobSpec(service="svc", payload=big_payload(256))
                )
            )
            await wait_for(lambda: not scheduler.sessions and open_streams(h.server) == 0, 20)
            await expect_stalled(stalled.call)
        reader = RawWorker(api)
        await reader.hello("reader", ["svc"])
        assignment = await reader.expect("assignment", timeout=20)
        assert assignment.job.id == job.job.id and assignment.attempt == 2
        await reader.send(complete=w.CompleteReport(job_id=job.job.id, attempt=2))
        await reader.expect("ack")
        await reader.close()
